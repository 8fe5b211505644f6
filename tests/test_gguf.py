"""GGUF import and export on a tiny Llama: round trips, transformers' GGUF loader, and refused files."""

import json

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.train import checkpoint

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_continue_imported import _foreign_model  # noqa: E402

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    _foreign_model(root / "hf")
    cfg = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    assert main(["import", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    return root


def _export(imported, kind, name):
    path = imported / name
    if not path.exists():
        assert main(["export", str(imported / "ckpt"), str(path), "--to", "gguf", "--type", kind]) == 0
    return path


def _logits(params, shape, ids):
    from tinylm import model
    from tinylm.backends import get_backend

    b = get_backend("torch", "float32")
    out = model.forward(b.ops, b.from_numpy(params), b.tokens(ids), shape, None, "causal")
    return b.to_numpy({"x": out})["x"]


IDS = np.arange(3, 43, dtype=np.int64)[None]


def test_f32_round_trip_is_exact_and_keeps_tokenizer_and_template(imported, tmp_path):
    path = _export(imported, "F32", "m-f32.gguf")
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    a, b = checkpoint.load(imported / "ckpt"), checkpoint.load(tmp_path / "back")
    assert a.shape == b.shape and set(a.params) == set(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert b.meta["hf_tokenizer_config"]["chat_template"] == TEMPLATE
    assert b.meta["imported_from"]["quantization"] == {"F32": len(a.params)}
    from tinylm.data.tokenizer import load_tokenizer

    text = "What is 12 + 7? <s>user\nhi</s> Once upon a time"
    ta, tb = load_tokenizer(a.tokenizer_path), load_tokenizer(b.tokenizer_path)
    assert ta.encode(text, add_special_tokens=False).ids == tb.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind,tol", [("F16", 1e-2), ("Q8_0", 5e-2)])
def test_quantized_export_loads_in_transformers_and_tinylm_within_tolerance(imported, tmp_path, kind, tol):
    path = _export(imported, kind, f"m-{kind}.gguf")
    a = checkpoint.load(imported / "ckpt")
    base = _logits(a.params, a.shape, IDS)
    assert main(["import", str(path), "--out", str(tmp_path / "back")]) == 0
    b = checkpoint.load(tmp_path / "back")
    assert b.meta["imported_from"]["quantization"].get(kind, 0) > 0
    ours = _logits(b.params, b.shape, IDS)
    scale = np.abs(base).max()
    assert 0 < np.abs(ours - base).max() <= tol * scale
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(ref, ours, atol=1e-4)


def test_info_names_the_source_quantization(imported, capsys):
    path = _export(imported, "Q8_0", "m-Q8_0.gguf")
    out = imported / "info-q8"
    if not out.exists():
        assert main(["import", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gguf" in text and "Q8_0" in text and "dequantized" in text


def _write(path, arch="llama", tokenizer="gpt2", template=None, tensor=None):
    """A small GGUF file written with gguf's writer: metadata of a two-layer llama and one tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_types([1, 1, 1])
    w.add_token_merges(["a b"])
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((3, 32), np.float32) if tensor is None else tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(tmp_path, imported):
    data = _export(imported, "F32", "m-f32.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    return tmp_path / "cut.gguf"


BAD = [
    ("other_architecture", lambda t, i: _write(t / "x.gguf", arch="gpt2"), "architecture 'gpt2' is not supported"),
    ("truncated", _truncated, "truncated or not a GGUF file"),
    ("quantization_type", lambda t, i: _write(t / "x.gguf", tensor=np.zeros((3, 32), np.int8)),
     "quantization type I8"),
    ("tokenizer_model", lambda t, i: _write(t / "x.gguf", tokenizer="llama"), "tokenizer model 'llama' is not handled"),
    ("chat_template", lambda t, i: _write(t / "x.gguf", template="{{ messages | no_such_filter }}"),
     "chat template fails to render"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_gguf_is_one_line_exit_2_and_writes_nothing(case, tmp_path, imported, capsys):
    _, make, needle = case
    path = make(tmp_path, imported)
    capsys.readouterr()
    assert main(["import", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_shard_is_refused(imported, tmp_path, capsys):
    import shutil

    hf = shutil.copytree(imported / "hf", tmp_path / "hf")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
    capsys.readouterr()
    assert main(["import", str(hf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors" in err and "missing" in err
    assert not (tmp_path / "out").exists()
