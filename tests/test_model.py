import numpy as np
import pytest

from tinylm import model
from tinylm.model import ModelConfig, ModelShape, resolve
from tinylm.presets import PRESETS, PUBLISHED_PARAMS
from tinylm.errors import UserError


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(preset):
    shape = resolve(ModelConfig(preset=preset))
    count = model.count_params(shape)
    published, unit = PUBLISHED_PARAMS[preset]
    assert abs(count - published) <= max(1e-3 * published, unit / 2), count


def test_layer_sharing_keeps_size_and_doubles_depth():
    base = resolve(ModelConfig(preset="mobilellm-125m"))
    shared = resolve(ModelConfig(preset="mobilellm-ls-125m"))
    assert model.count_params(base) == model.count_params(shared)
    assert shared.depth == 2 * base.depth
    assert model.flops_per_token(shared, 512) > 1.9 * model.flops_per_token(base, 512) - 6 * 32000 * 576 * 2


def test_untied_head_and_qk_norm_add_their_parameters():
    tied = resolve(ModelConfig(preset="micro"))
    untied = resolve(ModelConfig(preset="micro", tie_embeddings=False))
    qk = resolve(ModelConfig(preset="micro", qk_norm=True))
    assert model.count_params(untied) - model.count_params(tied) == tied.vocab_size * tied.dim
    assert model.count_params(qk) - model.count_params(tied) == 2 * tied.n_layers * tied.head_dim


def test_flops_per_token_counts_matmuls_and_attention():
    shape = ModelShape(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=100)
    per_block = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    expected = 6 * (2 * per_block + 100 * 64) + 12 * 2 * 4 * 16 * 32
    assert model.flops_per_token(shape, 32) == expected


def test_init_is_seeded_and_scales_output_projections():
    shape = resolve(ModelConfig(preset="micro"))
    a, b, c = model.init_params(shape, 1), model.init_params(shape, 1), model.init_params(shape, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed_tokens.weight"], c["embed_tokens.weight"])
    assert a["layers.0.mlp.down_proj.weight"].std() < 0.5 * a["layers.0.mlp.up_proj.weight"].std()
    assert np.all(a["norm.weight"] == 1.0)


@pytest.mark.parametrize("overrides", [dict(n_heads=5), dict(n_kv_heads=3), dict(preset="nope")])
def test_bad_shapes_are_user_errors(overrides):
    with pytest.raises(UserError):
        resolve(ModelConfig(**{"preset": "micro", **overrides}))


def test_every_preset_resolves():
    for name in PRESETS:
        shape = resolve(ModelConfig(preset=name))
        assert shape.dim == shape.n_heads * shape.head_dim


def test_torch_cross_entropy_and_its_gradient_equal_pytorchs_own():
    torch = pytest.importorskip("torch")
    from tinylm.backends.torch import TorchOps

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 300, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, 300, (2, 5), generator=gen)
    weights = torch.rand(2, 5, generator=gen)  # a weighted sum, as SFT and RL take it
    ours = TorchOps(torch.device("cpu")).cross_entropy(logits, targets)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1), reduction="none")
    (grad_theirs,) = torch.autograd.grad((theirs.reshape(2, 5) * weights).sum(), logits)
    assert ours.shape == (2, 5)
    assert torch.allclose(ours, theirs.reshape(2, 5), atol=1e-5)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-6)


def test_torch_cpu_attention_in_bf16_computes_in_float32_and_returns_bf16():
    torch = pytest.importorskip("torch")
    from tinylm.backends import get_backend

    ops = get_backend("torch").ops
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=gen) for h in (4, 2, 2))  # grouped-query: 4 heads, 2 kv
    half = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    out = ops.attention(*half, 8**-0.5, "causal")
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.detach().float() for t in half), is_causal=True,
                                                                 scale=8**-0.5, enable_gqa=True).bfloat16()
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in half)
