"""Model FLOPs utilization against a table of per-device dense peaks.

A device that is not in the table gets no MFU ("n/a"): a borrowed peak would be a made-up number.
`tinylm bench` measures a CPU's matmul peak on the spot and passes it in instead.
"""

from __future__ import annotations

# Dense (no sparsity) peak FLOP/s by device-name fragment and compute dtype, from the vendors' data sheets.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 418e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12},
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
