"""Data-preparation throughput next to the raw batch-encoding throughput of `tokenizers` on the same text.

`prepare` does more than encode (read, normalize, deduplicate, filter, split, write, fingerprint), so the ratio
says how much that costs: the goal is at least 0.8 of the raw figure.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from tinylm.data import synthetic
from tinylm.data.config import CleanConfig, DataConfig, SourceConfig, TokenizerConfig
from tinylm.data.prepare import prepare, resolve_sources
from tinylm.data.sources import cpu_count, documents
from tinylm.data.tokenizer import load_tokenizer

FAMILIES = {"stories": 0.5, "word_problems": 0.3, "arithmetic": 0.2}


def _write_corpus(folder: Path, target_mb: float) -> list[SourceConfig]:
    sources = []
    for family, share in FAMILIES.items():
        probe = synthetic.generate(family, "train", 200, seed=7, difficulty=3)
        per_doc = sum(len(p.text().encode()) + 12 for p in probe) / len(probe)
        n = max(10, int(target_mb * share * 1e6 / per_doc))
        path = folder / f"{family}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for p in synthetic.generate(family, "train", n, seed=7, difficulty=3):
                f.write(json.dumps({"text": p.text()}) + "\n")
        # Read back as JSON lines, which get the quality filters, except the worked solutions (arithmetic, and
        # word problems since they are worked column by column): their one-digit steps fail the
        # mean-word-length rule whole, as a synthetic source is exempt from it.
        sources.append(SourceConfig(name=family, type="jsonl", path=str(path), quality=family == "stories"))
    return sources


def run(target_mb: float = 3.0, echo: bool = True) -> dict:
    """Time `prepare` (tokenizer already trained) and `encode_batch` on the same documents; MB are 10^6 bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = DataConfig(dir=str(folder / "prepared"), sources=_write_corpus(folder, target_mb),
                         tokenizer=TokenizerConfig(vocab_size=4096))
        prepare(cfg, progress=False)  # trains the tokenizer, which is a one-off cost, not throughput
        shutil.copy(folder / "prepared" / "tokenizer.json", folder / "tokenizer.json")
        cfg.tokenizer = TokenizerConfig(path=str(folder / "tokenizer.json"))
        start = time.perf_counter()
        prepare(cfg, force=True, progress=False)
        prepare_s = time.perf_counter() - start
        # The same run with every cleaning rule off separates cleaning from reading, encoding and writing.
        cfg.clean = CleanConfig(min_chars=0, min_words=0, exact_dedup=False, near_dedup=False)
        for src in cfg.sources:
            src.quality = False
        start = time.perf_counter()
        prepare(cfg, force=True, progress=False)
        bare_s = time.perf_counter() - start
        docs = [d for src in resolve_sources(cfg) for d in documents(src)]
        tok = load_tokenizer(folder / "tokenizer.json")
        start = time.perf_counter()
        tok.encode_batch(docs, add_special_tokens=False)
        raw_s = time.perf_counter() - start
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    result = {
        "data_mb": round(mb, 3),
        "docs": len(docs),
        "cores": cpu_count(),
        "prepare_mb_per_s": round(mb / prepare_s, 3),
        "tokenizers_encode_batch_mb_per_s": round(mb / raw_s, 3),
        "prepare_vs_raw": round(raw_s / prepare_s, 3),
        "prepare_without_cleaning_mb_per_s": round(mb / bare_s, 3),
        "prepare_without_cleaning_vs_raw": round(raw_s / bare_s, 3),
    }
    if echo:
        print(f"data prepare: {result['prepare_mb_per_s']:.2f} MB/s   tokenizers encode_batch: "
              f"{result['tokenizers_encode_batch_mb_per_s']:.2f} MB/s   ratio {result['prepare_vs_raw']:.2f} "
              f"({mb:.1f} MB, {len(docs)} docs, {result['cores']} cores)")
        print(f"  without cleaning rules: {result['prepare_without_cleaning_mb_per_s']:.2f} MB/s, ratio "
              f"{result['prepare_without_cleaning_vs_raw']:.2f}")
    return result


if __name__ == "__main__":
    run()
