import os
from pathlib import Path

import numpy as np
import pytest

# fp32 reference math on CPU: keep thread counts fixed so runs are bit-for-bit repeatable.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_prepared(root: Path, vocab_size: int = 512, docs: int = 120, seed: int = 0, sources=("alpha", "beta")):
    """A small prepared data directory of random documents (BOS first), without a tokenizer."""
    from tinylm.data.shards import ShardWriter, atomic_write_json, token_dtype

    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    manifest = {"vocab_size": vocab_size, "dtype": dtype.name, "bos_id": 0, "eos_id": 1,
                "fingerprint": f"random-{seed}-{docs}", "tokenizer": "tokenizer.json", "sources": {}}
    for s_i, name in enumerate(sources):
        manifest["sources"][name] = {}
        for split, n in (("train", docs), ("val", max(4, docs // 10))):
            w = ShardWriter(root / name, split, dtype)
            for _ in range(n):
                length = int(rng.integers(20, 200))
                # Each source repeats a small pattern so that a model can learn something.
                body = (np.arange(length) * (s_i + 3) + rng.integers(0, 7)) % (vocab_size - 2) + 2
                w.add(np.concatenate([[0], body]))
            d, t = w.close()
            manifest["sources"][name][split] = {"docs": d, "tokens": t, "bytes": t * 3}
    np.save(root / "token_bytes.npy", np.full(vocab_size, 3, dtype=np.int32))
    atomic_write_json(root / "manifest.json", manifest)
    return root


@pytest.fixture
def prepared(tmp_path):
    return make_prepared(tmp_path / "data")
