"""The decoder-only transformer, written once against a backend's small set of operations.

Pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases, optional QK-norm (MobileLLM-R1), tied
input/output embeddings (configurable) and immediate block-wise weight sharing (MobileLLM-LS: each block is
applied `block_repeats` times in a row). Parameters are a flat dict of arrays whose names follow the Hugging
Face Llama layout without the `model.` prefix, so checkpoints map one to one onto exported ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tinylm import config
from tinylm.errors import UserError
from tinylm.presets import PRESETS


def _check_sizes(cfg) -> None:
    config.at_least(cfg, 1, "n_layers dim n_heads n_kv_heads ffn_dim vocab_size max_seq_len block_repeats")
    config.positive(cfg, "rope_theta norm_eps init_std")


@dataclass
class ModelConfig:
    """The `[model]` section: a preset and optional overrides of its shape."""

    preset: str = "tiny"
    """Name of a preset in `tinylm.presets.PRESETS` (e.g. mobilellm-125m, mobilellm-r1-140m, tiny, micro)."""
    n_layers: Optional[int] = None
    """Number of distinct transformer blocks."""
    dim: Optional[int] = None
    """Residual stream width."""
    n_heads: Optional[int] = None
    """Query heads; head dim is dim / n_heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); must divide n_heads."""
    ffn_dim: Optional[int] = None
    """Hidden width of the SwiGLU feed-forward."""
    vocab_size: Optional[int] = None
    """Vocabulary size; unset means the preset's, or the tokenizer's when training on prepared data."""
    rope_theta: Optional[float] = None
    """RoPE base frequency."""
    max_seq_len: Optional[int] = None
    """Longest context the model is meant for (checked against train.seq_len)."""
    tie_embeddings: Optional[bool] = None
    """Share the token embedding with the output head."""
    qk_norm: Optional[bool] = None
    """RMSNorm on queries and keys per head before RoPE (MobileLLM-R1)."""
    block_repeats: Optional[int] = None
    """Apply each block this many times in a row with the same weights (MobileLLM-LS uses 2)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization; output projections get it / sqrt(2 * depth)."""
    causal: Optional[bool] = None
    """Causal (decoder) attention; false makes a bidirectional encoder (BERT-style, for the `mlm` objective)."""
    num_labels: Optional[int] = None
    """Outputs of the classification head (0: none); a `classify` stage sets it from its task's labels."""

    def __post_init__(self):
        _check_sizes(self)


@dataclass(frozen=True)
class ModelShape:
    """A fully resolved architecture: what `forward` and `init_params` take."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qk_norm: bool = False
    block_repeats: int = 1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    causal: bool = True
    num_labels: int = 0
    """Classes of the classification head (`classifier.weight`); 0: no head."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def depth(self) -> int:
        """Blocks applied per forward pass, counting repeats."""
        return self.n_layers * self.block_repeats

    def __post_init__(self):
        # Checked here too: shapes also come from checkpoints and Hugging Face configs, not only from recipes.
        _check_sizes(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Compute:
    """How a loss is computed rather than what: the objectives hand it on to `per_token` untouched."""

    dtype: str = "float32"
    """Compute dtype of the forward and backward passes (parameters stay float32 outside the loss)."""
    loss_chunk: int = 0
    """Tokens per chunk of the output head and its loss, each chunk recomputed in the backward pass, so that
    no (tokens, vocabulary) logits array exists whole; 0: all tokens at once."""
    checkpoint_blocks: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""

    def __post_init__(self):
        config.at_least(self, 0, "loss_chunk")


def check_fits(shape: ModelShape, seq_len: int, tokenizer_vocab: int | None = None) -> None:
    """The model takes sequences of `seq_len` tokens (`train.seq_len`) and every id of the tokenizer."""
    if tokenizer_vocab is not None and shape.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size {shape.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")
    if seq_len > shape.max_seq_len:
        raise UserError(f"train.seq_len {seq_len} exceeds the model's max_seq_len {shape.max_seq_len}")


def resolve(cfg: ModelConfig, vocab_size: int | None = None) -> ModelShape:
    """Preset + overrides -> shape. `vocab_size` (from a tokenizer) applies when the recipe sets none."""
    if cfg.preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset {cfg.preset!r} (known: {', '.join(sorted(PRESETS))})")
    fields = dict(PRESETS[cfg.preset])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        if f.name != "preset" and value is not None:
            fields[f.name] = value
    try:
        shape = ModelShape(**fields)
    except config.SettingError as e:
        raise UserError(f"model: {e}") from None
    if shape.dim % shape.n_heads:
        raise UserError(f"model: dim {shape.dim} is not a multiple of n_heads {shape.n_heads}")
    if shape.n_heads % shape.n_kv_heads:
        raise UserError(f"model: n_heads {shape.n_heads} is not a multiple of n_kv_heads {shape.n_kv_heads}")
    if shape.head_dim % 2:
        raise UserError(f"model: head dim {shape.head_dim} must be even for RoPE")
    return shape


def param_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in a fixed order (the order initialization draws in)."""
    d, hd = shape.dim, shape.head_dim
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (shape.vocab_size, d)}
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "self_attn.q_proj.weight"] = (shape.n_heads * hd, d)
        out[p + "self_attn.k_proj.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "self_attn.v_proj.weight"] = (shape.n_kv_heads * hd, d)
        out[p + "self_attn.o_proj.weight"] = (d, shape.n_heads * hd)
        if shape.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        out[p + "mlp.gate_proj.weight"] = (shape.ffn_dim, d)
        out[p + "mlp.up_proj.weight"] = (shape.ffn_dim, d)
        out[p + "mlp.down_proj.weight"] = (d, shape.ffn_dim)
    out["norm.weight"] = (d,)
    if not shape.tie_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, d)
    if shape.num_labels:  # drawn last, so a model with a head starts from the same body as one without
        out["classifier.weight"] = (shape.num_labels, d)
    return out


def count_params(shape: ModelShape, embeddings: bool = True) -> int:
    """Parameters, tied embeddings counted once; `embeddings=False` leaves out the input embedding table."""
    total = sum(int(np.prod(s)) for s in param_shapes(shape).values())
    return total if embeddings else total - shape.vocab_size * shape.dim


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params applied, output head included) + attention.

    Repeated blocks are counted once per application, since they are computed again.
    """
    block = count_params(dataclasses.replace(shape, n_layers=1, tie_embeddings=True), embeddings=False) - shape.dim
    matmul_params = block * shape.depth + shape.vocab_size * shape.dim
    attention = 12 * shape.depth * shape.n_heads * shape.head_dim * seq_len
    return 6.0 * matmul_params + attention


def init_params(shape: ModelShape, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 initialization in numpy, so every backend starts from the same weights."""
    rng = np.random.default_rng(seed)
    out_std = shape.init_std / np.sqrt(2 * shape.depth)
    params = {}
    for name, s in param_shapes(shape).items():
        if len(s) == 1:
            params[name] = np.ones(s, np.float32)
        else:
            std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else shape.init_std
            params[name] = (rng.standard_normal(s, dtype=np.float32) * std).astype(np.float32)
    return params


def is_matrix(name: str) -> bool:
    """Hidden 2-D weights (what Muon and weight decay act on); embeddings and the head are not hidden."""
    return (".self_attn." in name and name.endswith("proj.weight")) or ".mlp." in name


def _attention(ops, p, prefix, x, shape: ModelShape, offset, mask, cache_entry, positions):
    b, t, _ = x.shape
    hd = shape.head_dim
    if prefix + "qkv_proj.weight" in p:  # stacked for decoding (`generate.stack_projections`): one matmul for three
        qkv = ops.linear(x, p[prefix + "qkv_proj.weight"])
        nq, nkv = shape.n_heads * hd, shape.n_kv_heads * hd
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
    else:
        q, k, v = (ops.linear(x, p[prefix + name + "_proj.weight"]) for name in ("q", "k", "v"))
    q = q.reshape(b, t, shape.n_heads, hd)
    k = k.reshape(b, t, shape.n_kv_heads, hd)
    v = v.reshape(b, t, shape.n_kv_heads, hd)
    if shape.qk_norm:
        q = ops.rms_norm(q, p[prefix + "q_norm.weight"], shape.norm_eps)
        k = ops.rms_norm(k, p[prefix + "k_norm.weight"], shape.norm_eps)
    q, k, v = (ops.transpose(a, (0, 2, 1, 3)) for a in (q, k, v))
    q = ops.rope(q, shape.rope_theta, offset, positions)
    k = ops.rope(k, shape.rope_theta, offset, positions)
    if isinstance(cache_entry, tuple):
        k = ops.concat([cache_entry[0], k], axis=2)
        v = ops.concat([cache_entry[1], v], axis=2)
    elif cache_entry is not None:  # a `KVCache` slot: written in place
        k, v = cache_entry(k, v)
    y = ops.attention(q, k, v, 1.0 / np.sqrt(hd), mask)
    y = ops.transpose(y, (0, 2, 1, 3)).reshape(b, t, shape.n_heads * hd)
    return ops.linear(y, p[prefix + "o_proj.weight"]), (k, v)


def _mlp(ops, p, prefix, x):
    if prefix + "gate_up_proj.weight" in p:  # stacked for decoding, as q, k and v are
        both = ops.linear(x, p[prefix + "gate_up_proj.weight"])
        half = both.shape[-1] // 2
        return ops.linear(ops.silu(both[..., :half]) * both[..., half:], p[prefix + "down_proj.weight"])
    gate = ops.silu(ops.linear(x, p[prefix + "gate_proj.weight"]))
    return ops.linear(gate * ops.linear(x, p[prefix + "up_proj.weight"]), p[prefix + "down_proj.weight"])


def _block(ops, p, prefix, x, shape: ModelShape, offset, mask, cache_entry, positions):
    h = ops.rms_norm(x, p[prefix + "input_layernorm.weight"], shape.norm_eps)
    attn, kv = _attention(ops, p, prefix + "self_attn.", h, shape, offset, mask, cache_entry, positions)
    x = x + attn
    h = ops.rms_norm(x, p[prefix + "post_attention_layernorm.weight"], shape.norm_eps)
    return x + _mlp(ops, p, prefix + "mlp.", h), kv


def _block_arrays(params, prefix: str):
    """(arrays, read): the arrays of one block's parameters, as a checkpointed block takes them, and how the
    block reads its parameters from them. Parameters gathered from other ranks when read (`GatheredParams`)
    hand over this rank's own arrays, so that the block gathers them inside what it recomputes."""
    if hasattr(params, "local_arrays"):
        return params.local_arrays(prefix), params.over
    return {k: v for k, v in params.items() if k.startswith(prefix)}, None


class KVCache:
    """Every applied block's keys and values in buffers with room to grow, (batch, kv heads, capacity, head
    dim) each: a decoding step writes its keys and values in place, where concatenating would copy the whole
    cache into a longer array at every token (at batch 64 on the 135M shape, 0.6 GB a token by the end).
    Made from a prefill's list of (keys, values); the room doubles when a step finds none left."""

    def __init__(self, ops, entries: list, room: int = 0):
        self.ops, self.length = ops, entries[0][0].shape[2]
        capacity = self.length + max(room, self.length, 1)
        self.buffers = [[ops.kv_buffer(k, capacity), ops.kv_buffer(v, capacity)] for k, v in entries]

    def slot(self, i: int):
        """What block `i` calls with its new (keys, values): it gets back every key and value so far."""
        return lambda k, v: self._extend(i, k, v)

    def _extend(self, i: int, k, v):
        ops, pair, end = self.ops, self.buffers[i], self.length + k.shape[2]
        if end > pair[0].shape[2]:
            grown = max(2 * pair[0].shape[2], end)
            pair[:] = [ops.kv_buffer(b[:, :, :self.length], grown) for b in pair]
        pair[:] = [ops.kv_write(b, x, self.length) for b, x in zip(pair, (k, v))]
        return pair[0][:, :, :end], pair[1][:, :, :end]


def hidden_states(ops, params, tokens, shape: ModelShape, cache=None, mask="causal", positions=None,
                  checkpoint=False):
    """The final normed hidden states for `tokens` (batch, time): what the output head reads.

    With `cache` (a list with one (keys, values) pair per applied block, or an empty list to start one) the
    tokens continue the cached sequence and the updated cache is returned as well: `(hidden, cache)`. A
    `KVCache` is continued in place (and returned).
    `mask` is "causal", None, or a backend boolean array broadcastable to (batch, heads, time, cached + time).
    `positions` (a backend integer array (batch, time)) gives each token its RoPE position; unset, positions
    count from the cache's length. Packed rows restart them at 0 for every sequence they hold. `checkpoint`
    recomputes each block in the backward pass (it has no effect with a cache).
    """
    if mask == "causal" and not shape.causal:
        mask = None  # an encoder: every position sees every other
    in_place = isinstance(cache, KVCache)
    offset = cache.length if in_place else 0 if not cache else cache[0][0].shape[2]
    new_cache = [] if cache is not None and not in_place else None
    x = ops.embed(params["embed_tokens.weight"], tokens)
    applied = 0
    for i in range(shape.n_layers):
        prefix = f"layers.{i}."
        for _ in range(shape.block_repeats):
            entry = cache.slot(applied) if in_place else cache[applied] if cache else None
            if checkpoint and cache is None:
                # The block's weights go in as arguments: MLX's checkpoint differentiates nothing it closes over.
                arrays, read = _block_arrays(params, prefix)
                block = ops.checkpoint(lambda x, p, prefix=prefix, read=read: _block(
                    ops, read(p) if read else p, prefix, x, shape, 0, mask, None, positions)[0])
                x = block(x, arrays)
            else:
                x, kv = _block(ops, params, prefix, x, shape, offset, mask, entry, positions)
            if new_cache is not None:
                new_cache.append(kv)
            applied += 1
    x = ops.rms_norm(x, params["norm.weight"], shape.norm_eps)
    if in_place:
        cache.length += tokens.shape[1]
        return x, cache
    return x if cache is None else (x, new_cache)


def output_head(params, shape: ModelShape):
    """The (vocab, dim) matrix that turns hidden states into logits."""
    return params["embed_tokens.weight" if shape.tie_embeddings else "lm_head.weight"]


def forward(ops, params, tokens, shape: ModelShape, cache=None, mask="causal", positions=None):
    """Logits for `tokens` (batch, time); arguments as in `hidden_states`."""
    out = hidden_states(ops, params, tokens, shape, cache, mask, positions)
    if cache is None:
        return ops.linear(out, output_head(params, shape))
    return ops.linear(out[0], output_head(params, shape)), out[1]


def cast_params(ops, params, compute_dtype: str):
    """Parameters in the compute dtype (they stay float32 outside the loss). Parameters gathered from other
    ranks arrive in it already, tensor by tensor as they are read, and pass through untouched."""
    if compute_dtype == "float32" or getattr(params, "dtype", None) == compute_dtype:
        return params
    return {k: ops.cast(v, compute_dtype) for k, v in params.items()}


def chunked_head(ops, hidden, head, chunk: int, fn, arrays=()):
    """`fn(hidden, head, *arrays)` -> (batch, time) for `hidden` (batch, time, dim), each of `arrays` (batch,
    time, ...) read per token beside it, `chunk` tokens at a time (0: all at once). `fn` computes from a
    token's hidden state and the head (`on_logits` makes one of a function of logits) and must work per token
    (a token's result depends on its own rows alone) and on hidden states of any rank."""
    b, t = hidden.shape[0], hidden.shape[1]
    if not chunk or chunk >= b * t:  # one chunk is the whole batch: nothing to gain from recomputing it
        return fn(hidden, head, *arrays)
    hidden = hidden.reshape(b * t, hidden.shape[-1])
    arrays = [a.reshape((b * t,) + tuple(a.shape[2:])) for a in arrays]
    out = []
    for s in range(0, b * t, chunk):
        rows = [a[s:s + chunk] for a in arrays]
        # Kept for the backward pass: the chunk's hidden states and the head, not its (chunk, vocab) logits. The
        # head passes through each chunk into the next, which orders the chunks (MLX would run them side by
        # side, every chunk's logits at once) and adds up its gradient chunk by chunk, in reverse.
        part = ops.checkpoint(lambda h, w, rows=rows: (fn(h, w, *rows), w))
        losses, head = part(hidden[s:s + chunk], head)
        out.append(losses)
    return ops.concat(out, axis=0).reshape(b, t)


def on_logits(ops, fn):
    """`fn(logits, *arrays)` as a function of (hidden states, head, *arrays), for `chunked_head`."""
    return lambda hidden, head, *arrays: fn(ops.linear(hidden, head), *arrays)


def per_token(ops, params, inputs, shape: ModelShape, compute: Compute, fn, arrays=(), mask="causal",
              positions=None):
    """`chunked_head` of `inputs`' (batch, time) final hidden states, computed as `compute` says; `mask` and
    `positions` as in `hidden_states`."""
    params = cast_params(ops, params, compute.dtype)
    hidden = hidden_states(ops, params, inputs, shape, mask=mask, positions=positions,
                           checkpoint=compute.checkpoint_blocks)
    return chunked_head(ops, hidden, output_head(params, shape), compute.loss_chunk, fn, arrays)


def class_logits(ops, params, batch, shape: ModelShape, compute: Compute = Compute()):
    """(batch, num_labels) logits of the classification head on each row's mean final hidden state over its
    tokens. Mean pooling needs no special token and reads a decoder's rows as well as an encoder's. `batch`
    holds `inputs` (batch, time), `mask` (attention that skips padding) and `pool` (batch, time) weights,
    1 / length on a row's tokens, 0 on padding (see `objectives.classify_batch`)."""
    params = cast_params(ops, params, compute.dtype)
    hidden = hidden_states(ops, params, batch["inputs"], shape, mask=batch["mask"],
                           checkpoint=compute.checkpoint_blocks)
    pooled = (hidden * ops.cast(batch["pool"], compute.dtype)[:, :, None]).sum(axis=1)
    return ops.linear(pooled, params["classifier.weight"])


def token_losses(ops, params, inputs, targets, shape: ModelShape, compute: Compute = Compute(), mask="causal",
                 positions=None):
    """Next-token cross-entropy (nats) of every position: `targets[b, t]` given `inputs[b, :t + 1]`, computed
    as `compute` says. `mask` and `positions` as in `hidden_states` (packed rows pass both)."""
    return per_token(ops, params, inputs, shape, compute, ops.linear_cross_entropy, (targets,), mask, positions)
