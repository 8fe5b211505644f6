"""JSON Lines reading shared by data sources and evaluation tasks."""

from __future__ import annotations

import json
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
