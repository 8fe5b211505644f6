"""metrics.jsonl: one JSON object per row, flushed as written, valid JSON even for NaN and infinity.

A kill can land in the middle of a write, so resuming forgives a torn last line; a damaged line before it
is someone else's doing and is reported with its line number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tinylm.files import atomic_write_bytes, write_failure
from tinylm.errors import UserError


def finite_or_none(value):
    """`value` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def rows_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` for steps up to `step`; a torn last line is dropped."""
    lines = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if ln.strip()]
    kept = []
    for i, (lineno, line) in enumerate(lines):
        row_step = _step_of(line)
        if row_step is None:
            if i == len(lines) - 1:
                break  # torn by a kill during the write
            raise UserError(f"{path}:{lineno}: not a metrics row (a JSON object with an integer step); "
                            "fix or remove the line to resume")
        if row_step <= step:
            kept.append(line)
    return kept


class MetricsLog:
    """Appends rows to metrics.jsonl; on resume, rows past the checkpoint (and a torn last line) go first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = rows_up_to(path, resume_step)
            atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode("utf-8"))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        try:
            self._file.write(json.dumps(finite_or_none(row), allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the message names the file, which the OSError does not
            raise UserError(f"cannot write {self.path} ({write_failure(e)})") from None

    def close(self) -> None:
        self._file.close()
