"""A GRPO step's memory savings change how it is computed, never what: gradients accumulated in place over
micro-batches, the head in chunks, blocks recomputed, and the old policy's log-probabilities a few rows at a
time, each against the plain computation on a small shape."""

import numpy as np
import pytest

from tinylm import model
from tinylm.backends import get_backend
from tinylm.model import Compute, ModelConfig, resolve
from tinylm.post import rl
from tinylm.train import objectives
from tinylm.train.optim import OptimConfig
from tinylm.train.step import TrainModule

SHAPE = resolve(ModelConfig(preset="micro", vocab_size=300))
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="needs mlx"))]


def _grpo_batch(rows=8, time=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SHAPE.vocab_size, (rows, time + 1))
    mask = np.zeros((rows, time), bool)
    mask[:, time // 3:] = rng.random((rows, time - time // 3)) < 0.9
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "old_logprobs": (-6.0 + 0.3 * rng.standard_normal((rows, time))).astype(np.float32),
            "advantages": rng.standard_normal((rows, 1)).repeat(time, 1).astype(np.float32),
            "weights": rl.token_weights(mask, "dapo", time).astype(np.float32)}


def _micro(batch, n):
    scaled = {**batch, "weights": batch["weights"] * np.float32(n)}
    return [{k: np.array_split(v, n)[i] for k, v in scaled.items()} for i in range(n)]


def _module(backend, compute=Compute()):
    return TrainModule(backend, SHAPE, OptimConfig(lr=1e-3), compute, objective=objectives.grpo(0.2, 0.28, 0.0))


@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_accumulated_in_place_are_the_sum_of_each_micro_batchs_bit_for_bit(name):
    backend = get_backend(name, "float32")
    module = _module(backend)
    params = backend.from_numpy(model.init_params(SHAPE, 0))
    micro = _micro(_grpo_batch(), 4)
    loss, grads = module.loss_and_grads(params, micro)
    apart = [module._grad(params, module.to_backend(rows)) for rows in micro]
    expected = {k: sum((g[k] for _, g in apart[1:]), apart[0][1][k]) / 4 for k in grads}
    got, want = backend.to_numpy(grads), backend.to_numpy(expected)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert backend.item(loss) == pytest.approx(sum(backend.item(v) for v, _ in apart) / 4, rel=1e-6)
    # The parameters are untouched by the accumulation (their leaves' gradients were the running sums).
    assert np.array_equal(backend.to_numpy(params)["norm.weight"], model.init_params(SHAPE, 0)["norm.weight"])


@pytest.mark.parametrize("name", BACKENDS)
def test_a_lean_grpo_step_gives_the_plain_steps_loss_and_gradients(name):
    backend = get_backend(name, "float32")
    params = backend.from_numpy(model.init_params(SHAPE, 0))
    batch = _grpo_batch()
    loss, grads = _module(backend).loss_and_grads(params, [batch])
    lean = _module(backend, Compute(loss_chunk=10, checkpoint_blocks=True))
    lean_loss, lean_grads = lean.loss_and_grads(params, _micro(batch, 4))
    assert backend.item(lean_loss) * 4 == pytest.approx(backend.item(loss) * 4, abs=1e-5)
    plain, chunked = backend.to_numpy(grads), backend.to_numpy(lean_grads)
    for k in plain:
        np.testing.assert_allclose(chunked[k], plain[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_old_policys_log_probabilities_a_few_rows_at_a_time_equal_one_pass(monkeypatch):
    backend = get_backend("torch", "float32")
    module = _module(backend)
    params = backend.from_numpy(model.init_params(SHAPE, 0))
    batch = _grpo_batch(rows=7)
    whole = -module.token_losses(params, {"inputs": batch["inputs"], "targets": batch["targets"]})

    class Trainer:
        shape = SHAPE

    Trainer.module = module
    data = rl.RLData.__new__(rl.RLData)
    data.trainer = Trainer()
    # 3 rows of logits per pass: passes of 3, 3 and 1 rows.
    monkeypatch.setattr(rl, "LOGPROB_BYTES", 3 * 4 * 24 * SHAPE.vocab_size + 100)
    assert rl.logprob_rows(SHAPE.vocab_size, 24) == 3
    got = data.logprobs(params, batch)
    assert got.shape == whole.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, whole, atol=1e-5)


def test_on_smollm2s_shape_a_pass_holds_a_few_rows_of_logits():
    shape = resolve(ModelConfig(preset="mobilellm-125m", vocab_size=49152))
    rows = rl.logprob_rows(shape.vocab_size, 191)  # 8 x 8 completions of 128 tokens after 64-token prompts
    assert 1 <= rows < 64 and rows * 191 * shape.vocab_size * 4 <= rl.LOGPROB_BYTES
