"""`prepare`: every source cleaned, tokenized and written as shards, with a manifest and a fingerprint.

Cleaning scans chunks of documents in worker processes on every core while this process deduplicates in
order; tokenization runs here with `tokenizers`' batch encoder, which is itself multi-threaded. Re-running on
unchanged inputs (same config, same files with the same sizes and modification times) does no work. One
prepare writes a folder at a time (`tinylm.lock`); it first removes what interrupted ones left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tinylm.data import synthetic
from tinylm.data.clean import dedup_key, resolve_scans, scan_documents
from tinylm.data.minhash import banding
from tinylm.data.config import DataConfig, SourceConfig
from tinylm.data.shards import MANIFEST, ShardSet, ShardWriter, remove_temporaries, token_dtype
from tinylm.files import atomic_write_bytes, atomic_write_json
from tinylm.data.sources import cpu_count, documents, signature, validate_source
from tinylm.data.tokenizer import (PAD, SPECIAL_TOKENS, bytes_per_token, document_specials, fitted_vocab_size,
                                   load_tokenizer, save_tokenizer, token_bytes, tokenizer_sample, train_tokenizer)
from tinylm.errors import UserError
from tinylm.interrupt import worker_signals
from tinylm.lock import FolderLock

FORMAT_VERSION = 3
"""Bumped whenever prepare's output changes for the same input, so old data directories are rebuilt."""

DEFAULT_DIR = "data/prepared"
TOKENIZER_META = "tokenizer.meta.json"
ENCODE_BATCH = 512
BATCH_CHARS = 1 << 21
"""Most characters per cleaning task or encoding batch: what a batch holds in memory grows with its text."""


def data_dir(cfg: DataConfig) -> Path:
    return Path(cfg.dir or DEFAULT_DIR)


def resolve_sources(cfg: DataConfig) -> list[SourceConfig]:
    """The recipe's sources, or the built-in synthetic mixture when it names none; validated."""
    sources = list(cfg.sources) or synthetic.default_sources()
    seen = set()
    for src in sources:
        validate_source(src)
        if src.name in seen:
            raise UserError(f"data source {src.name!r} is listed twice")
        seen.add(src.name)
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    return sources


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _tokenizer_signature(cfg: DataConfig) -> list:
    if cfg.tokenizer.path:
        p = Path(cfg.tokenizer.path)
        st = p.stat() if p.is_file() else None
        return [str(p), st.st_size if st else None, st.st_mtime_ns if st else None]
    return [asdict(cfg.tokenizer)]


def cleaning_fingerprint(cfg: DataConfig, sources: list[SourceConfig]) -> str:
    """What the cleaned documents depend on: sources, their files, cleaning rules."""
    return _digest([FORMAT_VERSION, [asdict(s) for s in sources], [signature(s) for s in sources], asdict(cfg.clean)])


def input_fingerprint(cfg: DataConfig, sources: list[SourceConfig]) -> str:
    """Everything the prepared directory depends on; equal fingerprints mean re-running would change nothing."""
    return _digest([cleaning_fingerprint(cfg, sources), _tokenizer_signature(cfg), cfg.val_fraction])


def is_up_to_date(cfg: DataConfig) -> bool:
    root = data_dir(cfg)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources", {}), dict):
        return False
    if manifest.get("input_fingerprint") != input_fingerprint(cfg, resolve_sources(cfg)):
        return False
    needed = [root / "tokenizer.json", root / "token_bytes.npy"]
    for name in manifest.get("sources", {}):
        needed += [root / name / f"{split}.{ext}" for split in ("train", "val") for ext in ("bin", "idx.npy")]
    return all(p.is_file() for p in needed)


SCAN_CHUNK = 256
"""Documents per cleaning task: large enough to amortize pickling, small enough to keep every core busy."""


def _scan_chunk(args) -> list[tuple]:
    docs, clean_cfg, quality = args
    return scan_documents(docs, clean_cfg, quality)


def _pool_context():
    # fork on Linux: children need no re-import of __main__, so prepare also works from notebooks, stdin and
    # scripts without a main guard. The cleaning children never touch tokenizers or torch, whose thread pools
    # are what makes forking risky. Elsewhere fork is unsafe (macOS) and spawn is the only choice.
    if sys.platform.startswith("linux"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # configured: no fork warning in the children
        return mp.get_context("fork")
    return mp.get_context("spawn")


def clean_sources(cfg: DataConfig, sources: list[SourceConfig], workers: int | None = None,
                  progress=None, keys: dict[str, list[bytes]] | None = None,
                  on_source=None) -> dict[str, tuple[list[str], dict]]:
    """Read and clean every source; a `UserError` if any is left with no documents.

    Documents are read here, scanned (normalization, length and quality rules, MinHash signatures) in chunks on
    every core, and deduplicated here in input order while the workers scan the chunks that follow. When `keys`
    is a dict, it receives each source's `dedup_key`s of the kept documents, computed while scanning.
    `on_source(name, kept, report)` is called as each source is done, while the workers go on with the next.
    """
    workers = workers or cfg.workers or cpu_count()
    read = {src.name: documents(src) for src in sources}
    jobs, owners = [], []
    for src in sources:
        quality = src.quality if src.quality is not None else src.type != "synthetic"
        for chunk in batches(read[src.name], SCAN_CHUNK):
            jobs.append((chunk, cfg.clean, quality))
            owners.append(src.name)
    task = progress.add_task("cleaning", total=len(jobs)) if progress else None
    if cfg.clean.near_dedup:
        # datasketch is imported and the LSH banding chosen once here, before forking, rather than in every
        # worker (the workers hash each signature's bands, so they need the banding too).
        banding(cfg.clean.near_dedup_threshold, cfg.clean.near_dedup_num_perm)
    pool = (_pool_context().Pool(min(workers, len(jobs)), initializer=worker_signals, initargs=(os.getpid(),))
            if workers > 1 and len(jobs) > 1 else None)
    try:
        scans = pool.imap(_scan_chunk, jobs) if pool else map(_scan_chunk, jobs)

        # Chunks come back in submission order, which is source order, so each source takes the next ones.
        results = {}
        for src in sources:
            kept_keys = keys.setdefault(src.name, []) if keys is not None else None
            results[src.name] = resolve_scans(scans_of_next(owners, src.name, scans, progress, task), cfg.clean,
                                              keys=kept_keys)
            if on_source is not None and results[src.name][0]:
                on_source(src.name, *results[src.name])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for src in sources:
        kept, report = results[src.name]
        if not kept:
            dropped = {k: v for k, v in report["removed"].items() if v}
            why = f" (removed: {dropped})" if dropped else ""
            raise UserError(f"data source {src.name!r}: no documents left after cleaning "
                            f"({report['input']} read){why}")
    return results


def batches(docs: list[str], most_docs: int, most_chars: int = BATCH_CHARS) -> list[list[str]]:
    """`docs` in order, in batches of at most `most_docs` documents and (but for a single longer one)
    `most_chars` characters; one empty batch for no documents."""
    out, current, chars = [], [], 0
    for doc in docs:
        if current and (len(current) == most_docs or chars + len(doc) > most_chars):
            out.append(current)
            current, chars = [], 0
        current.append(doc)
        chars += len(doc)
    return out + [current]


def scans_of_next(owners: list[str], name: str, scans, progress, task):
    """The scans of source `name`: as many chunks from the ordered stream as `owners` says it has."""
    for _ in range(owners.count(name)):
        yield from next(scans)
        if progress:
            progress.advance(task)


def known_tokenizer(cfg: DataConfig, root: Path, fingerprint: str):
    """The recipe's tokenizer.json, or one trained earlier in `root` on the same input; None if one must be trained.

    Known before cleaning, so that documents can be tokenized while later sources are still being cleaned.
    """
    target = root / "tokenizer.json"
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
        if Path(cfg.tokenizer.path).resolve() != target.resolve():
            atomic_write_bytes(target, Path(cfg.tokenizer.path).read_bytes())
        return tok
    try:
        meta = json.loads((root / TOKENIZER_META).read_text())
        if meta.get("key") == _tokenizer_key(cfg, fingerprint) and target.is_file():
            return load_tokenizer(target)
    except (OSError, json.JSONDecodeError):
        pass
    return None


def _tokenizer_key(cfg: DataConfig, fingerprint: str) -> str:
    return _digest([fingerprint, asdict(cfg.tokenizer)])


def get_tokenizer(cfg: DataConfig, cleaned, root: Path, fingerprint: str):
    """The recipe's tokenizer.json, a trained one reused from `root` if trained on the same input, or a new one."""
    tok = known_tokenizer(cfg, root, fingerprint)
    if tok is not None:
        return tok
    sample = tokenizer_sample(cleaned, cfg.tokenizer.sample_chars, cfg.tokenizer.seed)
    vocab_size = cfg.tokenizer.vocab_size or fitted_vocab_size(sum(map(len, sample)))
    tok = train_tokenizer(sample, vocab_size, cfg.tokenizer.min_frequency)
    save_tokenizer(tok, root / "tokenizer.json")
    atomic_write_json(root / TOKENIZER_META, {"key": _tokenizer_key(cfg, fingerprint), "sample_docs": len(sample),
                                              "sample_chars": sum(map(len, sample))})
    return tok


def split_docs(docs: list[str], val_fraction: float,
               keys: list[bytes] | None = None) -> tuple[list[str], list[str]]:
    """(train, val) by document: the documents with the smallest content hashes are held out, so the choice
    is stable when other documents are added or removed. `keys`, if given, are the documents' `dedup_key`s
    (cleaning already computed them)."""
    n = len(docs)
    n_val = 0 if n < 2 or val_fraction <= 0 else min(n - 1, max(1, math.ceil(val_fraction * n)))
    if keys is None:
        keys = [dedup_key(d) for d in docs]
    elif len(keys) != n:
        raise ValueError(f"split_docs: {len(keys)} keys for {n} documents")
    ranked = sorted(range(n), key=keys.__getitem__)
    val_ids = set(ranked[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_ids], [docs[i] for i in sorted(val_ids)]


def _write_split(tok, docs: list[str], source_dir: Path, split: str, dtype, bos_id: int, progress, task) -> dict:
    writer = ShardWriter(source_dir, split, dtype)
    n_bytes = 0
    bos = [bos_id]
    for batch in batches(docs, ENCODE_BATCH):
        if not batch:
            continue
        # One write per batch: per-document arrays cost as much as a good share of the encoding itself.
        writer.add_many([bos + enc.ids for enc in tok.encode_batch_fast(batch, add_special_tokens=False)])
        # Encoding the joined batch counts the same UTF-8 bytes as encoding each document.
        n_bytes += len("".join(batch).encode("utf-8"))
        if progress:
            progress.advance(task, len(batch))
    n_docs, n_tokens = writer.close()
    return {"docs": n_docs, "tokens": n_tokens, "bytes": n_bytes}


class _SourceWriter:
    """Splits one cleaned source by document and writes its train and validation shards."""

    def __init__(self, cfg: DataConfig, root: Path, tok, keys: dict[str, list[bytes]], bar):
        self.cfg, self.root, self.tok, self.keys, self.bar = cfg, root, tok, keys, bar
        self.bos_id, self.eos_id = document_specials(cfg.tokenizer, tok)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab_size)
        self.task = bar.add_task("tokenizing", total=None)

    def write(self, name: str, docs: list[str], report: dict) -> dict:
        train, val = split_docs(docs, self.cfg.val_fraction, self.keys[name])
        source_dir = self.root / name
        if source_dir.exists() and not source_dir.is_dir():
            raise UserError(f"data source {name!r}: {source_dir} exists and is not a folder")
        entry = {split: _write_split(self.tok, part, source_dir, split, self.dtype, self.bos_id, self.bar, self.task)
                 for split, part in (("train", train), ("val", val))}
        text_tokens = sum(entry[s]["tokens"] - entry[s]["docs"] for s in ("train", "val"))
        entry["bytes_per_token"] = round(sum(entry[s]["bytes"] for s in ("train", "val")) / max(1, text_tokens), 4)
        entry["cleaning"] = report
        return entry


def content_fingerprint(root: Path, names: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in [root / "tokenizer.json"] + [root / n / f"{s}.{e}" for n in sorted(names)
                                             for s in ("train", "val") for e in ("bin", "idx.npy")]:
        h.update(path.relative_to(root).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=True)


def prepare(cfg: DataConfig, *, force: bool = False, progress: bool = True, workers: int | None = None) -> Path:
    """Make (or confirm up to date) the prepared data directory of `cfg` and return its path."""
    sources = resolve_sources(cfg)
    root = data_dir(cfg)
    fingerprint = input_fingerprint(cfg, sources)
    if not force and is_up_to_date(cfg):
        _sweep_leftovers(root)
        return root
    with FolderLock(root, "prepared data folder"):
        if force or not is_up_to_date(cfg):  # another prepare may have finished it just before the lock
            remove_temporaries(root)
            _prepare(cfg, sources, root, fingerprint, progress, workers)
    return root


def _sweep_leftovers(root: Path) -> None:
    """Remove what a killed prepare left behind even when nothing needs preparing, so that a kill after the
    last shard was written leaves no debris either. A folder another process holds, or one this process may
    not write (prepared data shared read-only), is left alone."""
    try:
        with FolderLock(root, "prepared data folder"):
            remove_temporaries(root)
    except (UserError, OSError):
        pass


def _prepare(cfg: DataConfig, sources: list[SourceConfig], root: Path, fingerprint: str, progress: bool,
             workers: int | None) -> None:
    # A stale manifest beside half-rewritten shards would look valid; remove it before touching anything.
    (root / MANIFEST).unlink(missing_ok=True)
    started = time.perf_counter()
    with _progress(progress and sys.stderr.isatty()) as bar:
        keys: dict[str, list[bytes]] = {}
        entries: dict[str, dict] = {}
        clean_key = cleaning_fingerprint(cfg, sources)
        tok = known_tokenizer(cfg, root, clean_key)
        writer = _SourceWriter(cfg, root, tok, keys, bar) if tok is not None else None

        def write_now(name, docs, report):
            entries[name] = writer.write(name, docs, report)

        # With the tokenizer known up front, each source is tokenized while the next is still being cleaned.
        cleaned = clean_sources(cfg, sources, workers, bar, keys=keys, on_source=write_now if writer else None)
        if writer is None:
            tok = get_tokenizer(cfg, cleaned, root, clean_key)
            writer = _SourceWriter(cfg, root, tok, keys, bar)
            for src in sources:
                entries[src.name] = writer.write(src.name, *cleaned[src.name])
        entries = {src.name: dict(entries[src.name], type=src.type) for src in sources}
        bos_id, eos_id, vocab_size, dtype = writer.bos_id, writer.eos_id, writer.vocab_size, writer.dtype
    np.save(root / ".token_bytes.tmp.npy", token_bytes(tok))
    (root / ".token_bytes.tmp.npy").replace(root / "token_bytes.npy")
    pad_id = tok.token_to_id(PAD)
    manifest = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None},
        "tokenizer": "tokenizer.json",
        "fingerprint": content_fingerprint(root, list(entries)),
        "input_fingerprint": fingerprint,
        "sources": entries,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(root / MANIFEST, manifest)


def open_prepared(cfg: DataConfig, **kwargs) -> ShardSet:
    """`prepare` if needed, then open the result, its tokenizer checked (checkpoints copy it, so a damaged one
    would otherwise surface only when a trained model is used)."""
    shards = ShardSet(prepare(cfg, **kwargs))
    try:
        load_tokenizer(shards.tokenizer_path)
    except UserError as e:
        raise UserError(f"{e}; re-run `tinylm data prepare --force`") from None
    return shards


def train_recipe_tokenizer(cfg: DataConfig, *, out: str | Path | None = None, workers: int | None = None,
                           progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Train the recipe's tokenizer on a sample of every cleaned source, save it (by default into the data
    directory, where `prepare` reuses it) and return its path with bytes per token for each source."""
    sources = resolve_sources(cfg)
    root = data_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    with _progress(progress and sys.stderr.isatty()) as bar:
        cleaned = clean_sources(cfg, sources, workers, bar)
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
        path = Path(cfg.tokenizer.path)
    else:
        (root / TOKENIZER_META).unlink(missing_ok=True)
        tok = get_tokenizer(cfg, cleaned, root, cleaning_fingerprint(cfg, sources))
        path = root / "tokenizer.json"
        if out is not None and Path(out).resolve() != path.resolve():
            save_tokenizer(tok, out)
            path = Path(out)
    rng = random.Random(f"tinylm/bytes-per-token/{cfg.tokenizer.seed}")
    report = {}
    for name, (docs, _) in cleaned.items():
        report[name] = round(bytes_per_token(tok, rng.sample(docs, min(len(docs), 500))), 4)
    return path, report
