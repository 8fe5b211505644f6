"""Reading documents from each kind of source named in a recipe.

A source yields records: a plain string, or a chat `messages` list of {role, content}. Pretraining renders chat
records with the role markers of `tinylm.data.tokenizer` (`documents`); post-training reads them as chat
(`chat_examples`). Every failure is a `UserError` that names the source.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import random
import re
from pathlib import Path
from typing import Iterator, Union

from tinylm.data import synthetic
from tinylm.data.config import JSON_FORMATS, SOURCE_TYPES, SourceConfig
from tinylm.data.tokenizer import render_chat
from tinylm.errors import UserError
from tinylm.files import iter_records

Record = Union[str, list]
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_DOC_CHARS = 100_000
"""Longer documents are cut at whitespace into pieces of at most this many characters. Cleaning, tokenizer
training and encoding each hold a few hundred bytes per character of the document in hand, so one 25 MB line
would take gigabytes; pieces this size still hold far more tokens than a training sequence."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def validate_source(src: SourceConfig) -> None:
    """Check the fields that do not depend on the filesystem."""
    if not NAME_PATTERN.match(src.name or ""):
        raise UserError(f"data source {src.name!r}: the name must be letters, digits, '.', '-' or '_'")
    if src.type not in SOURCE_TYPES:
        raise UserError(f"data source {src.name!r}: unknown type {src.type!r} (known: {', '.join(SOURCE_TYPES)})")
    if src.format not in JSON_FORMATS:
        raise UserError(f"data source {src.name!r}: unknown format {src.format!r} (known: {', '.join(JSON_FORMATS)})")
    if src.type == "synthetic":
        if src.generator not in synthetic.FAMILIES:
            known = ", ".join(sorted(synthetic.FAMILIES))
            raise UserError(f"data source {src.name!r}: unknown synthetic generator {src.generator!r} (known: {known})")
        if src.split not in ("train", "test"):
            raise UserError(f"data source {src.name!r}: synthetic split must be 'train' or 'test', got {src.split!r}")
    elif not src.path:
        raise UserError(f"data source {src.name!r}: `path` is required for type {src.type!r}")


def input_files(src: SourceConfig) -> list[Path]:
    """The files a file-based source reads, sorted; a `UserError` if there are none."""
    if src.type in ("synthetic", "hf"):
        return []
    suffixes = {"text": TEXT_SUFFIXES, "jsonl": JSON_SUFFIXES, "parquet": PARQUET_SUFFIXES}[src.type]
    path = Path(src.path).expanduser()
    if any(ch in src.path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"data source {src.name!r}: {src.path} does not exist")
    if not files:
        raise UserError(f"data source {src.name!r}: no {'/'.join(suffixes)} files under {src.path}")
    return files


def signature(src: SourceConfig) -> list:
    """What the source's content depends on besides its config: file names, sizes and modification times."""
    if src.type == "hf":
        files = [Path(p) for p in src.data_files.split(",") if p and Path(p).is_file()] if src.data_files else []
    else:
        files = input_files(src)
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    if src.type == "synthetic":
        out.append(["synthetic-version", synthetic.VERSION])
    if src.held_out:
        from tinylm.data import classify_tasks

        out.append(["held-out", classify_tasks.VERSION] +
                   [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in classify_tasks.task_files(src.held_out)])
    return out


def _squeeze(text: str) -> str:
    return " ".join(text.split())


class HeldOut:
    """The test texts of a source's `held_out` task; `holds(text)` says whether a text contains one of them."""

    def __init__(self, src: SourceConfig):
        from tinylm.data.classify_tasks import load_task

        task = load_task(src.held_out, seed=src.seed)
        self.texts = sorted({_squeeze(t) for t in task.texts("test")})

    def holds(self, text: str) -> bool:
        flat = _squeeze(text)
        return any(t in flat for t in self.texts)

    def keep_blocks(self, text: str) -> str:
        """`text` without the blank-line blocks that hold a test text."""
        return "\n\n".join(b for b in re.split(r"\n\s*\n", text) if not self.holds(b))


def split_long(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, each cut at the last whitespace that fits (a word longer
    than `limit` is cut where it must be)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        window = text[start : start + limit]
        cut = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        cut = cut if cut > 0 else limit
        pieces.append(window[:cut])
        start += cut
    pieces.append(text[start:])
    return pieces


def _chunks(text: str, size: int) -> list[str]:
    if size <= 0:
        return [text]
    pieces, current = [], ""
    for block in re.split(r"\n\s*\n", text):
        parts = [block] if len(block) <= size else [p for line in block.splitlines() for p in split_long(line, size)]
        for i, part in enumerate(parts):
            # The lines of a block cut up for being too long stay one line break apart, as in the file;
            # only whole blocks are joined by a blank line.
            sep = "\n" if i else "\n\n"
            if current and len(current) + len(sep) + len(part) > size:
                pieces.append(current)
                current = part
            else:
                current = current + sep + part if current else part
    if current:
        pieces.append(current)
    return pieces


def _read_text(src: SourceConfig) -> Iterator[Record]:
    held_out = HeldOut(src) if src.held_out else None
    for f in input_files(src):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data source {src.name!r}: {f} is not UTF-8 text ({_one_line(e)})") from None
        except OSError as e:
            raise UserError(f"data source {src.name!r}: cannot read {f}: {_one_line(e)}") from None
        if held_out is not None:
            # Before chunking, so that a chunk never carries a held-out speech along with its neighbours.
            text = held_out.keep_blocks(text)
        for piece in _chunks(text, src.chunk_chars):
            yield piece, str(f)


GSM8K_FIELDS = {"question", "answer"}
"""GSM8K's records: a question and a worked answer ending in `#### <number>`; read as prompt and completion."""


def _record_to_doc(src: SourceConfig, rec, where: str, as_chat: bool = False) -> Record:
    if not isinstance(rec, dict):
        raise UserError(f"data source {src.name!r}: {where} is not a JSON object")
    fmt = src.format
    if fmt == "auto":
        if src.text_field in rec:
            fmt = "text"
        elif src.messages_field in rec:
            fmt = "chat"
        elif src.prompt_field in rec and src.completion_field in rec:
            fmt = "prompt_completion"
        elif GSM8K_FIELDS <= rec.keys():
            fmt = "gsm8k"
        else:
            fields = f"{src.text_field!r}, {src.messages_field!r} or {src.prompt_field!r}+{src.completion_field!r}"
            raise UserError(f"data source {src.name!r}: {where} has none of the fields {fields}")
    try:
        if fmt == "text":
            value = rec[src.text_field]
            if not isinstance(value, str):
                raise UserError(f"data source {src.name!r}: {where} field {src.text_field!r} is not a string")
            return value
        if fmt == "chat":
            messages = rec[src.messages_field]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise UserError(f"data source {src.name!r}: {where} {src.messages_field!r} must be a list of {{role, content}}")
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        if fmt == "gsm8k":
            prompt, completion = rec["question"], rec["answer"]
        else:
            prompt, completion = rec[src.prompt_field], rec[src.completion_field]
    except KeyError as e:
        raise UserError(f"data source {src.name!r}: {where} has no field {e.args[0]!r}") from None
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise UserError(f"data source {src.name!r}: {where} prompt and completion must be strings")
    if as_chat:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return f"{prompt}\n{completion}"


def _open_maybe_gzip(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(src: SourceConfig) -> Iterator[Record]:
    for f in input_files(src):
        try:
            with _open_maybe_gzip(f) as fh:
                for lineno, rec in iter_records(fh, f"data source {src.name!r}: {f}"):
                    yield rec, f"{f} line {lineno}"
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise UserError(f"data source {src.name!r}: cannot read {f}: {_one_line(e)}") from None


def _read_parquet(src: SourceConfig) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"data source {src.name!r}: reading Parquet needs pyarrow (pip install 'tinylm[parquet]')") from None
    for f in input_files(src):
        try:
            table = pq.ParquetFile(f)
            batches = table.iter_batches(batch_size=4096)
            row = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    row += 1
                    yield rec, f"{f} row {row}"
        except Exception as e:  # pyarrow raises several unrelated types for damaged files
            raise UserError(f"data source {src.name!r}: cannot read Parquet file {f}: {_one_line(e)}") from None


def _read_hf(src: SourceConfig) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source {src.name!r}: Hugging Face datasets need `datasets` (pip install 'tinylm[hf]')") from None
    kwargs = {"split": src.split}
    if src.data_files:
        kwargs["data_files"] = [p for p in src.data_files.split(",") if p]
    try:
        ds = datasets.load_dataset(src.path, src.hf_config or None, **kwargs)
    except Exception as e:  # network, missing dataset or split: all the user's to fix
        raise UserError(f"data source {src.name!r}: cannot load dataset {src.path!r}: {_one_line(e)}") from None
    for i, rec in enumerate(ds):
        yield rec, f"{src.path} record {i}"


def _read_synthetic(src: SourceConfig) -> Iterator[Record]:
    for p in synthetic.generate(src.generator, src.split, src.num_docs, src.seed, src.difficulty):
        yield {"text": p.text(), "messages": p.messages(), "chat": src.chat}, src.generator


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf,
            "synthetic": _read_synthetic}


def records(src: SourceConfig, as_chat: bool = False) -> Iterator[Record]:
    """The records of a source, at most `max_docs`: strings, or chat message lists for chat records (and, when
    `as_chat`, for prompt/completion pairs and synthetic problems too)."""
    validate_source(src)
    read = _READERS[src.type](src)
    if src.shuffle:
        read = list(read)
        random.Random(f"tinylm/source-shuffle/{src.seed}").shuffle(read)
    for i, (raw, where) in enumerate(read):
        if src.max_docs and i >= src.max_docs:
            return
        if isinstance(raw, str):
            yield raw
        elif src.type == "synthetic":
            yield raw["messages"] if (as_chat or raw["chat"]) else raw["text"]
        else:
            yield _record_to_doc(src, raw, where, as_chat)


def documents(src: SourceConfig) -> list[str]:
    """The source's documents as text for pretraining; chat records are rendered with role markers."""
    # A text source drops held-out blocks as it reads; the others drop whole documents here.
    held_out = HeldOut(src) if src.held_out and src.type != "text" else None
    out = []
    for rec in records(src):
        try:
            text = rec if isinstance(rec, str) else render_chat(rec)
        except ValueError as e:
            raise UserError(f"data source {src.name!r}: {_one_line(e)}") from None
        if held_out is not None and held_out.holds(text):
            continue
        out.extend(split_long(text, MAX_DOC_CHARS))
    return out


def chat_examples(src: SourceConfig) -> Iterator[list[dict]]:
    """The source as conversations for supervised fine-tuning; plain-text records are skipped."""
    for rec in records(src, as_chat=True):
        if isinstance(rec, list):
            yield rec


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
