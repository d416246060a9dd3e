"""Data-parallel runs under ``torchrun``: who am I, which batches are mine, sum the partials.

Every estimator in fxgndi is a mean over samples, so a run splits exactly: rank ``r`` of
``world`` takes the batches ``i`` with ``i % world == r`` (:func:`my_batches`), accumulates
its partial sums, and :func:`all_reduce_sums` adds them up on every rank. The result equals
one process up to float64 summation order. Outside ``torch.distributed`` everything here is
the identity (rank 0 of 1).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist

from fxgndi.core.streams import batch_slice


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (or without a process group): the process that prints and writes.

    Example:
        >>> is_main()
        True
    """
    return rank_and_world()[0] == 0


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` asks for more than one process.

    Example:
        >>> launched_by_torchrun()  # doctest: +SKIP
        False
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None = None) -> str | None:
    """Join the process group that ``torchrun`` describes; return this rank's device.

    nccl when ``device`` is CUDA (then ``cuda`` becomes ``cuda:LOCAL_RANK``), gloo on CPUs.
    Does nothing (and returns ``device``) outside ``torchrun`` or when already initialised.

    Example:
        >>> init_from_env("cpu")  # doctest: +SKIP
        'cpu'
    """
    if not launched_by_torchrun():
        return device
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def my_batches(data: Iterable, *, start: int = 0, max_batches: int | None = None) -> Iterable:
    """This rank's share of the first ``max_batches`` batches, from its ``start``-th on.

    Batch ``i`` belongs to rank ``i % world``; ``start`` counts this rank's own batches
    already done (a resumed run).

    Example:
        >>> list(my_batches([torch.tensor(i) for i in range(3)], start=1))
        [tensor(1), tensor(2)]
    """
    rank, world = rank_and_world()
    return batch_slice(data, rank + start * world, max_batches, world)


def all_reduce_sums(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The element-wise sum of ``state`` over all ranks (a copy; ``state`` itself is kept).

    With nccl the tensors travel through this rank's GPU and come back to their device.

    Example:
        >>> all_reduce_sums({"count": torch.tensor(3.0)})
        {'count': tensor(3.)}
    """
    if rank_and_world()[1] == 1:
        return {k: v.clone() for k, v in state.items()}
    on_gpu = dist.get_backend() == "nccl"
    out = {}
    for key, value in state.items():
        t = value.to(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu").clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[key] = t.to(value.device)
    return out
