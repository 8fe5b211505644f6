"""Tiny models, tokenizers and checkpoints for the generation, evaluation and interop tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tinylm.train import checkpoint
from tinylm.data.tokenizer import save_tokenizer, train_tokenizer
from tinylm.model import ModelShape, init_params

SENTENCES = [
    "The cat sat on the mat and looked at the dog.",
    "Question: What is 12 plus 7?\nAnswer: 19\n#### 19",
    "A small model learns to count: one, two, three, four, five.",
    "The sun rises in the east and sets in the west every day.",
    "Birds can fly, fish can swim, and people can walk.",
] * 20

SHAPE = ModelShape(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300,
                   max_seq_len=256, init_std=0.1)


def tokenizer_file(directory: Path) -> Path:
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(train_tokenizer(SENTENCES, vocab_size=300, min_frequency=2), path)
    return path


def make_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A freshly initialized tiny model saved as a run directory; returns the step directory."""
    shape = dataclasses.replace(SHAPE, **overrides)
    params = init_params(shape, seed)
    tok = tokenizer_file(Path(directory).parent / "tok")
    return checkpoint.save(directory, 0, params, None, {"model": shape.to_dict()}, tokenizer=tok)
