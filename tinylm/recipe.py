"""A recipe: one TOML file, one dataclass per section. Each component is handed only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tinylm import config
from tinylm.data.config import DataConfig
from tinylm.model import ModelConfig
from tinylm.optim import OptimConfig
from tinylm.schedule import ScheduleConfig


@dataclass
class TrainConfig:
    """The `[train]` section."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    seed: int = 0
    """Seeds initialization and data sampling: the same seed gives the same run."""
    dtype: str = "float32"
    """Compute dtype: float32, or bfloat16 (parameters and optimizer state stay float32)."""
    compile: Optional[bool] = None
    """Compile the step: mx.compile on MLX, torch.compile on PyTorch (worth it for long GPU runs). Unset: the
    backend's choice, which is on for MLX (compiling costs it almost nothing) and off for PyTorch."""
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
    out: str = "runs/default"
    """Run directory (metrics.jsonl, checkpoints/); `tinylm train --out` overrides it."""
    init_from: str = ""
    """Start from this checkpoint's weights and shape (fresh optimizer): mid-training, fine-tuning, or
    continuing an imported model. Its vocabulary must cover the data's tokenizer."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

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


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    recipe = config.load(Recipe, path, overrides)
    if not recipe.name:
        recipe.name = Path(path).stem
    return recipe
