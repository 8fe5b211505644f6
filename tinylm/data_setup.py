"""What the trainer needs from the data half: prepared shards (made or refreshed on demand) and mixture phases."""

from __future__ import annotations

from tinylm.data.config import DataConfig
from tinylm.data.mixture import resolve_phases
from tinylm.data.prepare import open_prepared as _open_prepared
from tinylm.data.sampler import Phase
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError


def open_prepared(data: DataConfig, progress: bool = False) -> ShardSet:
    """The recipe's prepared data; prepared first when missing or out of date (a no-op otherwise)."""
    if not data.dir:
        raise UserError("data.dir is not set: name the prepared data directory in the recipe")
    return _open_prepared(data, progress=progress)


def phases(data: DataConfig, shards: ShardSet, total_tokens: int, progress: bool = False) -> list[Phase]:
    return resolve_phases(data, shards, total_tokens, progress=progress)
