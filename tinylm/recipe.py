"""A recipe: one TOML file, one dataclass per section. Each component is handed only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tinylm import config
from tinylm.post.classify import ClassifyConfig
from tinylm.post.coevolve import CoevolveConfig
from tinylm.data.config import DataConfig
from tinylm.post.dpo import DPOConfig
from tinylm.errors import UserError
from tinylm.model import ModelConfig
from tinylm.train.objectives import OBJECTIVES, DistillConfig
from tinylm.train.optim import OptimConfig
from tinylm.post.rl import GRPOConfig
from tinylm.train.schedule import ScheduleConfig
from tinylm.post.sft import SFTConfig


@dataclass
class TrainConfig:
    """The `[train]` section."""

    steps: int = 100
    """Optimizer steps (an SFT stage with `sft.epochs` set takes as many as its epochs need instead; see also
    `epochs` and `fit_to_data`)."""
    epochs: float = 0.0
    """Pretraining: passes over the prepared training tokens; when set, the steps are as many as those passes
    take, whatever `steps` says (and the repetition cap `data.mixture.max_epochs` is raised to it). 0: `steps`."""
    fit_to_data: bool = False
    """Pretraining: treat `steps` as a budget and take fewer when the data is too small to fill them within
    `data.mixture.max_epochs` passes, with a note, instead of stopping on the repetition cap."""
    batch_size: int = 8
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    seed: int = 0
    """Seeds initialization and data sampling: the same seed gives the same run."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16, float16, or auto: bf16 where the device settles it (CUDA with native bf16,
    MLX on a GPU; MLX on a CPU keeps float32), and on a CPU under PyTorch whichever of fp32 and bf16 ran a few
    timed training steps of this stage's model faster (bf16 must win by 5%; the timing is cached per machine,
    model and micro-batch). Parameters and optimizer state stay float32. The default stays float32 so that runs
    are exact and repeatable anywhere."""
    compile: Optional[bool] = None
    """Compile the step: mx.compile on MLX (gradient step and update), torch.compile on PyTorch (the gradient
    step). A stage's own `[stages.train] compile` applies to that stage alone. Unset: on for MLX (compiling costs
    it almost nothing); on PyTorch, compiled only where a few timed steps of this stage's model ran at least 5%
    faster compiled and the run's steps save more time than compiling took (cached like `dtype`'s timing)."""
    loss_chunk: int = 0
    """Tokens per chunk of the output head and its loss (every objective's, distillation's included): each
    chunk's logits are made, used and remade in the backward pass, so the (tokens, vocabulary) logits, a
    large-vocabulary model's biggest activation, never exist whole. Costs one more pass of the head's
    forward; the losses agree with unchunked ones to float rounding. 0: all tokens at once."""
    activation_checkpointing: bool = False
    """Keep only each transformer block's input for the backward pass and recompute the rest there: less
    memory for about one more forward pass of the blocks. Same losses and gradients."""
    log_every: int = 10
    """Steps between metric rows."""
    eval_every: int = 100
    """Steps between validation losses (and the last step); 0 turns validation off."""
    eval_rows: int = 32
    """Validation sequences per evaluation."""
    ckpt_every: int = 100
    """Steps between checkpoints (and the last step)."""
    keep_checkpoints: int = 3
    """Checkpoints kept; older ones are deleted."""
    keep_best: bool = False
    """Save a checkpoint at every validation that lowers the validation loss and keep it (beside the last
    `keep_checkpoints`) as the run's result: what `tinylm eval RUN` and the next stage use."""
    out: str = "runs/default"
    """Run directory (metrics.jsonl, checkpoints/); `tinylm train --out` overrides it."""
    init_from: str = ""
    """Start from this checkpoint's weights and shape (fresh optimizer): mid-training, fine-tuning, or
    continuing an imported model. Its vocabulary must cover the data's tokenizer."""
    bucket_mb: float = 25.0
    """Data parallelism: gradients are averaged across ranks in flat buckets of up to this many megabytes (MiB),
    one all-reduce each, filled in the order backward produces gradients and started as each fills (PyTorch);
    0: one all-reduce per tensor."""
    shard_optimizer: bool = False
    """Data parallelism: each parameter tensor is owned by one rank, which alone keeps its optimizer state and
    computes its update, then broadcasts it (ZeRO stage 1: parameters and gradients stay whole on every rank).
    Checkpoints hold the whole state, so a run resumes with any number of ranks, sharded or not."""
    shard_params: bool = False
    """Data parallelism on PyTorch: shard the parameters too (ZeRO stage 3, as FSDP does), with the optimizer
    state's owners. A rank keeps only its own parameters, their gradients and state; each tensor is broadcast
    by its owner when the forward pass reads it, and its gradient is reduced onto the owner. With
    `activation_checkpointing` a block's gathered weights exist only while it runs. Checkpoints hold whole
    tensors, as with `shard_optimizer`."""

    def __post_init__(self):
        config.at_least(self, 1, "steps batch_size grad_accum seq_len log_every ckpt_every eval_rows")
        config.at_least(self, 0, "eval_every keep_checkpoints seed loss_chunk bucket_mb epochs")
        config.one_of(self, "dtype", ("float32", "bfloat16", "float16", "auto"))

    def rows_per_rank(self) -> int:
        """Sequences each rank trains on per optimizer step."""
        return self.batch_size * self.grad_accum

    def total_tokens(self, world_size: int = 1) -> int:
        """Tokens the whole run trains on: what mixtures and repetition caps are sized for."""
        return self.steps * self.rows_per_rank() * world_size * self.seq_len


@dataclass
class EvalConfig:
    """The `[eval]` section: task evaluation during and at the end of training."""

    tasks: list[str] = field(default_factory=list)
    """Task names as `tinylm eval --tasks` takes them (e.g. arithmetic, word_problems, gsm8k:path); empty: none."""
    every: int = 0
    """Steps between task evaluations; 0 evaluates only after the last step."""
    limit: int = 50
    """Examples per task (0 for all)."""
    limits: dict[str, int] = field(default_factory=dict)
    """Examples for some tasks where they differ from `limit`, keyed by the task's name before any colon
    (`{ gsm8k = 200 }` for gsm8k:PATH; 0 for all)."""
    committee: list[str] = field(default_factory=list)
    """Earlier stages whose final models join this stage's in a soft committee (their class or next-token
    probabilities averaged), scored on the same tasks after the last step as `committee:<task>`."""
    at_start: bool = False
    """Also score the starting weights before the first step, logged as step 0: the validation loss and bits
    per byte (when `train.eval_every` is on) and the tasks. The base figure that continued pretraining,
    post-training or distillation of an imported model is measured against."""
    dtype: str = "float32"
    """What the weights compute in while they are scored: float32, bfloat16, or train (the stage's training
    dtype, so a run that `train.dtype = "auto"` puts in bf16 also decodes its answers in bf16, as its GRPO
    rollouts do). Committees are scored in float32."""
    batch_size: int = 16
    """Generations decoded together for the generative tasks (a larger batch reads the weights once for more
    rows; the cache holds batch x (prompt + max_tokens) positions)."""

    def __post_init__(self):
        config.at_least(self, 0, "every limit")
        config.at_least(self, 1, "batch_size")
        from tinylm.eval.tasks import task_key

        named = {task_key(t) for t in self.tasks}
        for key, n in self.limits.items():
            if key not in named:
                raise config.SettingError(f"limits.{key}", f"names no task in tasks (they are: "
                                          f"{', '.join(sorted(named)) or 'none'})")
            if n < 0:
                raise config.SettingError(f"limits.{key}", f"must be at least 0, got {n}")
        config.one_of(self, "dtype", ("float32", "bfloat16", "train"))


SECTIONS = ("model", "data", "train", "optim", "schedule", "eval", "sft", "distill", "grpo", "dpo", "coevolve",
            "classify")
"""The recipe sections a stage may override."""


@dataclass
class StageConfig:
    """One `[[stages]]` entry: a named step of the recipe with its own objective and section overrides.

    Each override table (`[stages.train]`, `[stages.optim]`, `[stages.sft]`, ...) is laid over the recipe's
    section of the same name; the result is checked like a recipe of its own. A stage starts from the final
    weights of the stage before it unless its `train.init_from` names a checkpoint.
    """

    name: str = ""
    """Stage name: its folder under the run directory and the name `--stage` takes."""
    objective: str = "lm"
    """`lm` (next-token pretraining and mid-training), `sft` (assistant tokens of packed conversations),
    `grpo` (RL with verifiable rewards, `[stages.grpo]`), `dpo` (preference pairs, `[stages.dpo]`), `mlm`
    (BERT's masked-language pretraining of a `model.causal = false` encoder) or `classify` (a classification
    head fine-tuned on `[stages.classify] task`).
    A `[stages.distill]` teacher adds logit distillation to `lm` or `sft`; `[stages.coevolve]` rounds make an
    `lm` stage score and select its own data with the model it trains."""
    start: str = ""
    """Where the stage's weights come from: empty, the final weights of the stage before it; the name of an
    earlier stage, that stage's final weights; `scratch`, fresh weights of the stage's `[model]` (seeded by
    `train.seed`). `train.init_from` overrides all three."""
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    coevolve: dict[str, Any] = field(default_factory=dict)
    classify: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"stage name {self.name!r} must be letters, digits, '-' or '_'")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"stage {self.name!r}: unknown objective {self.objective!r} "
                             f"(known: {', '.join(OBJECTIVES)})")


@dataclass
class CompareConfig:
    """One `[[compare]]` row of the run report: stage `a`'s final score on its first task against stage `b`'s."""

    name: str = ""
    """What the row compares (e.g. "pretrained vs from scratch, BERT-6, small set")."""
    a: str = ""
    """A stage name; `NAME+committee` takes the committee that stage's `eval.committee` formed."""
    b: str = ""
    """The stage (or `NAME+committee`) it is compared with."""


@dataclass
class Recipe:
    """A whole recipe file."""

    name: str = ""
    """A label for the run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Conversations for SFT stages (usually set per stage)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Logit distillation from a teacher (usually set per stage)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """RL with verifiable rewards for `grpo` stages."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference pairs for `dpo` stages."""
    coevolve: CoevolveConfig = field(default_factory=CoevolveConfig)
    """Data-model co-evolution rounds for `lm` (mid-training) stages."""
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    """The classification task of `classify` stages (usually set per stage)."""
    compare: list[CompareConfig] = field(default_factory=list)
    """Pairs of stages whose final classification scores the run report sets side by side."""
    stages: list[StageConfig] = field(default_factory=list)
    """The stages in order. Empty: the recipe is one pretraining stage that writes to the run directory itself."""
    source: str = ""
    """The file the recipe was read from (set by `load`)."""

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


@dataclass
class Stage:
    """A stage resolved against its recipe: what the trainer of that stage is handed."""

    name: str
    index: int
    objective: str
    recipe: Recipe
    """The recipe with the stage's overrides laid over it (and no stages of its own)."""
    out: Path
    """The stage's folder: metrics, checkpoints."""
    previous: Optional[Path]
    """The folder of the stage whose final weights it starts from: the one before it unless its `start`
    names another (None for the first and for a `start = "scratch"` stage)."""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_stages(recipe: Recipe, out: str | Path | None = None) -> list[Stage]:
    """Every stage of `recipe` resolved in order; a recipe without stages is one `lm` stage in `out` itself."""
    root = Path(out or recipe.train.out)
    if not recipe.stages:
        return [Stage("pretrain", 0, "lm", recipe, root, None)]
    base = config.to_dict(recipe)
    base.pop("stages")
    seen, resolved, previous = set(), [], None
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            raise UserError(f"{recipe.source}: stage {stage.name!r} appears twice")
        merged = _merge(base, {k: getattr(stage, k) for k in SECTIONS if getattr(stage, k)})
        stage_recipe = config.from_dict(Recipe, merged, f"{recipe.source} (stage {stage.name!r})")
        for name in stage_recipe.eval.committee:
            if name not in seen:
                raise UserError(f"{recipe.source}: stage {stage.name!r}: eval.committee names {name!r}, which is "
                                f"not a stage before it")
        start = previous
        if stage.start == "scratch":
            start = None
        elif stage.start:
            if stage.start not in seen:
                raise UserError(f"{recipe.source}: stage {stage.name!r} starts from {stage.start!r}, which is not "
                                f"a stage before it (or `scratch`)")
            start = root / stage.start
        seen.add(stage.name)
        resolved.append(Stage(stage.name, i, stage.objective, stage_recipe, root / stage.name, start))
        previous = root / stage.name
    names = {s.name for s in resolved}
    for row in recipe.compare:
        for side in (row.a, row.b):
            if side.removesuffix("+committee") not in names:
                raise UserError(f"{recipe.source}: compare {row.name!r} names {side!r}, which is not a stage")
    return resolved


def pick_stage(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise UserError(f"unknown stage {name!r} (this recipe has: {', '.join(s.name for s in stages)})")


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    recipe = config.load(Recipe, path, overrides)
    if not recipe.name:
        recipe.name = Path(path).stem
    recipe.source = str(path)
    resolve_stages(recipe)  # every stage's overrides checked now, not when the stage is reached
    return recipe
