import numpy as np
import pytest

from tinylm.train.schedule import ScheduleConfig, lr_at


def test_wsd_warms_up_holds_then_decays_to_floor():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, 1.0, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_decay_shapes_end_at_floor(shape):
    cfg = ScheduleConfig(name="wsd", decay_frac=0.5, decay_shape=shape, min_lr_ratio=0.0)
    assert lr_at(cfg, 2.0, 99, 100) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_at(cfg, 2.0, 75, 100) < 2.0


def test_cosine_and_constant():
    cos = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(cos, 1.0, 49, 100) == pytest.approx(0.5, abs=0.02)
    assert lr_at(ScheduleConfig(name="constant"), 3.0, 77, 100) == 3.0


def test_adamw_rule_matches_torch_adamw_with_bias_correction():
    torch = pytest.importorskip("torch")
    from tinylm.backends import get_backend
    from tinylm.train.optim import OptimConfig, init_state, update

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(5)]
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    b = get_backend("torch")
    params = b.from_numpy({"w": w0})
    state = init_state(b.ops, cfg, params)
    ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step, g in enumerate(grads, 1):
        params, state = update(b.ops, cfg, params, {"w": torch.from_numpy(g)}, state, b.ops.scalar(1e-2), b.ops.scalar(float(step)))
        ref.grad = torch.from_numpy(g)
        opt.step()
    assert np.abs(params["w"].numpy() - ref.detach().numpy()).max() < 1e-6


@pytest.mark.parametrize("backend_name,dtype", [("torch", "float32"), ("torch", "bfloat16"), ("mlx", "float32")])
@pytest.mark.parametrize("rows,cols", [(32, 64), (64, 32)])
def test_muon_orthogonalizes_and_matches_adamw_rms(backend_name, dtype, rows, cols):
    pytest.importorskip("mlx.core" if backend_name == "mlx" else "torch")
    from tinylm.backends import get_backend
    from tinylm.train.optim import newton_schulz

    b = get_backend(backend_name)
    g = b.from_numpy({"g": np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)})["g"]
    x = b.to_numpy({"x": newton_schulz(b.ops, g, 5, dtype)})["x"]
    assert x.dtype == np.float32 and x.shape == (rows, cols)
    singular = np.linalg.svd(x, compute_uv=False)
    assert singular.min() > 0.5 and singular.max() < 1.3
    # Scaled by 0.2 * sqrt(max dim), the update's RMS is about 0.2, like AdamW's typical update.
    rms = np.sqrt(np.mean((x * 0.2 * np.sqrt(max(rows, cols))) ** 2))
    assert 0.12 < rms < 0.25


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_addmm_is_a_scaled_product_plus_a_scaled_term(backend_name):
    pytest.importorskip("mlx.core" if backend_name == "mlx" else "torch")
    from tinylm.backends import get_backend

    b = get_backend(backend_name)
    rng = np.random.default_rng(0)
    for batch in ((), (3,)):
        c, x, y = (rng.standard_normal(batch + s).astype(np.float32) for s in ((4, 5), (4, 6), (6, 5)))
        got = b.to_numpy({"r": b.ops.addmm(*b.from_numpy({"c": c, "x": x, "y": y}).values(), alpha=-4.8, beta=2.0)})
        np.testing.assert_allclose(got["r"], -4.8 * (x @ y) + 2.0 * c, rtol=1e-5, atol=1e-5)


def test_clipping_bounds_the_global_norm():
    from tinylm.backends import get_backend
    from tinylm.train.optim import clip_scale, global_norm

    b = get_backend("torch")
    grads = b.from_numpy({"a": np.full((4,), 3.0, np.float32), "b": np.full((2, 2), 4.0, np.float32)})
    norm = global_norm(b.ops, grads)
    assert float(norm) == pytest.approx(10.0)
    assert clip_scale(b.ops, norm, 0.0) is None  # clipping off
    assert float(clip_scale(b.ops, norm, 20.0)) == 1.0  # below the bound: unchanged
    clipped = {k: g * clip_scale(b.ops, norm, 1.0) for k, g in grads.items()}
    total = np.sqrt(sum((v.numpy() ** 2).sum() for v in clipped.values()))
    assert total == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_fused_adamw_kernel_matches_the_core_rule(grad_clip):
    pytest.importorskip("torch")
    from tinylm import model
    from tinylm.backends.torch import TorchBackend
    from tinylm.model import ModelConfig, resolve
    from tinylm.train.optim import OptimConfig
    from tinylm.train.step import TrainModule

    shape = resolve(ModelConfig(preset="micro"))
    weights = model.init_params(shape, 0)
    batch = np.random.default_rng(0).integers(0, shape.vocab_size, (4, 33))
    results = []
    for fused in (False, True):
        backend = TorchBackend(fused_adamw=fused)
        module = TrainModule(backend, shape, OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=grad_clip))
        params = backend.from_numpy(weights)
        state = module.init_state(params)
        losses = []
        for step in range(5):
            params, state, loss, norm = module.step(params, state, [batch], 3e-3, step + 1)
            losses.append(loss)
            assert norm > 2 * grad_clip  # with clipping on, it scales every step's gradient (in the kernel)
        results.append((losses, backend.to_numpy(params)))
    (plain_losses, plain), (fused_losses, fused_params) = results
    assert np.allclose(plain_losses, fused_losses, atol=1e-5)
    assert max(np.abs(plain[k] - fused_params[k]).max() for k in plain) < 1e-5


def test_torch_uses_the_fused_adamw_kernel_by_default():
    pytest.importorskip("torch")
    from tinylm.backends.torch import TorchBackend
    from tinylm.train.optim import OptimConfig

    assert TorchBackend().fused_adamw(OptimConfig(name="adamw")) is not None
    assert TorchBackend(fused_adamw=False).fused_adamw(OptimConfig(name="adamw")) is None
    assert TorchBackend().fused_adamw(OptimConfig(name="muon")) is None  # Muon keeps the core rule
