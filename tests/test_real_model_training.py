"""The shipped recipes that continue pretraining the imported SmolLM2-135M-Instruct and distill it validate."""

from pathlib import Path

import pytest

from tinylm.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("smollm2-shakespeare", "smollm2-distill")


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_validates(name):
    assert main(["info", str(REPO / "recipes" / f"{name}.toml")]) == 0
