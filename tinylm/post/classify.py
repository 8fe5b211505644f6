"""Classification fine-tuning: a task's (text, label) rows as the batches of the `classify` objective.

The task comes from `tinylm.data.classify_tasks.load_task`; its label list (sorted, as found in training)
fixes the order of the head's outputs and goes into every checkpoint, so evaluation maps classes back to
names and refuses test labels the model never learned. A step's rows are a pure function of (seed, step):
every epoch is a seeded permutation of the training rows, which is what exact resume needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.data.tokenizer import PAD, load_tokenizer, token_bytes
from tinylm.errors import UserError
from tinylm.train.objectives import classify_batch


@dataclass
class ClassifyConfig:
    """The `[classify]` section: the task a `classify` stage fine-tunes on."""

    task: str = ""
    """The task: a JSONL file of {"text", "label"} rows (split into train and test) or a folder with
    train.jsonl and test.jsonl, `agnews:PATH`, `dbpedia:PATH`, `fewrel:PATH`, or a built-in one
    (`synthetic`, `shakespeare-speakers`). Evaluate it with `classify:<same spec>` in `[eval] tasks`."""


def load_classify_task(spec: str):
    """The `ClassifyTask` a spec names (see `ClassifyConfig.task`)."""
    from tinylm.data.classify_tasks import load_task

    return load_task(spec)


def pad_id(tok) -> int:
    found = tok.token_to_id(PAD)
    return 0 if found is None else found


def encode_texts(tok, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text's token ids, cut to the model's `max_len` (an empty text becomes one padding token, which it
    then attends to and pools, so that every row has one position to read)."""
    out = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids[:max_len]
        out.append(ids or [pad_id(tok)])
    return out


def label_indices(labels: list[str], known: list[str], where: str) -> list[int]:
    """Each label's index in `known`; a label outside it is refused (the head has no output for it)."""
    index = {name: i for i, name in enumerate(known)}
    unseen = sorted({name for name in labels if name not in index})
    if unseen:
        raise UserError(f"{where}: label {unseen[0]!r} was never seen in training (the model knows "
                        f"{', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
    return [index[name] for name in labels]


class ClassifyData:
    """The rows of a classify stage, per step and rank."""

    def __init__(self, cfg: ClassifyConfig, tokenizer_path: str | Path, seq_len: int, rows_per_step: int,
                 seed: int, causal: bool):
        if not cfg.task:
            raise UserError("objective classify needs labels: set classify.task to the task to fine-tune on")
        task = load_classify_task(cfg.task)
        self.labels = list(task.labels)
        self.tokenizer_path = Path(tokenizer_path)
        tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size = tok.get_vocab_size()
        self.pad = pad_id(tok)
        self.rows = encode_texts(tok, [text for text, _ in task.train], seq_len)
        self.targets = np.asarray(label_indices([label for _, label in task.train], self.labels, cfg.task))
        self.seq_len, self.rows_per_step, self.seed, self.causal = seq_len, rows_per_step, seed, causal
        blob = json.dumps([self.labels, self.rows, self.targets.tolist(), seed, seq_len]).encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        self.tokens_per_step = rows_per_step * seq_len
        self.truncated = sum(len(tok.encode(t, add_special_tokens=False).ids) > seq_len for t, _ in task.train)

    def token_bytes(self) -> np.ndarray:
        return token_bytes(load_tokenizer(self.tokenizer_path))

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def _picks(self, step: int) -> list[int]:
        n = len(self.rows)
        return [int(self._order(k // n)[k % n]) for k in range(step * self.rows_per_step,
                                                              (step + 1) * self.rows_per_step)]

    def phase_name(self, step: int) -> str:
        return f"epoch {step * self.rows_per_step // len(self.rows) + 1}"

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        per_rank = self.rows_per_step // world
        mine = self._picks(step)[rank * per_rank:(rank + 1) * per_rank]
        out = []
        for part in np.array_split(np.asarray(mine), grad_accum):
            out.append(classify_batch([self.rows[i] for i in part], self.pad, self.causal, self.seq_len,
                                      self.targets[part]))
        return out
