"""recipes/tlm.toml run end to end in a tiny version: synthetic pretraining text and the synthetic task in place
of tiny Shakespeare and its speakers (the stand-in when the shared data is absent), a few steps per stage."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tinylm.cli import main
from tinylm.recipe import load

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tlm.toml"


def tiny_recipe(tmp_path) -> Path:
    text = RECIPE.read_text()
    source = 'type = "text"\npath = "../shared/data/tinyshakespeare.txt"\nchunk_chars = 600\n'
    assert source in text
    text = text.replace(source, 'type = "synthetic"\ngenerator = "stories"\nnum_docs = 200\n')
    text = text.replace('held_out = "shakespeare-speakers"\n', "").replace("shakespeare-speakers", "synthetic")
    text = text.replace("max_docs = 240", "max_docs = 60").replace("runs/tlm", str(tmp_path / "runs"))
    for key, value in (("steps", 2), ("seq_len", 32), ("batch_size", 4), ("eval_every", 2), ("ckpt_every", 2),
                       ("eval_rows", 4), ("log_every", 1), ("vocab_size", 512)):
        text = re.sub(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.M)
    path = tmp_path / "tlm.toml"
    path.write_text(text)
    return path


def test_shipped_recipe_validates():
    recipe = load(RECIPE)
    objectives = [s.objective for s in recipe.stages]
    assert objectives.count("mlm") == 8 and objectives.count("classify") == 10 and len(recipe.compare) == 8


@pytest.mark.slow
def test_tiny_tlm_recipe_runs_to_its_comparisons(tmp_path):
    backend = "mlx" if importlib.util.find_spec("mlx") else "torch"  # MLX: several times faster on 2 cores
    path = tiny_recipe(tmp_path)
    assert main(["run", str(path), "--backend", backend, "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    report = (tmp_path / "runs" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| committee of 3") or ln.startswith("| pretrained")]
    assert len(rows) == 8 and not any("n/a" in r for r in rows)
    final = json.loads((tmp_path / "runs" / "eval.json").read_text())
    assert 0.0 <= final["synthetic"]["accuracy"] <= 1.0
