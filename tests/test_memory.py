"""Memory settings change how a loss is computed, never what: chunked cross-entropy (`train.loss_chunk`) and
block checkpointing (`train.activation_checkpointing`) against the plain computation, on both backends."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")

from tinylm import config, model  # noqa: E402

from tinylm.bench import memory as bench_memory  # noqa: E402

from tinylm.train import objectives  # noqa: E402
from tinylm.backends import get_backend  # noqa: E402
from tinylm.cli import main  # noqa: E402
from tinylm.model import Compute, ModelConfig, resolve  # noqa: E402
from tinylm.train.optim import OptimConfig  # noqa: E402
from tinylm.recipe import Recipe, TrainConfig, resolve_stages  # noqa: E402
from tinylm.runner import stage_fingerprint  # noqa: E402
from tinylm.train.step import TrainModule  # noqa: E402

from conftest import data_toml  # noqa: E402

BACKENDS = ("torch", "mlx")
SHAPES = {
    "plain": resolve(ModelConfig(preset="micro")),
    "qknorm-shared-untied": resolve(ModelConfig(preset="micro", qk_norm=True, block_repeats=2, tie_embeddings=False)),
}
PLAIN = Compute()
# 4 x 48 = 192 tokens: chunks of 50 leave a short last one; 64 divides them evenly.
SAVING = {"chunk-50": Compute(loss_chunk=50), "checkpoint": Compute(checkpoint_blocks=True),
          "both": Compute(loss_chunk=64, checkpoint_blocks=True)}


def _tokens(shape, rows=4, length=48, seed=1):
    return np.random.default_rng(seed).integers(0, shape.vocab_size, (rows, length + 1))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batches(shape):
    """A batch for every objective, all on the same 4 x 48 tokens."""
    rng = np.random.default_rng(2)
    tokens = _tokens(shape)
    packed = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
              "weights": (rng.random((4, 48)) < 0.7).astype(np.float32) / 100.0}
    teacher = _log_softmax(rng.standard_normal((4, 48, shape.vocab_size)).astype(np.float32))
    ids = np.argsort(-teacher, -1)[..., :5]
    return {
        "lm": (objectives.lm, {"tokens": tokens}),
        "sft": (objectives.sft, packed),
        "distill": (objectives.distill(objectives.DistillConfig(teacher="t", temperature=2.0, alpha=0.5)),
                    {**packed, "teacher_logprobs": teacher}),
        "distill-top-k": (objectives.distill(objectives.DistillConfig(teacher="t", top_k=5)),
                          {**packed, "teacher_logprobs": _log_softmax(np.take_along_axis(teacher, ids, -1)),
                           "teacher_ids": ids}),
        "grpo": (objectives.grpo(0.2, 0.28, 0.04),
                 {**packed, "advantages": rng.standard_normal((4, 48)).astype(np.float32),
                  "old_logprobs": np.full((4, 48), -6.3, np.float32),
                  "ref_logprobs": np.full((4, 48), -6.1, np.float32)}),
        "dpo": (objectives.dpo(0.1), {**packed, "ref_logps": np.full(4, -300.0, np.float32),
                                      "pair_weights": np.full(2, 0.5, np.float32)}),
    }


def _loss_and_grads(b, shape, compute, objective, batch, weights):
    module = TrainModule(b, shape, OptimConfig(), compute, objective)
    loss, grads = module.loss_and_grads(b.from_numpy(weights), [batch])
    return b.item(loss), b.to_numpy(grads)


def _assert_close(got, want, tol):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert abs(loss_a - loss_b) < tol, (loss_a, loss_b)
    assert set(grads_a) == set(grads_b)
    for k in grads_a:
        assert np.abs(grads_a[k] - grads_b[k]).max() < tol * max(1.0, np.abs(grads_b[k]).max()), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(SHAPES))
def test_per_token_losses_match_the_plain_computation(backend, variant):
    shape, b = SHAPES[variant], get_backend(backend)
    weights, tokens = model.init_params(shape, 0), _tokens(shape)
    params = b.from_numpy(weights)
    want = TrainModule(b, shape, OptimConfig()).token_losses(params, tokens)
    for name, compute in SAVING.items():
        got = TrainModule(b, shape, OptimConfig(), compute).token_losses(params, tokens)
        assert got.shape == want.shape == (4, 48)
        assert np.abs(got - want).max() < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["lm", "sft", "distill", "distill-top-k", "grpo", "dpo"])
def test_every_objective_gives_the_same_loss_and_gradients(backend, objective):
    shape, b = SHAPES["qknorm-shared-untied"], get_backend(backend)
    fn, batch = _batches(shape)[objective]
    weights = model.init_params(shape, 0)
    want = _loss_and_grads(b, shape, PLAIN, fn, batch, weights)
    for name, compute in SAVING.items():
        _assert_close(_loss_and_grads(b, shape, compute, fn, batch, weights), want, 1e-5)


@pytest.mark.parametrize("variant", sorted(SHAPES))
def test_backends_agree_with_chunking_and_checkpointing_on(variant):
    shape = SHAPES[variant]
    weights, tokens = model.init_params(shape, 0), _tokens(shape)
    out = {name: _loss_and_grads(get_backend(name), shape, SAVING["both"], objectives.lm, tokens, weights)
           for name in BACKENDS}
    _assert_close(out["torch"], out["mlx"], 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_settings_reach_the_ops(backend):
    """Each applied block and each loss chunk goes through `ops.checkpoint` (not merely the same numbers)."""
    shape, b = SHAPES["qknorm-shared-untied"], get_backend(backend, compile=False)
    calls, inner = [], b.ops.checkpoint
    b.ops.checkpoint = lambda fn: calls.append(fn) or inner(fn)
    _loss_and_grads(b, shape, Compute(loss_chunk=50, checkpoint_blocks=True), objectives.lm, _tokens(shape),
                    model.init_params(shape, 0))
    assert len(calls) == shape.depth + 4  # 2 layers applied twice each, then 4 chunks of 50, 50, 50 and 42


def test_recipe_settings_are_checked_and_do_not_make_a_stage_stale():
    with pytest.raises(config.SettingError, match="loss_chunk"):
        TrainConfig(loss_chunk=-1)
    with pytest.raises(config.SettingError, match="loss_chunk"):
        Compute(loss_chunk=-1)
    plain = resolve_stages(Recipe(name="r"))[0]
    saving = resolve_stages(Recipe(name="r", train=TrainConfig(loss_chunk=512, activation_checkpointing=True)))[0]
    assert stage_fingerprint(plain, "") == stage_fingerprint(saving, "")


def test_training_with_the_settings_logs_the_same_losses(tmp_path, prepared):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\npreset = "micro"\n{data_toml(prepared)}\n[train]\nsteps = 3\nbatch_size = 4\n'
                      f'seq_len = 32\nlog_every = 1\neval_every = 0\n')
    losses = {}
    for name, sets in (("plain", []), ("saving", ["--set", "train.loss_chunk=40",
                                                  "--set", "train.activation_checkpointing=true"])):
        out = tmp_path / name
        assert main(["train", str(recipe), "--backend", "torch", "--out", str(out), "--quiet", *sets]) == 0
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[name] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses["plain"]) == 3
    np.testing.assert_allclose(losses["saving"], losses["plain"], atol=1e-5)


def test_memory_bench_rows_on_a_small_head():
    # PyTorch here, MLX in its own process: the MLX case lowers MLX's memory limit for the whole process.
    whole = bench_memory.loss_head_memory("torch", "micro", 2, 64, 0)
    chunked = bench_memory.loss_head_memory("torch", "micro", 2, 64, 48)
    assert abs(whole["losses"][0] - chunked["losses"][0]) < 1e-5
    (row,) = bench_memory.rows(("mlx",), echo=lambda _: None, preset="micro", batch_size=2, seq_len=64,
                               chunks=(48,))
    assert {"name", "backend", "device", "dtype", "peak_memory_mb", "loss_chunk", "losses"} <= set(row)
    assert row["name"] == "micro-loss-head-memory" and row["loss_chunk"] == 48 and row["peak_memory_mb"] > 0
    assert abs(row["losses"][0] - whole["losses"][0]) < 1e-5


_FREED_PROBE = """
import sys
import numpy as np
from tinylm.backends import get_backend
get_backend(sys.argv[1])

def resident_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before = resident_mib()
x = np.ones(256 * 2**20 // 4, dtype=np.float32)  # 256 MiB from malloc, written
del x
print(resident_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunables")
@pytest.mark.parametrize("backend,env,kept", [
    ("torch", {}, False), ("torch", {"TINYLM_KEEP_FREED_MEMORY": "1"}, True),
    ("torch", {"TINYLM_KEEP_FREED_MEMORY": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}, False),
    ("mlx", {}, True), ("mlx", {"TINYLM_KEEP_FREED_MEMORY": "0"}, False)])
def test_a_cpu_backend_keeps_freed_memory_for_reuse_by_its_default_or_as_asked(backend, env, kept):
    """On a Linux CPU a freed 256 MiB block's pages stay with the process for the next allocation (no page
    faults to map them again) where asked, or by default on MLX; on torch by default, or with malloc tuned by
    the environment, they go back to the system."""
    pytest.importorskip(backend)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "TINYLM_KEEP_FREED_MEMORY"}
    done = subprocess.run([sys.executable, "-c", _FREED_PROBE, backend], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    still_resident = float(done.stdout.split()[-1])
    assert (still_resident > 200) == kept, still_resident
