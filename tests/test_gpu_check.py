"""`make gpu-check` on a CPU: its dry run goes through every part at toy sizes and writes the one JSON file."""

import json
from pathlib import Path

import pytest

from tinylm.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_without_the_recipe_or_the_model_the_sft_part_skips_and_says_which(tmp_path):
    got = gpu_check._sft(True, 10.0, tmp_path)
    assert got["status"] == "skipped" and gpu_check.RECIPE in got["why"]
    (tmp_path / gpu_check.RECIPE).parent.mkdir(parents=True)
    (tmp_path / gpu_check.RECIPE).write_text("")
    got = gpu_check._sft(True, 10.0, tmp_path)
    assert got["status"] == "skipped" and gpu_check.MODEL in got["why"]


def test_a_spent_budget_skips_every_part_and_still_writes_the_file(tmp_path):
    out = tmp_path / "check.json"
    report = gpu_check.run(out, dry_run=True, budget=0.0, root=tmp_path, echo=lambda line: None)
    assert json.loads(out.read_text()) == report
    assert list(report["parts"]) == ["tests", "bench", "sft", "grpo"]
    assert all(p["status"] == "skipped" for p in report["parts"].values())
    assert "cpu" in report["machine"]


def test_without_a_gpu_the_real_check_refuses_with_exit_2(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    assert gpu_check.main(["--out", "unused.json"]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow  # three fresh processes (pytest collecting the suite, a training row, a GRPO step)
def test_the_dry_run_goes_through_every_part(tmp_path):
    out = tmp_path / "check.json"
    report = gpu_check.run(out, dry_run=True, root=ROOT, echo=lambda line: None)
    parts = json.loads(out.read_text())["parts"]
    assert parts["tests"]["status"] == "ok" and "test" in parts["tests"]["summary"]
    (row,) = parts["bench"]["rows"]
    assert row["dtype"] == "bfloat16" and row["tokens_per_s"] > 0 and row["peak_gflops"] > 0 and "mfu" in row
    assert parts["sft"]["status"] in ("ok", "skipped")
    grpo = parts["grpo"]["row"]
    assert grpo["name"] == "grpo-step-135m-shape-memory" and grpo["peak_memory_mb"] > 0
    assert report["seconds"] <= gpu_check.BUDGET_S
