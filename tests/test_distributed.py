"""Data parallelism through the real launchers: two ranks of batch B train like one process of batch 2B, with
gradients all-reduced in buckets, with or without a sharded optimizer or sharded parameters, and checkpoints
move between the two."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import data_toml
from tinylm.train.distributed import bucket_plan, owner_plan

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
LAUNCHERS = {"torch": "torchrun", "mlx": "mlx.launch"}
# Buckets far smaller than the micro model, so that its gradients and updates travel in several.
SHARDED = ("--set", "train.shard_optimizer=true", "--set", "train.bucket_mb=0.05")
# Parameters sharded too (PyTorch): each block's weights gathered as it runs, and again as it is recomputed.
PARAMS_SHARDED = ("--set", "train.shard_params=true", "--set", "train.bucket_mb=0.05")
RECOMPUTED = ("--set", "train.activation_checkpointing=true")
TOLERANCE = 1e-5


def test_buckets_fill_in_name_order_up_to_the_cap_and_never_mix_dtypes():
    tensors = {"b": (40, "f32"), "a": (50, "f32"), "c": (30, "f32"), "big": (500, "f32"), "h": (10, "f16")}
    assert bucket_plan(tensors, 100) == [["a", "b"], ["big"], ["c"], ["h"]]
    assert bucket_plan(tensors, 0) == [["a"], ["b"], ["big"], ["c"], ["h"]]  # one all-reduce per tensor
    assert bucket_plan(tensors, 10**6) == [["a", "b", "big", "c"], ["h"]]
    # The plan depends on names and sizes, not on the order a rank's dict happens to be in.
    assert bucket_plan(dict(reversed(tensors.items())), 100) == bucket_plan(tensors, 100)
    # Gradient buckets follow an order given (backward's), still one dtype each and capped.
    assert bucket_plan(tensors, 100, order=["c", "b", "big", "a", "h"]) == [["c", "b"], ["big"], ["a"], ["h"]]


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_gradient_hooks_see_every_gradient_as_returned(backend_name):
    """What the reducer receives during backward is each parameter's whole gradient (tied embeddings: both uses)."""
    pytest.importorskip("mlx.core" if backend_name == "mlx" else "torch")
    import numpy as np

    from tinylm import model

    from tinylm.train import objectives
    from tinylm.backends import get_backend
    from tinylm.model import ModelConfig, resolve

    backend = get_backend(backend_name, "float32")
    shape = resolve(ModelConfig(preset="micro", vocab_size=64))
    assert shape.tie_embeddings
    params = backend.from_numpy(model.init_params(shape, 0))
    tokens = backend.tokens(np.random.default_rng(0).integers(0, 64, (2, 9)))
    step = backend.grad_step(lambda p, b: objectives.lm(backend.ops, p, b, shape, model.Compute("float32")))
    seen = {}
    _, grads = step(params, {"tokens": tokens}, on_grad=seen.__setitem__)
    assert list(seen)[-1] == "embed_tokens.weight" or backend_name == "mlx"
    assert set(seen) == set(grads)
    for name, g in backend.to_numpy(grads).items():
        assert np.array_equal(backend.to_numpy({"g": seen[name]})["g"], g), name


def test_each_tensor_has_one_owner_and_the_load_is_balanced():
    sizes = {"embed": 1000, "w1": 400, "w2": 400, "w3": 300, "norm": 10, "gain": 10}
    owners = owner_plan(sizes, 2)
    assert set(owners) == set(sizes) and set(owners.values()) == {0, 1}
    load = [sum(s for n, s in sizes.items() if owners[n] == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(sizes.values()) - min(sizes.values())
    assert owners == owner_plan(dict(reversed(sizes.items())), 2)
    assert set(owner_plan(sizes, 1).values()) == {0}
    assert set(owner_plan(sizes, 8).values()) == set(range(6))  # more ranks than tensors: some own none


def _need(backend):
    if shutil.which(LAUNCHERS[backend]) is None:
        pytest.skip(f"{LAUNCHERS[backend]} is not installed")
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend, ranks) -> list[str]:
    """The command prefix that starts `ranks` processes of Python (one process is plain Python)."""
    if ranks == 1:
        return [sys.executable]
    if backend == "torch":  # each launch its own port: tests in other checkouts may be running torchrun too
        return [shutil.which("torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(_free_port())]
    return [shutil.which("mlx.launch"), "-n", str(ranks), "--backend", "ring", "--", sys.executable]


def _run(cmd, timeout) -> tuple[int, str]:
    """(exit code, output) of `cmd`; on a timeout its whole process group goes, the ranks a launcher started
    included, so that a hung collective leaves nothing running."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"timed out after {timeout} s\n{output}"
    return proc.returncode, output


COLLECTIVES = """
import sys
import numpy as np
from tinylm.backends import get_backend
from tinylm.train.distributed import DataParallel
from tinylm.train.optim import OptimConfig, slots

name = sys.argv[1]
backend = get_backend(name, "float32")
rank, world = backend.rank, backend.world_size
shapes = {"embed": (33, 8), "q": (8, 8), "norm": (8,), "w": (16, 8), "gain": (3,)}
cfg = OptimConfig()

def arrays_of(r):  # what rank r holds: different on every rank, known to all
    rng = np.random.default_rng(r)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

def per_tensor_sum(x):  # the reference: one all-reduce per tensor, as before buckets
    if name == "torch":
        import torch.distributed
        torch.distributed.all_reduce(x)
        return x
    import mlx.core as mx
    return mx.distributed.all_sum(x)

mine = arrays_of(rank)
dp = DataParallel(backend, shapes, cfg, bucket_mb=300 / 2**20, shard_optimizer=True)
assert world == 2 and len(dp.buckets(mine)) > 1
# Gradients arrive in backward's order, not the plan's; the reduced ones equal per-tensor all-reduces.
assert len(dp.backward_buckets) > 1
reducer = dp.reducer(None, 1)
for n in ("gain", "norm", "w", "embed", "q"):
    reducer.add(n, backend.from_numpy(mine)[n])
bucketed = backend.to_numpy(reducer.result())
reference = backend.to_numpy({n: per_tensor_sum(x) / world for n, x in backend.from_numpy(mine).items()})
for n in shapes:
    assert np.array_equal(bucketed[n], reference[n]), n
# With accumulation: the earlier micro-batches' sum is added, then the mean over micro-batches taken.
earlier = backend.from_numpy({n: x * 3 for n, x in mine.items()})
reducer = dp.reducer(earlier, 2)
for n in shapes:
    reducer.add(n, backend.from_numpy(mine)[n])
accumulated = backend.to_numpy(reducer.result())
for n in shapes:
    assert np.allclose(accumulated[n], reference[n] * 2, rtol=1e-6), n

shared = backend.to_numpy(dp.share_updates(backend.from_numpy(mine)))
for n in shapes:
    assert np.array_equal(shared[n], arrays_of(dp.owners[n])[n]), n

def state_of(r):
    return {s: arrays_of(r)[n] * (i + 2) for n in shapes if dp.owners[n] == r for i, s in enumerate(slots(cfg, n))}

full = dp.full_state(backend.from_numpy(mine), backend.from_numpy(state_of(rank)))
if rank == 0:
    expected = {s: v for r in range(world) for s, v in state_of(r).items()}
    assert list(full) == [s for n in shapes for s in slots(cfg, n)]
    assert all(np.array_equal(full[s], expected[s]) for s in expected)
else:
    assert full is None

if name == "torch":  # sharded parameters: a rank keeps its own tensors; reads fetch the owner's, whole
    import torch
    dp = DataParallel(backend, shapes, cfg, bucket_mb=300 / 2**20, shard_params=True)
    local = {n: v.requires_grad_(True) for n, v in backend.from_numpy(dp.local(mine)).items()}
    assert all((local[n].numel() > 0) == (dp.owners[n] == rank) for n in shapes)
    view = dp.view(local, "float32")
    for n in shapes:
        assert np.array_equal(view[n].detach().numpy(), arrays_of(dp.owners[n])[n]), n
    # Each rank's gradient of every tensor is rank + 1: its owner gets the mean over ranks, the others nothing.
    sum(((rank + 1) * view[n]).sum() for n in shapes).backward()
    for n in shapes:
        expected = (1.5,) * int(np.prod(shapes[n])) if dp.owners[n] == rank else ()
        assert tuple(local[n].grad.reshape(-1).tolist()) == expected, n
    whole = backend.to_numpy(dp.gather_all(local))
    on_zero = dp.full_params(local)
    for n in shapes:
        assert np.array_equal(whole[n], arrays_of(dp.owners[n])[n]), n
        assert on_zero is None if rank else np.array_equal(on_zero[n], arrays_of(dp.owners[n])[n]), n
backend.close()
print("collectives ok", rank)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(LAUNCHERS))
def test_bucketed_collectives_equal_per_tensor_ones(tmp_path, backend):
    _need(backend)
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    code, output = _run([*_launch(backend, 2), str(script), backend], timeout=90)
    assert code == 0, output
    assert output.count("collectives ok") == 2


def _recipe(root, prepared, batch_size):
    path = root / f"recipe{batch_size}.toml"
    path.write_text(f"""
[model]
preset = "micro"
{data_toml(prepared)}
[train]
steps = 6
batch_size = {batch_size}
seq_len = 32
log_every = 1
eval_every = 0
ckpt_every = 3
[optim]
lr = 3e-3
""")
    return path


def _losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a, b):
    assert len(a) == len(b) == 6
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def train(tmp_path_factory, prepared):
    """train(backend, ranks, *flags, out=None): a run of 8 sequences per step over `ranks` ranks. Runs without
    `out` are cached for the module, since several tests compare against the same one."""
    root = tmp_path_factory.mktemp("runs")
    cached = {}

    def run(backend, ranks, *flags, out=None):
        key = (backend, ranks, flags)
        if out is None and key in cached:
            return cached[key]
        target = out or root / f"run{len(cached)}"
        recipe = _recipe(root, prepared, 8 // ranks)
        cmd = [*_launch(backend, ranks), "-m", "tinylm", "train", str(recipe), "--backend", backend, "--quiet",
               "--out", str(target), *flags]
        code, output = _run(cmd, timeout=180)
        assert code == 0, output
        if out is None:
            cached[key] = target
        return target

    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(LAUNCHERS))
def test_two_ranks_match_one_process_with_the_whole_batch(train, backend):
    _need(backend)
    single = train(backend, 1)
    modes = ((), SHARDED) + ((PARAMS_SHARDED, PARAMS_SHARDED + RECOMPUTED) if backend == "torch" else ())
    for flags in modes:
        double = train(backend, 2, *flags)
        diff = _max_diff(_losses(single), _losses(double))  # one metrics file, written by rank 0 alone
        print(f"{backend} 2 ranks {' '.join(flags[1::2]) or 'bucketed'}: max loss difference {diff:.2e}")
        assert diff < TOLERANCE
    # Rank 0 gathered the owners' slots: the sharded checkpoint has the unsharded one's layout.
    from safetensors.numpy import load_file

    sharded = [train(backend, 2, *flags) for flags in modes[1:]]
    for name in ("optimizer", "model"):
        whole = load_file(str(single / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        for run in sharded:
            gathered = load_file(str(run / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
            assert {k: v.shape for k, v in whole.items()} == {k: v.shape for k, v in gathered.items()}


@pytest.mark.slow
def test_sharded_muon_matches_one_process(train):
    _need("torch")
    muon = ("--set", "optim.name=muon")
    for sharding in (SHARDED, PARAMS_SHARDED):
        diff = _max_diff(_losses(train("torch", 1, *muon)), _losses(train("torch", 2, *muon, *sharding)))
        print(f"torch muon 2 ranks {sharding[1]}: max loss difference {diff:.2e}")
        assert diff < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [((2, SHARDED), (1, ())), ((1, ()), (2, SHARDED)),
                                        ((2, PARAMS_SHARDED), (1, ())), ((1, ()), (2, PARAMS_SHARDED))],
                         ids=["sharded-to-one", "one-to-sharded", "params-sharded-to-one", "one-to-params-sharded"])
def test_a_checkpoint_resumes_across_rank_counts_and_sharding(train, tmp_path, first, then):
    _need("torch")
    whole = train("torch", first[0], *first[1])
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if stopped after the step-3 checkpoint
    train("torch", then[0], "--resume", *then[1], out=resumed)
    diff = _max_diff(_losses(whole), _losses(resumed))
    print(f"torch {first[0]} -> {then[0]} ranks {' '.join(then[1][1::2] or first[1][1::2])} at step 3: "
          f"max loss difference {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.slow
def test_sharding_divides_what_a_rank_keeps_and_not_what_it_trains(tmp_path):
    _need("torch")
    out = tmp_path / "sharding.json"
    code, output = _run([sys.executable, "-m", "tinylm.bench.sharding", "run", "--preset", "micro", "--steps", "2",
                         "--seq-len", "32", "--out", str(out)], timeout=240)
    assert code == 0, output
    rows = {row["name"].split("-", 1)[1]: row for row in json.loads(out.read_text())}
    assert len({tuple(row["losses"]) for row in rows.values()}) == 1
    kept = {mode: row["kept_mb"] for mode, row in rows.items()}
    # AdamW: weights and two moments replicated; the moments halved; everything halved (micro's owners balance).
    assert kept["shard_optimizer"] < kept["replicated"] * 0.75
    assert kept["shard_params"] < kept["replicated"] * 0.55
    assert kept["shard_params+checkpointing"] == kept["shard_params"]


@pytest.mark.slow
def test_sharded_parameters_accumulate_micro_batches_like_one_process(train):
    """Each micro-batch's backward pass reduces its gradients onto their owners; the sum over micro-batches
    is still the mean gradient of the whole batch."""
    _need("torch")
    accumulated = ("--set", "train.grad_accum=2")
    single = train("torch", 1, *accumulated, "--set", "train.batch_size=4")
    double = train("torch", 2, *accumulated, "--set", "train.batch_size=2", *PARAMS_SHARDED)
    diff = _max_diff(_losses(single), _losses(double))
    print(f"torch 2 ranks sharded parameters, 2 micro-batches: max loss difference {diff:.2e}")
    assert diff < TOLERANCE


def test_a_stand_in_for_a_tensor_another_rank_owns_holds_no_memory():
    """What a rank passes to a collective in place of a tensor it does not keep (checkpoints, evaluation and
    rollouts of a parameter-sharded run) has the tensor's shape and dtype but not its size in memory."""
    import numpy as np

    from tinylm.backends import get_backend

    torch_stand_in = get_backend("torch").stand_in((4096, 576))
    assert tuple(torch_stand_in.shape) == (4096, 576) and str(torch_stand_in.dtype) == "torch.float32"
    assert torch_stand_in.untyped_storage().nbytes() <= 4
    mlx_stand_in = get_backend("mlx").stand_in((3, 5))
    assert tuple(mlx_stand_in.shape) == (3, 5) and np.array(mlx_stand_in).sum() == 0
