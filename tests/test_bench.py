"""`make bench` rows: the nanoGPT-shape row and its plain-PyTorch baseline measure the same task."""

import math

from tinylm import bench
from tinylm.backends import get_backend
from tinylm.bench_baseline import baseline_throughput


def test_nanogpt_shape_row_and_its_baseline_start_from_the_same_loss_and_learn():
    name, config, seq_len, batch, _ = bench.CASES[0]
    assert name == "nanogpt-shape" and (seq_len, batch) == (bench.NANOGPT["context"], bench.NANOGPT["batch_size"])
    backend = get_backend("torch", "float32")
    shape, tps, losses = bench.train_throughput(backend, config, seq_len, batch, steps=4)
    base_tps, base_losses = baseline_throughput(steps=4, **bench.NANOGPT)
    assert (shape.n_layers, shape.dim, shape.vocab_size) == (4, 128, 65)
    for rate, curve in ((tps, losses), (base_tps, base_losses)):
        assert rate > 0 and len(curve) == 5
        assert abs(curve[0] - math.log(65)) < 0.3  # random init on uniform tokens: about ln(vocabulary)
        assert curve[-1] < curve[0]  # both repeat one batch, so both must fit it
    row = bench._row("nanogpt-shape", "torch", backend.device_name, tps, 1e6, 1e11, "given", 1.0, losses)
    assert {"name", "backend", "device", "dtype", "tokens_per_s", "mfu", "peak_gflops", "peak_memory_mb",
            "losses"} <= set(row) and row["peak_gflops"] == 100.0
