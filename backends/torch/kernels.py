"""The PyTorch backend's own operations: RoPE tables, the embedding lookup, and cross-entropy, with its fused form
for the output head.

Custom operations (`torch.library.custom_op`) are opaque to `torch.compile`, which calls them as they are:
the RoPE tables are then made once per graph call rather than inlined into every element that reads them, and
the fused head loss keeps its in-place, block-by-block passes and its reused workspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The compute dtypes a recipe may name, as torch's."""


@torch.library.custom_op("tinylm::rope_tables", mutates_args=())
def rope_tables(positions: torch.Tensor, dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin tables, (*positions.shape, dim / 2), for integer `positions`."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.to(torch.float32)[..., None] * inv
    return angles.cos().to(dtype), angles.sin().to(dtype)


@rope_tables.register_fake
def _(positions, dim, theta, dtype):
    shape = (*positions.shape, dim // 2)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


@torch.library.custom_op("tinylm::embedding", mutates_args=())
def embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of `table` for integer `ids`: `F.embedding`, opaque to the compiler. Compiled, the table's gradient
    was a scatter-add whose threads added rows for repeated ids in whatever order they ran, so the same step
    gave gradients that differed in the last bits from one process to the next (and so did a resumed run);
    PyTorch's own embedding backward adds them in a fixed order. Eager and compiled steps both use it."""
    return F.embedding(ids, table)


@embedding.register_fake
def _(table, ids):
    return table.new_empty((*ids.shape, table.shape[1]))


@torch.library.custom_op("tinylm::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """The table's gradient: an operation of its own, as the compiler would otherwise trace PyTorch's embedding
    backward into the same scatter-add. Summed in float32, rounded once to a bf16 table's dtype."""
    return torch.ops.aten.embedding_dense_backward(grad.float(), ids, rows, -1, False).to(grad.dtype)


@embedding_backward.register_fake
def _(grad, ids, rows):
    return grad.new_empty((rows, grad.shape[-1]))


def _embedding_setup(ctx, inputs, output):
    table, ids = inputs
    ctx.save_for_backward(ids)
    ctx.rows = table.shape[0]


def _embedding_grad(ctx, grad):
    (ids,) = ctx.saved_tensors
    return torch.ops.tinylm.embedding_backward(grad, ids, ctx.rows), None


torch.library.register_autograd("tinylm::embedding", _embedding_grad, setup_context=_embedding_setup)


# From this many logits on, cross-entropy on a CPU runs fused with the output head (`linear_cross_entropy`):
# measured on 2 cores, forward and backward, 4,096 x 192 by 2,048 (the quickstart's) took 36 against 68 ms in
# float32 and 14 against 42 ms in bf16, 1,024 x 192 by 2,048 9.4 against 10.0 and 4.0 against 4.6 ms; below,
# the fused operation's fixed costs are the larger (768 x 128 by 65: 0.7 against 0.4 ms).
FUSED_MIN_LOGITS = 1 << 20
# Rows of logits per block of the fused cross-entropy's passes: a block stays in cache from one pass to the next.
BLOCK_BYTES = 4 << 20


class Workspace:
    """Logits-sized arrays kept from one step to the next. A freshly mapped array faults in each 4 KiB
    page on its first write: at 4,096 x 32,000 the head's forward matmul ran at 100-190 GFLOP/s into one, and at
    about 300 into memory already touched. An array is free again once no tensor refers to its storage (the
    backward pass has consumed the one handed out, or a checkpointed forward dropped it). A request that no free
    array fits drops the free ones before it maps a new one, so the pool holds no more arrays than were ever in
    use at once."""

    def __init__(self):
        self.storages: list[torch.UntypedStorage] = []

    def take(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = dtype.itemsize * rows * cols
        free = [s for s in self.storages if torch._C._storage_Use_Count(s._cdata) == 1]  # the pool's own
        storage = next((s for s in free if s.nbytes() >= nbytes and s.device == device), None)
        if storage is None:
            self.storages = [s for s in self.storages if all(s is not f for f in free)]
            storage = torch.UntypedStorage(nbytes, device=device)
            self.storages.append(storage)
        return torch.empty(0, device=device, dtype=dtype).set_(storage, 0, (rows, cols))


WORKSPACE = Workspace()


@torch.library.custom_op("tinylm::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, head: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row cross-entropy, exps, inverse row sums) of the logits hidden @ head.T, for hidden (rows, dim) and
    head both float32 or both bf16: the softmax is exps * inverse sums[:, None]. The logits, in the inputs'
    dtype, become exp(logit - row max) in place, block by block, one exp per logit, in a `WORKSPACE` array; the
    softmax itself is never written out. Each block is computed in float32 (bf16 logits converted one block at
    a time), and the losses and sums are float32 in either dtype."""
    exps = torch.mm(hidden, head.t(), out=WORKSPACE.take(hidden.shape[0], head.shape[0], hidden.device, hidden.dtype))
    picked = exps.gather(1, targets[:, None])[:, 0].float()
    top, sums = torch.empty_like(picked), torch.empty_like(picked)
    step = max(1, BLOCK_BYTES // (4 * exps.shape[1]))
    for start in range(0, exps.shape[0], step):
        block = exps[start:start + step]
        wide = block.float()  # the block itself where it is float32
        top[start:start + step] = wide.amax(1)
        sums[start:start + step] = wide.sub_(top[start:start + step, None]).exp_().sum(1)
        if wide is not block:
            block.copy_(wide)
    return top + sums.log() - picked, exps, sums.reciprocal()


@linear_cross_entropy.register_fake
def _(hidden, head, targets):
    rows = hidden.shape[0]
    return (hidden.new_empty(rows, dtype=torch.float32), hidden.new_empty(rows, head.shape[0]),
            hidden.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("tinylm::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: torch.Tensor, exps: torch.Tensor, inverse_sums: torch.Tensor,
                                   hidden: torch.Tensor, head: torch.Tensor,
                                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of hidden, gradient of head), in their dtype. The logits' gradient, g * (softmax -
    onehot(target)) per row, is never formed: the softmax's row scale g / sum moves onto the small side of each
    matmul, and the one-hot part is a row of the head (or of hidden) per target. So the exps are read by the two
    matmuls alone, in the exps' dtype (bf16 ones by bf16 matmuls, as the composed head's backward pass would)."""
    grad = grad.contiguous()
    dtype = hidden.dtype
    row_scale = (grad * inverse_sums)[:, None]
    grad_hidden = torch.addcmul(-grad[:, None] * head[targets], exps @ head, row_scale).to(dtype)
    scaled = (hidden * row_scale).to(dtype)
    if dtype == torch.float32 and hidden.shape[0] >= 8 * hidden.shape[1]:
        # As (dim, vocab), then copied into the head's layout: this orientation runs at about 320 GFLOP/s on 2
        # cores at 4,096 x 192 x 32,000, the other at about 240 (in bf16 it is the slower one). The copy is a
        # head-sized array more at peak, so only where that is small next to the exps (tokens, vocab): at
        # least 8 tokens per dimension.
        grad_head = torch.mm(scaled.t(), exps).t().contiguous()
    else:
        grad_head = exps.t() @ scaled
    grad_head.index_add_(0, targets, (hidden * -grad[:, None]).to(dtype))
    return grad_hidden, grad_head


@linear_cross_entropy_backward.register_fake
def _(grad, exps, inverse_sums, hidden, head, targets):
    return hidden.new_empty(hidden.shape), hidden.new_empty(head.shape)


def _linear_cross_entropy_setup(ctx, inputs, output):
    hidden, head, targets = inputs
    ctx.save_for_backward(hidden, head, targets, output[1], output[2])
    # The exps and sums are never differentiated: no logits-sized gradient of zeros for them.
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_grad(ctx, grad, _exps_grad, _sums_grad):
    hidden, head, targets, exps, inverse_sums = ctx.saved_tensors
    grad_hidden, grad_head = torch.ops.tinylm.linear_cross_entropy_backward(grad, exps, inverse_sums, hidden,
                                                                            head, targets)
    return grad_hidden, grad_head, None


torch.library.register_autograd("tinylm::linear_cross_entropy", _linear_cross_entropy_grad,
                                setup_context=_linear_cross_entropy_setup)


class CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of float32 logits (rows, vocabulary): log-sum-exp minus the target's logit. The
    backward is one pass over the logits (softmax from the saved log-sum-exp, minus one at the target) into one
    logits-sized array, where `F.cross_entropy`'s CPU backward zero-fills one and writes another through
    log-softmax's backward. Measured on 2 CPU cores at 4,096 x 32,000: forward and backward in 0.41-0.43 s
    against 0.46-0.88 s, the same values and gradients to 1e-10."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(-1, targets[:, None])[:, 0]

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        out = logits - lse[:, None]
        out.exp_().mul_(grad[:, None])
        out.scatter_add_(-1, targets[:, None], -grad[:, None])
        return out, None
