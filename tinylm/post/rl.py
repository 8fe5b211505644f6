"""Reinforcement learning with verifiable rewards (the GRPO family): rollouts, rewards, advantages, weights.

Each rollout batch takes `prompts_per_step` prompts, samples `num_generations` completions of each with the
KV-cache generator (one batch; each prompt is prefilled once and its cache repeated for its group), and
rewards them with the verifier `tinylm eval` scores with (exact match of the extracted final answer), plus an
optional format reward. The generator also returns each sampled token's log-probability, which serves as
the sampling policy's `old_logprobs` without a second forward pass. Advantages are group-relative; the loss
normalisation (`grpo`, `dr_grpo`, `dapo`) is folded into per-token weights on the host, so
`tinylm.train.objectives.grpo` is one pure function.

Exact resume: the rollouts of batch k are drawn with a sampler seeded by (train.seed, k) from the weights at
the first step of that batch, and checkpoints fall only on rollout-batch boundaries (`train.ckpt_every` and
`train.steps` must be multiples of `num_iterations`), so a resumed run draws the same completions again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np

from tinylm.errors import UserError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
REWARD_SCALINGS = ("group", "none")


@dataclass
class GRPOConfig:
    """The `[grpo]` section of an RL stage (field names follow TRL's GRPOConfig)."""

    tasks: list[str] = field(default_factory=list)
    """Training prompts, named as `tinylm eval --tasks` takes them: built-in families (their train split),
    `gsm8k:PATH`, `qa:PATH` ({"prompt", "answer"} JSONL). Held-out pass@1 comes from `[eval]` tasks."""
    problems_per_task: int = 500
    """Problems drawn from each built-in family (files give all their records)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch."""
    num_generations: int = 8
    """Completions sampled per prompt (the group G); at least 2, since advantages are relative to the group."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_completion_length: int = 64
    """Most tokens a completion may have; longer ones are cut (truncated)."""
    beta: float = 0.0
    """Weight of the KL penalty to the starting model (k3 estimator); 0 holds no reference model."""
    epsilon: float = 0.2
    """Lower clip: the ratio is clipped below at 1 - epsilon."""
    epsilon_high: float = 0.0
    """Upper clip: 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); 0 means the same as epsilon."""
    loss_type: str = "dapo"
    """`grpo` (mean over each completion's tokens, then over completions), `dr_grpo` (sum over tokens divided
    by completions x max_completion_length) or `dapo` (sum over tokens divided by the step's active tokens)."""
    scale_rewards: str = "group"
    """`group` divides the mean-centred rewards by the group's standard deviation; `none` does not (Dr. GRPO)."""
    num_iterations: int = 1
    """Optimizer steps on each rollout batch (mu); above 1 the ratio departs from 1 and the clip acts."""
    mask_truncated_completions: bool = False
    """Give completions cut at max_completion_length no loss (DAPO)."""
    format_weight: float = 0.0
    """Weight of the format reward: 1 when the completion states its answer on a `####` line."""

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 (the group advantages need a group), "
                             f"got {self.num_generations}")
        for name in ("prompts_per_step", "max_completion_length", "num_iterations", "problems_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in REWARD_SCALINGS:
            raise ValueError(f"scale_rewards must be group or none, got {self.scale_rewards!r}")
        if self.beta < 0 or self.epsilon < 0 or self.epsilon_high < 0 or self.temperature < 0:
            raise ValueError("beta, epsilon, epsilon_high and temperature must not be negative")

    @property
    def clip_high(self) -> float:
        return self.epsilon_high or self.epsilon


def group_advantages(rewards: np.ndarray, scale_rewards: str) -> np.ndarray:
    """(prompts, G) rewards -> advantages: minus the group mean, divided by the group's standard deviation
    (unbiased, + 1e-4 so equal rewards give 0, as TRL does) when `scale_rewards == "group"`."""
    rewards = np.asarray(rewards, np.float64)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if scale_rewards == "group":
        centred = centred / (rewards.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return centred


def token_weights(mask: np.ndarray, loss_type: str, max_completion_length: int) -> np.ndarray:
    """Per-token weights of a step's completions (mask (rows, time), True on tokens that carry loss) such that
    the weighted sum of per-token losses is the loss type's normalised loss over the whole step."""
    mask = np.asarray(mask, np.float64)
    rows = mask.shape[0]
    if loss_type == "grpo":
        return mask / (np.maximum(mask.sum(axis=1, keepdims=True), 1.0) * rows)
    if loss_type == "dr_grpo":
        return mask / (rows * max_completion_length)
    return mask / max(mask.sum(), 1.0)


LOGPROB_BYTES = 256 << 20
"""Most bytes of float32 logits that one forward pass for the old policy's or the reference's log-probabilities
makes: a rollout batch's whole logits are far more (64 rows x 191 positions x 49,152 on SmolLM2's shape: 2.4
GB), and with no gradient nothing is lost by running fewer rows at a time."""


def logprob_rows(vocab_size: int, time: int) -> int:
    """Rows per forward pass whose float32 logits (rows, time, vocab) fit in `LOGPROB_BYTES`; at least one."""
    return max(1, LOGPROB_BYTES // (4 * time * vocab_size))


def format_reward(text: str) -> float:
    return float(any(line.strip().startswith("####") for line in text.splitlines()))


def pack_rollouts(prompt_ids: list[list[int]], outs: list, prompt_len: int, time: int, pad: int):
    """Prompts and their sampled completions as training rows: (tokens (rows, time + 1), completion mask and
    the sampler's log-probabilities of the completion tokens, both (rows, time) at the positions predicting
    them; the stop token that ended a completion counts as one of its tokens)."""
    tokens = np.full((len(outs), time + 1), pad, np.int64)
    mask = np.zeros((len(outs), time), bool)
    # Zero outside the completions: their weights are zero, and the ratio exp(logp - 0) there stays finite.
    old = np.zeros((len(outs), time), np.float32)
    for r, (ids, out) in enumerate(zip(prompt_ids, outs)):
        ids = ids[-prompt_len:]
        row = ids + out.tokens + ([out.stop_id] if out.stop_id is not None else [])
        tokens[r, :len(row)] = row
        mask[r, len(ids) - 1:len(row) - 1] = True
        old[r, len(ids) - 1:len(row) - 1] = out.sampled_logprobs
    return tokens, mask, old


class GroupedPrefill:
    """A generator model for groups of identical prompts: each prompt is prefilled once and its KV cache (and
    next-token distribution) repeated for the G rows of its group; decoding then runs on the whole batch."""

    def __init__(self, lm, group: int):
        self.lm, self.group = lm, group
        self.max_len, self.vocab_size = lm.max_len, lm.vocab_size

    def start(self, tokens: np.ndarray, keep: np.ndarray | None):
        g = self.group
        logprobs, cache = self.lm.start(tokens[::g], None if keep is None else keep[::g])
        index = self.lm.backend.tokens(np.repeat(np.arange(tokens.shape[0] // g), g))
        return np.repeat(logprobs, g, axis=0), [(k[index], v[index]) for k, v in cache]

    def step(self, state, tokens: np.ndarray, keep: np.ndarray | None):
        return self.lm.step(state, tokens, keep)


@dataclass
class Prompt:
    ids: list[int]
    answer: str
    stop_strings: tuple[str, ...]


def load_prompts(cfg: GRPOConfig, tok, meta: dict, chat: bool) -> list[Prompt]:
    """The training prompts, encoded exactly as `tinylm eval` encodes them (the chat template for chat models)."""
    from tinylm.eval.harness import Scorer
    from tinylm.eval.tasks import load_task

    if not cfg.tasks:
        raise UserError("grpo.tasks is empty: name the tasks whose prompts RL trains on")
    scorer = Scorer(None, tok, meta)
    prompts = []
    for spec in cfg.tasks:
        task = load_task(spec, cfg.problems_per_task, split="train")
        if task.kind != "gen":
            raise UserError(f"grpo.tasks: {spec!r} is not a task with answers to verify (a {task.kind} task)")
        for ex in task.examples:
            prompts.append(Prompt(scorer.encode(ex.text(meta, chat)), ex.answer, task.stops(chat)))
    return prompts


class RLData:
    """The feed of an RL stage: per step, the micro-batches of the current rollout batch, sampling a new one
    from the current weights at each rollout boundary. `attach(trainer)` gives it the weights to sample with."""

    def __init__(self, cfg: GRPOConfig, init, train_cfg, world: int = 1, ref_params=None):
        from tinylm.data.tokenizer import load_tokenizer
        from tinylm.generate import special_ids

        self.cfg, self.seed = cfg, train_cfg.seed
        self.tokenizer_path = init.tokenizer_path
        self.tok = load_tokenizer(self.tokenizer_path)
        self.vocab_size = self.tok.get_vocab_size()
        self.chat = bool(init.meta.get("chat"))
        self.prompts = load_prompts(cfg, self.tok, init.meta, self.chat)
        ids = special_ids(self.tok, init.meta)
        self.stops = [ids["eos"], ids["end"], ids["bos"]]
        self.pad = next(i for i in (ids["pad"], ids["eos"], 0) if i is not None)
        self.rows = cfg.prompts_per_step * cfg.num_generations
        if self.rows % (train_cfg.grad_accum * world):
            raise UserError(f"grpo.prompts_per_step x num_generations ({self.rows}) must divide evenly into "
                            f"train.grad_accum x ranks ({train_cfg.grad_accum * world})")
        room = init.shape.max_seq_len - cfg.max_completion_length
        if room < 1:
            raise UserError(f"grpo.max_completion_length {cfg.max_completion_length} leaves no room for a prompt "
                            f"in the model's {init.shape.max_seq_len} positions")
        self.prompt_len = min(max(len(p.ids) for p in self.prompts), room)
        self.time = self.prompt_len + cfg.max_completion_length - 1
        self.tokens_per_step = self.rows * self.time
        digest = hashlib.sha256(json.dumps([cfg.tasks, cfg.problems_per_task, self.seed]).encode())
        for p in self.prompts:
            digest.update(json.dumps([p.ids, p.answer]).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self.ref_params = ref_params
        self.trainer = None
        self._batch = (None, None)
        self._metrics: dict[int, dict] = {}

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def token_bytes(self) -> np.ndarray:
        from tinylm.data.tokenizer import token_bytes

        return token_bytes(self.tok)

    def phase_name(self, step: int) -> str:
        return f"rollout {step // self.cfg.num_iterations + 1}"

    def validation(self, batch_size: int, max_rows: int) -> list:
        return []  # held-out pass@1 comes from the stage's [eval] tasks

    def batch_prompts(self, k: int) -> list[Prompt]:
        """Rollout batch k's prompts: a shuffle of the prompts per pass over them, from the seed."""
        n, per = len(self.prompts), self.cfg.prompts_per_step
        out = []
        for i in range(k * per, (k + 1) * per):
            order = np.random.default_rng([self.seed, i // n]).permutation(n)
            out.append(self.prompts[order[i % n]])
        return out

    def rollout(self, params, k: int) -> tuple[dict, dict]:
        """Sample and score rollout batch k with `params`: (arrays for the objective, host metrics)."""
        from tinylm.eval.harness import answers_match, extract_answer
        from tinylm.generate import Model, SamplingConfig, generate_ids

        cfg, g = self.cfg, self.cfg.num_generations
        prompts = self.batch_prompts(k)
        trainer = self.trainer
        # A bf16 run decodes in bf16 too (faster where its steps are; its objective recomputes the sampler's
        # log-probabilities in its own dtype below); any other keeps the exact float32 sampler.
        decode = "bfloat16" if trainer.dtype == "bfloat16" else "float32"
        lm = GroupedPrefill(Model(trainer.backend, trainer.shape, trainer.module.parallel.gather_all(params), decode),
                            g)
        seed = int(np.random.default_rng([self.seed, k, 7]).integers(2**31))
        sampling = SamplingConfig(max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                  stop_strings=sorted({s for p in prompts for s in p.stop_strings}), seed=seed)
        start = time.perf_counter()
        outs = generate_ids(lm, self.tok, [p.ids for p in prompts for _ in range(g)], sampling, self.stops,
                            self.pad)
        seconds = time.perf_counter() - start
        tokens, mask, old = pack_rollouts([p.ids for p in prompts for _ in range(g)], outs, self.prompt_len,
                                          self.time, self.pad)
        rewards, correct, lengths, truncated = [], [], [], []
        for r, out in enumerate(outs):
            p = prompts[r // g]
            cut = out.finish_reason == "length"
            if cut and cfg.mask_truncated_completions:
                mask[r] = False
            ok = answers_match(extract_answer(out.text), p.answer)
            correct.append(ok)
            rewards.append(float(ok) + cfg.format_weight * format_reward(out.text))
            lengths.append(len(out.sampled_logprobs))
            truncated.append(cut)
        rewards = np.asarray(rewards).reshape(-1, g)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "advantages": np.repeat(group_advantages(rewards, cfg.scale_rewards).reshape(-1, 1), self.time,
                                         axis=1).astype(np.float32),
                 "weights": token_weights(mask, cfg.loss_type, cfg.max_completion_length).astype(np.float32)}
        # The sampler's float32 log-probabilities match the objective's float32 forward to ~1e-6; a lower
        # compute dtype would put its rounding into every ratio, so there the objective's own forward gives them.
        batch["old_logprobs"] = old if trainer.dtype == "float32" else self.logprobs(params, batch)
        if cfg.beta:
            batch["ref_logprobs"] = self.logprobs(self.ref_params, batch)
        metrics = {"reward": float(rewards.mean()), "accuracy": float(np.mean(correct)),
                   "zero_std_groups": float(np.mean(rewards.std(axis=1) == 0)),
                   "completion_length": float(np.mean(lengths)), "truncated": float(np.mean(truncated)),
                   "rollout_tokens_per_s": float(sum(lengths) / max(seconds, 1e-9))}
        return batch, metrics

    def logprobs(self, params, batch: dict) -> np.ndarray:
        """Each completion token's log-probability under `params` (the current policy, or the reference), with
        no gradient, a few rows at a time (`logprob_rows`)."""
        inputs, targets = batch["inputs"], batch["targets"]
        per = logprob_rows(self.trainer.shape.vocab_size, inputs.shape[1])
        parts = [-self.trainer.module.token_losses(params, {"inputs": inputs[s:s + per], "targets": targets[s:s + per]})
                 for s in range(0, inputs.shape[0], per)]
        return np.concatenate(parts).astype(np.float32)

    def step_metrics(self, batch: dict, logp: np.ndarray) -> dict:
        """Clip fraction (tokens whose clipped ratio stops their gradient, as TRL counts them) and the k3 KL to
        the starting model, over the loss tokens, for the current weights' log-probabilities `logp`."""
        on = batch["weights"] > 0
        if not on.any():
            return {"clip_fraction": 0.0}
        ratio = np.exp(logp - batch["old_logprobs"])[on]
        adv = batch["advantages"][on]
        clipped = ((ratio < 1 - self.cfg.epsilon) & (adv < 0)) | ((ratio > 1 + self.cfg.clip_high) & (adv > 0))
        out = {"clip_fraction": float(clipped.mean())}
        if self.cfg.beta:
            delta = (batch["ref_logprobs"] - logp)[on].astype(np.float64)
            out["kl"] = float(np.mean(np.exp(delta) - delta - 1))
        return out

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        """This rank's share of the current rollout batch, its weights scaled like `SFTData`'s so the step's
        gradient is the normalised loss over all ranks and micro-batches."""
        if self.trainer is None:
            raise RuntimeError("RLData.attach(trainer) must be called before training")
        k = step // self.cfg.num_iterations
        if self._batch[0] != k:
            self._batch = (k, self.rollout(self.trainer.params, k))
        batch, metrics = self._batch[1]
        fresh = step % self.cfg.num_iterations == 0  # the weights are still those that sampled the batch
        logp = batch["old_logprobs"] if fresh else self.logprobs(self.trainer.params, batch)
        self._metrics = {step: {**metrics, **self.step_metrics(batch, logp)}}
        per_rank = self.rows // world
        mine = {k_: v[rank * per_rank:(rank + 1) * per_rank] for k_, v in batch.items()}
        mine["weights"] = mine["weights"] * np.float32(grad_accum * world)
        return [{k_: np.array_split(v, grad_accum)[i] for k_, v in mine.items()} for i in range(grad_accum)]

    def log_metrics(self, step: int) -> dict:
        """Host metrics of `step` (0-based) for the trainer's log row."""
        return self._metrics.get(step, {})
