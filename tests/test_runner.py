"""`tinylm run`: stages in order, finished ones skipped, changed ones re-run, a report; bad input."""

import json

import pytest

from tinylm.cli import main

from test_stages import _checksums, _one_error_line, _recipe

pytest.importorskip("torch")


def _run(recipe, out, *extra):
    return main(["run", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", *extra])


def _stage(out, name):
    return json.loads((out / name / "stage.json").read_text())


def test_run_skips_finished_stages_and_reruns_changed_ones(tmp_path, prepared):
    recipe = _recipe(tmp_path, prepared)
    text = recipe.read_text().replace("[train]\n", "[eval]\ntasks = [\"comparison\"]\nlimit = 4\n[train]\n", 1)
    recipe.write_text(text)
    out = tmp_path / "run"
    assert _run(recipe, out) == 0
    assert _stage(out, "pretrain")["done"] and _stage(out, "sft")["done"]
    report = (out / "report.md").read_text()
    assert "Stage `pretrain`" in report and "Stage `sft`" in report
    assert (out / "pretrain-loss.png").stat().st_size > 1000 and (out / "sft-lr.png").is_file()
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"comparison"} and 0.0 <= results["comparison"]["exact_match"] <= 1.0
    # Nothing changed: both stages are skipped and nothing they wrote moves.
    before = _checksums(out / "pretrain"), _checksums(out / "sft")
    assert _run(recipe, out) == 0
    assert (_checksums(out / "pretrain"), _checksums(out / "sft")) == before
    # A changed SFT setting re-runs SFT alone; its earlier outputs are kept aside, not deleted.
    assert _run(recipe, out, "--set", "stages.sft.optim.lr=2e-3") == 0
    assert _checksums(out / "pretrain") == before[0]
    assert _stage(out, "sft")["fingerprint"] != json.loads(
        next((out / ".replaced").glob("sft-*/stage.json")).read_text())["fingerprint"]
    # --from re-runs a stage and every one after it.
    assert _run(recipe, out, "--set", "stages.sft.optim.lr=2e-3", "--from", "pretrain") == 0
    assert len(list((out / ".replaced").glob("pretrain-*"))) == 1


def test_run_refuses_bad_input_without_touching_the_run(tmp_path, prepared, capsys):
    recipe = _recipe(tmp_path, prepared)
    out = tmp_path / "run"
    assert _run(recipe, out, "--only", "pretrain") == 0
    before = _checksums(out)
    capsys.readouterr()
    assert _run(recipe, out, "--only", "rl") == 2
    assert "unknown stage 'rl'" in _one_error_line(capsys)
    other = tmp_path / "other.toml"
    other.write_text(recipe.read_text())
    assert _run(other, out) == 2
    assert "holds a run of recipe 'stages'" in _one_error_line(capsys)
    alone = tmp_path / "alone.toml"
    alone.write_text(recipe.read_text().replace('[[stages]]\nname = "pretrain"\n', ""))
    assert _run(alone, tmp_path / "x") == 2
    assert "no weights to start from" in _one_error_line(capsys)
    assert _checksums(out) == before
