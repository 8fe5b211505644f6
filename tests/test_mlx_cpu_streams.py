"""MLX's CPU kernels that split their work across streams give the plain kernels' values and gradients, for
any number of streams, lengths that do not divide evenly, and grouped queries."""

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from tinylm.backends import get_backend  # noqa: E402

get_backend("mlx")  # loads the BLAS it uses before mlx itself is imported
import mlx.core as mx  # noqa: E402

from tinylm.backends.mlx import MLXOps, cpu_streams  # noqa: E402


def _streams(n):
    return [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)]


def _values_and_grads(fn, args, cotangent):
    out, vjps = mx.vjp(fn, list(args), [cotangent])
    return np.array(out[0]), [np.array(g.astype(mx.float32)) for g in vjps]


def _close(a, b, tol):
    assert a.shape == b.shape
    assert np.abs(a - b).max() < tol, np.abs(a - b).max()


# Short rows split by sequence (the batch of 3 or 7 unevenly), long ones or too few rows by blocks of queries.
@pytest.mark.parametrize("n_streams,length,batch", [(1, 9, 2), (2, 150, 2), (3, 7, 2), (3, 64, 2), (2, 64, 3),
                                                    (3, 20, 7)])
def test_causal_attention_matches_the_fused_kernel(n_streams, length, batch):
    key = mx.random.key(0)
    kq, kk, kv, kc = mx.random.split(key, 4)
    q = mx.random.normal((batch, 4, length, 8), key=kq)
    k, v = mx.random.normal((batch, 2, length, 8), key=kk), mx.random.normal((batch, 2, length, 8), key=kv)
    cotangent = mx.random.normal(q.shape, key=kc)
    scale = 8 ** -0.5

    def plain(q, k, v):
        return [mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")]

    def streamed(q, k, v):
        return [cpu_streams.causal_attention(_streams(n_streams), scale)(q, k, v)]

    want, want_grads = _values_and_grads(plain, (q, k, v), cotangent)
    got, got_grads = _values_and_grads(streamed, (q, k, v), cotangent)
    _close(got, want, 1e-5)
    for g, w in zip(got_grads, want_grads):
        _close(g, w, 1e-4)
    # Compiled (as every training step is), the same.
    got_compiled, _ = _values_and_grads(mx.compile(streamed), (q, k, v), cotangent)
    _close(got_compiled, want, 1e-5)


def test_attention_parts_cover_every_query_once_with_even_work():
    streams = _streams(2)
    by_sequence, parts = cpu_streams._attention_parts(streams, 5, 64)
    assert by_sequence
    assert [(p[1].start, p[1].stop, p[2], p[3]) for p in parts] == [(0, 2, 0, 64), (2, 5, 0, 64)]
    for batch, length in ((1, 64), (8, 512)):  # one row cannot be split by sequence; long rows are not
        by_sequence, parts = cpu_streams._attention_parts(streams, batch, length)
        assert not by_sequence
        assert sorted((p[2], p[3]) for p in parts) == [(0, length // 4), (length // 4, length // 2),
                                                      (length // 2, 3 * length // 4), (3 * length // 4, length)]
        keys = {}  # each stream's keys seen, summed over its query blocks: the same for both
        for stream, _, start, end in parts:
            keys[id(stream)] = keys.get(id(stream), 0) + (end - start) * end
        assert len(set(keys.values())) == 1


def test_causal_attention_keeps_a_bf16_input_bf16_and_computes_in_fp32():
    q = mx.random.normal((1, 2, 130, 16), key=mx.random.key(1))
    k = mx.random.normal((1, 2, 130, 16), key=mx.random.key(2))
    attend = cpu_streams.causal_attention(_streams(2), 0.25)
    out = attend(q.astype(mx.bfloat16), k.astype(mx.bfloat16), k.astype(mx.bfloat16))
    assert out.dtype == mx.bfloat16
    want = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal")
    _close(np.array(out.astype(mx.float32)), np.array(want), 0.05)


@pytest.mark.parametrize("n_streams,rows", [(1, 5), (2, 9), (3, 7), (3, 2)])
def test_cross_entropy_matches_log_sum_exp(n_streams, rows):
    logits = 4 * mx.random.normal((rows, 37), key=mx.random.key(3))
    targets = mx.random.randint(0, 37, (rows,), key=mx.random.key(4))
    cotangent = mx.random.normal((rows,), key=mx.random.key(5))

    def plain(x):
        return [mx.logsumexp(x, axis=-1) - mx.take_along_axis(x, targets[:, None], axis=-1)[:, 0]]

    def streamed(x):
        return [cpu_streams.cross_entropy(_streams(n_streams))(x, targets)]

    want, (want_grad,) = _values_and_grads(plain, (logits,), cotangent)
    got, (got_grad,) = _values_and_grads(streamed, (logits,), cotangent)
    _close(got, want, 1e-5)
    _close(got_grad, want_grad, 1e-5)


@pytest.mark.parametrize("n_streams,rows", [(1, 5), (2, 9), (3, 7), (3, 2)])
def test_linear_cross_entropy_matches_the_composed_head_and_loss(n_streams, rows):
    hidden = mx.random.normal((rows, 6), key=mx.random.key(6))
    head = 2 * mx.random.normal((37, 6), key=mx.random.key(7))
    targets = mx.array([3, 3, 0, 36, 5, 3, 1, 2, 9][:rows])  # a repeated target: its head row adds up
    cotangent = mx.random.normal((rows,), key=mx.random.key(8))

    def plain(h, w):
        x = h @ w.T
        return [mx.logsumexp(x, axis=-1) - mx.take_along_axis(x, targets[:, None], axis=-1)[:, 0]]

    def fused(h, w):
        return [cpu_streams.linear_cross_entropy(_streams(n_streams))(h, w, targets)]

    want, want_grads = _values_and_grads(plain, (hidden, head), cotangent)
    got, got_grads = _values_and_grads(fused, (hidden, head), cotangent)
    assert want.mean() > 1.0  # logits of a few units over 37 tokens: losses of a few nats
    _close(got, want, 1e-4)
    for a, b in zip(got_grads, want_grads):
        _close(a, b, 1e-4)


def test_exp_by_pow_is_as_close_to_exp_as_mlx_exp_is():
    x = mx.concatenate([mx.random.uniform(-80, 0, (20000,), key=mx.random.key(9)), mx.array([0.0, -mx.inf])])
    want = np.exp(np.array(x).astype(np.float64))
    errors = []
    for got in (cpu_streams.exp_by_pow(x), mx.exp(x)):
        got = np.array(got).astype(np.float64)
        assert got[-1] == 0.0 and got[-2] == 1.0
        errors.append(np.max(np.abs(got[:-1] - want[:-1]) / want[:-1]))
    assert errors[0] < 1e-5 and errors[0] <= 1.5 * errors[1]  # float32's own rounding of x, times |x|
    scores = mx.where(mx.arange(5) > 2, -mx.inf, 30 * mx.random.normal((4, 5), key=mx.random.key(10)))
    exps, top, sums = cpu_streams.shifted_exps(scores)
    assert np.array_equal(np.array(top), np.array(scores.max(axis=-1, keepdims=True)))
    _close(np.array(exps / sums[..., None]), np.array(mx.softmax(scores, axis=-1)), 1e-6)


def test_silu_on_a_cpu_matches_x_times_its_sigmoid():
    x = 10 * mx.random.normal((1000,), key=mx.random.key(11))
    cotangent = mx.random.normal((1000,), key=mx.random.key(12))
    want, (want_grad,) = _values_and_grads(lambda x: [x * mx.sigmoid(x)], (x,), cotangent)
    got, (got_grad,) = _values_and_grads(lambda x: [MLXOps().silu(x)], (x,), cotangent)
    _close(got, want, 1e-5)
    _close(got_grad, want_grad, 1e-5)


def test_tensors_spread_over_streams_largest_first_to_the_least_loaded():
    index = cpu_streams.spread({"a": (10, 10), "b": (60,), "c": (50,), "d": (5,)}, 2)
    assert index["a"] != index["b"] == index["c"] and index["d"] == index["a"]
    assert set(cpu_streams.spread({"a": (3,), "b": (4,)}, 1).values()) == {0}


def test_ops_give_each_tensor_a_stream_context_on_a_multi_core_cpu():
    ops = MLXOps()
    ops._streams = _streams(2)
    lanes = ops.lanes({"a": (4, 4), "b": (3,)})
    used = {}
    for name, lane in lanes.items():
        with lane:
            used[name] = mx.default_stream(mx.cpu)
    assert used["a"] != used["b"]
    assert used["a"] in ops._streams and used["b"] in ops._streams


@pytest.mark.parametrize("length", [1, 7, 30, 48, 512, 32000])
def test_row_max_and_row_sum_are_the_plain_reductions(length):
    x = 20 * mx.random.normal((3, 5, length), key=mx.random.key(length))
    assert np.array_equal(np.array(cpu_streams.row_max(x)), np.array(x.max(axis=-1, keepdims=True)))
    want = np.array(x).astype(np.float64).sum(-1)
    _close(np.array(cpu_streams.row_sum(x)), want, 2e-6 * np.abs(np.array(x)).sum(-1).max())
