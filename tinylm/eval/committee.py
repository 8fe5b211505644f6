"""Soft committee: several checkpoints that share a tokenizer, whose next-token (or class) probabilities are
averaged.

After the Tiny Language Models paper: a committee of shallow models can be compared with one deep model at
the same budget. Members may differ in shape; only the vocabulary, and for classification the label list,
must agree. The committee offers the same interface as `tinylm.generate.Model`, so loss, multiple choice,
generation and classification run on it unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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

    def class_logprobs(self, rows, pad: int):
        return _mean_prob([m.class_logprobs(rows, pad) for m in self.members])

    def start(self, tokens, keep):
        outs = [m.start(tokens, keep) for m in self.members]
        return _mean_prob([o[0] for o in outs]), [o[1] for o in outs]

    def step(self, state, tokens, keep):
        outs = [m.step(s, tokens, keep) for m, s in zip(self.members, state)]
        return _mean_prob([o[0] for o in outs]), [o[1] for o in outs]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_members(tokenizers: list, labels: list, names: list[str]) -> None:
    """Members must share one tokenizer and, fine-tuned for classification, one label list (in one order: the
    head's outputs are averaged position by position)."""
    for name, tok in zip(names, tokenizers):
        if tok is None:
            raise UserError(f"{name} has no tokenizer.json; a committee member needs one")
    if len({_digest(Path(t)) for t in tokenizers}) != 1:
        raise UserError("committee checkpoints must share one tokenizer (their tokenizer.json files differ)")
    for name, found in zip(names[1:], labels[1:]):
        if found != labels[0]:
            raise UserError(f"committee members were fine-tuned on different label sets: {names[0]} has "
                            f"{_labels(labels[0])}, {name} has {_labels(found)}")


def _labels(labels) -> str:
    if not labels:
        return "no classification head"
    return ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")


def load_committee(paths: list[str], backend_name: str = "auto"):
    """(Committee, tokenizer, first checkpoint) for checkpoint paths that must share one tokenizer."""
    from tinylm.generate import load_model

    loaded = [load_model(p, backend_name) for p in paths]
    check_members([ck.tokenizer_path for _, _, ck in loaded], [ck.meta.get("labels") for _, _, ck in loaded],
                  [str(ck.path) for _, _, ck in loaded])
    return Committee([lm for lm, _, _ in loaded]), loaded[0][1], loaded[0][2]


def evaluate_committee(backend, shape, params, meta: dict, tokenizer_path, folders: list, tasks: list) -> dict:
    """In-training evaluation of the weights being trained in a committee with the final models of `folders`
    (run or checkpoint folders): {task: {metric: value}} as `tinylm.eval.harness.evaluate` gives it."""
    from tinylm.data.tokenizer import load_tokenizer
    from tinylm.eval.harness import flat_metrics, run_tasks
    from tinylm.generate import Model
    from tinylm.train import checkpoint

    loaded = [checkpoint.load(folder, with_optimizer=False) for folder in folders]
    check_members([tokenizer_path] + [ck.tokenizer_path for ck in loaded],
                  [meta.get("labels")] + [ck.meta.get("labels") for ck in loaded],
                  ["this model"] + [str(ck.path) for ck in loaded])
    members = [Model(backend, shape, params)] + [Model(backend, ck.shape, ck.params) for ck in loaded]
    return flat_metrics(run_tasks(Committee(members), load_tokenizer(tokenizer_path), tasks, meta))

