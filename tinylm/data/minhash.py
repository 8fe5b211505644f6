"""Near-duplicate detection's hashing: word and n-gram hashes, shingles, MinHash signatures equal to
datasketch's, and its LSH bandings and band hashes. `tinylm.data.clean` decides with them which documents are
near duplicates; the repeated n-gram quality rule uses the same n-gram hashes.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from tinylm.errors import UserError

# An odd 64-bit multiplier (2^64 over the golden ratio): each multiply-add spreads a word's bits over the hash.
MIX = np.uint64(0x9E3779B97F4A7C15)


def word_ids(words: list[str], cache: dict[str, int]) -> np.ndarray:
    """A 64-bit hash per word; each distinct word is hashed once per cache (crc32 and adler32 side by side)."""
    for w in set(words).difference(cache):
        b = w.encode()
        cache[w] = zlib.crc32(b) | (zlib.adler32(b) << 32)
    return np.array([cache[w] for w in words], dtype=np.uint64)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every run of `n` consecutive word ids (one run if there are fewer words)."""
    k = min(n, len(ids))
    count = len(ids) - k + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            combined = combined * MIX + ids[j : j + count]
        combined ^= combined >> np.uint64(29)
        combined *= MIX
    return combined


def shingle_hashes(text: str, n: int, cache: dict[str, int]) -> np.ndarray:
    """32-bit hashes of the document's distinct word n-grams (case-folded), computed with numpy.

    Hashing each shingle's bytes in Python was most of the cost of cleaning; here each distinct word is hashed
    once and n-grams are combined arithmetically.
    """
    words = text.casefold().split()
    if not words:
        return np.zeros(1, dtype=np.uint32)
    return np.unique((ngram_hashes(word_ids(words, cache), n) >> np.uint64(32)).astype(np.uint32))


def _minhash_classes():
    try:
        from datasketch import LeanMinHash, MinHash, MinHashLSH
    except ImportError:
        raise UserError("near-duplicate removal needs datasketch (pip install datasketch), or set "
                        "data.clean.near_dedup = false") from None
    return MinHash, LeanMinHash, MinHashLSH


def _fmix32(h: np.ndarray) -> np.ndarray:
    # MurmurHash3's 32-bit finalizer: datasketch's default "affine32" scheme pre-mixes every input with it.
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures of many documents at once, equal to datasketch's `MinHash.update_batch` over each
    document's shingle hashes (the "affine32" scheme, the default), without a Python call per document."""

    def __init__(self, num_perm: int, seed: int = 1):
        MinHash, _, _ = _minhash_classes()
        template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        if template.scheme != "affine32":
            raise UserError(f"datasketch's default MinHash scheme is {template.scheme!r}; tinylm expects 'affine32'")
        a, b = np.asarray(template.permutations, dtype=np.uint32)
        self.a, self.b = a[None, :], b[None, :]

    def signatures(self, hashes: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """One signature row per document; document i owns `hashes[starts[i]:starts[i + 1]]` (never empty)."""
        mixed = _fmix32(hashes.astype(np.uint32))[None, :]
        a, b = self.a.T, self.b.T
        out = np.empty((len(starts), self.a.shape[1]), dtype=np.uint32)
        # Blocks of documents bound the (permutations x shingles) matrix, which would otherwise be large. It is
        # laid out with shingles along rows because reducing along contiguous memory is several times faster
        # than reducing down columns.
        bounds = list(range(0, len(starts), 128)) + [len(starts)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            first = starts[lo]
            last = starts[hi] if hi < len(starts) else len(hashes)
            phv = a * mixed[:, first:last]
            phv += b
            out[lo:hi] = np.minimum.reduceat(phv, starts[lo:hi] - first, axis=1).T
        return out


@functools.lru_cache(maxsize=4)
def minhasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def band_hashes(sigs: np.ndarray, n_bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per LSH band of each signature row (documents x bands), computed for the whole batch.

    The parent looks buckets up by these integers instead of building each band's bytes per document; equal
    bands always get equal hashes, and `resolve_scans` confirms a band really matches, so a collision can only
    cost a comparison, never change the result.
    """
    bands = sigs[:, : n_bands * rows].reshape(len(sigs), n_bands, rows).astype(np.uint64)
    combined = np.zeros((len(sigs), n_bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            combined = combined * MIX + bands[:, :, j]
        combined ^= combined >> np.uint64(29)
        combined *= MIX
    return combined


def shingles(ids: np.ndarray, sizes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document's shingle hashes (as `shingle_hashes`, repeats kept: they cannot change a minimum) end to
    end, and where each document's start, from word hashes end to end (`word_ids`) and words per document."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    hashes = ngram_hashes(ids, n) if len(ids) >= n else np.zeros(0, dtype=np.uint64)
    owner = np.repeat(np.arange(len(sizes)), sizes)[: len(hashes)]
    keep = np.arange(len(hashes)) + n <= offsets[owner + 1]
    full = (hashes[keep] >> np.uint64(32)).astype(np.uint32)
    per_doc = np.maximum(sizes - n + 1, 0)
    short = np.flatnonzero(sizes < n)
    if not len(short):
        # Every document has whole shingles, which already lie end to end in document order.
        return full, np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    parts, starts, at = [], [], 0
    cut = np.concatenate([[0], np.cumsum(per_doc)])
    for i, size in enumerate(sizes):
        # A document shorter than a shingle is one shingle of all its words, as in `shingle_hashes`.
        part = full[cut[i] : cut[i + 1]] if size >= n else \
            (ngram_hashes(ids[offsets[i] : offsets[i + 1]], n) >> np.uint64(32)).astype(np.uint32)
        parts.append(part)
        starts.append(at)
        at += len(part)
    return np.concatenate(parts), np.array(starts, dtype=np.int64)


_BANDINGS: dict[tuple[float, int], tuple[int, int]] = {}


def banding(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's (bands, rows) for the threshold, remembered: choosing them numerically integrates over every
    candidate banding, which cost more than deduplicating a small source, and it is redone for every source."""
    if (threshold, num_perm) not in _BANDINGS:
        if not 0 < threshold < 1:
            raise UserError(f"data.clean.near_dedup_threshold must be between 0 and 1, got {threshold}")
        _, _, MinHashLSH = _minhash_classes()
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        _BANDINGS[threshold, num_perm] = (lsh.b, lsh.r)
    return _BANDINGS[threshold, num_perm]


def shares_band(a: np.ndarray, b: np.ndarray, width: int, rows: int) -> bool:
    """Whether two signatures agree on every row of at least one band."""
    return bool((a[:width] == b[:width]).reshape(-1, rows).all(axis=1).any())
