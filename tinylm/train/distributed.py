"""Data parallelism written once: gradient buckets and a sharded optimizer, over a backend's flat collectives.

A backend supplies four collectives, each over a list of arrays that it flattens into one 1-D buffer,
communicates and splits back into arrays of the same shapes. Every rank calls each of them, in the same order:

    all_sum_flat(arrays)            every rank gets the element-wise sum over ranks
    all_sum_flat_async(arrays)      the same, started now; returns a function that waits and gives the result
    broadcast_flat(arrays, src)     every rank gets src's arrays (elsewhere only the shapes count)
    send_to_zero_flat(arrays, src)  rank 0 gets src's arrays (what the others get back is not used)

Which tensors travel together, and which rank updates which tensor, is decided here from names and sizes alone,
so every rank (on either backend) computes the same plan without talking to the others.

Gradients are reduced while the backward pass still runs, as PyTorch's DDP does: the backend hands each
parameter's gradient to a `GradReducer` as soon as it is computed, and a bucket's all-reduce starts
asynchronously once all its gradients are in. Those buckets follow the model's parameters in reverse, the order
backward produces them in, and launch in that order on every rank (collectives must match across ranks).

The sharded optimizer (ZeRO stage 1): each parameter tensor is owned by one rank, which alone keeps its optimizer
state and computes its update; whole tensors, so Muon still orthogonalizes whole matrices. Gradients are still
all-reduced (every rank holds the whole mean gradient, so the clipping norm is the unsharded one, bit for bit),
parameters stay replicated, and each owner broadcasts its updated tensors after the step.

Sharded parameters (ZeRO stage 3, what FSDP does) go further with the same owners: a rank keeps only the
parameters it owns (an empty stand-in for each other one), their gradients and their optimizer state. The loss
reads parameters through `GatheredParams`, which fetches each tensor whole from its owner when the forward
pass reaches it and sends its gradient back to the owner in the backward pass (the backend's `gather_owned`);
with activation checkpointing a block's gathered weights live only while it runs, and are fetched again when
the backward pass recomputes it. The clipping norm is summed over the owners. No tensor is broadcast after the
step: each owner's update is read at the next forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tinylm.train import optim
from tinylm.errors import UserError
from tinylm.train.optim import OptimConfig


def bucket_plan(tensors: dict[str, tuple[int, str]], cap_bytes: int, order: list[str] | None = None) -> list[list[str]]:
    """Names (`name -> (bytes, dtype)`) in `order` (else sorted), cut into buckets of one dtype and at most
    `cap_bytes`.

    A tensor larger than the cap travels alone; a cap of 0 gives one bucket per tensor. Sorted names, or an order
    every rank derives from the model, make the plan the same on every rank whatever order its dicts are in.
    """
    buckets: list[list[str]] = []
    open_bucket: dict[str, tuple[int, int]] = {}  # dtype -> (index of the bucket being filled, its bytes)
    for name in order or sorted(tensors):
        nbytes, dtype = tensors[name]
        index, used = open_bucket.get(dtype, (-1, 0))
        if index < 0 or used + nbytes > cap_bytes:
            buckets.append([])
            index, used = len(buckets) - 1, 0
        buckets[index].append(name)
        open_bucket[dtype] = (index, used + nbytes)
    return buckets


def owner_plan(sizes: dict[str, int], world: int) -> dict[str, int]:
    """The rank that updates each tensor (`name -> elements`): largest first, each to the rank with the fewest
    elements so far (names and then the lower rank break ties), which balances the optimizer's memory and work."""
    load = [0] * world
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


class DataParallel:
    """How a training step communicates across ranks. With one rank every method is the identity."""

    def __init__(self, backend, param_shapes: dict[str, tuple[int, ...]], optim_cfg: OptimConfig,
                 bucket_mb: float = 25.0, shard_optimizer: bool = False, shard_params: bool = False,
                 compiled: bool = False):
        self.backend = backend
        self.world, self.rank = backend.world_size, backend.rank
        self.optim_cfg = optim_cfg
        self.cap_bytes = int(bucket_mb * 2**20)
        self.shapes = {n: tuple(s) for n, s in param_shapes.items()}
        self.params_sharded = shard_params and self.world > 1
        self.sharded = (shard_optimizer or shard_params) and self.world > 1
        # Checked with one rank too: a recipe that shards must fail on the laptop it is tried on, not later.
        if shard_params and not hasattr(backend, "gather_owned"):
            raise UserError(f"train.shard_params: the {backend.name} backend cannot shard parameters "
                            "(PyTorch can; train.shard_optimizer shards the optimizer state on either)")
        if shard_params and compiled:
            raise UserError("train.shard_params does not combine with train.compile: each parameter's gather is "
                            "a collective that torch.compile would have to trace")
        self.owners = owner_plan({n: math.prod(s) for n, s in param_shapes.items()}, self.world)
        self._buckets: dict[tuple[str, ...], list[list[str]]] = {}
        # Gradients are float32 like the master weights they belong to.
        self.backward_buckets = bucket_plan({n: (4 * math.prod(s), "float32") for n, s in param_shapes.items()},
                                            self.cap_bytes, order=list(reversed(param_shapes)))

    def reducer(self, earlier: dict | None, micro_batches: int) -> "GradReducer | None":
        """What collects the last micro-batch's gradients (None with one rank: nothing to reduce)."""
        # Sharded parameters reduce each gradient onto its owner within the backward pass itself.
        return GradReducer(self, earlier, micro_batches) if self.world > 1 and not self.params_sharded else None

    def buckets(self, arrays: dict) -> list[list[str]]:
        """The bucket plan of this set of tensors, computed on first use and reused every step after."""
        key = tuple(sorted(arrays))
        if key not in self._buckets:
            self._buckets[key] = bucket_plan({n: (a.nbytes, str(a.dtype)) for n, a in arrays.items()},
                                             self.cap_bytes)
        return self._buckets[key]

    def all_mean_scalar(self, x):
        return x if self.world == 1 else self.backend.all_sum_flat([x])[0] / self.world

    def global_norm(self, ops, grads: dict):
        """The norm of the whole mean gradient. With sharded parameters a rank holds its owned gradients alone:
        their squares are summed there and then over ranks."""
        if not self.params_sharded:
            return optim.global_norm(ops, grads)
        # The other ranks' tensors have empty gradients here: they add nothing.
        squares = optim.sum_of_squares(ops, grads)
        return ops.sqrt(self.backend.all_sum_flat([squares])[0])

    # Sharded parameters. Unsharded, each of these hands the parameters back as they are.
    def local(self, params: dict) -> dict:
        """What this rank keeps of whole numpy parameters: with sharded parameters its own tensors and an
        empty stand-in for each other one, else all of them."""
        if not self.params_sharded:
            return params
        return {n: v if self.owners[n] == self.rank else np.zeros((0,), v.dtype) for n, v in params.items()}

    def view(self, params: dict, dtype: str):
        """The parameters as the loss reads them: with sharded parameters, each fetched whole from its owner
        in the compute dtype `dtype` when read (see `GatheredParams`)."""
        return GatheredParams(self, params, dtype) if self.params_sharded else params

    def gather_all(self, params: dict) -> dict:
        """Every parameter whole on every rank (to generate or evaluate with), each broadcast by its owner."""
        return self._from_owners(params) if self.params_sharded else params

    def full_params(self, params: dict) -> dict | None:
        """Every parameter whole, as numpy, on rank 0 (None elsewhere): what a checkpoint holds. Every rank
        must call it."""
        if not self.params_sharded:
            return self.backend.to_numpy(params) if self.rank == 0 else None
        full = self._on_zero(self.owned(params), lambda src: {n: self._stand_in(n, params)
                                                               for n in self._owned_by(src, self.shapes)})
        return None if full is None else {n: full[n] for n in self.shapes}

    def _stand_in(self, name: str, params: dict):
        """`params[name]` where this rank has it whole, else a stand-in of its shape that holds no memory: the
        collectives that receive it size their buffers by it and never read it."""
        p = params[name]
        if tuple(p.shape) == self.shapes[name]:
            return p
        return self.backend.stand_in(self.shapes[name])

    # The sharded optimizer. Unsharded, this rank owns every tensor and these are identities too.
    def owned(self, tensors: dict) -> dict:
        """The entries of `tensors` (parameters or gradients) this rank updates."""
        return {n: v for n, v in tensors.items() if not self.sharded or self.owners[n] == self.rank}

    def owned_state(self, state: dict) -> dict:
        """The optimizer slots (`<slot>.<parameter>`) this rank keeps: a whole state sliced on load."""
        return {k: v for k, v in state.items() if not self.sharded or self.owners[k.split(".", 1)[1]] == self.rank}

    def _owned_by(self, rank: int, params: dict) -> dict:
        return {n: p for n, p in params.items() if self.owners[n] == rank}

    def share_updates(self, params: dict) -> dict:
        """Every rank's parameters after each owner broadcast the tensors it updated, in buckets per owner
        (with sharded parameters nothing moves: the next forward pass fetches them)."""
        if not self.sharded or self.params_sharded:
            return params
        return self._from_owners(params)

    def _from_owners(self, params: dict) -> dict:
        out = {}
        for src in range(self.world):
            sent = {n: self._stand_in(n, params) for n in self._owned_by(src, self.shapes)}
            for names in self.buckets(sent):
                out.update(zip(names, self.backend.broadcast_flat([sent[n] for n in names], src)))
        return {n: out[n] for n in params}

    def full_state(self, params: dict, state: dict) -> dict | None:
        """The whole optimizer state as numpy on rank 0 (each owner's slots sent there), None elsewhere: a
        checkpoint of a sharded run has the layout of an unsharded one. Every rank must call it."""
        if not self.sharded:
            return self.backend.to_numpy(state) if self.rank == 0 else None
        # The slots src holds, with its parameters as stand-ins of their shapes.
        full = self._on_zero(state, lambda src: {slot: self._stand_in(n, params) for n in self._owned_by(src, params)
                                                 for slot in optim.slots(self.optim_cfg, n)})
        return None if full is None else {slot: full[slot] for n in params for slot in optim.slots(self.optim_cfg, n)}

    def _on_zero(self, mine: dict, stand_ins_of) -> dict | None:
        """This rank's tensors `mine` and every other rank's, as numpy on rank 0 (None elsewhere), sent in
        buckets; `stand_ins_of(src)` names src's tensors with arrays of their shapes."""
        full = self.backend.to_numpy(mine) if self.rank == 0 else {}
        for src in range(1, self.world):
            shapes = stand_ins_of(src)
            for names in self.buckets(shapes):
                received = self.backend.send_to_zero_flat([mine[n] if self.rank == src else shapes[n]
                                                           for n in names], src)
                if self.rank == 0:
                    full.update(self.backend.to_numpy(dict(zip(names, received))))
        return full if self.rank == 0 else None


class GradReducer:
    """The mean gradient over ranks, reduced bucket by bucket while the backward pass runs.

    `add(name, grad)` takes the last micro-batch's gradient of one parameter; it adds the sum of the earlier
    micro-batches' (`earlier`) and divides by their count, the same operations in the same order as without
    overlap, so the result is the same to the bit. A bucket starts its all-reduce when it is whole and every
    bucket before it has started.
    """

    def __init__(self, parallel: DataParallel, earlier: dict | None, micro_batches: int):
        self.parallel, self.earlier, self.micro_batches = parallel, earlier, micro_batches
        self.ready: dict = {}
        self.launched: list = []  # (names, wait) per bucket, in plan order

    def add(self, name: str, grad) -> None:
        if self.earlier is not None:
            grad = self.earlier[name] + grad
        if self.micro_batches > 1:
            grad = grad / self.micro_batches
        self.ready[name] = grad
        plan = self.parallel.backward_buckets
        while len(self.launched) < len(plan) and all(n in self.ready for n in plan[len(self.launched)]):
            names = plan[len(self.launched)]
            self.launched.append((names, self.parallel.backend.all_sum_flat_async([self.ready[n] for n in names])))

    def result(self) -> dict:
        """Every parameter's mean gradient, once all buckets are reduced."""
        if len(self.launched) != len(self.parallel.backward_buckets):
            missing = sorted(n for names in self.parallel.backward_buckets for n in names if n not in self.ready)
            raise RuntimeError(f"no gradient for {', '.join(missing[:3])}")
        summed = {}
        for names, wait in self.launched:
            summed.update(zip(names, wait()))
        # Sum, then divide: the same rounding as an all-reduce per tensor.
        return {n: summed[n] / self.parallel.world for n in self.ready}


class GatheredParams(Mapping):
    """Parameters kept by their owners, read whole: each read of a name fetches that tensor from its owner in the
    compute dtype, and the backward pass of what reads it sends the gradient back (the backend's
    `gather_owned`). Nothing is fetched until read, so a block's weights are gathered as the forward pass
    reaches them, and a checkpointed block takes `local_arrays` and gathers them itself (`over`). Every
    rank reads the same names in the same order, since the model's code is the same on each."""

    def __init__(self, parallel: DataParallel, local: dict, dtype: str):
        self.parallel, self.local, self.dtype = parallel, local, dtype

    def __getitem__(self, name: str):
        return self.parallel.backend.gather_owned(self.local[name], self.parallel.owners[name],
                                                  self.parallel.shapes[name], self.dtype)

    def __iter__(self):
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)

    def local_arrays(self, prefix: str) -> dict:
        """This rank's own arrays (empty stand-ins for others' tensors) of the names that start with `prefix`:
        what a checkpointed block takes as its arguments, to read through `over` inside."""
        return {n: v for n, v in self.local.items() if n.startswith(prefix)}

    def over(self, local: dict) -> "GatheredParams":
        """The same reading of other arrays of this rank (`local_arrays`' as the block receives them)."""
        return GatheredParams(self.parallel, local, self.dtype)
