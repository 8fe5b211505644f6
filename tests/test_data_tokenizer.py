import numpy as np
import pytest

from tinylm.data import synthetic
from tinylm.data.tokenizer import (ASSISTANT, BOS, END, EOS, PAD, SPECIAL_TOKENS, USER, load_tokenizer, render_chat,
                                   save_tokenizer, token_bytes, train_tokenizer)
from tinylm.errors import UserError


@pytest.fixture(scope="module")
def tok():
    texts = [p.text() for f in ("arithmetic", "stories", "word_problems") for p in synthetic.generate(f, n=150)]
    return train_tokenizer(texts, vocab_size=600)


def test_round_trip_and_digits(tok):
    for text in ["What is 12345 + 987?", "  Ünïcödé, emoji 🙂 and\ttabs\n\nnew lines", "x=3.14159 #### 42"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    pieces = tok.encode("2024 cost 31415", add_special_tokens=False).tokens
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("2024") + list("31415")


def test_special_tokens_have_fixed_ids_and_stay_whole(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "#### 4"}])
    assert text == f"{USER}hi{END}{ASSISTANT}#### 4{END}"
    tokens = tok.encode(text, add_special_tokens=False).tokens
    assert tokens[0] == USER and tokens[-1] == END and ASSISTANT in tokens
    with pytest.raises(ValueError):
        render_chat([{"role": "robot", "content": "x"}])


def test_token_bytes_sum_to_utf8_length(tok):
    sizes = token_bytes(tok)
    assert sizes.shape == (tok.get_vocab_size(),)
    assert all(sizes[tok.token_to_id(t)] == 0 for t in (BOS, EOS, PAD))
    text = "Héllo 123 wörld"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert int(np.sum(sizes[ids])) == len(text.encode())


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    again = load_tokenizer(path)
    assert again.encode("What is 7 + 8?").ids == tok.encode("What is 7 + 8?").ids
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "missing.json")


def test_loads_in_transformers_when_installed(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.decode(fast("What is 12 + 30?")["input_ids"]) == "What is 12 + 30?"


def test_vocab_too_small():
    with pytest.raises(UserError):
        train_tokenizer(["abc"], vocab_size=100)
