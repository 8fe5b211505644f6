"""Encoder stages through the real command line: MLM pretraining, classification fine-tuning from it and from
scratch, a committee, `tinylm eval --tasks classify:SPEC`, exact resume, and the refusals of bad input."""

import json
import shutil

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.recipe import load, resolve_stages
from tinylm.train import checkpoint

from conftest import data_toml

pytest.importorskip("torch")

COLOURS = {"warm": ["red", "orange", "amber", "gold"], "cool": ["blue", "green", "teal", "cyan"]}


def write_task(folder, labels=COLOURS, rows=(40, 12), seed=0):
    """A folder task (train.jsonl, test.jsonl) a tiny model can learn in a few steps: the label says which
    word list the text draws its colour words from."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "test"), rows):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = sorted(labels)[i % len(labels)]
                words = rng.choice(labels[label], 4)
                f.write(json.dumps({"text": f"the {words[0]} cat saw a {words[1]} {words[2]} hat", "label": label})
                        + "\n")
    return folder


def recipe_text(data_dir, task, steps=4, extra=""):
    return f"""
[model]
preset = "tlm-bert-mini"
n_layers = 2
dim = 32
n_heads = 2
n_kv_heads = 2
ffn_dim = 64
{data_toml(data_dir)}
[train]
steps = {steps}
batch_size = 4
seq_len = 32
log_every = 1
eval_every = 2
eval_rows = 8
ckpt_every = 2
keep_checkpoints = 5
[optim]
name = "adamw"
lr = 3e-3
[eval]
limit = 0

[[stages]]
name = "mlm-a"
objective = "mlm"

[[stages]]
name = "mlm-b"
objective = "mlm"
start = "scratch"
[stages.train]
seed = 1

[[stages]]
name = "ft-a"
objective = "classify"
start = "mlm-a"
[stages.classify]
task = "{task}"
[stages.eval]
tasks = ["classify:{task}"]

[[stages]]
name = "ft-b"
objective = "classify"
start = "mlm-b"
[stages.classify]
task = "{task}"
[stages.eval]
tasks = ["classify:{task}"]
committee = ["ft-a"]

[[stages]]
name = "scratch"
objective = "classify"
start = "scratch"
[stages.classify]
task = "{task}"
[stages.eval]
tasks = ["classify:{task}"]

[[compare]]
name = "pretrained vs scratch"
a = "ft-a"
b = "scratch"

[[compare]]
name = "committee vs one"
a = "ft-b+committee"
b = "ft-a"
{extra}
"""


@pytest.fixture
def setup(tmp_path, prepared):
    task = write_task(tmp_path / "task")
    path = tmp_path / "tlm.toml"
    path.write_text(recipe_text(prepared, task))
    return path, task


def _eval_rows(folder):
    return [json.loads(ln)["eval"] for ln in (folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]


@pytest.mark.slow
def test_mlm_then_classify_stages_committee_and_report(tmp_path, setup, capsys):
    path, task = setup
    out = tmp_path / "run"
    assert main(["run", str(path), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    mlm = checkpoint.load(out / "mlm-a")
    assert not mlm.shape.causal and mlm.shape.num_labels == 0
    rows = [json.loads(ln) for ln in (out / "mlm-a" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)  # masked-token loss on the held-out rows
    ft = checkpoint.load(out / "ft-a")
    assert ft.meta["labels"] == ["cool", "warm"] and ft.shape.num_labels == 2
    # Fine-tuning started from the MLM weights; the scratch stage from a fresh initialization.
    scratch = checkpoint.load(out / "scratch")
    key = "layers.0.mlp.up_proj.weight"
    assert np.abs(ft.params[key] - mlm.params[key]).max() < np.abs(scratch.params[key] - mlm.params[key]).max()
    result = _eval_rows(out / "ft-b")[-1]
    assert set(result) == {"task", "committee:task"}
    for r in result.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 and r["samples"] == 12
    report = (out / "report.md").read_text()
    assert "| pretrained vs scratch | ft-a |" in report and "| committee vs one | ft-b+committee |" in report

    # The same committee from the command line gives the same scores as the one the run evaluated.
    capsys.readouterr()
    assert main(["eval", str(out / "ft-b"), "--tasks", f"classify:{task}", "--committee", str(out / "ft-a"),
                 "--backend", "torch", "--json", "--output", str(tmp_path / "e.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"]["accuracy"] == pytest.approx(result["committee:task"]["accuracy"])
    assert printed["task"]["macro_f1"] == pytest.approx(result["committee:task"]["macro_f1"])


@pytest.mark.parametrize("stage", ["mlm-a", "ft-a"])
def test_mlm_and_classify_stages_resume_exactly(tmp_path, setup, stage):
    from tinylm.backends import get_backend
    from tinylm.stages import build_trainer

    path, _ = setup
    out = tmp_path / "run"
    stages = {s.name: s for s in resolve_stages(load(path), out)}
    if stage == "ft-a":
        build_trainer(stages["mlm-a"], get_backend("torch")).fit()
    build_trainer(stages[stage], get_backend("torch")).fit()
    whole = checkpoint.load(out / stage)
    assert whole.step == 4
    shutil.rmtree(out / stage / "checkpoints" / "step_00000004")
    build_trainer(stages[stage], get_backend("torch"), resume=True).fit()
    resumed = checkpoint.load(out / stage)
    assert resumed.step == 4
    for k in whole.params:
        assert np.array_equal(whole.params[k], resumed.params[k]), k


def _refused(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, capsys):
    path, task = setup
    out = tmp_path / "run"
    # mlm on a causal model
    assert "bidirectional" in _refused(capsys, ["run", str(path), "--backend", "torch", "--out", str(out / "c"),
                                                "--quiet", "--set", "model.causal=true"])
    # classify without labels: a classify stage without a task
    blank = tmp_path / "blank.toml"
    blank.write_text(path.read_text().replace(f'task = "{task}"', 'task = ""'))
    assert "needs labels" in _refused(capsys, ["run", str(blank), "--backend", "torch", "--out", str(out / "b"),
                                               "--quiet", "--only", "scratch"])
    assert main(["run", str(path), "--backend", "torch", "--out", str(out / "ok"), "--quiet"]) == 0
    # a test label the model never learned (a task with another label set)
    other = write_task(tmp_path / "other", labels={"cool": COLOURS["cool"], "dark": ["black", "grey", "navy"]})
    err = _refused(capsys, ["eval", str(out / "ok" / "ft-a"), "--tasks", f"classify:{other}", "--backend", "torch"])
    assert "'dark' was never seen in training" in err
    # a committee of members fine-tuned on different label sets
    other_recipe = tmp_path / "other.toml"
    other_recipe.write_text(path.read_text().replace(str(task), str(other)))
    assert main(["run", str(other_recipe), "--backend", "torch", "--out", str(out / "o"), "--quiet",
                 "--only", "mlm-a"]) == 0
    assert main(["run", str(other_recipe), "--backend", "torch", "--out", str(out / "o"), "--quiet",
                 "--only", "ft-a"]) == 0
    err = _refused(capsys, ["eval", str(out / "ok" / "ft-a"), "--tasks", f"classify:{task}", "--committee",
                            str(out / "o" / "ft-a"), "--backend", "torch"])
    assert "different label sets" in err
    # a model without a classification head
    assert "no classification head" in _refused(capsys, ["eval", str(out / "ok" / "mlm-a"), "--tasks",
                                                         f"classify:{task}", "--backend", "torch"])
