"""The digits model zoo: torchvision classifiers trained on scikit-learn's digits, cached.

They are fxgndi's embedded trained networks: they need no download (scikit-learn ships the
data), train in a minute or two on two CPU cores, and are cached on disk. ResNet-18 is the
default; MobileNetV2 is the depthwise one (where pruning hurts most).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxgndi.app.data import load_data
from fxgndi.core.files import atomic_path, cache_dir as machine_cache_dir
from fxgndi.pruning.finetune import evaluate, seeded, train_classifier

__all__ = ["digits_model", "digits_resnet18", "default_cache_dir", "DIGITS_RECIPE",
           "DIGITS_ARCHITECTURES"]

DIGITS_ARCHITECTURES = ("resnet18", "mobilenet_v2")
DIGITS_CACHE_NAME = "digits_resnet18.pt"

# The recipe of the cached digits model, chosen on a stratified 80/20 validation split of the
# digits *train* split; the test split only reports the final accuracy (README, "The digits
# model", has the numbers).
DIGITS_RECIPE: dict[str, Any] = {"epochs": 8, "batch_size": 64, "lr": 2e-3,
                                 "weight_decay": 5e-4, "seed": 0}
# MobileNetV2 needs longer and a higher rate (chosen the same way; README, "The digits model"),
# and batches of 100: with 64 every epoch ends in a batch of 3, which derails its BatchNorms.
DIGITS_RECIPES: dict[str, dict[str, Any]] = {
    "resnet18": DIGITS_RECIPE,
    "mobilenet_v2": {**DIGITS_RECIPE, "epochs": 15, "lr": 1e-2, "batch_size": 100},
}


def default_cache_dir() -> Path:
    """Where fxgndi caches trained models: :func:`fxgndi.core.files.cache_dir`.

    Example:
        >>> default_cache_dir() == machine_cache_dir()
        True
    """
    return machine_cache_dir()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _new_digits_model(arch: str = "resnet18") -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=10)


def _train_digits(progress: bool, arch: str = "resnet18") -> tuple[nn.Module, dict[str, Any]]:
    recipe = DIGITS_RECIPE if arch == "resnet18" else DIGITS_RECIPES[arch]
    with seeded(recipe["seed"], torch.device("cpu")):  # the initial weights
        model = _new_digits_model(arch)
    loader = load_data("digits", split="train", batch_size=recipe["batch_size"],
                       seed=recipe["seed"])
    start = time.perf_counter()
    model = train_classifier(model, loader, epochs=recipe["epochs"], lr=recipe["lr"],
                             weight_decay=recipe["weight_decay"], progress=progress,
                             seed=recipe["seed"])
    seconds = time.perf_counter() - start
    test = evaluate(model, load_data("digits", split="test", batch_size=256))
    meta = {**recipe, "arch": arch, "train_seconds": round(seconds, 1),
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"], "torch": str(torch.__version__)}
    return model, meta


def _load_cached_digits(path: Path, arch: str = "resnet18") -> nn.Module | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
        model = _new_digits_model(arch)
        model.load_state_dict(state)
    except Exception as err:  # a truncated or foreign file: retrain rather than fail
        warnings.warn(f"ignoring unreadable cached model {str(path)!r} ({err}); retraining",
                      RuntimeWarning, stacklevel=3)
        return None
    return model.eval()


def digits_model(arch: str = "resnet18", *, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, retrain: bool = False) -> nn.Module:
    """A torchvision classifier ``arch`` (10 classes; one of ``DIGITS_ARCHITECTURES``) trained
    on the digits train split with its recipe (``DIGITS_RECIPES``), cached on disk.

    The first call trains it and saves ``<cache_dir>/digits_<arch>.pt`` atomically; later calls
    load that file. The architecture is plain ``torchvision.models.get_model(arch,
    num_classes=10)``; inputs are ``load_data("digits")`` batches (3x32x32). Returned in eval
    mode, on the CPU.

    Args:
        cache_dir: default ``$FXGNDI_CACHE`` or ``~/.cache/fxgndi``.
        progress: show a progress bar while training.
        retrain: train again and overwrite the cache.

    Example:
        >>> digits_model("resnet18", progress=False)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    if arch not in DIGITS_ARCHITECTURES:
        raise ValueError(f"no digits model for {arch!r}: use one of "
                         f"{', '.join(DIGITS_ARCHITECTURES)}")
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / (DIGITS_CACHE_NAME if arch == "resnet18" else f"digits_{arch}.pt")
    if path.is_file() and not retrain:
        model = _load_cached_digits(path, arch)
        if model is not None:
            return model
    model, meta = _train_digits(progress, arch)
    _atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model


def digits_resnet18(*, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    retrain: bool = False) -> nn.Module:
    """The digits ResNet-18: :func:`digits_model` ``("resnet18")``.

    Example:
        >>> model = digits_resnet18(progress=False)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return digits_model("resnet18", cache_dir=cache_dir, progress=progress, retrain=retrain)
