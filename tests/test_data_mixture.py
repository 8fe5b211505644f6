import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinylm.config import from_dict
from tinylm.cli.data import app
from tinylm.data.config import DataConfig
from tinylm.data.mixture import cap_weights, compute_mixture, resolve_phases, temperature_weights
from tinylm.data.prepare import prepare
from tinylm.data.sampler import MixtureSampler
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError

SOURCES = [
    {"name": "arith", "type": "synthetic", "generator": "arithmetic", "num_docs": 300},
    {"name": "units", "type": "synthetic", "generator": "units", "num_docs": 150},
    {"name": "stories", "type": "synthetic", "generator": "stories", "num_docs": 100},
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix") / "data"
    cfg = from_dict(DataConfig, {"dir": str(root), "workers": 1, "tokenizer": {"vocab_size": 400},
                                 "sources": SOURCES}, "t")
    return cfg, ShardSet(prepare(cfg, progress=False))


def with_mixture(cfg: DataConfig, mixture: dict) -> DataConfig:
    data = {"dir": cfg.dir, "workers": 1, "tokenizer": {"vocab_size": 400}, "sources": SOURCES, "mixture": mixture}
    return from_dict(DataConfig, data, "t")


def test_realized_token_shares_match_manual_weights(prepared):
    cfg, shards = prepared
    weights = {"arith": 0.5, "units": 0.3, "stories": 0.2}
    mix = with_mixture(cfg, {"method": "manual", "phases": [{"name": "p1", "weights": weights}]})
    phases = resolve_phases(mix, shards, total_tokens=50_000)
    assert phases[0].weights == pytest.approx(weights)
    sampler = MixtureSampler(shards, phases, seq_len=16, rows_per_step=8, seed=1)
    counts = Counter()
    steps = 1500
    for step in range(steps):
        counts.update(sampler.row_sources(step))
    for name, w in weights.items():
        assert abs(counts[name] / (steps * 8) - w) < 0.02


def test_temperature_and_phases(prepared):
    cfg, shards = prepared
    sizes = {n: shards.manifest["sources"][n]["train"]["tokens"] for n in shards.sources}
    mix = with_mixture(cfg, {"method": "temperature", "alpha": 0.5, "phases": [
        {"name": "pretrain"}, {"name": "anneal", "start_fraction": 0.8, "method": "manual",
                               "weights": {"arith": 1, "units": 1}}]})
    result = compute_mixture(mix, shards, total_tokens=20_000)
    first, second = result["phases"]
    expected = temperature_weights(sizes, 0.5)
    total = sum(expected.values())
    assert first["weights"] == pytest.approx({k: v / total for k, v in expected.items()})
    assert second["start_tokens"] == 16_000 and second["weights"]["stories"] == 0
    phases = resolve_phases(mix, shards, total_tokens=20_000)
    assert [p.name for p in phases] == ["pretrain", "anneal"] and "stories" not in phases[1].weights
    assert temperature_weights({"a": 100, "b": 1}, 0) == {"a": 1, "b": 1}


def test_max_epochs_cap_moves_weight_and_reports_epochs(prepared):
    cfg, shards = prepared
    sizes = {n: shards.manifest["sources"][n]["train"]["tokens"] for n in shards.sources}
    total = int(sum(sizes.values()) * 1.5)
    mix = with_mixture(cfg, {"method": "manual", "max_epochs": 2.0,
                             "phases": [{"weights": {"arith": 0.1, "units": 0.1, "stories": 0.8}}]})
    result = compute_mixture(mix, shards, total_tokens=total)
    phase = result["phases"][0]
    assert phase["epochs"]["stories"] == pytest.approx(2.0)
    assert all(e <= 2.0 + 1e-9 for e in result["epochs"].values())
    assert sum(phase["weights"].values()) == pytest.approx(1.0)
    assert phase["method_weights"]["stories"] == pytest.approx(0.8)
    with pytest.raises(UserError, match="repetition cap"):
        compute_mixture(mix, shards, total_tokens=sum(sizes.values()) * 3)


def test_cap_weights_water_fills():
    w = cap_weights({"a": 0.9, "b": 0.05, "c": 0.05}, {"a": 50, "b": 1000, "c": 1000}, 100, "p")
    assert w["a"] == pytest.approx(0.5) and w["b"] == pytest.approx(0.25) and w["c"] == pytest.approx(0.25)


def test_bad_weights(prepared):
    cfg, shards = prepared
    zero = with_mixture(cfg, {"method": "manual", "phases": [{"weights": {"arith": 0, "units": 0}}]})
    with pytest.raises(UserError, match="positive"):
        compute_mixture(zero, shards, 1000)
    unknown = with_mixture(cfg, {"method": "manual", "phases": [{"weights": {"nope": 1}}]})
    with pytest.raises(UserError, match="'nope'"):
        compute_mixture(unknown, shards, 1000)
    with pytest.raises(UserError, match="method"):
        compute_mixture(with_mixture(cfg, {"method": "magic"}), shards, 1000)


def recipe(tmp_path: Path, root: str, mixture: str) -> Path:
    sources = "".join(f'[[data.sources]]\nname = "{s["name"]}"\ntype = "synthetic"\ngenerator = "{s["generator"]}"\n'
                      f'num_docs = {s["num_docs"]}\n' for s in SOURCES)
    path = tmp_path / "r.toml"
    path.write_text(f'[data]\ndir = "{root}"\nworkers = 1\n[data.tokenizer]\nvocab_size = 400\n{sources}{mixture}')
    return path


def test_cli_mix_json_and_errors(prepared, tmp_path):
    cfg, shards = prepared
    runner = CliRunner()
    path = recipe(tmp_path, cfg.dir, '[data.mixture]\nmethod = "manual"\n[[data.mixture.phases]]\nname = "main"\n'
                                     'weights = { arith = 3, units = 1 }\n')
    result = runner.invoke(app, ["mix", str(path), "--json", "--tokens", "10000"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["weights"] == {"main": {"arith": 0.75, "units": 0.25, "stories": 0.0}}
    assert (shards.root / "mixture.json").is_file()
    table = runner.invoke(app, ["mix", str(path), "--tokens", "10000"])
    assert table.exit_code == 0 and "arith" in table.output
    bad = recipe(tmp_path, cfg.dir, '[data.mixture]\nmethod = "manual"\n[[data.mixture.phases]]\n'
                                    'weights = { arith = 0, units = 0 }\n')
    result = runner.invoke(app, ["mix", str(bad), "--json", "--tokens", "10000"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "positive" in result.output


def test_computed_weights_spill_onto_zero_weight_sources_at_the_cap():
    w = cap_weights({"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 40, "b": 90, "c": 30}, 100, "p", spill=True)
    assert w["a"] == pytest.approx(0.4) and w["b"] == pytest.approx(0.45) and w["c"] == pytest.approx(0.15)
    with pytest.raises(UserError, match="repetition cap"):
        cap_weights({"a": 1.0, "b": 0.0}, {"a": 40, "b": 90}, 100, "p", spill=False)
    with pytest.raises(UserError, match="repetition cap"):
        cap_weights({"a": 1.0, "b": 0.0}, {"a": 40, "b": 50}, 100, "p", spill=True)
