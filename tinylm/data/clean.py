"""Cleaning one source: normalization, length, exact and near deduplication, Gopher-style quality rules.

Each removed document is counted under the first rule that removes it, so the report's counts add up:
`input = kept + sum(removed)`. The order is: empty, too short, exact duplicate, quality rules, near duplicate
(MinHash LSH against the documents kept so far). Per-document work (`scan_documents`) is separate from the
order-dependent deduplication (`resolve_scans`) so that the first can run on every core.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
import zlib
from collections import Counter

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


def scan_documents(docs: list[str], cfg: CleanConfig, quality: bool, seed: int = 1) -> list[tuple]:
    """The per-document half of cleaning, independent across documents (so it runs in worker processes).

    One tuple per document: (NFC text, whether NFC changed it, the rule that removes it or None, its exact-dedup
    key, its MinHash signature or None). The order-dependent half, deduplication, is `resolve_scans`.
    """
    template = None
    if cfg.near_dedup:
        MinHash, _, _ = _minhash_classes()
        # Shingles arrive already hashed, so the hash function is the identity.
        template = MinHash(num_perm=cfg.near_dedup_num_perm, seed=seed, hashfunc=int)
    cache: dict[str, int] = {}
    out = []
    for raw in docs:
        text = normalize(raw)
        stripped = text.strip()
        key, signature = None, None
        if not stripped:
            rule = "empty"
        elif len(stripped) < cfg.min_chars or len(stripped.split()) < cfg.min_words:
            rule = "too_short"
        else:
            rule = quality_failure(stripped, cfg) if quality else None
            key = dedup_key(stripped)
            if rule is None and template is not None:
                mh = template.copy()
                mh.update_batch(shingle_hashes(stripped, cfg.near_dedup_shingle, cache).tolist())
                signature = mh.hashvalues
        out.append((text, text != raw, rule, key, signature))
    return out


def resolve_scans(scans, cfg: CleanConfig, seed: int = 1) -> tuple[list[str], dict]:
    """Apply the scans in input order: removal rules, then exact and near deduplication against earlier kept
    documents. Returns the kept documents and the report (input, kept, nfc_changed, one count per rule)."""
    removed = dict.fromkeys(RULES, 0)
    counts = {"input": 0, "nfc_changed": 0}
    kept: list[str] = []
    seen: set[bytes] = set()
    lsh = lean = scheme = None
    if cfg.near_dedup:
        if not 0 < cfg.near_dedup_threshold < 1:
            raise UserError(f"data.clean.near_dedup_threshold must be between 0 and 1, got {cfg.near_dedup_threshold}")
        MinHash, lean, MinHashLSH = _minhash_classes()
        lsh = MinHashLSH(threshold=cfg.near_dedup_threshold, num_perm=cfg.near_dedup_num_perm)
        scheme = MinHash(num_perm=1, seed=seed).scheme
    signatures: dict[int, object] = {}
    for text, changed, rule, key, signature in scans:
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
        if lsh is not None:
            mh = lean(seed=seed, hashvalues=signature, scheme=scheme)
            # LSH only proposes candidates; confirm with the estimated Jaccard so the threshold means what it says.
            if any(mh.jaccard(signatures[k]) >= cfg.near_dedup_threshold for k in lsh.query(mh)):
                removed["near_duplicate"] += 1
                continue
            signatures[len(kept)] = mh
            lsh.insert(len(kept), mh)
        kept.append(text)
    return kept, {"input": counts["input"], "kept": len(kept), "nfc_changed": counts["nfc_changed"],
                  "removed": removed}


def clean_documents(docs: list[str], cfg: CleanConfig, quality: bool) -> tuple[list[str], dict]:
    """The kept documents (NFC, in input order) and a report: input, kept, nfc_changed and one count per rule."""
    return resolve_scans(scan_documents(docs, cfg, quality), cfg)
