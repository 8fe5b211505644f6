"""Supervised fine-tuning data: conversations in the chat template, exact loss masks, best-fit packing.

A conversation is written in the model's own chat template: an imported model's Jinja template (ChatML's
`<|im_start|>user\n...<|im_end|>` for SmolLM2, say), or tinylm's layout
`BOS <|user|>question<|end|><|assistant|>answer<|end|>...` for its own models (which `transformers`'
`apply_chat_template` reproduces from the exported `chat_template`). The assistant's spans are found by
rendering prefixes of the conversation (`render_turns`), so the loss mask is exact for any template that
extends as a conversation grows: the assistant's content and its end-of-turn token carry loss; BOS, system
and user turns, role headers and padding carry none.

Conversations are packed best-fit-decreasing into rows of `seq_len + 1` tokens without cutting any that fits.
In a packed row each conversation attends only to itself (a block-diagonal causal mask from segment ids) and
its positions restart at 0, so its per-token losses are those it would have alone. Every epoch is shuffled and
packed again from the seed, and the whole plan is made up front: the rows of a step are a pure function of
(seed, step), which is what exact resume needs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinylm.data.config import SourceConfig
from tinylm.data.sources import chat_examples
from tinylm.data.tokenizer import load_tokenizer, token_bytes
from tinylm.errors import UserError
from tinylm.generate import chat_prompt, encode_prompt, special_ids


@dataclass
class SFTConfig:
    """The `[sft]` section: the conversations a supervised fine-tuning stage trains on."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Conversation sources: `jsonl` files of chat `messages`, of `prompt`/`completion` pairs or in GSM8K's
    `question`/`answer` form (set `prompt_field`/`completion_field`, or leave `format = "auto"`), and the
    built-in `synthetic` families (each problem as a user question and a worked assistant answer)."""
    epochs: int = 1
    """Passes over the conversations: the stage trains for as many steps as they take. 0 trains for
    `train.steps` instead, going round the conversations as often as that needs."""
    system: str = ""
    """A system message put before every conversation that has none (empty: none)."""
    val_fraction: float = 0.05
    """Share of the conversations held out for the validation loss (on assistant tokens)."""
    seed: int = 0
    """Seed of the held-out split and of each epoch's shuffle."""

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError("epochs must be 0 (use train.steps) or more")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")


@dataclass
class Encoded:
    """One conversation as token ids with the loss mask of each token (True: the model learns to write it)."""

    ids: np.ndarray
    loss: np.ndarray


def render_turns(messages: list[dict], meta: dict | None) -> list[tuple[str, bool]]:
    """The conversation as the model's chat template writes it, in pieces: `(text, True)` for what the assistant
    writes (its content and its end-of-turn token), `(text, False)` for everything else.

    The template is a program, so the assistant's spans are found by running it: the conversation up to an
    assistant turn rendered with the generation prompt ends where the assistant starts writing, and rendered
    with that turn ends where it stops (the whitespace a template puts between turns is not learned). Each
    render must extend the one before; a template that rewrites earlier turns (one that drops past reasoning,
    say) cannot be split this way and is refused."""
    pieces: list[tuple[str, bool]] = []
    done = ""

    def extend(text: str, learn: bool, turn: int) -> None:
        nonlocal done
        if not text.startswith(done):
            raise UserError(f"the chat template renders the conversation up to turn {turn} differently from the "
                            f"start of the longer conversation, so the assistant's turns cannot be told apart")
        if len(text) > len(done):
            pieces.append((text[len(done):], learn))
        done = text

    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = chat_prompt(messages[:i], meta)
        extend(head, False, i + 1)
        turn = chat_prompt(messages[:i + 1], meta, add_generation_prompt=False)
        extend(turn[:len(head)] + turn[len(head):].rstrip(), True, i + 1)
    extend(chat_prompt(messages, meta, add_generation_prompt=False), False, len(messages))
    return pieces


def encode_conversation(tok, messages: list[dict], meta: dict | None = None, where: str = "") -> Encoded:
    """A conversation's ids in the model's chat template (tinylm's own layout when it has none) and its loss
    mask. Each piece of `render_turns` is encoded on its own, so a prompt is encoded exactly as generation
    encodes it and the assistant's tokens are those it would write."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise UserError(f"{where}conversation has no assistant turn, so nothing to learn from")
    try:
        pieces = render_turns(messages, meta)
    except UserError as e:
        raise UserError(f"{where}{e}") from None
    ids = encode_prompt(tok, "", meta)  # the BOS the model's prompts start with, if any
    loss = [False] * len(ids)
    specials = set(tok.get_added_tokens_decoder())
    for text, learn in pieces:
        piece = tok.encode(text, add_special_tokens=False).ids
        if learn and (not piece or piece[-1] not in specials):
            raise UserError(f"{where}the chat template ends an assistant turn with {text[-12:]!r}, which is not one "
                            f"of the tokenizer's special tokens, so the model could not learn where to stop")
        ids += piece
        loss += [learn] * len(piece)
    return Encoded(np.asarray(ids, np.int64), np.asarray(loss, bool))


def prompt_ids(tok, messages: list[dict], meta: dict | None = None) -> list[int]:
    """The ids a chat model is prompted with: the conversation so far, then the opening of the assistant's turn."""
    return encode_prompt(tok, chat_prompt(messages, meta), meta)


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences per row, best-fit-decreasing: each goes into the fullest row it still fits in.
    Sequences longer than `capacity` get a row of their own (and are cut there)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = min(lengths[i], capacity)
        best = -1
        for r, room in enumerate(free):
            if room >= n and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[best].append(i)
            free[best] -= n
    return rows


def pack_rows(convs: list[Encoded], rows: list[list[int]], capacity: int, pad: int) -> dict[str, np.ndarray]:
    """Packed rows of `capacity` tokens as arrays: tokens, loss mask, segment (-1 at padding) and position."""
    n = len(rows)
    tokens = np.full((n, capacity), pad, np.int64)
    loss = np.zeros((n, capacity), bool)
    segment = np.full((n, capacity), -1, np.int32)
    position = np.zeros((n, capacity), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            c = convs[i]
            k = min(len(c.ids), capacity - at)
            tokens[r, at:at + k] = c.ids[:k]
            loss[r, at:at + k] = c.loss[:k]
            segment[r, at:at + k] = s
            position[r, at:at + k] = np.arange(k)
            at += k
    return {"tokens": tokens, "loss": loss, "segment": segment, "position": position}


def loss_targets(packed: dict[str, np.ndarray]) -> np.ndarray:
    """Which targets carry loss: a loss token predicted from a token of its own conversation."""
    seg = packed["segment"]
    return packed["loss"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)


def model_batch(packed: dict[str, np.ndarray], weight_scale: float) -> dict[str, np.ndarray]:
    """The arrays `tinylm.train.objectives.sft` reads, from packed rows: inputs and targets shifted by one, a target
    weighed only where it is a loss token of the same conversation as its input, positions, and the
    block-diagonal causal attention mask (padding attends to itself alone, so no softmax row is empty)."""
    seg_in = packed["segment"][:, :-1]
    weights = loss_targets(packed)
    t = seg_in.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    same = seg_in[:, :, None] == seg_in[:, None, :]
    mask = (same & causal[None] & (seg_in[:, :, None] >= 0)) | np.eye(t, dtype=bool)[None]
    return {"inputs": packed["tokens"][:, :-1], "targets": packed["tokens"][:, 1:],
            "weights": weights.astype(np.float32) * np.float32(weight_scale),
            "positions": packed["position"][:, :-1], "mask": mask[:, None]}


def _source_where(src: SourceConfig) -> str:
    return f"sft source {src.name!r} ({src.path or src.generator})"


def read_conversations(src: SourceConfig, system: str) -> list[list[dict]]:
    """A source's conversations, each opened by the system message when one is set and it has none."""
    convs = []
    for messages in chat_examples(src):
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        convs.append(messages)
    if not convs:
        raise UserError(f"{_source_where(src)} holds no conversations")
    return convs


class SFTData:
    """The packed rows of an SFT stage, per step and rank, and its held-out conversations."""

    def __init__(self, cfg: SFTConfig, tokenizer_path: str | Path, seq_len: int, rows_per_step: int,
                 steps: int, seed: int, meta: dict | None = None):
        self.tokenizer_path = Path(tokenizer_path)
        tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size = tok.get_vocab_size()
        self.seq_len = seq_len
        self.rows_per_step = rows_per_step
        ids = special_ids(tok, meta)
        self.pad = next(i for i in (ids["pad"], ids["eos"], 0) if i is not None)
        if not cfg.sources:
            raise UserError("sft.sources is empty: name the conversations to fine-tune on")
        encoded = []
        for src in cfg.sources:
            for n, messages in enumerate(read_conversations(src, cfg.system)):
                encoded.append(encode_conversation(tok, messages, meta, f"{_source_where(src)} record {n + 1}: "))
        rng = np.random.default_rng(cfg.seed)
        held = rng.permutation(len(encoded))
        n_val = min(len(encoded) - 1, int(round(len(encoded) * cfg.val_fraction)))
        self.val = [encoded[i] for i in sorted(held[:n_val])]
        self.train = [encoded[i] for i in sorted(held[n_val:])]
        capacity = seq_len + 1
        self.truncated = sum(len(c.ids) > capacity for c in self.train)
        self.loss_tokens = int(sum(c.loss.sum() for c in self.train))
        # Every epoch shuffled and packed up front: rows of a step are a pure function of (seed, step).
        plan = []
        for epoch in range(max(1, cfg.epochs)):
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.train))
            convs = [self.train[i] for i in order]
            rows = pack_best_fit([len(c.ids) for c in convs], capacity)
            rows = [rows[i] for i in np.random.default_rng([cfg.seed, epoch, 1]).permutation(len(rows))]
            plan.extend((convs, members) for members in rows)
        self._plan = plan
        self.epochs = cfg.epochs
        self.rows_per_epoch = len(plan) / max(1, cfg.epochs)
        self.steps = math.ceil(len(plan) / rows_per_step) if cfg.epochs else steps
        digest = hashlib.sha256(json.dumps([len(self.train), cfg.epochs, cfg.seed, seed]).encode())
        for c in self.train:
            digest.update(c.ids.tobytes() + c.loss.tobytes())
        self.fingerprint = digest.hexdigest()[:16]
        self.tokens_per_step = rows_per_step * seq_len

    def token_bytes(self) -> np.ndarray:
        return token_bytes(load_tokenizer(self.tokenizer_path))

    def phase_name(self, step: int) -> str:
        epoch = step * self.rows_per_step // max(1, round(self.rows_per_epoch))
        return f"epoch {min(epoch, self.epochs - 1) + 1}" if self.epochs else f"epoch {epoch + 1}"

    def _rows(self, step: int) -> dict[str, np.ndarray]:
        # Past the last packed row (a step count above the epochs asked for) the plan wraps around.
        picks = [self._plan[(step * self.rows_per_step + i) % len(self._plan)] for i in range(self.rows_per_step)]
        rows = [pack_rows(convs, [members], self.seq_len + 1, self.pad) for convs, members in picks]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        """This rank's micro-batches of `step`. Weights are divided by the loss tokens of the whole step (all
        ranks) and multiplied by the count of micro-batches and ranks the step averages over, so the step's
        gradient is the mean over its loss tokens."""
        packed = self._rows(step)
        total = int(loss_targets(packed).sum())
        scale = grad_accum * world / max(1, total)
        per_rank = self.rows_per_step // world
        mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in packed.items()}
        batch = model_batch(mine, scale)
        return [{k: np.array_split(v, grad_accum)[i] for k, v in batch.items()} for i in range(grad_accum)]

    def validation(self, batch_size: int, max_rows: int) -> list[tuple[dict, np.ndarray]]:
        """Held-out conversations packed into at most `max_rows` rows: (batch, loss-token mask) pairs."""
        if not self.val:
            return []
        rows = pack_best_fit([len(c.ids) for c in self.val], self.seq_len + 1)[:max_rows]
        packed = pack_rows(self.val, rows, self.seq_len + 1, self.pad)
        batch = model_batch(packed, 1.0)
        out = []
        for i in range(0, len(rows), batch_size):
            part = {k: v[i:i + batch_size] for k, v in batch.items()}
            out.append((part, part["weights"] > 0))
        return out
