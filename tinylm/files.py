"""File helpers every part of tinylm uses: atomic writes (temporary file, fsync, rename) of files and whole
folders, JSON Lines reading, whether the process behind a temporary file still runs, and one-line reasons for
failed writes."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
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
    which carry the operating system's error number inside their text (`os error 28`, `code: 28`)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    code = re.search(r"(?:os error |code: )(\d+)", text)
    return os.strerror(int(code.group(1))) if code else " ".join(text.split()) or type(e).__name__


def _stale_temporaries(out: Path) -> list[Path]:
    """Temporary folders of `staged_folder(out)` whose process is gone (killed while writing)."""
    found = []
    for old in out.parent.glob(f".{out.name}.tmp*") if out.parent.is_dir() else []:
        pid = old.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            found.append(old)
    return found


@contextmanager
def staged_folder(out: str | os.PathLike, write_errors: tuple[type, ...] = (OSError,)):
    """Yields a temporary folder beside `out` to write a whole folder into. Once the block ends it is renamed to
    `out` (its files moved over those of the same names when `out` already holds some); on any failure it is
    removed, and one of `write_errors` becomes a UserError naming the file being written and why. A kill
    leaves `out` as it was, and a hidden temporary folder that the next staging into `out` removes."""
    out = Path(out)
    for old in _stale_temporaries(out):
        shutil.rmtree(old, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if out.is_dir() and any(out.iterdir()):
            for path in tmp.iterdir():
                os.replace(path, out / path.name)
            tmp.rmdir()
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, write_errors):
            named = Path(e.filename) if isinstance(e, OSError) and e.filename else None
            failed = out / named.name if named is not None and named.parent == tmp else out
            raise UserError(f"cannot write {failed} ({write_failure(e)}); {out} is left as it was") from None
        raise
