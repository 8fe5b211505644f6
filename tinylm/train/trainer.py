"""The training loop, backend-agnostic: sample, step, log, validate, checkpoint, resume.

A SIGTERM or SIGINT during the loop ends it after the step in progress, with a checkpoint of that step saved
and the metrics written (see `tinylm.interrupt`); `--resume` then goes on exactly as if nothing had happened.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tinylm import model

from tinylm.train import checkpoint

from tinylm.train import autotune, objectives
from tinylm.config import to_dict
from tinylm.data.mixture import resolve_phases, train_tokens
from tinylm.data.prepare import open_prepared
from tinylm.data.sampler import MixtureSampler, validation_rows
from tinylm.errors import UserError
from tinylm.interrupt import Interrupted, StopRequests, signal_name
from tinylm.train.metrics_log import MetricsLog
from tinylm.mfu import cached_peak, format_mfu, mfu
from tinylm.train.optim import check_state
from tinylm.progress import RunReporter
from tinylm.train.schedule import lr_at
from tinylm.train.step import TrainModule

if TYPE_CHECKING:  # the trainer is handed a resolved recipe; importing it for real would point upward
    from tinylm.recipe import Recipe


def format_eval(results: dict) -> str:
    """`task metric value` pairs, the main metric of each task (the first one reported)."""
    parts = []
    for task, metrics in results.items():
        name, value = next((k, v) for k, v in metrics.items() if not k.endswith("_stderr") and k != "samples")
        parts.append(f"{task} {name} {value:.3f}")
    return ", ".join(parts)


def fit_steps(cfg, mix, tokens: int, world: int) -> tuple[int, float, str]:
    """(steps, repetition cap, note) of a pretraining run on `tokens` prepared training tokens: `train.epochs`
    passes when set; with `train.fit_to_data`, at most `steps` and at most `max_epochs` passes; else `steps`.
    The note, empty when there is nothing to say, tells the person why the run is shorter than `steps`."""
    per_step = cfg.rows_per_rank() * world * cfg.seq_len
    if cfg.epochs:
        steps = max(1, math.ceil(cfg.epochs * tokens / per_step))
        # Rounding up to whole steps reads a little past the passes asked for; the cap must allow that.
        return steps, max(mix.max_epochs, steps * per_step / max(1, tokens) * (1 + 1e-9)), ""
    room = int(mix.max_epochs * tokens // per_step)
    if not cfg.fit_to_data or cfg.steps <= room:
        return cfg.steps, mix.max_epochs, ""
    steps = max(1, room)
    note = (f"the training data is small ({tokens:,} tokens): {steps} of the {cfg.steps} steps read it "
            f"{steps * per_step / max(1, tokens):.1f} times (data.mixture.max_epochs {mix.max_epochs:g}); more "
            f"text, not more passes, is what lowers the loss from here")
    return steps, mix.max_epochs, note


class PretrainData:
    """A pretraining stage's rows: the recipe's sources prepared, mixed by phase and sampled per step. `steps`
    is the stage's step count, fitted to the data when the recipe asks (`fit_steps`), and `note` says why."""

    def __init__(self, recipe: Recipe, backend, progress: bool):
        cfg = recipe.train
        world = backend.world_size
        # Rank 0 prepares the data and the mixture; the other ranks wait, then read what it wrote.
        if backend.rank:
            backend.barrier()
        if not recipe.data.dir:
            raise UserError("data.dir is not set: name the prepared data directory in the recipe")
        # Prepared on demand: a no-op when the data is up to date.
        self.shards = open_prepared(recipe.data, progress=progress)
        self.steps, cap, self.note = fit_steps(cfg, recipe.data.mixture, sum(train_tokens(self.shards).values()),
                                               world)
        cfg = dataclasses.replace(cfg, steps=self.steps)
        data_cfg = dataclasses.replace(recipe.data, mixture=dataclasses.replace(recipe.data.mixture, max_epochs=cap))
        phases = resolve_phases(data_cfg, self.shards, cfg.total_tokens(world), progress=progress)
        if not backend.rank:
            backend.barrier()
        if cfg.eval_every:  # a missing validation split is reported now, not after the first steps
            validation_rows(self.shards, cfg.seq_len, cfg.eval_rows)
        self.sampler = MixtureSampler(self.shards, phases, cfg.seq_len, cfg.rows_per_rank() * world, cfg.seed)
        self.seq_len = cfg.seq_len
        self.vocab_size = self.shards.vocab_size
        self.fingerprint = self.shards.fingerprint
        self.tokenizer_path = self.shards.tokenizer_path
        self.tokens_per_step = self.sampler.tokens_per_step
        self.token_bytes = self.shards.token_bytes

    def phase_name(self, step: int) -> str:
        return self.sampler.phase(step).name

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[np.ndarray]:
        per_rank = self.sampler.rows_per_step // world
        return np.split(self.sampler.batch(step)[rank * per_rank:(rank + 1) * per_rank], grad_accum)

    def validation(self, batch_size: int, max_rows: int) -> list[tuple[np.ndarray, None]]:
        rows = validation_rows(self.shards, self.seq_len, max_rows)
        return [(rows[i:i + batch_size], None) for i in range(0, len(rows), batch_size)]


class Trainer:
    """The loop over steps of one stage. `data` supplies its rows (the recipe's pretraining data unless given),
    `init` the checkpoint it starts from, `objective` what it minimizes (see `tinylm.train.objectives`);
    `committee` names run folders whose final models join this one's, after the last step, in a soft
    committee scored on the same `[eval]` tasks."""

    def __init__(self, recipe: Recipe, backend, out: str | Path | None = None, resume: bool = False,
                 allow_data_change: bool = False, reporter: RunReporter | None = None, data=None,
                 init=None, objective=objectives.lm, annotate=None, meta: dict | None = None, committee=()):
        self.recipe = recipe
        self.backend = backend
        self.cfg = recipe.train
        self.out = Path(out or recipe.train.out)
        self.reporter = reporter or RunReporter(enabled=False)
        self.world, self.rank = backend.world_size, backend.rank
        self.data = data if data is not None else PretrainData(recipe, backend, self.reporter.enabled)
        fitted = getattr(self.data, "steps", self.cfg.steps)
        if fitted != self.cfg.steps:
            self.cfg = dataclasses.replace(self.cfg, steps=fitted)
            self.recipe = recipe = dataclasses.replace(recipe, train=self.cfg)
        if getattr(self.data, "note", ""):
            self.reporter.warn(self.data.note)
        self.extra_meta = dict(meta or {})
        self.committee = [Path(p) for p in committee]
        if init is None and self.cfg.init_from:
            init = checkpoint.load(self.cfg.init_from, with_optimizer=False)
        self._init = init
        if self._init is not None:
            # Continuing a checkpoint (an imported model, say): its shape is the model, whatever the preset says.
            self.shape = self._init.shape
        else:
            self.shape = model.resolve(recipe.model, vocab_size=self.data.vocab_size)
        model.check_fits(self.shape, recipe.train.seq_len, self.data.vocab_size)
        self.choices = self._choices(resume)
        self.dtype, self.compiled = self.choices["dtype"], self.choices["compile"]
        self.extra_meta["choices"] = self.choices
        compute = model.Compute(self.dtype, self.cfg.loss_chunk, self.cfg.activation_checkpointing)
        self.module = TrainModule(backend, self.shape, recipe.optim, compute, objective, annotate,
                                  bucket_mb=self.cfg.bucket_mb, shard_optimizer=self.cfg.shard_optimizer,
                                  shard_params=self.cfg.shard_params, compile=self.compiled)
        self.flops_per_token = model.flops_per_token(self.shape, self.cfg.seq_len)
        self.peak, _ = cached_peak(backend, self.dtype)
        self._tasks = None
        self._saved_step = None
        self._start(resume, allow_data_change)

    def _choices(self, resume: bool) -> dict:
        """The compute dtype and whether the step compiles (`tinylm.train.autotune.settle`), said to the user; a
        resumed run keeps what its checkpoint ran with where the recipe leaves the choice open, so that it
        continues exactly as the uninterrupted run would."""
        cfg, existing, kept = self.cfg, checkpoint.list_steps(self.out) if resume else [], []
        ran = checkpoint.read_meta(existing[-1]).get("choices") if existing else None
        if isinstance(ran, dict) and cfg.dtype == "auto" and isinstance(ran.get("dtype"), str):
            cfg, kept = dataclasses.replace(cfg, dtype=ran["dtype"]), kept + ["dtype"]
        if isinstance(ran, dict) and cfg.compile is None and isinstance(ran.get("compile"), bool):
            cfg, kept = dataclasses.replace(cfg, compile=ran["compile"]), kept + ["compile"]
        choices = autotune.settle(self.backend, cfg, self.shape, self.recipe.optim, self._initial_weights,
                                  self.reporter.say)
        for name in kept:
            choices[f"{name}_why"] = f"as this run's checkpoint ran: {ran.get(f'{name}_why')}"
        self.reporter.say(f"dtype: {choices['dtype']} ({choices['dtype_why']})")
        self.reporter.say(f"compile: {'on' if choices['compile'] else 'off'} ({choices['compile_why']})")
        return choices

    def _start(self, resume: bool, allow_data_change: bool) -> None:
        existing = checkpoint.list_steps(self.out)
        if resume and existing:
            ckpt = checkpoint.load_newest(self.out, on_skip=lambda path, e: self.reporter.warn(
                f"skipping {path}, which does not load ({e}); resuming from an older checkpoint"))
            if ckpt.shape != self.shape:
                raise UserError(f"{ckpt.path}: checkpoint is of another model shape than the recipe's")
            if ckpt.meta.get("data_fingerprint") != self.data.fingerprint and not allow_data_change:
                raise UserError(f"{ckpt.path}: the prepared data changed since this checkpoint "
                                "(fingerprint differs); pass --allow-data-change to resume anyway")
            if ckpt.optimizer is None:
                raise UserError(f"{ckpt.path}: no optimizer state to resume from")
            check_state(self.recipe.optim, ckpt.params, ckpt.optimizer, str(ckpt.path))
            self.params = self.backend.from_numpy(self.module.parallel.local(ckpt.params))
            # A checkpoint holds the whole state; a rank of a sharded optimizer keeps its own slots.
            self.state = self.backend.from_numpy(self.module.parallel.owned_state(ckpt.optimizer))
            self.step = ckpt.step
            self.reporter.say(f"resuming from {ckpt.path} at step {self.step}")
        else:
            # Rank 0 alone writes the run directory, so it alone judges whether one is already there.
            if self.rank == 0 and not resume and (existing or (self.out / "metrics.jsonl").exists()):
                raise UserError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            self.params = self.backend.from_numpy(self.module.parallel.local(self._initial_weights()))
            self.state = self.module.init_state(self.params)
            self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if resume else None) if self.rank == 0 else None

    def _initial_weights(self) -> dict:
        return self._init.params if self._init is not None else model.init_params(self.shape, self.cfg.seed)

    def _log(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(row)

    def validate(self) -> dict:
        """Validation loss (nats per loss token) and bits per byte of the text those tokens decode to."""
        token_bytes = self.data.token_bytes()
        nats, nbytes, ntokens = 0.0, 0, 0
        for batch, counted in self.data.validation(self.cfg.batch_size, self.cfg.eval_rows):
            losses = self.module.token_losses(self.params, batch)
            targets = batch[:, 1:] if isinstance(batch, np.ndarray) else batch["targets"]
            if counted is None:
                counted = np.ones(targets.shape, bool)
            nats += float(losses[counted].sum(dtype=np.float64))
            nbytes += int(token_bytes[targets[counted]].sum())
            ntokens += int(counted.sum())
        bpb = nats / (math.log(2) * nbytes) if nbytes else float("nan")
        return {"val_loss": nats / max(1, ntokens), "val_bpb": bpb}

    def _validate_and_log(self) -> dict:
        val = self.validate()
        self._log({"step": self.step, **val})
        self.reporter.say(f"step {self.step}: val_loss {val['val_loss']:.4f} val_bpb {val['val_bpb']:.4f}")
        return val

    def _evaluate_and_log(self, final: bool = False) -> None:
        results = self.evaluate_tasks(final)
        self._log({"step": self.step, "eval": results})
        self.reporter.say(f"step {self.step}: " + format_eval(results))

    def evaluate_tasks(self, final: bool = False) -> dict:
        """The recipe's `[eval]` tasks on the current weights: {task: {metric: value}}; after the last step,
        the committee's as well, as `committee:<task>`."""
        from tinylm.eval.harness import evaluate
        from tinylm.eval.tasks import load_tasks

        ev = self.recipe.eval
        if self._tasks is None:
            self._tasks = load_tasks(ev.tasks, ev.limit or None, ev.limits)
        results = evaluate(self.backend, self.shape, self.full_params(), self.data.tokenizer_path, self._tasks,
                           meta=self.extra_meta, chat=bool(self.extra_meta.get("chat")),
                           dtype=self.dtype if ev.dtype == "train" else ev.dtype, batch_size=ev.batch_size)
        if final and self.committee:
            from tinylm.eval.committee import evaluate_committee

            joint = evaluate_committee(self.backend, self.shape, self.full_params(), self.extra_meta,
                                       self.data.tokenizer_path, self.committee, self._tasks)
            results.update({f"committee:{name}": r for name, r in joint.items()})
        return results

    def full_params(self) -> dict:
        """The current weights whole on this rank (gathered from their owners when parameters are sharded)."""
        return self.module.parallel.gather_all(self.params)

    def save(self, best: dict | None = None) -> None:
        # Every rank takes part in both.
        params = self.module.parallel.full_params(self.params)
        state = self.module.parallel.full_state(self.params, self.state)
        self._saved_step = self.step
        if self.rank != 0:
            return
        meta = {
            "tokens": self.step * self.data.tokens_per_step,
            "seed": self.cfg.seed,
            "backend": self.backend.name,
            "dtype": self.dtype,
            "model": self.shape.to_dict(),
            "config": to_dict(self.recipe),
            "data_fingerprint": self.data.fingerprint,
            "phase": self.data.phase_name(self.step),
            **self.extra_meta,
        }
        checkpoint.save(self.out, self.step, params, state,
                        meta, tokenizer=self.data.tokenizer_path, keep=self.cfg.keep_checkpoints, best=best)

    def _keep_if_best(self, val: dict) -> None:
        """Save this step and record it as the run's result when its validation loss is the lowest yet."""
        best = checkpoint.read_best(self.out).get("val_loss") if self.rank == 0 else None
        # Every rank takes part in saving, so every rank must reach the same decision: rank 0's.
        if self._rank_zeros(float(best is None or val["val_loss"] < best)):
            self.save(best=val)

    def _rank_zeros(self, value: float) -> float:
        """Rank 0's `value` on every rank: for the decisions every rank must take alike."""
        if self.world == 1:
            return value
        array = self.backend.from_numpy({"value": np.array([value], np.float32)})["value"]
        (array,) = self.backend.broadcast_flat([array], 0)
        return float(self.backend.to_numpy({"value": array})["value"][0])

    def _agreed_stop(self, signum: int | None) -> int | None:
        """Rank 0's pending signal, on every rank: the ranks must stop, and save, at the same step."""
        return int(self._rank_zeros(signum or 0)) or None

    def _stop(self, signum: int, saved: bool) -> None:
        if not saved:
            self.save()
        self.reporter.stop()
        if self.metrics is not None:
            self.metrics.close()
        where = self.out / "checkpoints" / f"step_{self.step:08d}"
        raise Interrupted(signum, f"stopped by {signal_name(signum)} at step {self.step} of {self.cfg.steps}: "
                                  f"checkpoint saved to {where} (continue with --resume, or run `tinylm run` again)")

    def fit(self) -> dict:
        last_words = f"the checkpoints already in {self.out / 'checkpoints'} are kept"
        with StopRequests(last_words) as stop:
            return self._fit(stop)

    def _fit(self, stop: StopRequests) -> dict:
        cfg = self.cfg
        last = {}
        step_time, step_tokens = 0.0, 0
        self.reporter.start(self.step, cfg.steps)
        if self.step == 0 and self.recipe.eval.at_start:
            # The starting weights (an imported base model, say) scored the way every later step is.
            if cfg.eval_every:
                self._validate_and_log()
            if self.recipe.eval.tasks:
                self._evaluate_and_log()
        while self.step < cfg.steps:
            lr = lr_at(self.recipe.schedule, self.recipe.optim.lr, self.step, cfg.steps)
            micro = self.data.micro_batches(self.step, self.rank, self.world, cfg.grad_accum)
            t0 = time.perf_counter()
            self.params, self.state, loss, gnorm = self.module.step(self.params, self.state, micro, lr, self.step + 1)
            step_time += time.perf_counter() - t0
            step_tokens += self.data.tokens_per_step
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {gnorm}"
                raise UserError(f"the run diverged at step {self.step + 1} ({what}; try a lower optim.lr); stopped "
                                f"without saving, checkpoints already in {self.out / 'checkpoints'} are kept")
            self.step += 1
            final = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or final:
                tps = step_tokens / step_time
                util = mfu(tps, self.flops_per_token, self.peak)
                last = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                        "tokens": self.step * self.data.tokens_per_step, "tokens_per_s": tps, "mfu": util,
                        "dtype": self.dtype, "compiled": self.compiled, "phase": self.data.phase_name(self.step - 1)}
                # A feed may report host-side numbers of the step (RL rewards, DPO reward margins).
                extra = self.data.log_metrics(self.step - 1) if hasattr(self.data, "log_metrics") else {}
                last.update(extra)
                self._log(last)
                self.reporter.say(f"step {self.step}: loss {loss:.4f} lr {lr:.2e} grad {gnorm:.3f} "
                                  f"{tps:,.0f} tok/s mfu {format_mfu(util)}"
                                  + "".join(f" {k} {v:.3f}" for k, v in extra.items()))
                step_time, step_tokens = 0.0, 0
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or final):
                val = self._validate_and_log()
                last.update(val)
                if cfg.keep_best:
                    self._keep_if_best(val)
            every = self.recipe.eval.every
            if self.recipe.eval.tasks and ((every and self.step % every == 0) or final):
                self._evaluate_and_log(final)
            saved = self.step % cfg.ckpt_every == 0 or final
            if saved and self._saved_step != self.step:
                self.save()
            self.reporter.advance(self.step, loss)
            signum = self._agreed_stop(stop.signum)
            if signum is not None and not final:
                self._stop(signum, saved)
        self.reporter.stop()
        if self.metrics is not None:
            self.metrics.close()
        best = checkpoint.read_best(self.out) if cfg.keep_best and self.rank == 0 else {}
        if best and best["step"] != self.step:
            self.reporter.say(f"the validation loss was lowest at step {best['step']} (val_bpb "
                               f"{best.get('val_bpb', float('nan')):.4f}); that checkpoint is the run's result")
        return last
