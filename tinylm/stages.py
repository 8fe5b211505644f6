"""Running one stage of a recipe: its starting weights, its data, its objective, then the one training loop.

`tinylm.recipe.resolve_stages` says what each stage is; this module hands a stage's trainer what it needs:
the previous stage's final weights (or `train.init_from`), its feed (the pretraining data, the packed
conversations, RL rollouts or preference pairs), the objective, and a teacher when the stage distills.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from tinylm import model

from tinylm.train import checkpoint

from tinylm.train import objectives
from tinylm.errors import UserError
from tinylm.train.objectives import DistillConfig
from tinylm.recipe import Stage
from tinylm.post.classify import ClassifyData
from tinylm.post.coevolve import CoevolveData
from tinylm.post.dpo import DPOData
from tinylm.post.rl import RLData
from tinylm.post.sft import SFTData


CARRIED_META = ("special_tokens", "add_bos", "hf_tokenizer_config", "imported_from")
"""What a checkpoint says about its tokenizer and origin, which every later stage's checkpoints keep: the names
of its special tokens, whether prompts start with BOS, the original tokenizer settings and chat template (which
chat, evaluation, SFT and export use), and where imported weights came from."""

LONG_CONTEXT_FIELDS = ("rope_theta", "max_seq_len")
"""Model settings a later stage may change on the weights it starts from (long-context fine-tuning)."""


def starting_weights(stage: Stage):
    """The checkpoint a stage starts from: `train.init_from`, else the previous stage's result (its best
    checkpoint when it keeps one, else its newest), with the
    stage's own RoPE base and maximum length when it sets them."""
    init_from = stage.recipe.train.init_from
    if init_from:
        init = checkpoint.load(init_from, with_optimizer=False)
    elif stage.previous is None:
        return None
    else:
        found = checkpoint.result(stage.previous)
        if found is None:
            raise UserError(f"stage {stage.name!r} starts from the weights of {stage.previous}, which holds no "
                            f"checkpoint yet: run the stage before it first (or set train.init_from)")
        init = checkpoint.load(found, with_optimizer=False)
    changes = {k: getattr(stage.recipe.model, k) for k in LONG_CONTEXT_FIELDS if getattr(stage.recipe.model, k)}
    init.shape = dataclasses.replace(init.shape, **changes)
    return init


def _vocabulary(tokenizer_path) -> dict:
    return json.loads(Path(tokenizer_path).read_text())["model"]["vocab"]


class Teacher:
    """A frozen model whose log-probabilities at temperature T the student learns to match."""

    def __init__(self, cfg: DistillConfig, backend, student_shape: model.ModelShape, student_tokenizer):
        ckpt = checkpoint.load(cfg.teacher, with_optimizer=False)
        if ckpt.tokenizer_path is None or student_tokenizer is None or \
                _vocabulary(ckpt.tokenizer_path) != _vocabulary(student_tokenizer) or \
                ckpt.shape.vocab_size != student_shape.vocab_size:
            raise UserError(f"teacher {ckpt.path} and the student (tokenizer {student_tokenizer}) use different "
                            f"tokenizers; logit distillation needs the same vocabulary")
        self.path = ckpt.path
        self.shape = ckpt.shape
        self.params = backend.from_numpy(ckpt.params)
        self.memory_mb = sum(v.nbytes for v in ckpt.params.values()) / 2**20
        ops = backend.ops
        temperature, top_k = cfg.temperature, cfg.top_k

        def logprobs(params, batch):
            logits = model.forward(ops, params, batch["inputs"], ckpt.shape, mask=batch.get("mask", "causal"),
                                   positions=batch.get("positions"))
            scaled = ops.log_softmax(logits / temperature)
            if not top_k:
                return {"teacher_logprobs": scaled}
            values, ids = ops.top_k(scaled, top_k)
            return {"teacher_logprobs": ops.log_softmax(values), "teacher_ids": ids}

        self._logprobs = backend.pure_step(logprobs)

    def annotate(self, batch: dict) -> dict:
        return self._logprobs(self.params, batch)


class WeightedRows:
    """Pretraining rows in the weighted form the distillation objective reads: every token weighs the same."""

    def __init__(self, data):
        self.data = data

    def __getattr__(self, name):
        return getattr(self.data, name)

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        out = []
        for rows in self.data.micro_batches(step, rank, world, grad_accum):
            weight = np.float32(1.0 / (rows.shape[0] * (rows.shape[1] - 1)))
            out.append({"inputs": rows[:, :-1], "targets": rows[:, 1:],
                        "weights": np.full((rows.shape[0], rows.shape[1] - 1), weight, np.float32)})
        return out


class MaskedRows:
    """Pretraining rows masked as BERT does for the `mlm` objective, each micro-batch keyed by (seed, step,
    its place in the step), so that a resumed run masks every step exactly as the first run did. Validation
    masks the held-out rows once, the same way at every evaluation, and scores the selected positions."""

    VALIDATION = 1 << 20
    """The `part` of the validation masks: apart from every (rank, micro-batch) of a training step."""

    def __init__(self, data, seed: int):
        from tinylm.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, mask_id

        self.data, self.seed = data, seed
        tok = load_tokenizer(data.tokenizer_path)
        self.mask_id = mask_id(tok, str(data.tokenizer_path))
        self.special = [i for i in (tok.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None]

    def __getattr__(self, name):
        return getattr(self.data, name)

    def _mask(self, rows, step: int, part: int) -> dict:
        return objectives.mlm_batch(rows[:, :-1], self.data.vocab_size, self.mask_id, self.special, self.seed,
                                    step, part=part)

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[dict]:
        return [self._mask(rows, step, rank * grad_accum + i)
                for i, rows in enumerate(self.data.micro_batches(step, rank, world, grad_accum))]

    def validation(self, batch_size: int, max_rows: int) -> list[tuple[dict, np.ndarray]]:
        out = []
        for i, (rows, _) in enumerate(self.data.validation(batch_size, max_rows)):
            batch = self._mask(rows, i, self.VALIDATION)
            out.append((batch, batch["weights"] > 0))
        return out


def _classify_start(init, data: ClassifyData, seed: int):
    """The starting checkpoint with a classification head for the task's labels: a fresh seeded head, unless
    it holds one for these very labels already."""
    if init.shape.num_labels == len(data.labels) and init.meta.get("labels") == data.labels:
        return init
    shape = dataclasses.replace(init.shape, num_labels=len(data.labels))
    rng = np.random.default_rng([seed, 1])
    head = (rng.standard_normal((len(data.labels), shape.dim), dtype=np.float32) * shape.init_std)
    init.params = {**{k: v for k, v in init.params.items() if k != "classifier.weight"},
                   "classifier.weight": head.astype(np.float32)}
    init.shape = shape
    return init


def _classify_feed(stage: Stage, init, backend, meta: dict):
    """A classify stage's rows, its recipe (no validation loss; its score is the `[eval]` tasks') and the
    checkpoint it starts from (None: from scratch, the recipe's model with a head for the task's labels)."""
    from tinylm.data.prepare import open_prepared

    recipe, cfg = stage.recipe, stage.recipe.train
    if init is not None:
        if init.tokenizer_path is None:
            raise UserError(f"{init.path} has no tokenizer.json, which a classify stage needs")
        tokenizer, causal = init.tokenizer_path, init.shape.causal
    else:
        if not recipe.data.dir:
            raise UserError(f"stage {stage.name!r} classifies from scratch: name the prepared data whose tokenizer "
                            f"it uses in data.dir (or start from a checkpoint)")
        tokenizer, causal = open_prepared(recipe.data).tokenizer_path, recipe.model.causal
        if causal is None:
            causal = model.resolve(recipe.model).causal
    data = ClassifyData(recipe.classify, tokenizer, cfg.seq_len, cfg.rows_per_rank() * backend.world_size,
                        cfg.seed, causal)
    meta.update(labels=data.labels, classify_task=recipe.classify.task)
    if init is not None:
        init = _classify_start(init, data, cfg.seed)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(cfg, eval_every=0),
                                 model=dataclasses.replace(recipe.model, num_labels=len(data.labels)))
    return data, recipe, init


def build_trainer(stage: Stage, backend, resume: bool = False, allow_data_change: bool = False, reporter=None):
    """The trainer of one stage, with its weights, data, objective and (when it distills) its teacher."""
    from tinylm.train.trainer import PretrainData, Trainer

    recipe = stage.recipe
    init = starting_weights(stage)
    meta = {"stage": stage.name, "chat": bool(init and init.meta.get("chat"))}
    meta.update((k, init.meta[k]) for k in CARRIED_META if init is not None and k in init.meta)
    if stage.objective in ("sft", "grpo", "dpo"):
        if init is None:
            raise UserError(f"stage {stage.name!r} fine-tunes, but has no weights to start from: put a pretraining "
                            f"stage before it or set train.init_from")
        if init.tokenizer_path is None:
            raise UserError(f"{init.path} has no tokenizer.json, which a {stage.objective} stage needs")
    if stage.objective == "grpo":
        data, recipe = _grpo_data(recipe, init, backend)
        cfg = recipe.grpo
        objective = objectives.grpo(cfg.epsilon, cfg.clip_high, cfg.beta)
    elif stage.objective == "dpo":
        cfg = recipe.train
        data = DPOData(recipe.dpo, init, cfg.seq_len, cfg.steps, cfg.seed)
        if data.truncated and reporter is not None:
            reporter.say(f"stage {stage.name}: {data.truncated} responses are longer than train.seq_len and were cut")
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(cfg, steps=data.steps, eval_every=0))
        objective = objectives.dpo(recipe.dpo.beta)
    elif stage.objective == "classify":
        data, recipe, init = _classify_feed(stage, init, backend, meta)
        objective = objectives.classify
    elif stage.objective == "sft":
        cfg = recipe.train
        data = SFTData(recipe.sft, init.tokenizer_path, cfg.seq_len, cfg.rows_per_rank() * backend.world_size,
                       cfg.steps, cfg.seed, init.meta)
        if data.truncated and reporter is not None:
            reporter.say(f"stage {stage.name}: {data.truncated} conversations are longer than train.seq_len + 1 "
                         f"and were cut")
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(cfg, steps=data.steps))
        objective, meta["chat"] = objectives.sft, True
    else:
        data = PretrainData(recipe, backend, bool(reporter and reporter.enabled))
        objective = objectives.lm
        if stage.objective == "mlm":
            shape = init.shape if init is not None else model.resolve(recipe.model, vocab_size=data.vocab_size)
            objectives.check_mlm(shape)  # a causal model is refused before any data is read
            data, objective = MaskedRows(data, recipe.train.seed), objectives.mlm
        if recipe.coevolve.rounds:
            data = CoevolveData(recipe.coevolve, data, recipe, stage.out)
    if recipe.coevolve.rounds and stage.objective != "lm":
        raise UserError(f"stage {stage.name!r}: coevolve.rounds applies to lm (mid-training) stages")
    if recipe.coevolve.rounds and recipe.train.shard_params:
        raise UserError(f"stage {stage.name!r}: coevolve.rounds scores samples with whole gradients, which "
                        "train.shard_params leaves with their owners; use train.shard_optimizer")
    annotate = None
    if recipe.distill.teacher and stage.objective not in ("lm", "sft"):
        raise UserError(f"stage {stage.name!r}: distill.teacher applies to lm and sft stages, not {stage.objective}")
    if recipe.distill.teacher:
        shape = init.shape if init is not None else model.resolve(recipe.model, vocab_size=data.vocab_size)
        teacher = Teacher(recipe.distill, backend, shape, data.tokenizer_path)
        if reporter is not None:
            reporter.say(f"teacher {teacher.path}: {model.count_params(teacher.shape):,} parameters, "
                         f"{teacher.memory_mb:.1f} MB of weights held for inference")
        objective, annotate = objectives.distill(recipe.distill), teacher.annotate
        if stage.objective != "sft":
            data = WeightedRows(data)
        meta["teacher"] = str(teacher.path)
    trainer = Trainer(recipe, backend, out=stage.out, resume=resume, allow_data_change=allow_data_change,
                      reporter=reporter, data=data, init=init, objective=objective, annotate=annotate, meta=meta,
                      committee=[stage.out.parent / name for name in recipe.eval.committee])
    if hasattr(data, "attach"):
        data.attach(trainer)  # the feeds that sample or score with the weights being trained
    return trainer


def _grpo_data(recipe, init, backend):
    """An RL stage's feed, and its recipe with checkpoints only at rollout-batch boundaries (exact resume) and
    no validation loss (its held-out measure is pass@1 on the `[eval]` tasks)."""
    cfg, train = recipe.grpo, recipe.train
    mu = cfg.num_iterations
    for name in ("steps", "ckpt_every"):
        if getattr(train, name) % mu:
            raise UserError(f"train.{name} ({getattr(train, name)}) must be a multiple of grpo.num_iterations "
                            f"({mu}): checkpoints fall on rollout-batch boundaries so that a resumed run samples "
                            f"the same completions")
    ref = backend.from_numpy(init.params) if cfg.beta else None
    data = RLData(cfg, init, train, backend.world_size, ref)
    return data, dataclasses.replace(recipe, train=dataclasses.replace(train, eval_every=0))
