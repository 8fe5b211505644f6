"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinylm import config


@dataclass
class ScheduleConfig:
    """The `[schedule]` section."""

    name: str = "wsd"
    """"wsd" (warmup, stable, decay), "cosine", "linear" or "constant"."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    warmup_frac: float = 0.0
    """Warmup as a fraction of train.steps; the larger of the two warmups applies."""
    decay_frac: float = 0.2
    """WSD: the final fraction of training spent decaying (MiniCPM found ~10% enough)."""
    decay_shape: str = "linear"
    """WSD decay curve: "linear", "cosine" or "1-sqrt"."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of the peak learning rate."""

    def __post_init__(self):
        config.one_of(self, "name", ("wsd", "cosine", "linear", "constant"))
        config.one_of(self, "decay_shape", ("linear", "cosine", "1-sqrt"))
        config.at_least(self, 0, "warmup_steps")
        config.fraction(self, "warmup_frac decay_frac min_lr_ratio")


def _decay(shape: str, progress: float) -> float:
    """1 at progress 0 falling to 0 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


def lr_at(cfg: ScheduleConfig, peak_lr: float, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    warmup = max(cfg.warmup_steps, int(round(cfg.warmup_frac * total_steps)))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "wsd":
        decay_steps = max(1, int(round(cfg.decay_frac * total_steps)))
        start = total_steps - decay_steps
        if step < start:
            return peak_lr
        progress, shape = (step - start + 1) / decay_steps, cfg.decay_shape
    else:
        progress = (step - warmup + 1) / max(1, total_steps - warmup)
        shape = cfg.name
    return peak_lr * (floor + (1.0 - floor) * _decay(shape, progress))
