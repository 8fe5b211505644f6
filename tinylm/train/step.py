"""The training step, written once: gradients of an objective, accumulation, all-reduce, clipping, update.

The backend contributes autodiff (`grad_step`), compilation (`pure_step`) and the arrays; nothing here
depends on which backend runs it. The objective is a pure function from `tinylm.train.objectives`.
"""

from __future__ import annotations

import numpy as np

from tinylm import model

from tinylm.train import objectives

from tinylm.train import optim
from tinylm.train.distributed import DataParallel
from tinylm.model import ModelShape
from tinylm.train.optim import OptimConfig


class TrainModule:
    def __init__(self, backend, shape: ModelShape, optim_cfg: OptimConfig, compute: model.Compute | str = "float32",
                 objective=objectives.lm, annotate=None, bucket_mb: float = 25.0, shard_optimizer: bool = False,
                 shard_params: bool = False, compile: bool | None = None):
        """`compute` is a `model.Compute`, or a dtype name for that dtype's plain computation. `annotate(batch)
        -> dict`, if given, adds arrays to each backend batch before the gradient (a teacher's log-probabilities
        for distillation); it runs outside autodiff. `bucket_mb`, `shard_optimizer` and `shard_params`: see
        `tinylm.train.distributed`; with sharded parameters, the `params` every method takes are this rank's own
        (`DataParallel.local`). `compile` (a stage's `train.compile`) overrides the backend's setting; None
        keeps it."""
        if isinstance(compute, str):
            compute = model.Compute(compute)
        self.backend = backend
        self.shape = shape
        self.optim_cfg = optim_cfg
        self.annotate = annotate
        ops = backend.ops
        compiled = backend.use_compile if compile is None else compile
        parallel = self.parallel = DataParallel(backend, model.param_shapes(shape), optim_cfg, bucket_mb,
                                                shard_optimizer, shard_params, compiled)

        def loss_fn(params, batch):
            return objective(ops, parallel.view(params, compute.dtype), batch, shape, compute)

        fused = backend.fused_adamw(optim_cfg)

        def core_update(params, grads, state, lr, step, grad_scale):
            return optim.update(ops, optim_cfg, params, grads, state, lr, step, compute.dtype, grad_scale)

        update = fused or core_update

        def apply(params, state, grads, lr, step):
            # Clipped by the norm of the whole gradient, whichever tensors this rank updates; the clipping
            # factor goes into the update, which a fused kernel applies as it reads each gradient.
            norm = parallel.global_norm(ops, grads)
            scale = optim.clip_scale(ops, norm, optim_cfg.grad_clip)
            updated, state = update(parallel.owned(params), parallel.owned(grads), state, lr, step, scale)
            return {**params, **updated}, state, norm

        def token_losses(params, batch):
            tokens = batch["tokens"]
            return model.token_losses(ops, parallel.view(params, compute.dtype), tokens[:, :-1], tokens[:, 1:],
                                      shape, compute)

        def weighted_token_losses(params, batch):
            return objectives.weighted_token_losses(ops, parallel.view(params, compute.dtype), batch, shape, compute)

        self._grad = backend.grad_step(loss_fn, compiled)
        self._apply = backend.pure_step(apply, compiled) if fused is None else apply  # a fused kernel runs as it is
        self._token_losses = backend.pure_step(token_losses, compiled)
        self._weighted_token_losses = backend.pure_step(weighted_token_losses, compiled)

    def to_backend(self, batch) -> dict:
        """A numpy batch (token rows, or a dict of arrays) as backend arrays: integers as token ids."""
        if isinstance(batch, np.ndarray):
            batch = {"tokens": batch}
        out = {}
        for k, v in batch.items():
            if np.issubdtype(v.dtype, np.integer):
                out[k] = self.backend.tokens(v)
            else:
                out[k] = self.backend.from_numpy({k: np.ascontiguousarray(v)})[k]
        return out

    def init_state(self, params: dict) -> dict:
        """Zero optimizer state for the parameters this rank updates (all of them unless sharded)."""
        return optim.init_state(self.backend.ops, self.optim_cfg, self.parallel.owned(params))

    def loss_and_grads(self, params: dict, micro_batches: list):
        """Mean loss and mean gradient over micro-batches (gradient accumulation), averaged across ranks."""
        total_loss, total, n = None, None, len(micro_batches)
        for i, rows in enumerate(micro_batches):
            batch = self.to_backend(rows)
            if self.annotate is not None:
                batch.update(self.annotate(batch))
            # Across ranks, the last micro-batch's gradients are reduced while its backward pass runs.
            reducer = self.parallel.reducer(total, n) if i == n - 1 else None
            if reducer is not None:
                loss, grads = self._grad(params, batch, on_grad=reducer.add)
                return self.parallel.all_mean_scalar((total_loss + loss) / n if n > 1 else loss), reducer.result()
            # The running sum is what the backend adds this micro-batch's gradients into (in place on torch).
            loss, total = self._grad(params, batch, into=total)
            total_loss = loss if total_loss is None else total_loss + loss
        if n > 1:  # one micro-batch's gradient is its mean already: no pass over every tensor to divide by 1
            total_loss = total_loss / n
            for k in total:  # tensor by tensor, so that each sum is freed as its mean is made
                total[k] = total[k] / n
        if self.parallel.params_sharded:  # the gradients were reduced in backward; the loss is not yet
            total_loss = self.parallel.all_mean_scalar(total_loss)
        return total_loss, total

    def step(self, params: dict, state: dict, micro_batches: list, lr: float, step: int):
        """One optimizer step; `step` is 1-based (AdamW's bias correction counts from 1)."""
        ops = self.backend.ops
        loss, grads = self.loss_and_grads(params, micro_batches)
        params, state, norm = self._apply(params, state, grads, ops.scalar(lr), ops.scalar(float(step)))
        params = self.parallel.share_updates(params)
        self.backend.materialize((params, state, loss, norm))
        return params, state, self.backend.item(loss), self.backend.item(norm)

    def token_losses(self, params: dict, rows) -> np.ndarray:
        """Per-token next-token losses (nats) as numpy: for token rows (batch, time + 1), or for a packed
        dict batch (its mask and positions applied, weights ignored)."""
        if isinstance(rows, np.ndarray):
            out = self._token_losses(params, self.to_backend(rows))
        else:
            batch = {k: v for k, v in rows.items() if k != "weights"}
            out = self._weighted_token_losses(params, self.to_backend(batch))
        return self.backend.to_numpy({"x": out})["x"]
