"""SFT in the model's own chat template, and stages that keep an imported model's tokenizer settings.

A ChatML-style template (the layout SmolLM2 and many hub models use) is written here by hand; the real SmolLM2
template is checked too when `make real-model` has put the model under models/.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_eval import make_checkpoint
from tinylm.cli import main
from tinylm.data.tokenizer import load_tokenizer
from tinylm.errors import UserError
from tinylm.generate import chat_prompt, encode_prompt
from tinylm.post.sft import encode_conversation, prompt_ids, render_turns
from tinylm.train import checkpoint

pytest.importorskip("jinja2")

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nBe helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
META = {"chat": True, "add_bos": False,
        "special_tokens": {"bos": None, "end": None, "eos": "<|im_end|>", "pad": "<|im_end|>"},
        "hf_tokenizer_config": {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        "imported_from": {"format": "gguf", "file": "x.gguf"}}
CONVERSATION = [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "#### 19"},
                {"role": "user", "content": "And 3 plus 4?"}, {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]
MODELS = Path(__file__).resolve().parents[1] / "models"


def _chatml_checkpoint(root: Path) -> Path:
    """A tiny model whose tokenizer has ChatML's turn tokens and whose checkpoint records an import's settings."""
    ckpt = make_checkpoint(root / "imported", vocab_size=302)
    tok = load_tokenizer(ckpt / "tokenizer.json")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    assert tok.get_vocab_size() == 302
    tok.save(str(ckpt / "tokenizer.json"))
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **META}))
    return ckpt


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    ckpt = _chatml_checkpoint(tmp_path_factory.mktemp("chatml"))
    return ckpt, load_tokenizer(ckpt / "tokenizer.json")


def _learned_text(tok, enc) -> str:
    return tok.decode([int(t) for t, learn in zip(enc.ids, enc.loss) if learn], skip_special_tokens=False)


def test_chatml_loss_is_on_assistant_turns_and_ids_are_the_template_tokenized(chatml):
    _, tok = chatml
    enc = encode_conversation(tok, CONVERSATION, META)
    assert _learned_text(tok, enc) == "#### 19<|im_end|>3 + 4 = 7\n#### 7<|im_end|>"
    # The learned spans begin right after each assistant header and stop at its end-of-turn token.
    end = tok.token_to_id("<|im_end|>")
    starts = [i for i in range(1, len(enc.ids)) if enc.loss[i] and not enc.loss[i - 1]]
    assert len(starts) == 2 and all(enc.ids[i - 1] != end for i in starts)
    assert [int(enc.ids[i]) for i in range(len(enc.ids) - 1) if enc.loss[i] and not enc.loss[i + 1]] == [end, end]
    # The whole is what the template renders, and each prompt what generation is fed.
    whole = chat_prompt(CONVERSATION, META, add_generation_prompt=False)
    assert whole.startswith("<|im_start|>system\nBe helpful.")
    assert enc.ids.tolist() == tok.encode(whole, add_special_tokens=False).ids
    head = prompt_ids(tok, CONVERSATION[:3], META)
    assert enc.ids[:len(head)].tolist() == head and enc.loss[len(head)] and not enc.loss[len(head) - 1]


def test_chatml_matches_transformers_apply_chat_template(chatml):
    transformers = pytest.importorskip("transformers")
    _, tok = chatml
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, eos_token="<|im_end|>")
    out = hf.apply_chat_template(CONVERSATION, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert ids == encode_conversation(tok, CONVERSATION, META).ids.tolist()


def test_tinylms_own_layout_is_unchanged(chatml):
    _, tok = chatml
    enc = encode_conversation(tok, CONVERSATION)  # no template recorded: tinylm's layout, BOS first
    assert enc.ids[0] == tok.token_to_id("<|bos|>") and not enc.loss[0]
    assert _learned_text(tok, enc) == "#### 19<|end|>3 + 4 = 7\n#### 7<|end|>"
    assert [t for t, learn in render_turns(CONVERSATION, None) if learn] == ["#### 19<|end|>", "3 + 4 = 7\n#### 7<|end|>"]


def test_templates_that_cannot_be_split_are_refused(chatml):
    _, tok = chatml
    # Renders only the last turn: an earlier render is no prefix of a later one.
    last_only = "{{ '<|im_start|>' + messages[-1]['role'] + '\n' + messages[-1]['content'] + '<|im_end|>' }}"
    meta = {**META, "hf_tokenizer_config": {"chat_template": last_only}}
    with pytest.raises(UserError, match="^data.jsonl record 2: the chat template renders"):
        encode_conversation(tok, CONVERSATION, meta, "data.jsonl record 2: ")
    # Ends assistant turns with plain text: the model could never learn to stop.
    no_end = CHATML.replace("'<|im_end|>\n'", "'</turn>\n'")
    with pytest.raises(UserError, match="not one of the tokenizer's special tokens"):
        encode_conversation(tok, CONVERSATION, {**META, "hf_tokenizer_config": {"chat_template": no_end}})


def test_stages_keep_the_imported_tokenizer_settings_and_train_in_its_template(tmp_path, chatml):
    pytest.importorskip("torch")
    ckpt, tok = chatml
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "completion": f"#### {a + b}"}) + "\n"
                             for a in range(6) for b in range(4)))
    tasks = tmp_path / "sums.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"What is {a} plus 9?", "answer": str(a + 9)}) + "\n" for a in range(2)))
    recipe = tmp_path / "post.toml"
    # Two SFT stages: the first starts from the imported checkpoint, the second from the first.
    stages = "".join(f"""
[[stages]]
name = "{name}"
objective = "sft"
{extra}
[[stages.sft.sources]]
name = "sums"
type = "jsonl"
path = "{convs}"
""" for name, extra in (("sft1", f'[stages.train]\ninit_from = "{ckpt}"'),
                        ("sft2", f'[stages.eval]\ntasks = ["{tasks}"]\nlimit = 1\nat_start = true')))
    recipe.write_text(f"""
[model]
preset = "micro"
[train]
steps = 2
batch_size = 4
seq_len = 64
log_every = 1
eval_every = 0
ckpt_every = 2
[optim]
lr = 1e-3
""" + stages)
    assert main(["train", str(recipe), "--backend", "torch", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    for name in ("sft1", "sft2"):
        out = checkpoint.load(tmp_path / "run" / name)
        assert {k: out.meta.get(k) for k in META} == META, name
        assert load_tokenizer(out.tokenizer_path).to_str() == tok.to_str()
    rows = [json.loads(line) for line in (tmp_path / "run" / "sft2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [0, out.step]  # the starting weights scored too (at_start)
    # What the stage trained on: ChatML turns, no BOS, loss on the answers.
    from tinylm.post.sft import SFTConfig, SFTData
    from tinylm.data.config import SourceConfig

    data = SFTData(SFTConfig(sources=[SourceConfig(name="s", type="jsonl", path=str(convs))], val_fraction=0.0),
                   out.tokenizer_path, 64, 4, steps=0, seed=0, meta=out.meta)
    first = data.train[0]
    assert first.ids[0] == tok.token_to_id("<|im_start|>")
    assert _learned_text(tok, first).endswith("<|im_end|>") and _learned_text(tok, first).startswith("#### ")


@pytest.mark.skipif(not (MODELS / "smollm2-135m-instruct" / "checkpoints").is_dir(),
                    reason="the real model is absent (run `make real-model`)")
def test_smollm2_template_puts_loss_on_the_assistant_turns_only():
    ckpt = checkpoint.load(MODELS / "smollm2-135m-instruct", with_optimizer=False)
    tok = load_tokenizer(ckpt.tokenizer_path)
    enc = encode_conversation(tok, CONVERSATION, ckpt.meta)
    assert _learned_text(tok, enc) == "#### 19<|im_end|>3 + 4 = 7\n#### 7<|im_end|>"
    whole = chat_prompt(CONVERSATION, ckpt.meta, add_generation_prompt=False)
    assert enc.ids.tolist() == tok.encode(whole, add_special_tokens=False).ids
    assert whole.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    head = encode_prompt(tok, chat_prompt(CONVERSATION[:1], ckpt.meta), ckpt.meta)
    assert enc.ids[:len(head)].tolist() == head
    assert not enc.loss[:len(head)].any() and np.all(enc.loss[len(head):len(head) + 4])
