"""Data parallelism under torchrun: gloo on CPU, NCCL on CUDA. The backend's flat collectives over lists of
arrays (`tinylm.train.distributed` plans what goes in each list) and parameter sharding's one collective."""

from __future__ import annotations

import torch
import torch.distributed

from tinylm.backends.torch.kernels import DTYPES


class _OwnedParam(torch.autograd.Function):
    """A parameter tensor that one rank keeps: the forward pass broadcasts it from its owner in the compute dtype
    (every rank gets it whole), the backward pass sums each rank's float32 gradient onto the owner and divides
    by the number of ranks there. Other ranks hold an empty stand-in and get an empty gradient for it."""

    @staticmethod
    def forward(ctx, local, owner, shape, dtype):
        ctx.owner, ctx.local_shape = owner, local.shape
        rank = torch.distributed.get_rank()
        # A copy even on the owner: what the forward pass reads must not alias the weights the update changes.
        whole = local.to(dtype, copy=True) if rank == owner else torch.empty(shape, dtype=dtype, device=local.device)
        torch.distributed.broadcast(whole, owner)
        return whole

    @staticmethod
    def backward(ctx, grad):
        grad = grad.to(torch.float32, copy=True)  # the reduction may overwrite it; float32 like DDP's gradients
        torch.distributed.reduce(grad, ctx.owner, op=torch.distributed.ReduceOp.SUM)
        if torch.distributed.get_rank() != ctx.owner:
            return grad.new_zeros(ctx.local_shape), None, None, None
        return grad / torch.distributed.get_world_size(), None, None, None


def _flatten(arrays: list):
    return torch.cat([a.reshape(-1) for a in arrays])


def _empty_flat(arrays: list):
    """A buffer that a collective fills: the size and dtype of `arrays` flattened."""
    return torch.empty(sum(a.numel() for a in arrays), dtype=arrays[0].dtype, device=arrays[0].device)


def _split_like(flat, arrays: list) -> list:
    # Views into the buffer: no copy back.
    return [piece.view(a.shape) for piece, a in zip(flat.split([a.numel() for a in arrays]), arrays)]


class TorchCollectives:
    """What `TorchBackend` does across ranks; `self.device` and `self.rank` are all it needs of the backend."""

    # Data parallelism under torchrun: gloo on CPU, NCCL on CUDA.
    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    # Flat collectives over lists of arrays (see `tinylm.train.distributed`, which plans what goes in each list).
    def all_sum_flat(self, arrays: list) -> list:
        flat = _flatten(arrays)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        return _split_like(flat, arrays)

    def all_sum_flat_async(self, arrays: list):
        flat = _flatten(arrays)
        work = torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, async_op=True)

        def wait() -> list:
            work.wait()
            return _split_like(flat, arrays)

        return wait

    def broadcast_flat(self, arrays: list, src: int) -> list:
        flat = _flatten(arrays) if self.rank == src else _empty_flat(arrays)
        torch.distributed.broadcast(flat, src)
        return _split_like(flat, arrays)

    def send_to_zero_flat(self, arrays: list, src: int) -> list:
        # Point to point: the ranks other than src and 0 take no part.
        if self.rank == src and src != 0:
            torch.distributed.send(_flatten(arrays), dst=0)
        elif self.rank == 0 and src != 0:
            flat = _empty_flat(arrays)
            torch.distributed.recv(flat, src=src)
            return _split_like(flat, arrays)
        return arrays

    def stand_in(self, shape: tuple):
        """A float32 tensor of `shape` that holds no memory (one zero, expanded), to size a received buffer by."""
        return torch.zeros((), dtype=torch.float32, device=self.device).expand(tuple(shape))

    def gather_owned(self, local, owner: int, shape: tuple, dtype: str):
        """Parameter sharding's one collective: the whole of a tensor that rank `owner` keeps (`local` there,
        an empty stand-in elsewhere), in the compute dtype; its gradient goes back to the owner as the mean over
        ranks. See `tinylm.train.distributed.GatheredParams`."""
        return _OwnedParam.apply(local, owner, tuple(shape), DTYPES[dtype])

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """End data parallelism in order: every rank reaches this point, then the process group goes."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            self._destroy_group()

    @staticmethod
    def _destroy_group() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
