"""SmolLM2-135M-Instruct post-trained by tinylm, then exported back: transformers loads the folder with the
original chat template and special tokens and answers as tinylm does.

`make real-model` puts the imported model under models/; without it these tests skip.
"""

import json
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"
CKPT = MODELS / "smollm2-135m-instruct"

if not (CKPT / "checkpoints").is_dir():
    pytest.skip("the real model is absent (run `make real-model`)", allow_module_level=True)
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("jinja2")

pytestmark = pytest.mark.slow  # two SFT steps of a 135M model, then transformers loads it

from tinylm.cli import main  # noqa: E402
from tinylm.generate import SamplingConfig, chat_prompt, encode_prompt, generate, generate_ids, load_model  # noqa: E402
from tinylm.train import checkpoint  # noqa: E402

QUESTIONS = ["Mia has 14 shells and finds 9 more. How many shells does she have now?", "What is 36 + 47?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-post")
    convs = root / "convs.jsonl"
    convs.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}.\n#### {a + b}"})
                             + "\n" for a in range(10, 14) for b in range(3, 5)))
    recipe = root / "post.toml"
    recipe.write_text(f"""
[model]
preset = "micro"
[train]
steps = 2
batch_size = 2
seq_len = 96
dtype = "float32"  # set, so that no timing trials run
compile = false
log_every = 1
eval_every = 0
ckpt_every = 2
init_from = "{CKPT}"
[optim]
name = "adamw"
lr = 1e-4
[schedule]
name = "constant"
warmup_steps = 0
[[stages]]
name = "sft"
objective = "sft"
[stages.sft]
epochs = 0
[[stages.sft.sources]]
name = "sums"
type = "jsonl"
path = "{convs}"
""")
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(root / "run"), "--quiet"]) == 0
    assert main(["export", str(root / "run" / "sft"), str(root / "hf"), "--to", "hf"]) == 0
    return root / "run" / "sft", root / "hf"


def test_export_of_a_post_trained_import_keeps_template_and_tokens_and_answers_the_same(exported):
    ckpt_dir, hf_dir = exported
    original = checkpoint.load(CKPT, with_optimizer=False)
    lm, tok, ckpt = load_model(ckpt_dir, "torch")
    assert ckpt.step == 2 and any((ckpt.params[k] != original.params[k]).any() for k in original.params)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    template = original.meta["hf_tokenizer_config"]
    assert hf_tok.chat_template == template["chat_template"]
    for key in ("bos", "eos", "pad", "unk"):
        assert getattr(hf_tok, f"{key}_token") == template[f"{key}_token"], key
    hf_lm = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    gen_cfg = transformers.GenerationConfig.from_pretrained(str(hf_dir))
    assert hf_tok.convert_ids_to_tokens(gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, int)
                                        else gen_cfg.eos_token_id[0]) == "<|im_end|>"

    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == chat_prompt(messages, ckpt.meta)
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert ids == encode_prompt(tok, text, ckpt.meta)
        # 64 greedy tokens with no stop asked for on either side (transformers still ends after the model's own
        # end-of-turn id), then the answer each gives with the folder's generation config and tinylm's stops.
        with torch.no_grad():
            raw = hf_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=transformers.GenerationConfig(
                                     eos_token_id=None, pad_token_id=0, max_new_tokens=64, do_sample=False))
            answer = hf_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    generation_config=gen_cfg, max_new_tokens=64, do_sample=False)
        raw, answer = raw[0, len(ids):].tolist(), answer[0, len(ids):].tolist()
        ours_raw = generate_ids(lm, tok, [ids], SamplingConfig(max_tokens=64))[0].tokens
        assert len(ours_raw) == 64 and ours_raw[:len(raw)] == raw and len(raw) >= 16
        ours = generate(lm, tok, [text], SamplingConfig(max_tokens=64), ckpt.meta)[0]
        assert ours.text.strip() and ours.text == hf_tok.decode(answer, skip_special_tokens=True)


def test_mlx_lm_reads_the_exported_folder(exported):
    mlx_lm = pytest.importorskip("mlx_lm")  # the dev extra installs it
    import mlx.core as mx
    import numpy as np

    from tinylm import model

    ckpt_dir, hf_dir = exported
    lm, tok, ckpt = load_model(ckpt_dir, "torch")
    mlx_model, mlx_tok = mlx_lm.load(str(hf_dir))
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = encode_prompt(tok, chat_prompt(messages, ckpt.meta), ckpt.meta)
    assert list(mlx_tok.apply_chat_template(messages, add_generation_prompt=True)) == ids
    theirs = np.array(mlx_model(mx.array([ids])).astype(mx.float32))
    ours = lm.backend.to_numpy({"x": model.forward(lm.backend.ops, lm.params, lm.backend.tokens(np.asarray([ids])),
                                                   lm.shape, None, "causal")})["x"]
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
