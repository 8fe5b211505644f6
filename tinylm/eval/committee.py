"""Soft committee: several checkpoints that share a tokenizer, whose next-token probabilities are averaged.

After the Tiny Language Models paper: a committee of shallow models can be compared with one deep model at
the same budget. Members may differ in shape; only the vocabulary must agree. The committee offers the same
interface as `tinylm.generate.Model`, so loss, multiple choice and generation run on it unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np

from tinylm.errors import UserError


def _mean_prob(logprobs: list[np.ndarray]) -> np.ndarray:
    """log(mean_i exp(lp_i)), computed stably."""
    stacked = np.stack(logprobs)
    top = stacked.max(0)
    return top + np.log(np.exp(stacked - top).mean(0))


class Committee:
    def __init__(self, members: list):
        if not members:
            raise UserError("a committee needs at least one checkpoint")
        vocab = {m.vocab_size for m in members}
        if len(vocab) != 1:
            raise UserError(f"committee members have different vocabulary sizes {sorted(vocab)}")
        self.members = members
        self.vocab_size = members[0].vocab_size
        self.max_len = min(m.max_len for m in members)

    def token_logprobs(self, rows: np.ndarray) -> np.ndarray:
        # The committee's probability of a token is the mean of the members' probabilities of that token, so
        # scoring needs only each member's log-probability of the actual next token.
        return _mean_prob([m.token_logprobs(rows) for m in self.members])

    def start(self, tokens, keep):
        outs = [m.start(tokens, keep) for m in self.members]
        return _mean_prob([o[0] for o in outs]), [o[1] for o in outs]

    def step(self, state, tokens, keep):
        outs = [m.step(s, tokens, keep) for m, s in zip(self.members, state)]
        return _mean_prob([o[0] for o in outs]), [o[1] for o in outs]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_committee(paths: list[str], backend_name: str = "auto"):
    """(Committee, tokenizer, first checkpoint) for checkpoint paths that must share one tokenizer."""
    from tinylm.generate import load_model

    loaded = [load_model(p, backend_name) for p in paths]
    digests = {_digest(ck.tokenizer_path) for _, _, ck in loaded}
    if len(digests) != 1:
        raise UserError("committee checkpoints must share one tokenizer (their tokenizer.json files differ)")
    return Committee([lm for lm, _, _ in loaded]), loaded[0][1], loaded[0][2]

