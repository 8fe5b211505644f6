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


def _recomputed_greedy(backend, shape, params, prompts: np.ndarray, n: int):
    """Greedy tokens and each step's log-probabilities from the whole sequence's forward pass at every step: no
    cache, no decoding path."""
    on = backend.from_numpy(params)
    rows, logprobs = prompts, []
    for _ in range(n):
        logits = model.forward(backend.ops, on, backend.tokens(rows), shape)
        last = backend.to_numpy({"x": logits[:, -1, :]})["x"].astype(np.float64)
        logprobs.append(last - last.max(-1, keepdims=True) - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        rows = np.concatenate([rows, last.argmax(-1)[:, None]], axis=1)
    return rows[:, prompts.shape[1]:], np.stack(logprobs, axis=1)


def _sharp_params(shape):
    """Weights whose attention matters to the next token: random init scaled up, so that a query reading the
    wrong heads' keys shows in the log-probabilities."""
    params = model.init_params(shape, 0)
    return {k: v * (6.0 if "proj" in k or "embed" in k else 1.0) for k, v in params.items()}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_greedy_decoding_with_stacked_projections_equals_recomputing_the_whole_sequence(backend):
    from tinylm.backends import get_backend
    from tinylm.model import ModelConfig, resolve

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    shape = resolve(ModelConfig(preset="micro", vocab_size=300))  # 4 query heads over 2 key/value heads
    params = _sharp_params(shape)
    lm = Model(get_backend(backend), shape, params)
    assert "layers.0.self_attn.qkv_proj.weight" in lm.params and "layers.0.mlp.gate_up_proj.weight" in lm.params
    assert "layers.0.self_attn.q_proj.weight" not in lm.params  # stacked, not held twice
    prompts = np.random.default_rng(0).integers(1, shape.vocab_size, (3, 9))

    class Ids:
        def decode(self, ids, skip_special_tokens=False):
            return ""

    out = generate_ids(lm, Ids(), prompts.tolist(), SamplingConfig(max_tokens=12), keep_logprobs=True)
    tokens, logprobs = _recomputed_greedy(lm.backend, shape, params, prompts, 12)
    assert np.array_equal(np.array([o.tokens for o in out]), tokens)
    np.testing.assert_allclose(np.array([o.logprobs for o in out]), logprobs, atol=2e-4)


def test_bf16_decoding_steps_stay_close_to_float32s():
    from tinylm.backends import get_backend
    from tinylm.model import ModelConfig, resolve

    shape = resolve(ModelConfig(preset="micro", vocab_size=300))
    params = _sharp_params(shape)
    prompts = np.random.default_rng(1).integers(1, shape.vocab_size, (4, 7))
    backend = get_backend("torch")
    states = {}
    for dtype in ("float32", "bfloat16"):
        lm = Model(backend, shape, params, dtype)
        lp, state = lm.start(prompts, None)
        for t in (5, 17, 33):  # the same tokens fed to both: decoding steps with one query over the cache
            lp, state = lm.step(state, np.full(4, t), None)
        states[dtype] = lp
    assert np.abs(states["bfloat16"] - states["float32"]).max() < 0.1
