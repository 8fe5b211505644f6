"""Every shipped recipe loads, validates and describes its model."""

import json
from pathlib import Path

import pytest

from tinylm.cli import main
from tinylm.presets import PUBLISHED_PARAMS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_reports(path, capsys):
    assert main(["info", str(path), "--json", "--set", "train.steps=20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recipe"]["train"]["steps"] == 20
    assert report["params"] > 0 and report["flops_per_token"] > 0
    preset = report["recipe"]["model"]["preset"]
    if preset in PUBLISHED_PARAMS and report["recipe"]["model"]["vocab_size"] is None:
        published, unit = PUBLISHED_PARAMS[preset]
        assert abs(report["params"] - published) <= max(1e-3 * published, unit / 2)


def test_any_recipe_takes_any_preset(capsys):
    path = next(p for p in RECIPES if p.stem == "quickstart")
    assert main(["info", str(path), "--json", "--set", "model.preset=mobilellm-125m"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["n_layers"] == 30
