import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tinylm.train import checkpoint
from tinylm.cli import main

from conftest import data_toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(tmp_path, data_dir, steps=12, extra=""):
    path = tmp_path / "recipe.toml"
    path.write_text(f"""
[model]
preset = "micro"
{data_toml(data_dir)}
[train]
steps = {steps}
batch_size = 4
grad_accum = 2
seq_len = 32
log_every = 1
eval_every = 4
eval_rows = 8
ckpt_every = 4
keep_checkpoints = 2
[optim]
lr = 3e-3
[schedule]
warmup_steps = 2
{extra}
""")
    return path


def _rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in _rows(run_dir) if "loss" in r]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_train_writes_metrics_validation_and_checkpoints(tmp_path, prepared, backend):
    out = tmp_path / "run"
    assert main(["train", str(_recipe(tmp_path, prepared)), "--backend", backend, "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train_rows)
    assert all(0 < r["mfu"] < 1 for r in train_rows)  # a CPU has a measured peak: never "n/a"
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8, 12] and all(r["val_bpb"] > 0 for r in val)
    # last 2 kept; the run's steps are 4, 8, 12
    assert [p.name for p in checkpoint.list_steps(out)] == ["step_00000008", "step_00000012"]
    ckpt = checkpoint.load(out)
    assert ckpt.step == 12 and ckpt.meta["data_fingerprint"] and ckpt.meta["tokens"] == 12 * 8 * 32


def test_checkpoint_from_one_backend_gives_same_val_loss_in_the_other(tmp_path, prepared):
    from tinylm.backends import get_backend
    from tinylm.recipe import load
    from tinylm.train.trainer import Trainer

    out = tmp_path / "run"
    recipe_path = _recipe(tmp_path, prepared, steps=4)
    assert main(["train", str(recipe_path), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    recipe = load(recipe_path)
    losses = {}
    for name in ("torch", "mlx"):
        trainer = Trainer(recipe, get_backend(name), out=out, resume=True)
        assert trainer.step == 4
        losses[name] = trainer.validate()["val_loss"]
    assert abs(losses["torch"] - losses["mlx"]) < 1e-4


def test_an_existing_run_is_never_overwritten_without_resume(tmp_path, prepared, capsys):
    recipe, out = _recipe(tmp_path, prepared, steps=4), tmp_path / "run"
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    # Resuming a finished run with more steps continues it from its last checkpoint.
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", "--resume",
                 "--set", "train.steps=6"]) == 0
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "torch-compiled", "mlx"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, prepared, backend):
    steps = 60
    recipe = _recipe(tmp_path, prepared, steps=steps, extra="").read_text().replace("ckpt_every = 4", "ckpt_every = 3")
    if backend == "torch-compiled":  # compiled kernels must not sum in an order that changes from run to run
        backend, recipe = "torch", recipe.replace("[train]", "[train]\ncompile = true")
    (tmp_path / "recipe.toml").write_text(recipe)
    recipe_path = tmp_path / "recipe.toml"
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "tinylm", "train", str(recipe_path), "--backend", backend, "--quiet"]
    # Every run in a fresh process, as a user would run them.
    assert subprocess.run(cmd + ["--out", str(full)], cwd=ROOT).returncode == 0
    proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len(_losses(killed)) >= 20:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = _losses(killed)
    assert done and done[-1][0] < steps, "the run finished before it was killed"
    resumed = subprocess.run(cmd + ["--out", str(killed), "--resume"], cwd=ROOT)
    assert resumed.returncode == 0
    assert _losses(killed) == _losses(full)  # exact, not approximate


def test_bad_inputs_end_with_exit_code_2_and_keep_saved_work(tmp_path, prepared, capsys):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, prepared, steps=4)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet"]) == 0
    saved = sorted(p.name for p in checkpoint.list_steps(out))
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    # A checkpoint of another model shape.
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", "--resume",
                 "--set", "model.dim=128", "--set", "train.steps=8"]) == 2
    assert "shape" in capsys.readouterr().err
    # A data source whose file is missing.
    missing = tmp_path / "missing.toml"
    missing.write_text(recipe.read_text().split("[data]")[0] + f"""
[data]
dir = "{tmp_path / 'other-data'}"
[[data.sources]]
name = "books"
type = "text"
path = "{tmp_path / 'no-such-book.txt'}"
""")
    assert main(["train", str(missing), "--backend", "torch", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "books" in err and "no-such-book" in err and err.count("\n") == 1
    # A diverging run: an absurd learning rate makes the loss infinite or NaN.
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", "--resume",
                 "--set", "train.steps=40", "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0.0"]) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and err.count("\n") == 1
    assert sorted(p.name for p in checkpoint.list_steps(out)) == saved
    assert (out / "metrics.jsonl").read_text().startswith(metrics)


def test_sampler_is_deterministic_bos_aligned_and_follows_weights(prepared):
    from tinylm.data.sampler import MixtureSampler, Phase
    from tinylm.data.shards import ShardSet

    shards = ShardSet(prepared)
    phases = [Phase("a", 0, {"arithmetic": 3.0, "stories": 1.0}),
              Phase("b", 64 * 32 * 10, {"arithmetic": 0.0, "stories": 1.0})]
    sampler = MixtureSampler(shards, phases, seq_len=32, rows_per_step=64, seed=5)
    assert np.array_equal(sampler.batch(3), sampler.batch(3))
    assert not np.array_equal(sampler.batch(3), sampler.batch(4))
    assert np.all(sampler.batch(7)[:, 0] == shards.bos_id)
    share = np.mean([s == "arithmetic" for step in range(10) for s in sampler.row_sources(step)])
    assert abs(share - 0.75) < 0.03
    assert set(sampler.row_sources(10)) == {"stories"}
