"""Bidirectional encoders and BERT masking: the switch, the masking's rules and seeding, torch/MLX parity."""

import dataclasses

import numpy as np
import pytest

from tinylm import model
from tinylm.errors import UserError
from tinylm.model import ModelConfig, resolve
from tinylm.train import objectives

SPECIAL = (0, 1, 2)
MASK_ID = 3


def _tokens(shape, rows=4, length=32, seed=1):
    return np.random.default_rng(seed).integers(len(SPECIAL) + 1, shape.vocab_size, (rows, length))


def test_mlm_masking_follows_bert_rules_and_is_keyed_by_seed_and_step():
    tokens = np.random.default_rng(0).integers(4, 500, (64, 128))
    tokens[:, 0] = 0  # a special token is never selected
    a = objectives.mlm_batch(tokens, 500, MASK_ID, SPECIAL, seed=7, step=3)
    b = objectives.mlm_batch(tokens, 500, MASK_ID, SPECIAL, seed=7, step=3)
    c = objectives.mlm_batch(tokens, 500, MASK_ID, SPECIAL, seed=7, step=4)
    assert np.array_equal(a["inputs"], b["inputs"]) and not np.array_equal(a["inputs"], c["inputs"])
    selected = a["weights"] > 0
    assert not selected[:, 0].any()
    assert abs(selected[:, 1:].mean() - 0.15) < 0.01
    assert abs(a["weights"].sum() - 1.0) < 1e-5
    masked = (a["inputs"] == MASK_ID) & selected
    kept = (a["inputs"] == tokens) & selected
    assert abs(masked.sum() / selected.sum() - 0.8) < 0.03
    assert 0.07 < kept.sum() / selected.sum() < 0.14  # 10% kept, plus random draws that hit the same token
    assert np.array_equal(a["inputs"][~selected], tokens[~selected])


def test_encoder_sees_future_tokens_and_decoder_does_not():
    torch_backend = pytest.importorskip("tinylm.backends").get_backend("torch")
    ops = torch_backend.ops
    for causal in (True, False):
        shape = resolve(ModelConfig(preset="micro", causal=causal))
        params = torch_backend.from_numpy(model.init_params(shape, 0))
        t = _tokens(shape, rows=1, length=8)
        u = t.copy()
        u[0, -1] = (u[0, -1] + 1) % shape.vocab_size
        la, lb = (torch_backend.to_numpy({"x": model.forward(ops, params, torch_backend.tokens(x), shape)})["x"]
                  for x in (t, u))
        changed = np.abs(la[0, 0] - lb[0, 0]).max() > 1e-6
        assert changed == (not causal)


def test_mlm_on_a_causal_model_is_refused():
    shape = resolve(ModelConfig(preset="micro"))
    with pytest.raises(UserError, match="bidirectional"):
        objectives.mlm(None, {}, {}, shape)


def _on_torch_and_mlx(shape, weights, batch, objective):
    """(loss, gradients) of one step of `objective` on torch, then on MLX, from the same weights and batch."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from tinylm.backends import get_backend
    from tinylm.train.optim import OptimConfig
    from tinylm.train.step import TrainModule

    out = []
    for name in ("torch", "mlx"):
        b = get_backend(name)
        loss, grads = TrainModule(b, shape, OptimConfig(), objective=objective).loss_and_grads(
            b.from_numpy(weights), [batch])
        out.append((b.item(loss), b.to_numpy(grads)))
    return out


def _assert_gradients_agree(gt, gm):
    for k in gt:
        rel = np.abs(gt[k] - gm[k]).max() / (np.abs(gt[k]).max() + 1e-12)
        assert rel < 1e-4, (k, rel)


def test_mlm_loss_and_gradients_agree_between_torch_and_mlx():
    shape = resolve(ModelConfig(preset="tlm-bert-mini", n_layers=2, vocab_size=512))
    weights = model.init_params(shape, 0)
    batch = objectives.mlm_batch(_tokens(shape), shape.vocab_size, MASK_ID, SPECIAL, seed=0, step=1)
    (st, gt), (sm, gm) = _on_torch_and_mlx(shape, weights, batch, objectives.mlm)
    assert abs(st - sm) < 1e-4
    _assert_gradients_agree(gt, gm)


def _classify_batch(shape, seed=2):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(4, shape.vocab_size, n)) for n in (5, 12, 9, 3)]
    return objectives.classify_batch(rows, pad_id=2, causal=shape.causal, width=16, labels=[0, 2, 1, 2])


@pytest.mark.parametrize("causal", [False, True])
def test_classify_loss_and_gradients_agree_between_torch_and_mlx(causal):
    shape = dataclasses.replace(resolve(ModelConfig(preset="tlm-bert-mini", n_layers=2, vocab_size=512,
                                                    causal=causal)), num_labels=3)
    weights = model.init_params(shape, 0)
    batch = _classify_batch(shape)
    (st, gt), (sm, gm) = _on_torch_and_mlx(shape, weights, batch, objectives.classify)
    assert abs(st - np.log(3)) < 0.3  # a fresh head is close to uniform
    assert abs(st - sm) < 1e-4
    assert np.abs(gt["classifier.weight"]).max() > 0
    _assert_gradients_agree(gt, gm)


@pytest.mark.parametrize("causal", [False, True])
def test_classify_logits_ignore_padding(causal):
    torch_backend = pytest.importorskip("tinylm.backends").get_backend("torch")
    shape = dataclasses.replace(resolve(ModelConfig(preset="micro", causal=causal)), num_labels=4)
    params = torch_backend.from_numpy(model.init_params(shape, 0))
    row = list(np.random.default_rng(3).integers(4, shape.vocab_size, 7))

    def logits(width, pad):
        batch = objectives.classify_batch([row], pad_id=pad, causal=causal, width=width)
        batch = {k: torch_backend.tokens(v) if k == "inputs" else torch_backend.from_numpy({k: v})[k]
                 for k, v in batch.items()}
        return torch_backend.to_numpy({"x": model.class_logits(torch_backend.ops, params, batch, shape)})["x"]

    alone, padded = logits(7, 2), logits(20, 5)
    assert np.abs(alone - padded).max() < 1e-5
    other = list(row)
    other[-1] = (other[-1] + 1) % shape.vocab_size  # the last token counts: pooling reads every position
    batch = objectives.classify_batch([other], pad_id=2, causal=causal)
    batch = {k: torch_backend.tokens(v) if k == "inputs" else torch_backend.from_numpy({k: v})[k]
             for k, v in batch.items()}
    changed = torch_backend.to_numpy({"x": model.class_logits(torch_backend.ops, params, batch, shape)})["x"]
    assert np.abs(changed - alone).max() > 1e-6


def test_classify_without_labels_is_refused():
    shape = resolve(ModelConfig(preset="tlm-bert-mini"))
    with pytest.raises(UserError, match="needs labels"):
        objectives.classify(None, {}, {}, shape)
