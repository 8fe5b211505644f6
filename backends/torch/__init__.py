"""PyTorch backend: CUDA (flash attention through `scaled_dot_product_attention`, optional `torch.compile`)
or CPU. Parameters stay float32; the core casts them to the compute dtype inside the loss."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from tinylm.backends import host_memory
from tinylm.backends.torch import kernels
from tinylm.backends.torch.collectives import TorchCollectives
from tinylm.errors import UserError

_DTYPES = kernels.DTYPES


class TorchOps:
    """The operations `tinylm.model` and `tinylm.train.optim` are written against."""

    def __init__(self, device: torch.device):
        self.device = device
        self._rope_cache: dict = {}

    def linear(self, x, w):
        return F.linear(x, w)

    def embed(self, table, ids):
        return torch.ops.tinylm.embedding(table, ids)  # its gradient summed in a fixed order, even compiled

    def rms_norm(self, x, weight, eps):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def _rope_tables(self, t, offset, dim, theta, dtype):
        if torch.compiler.is_compiling():
            # Traced, the tables come from an operation the compiler cannot see into: inlined, their cos and
            # sin were computed again for every element of q and k they broadcast over, in the forward pass and
            # again in the backward (3.6 of a 20 ms compiled `nanogpt-shape` step in bf16). And the cache is
            # left alone while tracing: filling it would change what the graph's guards check.
            positions = torch.arange(offset, t + offset, device=self.device)
            return torch.ops.tinylm.rope_tables(positions, dim, theta, dtype)
        key = (t + offset, dim, theta, dtype)
        if key not in self._rope_cache:
            positions = torch.arange(t + offset, device=self.device)
            self._rope_cache = {key: kernels.rope_tables(positions, dim, theta, dtype)}
        cos, sin = self._rope_cache[key]
        return cos[offset:], sin[offset:]

    def rope(self, x, theta, offset=0, positions=None):
        # Rotates the two halves of each head (the Llama / `traditional=False` layout), like mx.fast.rope.
        half = x.shape[-1] // 2
        if positions is None:
            cos, sin = self._rope_tables(x.shape[-2], int(offset), x.shape[-1], float(theta), x.dtype)
        else:  # per-token positions (batch, time): tables broadcast over the heads
            cos, sin = torch.ops.tinylm.rope_tables(positions, x.shape[-1], float(theta), x.dtype)
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def attention(self, q, k, v, scale, mask):
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] > 1:
            # PyTorch's CPU flash attention runs its backward pass in bf16 at half the speed of float32's
            # (measured on 2 AMX cores, 16 x 6 heads x 256 x 32: 21 ms against 10 ms); float32 is exact too.
            # A decoding step's one query has no backward pass, and converting the whole cache costs it.
            return self.attention(q.float(), k.float(), v.float(), scale, mask).to(q.dtype)
        t, s = q.shape[-2], k.shape[-2]
        gqa = q.shape[1] != k.shape[1]
        if t == 1 and gqa:
            # A decoding step: each key/value head's group of queries as the rows of one attention, where
            # PyTorch's GQA path on a CPU took 1.3x (fp32) to 5x (bf16) as long (2 cores, 8 rows x 9 heads over
            # 3, 160 keys: 83 against 64 us, 468 against 93). One query sees every key before it: no mask but
            # the batch's padding, which broadcasts over the groups.
            b, h, _, d = q.shape
            grouped = q.reshape(b, k.shape[1], h // k.shape[1], d)
            mask = None if isinstance(mask, str) else mask
            return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale).reshape(b, h, 1, d)
        if isinstance(mask, str):
            if t == s:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            # Queries continue a cached prefix: the causal diagonal sits at the bottom right.
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    def silu(self, x):
        return F.silu(x)

    def transpose(self, x, axes):
        return x.permute(*axes)

    def concat(self, xs, axis):
        return torch.cat(xs, dim=axis)

    def kv_buffer(self, x, capacity: int):
        """A (batch, heads, capacity, head_dim) buffer of x's dtype holding `x` (batch, heads, time, head_dim)
        at its start: a KV cache's room to grow."""
        buf = x.new_empty((*x.shape[:2], capacity, x.shape[3]))
        buf[:, :, :x.shape[2]] = x
        return buf

    def kv_write(self, buf, x, start: int):
        """`buf` with `x` written along its time axis from `start`, in place."""
        buf[:, :, start:start + x.shape[2]] = x
        return buf

    def cast(self, x, dtype: str):
        return x.to(_DTYPES[dtype])

    def cross_entropy(self, logits, targets):
        """Per-token negative log-likelihood in nats, computed in float32."""
        flat, targets_flat = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        if flat.device.type == "cpu":
            return kernels.CrossEntropy.apply(flat, targets_flat).reshape(targets.shape)
        # CUDA: PyTorch's own fused kernels (the figures measured on a GPU used them).
        return F.cross_entropy(flat, targets_flat, reduction="none").reshape(targets.shape)

    def linear_cross_entropy(self, hidden, head, targets):
        """`cross_entropy(linear(hidden, head), targets)`; on a CPU, for float32 or bf16 logits of at least
        `kernels.FUSED_MIN_LOGITS`, in one fused operation (`kernels.linear_cross_entropy`). Measured on 2 cores
        at 4,096 x 192 by 32,000, forward and backward: best of 4, 0.61 s against 1.01 s composed in float32, the
        same loss and gradients; at 1,024 x 576 by 32,000 in bf16, 0.12 against 0.28 s."""
        rows = hidden.numel() // hidden.shape[-1]
        if (hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.bfloat16)
                or rows * head.shape[0] < kernels.FUSED_MIN_LOGITS):
            return self.cross_entropy(self.linear(hidden, head), targets)
        losses, _, _ = torch.ops.tinylm.linear_cross_entropy(hidden.reshape(rows, hidden.shape[-1]), head,
                                                          targets.reshape(-1))
        return losses.reshape(targets.shape)

    def log_softmax(self, logits):
        return F.log_softmax(logits.float(), dim=-1)

    def take_along_last(self, x, ids):
        return torch.gather(x, -1, ids)

    def exp(self, x):
        return torch.exp(x)

    def top_k(self, x, k):
        """(values, ids) of the k largest entries along the last axis."""
        values, ids = torch.topk(x, k, dim=-1)
        return values, ids

    def sqrt(self, x):
        return torch.sqrt(x)

    def addmm(self, c, a, b, alpha: float, beta: float):
        """alpha * (a @ b) + beta * c in one operation."""
        return (torch.baddbmm if a.dim() == 3 else torch.addmm)(c, a, b, alpha=alpha, beta=beta)

    def sum_squares(self, x):
        return (x.float() * x.float()).sum()

    def minimum(self, a, b):
        return torch.minimum(a, b)

    def lanes(self, shapes: dict) -> dict:
        """A context per tensor to compute its independent work under: one lane, PyTorch's kernels already use
        every core."""
        return {name: contextlib.nullcontext() for name in shapes}

    def scalar(self, value):
        return torch.tensor(value, dtype=torch.float32, device=self.device)

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def checkpoint(self, fn):
        """`fn` made to keep only its arguments for the backward pass and recompute the rest there."""
        return functools.partial(torch.utils.checkpoint.checkpoint, fn, use_reentrant=False)


def _report_grad(on_grad, name, grad):
    on_grad(name, grad)  # returns None: autograd keeps the gradient as it is


class TorchBackend(TorchCollectives):
    name = "torch"

    def __init__(self, dtype: str = "float32", compile: bool = False, fused_adamw: bool | None = None):
        if dtype not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.use_compile = compile
        # PyTorch's fused AdamW: one kernel per parameter group instead of a dozen operations per tensor (about
        # 7% of a small model's CPU step); the core rule remains for MLX and for tests against it.
        self.use_fused_adamw = True if fused_adamw is None else fused_adamw
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            # A process that exits with its process group alive can abort in gloo's teardown (SIGABRT,
            # "terminate called without an active exception"); `close` is the orderly way, this the fallback.
            atexit.register(self._destroy_group)
            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        self.ops = TorchOps(self.device)
        if self.device.type == "cpu":
            # Off by default here: faster steps (`tiny` +20% eager, +7% compiled; `mobilellm-125m` +16%) but
            # peak resident size +47% on `tiny`, and chunked cross-entropy's peak went from 1,499 to 3,954 MiB,
            # which defeats its purpose. The fused head loss keeps its own logits-sized workspace instead.
            host_memory.keep_freed_memory(default=False)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def auto_dtype(self) -> tuple[str, str] | None:
        """(dtype, why) for `train.dtype = "auto"` where the device settles it; None on a CPU, where only a
        measurement tells whether bf16 matmuls are faster (AMX) or slower (emulated)."""
        if self.device.type != "cuda":
            return None
        # Emulated bf16 (before compute capability 8) runs but is slower than fp32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{self.device_name} has native bf16"
        return "float32", f"{self.device_name} has no native bf16"

    def auto_compile(self) -> tuple[bool, str] | None:
        """None: whether torch.compile pays for itself depends on the model, the device and the run's length,
        which only timing tells (`tinylm.train.autotune`)."""
        return None

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def from_numpy(self, arrays: dict) -> dict:
        # A copy into torch's own (aligned) allocation: CPU BLAS kernels can round differently on memory
        # of another alignment, and a resumed run must reproduce the uninterrupted one bit for bit.
        return {k: torch.tensor(np.ascontiguousarray(v), device=self.device) for k, v in arrays.items()}

    def tokens(self, array: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)

    def to_numpy(self, tree: dict) -> dict:
        return {k: v.detach().float().cpu().numpy() if v.dtype == torch.bfloat16 else v.detach().cpu().numpy()
                for k, v in tree.items()}

    def item(self, x) -> float:
        return float(x)

    def grad_step(self, fn, compile: bool | None = None):
        """fn(params, *args) -> scalar becomes fn(params, *args) -> (scalar, grads) over the params dict.

        `on_grad(name, grad)`, if given, is called with each parameter's gradient as soon as backward has it
        (what lets data parallelism reduce gradients while backward runs). `compile` overrides the backend's
        setting for this step (None keeps it; a stage's `train.compile`). With compile on, the forward is
        compiled by `torch.compile` and autograd differentiates the graph; where compilation fails (no C++
        compiler for the CPU's kernels, say), it runs eagerly instead, with PyTorch's warning. `into`, if given,
        is a dict of earlier gradients (gradient accumulation) that this step's are added to, in place; the
        sums are returned.
        """
        compile = self.use_compile if compile is None else compile
        if compile:
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True
        forward = torch.compile(fn) if compile else fn

        def wrapped(params, *args, on_grad=None, into=None):
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            if on_grad is not None:  # called by autograd with each leaf's whole gradient, during backward
                for k, leaf in leaves.items():
                    leaf.register_hook(functools.partial(_report_grad, on_grad, k))
            value = forward(leaves, *args)
            if into is None:
                grads = torch.autograd.grad(value, list(leaves.values()))
                return value.detach(), dict(zip(leaves, grads))
            # Autograd adds each gradient into the one already there, in place, as soon as it has it: one set
            # of gradients at a time instead of the running sum and the whole new set (135M parameters: 540 MB).
            for k, leaf in leaves.items():
                leaf.grad = into[k]
            torch.autograd.backward(value, inputs=list(leaves.values()))
            return value.detach(), {k: leaf.grad for k, leaf in leaves.items()}

        return wrapped

    def pure_step(self, fn, compile: bool | None = None):
        """A function of arrays with no gradient (the optimizer update, evaluation), run eagerly even with
        compile on: compiling Muon's update took 70 s on a 2-core CPU (`tiny`) for steps 4% faster, AdamW's
        is one fused kernel already, and evaluation runs too rarely to repay its compilation."""

        def wrapped(*args):
            with torch.no_grad():
                return fn(*args)

        return wrapped

    def fused_adamw(self, cfg):
        """AdamW through PyTorch's fused kernel (one launch per parameter group), on CPU and CUDA unless the
        backend was made with `fused_adamw=False`. Same rule as `tinylm.train.optim.update`, in place.

        Returns None (use the core rule) for other optimizers or when turned off.
        """
        if not self.use_fused_adamw or cfg.name != "adamw":
            return None
        from torch.optim.adamw import adamw

        @torch.no_grad()
        def update(params, grads, state, lr, step, grad_scale=None):
            # The kernel divides each gradient by `grad_scale` as it reads it (in place): clipping costs no
            # pass of its own (38 multiplications took 1.2 ms of a 20 ms `nanogpt-shape` step).
            divisor = None if grad_scale is None else (1.0 / grad_scale).to(torch.float32)
            for decay, names in ((cfg.weight_decay, [k for k in params if params[k].dim() >= 2]),
                                 (0.0, [k for k in params if params[k].dim() < 2])):
                # The kernel counts steps itself, in place: hand it the count before this step, one tensor each.
                steps = torch.full((len(names),), float(step) - 1.0, device=self.device).unbind()
                adamw([params[k] for k in names], [grads[k] for k in names],
                      [state["exp_avg." + k] for k in names], [state["exp_avg_sq." + k] for k in names], [],
                      list(steps), fused=True, amsgrad=False, beta1=cfg.beta1, beta2=cfg.beta2, lr=float(lr),
                      weight_decay=decay, eps=cfg.eps, maximize=False, grad_scale=divisor, found_inf=None)
            return params, state

        return update

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def materialize(self, tree) -> None:
        """Torch runs eagerly; nothing is pending."""

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        return None

    def reset_peak_memory(self) -> None:
        """Start `peak_memory_bytes` afresh (a CPU's peak resident size cannot be reset)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
