"""Model loading: torchvision classifiers by name, optional weights or a local checkpoint.

Everything is built by ``torchvision.models.get_model``, so the result is a plain torchvision
module that torch.fx and torch-pruning handle. Nothing is downloaded unless ``weights`` asks
for it; machines without internet should pass ``checkpoint=`` (a local state dict) instead.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["load_model", "load_checkpoint", "reinit_zero_heads", "classification_models"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def classification_models() -> list[str]:
    """Names of torchvision's image classification models (what :func:`load_model` builds).

    Example:
        >>> "resnet18" in classification_models()
        True
    """
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> str:
    import torchvision

    known = classification_models()
    key = name.strip().lower()
    if key in known:
        return key
    if key in torchvision.models.list_models():
        raise ValueError(f"{name!r} is a torchvision model, but not an image classifier; "
                         f"fxgndi needs a classifier (logits out), e.g. resnet18, vit_b_16")
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}?" if close
            else "see fxgndi.app.models.classification_models()")
    raise ValueError(f"unknown model {name!r}; {hint}")


def _resolve_weights(name: str, weights: Any) -> Any:
    """The torchvision weights enum member that ``weights`` names (``"DEFAULT"``, ...)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    choices = ", ".join(["DEFAULT"] + [m.name for m in enum])
    try:
        return enum.verify(weights)
    except (KeyError, TypeError) as err:
        raise ValueError(f"unknown weights {weights!r} for {name}; choose one of: {choices}") \
            from err


def _check_num_classes(name: str, weights: Any, num_classes: int | None) -> None:
    categories = weights.meta.get("categories") or []
    if num_classes is not None and categories and num_classes != len(categories):
        raise ValueError(
            f"weights {weights} of {name} have {len(categories)} classes, not num_classes="
            f"{num_classes}. Either load them with num_classes={len(categories)} (or None) and "
            f"replace the classification head yourself, or use weights=None with a checkpoint "
            f"trained for {num_classes} classes")


def _build(name: str, weights: Any, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": int(num_classes)}
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:
        url = getattr(weights, "url", None)
        if not url:
            raise
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        raise RuntimeError(
            f"could not fetch weights {weights} for {name} ({type(err).__name__}: {err}). "
            f"Without internet, download {url} on another machine and copy it to "
            f"{target}, or pass checkpoint=<local state dict> with weights=None") from err


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"checkpoint {path!r} is not a state dict (nor a dict holding one under "
                         f"'state_dict' or 'model'); save it with torch.save(model.state_dict(), "
                         f"path)")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _guess_num_classes(model_state: Mapping[str, torch.Tensor],
                       state: Mapping[str, torch.Tensor], mismatched: list[str]) -> int | None:
    """The checkpoint's class count when only a classification head's rows differ."""
    for key in mismatched:
        mine, theirs = model_state[key].shape, state[key].shape
        if len(mine) == len(theirs) and mine[1:] == theirs[1:] and mine[0] != theirs[0]:
            return int(theirs[0])
    return None


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a local state dict file into ``model`` (in place) and return it.

    The file may hold a state dict, or a dict with it under ``"state_dict"`` or ``"model"``;
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> torch.save(m.state_dict(), "/tmp/r18.pt")
        >>> m = load_checkpoint(torchvision.models.resnet18(num_classes=10), "/tmp/r18.pt")
    """
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a file "
                                f"saved with torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors vary widely; all mean "not a loadable state dict"
        raise ValueError(f"cannot read checkpoint {path!r} with torch.load(weights_only=True): "
                         f"{err}. Re-save it as a plain state dict") from err
    state = _unwrap_state_dict(obj, path)
    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    mismatched = sorted(k for k in set(state) & set(model_state)
                        if state[k].shape != model_state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_message(path, model_state, state, missing, unexpected,
                                           mismatched))
    model.load_state_dict(state)
    return model


def _mismatch_message(path: str, model_state: Mapping[str, torch.Tensor],
                      state: Mapping[str, torch.Tensor], missing: list[str],
                      unexpected: list[str], mismatched: list[str]) -> str:
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [f"checkpoint {path!r} does not fit the model:"]
    if missing:
        parts.append(f"missing keys: {few(missing)};")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)};")
    if mismatched:
        shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                  for k in mismatched]
        parts.append(f"shape mismatches: {few(shapes)};")
    guess = _guess_num_classes(model_state, state, mismatched)
    if guess is not None:
        parts.append(f"the checkpoint looks trained for {guess} classes: pass "
                     f"num_classes={guess} (CLI: --num-classes {guess})")
    else:
        parts.append("check the model name, and pass num_classes= (CLI: --num-classes) if the "
                     "checkpoint was trained for another number of classes")
    return " ".join(parts)


@torch.no_grad()
def reinit_zero_heads(model: nn.Module, seed: int = 0) -> list[str]:
    """Re-initialise every ``nn.Linear`` whose weight is all zeros (normal, std 0.01).

    torchvision's ViT (and a few others) zero-initialise the classification head. With
    random weights, every gradient and every G-NDI tangent through such a head is exactly 0,
    so all scores would be 0. Trained weights never leave a head all-zero, so this only
    touches freshly built models. Returns the names of the layers it re-initialised.

    Example:
        >>> import torchvision
        >>> vit = torchvision.models.vit_b_16(image_size=32)
        >>> reinit_zero_heads(vit)
        ['heads.head']
    """
    generator = torch.Generator().manual_seed(seed)
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            fresh = torch.empty(module.weight.shape, dtype=module.weight.dtype)
            fresh.normal_(0.0, 0.01, generator=generator)
            module.weight.copy_(fresh)
            changed.append(name)
    return changed


def load_model(name: str, *, num_classes: int | None = None, weights: str | None = None,
               checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a torchvision classifier by name, in eval mode.

    Args:
        name: a torchvision classification model, e.g. ``"resnet18"``, ``"vit_b_16"``.
        num_classes: size of the classification head (torchvision's default: 1000).
        weights: torchvision weights, e.g. ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` (downloaded
            by torchvision unless already cached in ``torch.hub.get_dir()``).
        checkpoint: path of a local state dict (or a dict with ``"state_dict"`` / ``"model"``)
            loaded with ``torch.load(weights_only=True)``; use instead of ``weights``.
        **kwargs: forwarded to the torchvision builder (e.g. ``image_size=32`` for ViT).

    A model with neither weights nor checkpoint gets its zero-initialised heads re-initialised
    (see :func:`reinit_zero_heads`) so that gradients through them are not all zero.

    Example:
        >>> model = load_model("resnet18", num_classes=10)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    name = _check_name(name)
    if weights is not None and checkpoint is not None:
        raise ValueError("pass either weights= (torchvision weights) or checkpoint= (a local "
                         "state dict), not both: the checkpoint would overwrite the weights")
    if num_classes is not None and int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    resolved = None
    if weights is not None:
        resolved = _resolve_weights(name, weights)
        _check_num_classes(name, resolved, num_classes)
    model = _build(name, resolved, num_classes, dict(kwargs))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif resolved is None:
        reinit_zero_heads(model)
    return model.eval()
