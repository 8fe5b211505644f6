"""Direct preference optimisation: preference pairs, reference log-probabilities computed once, the feed.

A pair is a prompt with a chosen and a rejected response: `{"prompt", "chosen", "rejected"}` with strings, or
the chat form where `chosen` and `rejected` are whole conversations (lists of messages) that differ only in
their last assistant turn (then `prompt` may be left out). Chat models, and pairs given as messages, are
encoded with the chat template (the response closed by `<|end|>`); base models see the prompt as plain text
and the response closed by end-of-text. Only the response tokens count in a sequence's log-probability.

The reference model is the stage's starting weights: each pair's summed reference log-probabilities are
computed once, before the first step, and the reference weights are then let go.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.errors import UserError


@dataclass
class DPOConfig:
    """The `[dpo]` section of a preference stage."""

    path: str = ""
    """JSON Lines of preference pairs (see `tinylm.post.dpo`)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint: the scale of the log-ratio margin inside the sigmoid."""
    pairs_per_step: int = 8
    """Preference pairs per optimizer step (over all ranks and micro-batches)."""
    epochs: int = 1
    """Passes over the pairs: the stage trains for as many steps as they take; 0 uses `train.steps`."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if self.pairs_per_step < 1:
            raise ValueError("pairs_per_step must be at least 1")
        if self.epochs < 0:
            raise ValueError("epochs must be 0 (use train.steps) or more")


def _messages(value, where: str, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise UserError(f"{where}: {name!r} must be a string or a list of {{role, content}} messages")


def read_pairs(path: Path) -> list[tuple[list[dict], str, str, bool]]:
    """(prompt messages, chosen text, rejected text, given as messages) per record."""
    from tinylm.files import iter_records

    if not path.is_file():
        raise UserError(f"preference file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, row in iter_records(f, str(path)):
            where = f"{path}:{n}"
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object per line")
            for key in ("chosen", "rejected"):
                if key not in row:
                    raise UserError(f"{where}: missing field {key!r} (a preference pair needs chosen and rejected)")
            chosen, rejected = _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected")
            as_chat = not isinstance(row["chosen"], str)
            if "prompt" in row:
                prompt = _messages(row["prompt"], where, "prompt")
                chosen, rejected = prompt + chosen, prompt + rejected
            if chosen[:-1] != rejected[:-1] or chosen[-1].get("role") != "assistant" or \
                    rejected[-1].get("role") != "assistant" or len(chosen) < 2:
                raise UserError(f"{where}: chosen and rejected must share the prompt and end in an assistant turn")
            out.append((chosen[:-1], str(chosen[-1]["content"]), str(rejected[-1]["content"]), as_chat))
    if not out:
        raise UserError(f"{path} holds no preference pairs")
    return out


class DPOData:
    """The feed of a DPO stage: per step, `pairs_per_step` pairs as chosen rows then rejected rows."""

    def __init__(self, cfg: DPOConfig, init, seq_len: int, steps: int, seed: int):
        from tinylm.data.tokenizer import END, load_tokenizer
        from tinylm.generate import encode_prompt, special_ids
        from tinylm.post.sft import prompt_ids

        if not cfg.path:
            raise UserError("dpo.path is not set: name the preference pairs file")
        self.cfg, self.seed, self.init = cfg, seed, init
        self.tokenizer_path = init.tokenizer_path
        self.tok = tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size = tok.get_vocab_size()
        ids = special_ids(tok, init.meta)
        self.pad = next(i for i in (ids["pad"], ids["eos"], 0) if i is not None)
        chat = bool(init.meta.get("chat"))
        self.time = seq_len
        pairs = []
        for prompt, chosen, rejected, as_chat in read_pairs(Path(cfg.path)):
            if chat or as_chat:
                head = prompt_ids(tok, prompt, init.meta)
                close = [next(i for i in (ids["end"], ids["eos"], tok.token_to_id(END)) if i is not None)]
            else:
                text = "\n".join(m["content"] for m in prompt)
                head = encode_prompt(tok, text, init.meta)
                close = [ids["eos"]] if ids["eos"] is not None else []
            pairs.append(tuple((head, tok.encode(r, add_special_tokens=False).ids + close) for r in (chosen, rejected)))
        self.pairs = pairs
        self.truncated = sum(len(h) + len(r) > seq_len + 1 for pair in pairs for h, r in pair)
        n = len(pairs)
        self.steps = math.ceil(n * cfg.epochs / cfg.pairs_per_step) if cfg.epochs else steps
        self.tokens_per_step = 2 * cfg.pairs_per_step * seq_len
        digest = hashlib.sha256(repr((cfg.beta, cfg.pairs_per_step, cfg.epochs, seed, pairs)).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self.ref_logps = None
        self.trainer = None
        self._metrics: dict[int, dict] = {}

    def attach(self, trainer) -> None:
        """Compute every pair's reference log-probabilities with the starting weights, once."""
        self.trainer = trainer
        ref = trainer.backend.from_numpy(self.init.params)
        rows = self._rows(list(range(len(self.pairs))))
        chunk = 16
        logps = [self._logps(ref, {k: v[i:i + chunk] for k, v in rows.items()})
                 for i in range(0, len(rows["inputs"]), chunk)]
        n = len(self.pairs)
        flat = np.concatenate(logps)  # rows are all chosen, then all rejected
        self.ref_logps = np.stack([flat[:n], flat[n:]], axis=1)
        self.init = None  # the reference weights are not held past this point

    def _rows(self, picks: list[int]) -> dict:
        """Rows of the picked pairs, chosen ones first: inputs, targets, response-token weights (1 or 0)."""
        rows = 2 * len(picks)
        tokens = np.full((rows, self.time + 1), self.pad, np.int64)
        weights = np.zeros((rows, self.time), np.float32)
        for side in (0, 1):
            for j, i in enumerate(picks):
                head, response = self.pairs[i][side]
                seq = (head + response)[:self.time + 1]
                r = side * len(picks) + j
                tokens[r, :len(seq)] = seq
                weights[r, len(head) - 1:len(seq) - 1] = 1.0
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}

    def _logps(self, params, rows: dict) -> np.ndarray:
        losses = self.trainer.module.token_losses(params, {"inputs": rows["inputs"], "targets": rows["targets"]})
        return -(losses * rows["weights"]).sum(axis=1, dtype=np.float64)

    def token_bytes(self) -> np.ndarray:
        from tinylm.data.tokenizer import token_bytes

        return token_bytes(self.tok)

    def phase_name(self, step: int) -> str:
        return f"epoch {step * self.cfg.pairs_per_step // len(self.pairs) + 1}"

    def validation(self, batch_size: int, max_rows: int) -> list:
        return []

    def step_pairs(self, step: int) -> list[int]:
        n, per = len(self.pairs), self.cfg.pairs_per_step
        return [int(np.random.default_rng([self.seed, i // n]).permutation(n)[i % n])
                for i in range(step * per, (step + 1) * per)]

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        if self.trainer is None:
            raise RuntimeError("DPOData.attach(trainer) must be called before training")
        picks = self.step_pairs(step)
        if len(picks) % (world * grad_accum):
            raise UserError(f"dpo.pairs_per_step {len(picks)} must divide evenly into train.grad_accum x ranks")
        self._metrics = {step: self.pair_metrics(picks)}
        per_rank = len(picks) // world
        mine = picks[rank * per_rank:(rank + 1) * per_rank]
        out = []
        for part in np.array_split(np.asarray(mine), grad_accum):
            part = [int(i) for i in part]
            batch = self._rows(part)
            batch["ref_logps"] = np.concatenate([self.ref_logps[part, 0], self.ref_logps[part, 1]]).astype(np.float32)
            batch["pair_weights"] = np.full(len(part), grad_accum * world / len(picks), np.float32)
            out.append(batch)
        return out

    def pair_metrics(self, picks: list[int]) -> dict:
        """Implicit rewards beta x (log pi - log ref) of the step's pairs under the current weights (before the
        update): mean margin chosen - rejected, and the share of pairs whose chosen response wins."""
        logps = self._logps(self.trainer.params, self._rows(picks))
        n = len(picks)
        rewards = self.cfg.beta * (np.stack([logps[:n], logps[n:]], axis=1) - self.ref_logps[picks])
        margin = rewards[:, 0] - rewards[:, 1]
        return {"reward_chosen": float(rewards[:, 0].mean()), "reward_rejected": float(rewards[:, 1].mean()),
                "reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).mean())}

    def log_metrics(self, step: int) -> dict:
        return self._metrics.get(step, {})
