"""tinylm's GGUF export read by llama.cpp (through the llama-cpp-python bindings, where they are installed).

llama.cpp's own tokenizer and kernels take the file: the ids it gives a text, its logits and its greedy tokens
are held to tinylm's on the weights the file was written from. Its KV cache is kept in float32 here, so that
what is compared is the file and not llama.cpp's default f16 cache.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.train import checkpoint

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # `make llama-cpp` builds the bindings after the fast suite has run

from test_continue_imported import _foreign_model  # noqa: E402

F32 = 0  # ggml's type id for float32, as llama.cpp's context parameters take it
CKPT = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
TEXT = "What is 12 + 7? 12 + 7 = 19. Once upon a time a cat sat on a mat."


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False,
                           type_k=F32, type_v=F32)


def _export(ckpt, path, kind):
    assert main(["export", str(ckpt), str(path), "--to", "gguf", "--type", kind]) == 0
    return path


def _our_logits(ckpt, ids):
    from tinylm import model
    from tinylm.backends import get_backend

    b = get_backend("torch", "float32")
    out = model.forward(b.ops, b.from_numpy(ckpt.params), b.tokens(np.asarray([ids])), ckpt.shape, None, "causal")
    return b.to_numpy({"x": out})["x"][0]


def _their_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-cpp")
    _foreign_model(root / "hf")
    assert main(["import", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return checkpoint.load(root / "ckpt"), root


def test_tiny_f32_export_reads_in_llama_cpp_with_the_same_ids_and_logits(tiny):
    from tinylm.data.tokenizer import load_tokenizer

    ckpt, root = tiny
    llm = _llama(_export(ckpt.path, root / "tiny-f32.gguf", "F32"))
    ids = load_tokenizer(ckpt.tokenizer_path).encode(TEXT, add_special_tokens=False).ids
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    ours, theirs = _our_logits(ckpt, ids), _their_logits(llm, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())


def test_tiny_q8_0_export_reads_in_llama_cpp(tiny):
    ckpt, root = tiny
    llm = _llama(_export(ckpt.path, root / "tiny-q8.gguf", "Q8_0"))
    ids = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
    ours, theirs = _our_logits(ckpt, ids), _their_logits(llm, ids)
    # llama.cpp rounds the activations to 8 bits as well as the weights, so this is looser than the float check.
    assert np.abs(theirs - ours).max() <= 0.1 * np.abs(ours).max()


def test_tinylm_tokenizer_splits_digits_in_llama_cpp_as_in_tinylm(tmp_path):
    from helpers_eval import make_checkpoint

    from tinylm.data.tokenizer import load_tokenizer

    ckpt = checkpoint.load(make_checkpoint(tmp_path / "run"))
    llm = _llama(_export(ckpt.path, tmp_path / "own.gguf", "F32"))
    text = "Question: What is 1234 plus 567?\nAnswer: 1801\n#### 1801 The cat sat on the mat."
    ids = load_tokenizer(ckpt.tokenizer_path).encode(text, add_special_tokens=False).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    ours, theirs = _our_logits(ckpt, ids), _their_logits(llm, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())


@pytest.mark.skipif(not (CKPT / "checkpoints").is_dir(), reason="the real model is absent (run `make real-model`)")
def test_real_model_f32_export_answers_in_llama_cpp_as_in_tinylm(tmp_path):
    from tinylm.generate import SamplingConfig, chat_prompt, encode_prompt, generate_ids, load_model, special_ids

    lm, tok, ckpt = load_model(CKPT, "torch")
    llm = _llama(_export(CKPT, tmp_path / "smollm2-f32.gguf", "F32"))
    prompt = chat_prompt([{"role": "user", "content": "What is 12 + 30?"}], ckpt.meta)
    ids = encode_prompt(tok, prompt, ckpt.meta)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    ours, theirs = _our_logits(ckpt, ids), _their_logits(llm, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-3)
    stops = special_ids(tok, ckpt.meta)
    want = generate_ids(lm, tok, [ids], SamplingConfig(max_tokens=32), [stops["eos"], stops["end"]])[0].tokens
    got = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if t == llm.token_eos() or len(got) == len(want):
            break
        got.append(t)
    assert got == want and tok.decode(got).strip()
    meta = json.loads(json.dumps(llm.metadata))
    assert meta.get("tokenizer.chat_template") == ckpt.meta["hf_tokenizer_config"]["chat_template"]
