"""MFU has a peak on every device: the data sheet on known GPUs, a measured and cached matmul peak elsewhere;
`train.dtype = "auto"` on a CPU follows a bf16 measurement kept in the same cache."""

import json

import pytest

from tinylm import mfu
from tinylm.backends import get_backend


class _Named:
    name, device_name = "torch", "NVIDIA H100 80GB HBM3"


def test_known_gpu_uses_the_data_sheet(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    assert mfu.cached_peak(_Named(), "bfloat16") == (989e12, "data sheet")
    assert not (tmp_path / "peaks.json").exists()


def test_cpu_peak_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    backend = get_backend("torch", "float32")
    calls = []
    real = mfu.measured_matmul_peak

    def counted(*args, **kwargs):
        calls.append(1)
        return real(backend, "float32", sizes=(256,), repeats=1)

    monkeypatch.setattr(mfu, "measured_matmul_peak", counted)
    peak, source = mfu.cached_peak(backend, "float32")
    assert peak > 1e8 and source == "measured float32 matmul" and len(calls) == 1
    again, source = mfu.cached_peak(backend, "float32")
    assert again == peak and source.endswith("(cached)") and len(calls) == 1
    assert list(json.loads((tmp_path / "peaks.json").read_text()).values()) == [peak]
    mfu.cached_peak(backend, "float32", refresh=True)
    assert len(calls) == 2
    assert mfu.format_mfu(mfu.mfu(1000.0, peak / 1000.0 / 2, peak)) == "50.0%"


def _fake_speedup(monkeypatch, value: float) -> list:
    calls = []

    def speedup(backend, shapes, repeats=3):
        calls.append(shapes)
        return value

    monkeypatch.setattr(mfu, "bf16_matmul_speedup", speedup)
    return calls


def test_auto_dtype_on_a_cpu_follows_a_cached_measurement_at_the_models_sizes(monkeypatch, tmp_path):
    from tinylm.backends import BF16_MIN_SPEEDUP, resolve_dtype
    from tinylm.model import ModelConfig, resolve

    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path))
    shape = resolve(ModelConfig(preset="micro"))
    calls = _fake_speedup(monkeypatch, BF16_MIN_SPEEDUP + 0.5)
    fast = get_backend("torch", "auto", shape=shape, rows=128)
    assert fast.dtype == "bfloat16" and len(calls) == 1
    assert calls[0][0] == (128, shape.dim, shape.ffn_dim)  # the model's MLP on a micro-batch's tokens
    assert resolve_dtype(fast, "auto")[0] == "bfloat16" and len(calls) == 1  # settled once per backend
    again = get_backend("torch", "auto", shape=shape, rows=128)
    assert again.dtype == "bfloat16" and len(calls) == 1 and "cached" in resolve_dtype(again, "auto")[1]
    # Other sizes are measured on their own; a speed-up under the bar keeps fp32.
    _fake_speedup(monkeypatch, BF16_MIN_SPEEDUP - 0.2)
    assert get_backend("torch", "auto", shape=shape, rows=256).dtype == "float32"
    assert get_backend("torch", "bfloat16").dtype == "bfloat16"
    assert resolve_dtype(fast, "float32") == ("float32", "asked for")


def test_auto_dtype_on_mlx_is_float32_on_a_cpu_without_measuring(monkeypatch):
    pytest.importorskip("mlx.core")
    calls = _fake_speedup(monkeypatch, 10.0)
    backend = get_backend("mlx", "auto")
    if backend.device_name == "cpu":
        assert backend.dtype == "float32"
    assert not calls


def test_train_announces_and_records_the_resolved_dtype(monkeypatch, tmp_path, prepared, capsys):
    from test_trainer import _recipe

    from tinylm.train import checkpoint
    from tinylm.cli import main

    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache"))
    _fake_speedup(monkeypatch, 1.0)
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, prepared, steps=2)), "--backend", "torch", "--out", str(out),
                 "--set", "train.dtype=auto"]) == 0
    assert "dtype: float32 (bf16 matmuls 1.00x as fast as fp32" in " ".join(capsys.readouterr().err.split())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in rows if "loss" in r} == {"float32"}
    assert checkpoint.load(out).meta["dtype"] == "float32"
