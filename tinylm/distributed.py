"""Data parallelism written once: gradient buckets and a sharded optimizer, over a backend's flat collectives.

A backend supplies three collectives, each over a list of arrays that it flattens into one 1-D buffer,
communicates and splits back into arrays of the same shapes. Every rank calls each of them, in the same order:

    all_sum_flat(arrays)            every rank gets the element-wise sum over ranks
    broadcast_flat(arrays, src)     every rank gets src's arrays (elsewhere only the shapes count)
    send_to_zero_flat(arrays, src)  rank 0 gets src's arrays (what the others get back is not used)

Which tensors travel together, and which rank updates which tensor, is decided here from names and sizes alone,
so every rank (on either backend) computes the same plan without talking to the others.

The sharded optimizer (ZeRO stage 1): each parameter tensor is owned by one rank, which alone keeps its optimizer
state and computes its update; whole tensors, so Muon still orthogonalizes whole matrices. Gradients are still
all-reduced (every rank holds the whole mean gradient, so the clipping norm is the unsharded one, bit for bit),
parameters stay replicated, and each owner broadcasts its updated tensors after the step.
"""

from __future__ import annotations

import math

from tinylm import optim
from tinylm.optim import OptimConfig


def bucket_plan(tensors: dict[str, tuple[int, str]], cap_bytes: int) -> list[list[str]]:
    """Names (`name -> (bytes, dtype)`) in sorted order, cut into buckets of one dtype and at most `cap_bytes`.

    A tensor larger than the cap travels alone; a cap of 0 gives one bucket per tensor. Sorted names make the
    plan the same on every rank whatever order its dicts are in.
    """
    buckets: list[list[str]] = []
    open_bucket: dict[str, tuple[int, int]] = {}  # dtype -> (index of the bucket being filled, its bytes)
    for name in sorted(tensors):
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
                 bucket_mb: float = 25.0, shard_optimizer: bool = False):
        self.backend = backend
        self.world, self.rank = backend.world_size, backend.rank
        self.optim_cfg = optim_cfg
        self.cap_bytes = int(bucket_mb * 2**20)
        self.sharded = shard_optimizer and self.world > 1
        self.owners = owner_plan({n: math.prod(s) for n, s in param_shapes.items()}, self.world)
        self._buckets: dict[tuple[str, ...], list[list[str]]] = {}

    def buckets(self, arrays: dict) -> list[list[str]]:
        """The bucket plan of this set of tensors, computed on first use and reused every step after."""
        key = tuple(sorted(arrays))
        if key not in self._buckets:
            self._buckets[key] = bucket_plan({n: (a.nbytes, str(a.dtype)) for n, a in arrays.items()},
                                             self.cap_bytes)
        return self._buckets[key]

    def all_mean(self, grads: dict) -> dict:
        """The mean over ranks of each array, in buckets of `train.bucket_mb`."""
        if self.world == 1:
            return grads
        summed = {}
        for names in self.buckets(grads):
            summed.update(zip(names, self.backend.all_sum_flat([grads[n] for n in names])))
        # Sum, then divide: the same rounding as an all-reduce per tensor.
        return {n: summed[n] / self.world for n in grads}

    def all_mean_scalar(self, x):
        return x if self.world == 1 else self.backend.all_sum_flat([x])[0] / self.world

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
        """Every rank's parameters after each owner broadcast the tensors it updated, in buckets per owner."""
        if not self.sharded:
            return params
        out = {}
        for src in range(self.world):
            for names in self.buckets(self._owned_by(src, params)):
                out.update(zip(names, self.backend.broadcast_flat([params[n] for n in names], src)))
        return {n: out[n] for n in params}

    def full_state(self, params: dict, state: dict) -> dict | None:
        """The whole optimizer state as numpy on rank 0 (each owner's slots sent there), None elsewhere: a
        checkpoint of a sharded run has the layout of an unsharded one. Every rank must call it."""
        if not self.sharded:
            return self.backend.to_numpy(state) if self.rank == 0 else None
        full = self.backend.to_numpy(state) if self.rank == 0 else {}
        for src in range(1, self.world):
            # The slots src holds, with its parameters as stand-ins of their shapes on the other ranks.
            shapes = {slot: p for n, p in self._owned_by(src, params).items()
                      for slot in optim.slots(self.optim_cfg, n)}
            for names in self.buckets(shapes):
                mine = [state[s] if self.rank == src else shapes[s] for s in names]
                received = self.backend.send_to_zero_flat(mine, src)
                if self.rank == 0:
                    full.update(self.backend.to_numpy(dict(zip(names, received))))
        if self.rank:
            return None
        return {slot: full[slot] for n in params for slot in optim.slots(self.optim_cfg, n)}
