"""File helpers every part of tinylm uses: atomic writes (temporary file, fsync, rename), JSON Lines reading,
whether the process behind a temporary file still runs, and one-line reasons for failed writes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO, Iterator

from tinylm.errors import UserError


def iter_records(lines: IO[str], where: str) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) for every non-blank line; bad JSON is a UserError naming `where` and the line."""
    try:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} line {lineno} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text ({e.reason}); save it as UTF-8") from None


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


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: `No space left on device`, also from safetensors' Rust errors,
    which carry the operating system's message inside their text."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    found = re.search(r'message: "([^"]+)"', text)
    return found.group(1) if found else " ".join(text.split()) or type(e).__name__
