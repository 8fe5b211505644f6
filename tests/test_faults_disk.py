"""A disk that fills up while a checkpoint, an export or an import is written: one line naming the file and the
cause, exit 2, nothing half-written under a real name, and the checkpoints saved before untouched.

The full disk is a file-size limit (RLIMIT_FSIZE) on the command, which needs no mount and no privilege: a write
past it fails with EFBIG (`File too large`) where a full disk fails with ENOSPC, through the same code."""

import resource
import signal
import subprocess

import pytest

from helpers_eval import make_checkpoint
from test_bad_input import cli_command, cli_env, run_cli
from test_faults import _temporary_saves
from test_trainer import _recipe as train_recipe

from tinylm.train import checkpoint


def run_limited(args, cwd, limit: int) -> subprocess.CompletedProcess:
    def start():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(cli_command(args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=start)


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def exported(tmp_path):
    """A checkpoint and its export, written without a limit."""
    ckpt = make_checkpoint(tmp_path / "run")
    assert run_cli(["export", ckpt, "--to", "hf", tmp_path / "hf"], cwd=tmp_path).returncode == 0
    return ckpt, tmp_path / "hf"


def _hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, prepared):
    recipe, out = train_recipe(tmp_path, prepared, steps=4), tmp_path / "run"
    assert run_cli(["train", recipe, "--backend", "torch", "--quiet", "--out", out], cwd=tmp_path).returncode == 0
    before = checkpoint.list_steps(out)[-1]
    optimizer_bytes = (before / "optimizer.safetensors").stat().st_size
    # Room for the weights, not for the optimizer state: the save fails half-way through its folder.
    limit = ((before / "model.safetensors").stat().st_size + optimizer_bytes) // 2
    assert (before / "model.safetensors").stat().st_size < limit < optimizer_bytes
    result = run_limited(["train", recipe, "--backend", "torch", "--quiet", "--out", out, "--resume",
                          "--set", "train.steps=8"], tmp_path, limit)
    line = _one_error_line(result)
    assert "step_00000008/optimizer.safetensors (File too large)" in line, line
    assert f"checkpoints already in {out / 'checkpoints'} are kept" in line
    assert checkpoint.list_steps(out) == [before]
    assert checkpoint.load(out).step == 4
    assert not _temporary_saves(out)


def test_a_full_disk_during_an_export_leaves_no_half_written_folder(tmp_path, exported):
    ckpt, hf = exported
    limit = (hf / "model.safetensors").stat().st_size // 2
    line = _one_error_line(run_limited(["export", ckpt, "--to", "hf", tmp_path / "out"], tmp_path, limit))
    assert f"cannot write {tmp_path / 'out' / 'model.safetensors'} (File too large)" in line, line
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_a_full_disk_during_an_import_writes_no_checkpoint(tmp_path, exported):
    _, hf = exported
    limit = (hf / "model.safetensors").stat().st_size // 2
    line = _one_error_line(run_limited(["import", hf, "--out", tmp_path / "imported"], tmp_path, limit))
    assert "step_00000000/model.safetensors (File too large)" in line and "no checkpoint was saved" in line, line
    assert checkpoint.list_steps(tmp_path / "imported") == []
    assert not _temporary_saves(tmp_path / "imported")
