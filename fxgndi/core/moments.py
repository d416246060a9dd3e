"""Streaming statistics in float64: means with standard errors whose state can be summed
(across processes) and saved (to resume), and means of activations per position or channel."""

from __future__ import annotations

import math

import torch

from fxgndi.core.errors import DataError


class RunningMoments:
    """Streaming per-entry mean and standard error of per-sample values, in float64.

    Feed ``[B, ...]`` tensors of per-sample values; read ``mean``, ``stderr`` and ``count``.
    The whole state is three sums (:meth:`state_dict`): shards of the data can be summed
    (all-reduce across processes) and a run can be saved and resumed. With ``size`` the sums
    start at zero, so that a process that saw no samples still holds a state of that shape.
    The sums live on the CPU whatever the values' device.

    Example:
        >>> m = RunningMoments(); m.update(torch.tensor([1.0, 3.0])); float(m.mean)
        2.0
    """

    def __init__(self, size: int | None = None) -> None:
        zeros = None if size is None else torch.zeros(size, dtype=torch.float64)
        self.total: torch.Tensor | None = zeros
        self.total_sq: torch.Tensor | None = None if zeros is None else zeros.clone()
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().to("cpu", torch.float64)
        s, sq = v.sum(0), (v * v).sum(0)
        if self.total is None:
            self.total, self.total_sq = s, sq
        else:
            self.total, self.total_sq = self.total + s, self.total_sq + sq
        self.count += v.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None or self.count == 0:
            raise DataError("no samples were seen")
        return self.total / self.count

    @property
    def stderr(self) -> torch.Tensor:
        mean = self.mean
        if self.count < 2:
            return torch.full_like(mean, math.nan)
        var = (self.total_sq - self.count * mean * mean).clamp_min(0) / (self.count - 1)
        return (var / self.count).sqrt()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums as float64 tensors: ``total``, ``total_sq`` and ``count``.

        Example:
            >>> m = RunningMoments(2); m.update(torch.ones(3, 2)); m.state_dict()["count"]
            tensor(3., dtype=torch.float64)
        """
        if self.total is None:
            raise DataError("no samples were seen (and no size was given): nothing to save")
        return {"total": self.total.clone(), "total_sq": self.total_sq.clone(),
                "count": torch.tensor(float(self.count), dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums by ``state`` (from :meth:`state_dict`, saved or all-reduced).

        Example:
            >>> a, b = RunningMoments(1), RunningMoments(1); a.update(torch.ones(2, 1))
            >>> b.load_state_dict(a.state_dict()); b.count
            2
        """
        if self.total is not None and state["total"].shape != self.total.shape:
            raise DataError(f"saved sums have shape {tuple(state['total'].shape)}, not "
                            f"{tuple(self.total.shape)}: they belong to another run")
        self.total = state["total"].to("cpu", torch.float64).clone()
        self.total_sq = state["total_sq"].to("cpu", torch.float64).clone()
        self.count = int(round(float(state["count"])))


class RunningMean:
    """Streaming float64 mean of activations over the batch: per position, or with
    ``channel_dim`` per channel (the mean over every other dim). The value keeps the
    activation's number of dims, so it broadcasts against it.

    Example:
        >>> m = RunningMean(channel_dim=1); m.update(torch.arange(8.).view(2, 2, 2))
        >>> m.value.flatten().tolist()
        [2.5, 4.5]
    """

    def __init__(self, channel_dim: int | None = None) -> None:
        self.channel_dim = channel_dim
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, h: torch.Tensor) -> None:
        h = h.detach().to(torch.float64)
        if self.channel_dim is None:
            s, n = h.sum(0, keepdim=True), h.shape[0]
        else:
            dim = self.channel_dim % h.dim()
            s = h.sum([d for d in range(h.dim()) if d != dim], keepdim=True)
            n = h.numel() // h.shape[dim]
        self.total = s if self.total is None else self.total + s
        self.count += n

    @property
    def value(self) -> torch.Tensor:
        if self.total is None:
            raise DataError("no activations were seen: the data reached no such layer")
        return self.total / self.count
