"""Fine-tuning and evaluation of classifiers: the last step of repairing a pruned model, and
the accuracy every table reports.

:func:`fine_tune` is the repair step (BatchNorm recalibration, then :func:`train_classifier`
with defaults measured on pruned models); :func:`train_classifier` is the plain training loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fxgndi.core.checks import check_finite
from fxgndi.core.errors import DataError
from fxgndi.core.runtime import device_of, eval_mode, on_device
from fxgndi.core.streams import call_model, input_arity, iter_batches
from fxgndi.pruning.recalibrate import recalibrate_bn

__all__ = ["fine_tune", "train_classifier", "evaluate", "FINETUNE_LR"]

# Peak learning rate of fine_tune, chosen by benchmarks/finetune.py (docs/finetune.md) on the
# digits ResNet-18 pruned to 2x fewer MACs by gndi and l1, one epoch on the train split,
# accuracy on the test split: with BatchNorm recalibrated first, 1e-4 and 3e-4 never ended
# below the recalibrated untrained model (5 seeds, also at 3x), 1e-3 did not either (2 seeds)
# but ended lower on average, 3e-3 did; without the recalibration, l1 at 1e-4 and both at 1e-3
# and 3e-3 did. The smallest safe rate is the default: it moves a model the least.
FINETUNE_LR = 1e-4


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else device_of(model)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's global RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _warmup_cosine(total_steps: int, warmup_fraction: float = 0.2) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first steps, then cosine decay to 0.

    Unlike OneCycleLR it works for any number of steps (even 1), and a loader that yields
    more batches than ``len()`` announced just keeps the final (near-zero) rate.
    """
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup + 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def fine_tune(model: nn.Module, loader: Iterable[Any], *, epochs: int = 1,
              lr: float = FINETUNE_LR, recalibrate: bool = True, weight_decay: float = 5e-4,
              device: str | torch.device | None = None, progress: bool = True,
              seed: int = 0) -> nn.Module:
    """Fine-tune a pruned classifier in place: re-estimate its BatchNorm statistics on
    ``loader`` (:func:`fxgndi.pruning.recalibrate.recalibrate_bn`; ``recalibrate=False`` when
    that was just done), then :func:`train_classifier` for ``epochs`` at peak rate ``lr``.

    Without the recalibration the first steps train against the dense model's stale
    statistics and the running averages end between the two (``benchmarks/finetune.py``:
    below the untrained recalibrated model). No augmentation: the loader's batches as they are.
    Returns the model, in eval mode.

    Example:
        >>> from fxgndi.app.data import load_data
        >>> from fxgndi.app.models import load_model
        >>> model = load_model("resnet18", num_classes=10)
        >>> model = fine_tune(model, load_data("digits", split="train", limit=64),
        ...                   progress=False)
    """
    if device is not None:
        model.to(device)
    if recalibrate:
        recalibrate_bn(model, loader)
    return train_classifier(model, loader, epochs=epochs, lr=lr, weight_decay=weight_decay,
                            device=device, progress=progress, seed=seed)


def train_classifier(model: nn.Module, loader: Iterable[Any], *, epochs: int,
                     lr: float = 1e-3, weight_decay: float = 5e-4,
                     device: str | torch.device | None = None, progress: bool = True,
                     seed: int = 0) -> nn.Module:
    """Train ``model`` in place with cross-entropy, AdamW and a warm-up + cosine schedule.

    ``lr`` is the peak learning rate, reached after the first 20% of the steps. The model
    is moved to ``device`` (default: where its parameters are). Dropout and other random
    layers are seeded by ``seed``; the data order is the loader's (``load_data`` seeds it,
    so a fresh loader with the same seed reproduces a run).

    Returns the model, in eval mode.

    Example:
        >>> from fxgndi.app.data import load_data
        >>> from fxgndi.app.models import load_model
        >>> model = load_model("resnet18", num_classes=10)
        >>> loader = load_data("digits", split="train", limit=128)
        >>> model = train_classifier(model, loader, epochs=1, progress=False)
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError as err:
        raise DataError(f"train_classifier needs a loader it can iterate once per epoch and "
                        f"that has len() (a DataLoader or a list of batches), got "
                        f"{type(loader).__name__}") from err
    if steps_per_epoch == 0:
        raise DataError("the training loader is empty; check the data spec, split and limit")
    dev = _device_of(model, device)
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with seeded(seed, dev), tqdm(total=epochs * steps_per_epoch, desc="train",
                                 disable=not progress, leave=False) as bar:
        for epoch in range(epochs):
            for x, y in iter_batches(loader, device=dev, need_labels=True, why="training",
                                     arity=input_arity(model)):
                loss = loss_fn(call_model(model, x), y)
                check_finite(loss, f"the training loss in epoch {epoch + 1}",
                             fix=f"lower the learning rate (lr={lr}) or check the inputs for "
                                 "NaN/Inf")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` over a loader, in eval mode.

    Returns ``{"accuracy": ..., "loss": ..., "n": samples}``; the model's train/eval mode is
    restored afterwards.

    Example:
        >>> from fxgndi.app.data import load_data
        >>> from fxgndi.app.zoo import digits_resnet18
        >>> stats = evaluate(digits_resnet18(progress=False), load_data("digits"))
        >>> stats["accuracy"] > 0.9
        True
    """
    model, dev = on_device(model, device)  # a copy when it must move: the caller's stays put
    correct, total_loss, count = 0, 0.0, 0
    with eval_mode(model):  # restores every submodule's own train/eval flag
        for x, y in iter_batches(loader, device=dev, need_labels=True, why="evaluation",
                                 allow_empty=True, arity=input_arity(model)):
            logits = call_model(model, x)
            total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
            count += int(y.numel())
    if count == 0:
        raise DataError("the evaluation loader yielded no samples; check the data spec")
    return {"accuracy": correct / count, "loss": total_loss / count, "n": count}
