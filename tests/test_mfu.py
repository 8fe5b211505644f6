"""MFU has a peak on every device: the data sheet on known GPUs, a measured and cached matmul peak elsewhere."""

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
