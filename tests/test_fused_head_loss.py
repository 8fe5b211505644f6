"""PyTorch's fused output head and cross-entropy on a CPU (`linear_cross_entropy`) against the composed
computation: the same losses and gradients, eagerly, compiled, in loss chunks and over a whole training step."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinylm.backends.torch import kernels  # noqa: E402
from tinylm import model  # noqa: E402
from tinylm.train import objectives  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.model import Compute, ModelConfig, resolve  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402


@pytest.fixture
def always_fused(monkeypatch):
    """The fused path for logits of any size (it normally starts at a million of them)."""
    monkeypatch.setattr(kernels, "FUSED_MIN_LOGITS", 0)
    monkeypatch.setattr(kernels, "BLOCK_BYTES", 4 * 70 * 3)  # three rows a block: a short last block


def _head_case(rows=50, dim=24, vocab=70, seed=0):
    rng = np.random.default_rng(seed)
    hidden = torch.tensor(rng.standard_normal((2, rows // 2, dim), dtype=np.float32))
    head = torch.tensor(rng.standard_normal((vocab, dim), dtype=np.float32) * 0.5)
    targets = torch.tensor(rng.integers(0, vocab, (2, rows // 2)))
    weights = torch.tensor(rng.random((2, rows // 2), dtype=np.float32))
    return hidden, head, targets, weights


def _losses_and_grads(fn, hidden, head, targets, weights):
    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    losses = fn(h, w, targets)
    (losses * weights).sum().backward()
    return losses.detach(), h.grad, w.grad


def _recording(monkeypatch):
    """Calls of the fused operation from here on, each recorded and then run."""
    calls, inner = [], torch.ops.tinylm.linear_cross_entropy
    monkeypatch.setattr(torch.ops.tinylm, "linear_cross_entropy", lambda *a: calls.append(a) or inner(*a))
    return calls


@pytest.mark.parametrize("rows", [50, 400], ids=["head-gradient-as-is", "head-gradient-transposed"])
def test_fused_head_loss_matches_the_composed_one(always_fused, monkeypatch, rows):
    ops = get_backend("torch").ops
    case = _head_case(rows)  # 400 rows of width 24: at least 8 per dimension, the head gradient's other layout
    want = _losses_and_grads(lambda h, w, t: ops.cross_entropy(ops.linear(h, w), t), *case)
    calls = _recording(monkeypatch)
    got = _losses_and_grads(ops.linear_cross_entropy, *case)
    assert len(calls) == 1
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max())
    assert float(want[0].mean()) > 1.0  # random logits over 70 tokens: a loss of a few nats, not zero


def test_small_logits_and_other_dtypes_take_the_composed_path(monkeypatch):
    ops, calls = get_backend("torch").ops, _recording(monkeypatch)
    hidden, head, targets, _ = _head_case()
    ops.linear_cross_entropy(hidden, head, targets)  # 50 x 70 logits: far below a million
    monkeypatch.setattr(kernels, "FUSED_MIN_LOGITS", 0)
    ops.linear_cross_entropy(hidden.half(), head.half(), targets)  # float16: composed
    assert calls == []
    ops.linear_cross_entropy(hidden, head, targets)
    ops.linear_cross_entropy(hidden.bfloat16(), head.bfloat16(), targets)
    assert len(calls) == 2


# Targets over the whole vocabulary, and over 3 tokens only: each of those rows of the head's gradient then
# sums about 130 one-hot terms, which a sum rounded to bf16 at every term would get wrong.
@pytest.mark.parametrize("frequent", [False, True], ids=["spread-targets", "three-targets"])
def test_fused_head_loss_in_bf16_matches_the_composed_one(always_fused, monkeypatch, frequent):
    ops = get_backend("torch").ops
    hidden, head, targets, weights = _head_case(400)
    if frequent:
        targets = targets % 3
    case = (hidden.bfloat16(), head.bfloat16(), targets, weights)
    want = _losses_and_grads(lambda h, w, t: ops.cross_entropy(ops.linear(h, w), t), *case)
    exact = _losses_and_grads(lambda h, w, t: ops.cross_entropy(ops.linear(h, w), t), hidden, head, targets, weights)
    calls = _recording(monkeypatch)
    got = _losses_and_grads(ops.linear_cross_entropy, *case)
    assert len(calls) == 1
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    assert (got[0] - want[0]).abs().max() < 1e-5 * want[0].abs().max()  # the same bf16 logits, in float32
    for a, b, e in zip(got[1:], want[1:], exact[1:]):
        # Rounded to bf16 at other points than the composed gradients, and as close to float32's
        error, composed_error = (a.float() - e).abs().max(), (b.float() - e).abs().max()
        assert error < 2 * composed_error + 1e-6 and error < 2e-2 * e.abs().max()


@pytest.mark.parametrize("compute", [Compute(), Compute(loss_chunk=20)], ids=["whole", "chunk-20"])
def test_a_training_step_is_the_same_with_the_fused_head(monkeypatch, compute):
    shape = resolve(ModelConfig(preset="micro"))
    weights = model.init_params(shape, 0)
    tokens = np.random.default_rng(1).integers(0, shape.vocab_size, (2, 33))
    out = []
    for fused in (False, True):
        monkeypatch.setattr(kernels, "FUSED_MIN_LOGITS", 0 if fused else 1 << 62)
        calls = _recording(monkeypatch)
        b = get_backend("torch")
        module = TrainModule(b, shape, OptimConfig(lr=3e-3), compute, objectives.lm)
        params = b.from_numpy(weights)
        state, losses = module.init_state(params), []
        for step in range(3):  # the update reads each gradient as laid out in memory (the fused AdamW kernel)
            params, state, loss, _ = module.step(params, state, [tokens], 3e-3, step + 1)
            losses.append(loss)
        out.append((losses, b.to_numpy(params)))
        # per step, 66 tokens: chunks of 20, 20, 20 and 6, each run again in the backward pass
        assert len(calls) == 3 * (8 if compute.loss_chunk else 1) * fused
    (plain_losses, plain), (fused_losses, fused) = out
    assert np.abs(np.array(plain_losses) - fused_losses).max() < 1e-5
    assert plain_losses[-1] < plain_losses[0]
    for k in plain:  # Adam's steps turn gradients equal to float rounding into updates equal to 1e-5 or so
        assert np.abs(plain[k] - fused[k]).max() < 1e-4, k


def test_the_fused_head_compiles_to_the_same_losses_and_gradients(always_fused):
    ops = get_backend("torch").ops
    case = _head_case()
    want = _losses_and_grads(lambda h, w, t: ops.cross_entropy(ops.linear(h, w), t), *case)
    compiled = torch.compile(lambda h, w, t: ops.linear_cross_entropy(h, w, t), fullgraph=True)
    for _ in range(2):  # the second call runs the compiled graph as it is
        got = _losses_and_grads(compiled, *case)
        for a, b in zip(got, want):
            assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max())


def test_the_workspace_lends_an_array_until_the_backward_pass_has_read_it():
    pool = kernels.Workspace()
    cpu = torch.device("cpu")
    first = pool.take(4, 5, cpu)
    second = pool.take(4, 5, cpu)  # the first is still held: a second array
    assert first.shape == (4, 5) and first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    del first, second
    again = pool.take(3, 5, cpu)  # both free: the smaller request is served from one of them
    assert again.data_ptr() == address and len(pool.storages) == 2
    del again
    bigger = pool.take(8, 5, cpu)  # none fits: the free ones are dropped, not kept beside the new one
    assert len(pool.storages) == 1 and bigger.shape == (8, 5)


def test_the_fused_head_reuses_its_workspace_from_one_step_to_the_next(always_fused, monkeypatch):
    monkeypatch.setattr(kernels, "WORKSPACE", kernels.Workspace())
    ops = get_backend("torch").ops
    case = _head_case()
    addresses = set()
    for _ in range(3):
        _losses_and_grads(ops.linear_cross_entropy, *case)
        addresses |= {s.data_ptr() for s in kernels.WORKSPACE.storages}
    assert len(addresses) == 1
