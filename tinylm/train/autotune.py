"""`train.dtype = "auto"` and an unset `train.compile`, settled by timing the model being trained.

A trial builds the stage's own training step (its model shape, optimizer, micro-batch, loss chunking and
activation checkpointing) on a throwaway copy of its starting weights and random tokens, and times whole
steps, forward, backward and update: fp32 and bf16 in turn, then eager and compiled in the dtype that won.
Each side's best step counts (the least disturbed by whatever else the machine runs), and the side that is not
the exact default (bf16, compiled) must win clearly, so a choice is never slower than fp32 or eager. Before
any step is timed, one small matmul in each dtype screens out a CPU without bf16 arithmetic (AVX2 alone):
PyTorch emulates bf16 there (its linear layers ran 7x slower than fp32 on an AMD EPYC with AVX2 alone, and
three timed bf16 steps of a 135M model had not finished after 16 minutes), so fp32 is chosen without them. The
timings are cached per machine (processor model, instruction sets, threads), backend, shape and micro-batch
(`tinylm.mfu.cached_measurement`), so a trial runs once; the choice is taken again from them for each run.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import time

import numpy as np

from tinylm import model
from tinylm.backends import resolve_dtype
from tinylm.mfu import cached_measurement, measured_matmul_peak
from tinylm.train import objectives
from tinylm.train.step import TrainModule

MIN_GAIN = 1.05
"""How much faster bf16 (inexact) or a compiled step (a compilation to pay for) must be to be chosen: a
smaller lead is within what two timings of the same step differ by on a busy machine."""
TIMED_STEPS = 3
"""Timed steps of each side, after one untimed step that pays for first use (and compilation)."""
SCREEN_SIZE = 512
"""The square matmul that screens bf16 (`matmul_rates`): a few milliseconds in fp32 and tens of milliseconds
where bf16 is emulated (3 and 19 ms on an AMD EPYC with AVX2 alone)."""
COMPILE_FLOOR_S = 10.0
"""A run whose eager steps take less than this in all is not worth a compiled trial: compiling even the
smallest preset's training step takes longer (`micro`: about two minutes on 2 busy AMD EPYC cores)."""


def trial_key(shape: model.ModelShape, cfg, optim_name: str) -> str:
    """What a step's time depends on beside the machine and backend: the model's shape, the micro-batch, the
    optimizer and the compute options; hashed to keep the cache readable."""
    spec = {"model": shape.to_dict(), "batch": [cfg.batch_size, cfg.seq_len], "optimizer": optim_name,
            "loss_chunk": cfg.loss_chunk, "activation_checkpointing": cfg.activation_checkpointing}
    return "train step " + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f} ms"


def choose_dtype(seconds: dict) -> tuple[str, str]:
    """(dtype, why) from the best step times {"float32": s, "bfloat16": s}."""
    fp32, bf16 = seconds["float32"], seconds["bfloat16"]
    gain = fp32 / bf16
    choice = "bfloat16" if gain >= MIN_GAIN else "float32"
    return choice, (f"a training step took {_ms(bf16)} in bf16 against {_ms(fp32)} in fp32 ({gain:.2f}x, "
                    f"{MIN_GAIN}x needed for bf16)")


def choose_compile(seconds: dict, steps: int) -> tuple[bool, str]:
    """(compile, why) from {"eager": s, "compiled": s, "compiling": s} (a step's best times and what compiling
    took) for a run of `steps` steps: compiled only where it is clearly faster and saves more than it costs."""
    eager, compiled, compiling = seconds["eager"], seconds["compiled"], seconds["compiling"]
    gain, saved = eager / compiled, (eager - compiled) * steps
    choice = gain >= MIN_GAIN and saved > compiling
    return choice, (f"a training step took {_ms(compiled)} compiled against {_ms(eager)} eager ({gain:.2f}x, "
                    f"{MIN_GAIN}x needed); compiling took {compiling:.1f} s, {steps} steps save {saved:.1f} s")


def matmul_rates(backend) -> dict:
    """FLOP/s of a `SCREEN_SIZE` square matmul through the backend's linear op, {"float32", "bfloat16"}."""
    return {d: measured_matmul_peak(backend, d, sizes=(SCREEN_SIZE,), repeats=2) for d in ("float32", "bfloat16")}


def screen_dtype(rates: dict) -> tuple[str, str] | None:
    """("float32", why) where bf16 matmuls are slower than fp32 ones, so no bf16 step can win; None where the
    training steps must be timed."""
    fp32, bf16 = rates["float32"], rates["bfloat16"]
    if bf16 >= fp32:
        return None
    return "float32", (f"a {SCREEN_SIZE}-square matmul ran at {bf16 / 1e9:,.1f} GFLOP/s in bf16 against "
                       f"{fp32 / 1e9:,.1f} in fp32 (no bf16 arithmetic on this CPU): no bf16 step timed")


def _timed(backend, modules: dict, weights: dict, rows: np.ndarray, lr: float) -> dict:
    """Best seconds of a step of each of `modules`, taken in turn on shared weights, and each one's first step
    less its best ("<name> first": compilation)."""
    params = backend.from_numpy(weights)
    state = next(iter(modules.values())).init_state(params)
    best, first = {name: float("inf") for name in modules}, {}
    for i in range(TIMED_STEPS + 1):
        for name, module in modules.items():
            t0 = time.perf_counter()
            params, state, _, _ = module.step(params, state, [rows], lr, i + 1)
            took = time.perf_counter() - t0
            if i:
                best[name] = min(best[name], took)
            else:
                first[name] = took
    return {**best, **{f"{name} first": max(first[name] - best[name], 1e-6) for name in modules}}


class Trial:
    """Times the training steps of one stage's model; each measurement cached (see the module's docstring)."""

    def __init__(self, backend, cfg, shape: model.ModelShape, optim_cfg, weights):
        """`cfg` is the stage's `[train]`, `weights()` the numpy weights it starts from (asked for only when a
        measurement runs). The steps timed are next-token steps of the model's body: a classification head is
        left out, as the next-token loss does not read it."""
        if shape.num_labels:
            shape = dataclasses.replace(shape, num_labels=0)
            weights = (lambda whole: lambda: {k: v for k, v in whole().items() if k != "classifier.weight"})(weights)
        self.backend, self.cfg, self.shape, self.optim_cfg, self.weights = backend, cfg, shape, optim_cfg, weights
        self.key = trial_key(shape, cfg, optim_cfg.name)

    def _module(self, dtype: str, compile: bool) -> TrainModule:
        compute = model.Compute(dtype, self.cfg.loss_chunk, self.cfg.activation_checkpointing)
        return TrainModule(self.backend, self.shape, self.optim_cfg, compute, objectives.lm,
                           shard_optimizer=self.cfg.shard_optimizer, compile=compile)

    def _measure(self, what: str, modules, say) -> tuple[dict, bool]:
        def measure():
            say(f"timing {TIMED_STEPS} training steps {what} (once for this machine, model and micro-batch)")
            rng = np.random.default_rng(0)
            rows = rng.integers(0, self.shape.vocab_size, (self.cfg.batch_size, self.cfg.seq_len + 1))
            return _timed(self.backend, {k: make() for k, make in modules.items()}, self.weights(), rows,
                          self.optim_cfg.lr)

        return cached_measurement(self.backend, f"{self.key} {what}", measure)

    def dtypes(self, say) -> tuple[dict, bool]:
        """Best eager step seconds {"float32", "bfloat16"}, and whether they came from the cache. `say(line)`
        hears of a measurement about to run."""
        found, cached = self._measure("in fp32 and bf16", {d: (lambda d=d: self._module(d, False))
                                                           for d in ("float32", "bfloat16")}, say)
        return {d: found[d] for d in ("float32", "bfloat16")}, cached

    def compiled(self, dtype: str, say) -> tuple[dict, bool]:
        """{"eager", "compiled", "compiling"} seconds in `dtype` (see `choose_compile`), and whether cached."""
        found, cached = self._measure(f"eager and compiled in {dtype}", {
            "eager": lambda: self._module(dtype, False), "compiled": lambda: self._module(dtype, True)}, say)
        return {"eager": found["eager"], "compiled": found["compiled"], "compiling": found["compiled first"]}, cached

    def eager(self, dtype: str, say) -> tuple[float, bool]:
        found, cached = self._measure(f"eager in {dtype}", {"eager": lambda: self._module(dtype, False)}, say)
        return found["eager"], cached


def settle(backend, cfg, shape: model.ModelShape, optim_cfg, weights, say=None) -> dict:
    """{"dtype", "dtype_why", "compile", "compile_why", "seconds"}: the compute dtype and whether the step is
    compiled for a stage whose `[train]` is `cfg`, by asking, the device, or timing (see the module's
    docstring); `seconds` holds the timings behind them. `say(line)` hears of a measurement about to run."""
    trial, seconds = Trial(backend, cfg, shape, optim_cfg, weights), {}
    announce = say or (lambda line: None)

    def note(cached: bool) -> str:
        return "; cached timing" if cached else ""

    dtype, dtype_why = resolve_dtype(backend, cfg.dtype)
    if dtype is None and backend.world_size > 1:
        dtype, dtype_why = "float32", "several ranks: each would time its own steps, and they could disagree"
    elif dtype is None:
        rates, cached = cached_measurement(backend, f"matmul screen {SCREEN_SIZE}", lambda: matmul_rates(backend))
        choice = screen_dtype(rates)
        if choice:
            seconds["matmul_flops"] = rates
        else:
            found, cached = trial.dtypes(announce)
            seconds["dtypes"] = found
            choice = choose_dtype(found)
        dtype, dtype_why = choice
        dtype_why += note(cached)
    steps = cfg.steps * cfg.grad_accum
    if cfg.compile is not None:
        compile, compile_why = cfg.compile, "asked for"
    elif backend.auto_compile() is not None:
        compile, compile_why = backend.auto_compile()
    elif backend.use_compile:  # PyTorch's default is eager: this backend was made to compile
        compile, compile_why = True, "the backend was made to compile"
    elif backend.world_size > 1:
        compile, compile_why = backend.use_compile, "several ranks: each would time its own steps"
    elif cfg.shard_params:
        compile, compile_why = False, "train.shard_params does not combine with compiling"
    else:
        eager = seconds.get("dtypes", {}).get(dtype)
        cached = True
        if eager is None:
            eager, cached = trial.eager(dtype, announce)
        seconds["eager"] = eager
        if steps * eager < COMPILE_FLOOR_S:
            compile, compile_why = False, (f"{steps} steps take about {steps * eager:.1f} s eager, less than "
                                           f"compiling a step takes ({COMPILE_FLOOR_S:.0f} s or more){note(cached)}")
        else:
            found, cached = trial.compiled(dtype, announce)
            seconds["compile"] = found
            compile, compile_why = choose_compile(found, steps)
            compile_why += note(cached)
    return {"dtype": dtype, "dtype_why": dtype_why, "compile": bool(compile), "compile_why": compile_why,
            "seconds": seconds}
