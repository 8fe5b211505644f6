"""File helpers every part of tinylm uses: atomic writes (temporary file, fsync, rename) and JSON Lines reading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Iterator

from tinylm.errors import UserError


def iter_records(lines: IO[str], where: str) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for every non-blank line; bad JSON is a UserError naming `where` and the line."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {lineno} is not valid JSON ({e.msg})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
