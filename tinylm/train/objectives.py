"""Training objectives, each a pure function of (ops, params, batch, shape, compute) -> scalar loss.

Written once against the backend operations, like `tinylm.model`; `TrainModule` differentiates whichever one a
stage names. `compute` (a `model.Compute`: dtype, loss chunking, block checkpointing) goes on to
`model.per_token` as it came, so an objective never reads it. A batch is a dict of backend arrays:

- `lm`: `tokens` (batch, time + 1), every next token counts equally.
- `sft`: `inputs`, `targets` (batch, time), `weights` (batch, time) float, and from packing (see
  `tinylm.post.sft`) `positions` (batch, time) and `mask` (batch, 1, time, time) bool; without those two the rows
  are plain causal sequences. The weights are zero on every token
  that carries no loss and already divided by the step's count of loss tokens, so the loss is their weighted
  sum and a step's gradient is the mean over its loss tokens however they fall into micro-batches and ranks.
- `distill`: an `sft`-shaped batch plus the teacher's log-probabilities at temperature T, either over the whole
  vocabulary (`teacher_logprobs` (batch, time, vocab)) or over its top k tokens (`teacher_ids` and
  `teacher_logprobs` (batch, time, k), renormalized over those k).
- `grpo`: an `sft`-shaped batch of prompts and sampled completions whose `weights` are the completion tokens'
  normalisation weights (see `tinylm.post.rl`), plus per-token `advantages`, `old_logprobs` (the policy that
  sampled them) and, with a KL penalty, `ref_logprobs` (the starting model), all (batch, time).
- `mlm`: an `sft`-shaped batch from `mlm_batch` (the masked rows, the original tokens, weights on the
  selected positions).
- `classify`: `classify_batch`'s `inputs`, `mask`, `pool` and `labels` (batch,) class indices.
- `dpo`: `inputs`, `targets`, `weights` (1 on response tokens, else 0) for 2n rows, the n chosen responses
  then their n rejected ones; `ref_logps` (2n,) their summed log-probabilities under the reference model and
  `pair_weights` (n,) that average the pairs over the step (as `sft`'s weights do for tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tinylm import model
from tinylm.errors import UserError


PLAIN = model.Compute()
"""float32, the whole batch's logits at once, no recomputation."""


def lm(ops, params, batch, shape, compute=PLAIN):
    """Mean next-token cross-entropy (nats) over a (batch, time + 1) token array."""
    tokens = batch["tokens"]
    return model.token_losses(ops, params, tokens[:, :-1], tokens[:, 1:], shape, compute).mean()


def weighted_token_losses(ops, params, batch, shape, compute=PLAIN):
    """Per-token cross-entropy of a packed batch (its mask and positions applied), before weighting."""
    return model.token_losses(ops, params, batch["inputs"], batch["targets"], shape, compute,
                              mask=batch.get("mask", "causal"), positions=batch.get("positions"))


def sft(ops, params, batch, shape, compute=PLAIN):
    """Cross-entropy on the tokens the batch weights (the assistant's), summed with those weights."""
    return (weighted_token_losses(ops, params, batch, shape, compute) * batch["weights"]).sum()


def mlm_batch(tokens, vocab_size: int, mask_id: int, special_ids, seed: int, step: int, rate: float = 0.15,
              part: int = 0) -> dict:
    """BERT's masking of (batch, time) numpy `tokens` as an `sft`-shaped batch: `rate` of the non-special
    positions are selected; of those 80% become `mask_id`, 10% a random token, 10% stay. Only the selected
    positions weigh (equally, summing to 1). Drawn from a generator keyed by (seed, step, part), so a resumed
    run masks each step as the first run did; `part` tells a step's micro-batches and ranks apart."""
    rng = np.random.default_rng([seed, step, part])
    tokens = np.asarray(tokens)
    maskable = ~np.isin(tokens, np.asarray(list(special_ids), dtype=tokens.dtype))
    selected = (rng.random(tokens.shape) < rate) & maskable
    if not selected.any():  # a step with no loss position would divide by zero: take the first maskable one
        selected.flat[int(np.flatnonzero(maskable)[0])] = True
    roll = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[selected & (roll < 0.8)] = mask_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = rng.integers(0, vocab_size, int(swap.sum()))
    weights = selected.astype(np.float32) / np.float32(selected.sum())
    return {"inputs": inputs, "targets": tokens, "weights": weights}


def check_mlm(shape) -> None:
    if shape.causal:
        raise UserError("objective mlm needs a bidirectional model: set model.causal = false (or a tlm-bert preset)")


def mlm(ops, params, batch, shape, compute=PLAIN):
    """Masked-language cross-entropy on the positions `mlm_batch` selected; the model must be bidirectional."""
    check_mlm(shape)
    return sft(ops, params, batch, shape, compute)


def classify_batch(rows: list[list[int]], pad_id: int, causal: bool, width: int = 0, labels=None) -> dict:
    """Token rows of any lengths (each at least one token) as numpy arrays for `model.class_logits`: right-
    padded `inputs` (to `width` when given, so every step has one shape), the attention `mask` (causal for a
    decoder) that no token attends padding through, the mean-pooling weights `pool`, and `labels` if given."""
    width = max(width, max(len(r) for r in rows))
    inputs = np.full((len(rows), width), pad_id, np.int64)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        inputs[i, :len(r)], valid[i, :len(r)] = r, True
    mask = valid[:, None, None, :].repeat(width, axis=2)
    if causal:
        mask &= np.tril(np.ones((width, width), bool))
    out = {"inputs": inputs, "mask": mask, "pool": (valid / valid.sum(1, keepdims=True)).astype(np.float32)}
    if labels is not None:
        out["labels"] = np.asarray(labels, np.int64)
    return out


def classify(ops, params, batch, shape, compute=PLAIN):
    """Mean cross-entropy of the classification head's logits against the batch's `labels`."""
    if not shape.num_labels:
        raise UserError("objective classify needs labels: the model has no classification head (a classify "
                        "stage adds one from its task's labels)")
    return ops.cross_entropy(model.class_logits(ops, params, batch, shape, compute), batch["labels"]).mean()


@dataclass
class DistillConfig:
    """The `[distill]` section of a stage: logit distillation from a teacher checkpoint."""

    teacher: str = ""
    """Teacher checkpoint or run directory; it must use the student's tokenizer. Empty: no distillation."""
    temperature: float = 2.0
    """Softmax temperature T for both models; the KL term is scaled by T^2 (Hinton et al. 2015)."""
    alpha: float = 0.5
    """Weight of the KL term; the cross-entropy on the data gets 1 - alpha."""
    top_k: int = 0
    """Keep only the teacher's k most likely tokens per position (0: the whole vocabulary), renormalized."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be between 0 and 1")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (all) or positive")


def distill_terms(ops, logits, targets, teacher_logprobs, teacher_ids, temperature: float):
    """Per-token (cross-entropy, KL(teacher || student) at temperature T) from the student's logits."""
    ce = ops.cross_entropy(logits, targets)
    student = ops.log_softmax(logits / temperature)
    if teacher_ids is not None:
        student = ops.take_along_last(student, teacher_ids)
    kl = (ops.exp(teacher_logprobs) * (teacher_logprobs - student)).sum(axis=-1)
    return ce, kl


def distill(cfg: DistillConfig):
    """The distillation objective for `cfg`: (1 - alpha) x CE + alpha x T^2 x KL, per token, weighted."""

    def per_token(ops, logits, targets, teacher_logprobs, *teacher_ids):
        ce, kl = distill_terms(ops, logits, targets, teacher_logprobs, teacher_ids[0] if teacher_ids else None,
                               cfg.temperature)
        return ce * (1.0 - cfg.alpha) + kl * (cfg.alpha * cfg.temperature**2)

    def objective(ops, params, batch, shape, compute=PLAIN):
        # The teacher's arrays go through `model.per_token` beside the logits, so loss chunking covers them.
        arrays = [batch[k] for k in ("targets", "teacher_logprobs", "teacher_ids") if k in batch]
        losses = model.per_token(ops, params, batch["inputs"], shape, compute,
                                 model.on_logits(ops, functools.partial(per_token, ops)),
                                 arrays, batch.get("mask", "causal"), batch.get("positions"))
        return (losses * batch["weights"]).sum()

    return objective


def _clip(ops, x, low: float, high: float):
    """x clipped to [low, high] with the one comparison op every backend has (max(a, b) = -min(-a, -b))."""
    return -ops.minimum(-ops.minimum(x, ops.scalar(high)), ops.scalar(-low))


def grpo(epsilon: float, epsilon_high: float, beta: float):
    """The clipped policy-gradient objective of PPO/GRPO on completion tokens, with DAPO's asymmetric clip
    [1 - epsilon, 1 + epsilon_high] and, when beta > 0, the k3 estimate of KL(policy || reference)
    (exp(ref - logp) - (ref - logp) - 1, per token). The normalisation (`grpo`, `dr_grpo`, `dapo`) is in the
    host-computed `weights`, so this one function serves every loss type."""

    def objective(ops, params, batch, shape, compute=PLAIN):
        logp = -weighted_token_losses(ops, params, batch, shape, compute)
        ratio = ops.exp(logp - batch["old_logprobs"])
        advantages = batch["advantages"]
        per_token = -ops.minimum(ratio * advantages, _clip(ops, ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages)
        if beta:
            delta = batch["ref_logprobs"] - logp
            per_token = per_token + (ops.exp(delta) - delta - 1.0) * beta
        return (per_token * batch["weights"]).sum()

    return objective


def dpo(beta: float):
    """Direct preference optimisation's sigmoid loss (Rafailov et al. 2023), per pair:
    -log sigmoid(beta x [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))])."""

    def objective(ops, params, batch, shape, compute=PLAIN):
        logps = -(weighted_token_losses(ops, params, batch, shape, compute) * batch["weights"]).sum(axis=-1)
        ratios = logps - batch["ref_logps"]
        n = ratios.shape[0] // 2
        z = (ratios[:n] - ratios[n:]) * beta
        # -log sigmoid(z) as a two-way log-softmax over (z, 0): stable for large |z|.
        pair = ops.log_softmax(ops.concat([z[:, None], ops.zeros_like(z)[:, None]], axis=1))
        return -(pair[:, 0] * batch["pair_weights"]).sum()

    return objective


OBJECTIVES = {"lm": lm, "sft": sft, "grpo": grpo, "dpo": dpo, "mlm": mlm, "classify": classify}
"""Objectives a stage can name; `grpo` and `dpo` are built from their sections (`[grpo]`, `[dpo]`),
`distill` is added to `lm` or `sft` by a `[distill]` section."""
