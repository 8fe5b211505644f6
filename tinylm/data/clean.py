"""Cleaning one source: normalization, length, exact and near deduplication, Gopher-style quality rules.

Each removed document is counted under the first rule that removes it, so the report's counts add up:
`input = kept + sum(removed)`. The order is: empty, too short, exact duplicate, quality rules, near duplicate
(MinHash LSH against the documents kept so far). Per-document work (`scan_documents`) is separate from the
order-dependent deduplication (`resolve_scans`) so that the first can run on every core.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
import unicodedata
import zlib
from collections import Counter, defaultdict
from itertools import chain

import numpy as np

from tinylm.data.config import CleanConfig
from tinylm.errors import UserError

RULES = (
    "empty",
    "too_short",
    "exact_duplicate",
    "mean_word_length",
    "symbol_word_ratio",
    "ellipsis_lines",
    "repeated_ngrams",
    "near_duplicate",
)
"""Removal rules in the order they are applied (the report lists them in this order)."""

_WS = re.compile(r"\s+")
_SYMBOL = re.compile(r"#+|\.\.\.|\u2026")
_PUNCTUATION = string.punctuation + "\u2026\u201c\u201d\u2018\u2019"


def normalize(text: str) -> str:
    """NFC: the one form every stored document is in."""
    return unicodedata.normalize("NFC", text)


def dedup_key(text: str) -> bytes:
    """Documents that differ only in case and spacing count as the same."""
    return hashlib.blake2b(_WS.sub(" ", text.casefold()).strip().encode(), digest_size=16).digest()


def quality_failure(text: str, cfg: CleanConfig) -> str | None:
    """The first Gopher-style rule the document breaks, or None."""
    words = text.split()
    if not words:
        return "mean_word_length"
    bare = [w for w in (w.strip(_PUNCTUATION) for w in words) if w]
    mean_len = sum(map(len, bare)) / len(bare) if bare else 0.0
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length"
    if len(_SYMBOL.findall(text)) / len(words) > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if "..." in text or "\u2026" in text:
        lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
        ellipsis = sum(ln.endswith(("...", "\u2026")) for ln in lines)
        if ellipsis / len(lines) > cfg.max_ellipsis_line_share:
            return "ellipsis_lines"
    if repeated_ngram_share(words, cfg.repeated_ngram_n) > cfg.max_repeated_ngram_share:
        return "repeated_ngrams"
    return None


_MIX = np.uint64(0x9E3779B97F4A7C15)
_OWNER_MIX = np.uint64(0xD6E8FEB86659FD93)


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
            combined = combined * _MIX + ids[j : j + count]
        combined ^= combined >> np.uint64(29)
        combined *= _MIX
    return combined


def repeated_ngram_share(words: list[str], n: int) -> float:
    """Share of word characters inside word n-grams (case-folded) that occur more than once in the document."""
    if len(words) < n or n <= 0:
        return 0.0
    lowered = [w.casefold() for w in words]
    grams = [tuple(lowered[i : i + n]) for i in range(len(lowered) - n + 1)]
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = [True] * n
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


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
def _minhasher(num_perm: int, seed: int) -> MinHasher:
    return MinHasher(num_perm, seed)


def _dense(values: np.ndarray) -> np.ndarray:
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def _repeated_starts(ids: np.ndarray, owner: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """The n-gram starts whose n-gram occurs again in the same document.

    A 64-bit hash sorts the n-grams once; equal neighbours are then compared word by word, and only if a
    collision ever shows up are the n-grams renumbered exactly (one `np.unique` per word), so the result never
    depends on the hash.
    """
    with np.errstate(over="ignore"):
        # The owner is mixed in non-linearly: adding owner * constant to a hash that is itself a multiple of
        # that constant let the same n-gram collide across neighbouring documents, forcing the slow exact path.
        keyed = ngram_hashes(ids.astype(np.uint64), n)[starts] ^ (owner[starts].astype(np.uint64) * _OWNER_MIX)
        keyed ^= keyed >> np.uint64(31)
        keyed *= _MIX
        keyed ^= keyed >> np.uint64(29)
    # Any sort that puts equal keys side by side will do (every equal neighbour pair is checked), so the
    # faster unstable one is used.
    order = np.argsort(keyed, kind="quicksort")
    ranked = keyed[order]
    same = ranked[1:] == ranked[:-1]
    left, right = starts[order[:-1][same]], starts[order[1:][same]]
    equal = owner[left] == owner[right]
    for j in range(n):
        equal &= ids[left + j] == ids[right + j]
    if equal.all():
        dup = np.zeros(len(starts), dtype=bool)
        pos = np.flatnonzero(same)
        dup[order[pos]] = True
        dup[order[pos + 1]] = True
        return starts[dup]
    width = np.int64(max(int(ids.max()), int(owner.max())) + 2)
    gram = ids[starts]
    for j in range(1, n):
        gram = _dense(gram * width + ids[starts + j])
    gram = gram * width + owner[starts]
    _, inverse, counts = np.unique(gram, return_inverse=True, return_counts=True)
    return starts[counts[inverse.reshape(-1)] > 1]


def repeated_ngram_shares(folded: list[list[str]], lengths: list[list[int]], n: int) -> list[float]:
    """`repeated_ngram_share` of many documents at once (given case-folded words and original word lengths).

    N-grams are compared exactly: words get dense ids, and each n-gram's id is built one word at a time by
    renumbering (id, next word) pairs, so no hash collision can merge two different n-grams.
    """
    ids, _ = _dense_ids(folded)
    sizes = np.fromiter(map(len, folded), dtype=np.int64, count=len(folded))
    chars = np.fromiter(chain.from_iterable(lengths), dtype=np.int64)
    return _repeated_shares(ids, sizes, chars, n)


def _dense_ids(folded: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Every word's dense id (end to end) and the distinct words in id order."""
    vocab: defaultdict[str, int] = defaultdict()
    vocab.default_factory = vocab.__len__  # a new word gets the next id
    ids = np.fromiter(map(vocab.__getitem__, chain.from_iterable(folded)), dtype=np.int64)
    return ids, list(vocab)


def _repeated_shares(ids: np.ndarray, sizes: np.ndarray, chars: np.ndarray, n: int) -> list[float]:
    """`repeated_ngram_shares` from dense word ids, words per document and each word's original length."""
    shares = [0.0] * len(sizes)
    docs = np.flatnonzero(sizes >= n) if n > 0 else np.zeros(0, dtype=np.int64)
    if not len(docs):
        return shares
    if len(docs) < len(sizes):
        chosen = np.repeat(sizes >= n, sizes)
        ids, chars, sizes = ids[chosen], chars[chosen], sizes[docs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.repeat(np.arange(len(docs)), sizes)
    count = len(ids) - n + 1
    starts = np.arange(count)
    starts = starts[starts + n <= offsets[owner[:count] + 1]]
    repeated = _repeated_starts(ids, owner, starts, n)
    edges = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(edges, repeated, 1)
    np.add.at(edges, repeated + n, -1)
    covered = np.cumsum(edges[:-1]) > 0
    covered_chars = np.add.reduceat(np.where(covered, chars, 0), offsets[:-1]).tolist()
    total_chars = np.add.reduceat(chars, offsets[:-1]).tolist()
    for i, covered_k, total in zip(docs.tolist(), covered_chars, total_chars):
        shares[i] = covered_k / total if total else 0.0
    return shares


def scan_documents(docs: list[str], cfg: CleanConfig, quality: bool, seed: int = 1) -> list[tuple]:
    """The per-document half of cleaning, independent across documents (so it runs in worker processes).

    One tuple per document: (NFC text, whether NFC changed it, the rule that removes it or None, its exact-dedup
    key, its MinHash signature or None, its LSH band hashes (`band_hashes`) or None). The order-dependent half, deduplication, is `resolve_scans`.

    The rules are those of `quality_failure`, `dedup_key` and `shingle_hashes`, evaluated for the whole batch
    with numpy where a per-document Python loop was most of the cost of `prepare`.
    """
    rows: list[list] = []
    split: list[list[str]] = []
    texts: list[str] = []
    for raw in docs:
        # ASCII text is already NFC; skipping the call matters because most documents are ASCII.
        text = raw if raw.isascii() else normalize(raw)
        stripped = text.strip()
        row = [text, text != raw, None, None, None, None]
        rows.append(row)
        if not stripped:
            row[2] = "empty"
            continue
        words = stripped.split()
        if len(stripped) < cfg.min_chars or len(words) < cfg.min_words:
            row[2] = "too_short"
            continue
        # Case folding never creates or removes whitespace, and it maps each character on its own, so folding
        # the joined words is `dedup_key`'s collapse of the folded text, and folding word by word (below, once
        # per distinct word) gives the words of the folded text.
        row[3] = hashlib.blake2b(" ".join(words).casefold().encode(), digest_size=16).digest()
        split.append(words)
        texts.append(stripped)
    pending = [r for r in rows if r[3] is not None]
    if not pending or not (quality or cfg.near_dedup):
        return [tuple(r) for r in rows]
    # One dense id per distinct word serves every rule below, so each word is looked up once; per-word
    # properties (folded form, lengths, hash) are computed once per distinct word and gathered with numpy.
    raw_ids, raw_vocab = _dense_ids(split)
    sizes = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
    folded_ids, vocab = _dense_ids([[w.casefold() for w in raw_vocab]])
    ids = folded_ids[raw_ids]
    if quality:
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        bare_len = np.fromiter((len(w.strip(_PUNCTUATION)) for w in raw_vocab), dtype=np.int64,
                               count=len(raw_vocab))[raw_ids]
        letters = np.add.reduceat(bare_len, offsets).tolist()
        bare = np.add.reduceat((bare_len > 0).astype(np.int64), offsets).tolist()
        for row, stripped, n_words, total, n_bare in zip(pending, texts, sizes.tolist(), letters, bare):
            mean_len = total / n_bare if n_bare else 0.0
            if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
                row[2] = "mean_word_length"
            elif _symbol_count(stripped) / n_words > cfg.max_symbol_word_ratio:
                row[2] = "symbol_word_ratio"
            elif ("..." in stripped or "\u2026" in stripped) and _ellipsis_share(stripped) > cfg.max_ellipsis_line_share:
                row[2] = "ellipsis_lines"
    if quality:
        # Only documents no earlier rule removed are checked.
        todo = [k for k, r in enumerate(pending) if r[2] is None]
        chosen = _subset(sizes, todo)
        chars = np.fromiter(map(len, raw_vocab), dtype=np.int64, count=len(raw_vocab))[raw_ids[chosen]]
        shares = _repeated_shares(ids[chosen], sizes[todo], chars, cfg.repeated_ngram_n)
        for k, share in zip(todo, shares):
            if share > cfg.max_repeated_ngram_share:
                pending[k][2] = "repeated_ngrams"
    if cfg.near_dedup:
        todo = [k for k, r in enumerate(pending) if r[2] is None]
        if todo:
            table = word_ids(vocab, {})
            hashes, starts = _shingles(table[ids[_subset(sizes, todo)]], sizes[todo], cfg.near_dedup_shingle)
            sigs = _minhasher(cfg.near_dedup_num_perm, seed).signatures(hashes, starts)
            n_bands, band_rows = _banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)
            for k, sig, band in zip(todo, sigs, band_hashes(sigs, n_bands, band_rows).tolist()):
                pending[k][4] = sig
                pending[k][5] = band
    return [tuple(r) for r in rows]


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
            combined = combined * _MIX + bands[:, :, j]
        combined ^= combined >> np.uint64(29)
        combined *= _MIX
    return combined


_HASHES = re.compile(r"#+")


def _symbol_count(text: str) -> int:
    """`len(_SYMBOL.findall(text))` without the regex for most documents: its three alternatives share no
    character, so their non-overlapping matches are counted apart, and `#` runs only where a `#` occurs."""
    count = text.count("...") + text.count("\u2026")
    return count + len(_HASHES.findall(text)) if "#" in text else count


def _ellipsis_share(text: str) -> float:
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    return sum(ln.endswith(("...", "\u2026")) for ln in lines) / len(lines)


def _subset(sizes: np.ndarray, docs: list[int]) -> np.ndarray:
    """Mask over end-to-end words selecting those of `docs` (ascending document indices)."""
    keep = np.zeros(len(sizes), dtype=bool)
    keep[docs] = True
    return np.repeat(keep, sizes)


def _shingle_batch(folded: list[list[str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document's shingle hashes (as `shingle_hashes`, repeats kept: they cannot change a minimum) end to
    end, and where each document's start."""
    sizes = np.fromiter(map(len, folded), dtype=np.int64, count=len(folded))
    return _shingles(word_ids([w for words in folded for w in words], {}), sizes, n)


def _shingles(ids: np.ndarray, sizes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`_shingle_batch` from word hashes end to end and words per document."""
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


def _banding(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's (bands, rows) for the threshold, remembered: choosing them numerically integrates over every
    candidate banding, which cost more than deduplicating a small source, and it is redone for every source."""
    if (threshold, num_perm) not in _BANDINGS:
        if not 0 < threshold < 1:
            raise UserError(f"data.clean.near_dedup_threshold must be between 0 and 1, got {threshold}")
        _, _, MinHashLSH = _minhash_classes()
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        _BANDINGS[threshold, num_perm] = (lsh.b, lsh.r)
    return _BANDINGS[threshold, num_perm]


def resolve_scans(scans, cfg: CleanConfig, seed: int = 1, keys: list | None = None) -> tuple[list[str], dict]:
    """Apply the scans in input order: removal rules, then exact and near deduplication against earlier kept
    documents. Returns the kept documents and the report (input, kept, nfc_changed, one count per rule).

    When `keys` is a list, the `dedup_key` of each kept document is appended to it, in the same order, so later
    steps (the train/val split) need not hash the text again."""
    removed = dict.fromkeys(RULES, 0)
    counts = {"input": 0, "nfc_changed": 0}
    kept: list[str] = []
    seen: set[bytes] = set()
    near = cfg.near_dedup
    if near:
        if not 0 < cfg.near_dedup_threshold < 1:
            raise UserError(f"data.clean.near_dedup_threshold must be between 0 and 1, got {cfg.near_dedup_threshold}")
        # datasketch chooses the banding (bands x rows) for the threshold; the buckets are kept here as plain
        # dicts keyed by each band's bytes, which finds the same candidates without a Python object per document.
        n_bands, rows = _banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)
        width = n_bands * rows
        buckets: list[dict[int, list[int]]] = [{} for _ in range(n_bands)]
    signatures: dict[int, np.ndarray] = {}
    for text, changed, rule, key, signature, band_keys in scans:
        counts["input"] += 1
        counts["nfc_changed"] += changed
        if rule in ("empty", "too_short"):
            removed[rule] += 1
            continue
        if cfg.exact_dedup:
            if key in seen:
                removed["exact_duplicate"] += 1
                continue
            seen.add(key)
        if rule:
            removed[rule] += 1
            continue
        if near:
            candidates = None  # most documents have none, so no set is made for them
            for bucket, band in zip(buckets, band_keys):
                found = bucket.get(band)
                if found:
                    if candidates is None:
                        candidates = set(found)
                    else:
                        candidates.update(found)
            # LSH only proposes candidates; confirm with the estimated Jaccard (datasketch's: the share of equal
            # signature entries) so the threshold means what it says. Buckets are keyed by band hashes, so a
            # candidate also needs one band that is really equal: exactly datasketch's candidates, whatever the hash.
            if candidates and any(
                    np.count_nonzero(signature == signatures[k]) / len(signature) >= cfg.near_dedup_threshold
                    and _shares_band(signature, signatures[k], width, rows) for k in candidates):
                removed["near_duplicate"] += 1
                continue
            signatures[len(kept)] = signature
            for bucket, band in zip(buckets, band_keys):
                found = bucket.get(band)
                if found is None:
                    bucket[band] = [len(kept)]
                else:
                    found.append(len(kept))
        kept.append(text)
        if keys is not None:
            keys.append(key)
    return kept, {"input": counts["input"], "kept": len(kept), "nfc_changed": counts["nfc_changed"],
                  "removed": removed}


def _shares_band(a: np.ndarray, b: np.ndarray, width: int, rows: int) -> bool:
    """Whether two signatures agree on every row of at least one band."""
    return bool((a[:width] == b[:width]).reshape(-1, rows).all(axis=1).any())


def clean_documents(docs: list[str], cfg: CleanConfig, quality: bool) -> tuple[list[str], dict]:
    """The kept documents (NFC, in input order) and a report: input, kept, nfc_changed and one count per rule."""
    return resolve_scans(scan_documents(docs, cfg, quality), cfg)
