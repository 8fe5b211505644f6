"""Pretraining text for the encoders: held-out task texts, sized subsets, and the mask token."""

import json
from pathlib import Path

import pytest

from tinylm.data.classify_tasks import load_task
from tinylm.data.config import SourceConfig
from tinylm.data.sources import documents, signature
from tinylm.data.tokenizer import BOS, END, MASK, SPECIAL_TOKENS, mask_id, train_tokenizer
from tinylm.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def squeeze(text):
    return " ".join(text.split())


def write_play(path, speakers=4, speeches=15):
    blocks = [f"SPEAKER {chr(65 + s)}:\nSpeech {i} by speaker {s}, {WORDS[i % 12]} and\n"
              f"{WORDS[(i + s) % 12]} on a second line." for i in range(speeches) for s in range(speakers)]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def assert_held_out(docs, task):
    # Joined, so that a speech cut across two chunks is found too.
    flat = squeeze(" ".join(docs))
    assert not [t for t in task.texts("test") if squeeze(t) in flat]
    # The training speeches are still there: only the test ones went.
    assert all(squeeze(t) in flat for t in task.texts("train"))


@pytest.mark.parametrize("chunk_chars", [0, 300])
def test_text_source_leaves_the_test_speeches_out(tmp_path, chunk_chars):
    path = write_play(tmp_path / "play.txt")
    spec = f"shakespeare-speakers:{path}"
    src = SourceConfig(name="play", type="text", path=str(path), chunk_chars=chunk_chars, held_out=spec, seed=3)
    docs = documents(src)
    assert_held_out(docs, load_task(spec, seed=3))
    full = documents(SourceConfig(name="play", type="text", path=str(path), chunk_chars=chunk_chars))
    assert sum(map(len, docs)) < sum(map(len, full))


def test_jsonl_source_drops_documents_with_a_test_text(tmp_path):
    rows = [{"text": f"{WORDS[i % 12]} report number {i} from the {label} desk", "label": label}
            for label in ("sport", "news") for i in range(10)]
    task_path = tmp_path / "task.jsonl"
    task_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Said today:\n{r['text']}  (more)"}) + "\n" for r in rows))
    task = load_task(str(task_path))
    docs = documents(SourceConfig(name="c", type="jsonl", path=str(corpus), held_out=str(task_path)))
    assert len(docs) == len(rows) - len(task.test)
    assert_held_out(docs, task)


def test_held_out_task_files_are_part_of_the_signature(tmp_path):
    path = write_play(tmp_path / "play.txt")
    plain = SourceConfig(name="p", type="text", path=str(path))
    held = SourceConfig(name="p", type="text", path=str(path), held_out=f"shakespeare-speakers:{path}")
    assert signature(held)[:-1] == signature(plain)
    assert str(path) in json.dumps(signature(held)[-1])
    with pytest.raises(UserError, match="does not exist"):
        documents(SourceConfig(name="p", type="text", path=str(path), held_out=str(tmp_path / "none.jsonl")))


def test_shuffle_takes_a_seeded_sample_of_the_whole_source(tmp_path):
    path = write_play(tmp_path / "play.txt", speakers=2, speeches=40)
    kw = dict(name="p", type="text", path=str(path), chunk_chars=120)
    everything = documents(SourceConfig(**kw))
    first = documents(SourceConfig(**kw, max_docs=10))
    small = documents(SourceConfig(**kw, max_docs=10, shuffle=True))
    assert first == everything[:10] and len(small) == 10 and small != first
    assert set(small) <= set(everything)
    assert documents(SourceConfig(**kw, max_docs=10, shuffle=True)) == small
    assert documents(SourceConfig(**kw, max_docs=10, shuffle=True, seed=1)) != small
    larger = documents(SourceConfig(**kw, max_docs=20, shuffle=True))
    assert larger[:10] == small


@pytest.mark.skipif(not (SHARED / "tinyshakespeare.txt").is_file(), reason="shared tiny Shakespeare is absent")
def test_shared_shakespeare_pretraining_text_holds_no_test_speech():
    src = SourceConfig(name="shakespeare", type="text", path=str(SHARED / "tinyshakespeare.txt"), chunk_chars=512,
                       held_out="shakespeare-speakers")
    assert_held_out(documents(src), load_task("shakespeare-speakers"))


def test_trained_tokenizer_has_the_mask_token_after_the_older_ones():
    tok = train_tokenizer([f"{w} {v} text" for w in WORDS for v in WORDS], vocab_size=300, min_frequency=1)
    assert mask_id(tok) == SPECIAL_TOKENS.index(MASK) == len(SPECIAL_TOKENS) - 1
    assert [tok.token_to_id(t) for t in (BOS, END)] == [0, 6]
    assert tok.encode(f"one {MASK} two", add_special_tokens=False).ids.count(mask_id(tok)) == 1


def test_a_tokenizer_without_the_mask_token_is_refused():
    from tokenizers import Tokenizer, models

    older = Tokenizer(models.BPE())
    older.add_special_tokens(SPECIAL_TOKENS[:-1])
    with pytest.raises(UserError, match=r"has no <\|mask\|> token.*prepare the data again"):
        mask_id(older, "data/prepared/tokenizer.json")


def test_token_overlap_counts_the_task_ngrams_found_in_the_text():
    from tinylm.data.overlap import token_overlap

    docs = ["The quick brown fox.", "It jumps over the lazy dog"]
    assert token_overlap(["the fox jumps"], docs) == 1.0
    assert token_overlap(["the fox jumps", "a red fox"], docs) == pytest.approx(4 / 6)
    assert token_overlap(["quick brown fox", "fox it"], docs, n=2) == pytest.approx(2 / 3)  # "fox it" spans two docs
    assert token_overlap(["Qa"], docs, tokenize=list) == 0.5  # no capital Q in the documents
    assert token_overlap([], docs) == 0.0
    with pytest.raises(ValueError):
        token_overlap(["x"], docs, n=0)
