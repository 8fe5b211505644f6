import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import SHAPE, make_checkpoint  # noqa: E402

from tinylm import model  # noqa: E402
from tinylm.errors import UserError  # noqa: E402
from tinylm.generate import (Model, SamplingConfig, chat_prompt, generate, generate_ids, load_model,  # noqa: E402
                             sample)

BACKENDS = ["torch", "mlx"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "run", qk_norm=True, block_repeats=2)


def _full_logprobs(lm, ids):
    ops = lm.backend.ops
    logits = model.forward(ops, lm.params, lm.backend.tokens(np.array([ids])), lm.shape)
    return lm.backend.to_numpy({"x": ops.log_softmax(logits)})["x"][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_matches_full_recompute(ckpt, backend):
    lm, tok, _ = load_model(ckpt, backend)
    prompt = [0, 5, 17, 42, 99, 7]
    out = generate_ids(lm, tok, [prompt], SamplingConfig(max_tokens=12), keep_logprobs=True)[0]
    full = _full_logprobs(lm, prompt + out.tokens)
    assert len(out.tokens) == 12
    for i, step_lp in enumerate(out.logprobs):
        np.testing.assert_allclose(step_lp, full[len(prompt) - 1 + i], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_logprobs_equal_a_full_forward(ckpt, backend):
    # Temperature and top-k shape what is drawn, not what is reported: the model's own log-softmax, which is
    # what the GRPO objective computes for the same tokens.
    lm, tok, _ = load_model(ckpt, backend)
    prompts = [[0, 3, 9], [0, 11, 12, 13, 14, 15, 16, 17], [0, 200]]
    cfg = SamplingConfig(max_tokens=10, temperature=0.8, top_k=40, seed=5)
    stop = generate_ids(lm, tok, prompts, cfg)[0].tokens[3]
    outs = generate_ids(lm, tok, prompts, cfg, stop_ids=[stop])
    assert outs[0].stop_id == stop
    for p, out in zip(prompts, outs):
        row = np.array([p + out.tokens + ([out.stop_id] if out.stop_id is not None else [])])
        ops, ids = lm.backend.ops, lm.backend.tokens(row)
        nll = lm.backend.to_numpy({"x": model.token_losses(ops, lm.params, ids[:, :-1], ids[:, 1:], lm.shape)})["x"]
        assert len(out.sampled_logprobs) == row.shape[1] - len(p)
        np.testing.assert_allclose(out.sampled_logprobs, -nll[0, len(p) - 1:], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_batch_equals_one_at_a_time(ckpt, backend):
    lm, tok, _ = load_model(ckpt, backend)
    prompts = [[0, 3, 9], [0, 11, 12, 13, 14, 15, 16, 17], [0, 200]]
    cfg = SamplingConfig(max_tokens=10)
    batch = generate_ids(lm, tok, prompts, cfg, keep_logprobs=True)
    for p, got in zip(prompts, batch):
        alone = generate_ids(lm, tok, [p], cfg, keep_logprobs=True)[0]
        assert got.tokens == alone.tokens
        np.testing.assert_allclose(np.array(got.logprobs), np.array(alone.logprobs), atol=1e-4)


def test_backends_agree(ckpt):
    texts = ["The cat sat", "Birds can fly, fish"]
    outs = [generate(*load_model(ckpt, b)[:2], texts, SamplingConfig(max_tokens=8)) for b in BACKENDS]
    assert [c.tokens for c in outs[0]] == [c.tokens for c in outs[1]]


def test_stop_tokens_and_strings(ckpt):
    lm, tok, _ = load_model(ckpt, "torch")
    free = generate_ids(lm, tok, [[0, 5, 6]], SamplingConfig(max_tokens=6))[0]
    first = free.tokens.index(free.tokens[2])
    stopped = generate_ids(lm, tok, [[0, 5, 6]], SamplingConfig(max_tokens=6), stop_ids=[free.tokens[2]])[0]
    assert stopped.tokens == free.tokens[:first] and stopped.finish_reason == "stop"
    assert free.finish_reason == "length"
    piece = free.text[1:3]
    cut = generate_ids(lm, tok, [[0, 5, 6]], SamplingConfig(max_tokens=6, stop_strings=[piece]))[0]
    assert cut.text == free.text[: free.text.find(piece)] and cut.finish_reason == "stop"


def test_sampling_filters():
    rng = np.random.default_rng(0)
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = sample(lp, SamplingConfig(temperature=1.0, top_k=2), rng)
    assert set(draws.tolist()) == {0, 1}
    draws = sample(lp, SamplingConfig(temperature=1.0, top_p=0.7), rng)
    assert set(draws.tolist()) == {0, 1}
    draws = sample(lp, SamplingConfig(temperature=1.0, top_p=0.1), rng)
    assert set(draws.tolist()) == {0}
    draws = sample(lp, SamplingConfig(temperature=1.0), rng)
    assert abs((draws == 0).mean() - 0.5) < 0.05 and set(draws.tolist()) == {0, 1, 2, 3}
    assert sample(lp[:1], SamplingConfig(temperature=0.0), rng).tolist() == [0]


def test_seeded_sampling_is_reproducible_across_backends(ckpt):
    cfg = SamplingConfig(max_tokens=8, temperature=1.0, top_k=50, seed=3)
    runs = [generate(*load_model(ckpt, b)[:2], ["The sun"], cfg)[0].tokens for b in BACKENDS]
    assert runs[0] == runs[1]


def test_chat_prompt_layout():
    text = chat_prompt([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi<|end|><|assistant|>"
    with pytest.raises(UserError):
        chat_prompt([{"role": "robot", "content": "x"}])


def test_prompt_longer_than_context_is_left_truncated(ckpt):
    import dataclasses

    lm, tok, _ = load_model(ckpt, "torch")
    short = Model(lm.backend, dataclasses.replace(lm.shape, max_seq_len=16), lm.params)
    prompt = list(range(1, 40))
    cfg = SamplingConfig(max_tokens=4)
    assert generate_ids(short, tok, [prompt], cfg)[0].tokens == generate_ids(lm, tok, [prompt[-12:]], cfg)[0].tokens


def test_imported_chat_template_is_rendered():
    pytest.importorskip("jinja2")
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    meta = {"hf_tokenizer_config": {"chat_template": chatml}, "special_tokens": {"bos": "<s>"}, "add_bos": False}
    text = chat_prompt([{"role": "user", "content": "hi"}], meta)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert chat_prompt([{"role": "user", "content": "x"}], {**meta, "add_bos": True,
                                                           "hf_tokenizer_config": {"chat_template": llama}}) == "[x]"


def test_committee_generation_of_identical_members_equals_single(ckpt):
    from tinylm.eval.committee import Committee

    lm, tok, _ = load_model(ckpt, "mlx")
    prompts = [[0, 3, 9], [0, 11, 12, 13, 14]]
    cfg = SamplingConfig(max_tokens=8)
    single = generate_ids(lm, tok, prompts, cfg, keep_logprobs=True)
    duo = generate_ids(Committee([lm, lm]), tok, prompts, cfg, keep_logprobs=True)
    for a, b in zip(single, duo):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(np.array(a.logprobs), np.array(b.logprobs), atol=1e-9)


def test_streamed_text_equals_the_completion(ckpt):
    lm, tok, _ = load_model(ckpt, "torch")
    free = generate_ids(lm, tok, [[0, 5, 6], [0, 9]], SamplingConfig(max_tokens=12))
    stop = free[0].text[4:6]
    pieces = {0: [], 1: []}
    cfg = SamplingConfig(max_tokens=12, stop_strings=[stop])
    outs = generate_ids(lm, tok, [[0, 5, 6], [0, 9]], cfg, on_text=lambda i, piece: pieces[i].append(piece))
    for i, c in enumerate(outs):
        assert "".join(pieces[i]) == c.text and stop not in c.text
