"""`make bench` rows: the nanoGPT-shape row and its plain-PyTorch baseline measure the same task."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinylm.bench import suite as bench
from tinylm.backends import get_backend
from tinylm.bench.baseline import baseline_throughput


def test_nanogpt_shape_row_and_its_baseline_start_from_the_same_loss_and_learn():
    name, config, seq_len, batch, _ = bench.CASES[0]
    assert name == "nanogpt-shape" and (seq_len, batch) == (bench.NANOGPT["context"], bench.NANOGPT["batch_size"])
    backend = get_backend("torch", "float32")
    shape, tps, losses = bench.train_throughput(backend, config, seq_len, batch, steps=4)
    base_tps, base_losses = baseline_throughput(steps=4, **bench.NANOGPT)
    assert (shape.n_layers, shape.dim, shape.vocab_size) == (4, 128, 65)
    for rate, curve in ((tps, losses), (base_tps, base_losses)):
        assert rate > 0 and len(curve) == 5
        assert abs(curve[0] - math.log(65)) < 0.3  # random init on uniform tokens: about ln(vocabulary)
        assert curve[-1] < curve[0]  # both repeat one batch, so both must fit it
    row = bench._row("nanogpt-shape", "torch", backend.device_name, tps, 1e6, 1e11, "given", 1.0, losses)
    assert {"name", "backend", "device", "dtype", "tokens_per_s", "mfu", "peak_gflops", "peak_memory_mb",
            "losses"} <= set(row) and row["peak_gflops"] == 100.0


def test_a_case_in_an_extra_dtype_gets_its_own_row_against_that_dtypes_peak(monkeypatch):
    from tinylm.model import ModelConfig

    assert bench.EXTRA_DTYPES[("torch", "mobilellm-125m")] == ("bfloat16",)  # the README's bf16/fp32 ratio
    monkeypatch.setattr(bench, "CASES", (("micro", ModelConfig(preset="micro"), 32, 2, 1),))
    monkeypatch.setattr(bench, "EXTRA_DTYPES", {("torch", "micro"): ("bfloat16",)})
    peaks = {"float32": (1e11, "given"), "bfloat16": (4e11, "given")}
    lines = []
    rows = bench.case_rows(get_backend("torch"), "micro", peaks, lines.append)
    assert [(r["name"], r["dtype"], r["peak_gflops"]) for r in rows] == [("micro", "float32", 100.0),
                                                                       ("micro", "bfloat16", 400.0)]
    assert abs(rows[1]["losses"][0] - rows[0]["losses"][0]) < 0.05  # the same weights and batch in either dtype
    assert "bfloat16" in lines[1] and "x fp32" in lines[1]


def test_a_row_says_whether_its_step_ran_compiled(monkeypatch):
    pytest.importorskip("mlx.core")
    from tinylm.model import ModelConfig

    monkeypatch.setattr(bench, "CASES", (("micro", ModelConfig(preset="micro"), 32, 2, 1),))
    monkeypatch.setattr(bench, "EXTRA_DTYPES", {})
    monkeypatch.setattr(bench, "COMPILED", {})
    peaks = {"float32": (1e11, "given")}
    for name, compiled in (("torch", False), ("mlx", True)):  # MLX compiles its step unless told not to
        rows = bench.case_rows(get_backend(name), "micro", peaks, lambda line: None)
        assert [r["compiled"] for r in rows] == [compiled]


@pytest.mark.slow
def test_a_compiled_case_gets_its_own_row_with_the_same_losses(monkeypatch):
    from tinylm.model import ModelConfig

    monkeypatch.setattr(bench, "CASES", (("micro", ModelConfig(preset="micro"), 32, 2, 2),))
    monkeypatch.setattr(bench, "EXTRA_DTYPES", {})
    monkeypatch.setattr(bench, "COMPILED", {("torch", "micro"): ("float32",)})
    rows = bench.case_rows(get_backend("torch"), "micro", {"float32": (1e11, "given")}, lambda line: None)
    assert [(r["dtype"], r["compiled"]) for r in rows] == [("float32", False), ("float32", True)]
    # Two more untimed steps for the compiled row; the first two losses come from the same weights and batch.
    assert len(rows[1]["losses"]) == len(rows[0]["losses"]) + 2
    assert abs(rows[1]["losses"][1] - rows[0]["losses"][1]) < 1e-4


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_childs_peak_memory_leaves_out_its_parents():
    # getrusage's maxrss would report the parent's 400 MB peak in the child, which is how a memory row once
    # showed 5.9 GB for a case that takes 1.7.
    block = np.ones(400 * 2**20 // 8)
    block[::512] += 1  # touch every page
    del block
    code = "from tinylm.bench.memory import resident_peak_bytes as f; print(f())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(child.stdout) < 300 * 2**20


def test_the_data_bench_prepares_every_family_it_writes():
    from tinylm.bench import data as data_bench

    result = data_bench.run(target_mb=0.05, echo=False)
    assert result["docs"] >= 30 and result["data_mb"] > 0.03  # each of its three families, 10 documents or more
    assert result["prepare_mb_per_s"] > 0 and result["prepare_without_cleaning_mb_per_s"] > 0


def test_decode_rows_put_tinylm_and_transformers_on_the_same_weights_and_prompts():
    pytest.importorskip("transformers")
    from tinylm.bench.generation import decode_rows
    from tinylm.model import ModelConfig

    lines = []
    rows = decode_rows(get_backend("torch"), batches=(3,), new_tokens=6, prompt_len=5, repeats=1,
                       config=ModelConfig(preset="micro", vocab_size=256, qk_norm=False), echo=lines.append)
    (row,) = rows
    assert row["name"] == "generate-micro" and row["batch"] == 3 and row["new_tokens"] == 6
    assert row["tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["same_greedy_tokens"] == 1.0  # the same model: the same greedy tokens
    assert set(row["transformers_by_dtype"]) == {"float32", "bfloat16"}
    best = row["transformers_best"]
    assert row["transformers_by_dtype"][best] == max(row["transformers_by_dtype"].values())
    assert row["ratio_to_best"] == pytest.approx(row["tokens_per_s"] / row["transformers_by_dtype"][best], rel=1e-2)
    assert "vs transformers float32" in lines[0] and "vs transformers bfloat16" in lines[0]


def test_real_shape_training_rows_start_both_sides_from_the_same_loss_and_keep_each_sides_best():
    pytest.importorskip("transformers")
    from tinylm.bench.real_shape import training_rows
    from tinylm.model import ModelConfig

    [row] = training_rows(get_backend("torch", "float32"), shapes=((2, 16),), steps=2,
                          config=ModelConfig(preset="micro", vocab_size=256), echo=lambda *_: None)
    ours, theirs = row["tinylm"]["float32"], row["transformers"]["float32"]
    # Same weights, same tokens: the first losses agree, and both sides learn over the steps.
    assert abs(ours["losses"][0] - theirs["losses"][0]) < 0.05
    assert ours["losses"][-1] < ours["losses"][0] and theirs["losses"][-1] < theirs["losses"][0]
    best = row["best"]
    assert row["ratio"] == pytest.approx(row["tinylm"][best["tinylm"]]["tokens_per_s"]
                                         / row["transformers"][best["transformers"]]["tokens_per_s"], rel=1e-2)
    assert all(row["tinylm"][best["tinylm"]]["tokens_per_s"] >= v["tokens_per_s"] for v in row["tinylm"].values())


@pytest.mark.slow  # two fresh processes, each importing torch
def test_sft_and_grpo_step_memory_rows_come_from_fresh_processes_and_train():
    from tinylm.bench.real_shape import memory_rows

    rows = memory_rows(("torch",), config={"preset": "micro", "vocab_size": 256}, batch_size=2, seq_len=16,
                       prompts=2, group=2, prompt_len=4, new_tokens=4, echo=lambda *_: None)
    assert [r["name"] for r in rows] == ["sft-step-135m-shape-memory", "grpo-step-135m-shape-memory"]
    for row in rows:
        assert row["peak_memory_mb"] > 0 and all(math.isfinite(v) for v in row["losses"])
    assert rows[1]["prompts"] * rows[1]["group"] == 4
