"""Text generation with a KV cache on either backend: greedy or sampled decoding of batches of prompts.

Prompts of different lengths are left-padded into one batch. Padded positions are masked out of attention;
since RoPE only sees differences of positions, shifting a row's real tokens to the right by its padding leaves
its attention scores unchanged, so a padded row decodes as it would alone and the model needs no per-row
position offsets. Sampling happens in numpy on the last position's log-probabilities, so the same seed draws
the same tokens on every backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tinylm import model
from tinylm.errors import UserError

from tinylm.data.tokenizer import ASSISTANT, BOS, END, EOS, PAD, load_tokenizer, render_chat

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)
"""tinylm's chat layout as a Jinja template, for tokenizer_config.json of exported models."""


STACKED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
           "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
"""Decoding's stacked projections and the weights each stacks, row after row, per layer."""


def stack_projections(ops, params: dict, shape: model.ModelShape) -> dict:
    """`params` with each layer's q, k and v projections stacked into one matrix and its gate and up projections
    into another, for inference: a decoding step multiplies a few rows by every weight, where fewer, larger
    matmuls run closer to memory bandwidth (bf16 on 2 cores at 8 rows: q, k, v 65 us apart, 37 stacked). Each
    output is the same dot product as before. Training keeps the separate weights its optimizer updates."""
    out = dict(params)
    for i in range(shape.n_layers):
        prefix = f"layers.{i}."
        for stacked, parts in STACKED.items():
            if prefix + parts[0] in out:
                out[prefix + stacked] = ops.concat([out.pop(prefix + name) for name in parts], axis=0)
    return out


@dataclass
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    stop_strings: Sequence[str] = ()
    seed: int = 0


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    """"stop" (a stop token or string) or "length"."""
    stop_id: int | None = None
    """The stop token that ended it, if one did (it is not in `tokens`)."""
    logprobs: list[np.ndarray] = field(default_factory=list, repr=False)
    """The distribution each generated token was drawn from (only when asked for)."""
    sampled_logprobs: list[float] = field(default_factory=list, repr=False)
    """Log-probability of each drawn token, the stop token last if one ended it, under the distribution the
    model reported before temperature, top-k and top-p (for one `Model`, the float32 log-softmax of its logits):
    what a policy gradient needs as the sampling policy's log-probability, with no second forward pass."""


class Model:
    """One set of weights on a backend, scored and decoded through numpy arrays of token ids."""

    def __init__(self, backend, shape: model.ModelShape, params: dict, dtype: str = "float32"):
        """`dtype`: what the weights compute in (cast once here); log-probabilities are float32 either way."""
        self.backend = backend
        self.shape = shape
        if params and isinstance(next(iter(params.values())), np.ndarray):
            params = backend.from_numpy(params)
        self.dtype = dtype
        self.params = stack_projections(backend.ops, model.cast_params(backend.ops, params, dtype), shape)
        self.vocab_size = shape.vocab_size
        self.max_len = shape.max_seq_len

    def _run(self, tokens: np.ndarray, cache, mask):
        return model.forward(self.backend.ops, self.params, self.backend.tokens(tokens), self.shape, cache, mask)

    def _fetch(self, logits, cache):
        ops = self.backend.ops
        last = logits[:, -1, :]
        lp = ops.log_softmax(last if self.dtype == "float32" else ops.cast(last, "float32"))
        self.backend.materialize((lp, cache.buffers if isinstance(cache, model.KVCache) else cache))
        return self.backend.to_numpy({"x": lp})["x"].astype(np.float64)

    def token_logprobs(self, rows: np.ndarray) -> np.ndarray:
        """rows (batch, time + 1) -> log-probability of each next token, (batch, time)."""
        ops = self.backend.ops
        logits = self._run(rows[:, :-1], None, "causal")
        nll = ops.cross_entropy(logits, self.backend.tokens(rows[:, 1:]))
        return -self.backend.to_numpy({"x": nll})["x"].astype(np.float64)

    def class_logprobs(self, rows: list[list[int]], pad: int, batch_rows: int = 64) -> np.ndarray:
        """Token-id rows (any lengths) -> log-probability of each class of the head, (rows, num_labels)."""
        from tinylm.train.objectives import classify_batch

        if not self.shape.num_labels:
            raise UserError("the model has no classification head: fine-tune it with a classify stage first")
        ops, out = self.backend.ops, np.zeros((len(rows), self.shape.num_labels))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # rows of like length pad little
        for start in range(0, len(order), batch_rows):
            chunk = order[start:start + batch_rows]
            batch = classify_batch([rows[i] for i in chunk], pad, self.shape.causal)
            arrays = {"inputs": self.backend.tokens(batch["inputs"]),
                      **self.backend.from_numpy({k: batch[k] for k in ("mask", "pool")})}
            logits = model.class_logits(ops, self.params, arrays, self.shape)
            lp = ops.log_softmax(logits if self.dtype == "float32" else ops.cast(logits, "float32"))
            out[chunk] = self.backend.to_numpy({"x": lp})["x"]
        return out

    def start(self, tokens: np.ndarray, keep: np.ndarray | None):
        """Prefill a (batch, time) prompt; `keep` is False at padding. Returns (log-probs (batch, vocab), state)."""
        logits, cache = self._run(tokens, [], self._mask(keep, tokens.shape[1]))
        return self._fetch(logits, cache), cache

    def step(self, state, tokens: np.ndarray, keep: np.ndarray | None):
        """Feed one token per row; `keep` covers the whole sequence so far, this token included."""
        if not isinstance(state, model.KVCache):  # a prefill's keys and values (or a group's repeated ones)
            state = model.KVCache(self.backend.ops, state)
        logits, cache = self._run(tokens[:, None], state, self._mask(keep, 1))
        return self._fetch(logits, cache), cache

    def _mask(self, keep: np.ndarray | None, t: int):
        if keep is None:
            return "causal" if t > 1 else None
        s = keep.shape[1]
        allowed = np.tril(np.ones((t, s), dtype=bool), k=s - t)[None] & keep[:, None, :]
        # Every query attends at least to itself, so rows of pure padding stay finite instead of NaN.
        allowed |= np.eye(t, s, k=s - t, dtype=bool)[None]
        return self.backend.from_numpy({"m": allowed[:, None]})["m"]


def special_ids(tok, meta: dict | None = None) -> dict[str, int | None]:
    """bos/eos/pad/end ids, by the names a checkpoint records (imported ones) or tinylm's own."""
    names = dict(bos=BOS, eos=EOS, pad=PAD, end=END)
    names.update((meta or {}).get("special_tokens", {}))
    return {k: (tok.token_to_id(v) if v else None) for k, v in names.items()}


def adds_bos(meta: dict | None) -> bool:
    return bool((meta or {}).get("add_bos", True))


def encode_prompt(tok, text: str, meta: dict | None = None) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = special_ids(tok, meta)["bos"]
    return ([bos] if bos is not None and adds_bos(meta) else []) + ids


def chat_prompt(messages: list[dict], meta: dict | None = None, add_generation_prompt: bool = True) -> str:
    """The conversation opened for the assistant's turn: `<|user|>...<|end|><|assistant|>` for tinylm's own
    models, the model's Jinja chat template for imported ones (without the opening when not
    `add_generation_prompt`: the conversation as SFT trains on it)."""
    template = ((meta or {}).get("hf_tokenizer_config") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template and template != CHAT_TEMPLATE:
        return _render_template(template, messages, meta, add_generation_prompt)
    try:
        return render_chat(messages) + (ASSISTANT if add_generation_prompt else "")
    except ValueError as e:
        raise UserError(str(e)) from None


def _render_template(template: str, messages: list[dict], meta: dict, add_generation_prompt: bool) -> str:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("this model's chat template needs jinja2: pip install jinja2") from None

    def fail(message):
        raise UserError(f"chat template: {message}")

    names = meta.get("special_tokens", {})
    # The template sees the tokenizer's own names, BOS included where tinylm records none (see save_imported).
    original = meta.get("hf_tokenizer_config") or {}

    def name(key: str) -> str:
        value = original.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        return value or names.get(key) or ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    try:
        text = env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=name("bos"), eos_token=name("eos"))
    except TemplateError as e:
        raise UserError(f"the model's chat template fails to render: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"the model's chat template fails to render: {type(e).__name__}: {e}") from None
    # encode_prompt adds BOS itself for models that expect one; the template must not double it.
    if adds_bos(meta) and names.get("bos") and text.startswith(names["bos"]):
        text = text[len(names["bos"]):]
    return text


def check_chat_template(meta: dict) -> None:
    """A `UserError` now, rather than at the first chat, when the model's template cannot render a turn."""
    chat_prompt([{"role": "user", "content": "What is 2 + 3?"}], meta)


def sample(logprobs: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of (batch, vocab) log-probabilities."""
    if cfg.temperature <= 0:
        return logprobs.argmax(-1)
    x = logprobs / cfg.temperature
    if 0 < cfg.top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        # A token stays if the mass before it is still short of top_p, so the top token always stays.
        drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def _find_stop(text: str, stops: Sequence[str]) -> int:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1


def _streamable(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be shown: not a trailing piece that may still grow into a stop string, nor an
    incomplete UTF-8 sequence (decoded as U+FFFD until its last byte arrives)."""
    if text.endswith("\ufffd"):
        return len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold


class _Detokenizer:
    """A completion's text as the whole of its tokens decode to, without decoding them all at every token: the
    new tokens are decoded after the few before them (whose text is then cut off, so a tokenizer that drops
    a leading space at the start of a text drops it there too), and once their piece ends in a whole character
    it is kept and later tokens are decoded after them."""

    def __init__(self, tok):
        self.tok, self.text, self.start, self.read = tok, "", 0, 0

    def decode(self, tokens: list[int]) -> str:
        """The text of `tokens`: the completion so far, longer than at the last call."""
        before = self.tok.decode(tokens[self.start:self.read], skip_special_tokens=False)
        piece = self.tok.decode(tokens[self.start:], skip_special_tokens=False)[len(before):]
        if not piece or piece.endswith("\ufffd"):  # an incomplete UTF-8 sequence: its bytes may still come
            return self.text + piece
        self.text += piece
        self.start, self.read = self.read, len(tokens)
        return self.text


def generate_ids(
    lm,
    tok,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    on_text: Callable[[int, str], None] | None = None,
    keep_logprobs: bool = False,
) -> list[Completion]:
    """Decode every prompt (lists of ids) in one batch. `lm` is a `Model` or a committee of them."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generation needs at least one non-empty prompt")
    room = max(lm.max_len - cfg.max_tokens, 1)
    prompts = [list(p[-room:]) for p in prompts]
    b, longest = len(prompts), max(len(p) for p in prompts)
    tokens = np.full((b, longest), pad_id, dtype=np.int64)
    keep = np.zeros((b, longest), dtype=bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = p
        keep[i, longest - len(p):] = True
    ragged = not keep.all()
    rng = np.random.default_rng(cfg.seed)
    stop_set = {int(t) for t in stop_ids if t is not None}
    out = [Completion("", [], "length") for _ in range(b)]
    texts = [_Detokenizer(tok) for _ in range(b)]
    done = np.zeros(b, dtype=bool)
    shown = [0] * b

    logprobs, state = lm.start(tokens, keep if ragged else None)
    for n in range(cfg.max_tokens):
        nxt = sample(logprobs, cfg, rng)
        chosen = logprobs[np.arange(b), nxt].tolist()
        for i in np.flatnonzero(~done):
            t = int(nxt[i])
            out[i].sampled_logprobs.append(chosen[i])
            if t in stop_set:
                done[i], out[i].finish_reason, out[i].stop_id = True, "stop", t
                continue
            c = out[i]
            c.tokens.append(t)
            if keep_logprobs:
                c.logprobs.append(logprobs[i].copy())
            c.text = texts[i].decode(c.tokens)
            cut = _find_stop(c.text, cfg.stop_strings)
            if cut >= 0:
                c.text, done[i], c.finish_reason = c.text[:cut], True, "stop"
            upto = len(c.text) if done[i] else _streamable(c.text, cfg.stop_strings)
            if on_text is not None and upto > shown[i]:
                on_text(i, c.text[shown[i]:upto])
                shown[i] = upto
        if done.all() or n == cfg.max_tokens - 1:  # no decode step whose distribution nobody draws from
            break
        keep = np.concatenate([keep, np.ones((b, 1), dtype=bool)], axis=1) if ragged else None
        logprobs, state = lm.step(state, np.where(done, pad_id, nxt).astype(np.int64), keep)
    for i, c in enumerate(out):
        if on_text is not None and len(c.text) > shown[i]:
            on_text(i, c.text[shown[i]:])
    return out


def generate(lm, tok, texts: list[str], cfg: SamplingConfig, meta: dict | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Continue each text; stops at end-of-text, end-of-turn or beginning-of-document tokens."""
    ids = special_ids(tok, meta)
    stops = [ids["eos"], ids["end"], ids["bos"]]
    pad = ids["pad"] if ids["pad"] is not None else (ids["eos"] or 0)
    return generate_ids(lm, tok, [encode_prompt(tok, t, meta) for t in texts], cfg, stops, pad, on_text)


def load_model(path: str | os.PathLike, backend_name: str = "auto", dtype: str = "float32"):
    """(Model, tokenizer, checkpoint) for a checkpoint directory, computing in `dtype`."""
    from tinylm.train import checkpoint
    from tinylm.backends import get_backend

    ckpt = checkpoint.load(path, with_optimizer=False)
    tok = load_checkpoint_tokenizer(ckpt)
    return Model(get_backend(backend_name, "float32"), ckpt.shape, ckpt.params, dtype), tok, ckpt


def load_checkpoint_tokenizer(ckpt):
    if ckpt.tokenizer_path is None:
        raise UserError(f"{ckpt.path} has no tokenizer.json; generation and evaluation need one")
    return load_tokenizer(ckpt.tokenizer_path)
