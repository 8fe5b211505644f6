"""SIGKILL a training run at seeded random moments, half of them inside checkpoint writes: the newest checkpoint
must always load, and resuming after every kill must reproduce the uninterrupted run's losses exactly."""

import random
import signal
import subprocess
import time

import numpy as np
import pytest

from test_bad_input import ROOT, cli_command, cli_env, run_cli
from test_trainer import _losses, _recipe as train_recipe

from tinylm.train import checkpoint

TRIALS = 10
STEPS = 60


def _temporary_saves(out) -> set[str]:
    root = out / "checkpoints"
    return {p.name for p in root.iterdir() if p.name.startswith(".step_")} if root.is_dir() else set()


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_at_random(cmd, out, rng: random.Random, during_save: bool) -> bool:
    """Start `cmd` and SIGKILL it a random number of metric rows later, or inside its first checkpoint write
    when `during_save`; returns whether the kill landed inside a write."""
    left_before = _temporary_saves(out)
    rows = _lines(out / "metrics.jsonl") + rng.randrange(1, 7)
    delay = rng.uniform(0, 0.05)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    in_write = False
    while proc.poll() is None and time.time() < deadline:
        if during_save:
            if _temporary_saves(out) - left_before:
                in_write = True
                break
        elif _lines(out / "metrics.jsonl") >= rows:
            time.sleep(delay)
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return in_write and proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_random_sigkills_keep_a_loadable_checkpoint_and_resume_exactly(tmp_path, prepared):
    recipe = train_recipe(tmp_path, prepared, steps=STEPS).read_text()
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(recipe.replace("ckpt_every = 4", "ckpt_every = 2").replace("eval_every = 4",
                                                                                      "eval_every = 5"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    base = ["train", recipe_path, "--backend", "torch", "--quiet"]
    assert run_cli([*base, "--out", full], cwd=ROOT).returncode == 0
    rng = random.Random(20240611)
    in_writes = 0
    for trial in range(TRIALS):
        in_writes += _kill_at_random(cli_command([*base, "--out", killed, "--resume"]), killed, rng,
                                     during_save=trial % 2 == 1)
        if checkpoint.list_steps(killed):
            newest = checkpoint.load(killed)
            assert newest.optimizer is not None
            assert all(np.isfinite(v).all() for v in newest.params.values())
    assert checkpoint.load(killed).step < STEPS, "the run finished before the last kill"
    resumed = run_cli([*base, "--out", killed, "--resume"], cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(killed) == _losses(full)  # exact, not approximate
    assert checkpoint.load(killed).step == STEPS
    assert not _temporary_saves(killed), "a killed save's temporary folder was left behind"
    assert in_writes >= 1, "no kill landed inside a checkpoint write"
