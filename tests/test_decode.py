"""The decode loop's speed-ups change no output: a preallocated KV cache decodes the tokens that concatenating
caches did, and the text grown token by token is what decoding the whole completion gives."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm import model  # noqa: E402
from tinylm.generate import Model, SamplingConfig, _Detokenizer, generate_ids, load_model  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("decode") / "run", qk_norm=True, block_repeats=2)


class Concatenating(Model):
    """Decoding as it was before the preallocated cache: every step concatenates onto the list of arrays."""

    def step(self, state, tokens, keep):
        logits, cache = self._run(tokens[:, None], state, self._mask(keep, 1))
        return self._fetch(logits, cache), cache


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_preallocated_cache_decodes_the_same_tokens_as_concatenation(ckpt, backend):
    lm, tok, _ = load_model(ckpt, backend)
    old = Concatenating(lm.backend, lm.shape, lm.params)
    prompts = [[0, 5, 17], [0, 11, 12, 13, 14, 15, 16], [0, 200, 3, 9]]  # ragged; the cache grows twice
    for cfg in (SamplingConfig(max_tokens=40), SamplingConfig(max_tokens=40, temperature=0.9, top_k=50, seed=3)):
        new_out, old_out = (generate_ids(m, tok, prompts, cfg, keep_logprobs=True) for m in (lm, old))
        for a, b in zip(new_out, old_out):
            assert a.tokens == b.tokens and len(a.tokens) == 40 and a.text == b.text
            np.testing.assert_allclose(a.sampled_logprobs, b.sampled_logprobs, atol=1e-5)


def test_kv_cache_grows_and_keeps_what_it_holds():
    from tinylm.backends import get_backend

    backend = get_backend("torch")
    rng = np.random.default_rng(0)

    def arrays(t):
        return [backend.from_numpy({"x": rng.standard_normal((2, 1, t, 4), np.float32)})["x"] for _ in range(2)]

    k, v = arrays(3)
    cache = model.KVCache(backend.ops, [(k, v)])
    seen = [(k, v)]
    for _ in range(7):  # room for 6 at first: it grows to 12
        new = arrays(1)
        got = cache.slot(0)(*new)
        cache.length += 1
        seen.append(new)
        for j in (0, 1):
            assert np.array_equal(got[j].numpy(), np.concatenate([s[j].numpy() for s in seen], axis=2))
    assert cache.buffers[0][0].shape[2] == 12


def _check_incremental(tok, ids):
    texts = _Detokenizer(tok)
    for n in range(1, len(ids) + 1):
        assert texts.decode(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=False)


def test_incremental_text_equals_decoding_the_whole_completion(ckpt):
    _, tok, _ = load_model(ckpt, "torch")
    rng = np.random.default_rng(0)
    # Random ids include the byte-level pieces of multi-byte characters, which decode to U+FFFD until whole.
    for _ in range(5):
        _check_incremental(tok, rng.integers(0, tok.get_vocab_size(), 60).tolist())
    emoji = tok.encode("ok \U0001F600 caf\u00e9 done", add_special_tokens=False).ids
    _check_incremental(tok, emoji)


def test_incremental_text_with_a_decoder_that_drops_the_leading_space():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "\u2581hello": 1, "\u2581world": 2, "!": 3, "\u2581": 4, "a": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = tokenizers.decoders.Metaspace()
    ids = [1, 2, 3, 4, 5, 1, 3, 2]
    assert tok.decode(ids) == "hello world! a hello! world"
    _check_incremental(tok, ids)
