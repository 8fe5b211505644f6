"""The contract between backends: same weights and batch in fp32 give the same numbers."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from tinylm import model  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.model import ModelConfig, resolve  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402

BACKENDS = ("torch", "mlx")
SHAPES = {
    "plain": ModelConfig(preset="micro"),
    "qknorm-shared-untied": ModelConfig(preset="micro", qk_norm=True, block_repeats=2, tie_embeddings=False),
}


def _batch(shape, rows=4, length=48, seed=1):
    return np.random.default_rng(seed).integers(0, shape.vocab_size, (rows, length + 1))


# Rows of 160 tokens go through MLX's attention split across streams on a multi-core CPU
# (`backends/mlx/cpu_streams.py`); the 48-token ones through the fused kernel.
@pytest.mark.parametrize("variant,length", [(v, 48) for v in sorted(SHAPES)] + [("plain", 160)])
def test_logits_loss_and_gradients_agree(variant, length):
    shape = resolve(SHAPES[variant])
    weights, batch = model.init_params(shape, 0), _batch(shape, rows=2 if length > 48 else 4, length=length)
    out = {}
    for name in BACKENDS:
        b = get_backend(name)
        params = b.from_numpy(weights)
        logits = model.forward(b.ops, params, b.tokens(batch[:, :-1]), shape)
        loss, grads = TrainModule(b, shape, OptimConfig()).loss_and_grads(params, [batch])
        out[name] = (b.to_numpy({"logits": logits})["logits"], b.item(loss), b.to_numpy(grads))
    (lt, st, gt), (lm, sm, gm) = out["torch"], out["mlx"]
    assert np.abs(lt - lm).max() < 1e-4
    assert abs(st - sm) < 1e-4
    assert set(gt) == set(gm) == set(weights)
    for k in gt:
        rel = np.abs(gt[k] - gm[k]).max() / (np.abs(gt[k]).max() + 1e-12)
        assert rel < 1e-4, (k, rel)


# Compiling PyTorch's step costs most of a minute on 2 cores, so the compiled pair runs with the slow tests;
# MLX compiles its step in either case (its backend's default).
@pytest.mark.parametrize("optimizer, lr, torch_compiled", [
    ("adamw", 3e-3, False), ("muon", 1e-2, False), pytest.param("adamw", 3e-3, True, marks=pytest.mark.slow)])
def test_twenty_optimizer_steps_agree(optimizer, lr, torch_compiled):
    shape = resolve(SHAPES["qknorm-shared-untied"])
    weights = model.init_params(shape, 0)
    batches = [_batch(shape, seed=s % 2) for s in range(20)]  # two batches in turn: learnable
    losses = {}
    for name in BACKENDS:
        b = get_backend(name, compile=True if name == "mlx" else torch_compiled)
        module = TrainModule(b, shape, OptimConfig(name=optimizer, lr=lr, grad_clip=1.0))
        params = b.from_numpy(weights)
        state = module.init_state(params)
        seq = []
        for step, batch in enumerate(batches):
            micro = np.split(batch, 2)  # gradient accumulation over two micro-batches
            params, state, loss, _ = module.step(params, state, micro, lr, step + 1)
            seq.append(loss)
        losses[name] = np.array(seq)
    assert losses["torch"][-1] < losses["torch"][0] - 0.5  # it trains
    assert np.abs(losses["torch"] - losses["mlx"]).max() < 1e-3


def test_kv_cache_continuation_matches_full_forward_on_both_backends():
    shape = resolve(SHAPES["qknorm-shared-untied"])
    weights, batch = model.init_params(shape, 3), _batch(shape, rows=2, length=20)[:, :-1]
    for name in BACKENDS:
        b = get_backend(name)
        params = b.from_numpy(weights)
        full = b.to_numpy({"x": model.forward(b.ops, params, b.tokens(batch), shape)})["x"]
        _, cache = model.forward(b.ops, params, b.tokens(batch[:, :12]), shape, cache=[])
        step, cache = model.forward(b.ops, params, b.tokens(batch[:, 12:15]), shape, cache=cache)
        step = b.to_numpy({"x": step})["x"]
        assert np.abs(step - full[:, 12:15]).max() < 1e-4, name
