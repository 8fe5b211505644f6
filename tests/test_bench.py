"""`make bench` rows: the nanoGPT-shape row and its plain-PyTorch baseline measure the same task."""

import math

from tinylm import bench
from tinylm.backends import get_backend
from tinylm.bench_baseline import baseline_throughput


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
