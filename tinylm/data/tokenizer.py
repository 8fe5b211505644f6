"""Byte-level BPE tokenizer: special tokens, chat rendering, training, loading and per-token byte lengths.

Digits are always split one per token before BPE runs, so the model sees numbers digit by digit (multi-digit
merges make arithmetic much harder to learn at small scale).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Iterable

import numpy as np

from tinylm.errors import UserError

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
MASK = "<|mask|>"
"""Masked-language pretraining replaces selected tokens with this one (BERT's [MASK])."""
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END, MASK]
"""In id order: a trained tokenizer gives BOS id 0, EOS 1, PAD 2, and so on. New tokens go at the end, so the
ids of the older ones stay what they were in tokenizers trained before."""

ROLE_MARKERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def render_chat(messages: list[dict]) -> str:
    """`<|user|>question<|end|><|assistant|>answer<|end|>`: the one chat layout pretraining and SFT share."""
    parts = []
    for m in messages:
        marker = ROLE_MARKERS.get(m.get("role", ""))
        if marker is None:
            raise ValueError(f"unknown chat role {m.get('role')!r} (known: {', '.join(ROLE_MARKERS)})")
        parts.append(f"{marker}{m['content']}{END}")
    return "".join(parts)


def _byte_level_pieces():
    from tokenizers import decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return pre, decoders.ByteLevel()


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE trained on `texts`, with `SPECIAL_TOKENS` first and all 256 bytes in the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"tokenizer vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes plus the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level_pieces()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def fitted_vocab_size(chars: int) -> int:
    """A vocabulary for a tokenizer trained on `chars` characters: 2 x sqrt(chars), to a multiple of 256, from
    512 to 32768 (2048 for the 1.1 MB of tiny Shakespeare, 768 for a 150 KB novel).

    A fixed vocabulary fits one size of text: on a small one most merged tokens occur a few times each, too
    rarely for a small model to learn them, while on a large one a small vocabulary wastes context on short
    tokens. Growing as the square root lets both the number of tokens and how often each occurs grow with the
    text."""
    return int(min(32768, max(512, 256 * round(2 * math.sqrt(max(0, chars)) / 256))))


def save_tokenizer(tok, path: str | os.PathLike) -> None:
    """Write tokenizer.json atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{path} is not a tokenizer.json that `tokenizers` can load: {' '.join(str(e).split())}") from None


def document_specials(cfg, tok) -> tuple[int, int]:
    """(bos id, eos id) for documents: names from the recipe, else from what sits beside an existing
    tokenizer file (a tinylm checkpoint's state.json, an HF tokenizer_config.json), else tinylm's own."""
    names = {"bos": cfg.bos_token, "eos": cfg.eos_token}
    if cfg.path:
        folder = Path(cfg.path).parent
        declared = {}
        if (folder / "state.json").is_file():
            declared = json.loads((folder / "state.json").read_text()).get("special_tokens") or {}
        elif (folder / "tokenizer_config.json").is_file():
            hf = json.loads((folder / "tokenizer_config.json").read_text())
            declared = {k: v.get("content") if isinstance(v, dict) else v
                        for k in ("bos", "eos") if (v := hf.get(f"{k}_token"))}
        for key in names:
            names[key] = names[key] or declared.get(key) or ""
    where = cfg.path or "the tokenizer"
    return (require_special(tok, names["bos"] or BOS, where), require_special(tok, names["eos"] or EOS, where))


def require_special(tok, token: str, where: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise UserError(f"{where} has no {token} token; name its document tokens with data.tokenizer.bos_token "
                        "and data.tokenizer.eos_token")
    return tid


def mask_id(tok, where: str = "the tokenizer") -> int:
    """The id of `MASK`; a `UserError` for a tokenizer without one (trained before it was added, or imported)."""
    tid = tok.token_to_id(MASK)
    if tid is None:
        raise UserError(f"{where} has no {MASK} token, which masked-language pretraining needs; prepare the data "
                        "again so that a tokenizer is trained with it")
    return tid


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-to-printable-character table, which the ByteLevel pre-tokenizer uses.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tok) -> np.ndarray:
    """UTF-8 byte length of every token id, 0 for special tokens (bits per byte needs it)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int32)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    table = _byte_decoder()
    for token, tid in vocab.items():
        if token in specials or tid >= out.size:
            continue
        if all(ch in table for ch in token):
            out[tid] = len(token)
        else:
            # Not a byte-level token (a tokenizer.json from elsewhere): measure what it decodes to.
            out[tid] = len(tok.decode([tid], skip_special_tokens=False).encode("utf-8"))
    return out


def tokenizer_sample(cleaned: dict[str, tuple[list[str], dict]], budget_chars: int, seed: int) -> list[str]:
    """Documents from every source: half the budget split by size, half evenly, so small sources count too."""
    sizes = {name: sum(map(len, docs)) for name, (docs, _) in cleaned.items()}
    total = sum(sizes.values()) or 1
    rng = random.Random(f"tinylm/tokenizer-sample/{seed}")
    sample = []
    for name, (docs, _) in cleaned.items():
        quota = budget_chars * (0.5 * sizes[name] / total + 0.5 / len(cleaned))
        order = list(range(len(docs)))
        rng.shuffle(order)
        taken = 0
        for i in order:
            if taken >= quota:
                break
            sample.append(docs[i])
            taken += len(docs[i])
    rng.shuffle(sample)
    return sample


def bytes_per_token(tok, docs: list[str]) -> float:
    """UTF-8 bytes per token of `docs` under `tok` (higher is a better fit)."""
    if not docs:
        return 0.0
    tokens = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
    return sum(len(d.encode("utf-8")) for d in docs) / max(1, tokens)
