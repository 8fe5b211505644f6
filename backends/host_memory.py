"""Host memory on Linux: glibc's malloc told to keep freed memory for the next allocation, for the backends whose
arrays come from malloc (PyTorch's CPU tensors, MLX's CPU arrays).

By default glibc maps every block over 32 MiB (a step's logits, their exps, their gradient) afresh and unmaps it
when it is freed, so each step pays a page fault per 4 KiB of them again. Kept, those pages are reused. The cost
is resident memory: freed blocks stay with the process and fragment the heap.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "TINYLM_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory(default: bool) -> bool:
    """Serve every allocation from the heap and keep up to 1 GiB of freed memory there, if `ENV` says so ("1"
    on, "0" off) or, unset, if `default`. Left alone where the environment tunes malloc itself (`MALLOC_*_`,
    `GLIBC_TUNABLES`) and off Linux. Returns whether it took effect."""
    setting = os.environ.get(ENV)
    if not sys.platform.startswith("linux") or not (default if setting is None else setting == "1"):
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False
