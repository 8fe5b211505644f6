"""Checkpoints: safetensors for weights and optimizer state, JSON for everything needed to resume.

    <run>/checkpoints/step_00000100/
        model.safetensors       parameters (float32, names as in tinylm.model.param_shapes)
        optimizer.safetensors   optimizer slots (absent in imported or exported-only checkpoints)
        state.json              step, tokens, seed, model shape, resolved recipe, data fingerprint
        tokenizer.json          the tokenizer, so a checkpoint runs on its own
    <run>/checkpoints/best.json the step of the lowest validation loss, when the run keeps it (`train.keep_best`)

A checkpoint directory is written under a temporary name, fsynced, then renamed, so a kill at any moment
leaves either the previous checkpoints or the new one complete, never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tinylm.config import from_dict
from tinylm.files import atomic_write_json, fsync_dir, process_alive, write_failure
from tinylm.errors import UserError
from tinylm.model import ModelShape, param_shapes

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
BEST = "best.json"


@dataclass
class Checkpoint:
    path: Path
    shape: ModelShape
    params: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] | None
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(
    run_dir: str | os.PathLike,
    step: int,
    params: dict[str, np.ndarray],
    optimizer: dict[str, np.ndarray] | None,
    meta: dict,
    tokenizer: str | os.PathLike | None = None,
    keep: int = 3,
    best: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically under `run_dir/checkpoints/`, then keep only the last `keep` (and the
    best one, when `best.json` names it). `best`, the step's validation figures, records it as the best."""
    root = Path(run_dir) / "checkpoints"
    _refuse_non_finite(step, params, optimizer, root)
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writing = tmp / "model.safetensors"
    try:
        _save_tensors(writing, params)
        if optimizer is not None:
            writing = tmp / "optimizer.safetensors"
            _save_tensors(writing, optimizer)
        if tokenizer is not None and Path(tokenizer).is_file():
            writing = tmp / "tokenizer.json"
            shutil.copyfile(tokenizer, writing)
        writing = tmp / "state.json"
        atomic_write_json(writing, {"format": FORMAT, "step": step, **meta})
        fsync_dir(tmp)
    except (OSError, SafetensorError) as e:  # a full disk, a file-size limit, an I/O error
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"checkpoints already in {root} are kept" if list_steps(run_dir) else "no checkpoint was saved"
        raise UserError(f"cannot write {final / writing.name} ({write_failure(e)}); {kept}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    if best is not None:
        mark_best(run_dir, step, best)
    kept = best_step(run_dir)
    for old in list_steps(run_dir)[:-keep] if keep > 0 else []:
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def mark_best(run_dir: str | os.PathLike, step: int, val: dict) -> None:
    """Record checkpoint `step` (already saved) as the one of the lowest validation loss so far; `val` holds
    its validation figures (`val_loss`, ...)."""
    atomic_write_json(Path(run_dir) / "checkpoints" / BEST, {"step": step, **val})


def read_best(run_dir: str | os.PathLike) -> dict:
    """{step, val_loss, ...} of the recorded best checkpoint, or {} when there is none."""
    try:
        best = json.loads((Path(run_dir) / "checkpoints" / BEST).read_text())
    except (OSError, ValueError):
        return {}
    return best if isinstance(best, dict) and isinstance(best.get("step"), int) else {}


def best_step(run_dir: str | os.PathLike) -> Path | None:
    """The recorded best checkpoint's folder when it is complete, else None."""
    best = read_best(run_dir)
    path = Path(run_dir) / "checkpoints" / f"step_{best['step']:08d}" if best else None
    return path if path is not None and (path / "state.json").is_file() else None


def result(run_dir: str | os.PathLike) -> Path | None:
    """What a run hands on (to evaluation, to the next stage): its best checkpoint when it keeps one, else its
    newest; None when it has none."""
    steps = list_steps(run_dir)
    return best_step(run_dir) or (steps[-1] if steps else None)


def first_non_finite(params: dict, optimizer: dict | None) -> str | None:
    """`parameter NAME` or `optimizer slot NAME` of the first tensor holding a NaN or an infinity, else None."""
    for kind, tensors in (("parameter", params), ("optimizer slot", optimizer or {})):
        for name, value in tensors.items():
            if not np.isfinite(value).all():
                return f"{kind} {name}"
    return None


def _refuse_non_finite(step: int, params: dict, optimizer: dict | None, root: Path) -> None:
    # A diverged run must not replace good checkpoints with NaN ones (which keep-K would then make the only ones).
    bad = first_non_finite(params, optimizer)
    if bad:
        raise UserError(f"{bad} is NaN or infinite at step {step} (a diverged run? try a lower optim.lr); "
                        f"stopped without saving, checkpoints already in {root} are kept")


def remove_orphans(root: Path) -> None:
    """Delete the temporary directories of saves whose process is gone (killed mid-write)."""
    for tmp in root.glob(".step_*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def list_steps(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of killed writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_path(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its `result`: the best checkpoint, or the latest)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = result(path)
    if found is not None:
        return found
    raise UserError(f"no checkpoint at {path} (expected state.json, or checkpoints/step_*/ inside it)")


def load(path: str | os.PathLike, with_optimizer: bool = True) -> Checkpoint:
    """Read a checkpoint and check that its tensors match the shape it declares."""
    path = resolve_path(path)
    meta, shape = _read_state(path / "state.json")
    params = _load_tensors(path / "model.safetensors")
    check_params(shape, params, str(path))
    params = {name: params[name] for name in param_shapes(shape)}  # the model's own order
    optimizer = None
    if with_optimizer and (path / "optimizer.safetensors").is_file():
        optimizer = _load_tensors(path / "optimizer.safetensors")
    bad = first_non_finite(params, optimizer)
    if bad:  # written by a diverged run before tinylm refused to save one
        raise UserError(f"{path}: {bad} is NaN or infinite; use an earlier checkpoint")
    return Checkpoint(path, shape, params, optimizer, meta)


def read_meta(path: str | os.PathLike) -> dict:
    """What a checkpoint records of its run (its state.json) without reading its tensors; {} where it does not
    read."""
    try:
        return _read_state(resolve_path(path) / "state.json")[0]
    except (OSError, UserError):
        return {}


def load_newest(run_dir: str | os.PathLike, on_skip) -> Checkpoint:
    """The newest checkpoint of a run that loads; `on_skip(path, error)` hears of each damaged one passed over.
    With none loadable, the newest one's error is raised."""
    steps = list_steps(run_dir)
    if not steps:
        raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    first_error = None
    for path in reversed(steps):
        try:
            return load(path)
        except UserError as e:
            first_error = first_error or e
            on_skip(path, e)
    raise first_error


def _read_state(path: Path) -> tuple[dict, ModelShape]:
    damaged = f"{path} is damaged or not a tinylm checkpoint"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{damaged}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{damaged}: no `model` table")
    step = meta.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{damaged}: step {step!r} is not a non-negative integer")
    try:
        shape = from_dict(ModelShape, meta["model"], str(path), prefix="model")
    except UserError as e:
        raise UserError(f"{e} (the checkpoint is damaged)") from None
    return meta, shape


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or damaged: {e}") from None


def check_params(shape: ModelShape, params: dict[str, np.ndarray], where: str) -> None:
    """Every parameter of `shape` present with its shape, and nothing else."""
    expected = param_shapes(shape)
    for name, s in expected.items():
        if name not in params:
            raise UserError(f"{where}: parameter {name} is missing (checkpoint of another model shape?)")
        if tuple(params[name].shape) != s:
            raise UserError(f"{where}: parameter {name} has shape {tuple(params[name].shape)}, the model needs {s}")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise UserError(f"{where}: unexpected parameter {extra[0]} (checkpoint of another model shape?)")
