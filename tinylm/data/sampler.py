"""Deterministic mixture sampling: the rows of step s depend only on (seed, s), so resuming needs no state.

Each row starts at a document boundary (every document begins with BOS) and is filled with the documents
that follow it in the same source until it holds `seq_len + 1` tokens; the last document is cropped.
The source of each row is drawn with the weights of the phase that the step's first token falls in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.data.shards import ShardSet, Split
from tinylm.errors import UserError


@dataclass(frozen=True)
class Phase:
    """A stretch of training with one mixture: it starts once `start_tokens` tokens have been trained."""

    name: str
    start_tokens: int
    weights: dict[str, float]


def normalized(weights: dict[str, float], what: str) -> dict[str, float]:
    bad = [k for k, v in weights.items() if not np.isfinite(v) or v < 0]
    if bad:
        raise UserError(f"{what}: weight of {bad[0]!r} must be a finite number >= 0")
    total = float(sum(weights.values()))
    if not total > 0:
        raise UserError(f"{what}: weights must sum to a positive number, got {total}")
    return {k: float(v) / total for k, v in weights.items()}


def _fill_row(split: Split, first_doc: int, length: int) -> np.ndarray:
    row = np.empty(length, dtype=np.int64)
    filled, doc = 0, first_doc
    while filled < length:
        piece = split.doc(doc)[: length - filled]
        row[filled : filled + piece.size] = piece
        filled += piece.size
        doc = (doc + 1) % split.num_docs
    return row


class MixtureSampler:
    """Rows of `seq_len + 1` tokens for step s, drawn from the phase mixture in force at step s."""

    def __init__(self, shards: ShardSet, phases: list[Phase], seq_len: int, rows_per_step: int, seed: int):
        if not phases:
            raise UserError("the data mixture has no phases")
        self.shards = shards
        self.phases = sorted(phases, key=lambda p: p.start_tokens)
        if self.phases[0].start_tokens != 0:
            raise UserError(f"the first mixture phase ({self.phases[0].name!r}) must start at 0 tokens")
        self.seq_len = seq_len
        self.rows_per_step = rows_per_step
        self.seed = seed
        self._weights = []
        for p in self.phases:
            w = normalized(p.weights, f"mixture phase {p.name!r}")
            for name, v in w.items():
                if v > 0 and shards.split(name, "train").num_docs == 0:
                    raise UserError(f"mixture phase {p.name!r}: source {name!r} has no training documents")
            self._weights.append(w)

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    def phase_index(self, step: int) -> int:
        tokens = step * self.tokens_per_step
        idx = 0
        for i, p in enumerate(self.phases):
            if tokens >= p.start_tokens:
                idx = i
        return idx

    def phase(self, step: int) -> Phase:
        """The phase step `step` trains in."""
        return self.phases[self.phase_index(step)]

    def _draw_sources(self, step: int):
        names, probs = zip(*sorted(self._weights[self.phase_index(step)].items()))
        rng = np.random.default_rng([self.seed, step])
        return [names[i] for i in rng.choice(len(names), size=self.rows_per_step, p=np.asarray(probs))], rng

    def row_sources(self, step: int) -> list[str]:
        """Which source each row of `step` comes from."""
        return self._draw_sources(step)[0]

    def batch(self, step: int) -> np.ndarray:
        """All rows of the step, shape (rows_per_step, seq_len + 1), int64."""
        sources, rng = self._draw_sources(step)
        rows = np.empty((self.rows_per_step, self.seq_len + 1), dtype=np.int64)
        for r, name in enumerate(sources):
            split = self.shards.split(name, "train")
            rows[r] = _fill_row(split, int(rng.integers(split.num_docs)), self.seq_len + 1)
        return rows


def validation_rows(shards: ShardSet, seq_len: int, max_rows: int) -> np.ndarray:
    """A fixed set of validation rows: each source's validation documents packed in order, sources in turn.

    The same rows come back for any seed, so validation loss is comparable across runs.
    """
    per_source = []
    for name in sorted(shards.sources):
        split = shards.split(name, "val")
        n = split.num_tokens // (seq_len + 1)
        if n:
            per_source.append(np.asarray(split.tokens[: n * (seq_len + 1)], dtype=np.int64).reshape(n, seq_len + 1))
    if not per_source:
        raise UserError(f"no source in {shards.root} has a validation split of at least {seq_len + 1} tokens")
    rows = []
    i = 0
    while len(rows) < max_rows and any(i < len(s) for s in per_source):
        rows.extend(s[i] for s in per_source if i < len(s))
        i += 1
    return np.stack(rows[:max_rows])
