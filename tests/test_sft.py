"""SFT and distillation: exact loss masks, packing that changes no loss, the KL by hand, backend parity."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from helpers_eval import SHAPE, make_checkpoint, tokenizer_file  # noqa: E402
from tinylm import model  # noqa: E402
from tinylm.train import checkpoint  # noqa: E402
from tinylm.train import objectives  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.data.config import SourceConfig  # noqa: E402
from tinylm.data.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, load_tokenizer  # noqa: E402
from tinylm.errors import UserError  # noqa: E402
from tinylm.train.objectives import DistillConfig  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.post.sft import SFTConfig, SFTData, encode_conversation, model_batch, pack_best_fit, pack_rows  # noqa: E402
from tinylm.stages import Teacher  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402

BACKENDS = ("torch", "mlx")
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 plus 7?"},
     {"role": "assistant", "content": "12 + 7 = 19\n#### 19"}],
    [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A small bird."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one, two, three"},
     {"role": "user", "content": "And on?"}, {"role": "assistant", "content": "four, five"}],
    [{"role": "user", "content": "Where does the sun rise?"}, {"role": "assistant", "content": "In the east."}],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tokenizer_file(tmp_path_factory.mktemp("tok")))


def test_loss_mask_is_exact(tok):
    conv = CONVERSATIONS[0]
    enc = encode_conversation(tok, conv)
    ids, loss = enc.ids.tolist(), enc.loss.tolist()
    specials = {tok.token_to_id(t): t for t in (BOS, SYSTEM, USER, ASSISTANT, END)}
    # Walk the conversation: which turn each token belongs to, and whether it carries loss.
    role, seen_ends = None, []
    for i, (t, learn) in enumerate(zip(ids, loss)):
        name = specials.get(t)
        if name in (BOS, SYSTEM, USER, ASSISTANT):
            assert not learn, (i, name)
            role = name
        elif name == END:
            assert learn == (role == ASSISTANT), (i, role)
            seen_ends.append(learn)
        else:
            assert learn == (role == ASSISTANT), (i, role, tok.id_to_token(t))
    assert seen_ends == [False, False, True]
    answer = tok.encode(conv[2]["content"], add_special_tokens=False).ids
    assert [t for t, learn in zip(ids, loss) if learn] == answer + [tok.token_to_id(END)]
    # The same ids as the whole rendered conversation tokenized at once (what a chat template produces).
    text = BOS + "".join(f"<|{m['role']}|>{m['content']}{END}" for m in conv)
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_conversation_without_assistant_is_refused(tok):
    with pytest.raises(UserError, match="no assistant turn"):
        encode_conversation(tok, [{"role": "user", "content": "hi"}], where="x.jsonl record 3: ")


def test_best_fit_packs_without_cutting_what_fits():
    rows = pack_best_fit([5, 9, 3, 7, 2, 6], capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    for r in rows:
        assert sum([5, 9, 3, 7, 2, 6][i] for i in r) <= 10
    assert len(rows) == 4  # 32 tokens need at least 4 rows of 10


def _packed(tok, capacity):
    encoded = [encode_conversation(tok, c) for c in CONVERSATIONS]
    rows = pack_best_fit([len(e.ids) for e in encoded], capacity)
    return encoded, rows, pack_rows(encoded, rows, capacity, tok.token_to_id("<|pad|>"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_row_losses_equal_conversations_alone(tok, backend):
    encoded, rows, packed = _packed(tok, capacity=96)
    assert any(len(r) > 1 for r in rows) and (packed["segment"] < 0).any()  # really packed, and padded
    batch = model_batch(packed, 1.0)
    assert not batch["weights"][packed["segment"][:, :-1] < 0].any()  # padding carries no loss
    b = get_backend(backend)
    module = TrainModule(b, SHAPE, OptimConfig())
    params = b.from_numpy(model.init_params(SHAPE, 0))
    packed_losses = module.token_losses(params, batch)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(encoded[i].ids)
            alone = module.token_losses(params, encoded[i].ids[None])[0]
            np.testing.assert_allclose(packed_losses[r, at:at + n - 1], alone, atol=1e-5)
            at += n


def _numpy_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("top_k", [0, 5])
def test_distillation_loss_equals_kl_by_hand(top_k):
    b = get_backend("torch")
    rng = np.random.default_rng(0)
    student = rng.standard_normal((2, 3, 11)).astype(np.float32) * 2
    teacher = rng.standard_normal((2, 3, 11)).astype(np.float32) * 2
    targets = rng.integers(0, 11, (2, 3))
    T = 2.0
    t_lp = _numpy_log_softmax(teacher / T)
    ids = None
    if top_k:
        ids = np.argsort(-t_lp, -1)[..., :top_k]
        t_lp = _numpy_log_softmax(np.take_along_axis(t_lp, ids, -1))
    ce, kl = objectives.distill_terms(b.ops, b.from_numpy({"x": student})["x"], b.tokens(targets),
                                      b.from_numpy({"t": t_lp.astype(np.float32)})["t"],
                                      None if ids is None else b.tokens(ids), T)
    s_lp = _numpy_log_softmax(student / T)
    if top_k:
        s_lp = np.take_along_axis(s_lp, ids, -1)
    want_kl = (np.exp(t_lp) * (t_lp - s_lp)).sum(-1)
    want_ce = -np.take_along_axis(_numpy_log_softmax(student), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(kl.numpy(), want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ce.numpy(), want_ce, rtol=1e-5, atol=1e-6)


def _sft_data(tmp_path, tok_path, seq_len=63, rows=4):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 6))
    cfg = SFTConfig(sources=[SourceConfig(name="chat", type="jsonl", path=str(path))], epochs=3, val_fraction=0.1)
    return SFTData(cfg, tok_path, seq_len, rows, steps=0, seed=0)


# MLX compiles its step in each case (its default); PyTorch's compiled step costs most of a minute on 2 cores,
# so that pair runs with the slow tests.
@pytest.mark.parametrize("distill, torch_compiled", [
    (False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_sft_and_distillation_agree_between_backends(tmp_path, distill, torch_compiled):
    ckpt = make_checkpoint(tmp_path / "student")
    teacher_ckpt = make_checkpoint(tmp_path / "teacher", seed=1)
    data = _sft_data(tmp_path, checkpoint.load(ckpt).tokenizer_path)
    weights = model.init_params(SHAPE, 0)
    assert data.steps >= 3
    out = {}
    for name in BACKENDS:
        b = get_backend(name, compile=True if name == "mlx" else torch_compiled)
        objective, annotate = objectives.sft, None
        if distill:
            cfg = DistillConfig(teacher=str(teacher_ckpt), temperature=2.0, alpha=0.5)
            objective = objectives.distill(cfg)
            annotate = Teacher(cfg, b, SHAPE, data.tokenizer_path).annotate
        module = TrainModule(b, SHAPE, OptimConfig(lr=3e-3, grad_clip=1.0), "float32", objective, annotate)
        params = b.from_numpy(weights)
        loss, grads = module.loss_and_grads(params, data.micro_batches(0, 0, 1, 2))
        first = (b.item(loss), b.to_numpy(grads))
        state, losses = module.init_state(params), []
        for step in range(10):
            params, state, value, _ = module.step(params, state, data.micro_batches(step, 0, 1, 2), 3e-3, step + 1)
            losses.append(value)
        out[name] = first, losses
    (lt, gt), st = out["torch"]
    (lm, gm), sm = out["mlx"]
    assert abs(lt - lm) < 1e-4
    for k in gt:
        assert np.abs(gt[k] - gm[k]).max() / (np.abs(gt[k]).max() + 1e-12) < 1e-4, k
    np.testing.assert_allclose(st, sm, atol=1e-3)
    assert st[-1] < st[0]


def test_step_weights_average_over_loss_tokens(tmp_path):
    data = _sft_data(tmp_path, checkpoint.load(make_checkpoint(tmp_path / "m")).tokenizer_path)
    micro = data.micro_batches(0, 0, 1, 2)
    # Summed over the step's micro-batches (each later divided by their count), the weights make one mean.
    assert abs(sum(float(m["weights"].sum()) for m in micro) / 2 - 1.0) < 1e-5
    # Ranks split the step's rows; weights are scaled to the whole step's loss tokens.
    halves = [data.micro_batches(0, r, 2, 1)[0] for r in (0, 1)]
    assert abs(sum(float(h["weights"].sum()) for h in halves) / 2 - 1.0) < 1e-5


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    from tinylm.data.tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    save_tokenizer(train_tokenizer(["entirely different words here"] * 50, vocab_size=280), other)
    teacher = make_checkpoint(tmp_path / "teacher")
    with pytest.raises(UserError, match="different tokenizers"):
        Teacher(DistillConfig(teacher=str(teacher)), get_backend("torch"), SHAPE, other)


def test_exported_chat_template_gives_tinylms_token_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tinylm.interop.hf import export_hf
    from tinylm.post.sft import prompt_ids

    ckpt = make_checkpoint(tmp_path / "run")
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(ckpt, tmp_path / "hf"))
    tok = load_tokenizer(checkpoint.load(ckpt).tokenizer_path)

    def hf_ids(messages, **kwargs):
        out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    for conv in CONVERSATIONS:
        assert hf_ids(conv) == encode_conversation(tok, conv).ids.tolist()
        assert hf_ids(conv[:-1], add_generation_prompt=True) == prompt_ids(tok, conv[:-1])


def test_gsm8k_file_is_read_as_conversations(tmp_path):
    from conftest import SHARED_DATA

    path = SHARED_DATA / "gsm8k_train.jsonl"
    if not path.is_file():
        pytest.skip("the shared GSM8K file is absent")
    from tinylm.post.sft import read_conversations

    src = SourceConfig(name="gsm8k", type="jsonl", path=str(path), max_docs=20)
    convs = read_conversations(src, system="")
    assert len(convs) == 20
    assert all([m["role"] for m in c] == ["user", "assistant"] and "####" in c[1]["content"] for c in convs)
    tok_path = checkpoint.load(make_checkpoint(tmp_path / "m")).tokenizer_path
    data = SFTData(SFTConfig(sources=[src], epochs=1, val_fraction=0.0), tok_path, 255, 4, steps=0, seed=0)
    assert data.loss_tokens > 0 and data.steps >= 1
