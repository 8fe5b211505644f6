import json
import random

import numpy as np
import pytest

pytest.importorskip("torch")

from tinylm.config import from_dict
from tinylm.data.config import DataConfig
from tinylm.data.influence import checkpoint_steps
from tinylm.data.mixture import compute_mixture
from tinylm.data.prepare import prepare
from tinylm.data.regmix import dirichlet_mixtures, fit_ridge, predict
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError

PROXY = {"dim": 32, "layers": 1, "heads": 2, "seq_len": 48, "batch_size": 8}


def base(tmp_dir, mixture):
    return from_dict(DataConfig, {
        "dir": str(tmp_dir / "prepared"), "workers": 1, "val_fraction": 0.1, "tokenizer": {"vocab_size": 320},
        "sources": [{"name": "arith", "type": "synthetic", "generator": "arithmetic", "num_docs": 200},
                    {"name": "noise", "type": "jsonl", "path": str(tmp_dir / "noise.jsonl"), "quality": False}],
        "mixture": mixture}, "test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("influence")
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789+=#"
    with open(tmp / "noise.jsonl", "w") as f:
        for _ in range(200):
            words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(40))
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    shards = ShardSet(prepare(base(tmp, {}), progress=False))
    return tmp, shards


def test_influence_prefers_the_source_that_matches_the_probe(corpus):
    tmp, shards = corpus
    cfg = base(tmp, {"method": "influence", "probes": {"math": ["arith"]},
                     "influence": {**PROXY, "steps": 12, "checkpoints": 3, "samples_per_source": 8,
                                   "probe_samples": 8}})
    result = compute_mixture(cfg, shards, total_tokens=5_000)
    phase = result["phases"][0]
    assert phase["weights"]["arith"] > phase["weights"]["noise"]
    report = phase["details"]
    assert report["rho"]["arith"] > report["rho"]["noise"]
    assert report["checkpoints"] == [4, 8, 12]
    assert report["checkpoint_weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert set(report["per_capability"]) == {"math"} and report["samples"] == {"arith": 8, "noise": 8}
    again = compute_mixture(cfg, shards, total_tokens=5_000)
    assert again["phases"][0]["weights"] == phase["weights"]


def test_regmix_prefers_the_source_that_matches_the_probe(corpus):
    tmp, shards = corpus
    cfg = base(tmp, {"method": "regmix", "probes": {"math": ["arith"]},
                     "regmix": {**PROXY, "proxies": 6, "steps": 10, "candidates": 200, "top_k": 5}})
    phase = compute_mixture(cfg, shards, total_tokens=5_000)["phases"][0]
    assert phase["weights"]["arith"] > phase["weights"]["noise"]
    assert len(phase["details"]["proxy_probe_loss"]) == 6
    assert phase["details"]["coefficients"]["arith"] < phase["details"]["coefficients"]["noise"]


def test_unknown_probe_source(corpus):
    tmp, shards = corpus
    cfg = base(tmp, {"method": "influence", "probes": {"math": ["nope"]}})
    with pytest.raises(UserError, match="'nope'"):
        compute_mixture(cfg, shards, total_tokens=5_000)


def test_helpers():
    assert checkpoint_steps(60, 3) == [20, 40, 60]
    with pytest.raises(UserError):
        checkpoint_steps(2, 3)
    rng = np.random.default_rng(0)
    mixes = dirichlet_mixtures(np.array([0.5, 0.3, 0.2]), 1.0, 50, rng)
    assert np.allclose(mixes.sum(axis=1), 1)
    y = 2.0 + mixes @ np.array([1.0, -1.0, 0.5])
    assert np.allclose(predict(fit_ridge(mixes, y, l2=1e-9), mixes), y, atol=1e-4)
