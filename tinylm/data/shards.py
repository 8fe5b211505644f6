"""Token shards on disk: one flat token file and one document-offset file per source and split.

Layout of a prepared data directory::

    manifest.json              vocab, dtype, special ids, per-source counts, content fingerprint
    tokenizer.json             the tokenizer the tokens were made with (Hugging Face format)
    token_bytes.npy            UTF-8 byte length of each token id (0 for special tokens), for bits per byte
    <source>/train.bin         tokens of every training document, back to back (uint16 or uint32)
    <source>/train.idx.npy     int64 offsets into train.bin, one per document plus the end
    <source>/val.bin, val.idx.npy

Every document starts with the BOS token, so any document offset is a valid start of a packed row.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.errors import UserError
from tinylm.files import fsync_dir, process_alive

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
_TEMPORARY = re.compile(r"^\..+\.tmp(\d*)(\.npy)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents (arrays of token ids, BOS first) to `<dir>/<split>.bin` and its offsets.

    The files appear under their final names only on `close()`, so an interrupted prepare
    never leaves a half-written shard that looks complete.
    """

    def __init__(self, source_dir: str | os.PathLike, split: str, dtype: np.dtype):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dir = Path(source_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        self._tmp = self.dir / f".{split}.bin.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._offsets = [0]

    def add(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and int(arr.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(arr.max())} does not fit {self.dtype}")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def add_many(self, docs) -> None:
        """`add` for each document (a sequence of token ids), as one conversion and one write: per-document
        arrays and writes were a visible share of prepare's time for short documents."""
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        arr = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=total)
        if arr.size and int(arr.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(arr.max())} does not fit {self.dtype}")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.extend((self._offsets[-1] + np.cumsum(lengths)).tolist())

    def close(self) -> tuple[int, int]:
        """Finish both files; returns (documents, tokens)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        idx_tmp = self.dir / f".{self.split}.idx.tmp{os.getpid()}.npy"
        np.save(idx_tmp, np.asarray(self._offsets, dtype=np.int64))
        os.replace(self._tmp, self.dir / f"{self.split}.bin")
        os.replace(idx_tmp, self.dir / f"{self.split}.idx.npy")
        fsync_dir(self.dir)
        return len(self._offsets) - 1, self._offsets[-1]


def remove_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files (`.train.bin.tmp<pid>` and the like) that interrupted or failed prepares
    left in `root` and its source folders; those of a process still running are kept. Returns what went."""
    gone = []
    for folder in [root] + [p for p in root.iterdir() if p.is_dir()]:
        for path in folder.iterdir():
            found = _TEMPORARY.match(path.name)
            pid = int(found.group(1)) if found and found.group(1) else None
            if found and path.is_file() and (pid is None or (pid != os.getpid() and not process_alive(pid))):
                path.unlink(missing_ok=True)
                gone.append(path)
    return gone


@dataclass
class Split:
    """One source's split, memory-mapped: `tokens[offsets[i]:offsets[i+1]]` is document i."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


class ShardSet:
    """A prepared data directory opened for reading."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise UserError(f"no prepared data at {self.root} (missing {MANIFEST}); run `tinylm data prepare`")
        again = "re-run `tinylm data prepare --force`"
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); {again}") from None
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("sources"), dict):
            raise UserError(f"{path} is damaged: not a manifest (an object with a `sources` table); {again}")
        try:
            self.vocab_size = int(self.manifest["vocab_size"])
            self.dtype = np.dtype(self.manifest["dtype"])
            self.bos_id = int(self.manifest["bos_id"])
            self.eos_id = int(self.manifest.get("eos_id", self.bos_id))
            self.fingerprint = str(self.manifest["fingerprint"])
        except KeyError as e:
            raise UserError(f"{path} is damaged: it has no `{e.args[0]}`; {again}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} is damaged ({e}); {again}") from None
        self.sources = list(self.manifest["sources"])
        self._splits: dict[tuple[str, str], Split] = {}

    def split(self, source: str, split: str) -> Split:
        key = (source, split)
        if key not in self._splits:
            if source not in self.manifest["sources"]:
                raise UserError(f"source {source!r} is not in {self.root / MANIFEST}")
            d = self.root / source
            try:
                offsets = np.load(d / f"{split}.idx.npy", mmap_mode="r")
                n = int(offsets[-1])
                tokens = (
                    np.memmap(d / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))
                    if n
                    else np.zeros(0, self.dtype)
                )
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"shard for source {source!r} split {split!r} in {d} is missing or damaged: {e}") from None
            self._splits[key] = Split(tokens, offsets)
        return self._splits[key]

    def token_bytes(self) -> np.ndarray:
        """Bytes each token id decodes to; specials count zero (they are not text)."""
        path = self.root / "token_bytes.npy"
        if not path.is_file():
            raise UserError(f"{path} is missing; re-run `tinylm data prepare`")
        return np.load(path)

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest.get("tokenizer", "tokenizer.json")
