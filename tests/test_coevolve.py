"""Data-model co-evolution: each round scores candidates with the current weights and reports what it kept."""

import json

import numpy as np
import pytest

from conftest import data_toml
from tinylm.cli import main

pytest.importorskip("torch")


def _recipe(tmp_path, data_dir, rounds=2, steps=4, ckpt_every=2):
    path = tmp_path / "co.toml"
    path.write_text(f"""
[model]
preset = "micro"
{data_toml(data_dir)}
[train]
steps = 2
batch_size = 2
seq_len = 32
log_every = 1
eval_every = 0
ckpt_every = 2
[[stages]]
name = "pretrain"
[[stages]]
name = "mid"
[stages.train]
steps = {steps}
ckpt_every = {ckpt_every}
[stages.coevolve]
rounds = {rounds}
candidates_per_source = 5
probe_rows = 1
seq_len = 16
""")
    return path


def test_rounds_rescore_candidates_and_report_what_they_kept(tmp_path, prepared):
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, prepared)), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "mid" / "coevolution.json").read_text())["rounds"]
    assert [r["round"] for r in report] == [1, 2] and [r["step"] for r in report] == [0, 2]
    rows = {r["step"]: r for r in map(json.loads, (out / "mid" / "metrics.jsonl").read_text().splitlines())}
    for r in report:
        assert set(r["kept"]) == {"arithmetic", "stories"}
        assert all(0 <= r["kept"][g] <= r["candidates"][g] == 5 for g in r["kept"])
        assert abs(sum(r["weights"].values()) - 1.0) < 1e-5 and sum(r["kept"].values()) > 0
        # The round's first log row carries the same counts.
        assert {g: rows[r["step"] + 1][f"kept_{g}"] for g in r["kept"]} == r["kept"]
    assert np.isfinite([rows[s]["loss"] for s in (1, 2, 3, 4)]).all()


def test_rounds_must_fall_on_checkpoints(tmp_path, prepared, capsys):
    recipe = _recipe(tmp_path, prepared, rounds=3, steps=4)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "coevolve.rounds" in err
