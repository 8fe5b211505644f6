"""What only a CUDA device exercises: bf16 against fp32, the fused AdamW kernel, torch.compile, flash attention
and a resumed `tinylm train` run. `make test-gpu` runs them; without CUDA every test here skips."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinylm import model  # noqa: E402

from tinylm.train import checkpoint  # noqa: E402
from tinylm.backends import get_backend, resolve_dtype  # noqa: E402
from tinylm.backends.torch import TorchBackend  # noqa: E402
from tinylm.cli import main  # noqa: E402
from tinylm.model import ModelConfig, resolve  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402

from test_trainer import _recipe  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Equal query and key/value heads: the flash kernel is then usable whatever this PyTorch's GQA support.
SHAPE = resolve(ModelConfig(preset="tiny", n_kv_heads=6, vocab_size=4096))


def _rows(shape, rows=4, length=128, seed=0):
    return np.random.default_rng(seed).integers(0, shape.vocab_size, (rows, length + 1))


def _train(backend, steps=5):
    """Losses and final weights of `steps` fp32 AdamW steps on two batches in turn, from the same weights."""
    module = TrainModule(backend, SHAPE, OptimConfig(lr=3e-3, weight_decay=0.1))
    params = backend.from_numpy(model.init_params(SHAPE, 0))
    state = module.init_state(params)
    losses = []
    for step in range(steps):
        params, state, loss, _ = module.step(params, state, [_rows(SHAPE, seed=step % 2)], 3e-3, step + 1)
        losses.append(loss)
    return np.array(losses), backend.to_numpy(params)


@pytest.fixture
def exact_fp32(monkeypatch):
    """The backend turns TF32 matmuls on for speed; comparisons of two fp32 paths want them off."""
    def off():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return off


def test_auto_dtype_is_bf16_where_the_gpu_has_it():
    backend = get_backend("torch", "auto")
    assert backend.device.type == "cuda"
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert backend.dtype == ("bfloat16" if native else "float32")
    assert resolve_dtype(backend, "auto")[0] == backend.dtype


def test_bf16_loss_and_gradients_match_fp32_on_the_same_weights_and_batch(exact_fp32):
    backend = get_backend("torch")
    exact_fp32()
    params = backend.from_numpy(model.init_params(SHAPE, 0))
    out = {}
    for dtype in ("float32", "bfloat16"):
        loss, grads = TrainModule(backend, SHAPE, OptimConfig(), dtype).loss_and_grads(params, [_rows(SHAPE)])
        flat = np.concatenate([g.ravel() for _, g in sorted(backend.to_numpy(grads).items())])
        out[dtype] = (backend.item(loss), flat)
    (loss32, g32), (loss16, g16) = out["float32"], out["bfloat16"]
    assert abs(loss16 - loss32) < 2e-3 * loss32
    assert float(g16 @ g32) / (np.linalg.norm(g16) * np.linalg.norm(g32)) > 0.99


def test_fused_adamw_kernel_matches_the_core_rule_on_cuda(exact_fp32):
    results = []
    for fused in (False, True):
        backend = TorchBackend(fused_adamw=fused)
        exact_fp32()
        assert backend.device.type == "cuda" and (backend.fused_adamw(OptimConfig()) is not None) == fused
        results.append(_train(backend))
    (plain_losses, plain), (fused_losses, fused_params) = results
    assert np.allclose(plain_losses, fused_losses, atol=1e-5)
    assert max(np.abs(plain[k] - fused_params[k]).max() for k in plain) < 1e-4


def test_compiled_step_matches_eager(exact_fp32):
    runs = []
    for compile in (False, True):
        backend = get_backend("torch", compile=compile)
        exact_fp32()
        runs.append(_train(backend)[0])
    eager, compiled = runs
    assert eager[-1] < eager[0]  # it trains
    assert np.abs(eager - compiled).max() < 1e-3


def test_flash_attention_matches_the_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = get_backend("torch")
    gen = torch.Generator(device=backend.device).manual_seed(0)
    q, k, v = (torch.randn(2, 6, 256, 32, device=backend.device, generator=gen) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        reference = backend.ops.attention(q, k, v, 32**-0.5, "causal")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot run these inputs
        flash = backend.ops.attention(*(x.bfloat16() for x in (q, k, v)), 32**-0.5, "causal")
    assert (flash.float() - reference).abs().max() < 3e-2
    # The whole model in bf16: flash attention inside, the same loss as the math path.
    params, rows = backend.from_numpy(model.init_params(SHAPE, 0)), _rows(SHAPE)
    module = TrainModule(backend, SHAPE, OptimConfig(), "bfloat16")
    losses = {}
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(kernel):
            losses[kernel] = float(module.token_losses(params, rows).mean())
    assert abs(losses[SDPBackend.FLASH_ATTENTION] - losses[SDPBackend.MATH]) < 1e-2


def test_train_on_cuda_then_resume_reproduces_the_uninterrupted_losses(tmp_path, prepared, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE_DIR", str(tmp_path / "cache"))
    full, part = tmp_path / "full", tmp_path / "part"
    argv = ["train", str(_recipe(tmp_path, prepared, steps=8)), "--backend", "torch", "--quiet",
            "--set", "train.dtype=auto"]
    assert main([*argv, "--out", str(full)]) == 0
    # The same run stopped after its step-4 checkpoint: the copy loses the last one, then resumes.
    shutil.copytree(full, part)
    shutil.rmtree(checkpoint.list_steps(part)[-1])
    assert checkpoint.load(part).step == 4
    assert main([*argv, "--out", str(part), "--resume"]) == 0

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def losses(run):
        return np.array([r["loss"] for r in rows(run) if "loss" in r])

    assert len(losses(full)) == len(losses(part)) == 8
    # Exact on a CPU; on CUDA, kernels that accumulate with atomics may differ in the last bits.
    assert np.abs(losses(full) - losses(part)).max() < 1e-3
    ckpt = checkpoint.load(part)
    assert ckpt.step == 8 and ckpt.meta["dtype"] == get_backend("torch", "auto").dtype
    assert {r["dtype"] for r in rows(part) if "loss" in r} == {ckpt.meta["dtype"]}
