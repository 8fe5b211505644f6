import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_eval import make_checkpoint  # noqa: E402

from tinylm import model  # noqa: E402

from tinylm.train import checkpoint  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.errors import UserError  # noqa: E402
from tinylm.interop.hf import export_hf, import_hf  # noqa: E402

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VARIANTS = {
    "llama": dict(qk_norm=False, block_repeats=1, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, block_repeats=2, tie_embeddings=True),
    "llama-untied": dict(qk_norm=False, block_repeats=1, tie_embeddings=False),
}
TOKENS = np.array([[0, 5, 17, 42, 99, 7, 250, 3, 8], [0, 44, 45, 46, 47, 48, 49, 50, 51]])


def tinylm_logits(ckpt, backend="torch"):
    ck = checkpoint.load(ckpt)
    be = get_backend(backend)
    logits = model.forward(be.ops, be.from_numpy(ck.params), be.tokens(TOKENS), ck.shape)
    return be.to_numpy({"x": logits})["x"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "run", seed=1, **VARIANTS[request.param])
    return request.param, ckpt, export_hf(ckpt, root / "hf")


def test_transformers_logits_match(exported):
    name, ckpt, hf_dir = exported
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == (["Qwen3ForCausalLM"] if "qwen3" in name else ["LlamaForCausalLM"])
    assert cfg["num_hidden_layers"] == 2 * VARIANTS[name]["block_repeats"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(ref, tinylm_logits(ckpt), atol=1e-4, rtol=0)


def test_transformers_greedy_generation_matches(exported):
    from tinylm.generate import SamplingConfig, generate_ids, load_model

    _, ckpt, hf_dir = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = [0, 5, 17, 42]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                          max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=2)[0, 4:].tolist()
    lm, tok, _ = load_model(ckpt, "mlx")
    assert generate_ids(lm, tok, [prompt], SamplingConfig(max_tokens=10))[0].tokens == ref


def test_tokenizer_and_chat_template(exported):
    _, ckpt, hf_dir = exported
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("The cat sat")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>hi<|end|><|assistant|>"
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<|eos|>", "<|end|>"]


def test_import_round_trip(exported, tmp_path):
    name, ckpt, hf_dir = exported
    back = checkpoint.load(import_hf(hf_dir, tmp_path / "imported"))
    orig = checkpoint.load(ckpt)
    assert back.shape == orig.shape
    assert set(back.params) == set(orig.params)
    for k, v in orig.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    np.testing.assert_allclose(tinylm_logits(back.path, "mlx"), tinylm_logits(ckpt), atol=1e-4)
    again = export_hf(back.path, tmp_path / "hf2")
    assert json.loads((again / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


def test_import_bfloat16_weights(exported, tmp_path):
    _, ckpt, hf_dir = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    back = checkpoint.load(import_hf(tmp_path / "bf16", tmp_path / "imported"))
    emb = checkpoint.load(ckpt).params["embed_tokens.weight"]
    np.testing.assert_allclose(back.params["embed_tokens.weight"], emb, rtol=1e-2, atol=1e-3)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(UserError, match="GPT2LMHeadModel.*not supported"):
        import_hf(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path / "missing", tmp_path / "out")


def test_unsupported_variant_and_truncated_weights(exported, tmp_path):
    _, _, hf_dir = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UserError, match="rope type yarn"):
        import_hf(bad, tmp_path / "o1")
    (bad / "config.json").write_text(json.dumps(cfg))
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        import_hf(bad, tmp_path / "o2")
