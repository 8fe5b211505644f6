"""SIGTERM and SIGINT at seeded random moments of training (a second one inside a save), and second writers
started at random moments of a live run: each ends in one line, with exit code 128 + the signal (2 for the
second writer), the newest checkpoint loads, and resuming reproduces the uninterrupted run's losses exactly.
Ctrl-C during a data prepare stops its worker processes too, and the next prepare finishes the job."""

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_bad_input import ROOT, cli_command, cli_env, run_cli
from test_faults import _lines, _temporary_saves
from test_trainer import _losses, _recipe as train_recipe

from tinylm.train import checkpoint

STEPS = 200
"""Far more steps than the six interrupted attempts can reach even on a fast machine, where a micro model's step
takes a few milliseconds and dozens of them fit between a metric row being seen and the signal arriving."""
DOCS = 5000
"""Documents per source of the prepare that Ctrl-C interrupts: enough for a few seconds of cleaning."""


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _wait_for(proc, ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within 300 s"
        time.sleep(0.0005)


def _signal_at_random(cmd, out, rng: random.Random, signum: int, twice: bool) -> tuple[int, str, bool]:
    """Start `cmd`; send `signum` a random number of metric rows later, or, when `twice`, send it and then the
    other stop signal as soon as a checkpoint write is seen. Returns (exit code, stderr, whether a write was
    cut short)."""
    left_before = _temporary_saves(out)
    rows = _lines(out / "metrics.jsonl") + rng.randrange(1, 5)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if twice:
        _wait_for(proc, lambda: _temporary_saves(out) - left_before, "a checkpoint write")
        proc.send_signal(signum)
        proc.send_signal(signal.SIGINT if signum == signal.SIGTERM else signal.SIGTERM)
    else:
        _wait_for(proc, lambda: _lines(out / "metrics.jsonl") >= rows, f"{rows} metric rows")
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err, bool(_temporary_saves(out) - left_before)


@pytest.mark.slow
def test_sigterm_and_sigint_save_the_step_and_resume_exactly(tmp_path, prepared):
    recipe = train_recipe(tmp_path, prepared, steps=STEPS, extra="")
    recipe.write_text(recipe.read_text().replace("ckpt_every = 4", "ckpt_every = 5").replace("eval_every = 4",
                                                                                            "eval_every = 50"))
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    base = ["train", recipe, "--backend", "torch", "--quiet"]
    assert run_cli([*base, "--out", full], cwd=ROOT).returncode == 0
    rng = random.Random(20261206)
    saved_at_stop, cut_short = 0, 0
    for trial in range(6):
        signum = (signal.SIGTERM, signal.SIGINT)[trial % 2]
        twice = trial >= 4
        code, err, cut = _signal_at_random(cli_command([*base, "--out", stopped, "--resume"]), stopped, rng,
                                           signum, twice)
        line = _one_line(err)
        newest = checkpoint.load(stopped)  # whatever happened, the newest checkpoint loads, with its optimizer
        assert newest.optimizer is not None
        if twice:
            assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and " again, stopped at once" in line, line
            cut_short += cut
            continue
        assert code == 128 + signum, (code, line)
        found = re.match(rf"stopped by {signum.name} at step (\d+) of {STEPS}: checkpoint saved to (\S+)", line)
        assert found, line
        assert newest.step == int(found.group(1)) and str(newest.path) == found.group(2)
        saved_at_stop += 1
    assert saved_at_stop == 4
    assert checkpoint.load(stopped).step < STEPS, "the run finished before the last signal"
    assert cut_short >= 1, "no second signal landed inside a checkpoint write"
    resumed = run_cli([*base, "--out", stopped, "--resume"], cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(stopped) == _losses(full)  # exact, not approximate
    assert checkpoint.load(stopped).step == STEPS
    assert not _temporary_saves(stopped), "a cut-short save's temporary folder was left behind"


def _second_writers(live, recipe):
    """What a second writer on a live `tinylm run --out live` may be: a run with other settings, `train
    --resume` into the run folder, or into its stage folder."""
    return [
        ["run", recipe, "--backend", "torch", "--quiet", "--out", live, "--set", "optim.lr=1e-3"],
        ["train", recipe, "--backend", "torch", "--quiet", "--out", live, "--resume"],
        ["train", recipe, "--backend", "torch", "--quiet", "--out", live / "pretrain", "--resume"],
    ]


@pytest.mark.slow
def test_a_second_writer_on_a_live_run_is_refused_and_changes_nothing(tmp_path, prepared):
    steps = 400  # the three refusals each start a process: ten times what the run needs to outlive them here
    recipe = train_recipe(tmp_path, prepared, steps=steps)
    full, live = tmp_path / "full", tmp_path / "live"
    assert run_cli(["run", recipe, "--backend", "torch", "--quiet", "--out", full], cwd=ROOT).returncode == 0
    first = subprocess.Popen(cli_command(["run", recipe, "--backend", "torch", "--quiet", "--out", live]), cwd=ROOT,
                             env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rng = random.Random(20261207)
    metrics = live / "pretrain" / "metrics.jsonl"
    try:
        for argv in _second_writers(live, recipe):
            rows = _lines(metrics) + rng.randrange(1, 6)
            _wait_for(first, lambda: _lines(metrics) >= rows, f"{rows} metric rows")
            second = run_cli(argv, cwd=ROOT)
            assert first.poll() is None, "the first run ended before the second writer was refused"
            assert second.returncode == 2, second.stderr
            line = _one_line(second.stderr)
            assert f"is in use by another tinylm process (pid {first.pid} on " in line, line
            assert str(live) in line
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert not (live / ".replaced").exists(), "a second writer set the live stage aside"
    assert _losses(live / "pretrain") == _losses(full / "pretrain")
    assert checkpoint.load(live / "pretrain").step == steps
    assert not list(live.rglob(".lock")), "a lock file outlived its run"


def _prepare_recipe(tmp_path, name: str, docs: int):
    path = tmp_path / f"{name}.toml"
    sources = "".join(f'[[data.sources]]\nname = "{g}"\ntype = "synthetic"\ngenerator = "{g}"\nnum_docs = {docs}\n'
                      for g in ("arithmetic", "stories"))
    path.write_text(f'[data]\ndir = "{tmp_path / name}"\nworkers = 2\n[data.tokenizer]\nvocab_size = 512\n{sources}')
    return path


def _live_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that still run (zombies, already dead, do not count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _gone(pgid: int) -> bool:
    deadline = time.time() + 15
    while _live_members(pgid):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds worker processes through /proc")
def test_ctrl_c_during_prepare_stops_its_workers_and_the_next_prepare_finishes(tmp_path):
    recipe = _prepare_recipe(tmp_path, "data", DOCS)
    rng = random.Random(20261208)
    interrupted = 0
    for trial in range(4):
        proc = subprocess.Popen(cli_command(["data", "prepare", recipe]), cwd=ROOT, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        _wait_for(proc, lambda: len(_live_members(proc.pid)) > 1, "the cleaning workers")
        time.sleep(rng.uniform(0, 1.0))
        killed = trial == 3
        if killed:
            proc.kill()  # the parent alone, with no chance to stop its workers: they must not outlive it
        else:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole foreground group
        _, err = proc.communicate(timeout=60)
        assert _gone(proc.pid), f"processes {_live_members(proc.pid)} outlived an interrupted prepare"
        if not killed and proc.returncode != 0:  # 0: it finished before the signal
            assert proc.returncode == 128 + signal.SIGINT, err
            assert _one_line(err) == "interrupted by SIGINT"
            interrupted += 1
    assert interrupted >= 1, "every prepare finished before its Ctrl-C"
    source = tmp_path / "data" / "stories"
    source.mkdir(parents=True, exist_ok=True)
    (source / ".train.bin.tmp999999999").write_bytes(b"\0" * 4096)  # a failed prepare's, from a pid long gone
    assert run_cli(["data", "prepare", recipe], cwd=ROOT).returncode == 0
    left = [p for p in (tmp_path / "data").rglob("*") if ".tmp" in p.name or p.name == ".lock"]
    assert left == [], left
    fresh = _prepare_recipe(tmp_path, "fresh", DOCS)
    assert run_cli(["data", "prepare", fresh], cwd=ROOT).returncode == 0
    fingerprint = [json.loads((tmp_path / d / "manifest.json").read_text())["fingerprint"] for d in ("data", "fresh")]
    assert fingerprint[0] == fingerprint[1]
