"""`train.dtype = "auto"` and an unset `train.compile` follow timed training steps of the model being trained:
the choice never goes to the slower side, the timings are cached per machine, model and micro-batch, and a
run records what it chose and why. Timings are injected: nothing here depends on this machine's speed."""

import dataclasses
import importlib.util
import json

import pytest

from tinylm import mfu, model
from tinylm.backends import get_backend
from tinylm.recipe import Recipe
from tinylm.train import autotune

AMD = {"model": "AMD EPYC", "cores": 2, "flags": ["avx2", "avx512_bf16", "avx512f"]}


@pytest.mark.parametrize("fp32,bf16", [(1.0, 0.5), (1.0, 0.97), (1.0, 1.0), (1.0, 2.0), (0.3, 0.28)])
def test_the_dtype_chosen_is_never_the_slower_one(fp32, bf16):
    choice, why = autotune.choose_dtype({"float32": fp32, "bfloat16": bf16})
    chosen = {"float32": fp32, "bfloat16": bf16}[choice]
    assert chosen <= fp32
    assert choice == ("bfloat16" if fp32 / bf16 >= autotune.MIN_GAIN else "float32")
    assert f"{fp32 / bf16:.2f}x" in why


@pytest.mark.parametrize("eager,compiled,compiling,steps,expect", [
    (1.0, 0.5, 40.0, 1000, True),   # pays for its compilation many times over
    (1.0, 0.5, 40.0, 50, False),    # faster, but 50 steps save 25 s of a 40 s compilation
    (1.0, 0.99, 1.0, 10 ** 6, False),  # within noise
    (1.0, 1.5, 1.0, 10 ** 6, False),   # compiled is slower
])
def test_compile_is_chosen_only_where_it_is_faster_and_pays_for_itself(eager, compiled, compiling, steps, expect):
    choice, why = autotune.choose_compile({"eager": eager, "compiled": compiled, "compiling": compiling}, steps)
    assert choice is expect and f"{steps} steps" in why
    if choice:
        assert compiled * steps + compiling < eager * steps


def test_the_cache_key_names_the_processor_its_flags_the_backend_the_model_and_the_micro_batch():
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    backend = get_backend("torch", "float32")
    key = autotune.trial_key(shape, r.train, "adamw")
    assert key == autotune.trial_key(shape, dataclasses.replace(r.train, steps=7, dtype="auto"), "adamw")
    others = [autotune.trial_key(dataclasses.replace(shape, dim=shape.dim * 2), r.train, "adamw"),
              autotune.trial_key(shape, dataclasses.replace(r.train, batch_size=r.train.batch_size + 1), "adamw"),
              autotune.trial_key(shape, dataclasses.replace(r.train, seq_len=r.train.seq_len * 2), "adamw"),
              autotune.trial_key(shape, dataclasses.replace(r.train, loss_chunk=64), "adamw"),
              autotune.trial_key(shape, r.train, "muon")]
    assert len({key, *others}) == 6
    here = mfu.machine_key(backend, key, AMD)
    assert "AMD EPYC" in here and "avx512_bf16" in here and key in here
    intel = {**AMD, "model": "Intel Xeon", "flags": AMD["flags"] + ["amx_bf16", "amx_tile"]}
    no_bf16 = {**AMD, "flags": ["avx2", "avx512f"]}

    class Other:
        name, device_name = "mlx", "cpu"

    assert len({here, mfu.machine_key(backend, key, intel), mfu.machine_key(backend, key, no_bf16),
                mfu.machine_key(Other(), key, AMD)}) == 4


def _inject(monkeypatch, seconds: dict, rates: dict | None = None) -> list:
    """Replaces the timed steps by `seconds` per side ({"float32": s, ...}) and the bf16 screen's matmul rates
    by `rates` (bf16 as fast as fp32 unless given); returns the sides timed per call."""
    calls = []
    monkeypatch.setattr(autotune, "matmul_rates", lambda backend: rates or {"float32": 1e11, "bfloat16": 1e11})

    def timed(backend, modules, weights, rows, lr):
        calls.append(sorted(modules))
        return {**{k: seconds[k] for k in modules}, **{f"{k} first": seconds.get(f"{k} first", 0.1) for k in modules}}

    monkeypatch.setattr(autotune, "_timed", timed)
    return calls


def _settle(cfg, shape, lines=None):
    return autotune.settle(get_backend("torch", cfg.dtype), cfg, shape, Recipe().optim,
                           lambda: model.init_params(shape, 0), (lines if lines is not None else []).append)


def test_settle_times_once_then_reads_the_cache_and_skips_compiling_a_short_run(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    cfg = dataclasses.replace(r.train, dtype="auto", steps=100, batch_size=2, seq_len=16)
    calls = _inject(monkeypatch, {"float32": 0.02, "bfloat16": 0.01})
    lines = []
    got = _settle(cfg, shape, lines)
    assert got["dtype"] == "bfloat16" and calls == [["bfloat16", "float32"]] and len(lines) == 1
    # 100 steps of 10 ms are 1 s in all: no compiled trial, eager.
    assert got["compile"] is False and "less than compiling" in got["compile_why"]
    assert got["seconds"]["dtypes"] == {"float32": 0.02, "bfloat16": 0.01}
    again = _settle(cfg, shape)
    assert again["dtype"] == "bfloat16" and len(calls) == 1 and "cached" in again["dtype_why"]
    # Asked-for values are not timed, save the eager step the compile decision needs.
    asked = _settle(dataclasses.replace(cfg, dtype="float32", compile=False), shape)
    assert (asked["dtype"], asked["compile"], asked["dtype_why"]) == ("float32", False, "asked for")
    assert len(calls) == 1


def test_settle_compiles_a_long_run_only_where_the_compiled_trial_won(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    cfg = dataclasses.replace(r.train, dtype="float32", steps=10_000, batch_size=2, seq_len=16)
    calls = _inject(monkeypatch, {"eager": 0.02, "compiled": 0.01, "compiled first": 5.0})
    got = _settle(cfg, shape)
    assert calls == [["eager"], ["compiled", "eager"]] and got["compile"] is True
    assert got["seconds"]["compile"] == {"eager": 0.02, "compiled": 0.01, "compiling": 5.0}
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "other"))
    calls = _inject(monkeypatch, {"eager": 0.02, "compiled": 0.03, "compiled first": 5.0})
    assert _settle(cfg, shape)["compile"] is False


def test_a_cpu_whose_bf16_matmuls_are_slower_gets_fp32_without_a_bf16_step(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    cfg = dataclasses.replace(r.train, dtype="auto", steps=100, batch_size=2, seq_len=16)
    calls = _inject(monkeypatch, {"float32": 0.02, "bfloat16": 0.01, "eager": 0.02},
                    {"float32": 1.2e11, "bfloat16": 1.5e10})
    got = _settle(cfg, shape)
    assert got["dtype"] == "float32" and ["bfloat16", "float32"] not in calls
    assert "15.0 GFLOP/s in bf16 against 120.0 in fp32" in got["dtype_why"]
    assert got["seconds"]["matmul_flops"] == {"float32": 1.2e11, "bfloat16": 1.5e10}
    assert "cached" in _settle(cfg, shape)["dtype_why"]
    # Where bf16 matmuls keep up, the steps decide.
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "other"))
    calls = _inject(monkeypatch, {"float32": 0.02, "bfloat16": 0.01}, {"float32": 1.2e11, "bfloat16": 2.4e11})
    assert _settle(cfg, shape)["dtype"] == "bfloat16" and ["bfloat16", "float32"] in calls


def test_the_screen_measures_both_dtypes_through_the_backend():
    rates = autotune.matmul_rates(get_backend("torch"))
    assert set(rates) == {"float32", "bfloat16"} and all(v > 0 for v in rates.values())
    assert (autotune.screen_dtype(rates) is None) == (rates["bfloat16"] >= rates["float32"])


def test_a_run_records_what_it_chose_and_why_and_a_resumed_run_keeps_it(monkeypatch, tmp_path, prepared, capsys):
    from test_trainer import _recipe

    from tinylm.cli import main
    from tinylm.train import checkpoint

    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache"))
    _inject(monkeypatch, {"float32": 0.02, "bfloat16": 0.04})
    out, recipe = tmp_path / "run", _recipe(tmp_path, prepared, steps=4)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--set", "train.dtype=auto"]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "dtype: float32 (a training step took 40.0 ms in bf16 against 20.0 ms in fp32" in said
    assert "compile: off (" in said
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["dtype"], r["compiled"]) for r in rows if "loss" in r} == {("float32", False)}
    meta = checkpoint.load(out).meta
    assert meta["dtype"] == "float32" and meta["choices"]["dtype"] == "float32"
    assert meta["choices"]["seconds"]["dtypes"] == {"float32": 0.02, "bfloat16": 0.04}
    # Faster bf16 timings now (another cache) would change a fresh run's choice, not the resumed one's.
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache2"))
    _inject(monkeypatch, {"float32": 0.04, "bfloat16": 0.02})
    assert main(["train", str(_recipe(tmp_path, prepared, steps=8)), "--backend", "torch", "--out", str(out),
                 "--resume", "--set", "train.dtype=auto"]) == 0
    assert "dtype: float32 (as this run's checkpoint ran" in " ".join(capsys.readouterr().err.split())
    assert checkpoint.load(out).meta["dtype"] == "float32"


def test_auto_dtype_on_mlx_is_settled_by_the_device_without_timing(monkeypatch, tmp_path):
    pytest.importorskip("mlx.core")
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    calls = _inject(monkeypatch, {"float32": 1.0, "bfloat16": 0.1})
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    cfg = dataclasses.replace(r.train, dtype="auto", steps=10 ** 6)
    got = autotune.settle(get_backend("mlx", "auto"), cfg, shape, r.optim, lambda: None)
    assert not calls and got["compile"] is True
    if get_backend("mlx").device_name == "cpu":
        assert got["dtype"] == "float32"


def test_a_backend_made_to_compile_or_not_is_taken_at_its_word(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    calls = _inject(monkeypatch, {"eager": 1.0, "compiled": 2.0, "compiled first": 1.0})
    r = Recipe()
    shape = model.resolve(dataclasses.replace(r.model, preset="micro"), vocab_size=512)
    cfg = dataclasses.replace(r.train, steps=10 ** 6)
    got = autotune.settle(get_backend("torch", compile=True), cfg, shape, r.optim, lambda: None)
    assert got["compile"] is True and not calls
    if importlib.util.find_spec("mlx") is not None:
        assert autotune.settle(get_backend("mlx", compile=False), cfg, shape, r.optim, lambda: None)["compile"] is False
