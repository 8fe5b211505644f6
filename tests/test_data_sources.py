import json
from pathlib import Path

import pytest

from tinylm.data.config import SourceConfig
from tinylm.data.sources import chat_examples, documents, input_files, records
from tinylm.data.tokenizer import ASSISTANT, USER
from tinylm.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_files_folders_and_chunks(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first file")
    (tmp_path / "docs" / "b.md").write_text("second file")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00")
    src = SourceConfig(name="t", type="text", path=str(tmp_path / "docs"))
    assert documents(src) == ["first file", "second file"]
    big = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(30))
    (tmp_path / "big.txt").write_text(big)
    chunks = documents(SourceConfig(name="b", type="text", path=str(tmp_path / "big.txt"), chunk_chars=400))
    assert len(chunks) > 5 and all(len(c) < 600 for c in chunks)
    assert "".join(chunks).replace("\n", "") == big.replace("\n", "")
    glob_src = SourceConfig(name="g", type="text", path=str(tmp_path / "docs" / "*.txt"))
    assert documents(glob_src) == ["first file"]


def test_jsonl_formats(tmp_path):
    rows = [
        {"text": "plain document"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Q?", "completion": "A."},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    docs = documents(SourceConfig(name="j", type="jsonl", path=str(path)))
    assert docs[0] == "plain document"
    assert docs[1] == f"{USER}2+2?<|end|>{ASSISTANT}4<|end|>"
    assert docs[2] == "Q?\nA."
    chats = list(chat_examples(SourceConfig(name="j", type="jsonl", path=str(path))))
    assert len(chats) == 2 and chats[1][0] == {"role": "user", "content": "Q?"}
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"body": "x y z"}, {"body": "a b c"}])
    src = SourceConfig(name="c", type="jsonl", path=str(custom), format="text", text_field="body", max_docs=1)
    assert list(records(src)) == ["x y z"]


def test_jsonl_errors_name_the_source(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="'broken'.*line 2"):
        documents(SourceConfig(name="broken", type="jsonl", path=str(bad)))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"other": 1}])
    with pytest.raises(UserError, match="'wrong'"):
        documents(SourceConfig(name="wrong", type="jsonl", path=str(wrong)))
    with pytest.raises(UserError, match="'gone'.*does not exist"):
        documents(SourceConfig(name="gone", type="text", path=str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match="unknown type"):
        documents(SourceConfig(name="x", type="csv", path="x"))
    with pytest.raises(UserError, match="unknown synthetic generator"):
        documents(SourceConfig(name="x", type="synthetic", generator="poems"))
    with pytest.raises(UserError, match="name"):
        documents(SourceConfig(name="a/b", type="synthetic", generator="units"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["row one", "row two"]}), tmp_path / "t.parquet")
    src = SourceConfig(name="pq", type="parquet", path=str(tmp_path), text_field="content")
    assert documents(src) == ["row one", "row two"]
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    bad = SourceConfig(name="pqbad", type="parquet", path=str(tmp_path / "broken.parquet"))
    with pytest.raises(UserError, match="'pqbad'.*cannot read Parquet") as info:
        documents(bad)
    assert "\n" not in str(info.value)


def test_huggingface_dataset_from_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "hf.jsonl", [{"text": "from datasets"}, {"text": "second record"}])
    src = SourceConfig(name="hf", type="hf", path="json", data_files=str(path))
    assert documents(src) == ["from datasets", "second record"]


def test_synthetic_source_text_and_chat():
    text = documents(SourceConfig(name="s", type="synthetic", generator="units", num_docs=4))
    assert len(text) == 4 and all("#### " in d for d in text)
    chat = documents(SourceConfig(name="s", type="synthetic", generator="units", num_docs=4, chat=True))
    assert all(d.startswith(USER) for d in chat)


def test_shared_gsm8k_when_present():
    path = SHARED / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip("shared GSM8K copy not present")
    src = SourceConfig(name="gsm8k", type="jsonl", path=str(path), prompt_field="question",
                       completion_field="answer", max_docs=20)
    docs = documents(src)
    assert len(docs) == 20 and all("\n#### " in d for d in docs)
    assert input_files(src) == [path]


def test_chunks_keep_the_line_breaks_of_a_block_cut_up(tmp_path):
    # A block longer than chunk_chars is cut at line ends; its lines must stay one line break apart.
    block = "\n".join(f"line {i} of a long speech" for i in range(40))
    (tmp_path / "play.txt").write_text("A short block.\n\n" + block + "\n\nThe end.")
    chunks = documents(SourceConfig(name="p", type="text", path=str(tmp_path / "play.txt"), chunk_chars=200))
    # Only the block's first line follows a blank line (the one after the short block).
    assert all(len(c) <= 200 for c in chunks) and sum(c.count("\n\nline") for c in chunks) <= 1
    assert "\n".join(chunks).replace("\n\n", "\n") == ("A short block.\n" + block + "\nThe end.")
