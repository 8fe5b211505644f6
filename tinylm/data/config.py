"""The `[data]` section of a recipe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the prepared token shards live (see `tinylm.data.shards` for the layout)."""

    dir: str = ""
    """Prepared data directory (manifest.json, tokenizer.json, per-source shards)."""
