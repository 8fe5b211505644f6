"""What processor a run is on: its model, core count and the instruction sets that decide its speed.

A measurement (a matmul peak, a timed training step) holds for the processor it was taken on; these are what
tell one processor from another in a cache key and what a benchmark states beside its figures.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

# The instruction sets that change how fast a model's matmuls run: fused multiply-add and AVX widths, native
# bf16 and int8 dot products (AVX-512 BF16/VNNI, Intel's AMX tiles), and Arm's NEON, SVE, bf16 and int8 matmul.
ISA_FLAGS = ("sse4_2", "avx", "fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
             "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")


def _proc_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) from the text of Linux's /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cores() -> int:
    """Cores this process may run on (its affinity where the system says it, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_info(cpuinfo: str | None = None) -> dict:
    """{"model", "cores", "flags"}: the processor's name, the cores this process may use and, of `ISA_FLAGS`,
    those it has (sorted). `cpuinfo` is /proc/cpuinfo's text, read when not given."""
    if cpuinfo is None and Path("/proc/cpuinfo").is_file():
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model, flags = _proc_cpuinfo(cpuinfo or "")
    if model is None and platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        if platform.machine() == "arm64":  # every Apple silicon core has these; sysctl names them otherwise
            flags |= {"asimd", "asimddp"} | ({"bf16"} if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else set())
    return {"model": model or platform.processor() or platform.machine(), "cores": cores(),
            "flags": sorted(f for f in ISA_FLAGS if f in flags)}


_CACHED: dict | None = None


def this_cpu() -> dict:
    """`cpu_info()` of this machine, read once per process."""
    global _CACHED
    if _CACHED is None:
        _CACHED = cpu_info()
    return _CACHED


def cpu_summary(info: dict | None = None) -> str:
    """One line: "AMD EPYC, 2 cores, avx2 avx512_bf16 ..."."""
    info = info or this_cpu()
    return f"{info['model']}, {info['cores']} cores, {' '.join(info['flags']) or 'no listed ISA extensions'}"
