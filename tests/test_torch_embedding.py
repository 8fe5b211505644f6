"""The PyTorch backend's embedding lookup (`kernels.embedding`): its table gradient sums repeated ids in a fixed
order, compiled as well as eagerly, and in float32 for a bf16 table."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tinylm.backends import get_backend  # noqa: E402


def _case(dtype=torch.float32, rows=16, dim=64, tokens=4096):
    rng = np.random.default_rng(0)
    table = torch.tensor(rng.standard_normal((rows, dim), dtype=np.float32)).to(dtype)
    ids = torch.tensor(rng.integers(0, rows, (8, tokens // 8)))  # each row looked up about 256 times
    weights = torch.tensor(rng.standard_normal((8, tokens // 8, dim), dtype=np.float32)).to(dtype)
    return table, ids, weights


def _table_grad(fn, table, ids, weights):
    leaf = table.clone().requires_grad_()
    (fn(leaf, ids) * weights).sum().backward()
    return leaf.grad


def test_the_compiled_embedding_gradient_is_the_same_on_every_call_and_matches_eager():
    ops = get_backend("torch").ops
    case = _case()
    compiled = torch.compile(lambda table, ids: ops.embed(table, ids), fullgraph=True)
    grads = [_table_grad(compiled, *case) for _ in range(4)]
    for grad in grads[1:]:  # a scatter-add across threads gave a different last bit from one call to the next
        assert torch.equal(grad, grads[0])
    eager = _table_grad(lambda table, ids: torch.nn.functional.embedding(ids, table), *case)
    assert (grads[0] - eager).abs().max() < 1e-4


def test_a_bf16_tables_gradient_is_summed_in_float32_and_rounded_once():
    ops = get_backend("torch").ops
    table, ids, weights = _case(torch.bfloat16)
    got = _table_grad(ops.embed, table, ids, weights)
    exact = _table_grad(ops.embed, table.double(), ids, weights.double())
    assert got.dtype == torch.bfloat16
    # Rounded once, each entry is within half a bf16 unit of the exact sum (2^-8 relative); summed in bf16,
    # 256 roundings drift well past that.
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all()
