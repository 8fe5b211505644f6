"""What the trainer needs from the data half: the prepared shards and the mixture phases."""

from __future__ import annotations

from tinylm.data.config import DataConfig
from tinylm.data.sampler import Phase
from tinylm.data.shards import MANIFEST, ShardSet
from tinylm.errors import UserError


def open_prepared(data: DataConfig) -> ShardSet:
    if not data.dir:
        raise UserError("data.dir is not set: name the prepared data directory in the recipe")
    return ShardSet(data.dir)


def phases(data: DataConfig, shards: ShardSet, total_tokens: int) -> list[Phase]:
    """One phase, every source weighted by its token count (until mixtures are configured)."""
    weights = {name: float(shards.split(name, "train").num_tokens) for name in shards.sources}
    if not any(weights.values()):
        raise UserError(f"{shards.root / MANIFEST}: no source has training tokens")
    return [Phase("pretrain", 0, weights)]
