"""A model imported from a Hugging Face directory, with its own tokenizer, continues pretraining on new data."""

import json

import pytest

from tinylm.train import checkpoint
from tinylm.cli import main

from conftest import data_toml

transformers = pytest.importorskip("transformers")


def _foreign_model(root):
    """A tiny Llama with a tokenizer whose specials are not tinylm's (<s>, </s>), as a hub download has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is 12 + 7? 12 + 7 = 19.", "Once upon a time a cat sat on a mat."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                                      eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return tok


def test_imported_model_continues_pretraining_with_its_own_tokenizer(tmp_path):
    tok = _foreign_model(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    imported = checkpoint.load(tmp_path / "imported")
    recipe = tmp_path / "continue.toml"
    data = data_toml(tmp_path / "data").replace("[data.tokenizer]\nvocab_size = 512\n", "")
    recipe.write_text(data + f"""
[data.tokenizer]
path = "{imported.path / 'tokenizer.json'}"
[train]
steps = 3
batch_size = 2
seq_len = 32
log_every = 1
eval_every = 3
ckpt_every = 3
init_from = "{tmp_path / 'imported'}"
""")
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["bos_id"] == tok.token_to_id("<s>") and manifest["eos_id"] == tok.token_to_id("</s>")
    continued = checkpoint.load(tmp_path / "run")
    assert continued.step == 3 and continued.shape == imported.shape
    assert any((continued.params[k] != imported.params[k]).any() for k in imported.params)
