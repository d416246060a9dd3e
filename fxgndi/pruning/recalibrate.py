"""BatchNorm recalibration: recompute running statistics on a few batches, no training.

Pruning removes input channels of convolutions, so the distribution that each downstream
BatchNorm sees changes while its running mean and variance stay those of the dense model. Re-
estimating them on data (a forward pass, no gradients, no weight change) is a standard, cheap,
pre-fine-tuning step. Like ``torch.optim.swa_utils.update_bn`` it resets the statistics and
accumulates an equal-weight average over the batches (``momentum=None``), but only the BatchNorm
layers run in training mode: dropout, stochastic depth and the like stay in eval mode, so the
statistics are those of the network that will be evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fxgndi.core.errors import DataError
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import call_model, input_arity, iter_batches

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def recalibrate_bn(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` in place.

    Each BatchNorm's statistics become the average, over the batches of ``data``, of its batch
    mean and (unbiased) batch variance, as if ``momentum=None`` from a reset. Weights, biases,
    every other buffer and every module's train / eval flag are unchanged. Returns the number of
    samples read (0 when the model has no BatchNorm that tracks running statistics). Batches of
    one sample are skipped; on an error the statistics are left as they were.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        >>> recalibrate_bn(net, [torch.ones(4, 1, 3, 3) * 2])
        4
        >>> net[1].running_mean.shape, int(net[1].num_batches_tracked)
        (torch.Size([2]), 1)
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BATCHNORM) and m.track_running_stats]
    if not layers:
        return 0
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    momenta = [m.momentum for m in layers]
    device = device_of(model)
    count = 0
    with eval_mode(model), torch.no_grad():
        try:
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over batches
                m.train()
            for x, _ in iter_batches(data, device=device, max_batches=max_batches,
                                     why="BatchNorm recalibration", arity=input_arity(model)):
                if x.shape[0] < 2:  # no batch variance (a loader's last, odd batch): skip
                    continue
                call_model(model, x)
                count += x.shape[0]
            if count == 0:
                raise DataError("BatchNorm recalibration read no batch of 2 or more samples: "
                                "use a larger batch_size")
        except BaseException:
            for m, state in zip(layers, saved):  # nothing half-recalibrated
                m.load_state_dict(state)
            raise
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
    return count
