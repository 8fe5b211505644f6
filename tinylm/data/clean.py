"""Cleaning one source: normalization, length, exact and near deduplication, Gopher-style quality rules.

Each removed document is counted under the first rule that removes it, so the report's counts add up:
`input = kept + sum(removed)`. The order is: empty, too short, exact duplicate, quality rules, near duplicate
(MinHash LSH against the documents kept so far). Per-document work (`scan_documents`) is separate from the
order-dependent deduplication (`resolve_scans`) so that the first can run on every core. The hashing behind
near deduplication (shingles, MinHash signatures, LSH bands) is `tinylm.data.minhash`.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections import Counter, defaultdict
from itertools import chain

import numpy as np

from tinylm.data.config import CleanConfig
from tinylm.data.minhash import MIX, band_hashes, banding, minhasher, ngram_hashes, shares_band, shingles, word_ids
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


_OWNER_MIX = np.uint64(0xD6E8FEB86659FD93)


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
        keyed *= MIX
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
    key, its MinHash signature or None, its LSH band hashes (`band_hashes`) or None). The order-dependent half,
    deduplication, is `resolve_scans`.

    The rules are those of `quality_failure`, `dedup_key` and `minhash.shingle_hashes`, evaluated for the whole batch
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
            hashes, starts = shingles(table[ids[_subset(sizes, todo)]], sizes[todo], cfg.near_dedup_shingle)
            sigs = minhasher(cfg.near_dedup_num_perm, seed).signatures(hashes, starts)
            n_bands, band_rows = banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)
            for k, sig, band in zip(todo, sigs, band_hashes(sigs, n_bands, band_rows).tolist()):
                pending[k][4] = sig
                pending[k][5] = band
    return [tuple(r) for r in rows]


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
        n_bands, rows = banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)
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
                    and shares_band(signature, signatures[k], width, rows) for k in candidates):
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


def clean_documents(docs: list[str], cfg: CleanConfig, quality: bool) -> tuple[list[str], dict]:
    """The kept documents (NFC, in input order) and a report: input, kept, nfc_changed and one count per rule."""
    return resolve_scans(scan_documents(docs, cfg, quality), cfg)
