"""RL end to end: a run killed with SIGKILL and resumed draws the same rollouts and reaches the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers_eval import make_checkpoint

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    keys = ("step", "loss", "reward", "accuracy", "completion_length", "clip_fraction", "kl")
    return [tuple(r[k] for k in keys) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_sigkill_during_rl_then_resume_gives_the_same_rewards_and_losses(tmp_path):
    init = make_checkpoint(tmp_path / "init")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)}) + "\n"
                             for a in range(1, 13)))
    recipe = tmp_path / "rl.toml"
    recipe.write_text(f"""
[train]
steps = 24
log_every = 1
ckpt_every = 4
init_from = "{init}"
[optim]
name = "adamw"
lr = 3e-3
[[stages]]
name = "rl"
objective = "grpo"
[stages.grpo]
tasks = ["qa:{tasks}"]
prompts_per_step = 2
num_generations = 4
max_completion_length = 12
num_iterations = 2
beta = 0.04
epsilon_high = 0.28
""")
    cmd = [sys.executable, "-m", "tinylm", "train", str(recipe), "--backend", "torch", "--quiet"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(cmd + ["--out", str(full)], cwd=ROOT).returncode == 0
    want = _rows(full / "rl")
    # An untrained model earns no reward here, so the KL term moves the weights; rollouts still differ per step.
    assert len(want) == 24 and any(r[6] > 0 for r in want) and len({r[4] for r in want}) > 1
    proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and len(_rows(killed / "rl")) < 14:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(_rows(killed / "rl")) < 24, "the run finished before it was killed"
    assert subprocess.run(cmd + ["--out", str(killed), "--resume"], cwd=ROOT).returncode == 0
    assert _rows(killed / "rl") == want


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grpo_raises_mean_reward(tmp_path, backend):
    """An untrained model says the answer (a 7 as the last number) in a few of its samples at first; the
    groups where it does carry the signal, and within a few dozen steps most samples say it."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from tinylm.cli import main

    init = make_checkpoint(tmp_path / "init")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"The cat sat on the mat {i}.", "answer": "7"}) + "\n"
                             for i in range(8)))
    recipe = tmp_path / "rl.toml"
    recipe.write_text(f"""
[train]
steps = 24
log_every = 1
ckpt_every = 24
init_from = "{init}"
[optim]
name = "adamw"
lr = 1e-2
weight_decay = 0.0
[schedule]
name = "constant"
[[stages]]
name = "rl"
objective = "grpo"
[stages.grpo]
tasks = ["qa:{tasks}"]
prompts_per_step = 4
num_generations = 8
max_completion_length = 6
""")
    assert main(["train", str(recipe), "--backend", backend, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rewards = [json.loads(ln)["reward"] for ln in (tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert first < 0.3 and last > first + 0.4, rewards
