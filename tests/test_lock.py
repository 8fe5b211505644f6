"""One writer per folder, and the files that writers killed or stopped by a full disk leave behind."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_bad_input import cli_env
from tinylm.data.shards import remove_temporaries
from tinylm.errors import UserError
from tinylm.files import staged_folder, write_failure
from tinylm.lock import LOCK_FILE, FolderLock
from tinylm.train import checkpoint


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_lock_names_its_holder_is_reentrant_and_removes_what_it_made(tmp_path):
    with FolderLock(tmp_path / "run", "run folder"):
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
        with FolderLock(tmp_path / "run" / ".." / "run"):  # the same folder again, in the same process
            pass
        assert (tmp_path / "run" / LOCK_FILE).exists(), "the inner lock let go of the outer one's"
        code = "import sys; from tinylm.lock import FolderLock; FolderLock(sys.argv[1], 'run folder').acquire()"
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                               env=cli_env())
        assert other.returncode != 0
        assert f"run folder {tmp_path / 'run'} is in use by another tinylm process (pid {os.getpid()}" in other.stderr
    # Released: the folder this lock made (left empty) is gone again, and the next writer gets it.
    assert not (tmp_path / "run").exists()
    FolderLock(tmp_path / "run").acquire().release()


def test_a_lock_another_process_holds_is_refused_until_it_ends(tmp_path):
    code = ("import sys, time; from tinylm.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed while holding it: its lock file stays, stale, and the next writer takes it over.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("alive", [True, False])
def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, alive):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    pid = os.getppid() if alive else _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = FolderLock(tmp_path)
    if alive:
        with pytest.raises(UserError, match=f"pid {pid}"):
            lock.acquire()
    else:
        lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()


def test_prepare_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    (tmp_path / "src").mkdir()
    left = [tmp_path / "src" / f".train.bin.tmp{dead}", tmp_path / "src" / f".val.idx.tmp{dead}.npy",
            tmp_path / ".token_bytes.tmp.npy", tmp_path / f".manifest.json.tmp{dead}"]
    live = tmp_path / f".mixture.json.tmp{os.getppid()}"  # a running trainer's cache write
    kept = [tmp_path / "src" / "train.bin", tmp_path / "manifest.json", live]
    for path in left + kept:
        path.write_bytes(b"x")
    assert sorted(remove_temporaries(tmp_path)) == sorted(left)
    assert all(p.exists() for p in kept)


def test_a_failed_staged_folder_leaves_nothing_and_names_the_file(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(UserError, match=r"cannot write .*export/big\.bin \(No space left on device\)"):
        with staged_folder(out) as folder:
            (folder / "config.json").write_text("{}")
            (folder / "big.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "big.bin"))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: nothing under the real name either
        with staged_folder(out) as folder:
            (folder / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_staged_folder_replaces_files_of_an_existing_one_and_clears_a_killed_ones_leftovers(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.json").write_text("old")
    leftover = tmp_path / f".export.tmp{_dead_pid()}"
    leftover.mkdir()
    with staged_folder(out) as folder:
        (folder / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and (out / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_write_failure_reads_the_reason_out_of_a_safetensors_error():
    text = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    assert write_failure(RuntimeError(text)) == "No space left on device"
    assert write_failure(RuntimeError("Error while serializing: I/O error: File too large (os error 27)")) == \
        os.strerror(errno.EFBIG)
    assert write_failure(OSError(errno.EFBIG, "File too large")) == "File too large"


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    params = {"w": np.ones((2, 2), np.float32)}
    checkpoint.save(tmp_path, 1, params, params, {"model": {}}, keep=1)
    real = checkpoint._save_tensors

    def full_disk(path, tensors):
        if path.name == "optimizer.safetensors":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, tensors)

    monkeypatch.setattr(checkpoint, "_save_tensors", full_disk)
    with pytest.raises(UserError) as e:
        checkpoint.save(tmp_path, 2, params, params, {"model": {}}, keep=1)
    assert "step_00000002/optimizer.safetensors (No space left on device)" in str(e.value)
    assert "checkpoints already in" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def test_only_rank_0_of_a_launched_run_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with FolderLock(tmp_path / "run"):
        assert not (tmp_path / "run" / LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with FolderLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).exists()


def test_a_prepare_is_refused_while_another_process_writes_the_data_folder(tmp_path, prepared):
    from tinylm.config import from_dict, read_toml
    from tinylm.data.prepare import prepare
    from tinylm.recipe import Recipe

    data = tmp_path / "data"
    code = ("import sys, time; from tinylm.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    recipe = prepared.parent / "data.toml"
    cfg = from_dict(Recipe, read_toml(recipe), str(recipe)).data
    cfg.dir = str(data)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"prepared data folder {data} is in use .*pid {holder.pid}"):
            prepare(cfg, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in data.iterdir()) == [LOCK_FILE], "the refused prepare wrote something"
