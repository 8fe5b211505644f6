"""MLX backend: Metal on Apple silicon, CPU elsewhere. Steps are `mx.compile`d as pure functions of
(parameters, optimizer state, batch), so no state is captured behind the compiler's back."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import numpy as np

from tinylm.errors import UserError


from tinylm.backends.mlx import linux_cpu  # noqa: E402  (imports no mlx: the BLAS goes first)

linux_cpu.load_openblas()

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from tinylm.backends import host_memory  # noqa: E402
from tinylm.backends.mlx import cpu_streams  # noqa: E402

if mx.default_device() == mx.cpu:
    linux_cpu.use_vectorizing_compiler()
    # On by default here: MLX's CPU arrays come from malloc too, and a `tiny` step's head loss alone maps,
    # faults in and unmaps about 1 GiB of exps and logits; 4,096 x 192 by 32,000, forward and backward on 2
    # cores: 1,085 against 875 ms.
    host_memory.keep_freed_memory(default=True)

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Below this many queries, splitting attention across streams costs more in extra operations than it saves.
# Measured on 2 cores, forward and backward compiled, 12 x 4 heads x 32 dims: 1.1 ms either way at 32 queries,
# 2.0 against 3.9 ms at 64, 0.8 against 0.4 ms at 16.
_STREAMED_MIN_TIME = 32


class MLXOps:
    """The operations `tinylm.model` and `tinylm.train.optim` are written against."""

    def __init__(self):
        # On a CPU with several cores: one stream per core, for the kernels of `cpu_streams`.
        self._streams = cpu_streams.core_streams() if mx.default_device() == mx.cpu else []

    def linear(self, x, w):
        return x @ w.T

    def embed(self, table, ids):
        return table[ids]

    def rms_norm(self, x, weight, eps):
        return mx.fast.rms_norm(x, weight, eps)

    def rope(self, x, theta, offset=0, positions=None):
        if positions is None:
            return mx.fast.rope(x, x.shape[-1], traditional=False, base=float(theta), scale=1.0, offset=offset)
        # Per-token positions (batch, time), as packed rows need: the same rotation of the two halves.
        half = x.shape[-1] // 2
        inv = 1.0 / (float(theta) ** (mx.arange(0, x.shape[-1], 2, dtype=mx.float32) / x.shape[-1]))
        angles = positions.astype(mx.float32)[:, None, :, None] * inv
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def attention(self, q, k, v, scale, mask):
        t = q.shape[2]
        if len(self._streams) > 1 and isinstance(mask, str) and k.shape[2] == t and t >= _STREAMED_MIN_TIME:
            return cpu_streams.causal_attention(self._streams, scale)(q, k, v)
        # mx.fast's "causal" aligns the diagonal to the bottom right, which is what a cached prefix needs.
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def silu(self, x):
        # A CPU: `cpu_streams.exp`, twice as fast as the sigmoid's own where kernels are not vectorized.
        if self._streams:
            return x / (1.0 + cpu_streams.exp(-x))
        return x * mx.sigmoid(x)

    def transpose(self, x, axes):
        return x.transpose(axes)

    def concat(self, xs, axis):
        return mx.concatenate(xs, axis=axis)

    def kv_buffer(self, x, capacity: int):
        """A (batch, heads, capacity, head_dim) buffer of x's dtype holding `x` at its start."""
        pad = mx.zeros((*x.shape[:2], capacity - x.shape[2], x.shape[3]), dtype=x.dtype)
        return mx.concatenate([x, pad], axis=2)

    def kv_write(self, buf, x, start: int):
        """`buf` with `x` written along its time axis from `start` (a slice update MLX can do in place)."""
        buf[:, :, start:start + x.shape[2]] = x
        return buf

    def cast(self, x, dtype: str):
        return x.astype(_DTYPES[dtype])

    def cross_entropy(self, logits, targets):
        """Per-token negative log-likelihood in nats, computed in float32."""
        logits = logits.astype(mx.float32)
        if len(self._streams) > 1:
            rows = cpu_streams.cross_entropy(self._streams)(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            return rows.reshape(targets.shape)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return mx.logsumexp(logits, axis=-1) - picked

    def linear_cross_entropy(self, hidden, head, targets):
        """`cross_entropy(linear(hidden, head), targets)`; on a CPU with several cores, for float32, as one
        operation whose backward pass never forms the logits' gradient (`cpu_streams.linear_cross_entropy`).
        Measured on 2 cores at 4,096 x 192 by 32,000, forward and backward: 1.97 s against 2.37-2.44 s."""
        if len(self._streams) < 2 or hidden.dtype != mx.float32 or head.dtype != mx.float32:
            return self.cross_entropy(self.linear(hidden, head), targets)
        rows = hidden.reshape(-1, hidden.shape[-1])
        return cpu_streams.linear_cross_entropy(self._streams)(rows, head, targets.reshape(-1)).reshape(targets.shape)

    def log_softmax(self, logits):
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def take_along_last(self, x, ids):
        return mx.take_along_axis(x, ids, axis=-1)

    def exp(self, x):
        return mx.exp(x)

    def top_k(self, x, k):
        """(values, ids) of the k largest entries along the last axis (in no particular order)."""
        ids = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
        return mx.take_along_axis(x, ids, axis=-1), ids

    def sqrt(self, x):
        return mx.sqrt(x)

    def addmm(self, c, a, b, alpha: float, beta: float):
        """alpha * (a @ b) + beta * c in one operation."""
        return mx.addmm(c, a, b, alpha=alpha, beta=beta)

    def sum_squares(self, x):
        x = x.astype(mx.float32)
        return (x * x).sum()

    def minimum(self, a, b):
        return mx.minimum(a, b)

    def lanes(self, shapes: dict) -> dict:
        """A context per tensor of `shapes` ({name: shape}) to compute its independent work under: on a CPU with
        several cores a stream each (`cpu_streams.spread`)."""
        if len(self._streams) < 2:
            return {name: contextlib.nullcontext() for name in shapes}
        return {name: mx.stream(self._streams[i]) for name, i in cpu_streams.spread(shapes, len(self._streams)).items()}

    def scalar(self, value):
        return mx.array(value, dtype=mx.float32)

    def zeros_like(self, x):
        return mx.zeros_like(x)

    def checkpoint(self, fn):
        """`fn` made to keep only its arguments (arrays, or dicts and lists of them) for the backward pass and
        recompute the rest there; only its arguments get gradients, so every array to differentiate must be
        passed in, not closed over."""

        @mx.custom_function
        def run(*args):
            return fn(*args)

        @run.vjp
        def run_vjp(primals, cotangents, outputs):
            # Recomputed once the gradient arrives, not merely once the forward is done (mx.checkpoint's
            # rule): calls that feed each other then recompute one at a time, not all as soon as they can.
            def leaves(tree):
                return [v for _, v in tree_flatten(tree)]

            def like_primals(xs):  # leaves back into the arguments' structure (keys may hold dots)
                it = iter(xs)
                return tree_map(lambda _: next(it), list(primals))

            _, grads = mx.vjp(lambda *xs: leaves(fn(*like_primals(xs))),
                              mx.depends(leaves(list(primals)), leaves([outputs, cotangents])), leaves(cotangents))
            # Handed on together, so that none is computed late and keeps the recomputation's memory alive.
            return tuple(like_primals(mx.depends(grads, grads)))

        return run


def _split_like(flat, arrays: list) -> list:
    offsets = np.cumsum([a.size for a in arrays])[:-1].tolist()
    return [piece.reshape(a.shape) for piece, a in zip(mx.split(flat, offsets), arrays)]


class MLXBackend:
    name = "mlx"

    def __init__(self, dtype: str = "float32", compile: bool = True):
        if dtype not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
        self.dtype = dtype
        self.use_compile = compile
        self.ops = MLXOps()
        self._group = None
        if mx.distributed.is_available() and any(v in os.environ for v in ("MLX_RANK", "OMPI_COMM_WORLD_RANK")):
            group = mx.distributed.init()
            self._group = group if group.size() > 1 else None

    @property
    def device_name(self) -> str:
        if mx.default_device() == mx.gpu:
            try:
                return mx.device_info().get("device_name", "Apple GPU")
            except AttributeError:
                return "Apple GPU"
        return "cpu"

    def auto_dtype(self) -> tuple[str, str]:
        """(dtype, why) for `train.dtype = "auto"`: the device settles it, nothing to measure."""
        if mx.default_device() == mx.gpu:
            return "bfloat16", f"{self.device_name} computes bf16 natively"
        return "float32", "MLX's bf16 matmul on a CPU is slower than fp32"

    def auto_compile(self) -> tuple[bool, str]:
        """(compile, why) for an unset `train.compile`: the backend settles it, nothing to time."""
        if not self.use_compile:
            return False, "the backend was made not to compile"
        return True, "mx.compile takes milliseconds and fuses the step's elementwise work"

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    def from_numpy(self, arrays: dict) -> dict:
        return {k: mx.array(v) for k, v in arrays.items()}

    def tokens(self, array: np.ndarray):
        return mx.array(np.asarray(array, dtype=np.int32))

    def to_numpy(self, tree: dict) -> dict:
        mx.eval(tree)
        return {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in tree.items()}

    def item(self, x) -> float:
        return float(x.item())

    def grad_step(self, fn, compile: bool | None = None):
        """fn(params, *args) -> scalar becomes fn(params, *args) -> (scalar, grads) over the params dict.

        `on_grad(name, grad)`, if given, gets every gradient, last parameter first (the order of a backward
        pass). MLX builds the whole graph before it runs, so its reductions are scheduled with the rest anyway.
        `compile` overrides the backend's setting for this step (None keeps it). `into`, if given, holds earlier
        gradients (gradient accumulation) that this step's are added to; the sums are returned.
        """
        step = mx.value_and_grad(fn)
        step = mx.compile(step) if self._compiles(compile) else step

        def wrapped(params, *args, on_grad=None, into=None):
            value, grads = step(params, *args)
            for name in reversed(list(grads)) if on_grad is not None else ():
                on_grad(name, grads[name])
            if into is not None:  # MLX arrays are immutable: the sums are new arrays
                grads = {k: into[k] + g for k, g in grads.items()}
            return value, grads

        return wrapped

    def pure_step(self, fn, compile: bool | None = None):
        """A function of arrays with no gradient (the optimizer update, evaluation), compiled if asked (`compile`
        overrides the backend's setting; None keeps it)."""
        return mx.compile(fn) if self._compiles(compile) else fn

    def _compiles(self, compile: bool | None) -> bool:
        return self.use_compile if compile is None else compile

    def fused_adamw(self, cfg):
        """None: MLX compiles the core rule into fused kernels itself (`pure_step`)."""
        return None

    def sync(self) -> None:
        mx.synchronize()

    def materialize(self, tree) -> None:
        mx.eval(tree)

    # Data parallelism under mlx.launch (ring on CPU, MPI or JACCL across Macs).
    @property
    def world_size(self) -> int:
        return self._group.size() if self._group is not None else 1

    @property
    def rank(self) -> int:
        return self._group.rank() if self._group is not None else 0

    # Flat collectives over lists of arrays (see `tinylm.train.distributed`, which plans what goes in each list).
    def all_sum_flat(self, arrays: list) -> list:
        flat = mx.concatenate([a.reshape(-1) for a in arrays])
        return _split_like(mx.distributed.all_sum(flat, group=self._group), arrays)

    def all_sum_flat_async(self, arrays: list):
        summed = self.all_sum_flat(arrays)  # lazy: it runs when the step's results are evaluated
        return lambda: summed

    def broadcast_flat(self, arrays: list, src: int) -> list:
        # mx.distributed has no broadcast: src's values summed with zeros from every other rank (x + 0 == x).
        if self.rank != src:
            arrays = [mx.zeros_like(a) for a in arrays]
        return self.all_sum_flat(arrays)

    def send_to_zero_flat(self, arrays: list, src: int) -> list:
        """Every rank gets src's arrays (a broadcast), which includes rank 0."""
        if src == 0:
            return arrays
        received = self.broadcast_flat(arrays, src)
        # Evaluated now on every rank: the other ranks drop the result, and a collective left lazy never runs
        # there, so rank 0 would wait for them forever.
        mx.eval(received)
        return received

    def stand_in(self, shape: tuple):
        """A float32 array of `shape` to size a received buffer by (a broadcast zero, lazy until used)."""
        return mx.broadcast_to(mx.array(0.0, dtype=mx.float32), tuple(shape))

    def barrier(self) -> None:
        if self.world_size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self._group))

    def close(self) -> None:
        """Every rank reaches this point before any exits (MLX's groups need no teardown)."""
        self.barrier()

    def peak_memory_bytes(self) -> int | None:
        try:
            return int(mx.get_peak_memory())
        except AttributeError:
            return None

    def reset_peak_memory(self) -> None:
        """Start `peak_memory_bytes` afresh."""
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
