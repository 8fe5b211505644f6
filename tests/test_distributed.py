"""Data parallelism through the real launchers: two ranks of batch B train like one process of batch 2B."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import data_toml

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _recipe(tmp_path, prepared, batch_size):
    path = tmp_path / f"recipe{batch_size}.toml"
    path.write_text(f"""
[model]
preset = "micro"
{data_toml(prepared)}
[train]
steps = 6
batch_size = {batch_size}
seq_len = 32
log_every = 1
eval_every = 0
ckpt_every = 6
[optim]
lr = 3e-3
""")
    return path


def _losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


LAUNCHERS = {
    "torch": lambda: [shutil.which("torchrun") or "torchrun", "--nproc_per_node", "2", "--master_port", "29533",
                      "-m", "tinylm"],
    "mlx": lambda: [shutil.which("mlx.launch") or "mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-m",
                    "tinylm"],
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(LAUNCHERS))
def test_two_ranks_match_one_process_with_the_whole_batch(tmp_path, prepared, backend):
    launcher = {"torch": "torchrun", "mlx": "mlx.launch"}[backend]
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not installed")
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    single, double = tmp_path / "single", tmp_path / "double"
    cmd = ["train", "--backend", backend, "--quiet"]
    one = subprocess.run([sys.executable, "-m", "tinylm", *cmd, str(_recipe(tmp_path, prepared, 8)),
                          "--out", str(single)], cwd=ROOT)
    assert one.returncode == 0
    two = subprocess.run([*LAUNCHERS[backend](), *cmd, str(_recipe(tmp_path, prepared, 4)), "--out", str(double)],
                         cwd=ROOT, timeout=600)
    assert two.returncode == 0
    assert len(_losses(double)) == 6  # one metrics file, written by rank 0 alone
    assert max(abs(a - b) for a, b in zip(_losses(single), _losses(double))) < 1e-4
