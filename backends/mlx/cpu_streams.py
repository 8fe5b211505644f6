"""Cross-entropy (alone, or with the output head's matmul) and causal attention for MLX on a CPU with several
cores, and the exp they use there.

Outside BLAS, MLX's CPU kernels run on one thread each, and these spend most of their time in exp and in row
reductions (hence `exp`, `row_max` and `row_sum`), but every stream runs on a thread of its own. So here
each of these splits its work into independent parts, one stream per core: cross-entropy by rows, causal
attention by sequences when they are short and else by blocks of queries, each block computing only the keys
it sees and paired with the block of the same index from the end so that every stream gets the same work.
Each part's backward pass runs on its part's stream too. Their results are those of one `mx.logsumexp` or
`mx.fast.scaled_dot_product_attention` to float rounding.
"""

from __future__ import annotations

import functools
import math
import os

import mlx.core as mx

from tinylm.backends.mlx import linux_cpu


LOG2_E = 1.4426950408889634


def exp_by_pow(x):
    """e**x as 2**(x log2 e). Where MLX's fused kernels are built for the baseline processor, its exp runs at
    about 76M values/s on this kind of core and its pow (the C library's) at about 165M/s, to the same
    accuracy: 1e-6 relative over [-20, 0], as exp's own."""
    return mx.power(2.0, x * LOG2_E)


def exp(x):
    """e**x by the faster of MLX's CPU kernels here: its own exp where its fused kernels are vectorized
    (`linux_cpu.use_vectorizing_compiler`: about 390M values/s fused, against pow's 170M), else `exp_by_pow`."""
    return mx.exp(x) if linux_cpu.vectorized_kernels else exp_by_pow(x)


def row_max(x):
    """x.max(axis=-1, keepdims=True), reduced first across groups of 16 (or 8, 4, 2) neighbours and then within
    them: MLX reduces a strided axis element-wise over the contiguous one, which its compiler vectorizes, but
    a contiguous row one value at a time. 2,048 x 32,000 on one core: 41 against 108 ms."""
    n = x.shape[-1]
    group = next((g for g in (16, 8, 4, 2) if n % g == 0), 1)
    if group == 1:
        return x.max(axis=-1, keepdims=True)
    return x.reshape(*x.shape[:-1], n // group, group).max(axis=-2).max(axis=-1, keepdims=True)


def row_sum(x):
    """x.sum(axis=-1) as a product with a vector of ones, which BLAS computes several values at a time, where
    MLX's sum adds one value at a time. 2,048 x 32,000: 24 against 77 ms."""
    return (x @ mx.ones((x.shape[-1], 1), dtype=x.dtype))[..., 0]


def shifted_exps(x) -> tuple:
    """(exp(x - row max), row max (keeping its axis), row sums of those exps) over the last axis: a softmax is
    the exps over their sums. Cross-entropy and attention keep the exps for their backward passes."""
    top = mx.stop_gradient(row_max(x))
    e = exp(x - top)
    return e, top, row_sum(e)


@functools.cache
def core_streams() -> list:
    """One CPU stream per core this process may use (the default stream first); one stream on one core. Made
    once per process: each stream has a thread of its own, and every backend made after the first shares them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(cores - 1)]


def spread(shapes: dict, n: int) -> dict:
    """{name: stream index} for tensors of `shapes` ({name: shape}): the largest first, each to the stream
    with the fewest values so far."""
    values, index = [0] * n, {}
    for name in sorted(shapes, key=lambda name: -math.prod(shapes[name])):
        index[name] = values.index(min(values))
        values[index[name]] += math.prod(shapes[name])
    return index


def _row_parts(streams: list, rows: int) -> list:
    n = min(len(streams), rows)
    return [(streams[i], slice(i * rows // n, (i + 1) * rows // n)) for i in range(n)]


def _losses_exps_sums(streams: list, logits_of, targets) -> list:
    """[per-row negative log-likelihood] + each part's exp(logits - row max) + each part's row sums of those,
    the rows split into parts by `_row_parts`, each part's logits `logits_of(rows)` computed on its stream. The
    exps are kept for the backward pass, which then needs no exp of its own: exp is most of this kernel's time,
    and the kept array is the size of the logits the backward pass would otherwise read again."""
    losses, exps, sums = [], [], []
    for stream, rows in _row_parts(streams, targets.shape[0]):
        with mx.stream(stream):
            x = logits_of(rows)
            e, top, total = shifted_exps(x)
            picked = mx.take_along_axis(x, targets[rows][:, None], axis=-1)[:, 0]
            losses.append(mx.log(total) + top[:, 0] - picked)
            exps.append(e)
            sums.append(total)
    return [mx.concatenate(losses)] + exps + sums


def cross_entropy(streams: list):
    """f(logits (rows, vocabulary) float32, targets (rows,)) -> per-row negative log-likelihood."""

    @mx.custom_function
    def losses_and_exps(logits, targets):
        return _losses_exps_sums(streams, lambda rows: logits[rows], targets)

    @losses_and_exps.vjp
    def losses_and_exps_vjp(primals, cotangents, outputs):
        # softmax * g minus g at the target, the softmax being the kept exps over their row sums.
        logits, targets = primals
        parts = _row_parts(streams, logits.shape[0])
        exps, sums = outputs[1:1 + len(parts)], outputs[1 + len(parts):]
        grads = []
        for (stream, rows), e, total in zip(parts, exps, sums):
            with mx.stream(stream):
                g, t = cotangents[0][rows][:, None], targets[rows][:, None]
                d = e * (g / total[:, None])
                grads.append(mx.put_along_axis(d, t, mx.take_along_axis(d, t, axis=-1) - g, axis=-1))
        return mx.concatenate(grads), mx.zeros_like(targets)

    return lambda logits, targets: losses_and_exps(logits, targets)[0]


def linear_cross_entropy(streams: list):
    """f(hidden (rows, dim) float32, head (vocabulary, dim), targets (rows,)) -> per-row negative
    log-likelihood of the logits hidden @ head.T. Each stream computes its rows' logits and turns them into
    exp(logit - row max), kept for the backward pass. There the logits' gradient, g * (softmax -
    onehot(target)), is never formed: the softmax's row scale g / sum moves onto the small side of each
    matmul and the one-hot part is a row of the head (or of hidden) per target, so the kept exps are read by
    two matmuls and nothing else."""

    @mx.custom_function
    def losses_and_exps(hidden, head, targets):
        return _losses_exps_sums(streams, lambda rows: hidden[rows] @ head.T, targets)

    @losses_and_exps.vjp
    def losses_and_exps_vjp(primals, cotangents, outputs):
        hidden, head, targets = primals
        parts = _row_parts(streams, hidden.shape[0])
        exps, sums = outputs[1:1 + len(parts)], outputs[1 + len(parts):]
        g = cotangents[0]
        grad_hidden, grad_head = [], []
        for (stream, rows), e, total in zip(parts, exps, sums):
            with mx.stream(stream):
                scale = (g[rows] / total)[:, None]
                grad_hidden.append((e @ head) * scale - g[rows][:, None] * head[targets[rows]])
                grad_head.append(e.T @ (hidden[rows] * scale))
        grad_head = sum(grad_head[1:], grad_head[0]).at[targets].add(-g[:, None] * hidden)
        return mx.concatenate(grad_hidden), grad_head, mx.zeros_like(targets)

    return lambda hidden, head, targets: losses_and_exps(hidden, head, targets)[0]


# Below this many queries, a batch of sequences is split into parts by sequence rather than by blocks of
# queries: fewer, larger operations. Measured on 2 cores, forward and backward compiled, 12 x 4 heads x 32
# dims at 64 queries: 1.9 against 2.6 ms; 8 x 6 heads x 32 dims at 128: the same either way.
_BY_SEQUENCE_BELOW = 128


def _attention_parts(streams: list, batch: int, length: int) -> tuple[bool, list]:
    """(by sequence, [(stream, sequences, first query, end of queries)]). Short sequences are split by
    sequence, each part attending causally over its whole length. Longer ones by blocks of queries, two
    blocks per stream: block i and block 2n - 1 - i, whose keys (0 to end) add up to the same count for every
    stream, each block computing only the keys it sees."""
    n = len(streams)
    if length < _BY_SEQUENCE_BELOW and batch >= n:
        return True, [(stream, rows, 0, length) for stream, rows in _row_parts(streams, batch)]
    bounds = [j * length // (2 * n) for j in range(2 * n + 1)]
    return False, [(streams[i], slice(None), bounds[j], bounds[j + 1]) for i in range(n) for j in (i, 2 * n - 1 - i)]


def _join(pieces: list, by_sequence: bool):
    """The parts' pieces of a (batch, kv_heads, group, time, head_dim) array put together in order: along
    the batch, or along the time of their first query (each piece paired with its `_attention_parts` entry)."""
    ordered = [x for _, x in sorted(pieces, key=lambda part_x: (part_x[0][1].start or 0, part_x[0][2]))]
    return mx.concatenate(ordered, axis=0 if by_sequence else 3)


def causal_attention(streams: list, scale: float):
    """f(q (batch, heads, time, head_dim), k, v (batch, kv_heads, time, head_dim)) -> (batch, heads, time,
    head_dim), each query attending to the keys at and before its position, computed in float32, in parts
    (`_attention_parts`). Grouped queries share their key/value head as the rows of one matrix against it,
    never by copying it. The unnormalized exps and their row sums are kept for the backward pass (at most
    batch x heads x time^2 floats: a CPU's memory, not a GPU's)."""

    def grouped(q, k, v):
        b, h, t, d = q.shape
        kv = k.shape[1]
        return q.astype(mx.float32).reshape(b, kv, h // kv, t, d), k.astype(mx.float32), v.astype(mx.float32)

    def flat(x):  # (sequences, kv_heads, group, queries, ...) -> (sequences, kv_heads, group x queries, ...)
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:])

    def unflat(x, group):  # `flat`'s inverse for a (sequences, kv_heads, group x queries, head_dim) array
        return x.reshape(x.shape[0], x.shape[1], group, x.shape[2] // group, x.shape[3])

    @mx.custom_function
    def attention_and_exps(q, k, v):
        qg, k, v = grouped(q, k, v)
        group = qg.shape[2]
        by_sequence, parts = _attention_parts(streams, q.shape[0], q.shape[2])
        outs, exps, sums = [], [], []
        for part in parts:
            stream, rows, start, end = part
            with mx.stream(stream):
                # A group's queries as rows of one matrix against their shared keys: one matmul per key/value
                # head, not one per query head, three times larger with `tiny`'s groups of three.
                masked = mx.arange(end)[None, :] > mx.tile(mx.arange(start, end), group)[:, None]
                scores = (flat(qg[rows, :, :, start:end]) * scale) @ k[rows, :, :end].swapaxes(-1, -2)
                e, _, total = shifted_exps(mx.where(masked, -mx.inf, scores))
                total = total[..., None]
                outs.append((part, unflat((e @ v[rows, :, :end]) / total, group)))
                exps.append(e)
                sums.append(total)
        return [_join(outs, by_sequence).reshape(q.shape).astype(q.dtype)] + exps + sums

    @attention_and_exps.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k0, v0 = primals
        qg, k, v = grouped(q, k0, v0)
        group, t = qg.shape[2], q.shape[2]
        by_sequence, parts = _attention_parts(streams, q.shape[0], t)
        dout = cotangents[0].astype(mx.float32).reshape(qg.shape)
        out = outputs[0].astype(mx.float32).reshape(qg.shape)
        dqs, dks, dvs = [], [], []
        exps, sums = outputs[1:1 + len(parts)], outputs[1 + len(parts):]
        for part, e, total in zip(parts, exps, sums):
            stream, rows, start, end = part
            with mx.stream(stream):
                do = flat(dout[rows, :, :, start:end])
                dp = do @ v[rows, :, :end].swapaxes(-1, -2)
                # Softmax's backward: p * (dp - sum(p * dp)), where sum(p * dp) is the row's do . out, and
                # p = e / total, whose division lands on each row's (few) values rather than on the scores.
                delta = (do * flat(out[rows, :, :, start:end])).sum(-1, keepdims=True)
                ds = e * ((dp - delta) * (mx.reciprocal(total) * scale))
                dqs.append((part, unflat(ds @ k[rows, :, :end], group)))
                pad = [(0, 0), (0, 0), (0, t - end), (0, 0)]
                # A key's gradient over all the queries of its group at once: the product sums over them.
                dks.append((part, mx.pad(ds.swapaxes(-1, -2) @ flat(qg[rows, :, :, start:end]), pad)))
                dvs.append((part, mx.pad(e.swapaxes(-1, -2) @ (do / total), pad)))
        dq = _join(dqs, by_sequence).reshape(q.shape)
        if by_sequence:  # (batch, kv_heads, time, head_dim): the batch is axis 0 here as well
            dk, dv = (mx.concatenate([x for _, x in pieces]) for pieces in (dks, dvs))
        else:  # every block's keys are a prefix of the sequence: their gradients add up
            dk, dv = (sum((x for _, x in pieces[1:]), pieces[0][1]) for pieces in (dks, dvs))
        return dq.astype(q.dtype), dk.astype(k0.dtype), dv.astype(v0.dtype)

    return lambda q, k, v: attention_and_exps(q, k, v)[0]
