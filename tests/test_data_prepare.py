import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tinylm.config import from_dict
from tinylm.data import prepare as prep
from tinylm.cli.data import app, tokenizer_app
from tinylm.data.config import DataConfig
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

PROSE = [f"Document number {i} tells how the {animal} crossed the {place} before the {weather} came over the hills."
         for i, (animal, place, weather) in enumerate(
             (a, p, w) for a in ("fox", "heron", "badger", "otter", "wren") for p in ("river", "meadow", "ridge",
                                                                                    "valley") for w in ("storm", "rain"))]


def small_corpus(tmp_path: Path) -> Path:
    (tmp_path / "notes").mkdir()
    for i, text in enumerate(PROSE):
        (tmp_path / "notes" / f"{i:02d}.txt").write_text(text)
    (tmp_path / "notes" / "dup.txt").write_text(PROSE[0])
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}
            for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def data_cfg(tmp_path: Path, **extra) -> DataConfig:
    base = {
        "dir": str(tmp_path / "prepared"),
        "val_fraction": 0.1,
        "workers": 1,
        "tokenizer": {"vocab_size": 320},
        "sources": [
            {"name": "notes", "type": "text", "path": str(tmp_path / "notes")},
            {"name": "qa", "type": "jsonl", "path": str(tmp_path / "qa.jsonl"), "prompt_field": "question",
             "completion_field": "answer", "quality": False},
            {"name": "arith", "type": "synthetic", "generator": "arithmetic", "num_docs": 60},
        ],
    }
    base.update(extra)
    return from_dict(DataConfig, base, "test")


def test_prepare_writes_shards_manifest_and_splits_by_document(tmp_path):
    cfg = data_cfg(small_corpus(tmp_path))
    root = prep.prepare(cfg, progress=False)
    shards = ShardSet(root)
    m = shards.manifest
    assert set(m["sources"]) == {"notes", "qa", "arith"}
    assert m["sources"]["notes"]["cleaning"]["removed"]["exact_duplicate"] == 1
    assert m["dtype"] == "uint16" and m["vocab_size"] <= 320 and m["bos_id"] == 0 and m["eos_id"] == 1
    assert shards.token_bytes().shape == (m["vocab_size"],)
    for name in shards.sources:
        train, val = shards.split(name, "train"), shards.split(name, "val")
        assert m["sources"][name]["train"] == {"docs": train.num_docs, "tokens": train.num_tokens,
                                              "bytes": m["sources"][name]["train"]["bytes"]}
        assert val.num_docs >= 1
        train_docs = {train.doc(i).tobytes() for i in range(train.num_docs)}
        for i in range(val.num_docs):
            doc = val.doc(i)
            assert doc[0] == shards.bos_id
            assert doc.tobytes() not in train_docs
        assert all(train.doc(i)[0] == shards.bos_id for i in range(train.num_docs))
    from tinylm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(shards.tokenizer_path)
    first = shards.split("notes", "train").doc(0)[1:]
    assert tok.decode(first.tolist()) in PROSE


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, monkeypatch):
    corpus = small_corpus(tmp_path)
    cfg = data_cfg(corpus)
    root = prep.prepare(cfg, progress=False)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    fingerprint = ShardSet(root).fingerprint

    def fail(*a, **k):
        raise AssertionError("prepare did work on unchanged input")

    monkeypatch.setattr(prep, "clean_sources", fail)
    # what a prepare killed after its last shard leaves (its pid long gone) goes even though nothing is redone
    (root / "notes" / ".train.bin.tmp999999999").write_bytes(b"\0" * 64)
    assert prep.prepare(cfg, progress=False) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert not list(root.rglob("*.tmp999999999")) and not (root / ".lock").exists()
    monkeypatch.undo()
    (corpus / "notes" / "new.txt").write_text("A brand new document about a lighthouse and its patient keeper.")
    prep.prepare(cfg, progress=False)
    assert ShardSet(root).manifest["sources"]["notes"]["cleaning"]["input"] == len(PROSE) + 2
    assert ShardSet(root).fingerprint != fingerprint


def test_parallel_cleaning_matches_serial(tmp_path):
    corpus = small_corpus(tmp_path)
    serial = ShardSet(prep.prepare(data_cfg(corpus), progress=False))
    parallel = ShardSet(prep.prepare(data_cfg(corpus, dir=str(tmp_path / "par"), workers=2), progress=False))
    assert serial.fingerprint == parallel.fingerprint


def test_existing_tokenizer_is_used(tmp_path):
    corpus = small_corpus(tmp_path)
    first = prep.prepare(data_cfg(corpus), progress=False)
    cfg = data_cfg(corpus, dir=str(tmp_path / "again"), tokenizer={"path": str(first / "tokenizer.json")})
    second = prep.prepare(cfg, progress=False)
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_source_empty_after_cleaning_names_it(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")
    cfg = from_dict(DataConfig, {"dir": str(tmp_path / "p"), "workers": 1,
                                 "sources": [{"name": "tiny", "type": "text", "path": str(tmp_path / "tiny.txt")}]}, "t")
    with pytest.raises(UserError, match="'tiny'.*no documents left after cleaning"):
        prep.prepare(cfg, progress=False)


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    runner = CliRunner()
    cases = {
        "'missing'": '[[data.sources]]\nname = "missing"\ntype = "text"\npath = "nowhere/at/all.txt"\n',
        "'pq'": '[[data.sources]]\nname = "pq"\ntype = "parquet"\npath = "{bad}"\n',
        "'empty'": '[[data.sources]]\nname = "empty"\ntype = "text"\npath = "{short}"\n',
    }
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    (tmp_path / "short.txt").write_text("x")
    for needle, body in cases.items():
        body = body.format(bad=tmp_path / "bad.parquet", short=tmp_path / "short.txt")
        recipe = write_recipe(tmp_path / "r.toml", f'[data]\ndir = "{tmp_path / "out"}"\nworkers = 1\n{body}')
        result = runner.invoke(app, ["prepare", str(recipe)])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], result.output
    assert runner.invoke(app, ["prepare", str(tmp_path / "nope.toml")]).exit_code == 2


def test_cli_prepare_and_tokenizer_train(tmp_path):
    corpus = small_corpus(tmp_path)
    recipe = write_recipe(tmp_path / "r.toml", f"""
[data]
dir = "{tmp_path / 'cli'}"
workers = 1
[data.tokenizer]
vocab_size = 300
[[data.sources]]
name = "notes"
type = "text"
path = "{corpus / 'notes'}"
""")
    runner = CliRunner()
    result = runner.invoke(tokenizer_app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "notes" in result.output and "bytes/token" in result.output
    result = runner.invoke(app, ["prepare", str(recipe), "--set", "data.val_fraction=0.2"])
    assert result.exit_code == 0, result.output
    assert ShardSet(tmp_path / "cli").split("notes", "val").num_docs == 8
    again = runner.invoke(app, ["prepare", str(recipe), "--set", "data.val_fraction=0.2"])
    assert "up to date" in again.output


def test_default_synthetic_mixture_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(DataConfig, {"tokenizer": {"vocab_size": 512}}, "t")
    cfg.sources = [s for s in prep.resolve_sources(cfg)]
    for s in cfg.sources:
        s.num_docs = 80
    root = prep.prepare(cfg, progress=False)
    assert root == Path("data/prepared")
    assert "stories" in ShardSet(root).sources and "word_problems" in ShardSet(root).sources


@pytest.mark.slow
def test_shared_files_prepare(tmp_path):
    if not (SHARED / "tinyshakespeare.txt").is_file():
        pytest.skip("shared data not present")
    cfg = from_dict(DataConfig, {"dir": str(tmp_path / "p"), "tokenizer": {"vocab_size": 1024}, "sources": [
        {"name": "shakespeare", "type": "text", "path": str(SHARED / "tinyshakespeare.txt"), "chunk_chars": 2000},
        {"name": "gsm8k", "type": "jsonl", "path": str(SHARED / "gsm8k_train.jsonl"), "prompt_field": "question",
         "completion_field": "answer"}]}, "t")
    shards = ShardSet(prep.prepare(cfg, progress=False))
    assert shards.split("shakespeare", "val").num_docs > 5
    assert shards.manifest["sources"]["gsm8k"]["cleaning"]["kept"] > 7000


def test_split_docs_with_precomputed_keys_matches_recomputed():
    from tinylm.data.clean import dedup_key

    docs = [f"document number {i} with some words" for i in range(50)]
    keys = [dedup_key(d) for d in docs]
    assert prep.split_docs(docs, 0.1, keys) == prep.split_docs(docs, 0.1)
    with pytest.raises(ValueError):
        prep.split_docs(docs, 0.1, keys[:-1])


def test_shard_writer_add_many_equals_add(tmp_path):
    from tinylm.data.shards import ShardWriter

    docs = [[1, 5, 7], [1], [1, 300, 2, 9], []]
    one = ShardWriter(tmp_path / "a", "train", np.uint16)
    for d in docs:
        one.add(np.asarray(d, dtype=np.int64))
    assert one.close() == (4, 8)
    many = ShardWriter(tmp_path / "b", "train", np.uint16)
    many.add_many(docs[:2])
    many.add_many([])
    many.add_many(docs[2:])
    assert many.close() == (4, 8)
    for name in ("train.bin", "train.idx.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "c", "train", np.uint8).add_many([[1, 256]])
