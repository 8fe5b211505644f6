"""SmolLM2-135M-Instruct imported from its GGUF file, held to transformers on the same file.

`make real-model` puts the file and its import under the repository's models/; without them these tests skip.
"""

import io
import sys
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
CKPT = MODELS / "smollm2-135m-instruct"

if not (GGUF.is_file() and (CKPT / "checkpoints").is_dir()):
    pytest.skip("the real model is absent (run `make real-model`)", allow_module_level=True)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

pytestmark = pytest.mark.slow  # transformers loads the GGUF for half a minute

from tinylm.cli import main  # noqa: E402
from tinylm.generate import SamplingConfig, chat_prompt, encode_prompt, generate, generate_ids, load_model  # noqa: E402
from tinylm.generate import special_ids  # noqa: E402

PARAGRAPH = ("The history of mathematics deals with the origin of discoveries in mathematics and the mathematical "
             "methods and notation of the past. Before the modern age and the worldwide spread of knowledge, written "
             "examples of new mathematical developments have come to light only in a few locales. From 3000 BC the "
             "Mesopotamian states of Sumer, Akkad and Assyria, followed closely by Ancient Egypt and the Levantine "
             "state of Ebla began using arithmetic, algebra and geometry for purposes of taxation, commerce, trade "
             "and also in the patterns in nature, the field of astronomy and to record time and formulate calendars. "
             "The earliest mathematical texts available are from Mesopotamia and Egypt. ") * 3
QUESTION = "What is 12 + 30?"


@pytest.fixture(scope="module")
def hf():
    tok = transformers.AutoTokenizer.from_pretrained(str(MODELS), gguf_file=GGUF.name)
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(MODELS), gguf_file=GGUF.name,
                                                           dtype=torch.float32).eval()
    return lm, tok


@pytest.fixture(scope="module")
def ours():
    return load_model(CKPT, "torch")


def _ids(hf, n=300):
    ids = hf[1](PARAGRAPH, add_special_tokens=False).input_ids[:n]
    assert len(ids) == n
    return np.asarray([ids], np.int64)


def _hf_greedy(hf, ids, n, **kw):
    cfg = kw.pop("generation_config", transformers.GenerationConfig(eos_token_id=hf[1].eos_token_id,
                                                                    pad_token_id=hf[1].eos_token_id))
    cfg.max_new_tokens, cfg.do_sample = n, False
    with torch.no_grad():
        out = hf[0].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=cfg)
    return out[0, len(ids):].tolist()


def _logits(lm, ids):
    from tinylm import model

    out = model.forward(lm.backend.ops, lm.params, lm.backend.tokens(ids), lm.shape, None, "causal")
    return lm.backend.to_numpy({"x": out})["x"]


def test_tokenizer_matches_transformers_gguf_conversion(hf, ours):
    text = PARAGRAPH[:300] + "<|im_start|>user\nWhat's 7 × 8?  Naïve café\t日本<|im_end|>\n<|endoftext|>"
    assert ours[1].encode(text, add_special_tokens=False).ids == hf[1](text, add_special_tokens=False).input_ids


def test_float32_logits_match_transformers_on_torch(hf, ours):
    ids = _ids(hf)
    with torch.no_grad():
        ref = hf[0](torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(ours[0], ids), ref, atol=1e-4, rtol=0)


def test_float32_logits_match_transformers_on_mlx(hf):
    pytest.importorskip("mlx.core")
    lm, _, _ = load_model(CKPT, "mlx")
    ids = _ids(hf)
    with torch.no_grad():
        ref = hf[0](torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(lm, ids), ref, atol=1e-3, rtol=0)


def test_64_greedy_tokens_match_transformers(hf, ours):
    ids = hf[1]("The capital of France is", add_special_tokens=False).input_ids
    # No end-of-turn stop on either side: 64 tokens of the plain argmax each.
    ref = _hf_greedy(hf, ids, 64, generation_config=transformers.GenerationConfig(eos_token_id=None, pad_token_id=0))
    got = generate_ids(ours[0], ours[1], [ids], SamplingConfig(max_tokens=64))[0].tokens
    # transformers stops after the model's end-of-turn token even so; tinylm, given no stop ids, goes on.
    assert len(got) == 64 and len(ref) >= 24 and got[:len(ref)] == ref


def test_chat_prompt_matches_apply_chat_template(hf, ours):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": QUESTION}]
    for conv in (messages, messages[-1:]):
        ref = hf[1].apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        text = chat_prompt(conv, ours[2].meta)
        assert text == ref
        assert encode_prompt(ours[1], text, ours[2].meta) == hf[1](ref, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def reference_answer(hf):
    prompt = hf[1].apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                       tokenize=False)
    ids = hf[1](prompt, add_special_tokens=False).input_ids
    out = _hf_greedy(hf, ids, 48)
    answer = hf[1].decode(out, skip_special_tokens=True)
    assert answer.strip()
    return answer


def test_generate_and_chat_commands_answer_as_transformers(reference_answer, capsys, monkeypatch):
    assert main(["generate", str(CKPT), "--prompt", QUESTION, "--max-tokens", "48", "--backend", "torch"]) == 0
    assert capsys.readouterr().out.strip() == reference_answer.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTION + "\n/exit\n"))
    assert main(["chat", str(CKPT), "--temperature", "0", "--max-tokens", "48", "--backend", "torch"]) == 0
    shown = capsys.readouterr().out  # the reply between input()'s "> " prompts
    assert shown.removeprefix("> ").removesuffix("> ").strip() == reference_answer.strip()


def test_eval_chat_mode_answers_as_transformers(reference_answer, tmp_path, monkeypatch):
    import json

    from tinylm.eval import harness

    seen = []

    def recording(*args, **kw):
        outs = generate_ids(*args, **kw)
        seen.extend(o.text for o in outs)
        return outs

    monkeypatch.setattr(harness, "generate_ids", recording)
    task = tmp_path / "q.jsonl"
    task.write_text(json.dumps({"question": QUESTION, "answer": "#### 42"}) + "\n")
    assert main(["eval", str(CKPT), "--tasks", f"gsm8k:{task}", "--chat", "--max-tokens", "48", "--json",
                 "--output", str(tmp_path / "r.json"), "--backend", "torch"]) == 0
    # Asked the question alone, in the model's template; the answer runs to the end of its turn.
    assert len(seen) == 1 and seen[0].strip() == reference_answer.strip()


def test_left_padded_batch_matches_one_at_a_time(ours):
    lm, tok, ckpt = ours
    texts = [chat_prompt([{"role": "user", "content": q}], ckpt.meta)
             for q in (QUESTION, "Name a colour.", "Write the word cat three times, separated by commas.")]
    cfg = SamplingConfig(max_tokens=24)
    batched = generate(lm, tok, texts, cfg, ckpt.meta)
    assert len({len(encode_prompt(tok, t, ckpt.meta)) for t in texts}) == 3
    for text, together in zip(texts, batched):
        alone = generate(lm, tok, [text], cfg, ckpt.meta)[0]
        assert together.tokens == alone.tokens and together.text.strip()


def test_special_tokens_do_not_start_prompts_with_a_turn_marker(ours):
    ids = special_ids(ours[1], ours[2].meta)
    assert ids["bos"] is None and ours[1].id_to_token(ids["eos"]) == "<|im_end|>"
    assert encode_prompt(ours[1], "Hi", ours[2].meta) == ours[1].encode("Hi", add_special_tokens=False).ids
