"""Bidirectional encoders and BERT masking: the switch, the masking's rules and seeding, torch/MLX parity."""

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


def test_mlm_loss_and_gradients_agree_between_torch_and_mlx():
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    from tinylm.backends import get_backend
    from tinylm.train.optim import OptimConfig
    from tinylm.train.step import TrainModule

    shape = resolve(ModelConfig(preset="tlm-bert-mini", n_layers=2, vocab_size=512))
    weights = model.init_params(shape, 0)
    batch = objectives.mlm_batch(_tokens(shape), shape.vocab_size, MASK_ID, SPECIAL, seed=0, step=1)
    out = {}
    for name in ("torch", "mlx"):
        b = get_backend(name)
        loss, grads = TrainModule(b, shape, OptimConfig(), objective=objectives.mlm).loss_and_grads(
            b.from_numpy(weights), [batch])
        out[name] = (b.item(loss), b.to_numpy(grads))
    (st, gt), (sm, gm) = out["torch"], out["mlx"]
    assert abs(st - sm) < 1e-4
    for k in gt:
        rel = np.abs(gt[k] - gm[k]).max() / (np.abs(gt[k]).max() + 1e-12)
        assert rel < 1e-4, (k, rel)
