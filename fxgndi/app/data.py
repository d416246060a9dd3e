"""Data specs: the built-in digits set, a local CIFAR-10 copy, or any ImageFolder.

A *spec* is a short string that names a data source:

- ``"digits"``: scikit-learn's bundled 1,797 real 8x8 handwritten digits, upsampled to
  3x32x32. It ships with scikit-learn, so it works on machines without internet.
- ``"cifar10:/path/to/root"``: a local torchvision CIFAR-10 copy (never downloaded here).
- ``"imagefolder:/path"``: a torchvision ``ImageFolder`` tree (``class_name/image.png``),
  optionally with ``train/``, ``val/`` or ``test/`` sub-folders.

Every loader yields ``(x, y)`` batches: float32 NCHW images and int64 labels.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

from fxgndi.core.errors import DataError

__all__ = [
    "load_data",
    "make_dataset",
    "skip_none_collate",
    "num_classes",
    "split_overlap",
    "digits_dataset",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SafeImageFolder",
]

SPEC_FORMS = ('"digits"', '"cifar10:/path/to/root"', '"imagefolder:/path"')
SPLITS = ("train", "test", "all")

# Mean / std of the digits *train* split after scaling to [0, 1] and bilinear upsampling to
# 32x32 (the three channels are identical copies). Fixed so that a model trained once keeps
# seeing the same input statistics; tests/test_data.py recomputes them.
DIGITS_MEAN = 0.3052
DIGITS_STD = 0.3235
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sub-folders tried, in order, for each split of an ImageFolder tree (ImageNet uses "val").
_IMAGEFOLDER_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val",)}


# --------------------------------------------------------------------------- specs

def _parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"kind:path"`` into ``(kind, path)``; only the first colon separates them."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}; "
                         f"use one of {', '.join(SPEC_FORMS)}")
    kind, sep, path = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "digits" and not sep:
        return kind, None
    if kind in ("cifar10", "imagefolder"):
        if not path:
            raise ValueError(f"data spec {spec!r} needs a path: {kind}:/path/to/data")
        return kind, os.path.expanduser(path)
    raise ValueError(f"unknown data spec {spec!r}; accepted forms: {', '.join(SPEC_FORMS)}")


def _check_split(split: str, allowed: Sequence[str] = SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(map(repr, allowed))}")


# --------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=4)
def _digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All digits as ``(images in [0, 1], labels, is_train mask)``; cached per image size."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False
    ).clamp_(0.0, 1.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, _ = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=bunch.target, random_state=0
    )
    is_train = torch.zeros(len(labels), dtype=torch.bool)
    is_train[torch.as_tensor(np.sort(train_idx))] = True
    return images.expand(-1, 3, -1, -1).contiguous(), labels, is_train


def digits_dataset(split: str = "test", image_size: int = 32) -> TensorDataset:
    """The scikit-learn digits as a normalised ``TensorDataset`` of ``(3xSxS image, label)``.

    The split is a fixed stratified 75/25 split (``random_state=0``): 1,347 train and 450
    test images; ``split="all"`` gives all 1,797 in their original order.

    Example:
        >>> ds = digits_dataset("train")
        >>> len(ds), tuple(ds[0][0].shape)
        (1347, (3, 32, 32))
    """
    _check_split(split)
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    images, labels, is_train = _digits_tensors(int(image_size))
    keep = {"train": is_train, "test": ~is_train, "all": torch.ones_like(is_train)}[split]
    x = (images[keep] - DIGITS_MEAN) / DIGITS_STD
    return TensorDataset(x, labels[keep])


# --------------------------------------------------------------------------- torchvision sets

def _image_transform(image_size: int | None, mean: Sequence[float], std: Sequence[float],
                     crop: bool) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    steps: list[Any] = []
    if image_size is not None:
        steps.append(T.Resize(image_size))
        if crop:
            steps.append(T.CenterCrop(image_size))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _cifar10_dataset(root: str, split: str, image_size: int | None) -> Dataset:
    from torchvision.datasets import CIFAR10

    _check_split(split)
    transform = _image_transform(image_size, CIFAR10_MEAN, CIFAR10_STD, crop=False)
    fix = (f"download CIFAR-10 there on a machine with internet, e.g. "
           f"torchvision.datasets.CIFAR10({root!r}, download=True), then copy the folder "
           f"(it holds cifar-10-batches-py/) to this machine")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 root {root!r} does not exist; {fix}")
    if os.path.basename(os.path.normpath(root)) == CIFAR10.base_folder:
        # A common slip: the spec names cifar-10-batches-py/ itself rather than its parent.
        root = os.path.dirname(os.path.normpath(root))
    trains = {"train": [True], "test": [False], "all": [True, False]}[split]
    try:
        parts = [CIFAR10(root, train=t, download=False, transform=transform) for t in trains]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(
            f"no valid CIFAR-10 data under {root!r} ({err}); {fix}") from err
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _imagefolder_roots(path: str, split: str) -> list[str]:
    """The folder(s) that hold ``split`` of an ImageFolder tree.

    ``path/<split>`` when it exists (``val/`` also serves as ``test``); ``split="all"`` takes
    every split folder present; a tree without split folders is used whole.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"ImageFolder path {path!r} does not exist or is not a directory; "
            f"point imagefolder:<path> at a folder holding one sub-folder per class")
    present = [d for d in ("train", "val", "test") if os.path.isdir(os.path.join(path, d))]
    if split == "all":
        wanted = present
    else:
        wanted = [d for d in _IMAGEFOLDER_SPLIT_DIRS.get(split, (split,)) if d in present
                  or os.path.isdir(os.path.join(path, d))][:1]
    if wanted:
        return [os.path.join(path, d) for d in wanted]
    if present:
        # Falling back to the root here would turn train/, val/ into two "classes".
        raise ValueError(f"{path!r} has split folders {present} but none for split {split!r}; "
                         f"use split={present[0]!r}, or point the spec at a class-folder tree")
    return [path]


_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError)


class SafeImageFolder(ImageFolder):
    """``ImageFolder`` that skips (or, with ``strict=True``, rejects) unreadable images.

    A skipped sample comes back as ``None`` and :func:`skip_none_collate` drops it from its
    batch. ``skipped`` counts the distinct files found unreadable so far; the flags live in
    shared memory so that DataLoader worker processes report them too.

    Example:
        >>> ds = SafeImageFolder("/data/pets")  # doctest: +SKIP
        >>> [sample for sample in ds if sample is None], ds.skipped  # doctest: +SKIP
        ([None], 1)
    """

    def __init__(self, root: str, transform: Callable | None = None,
                 strict: bool = False) -> None:
        super().__init__(root, transform=transform)
        self.strict = strict
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> int:
        """How many distinct unreadable files were skipped so far."""
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the unreadable files skipped so far."""
        return [self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except _READ_ERRORS as err:
            if self.strict:
                raise ValueError(
                    f"cannot read image {path!r}: {err}. Fix or delete the file, or load "
                    f"with strict=False to skip unreadable images") from err
            first_time = not bool(self._bad[index])
            self._bad[index] = True
            if first_time:
                warnings.warn(
                    f"skipping unreadable image {path!r} ({type(err).__name__}: {err}); "
                    f"{self.skipped} file(s) skipped so far", RuntimeWarning, stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def _skip_count(dataset: Dataset) -> tuple[int, list[str]]:
    """``(count, files)`` of unreadable images skipped under a (wrapped) ImageFolder."""
    if isinstance(dataset, Subset):
        return _skip_count(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        parts = [_skip_count(d) for d in dataset.datasets]
        return sum(n for n, _ in parts), [f for _, files in parts for f in files]
    if hasattr(dataset, "skipped_files"):
        return dataset.skipped, dataset.skipped_files  # type: ignore[attr-defined]
    return 0, []


class _SkipReport:
    """Mixin: ``skipped`` / ``skipped_files`` of the ImageFolder(s) a wrapper holds."""

    @property
    def skipped(self) -> int:
        return _skip_count(self)[0]  # type: ignore[arg-type]

    @property
    def skipped_files(self) -> list[str]:
        return _skip_count(self)[1]  # type: ignore[arg-type]


class _ReportingSubset(_SkipReport, Subset):
    pass


class _ReportingConcat(_SkipReport, ConcatDataset):
    pass


def _imagefolder_dataset(path: str, split: str, image_size: int | None,
                         strict: bool) -> Dataset:
    size = 224 if image_size is None else image_size
    transform = _image_transform(size, IMAGENET_MEAN, IMAGENET_STD, crop=True)
    parts = []
    for root in _imagefolder_roots(path, split):
        try:
            parts.append(SafeImageFolder(root, transform=transform, strict=strict))
        except FileNotFoundError as err:  # no class folders, or no images in them
            raise FileNotFoundError(
                f"no usable ImageFolder layout under {root!r} ({err}); expected "
                f"{root}/<class_name>/<image>.png|jpg|...") from err
    if any(p.class_to_idx != parts[0].class_to_idx for p in parts):
        raise ValueError(f"the split folders under {path!r} hold different class folders; "
                         f"give every split the same classes")
    return parts[0] if len(parts) == 1 else _ReportingConcat(parts)


def skip_none_collate(batch: list[Any]) -> Any:
    """Collate a batch after dropping the ``None`` samples of unreadable images.

    Returns ``None`` when every sample of the batch was dropped; the loaders built by
    :func:`load_data` skip such batches.

    Example:
        >>> x, y = skip_none_collate([(torch.zeros(3), 0), None])
        >>> tuple(x.shape), y.tolist()
        ((1, 3), [0])
    """
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


class _SkippingDataLoader(DataLoader):
    """A DataLoader that never yields the ``None`` batch of an all-unreadable batch."""

    def __iter__(self):  # type: ignore[override]
        for batch in super().__iter__():
            if batch is not None:
                yield batch


# --------------------------------------------------------------------------- public API

def make_dataset(spec: str, *, split: str = "test", image_size: int | None = None,
                 strict: bool = False) -> Dataset:
    """The dataset behind a spec, before batching (see :func:`load_data` for the specs).

    Example:
        >>> len(make_dataset("digits", split="all"))
        1797
    """
    kind, path = _parse_spec(spec)
    if kind == "digits":
        return digits_dataset(split, 32 if image_size is None else image_size)
    if kind == "cifar10":
        return _cifar10_dataset(path, split, image_size)  # type: ignore[arg-type]
    return _imagefolder_dataset(path, split, image_size, strict)  # type: ignore[arg-type]


def load_data(spec: str, *, split: str = "test", batch_size: int = 64,
              image_size: int | None = None, shuffle: bool | None = None,
              num_workers: int = 0, strict: bool = False, limit: int | None = None,
              seed: int = 0) -> DataLoader:
    """A DataLoader of ``(x, y)`` batches (float32 NCHW, int64 labels) for a data spec.

    Args:
        spec: ``"digits"``, ``"cifar10:/root"`` or ``"imagefolder:/path"``.
        split: ``"train"``, ``"test"`` or ``"all"``. For ImageFolder, ``path/<split>`` is used
            when it exists (``val/`` also serves as ``test``; ``"all"`` joins every split
            folder), else ``path`` itself; any other sub-folder name works too.
        batch_size: samples per batch.
        image_size: output side length. Defaults: digits 32, CIFAR-10 32 (native),
            ImageFolder 224 (resize + center crop).
        shuffle: defaults to True for ``"train"``, False otherwise; seeded by ``seed``.
        num_workers: DataLoader worker processes.
        strict: ImageFolder only: raise ``ValueError`` on an unreadable image instead of
            skipping it with a warning. ``loader.dataset.skipped`` counts the files skipped
            so far (and ``skipped_files`` names them).
        limit: keep only the first ``limit`` samples (quick runs).
        seed: seed of the shuffling generator.

    Example:
        >>> loader = load_data("digits", split="test", batch_size=50)
        >>> x, y = next(iter(loader))
        >>> tuple(x.shape), x.dtype, y.dtype
        ((50, 3, 32, 32), torch.float32, torch.int64)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = make_dataset(spec, split=split, image_size=image_size, strict=strict)
    skipping = hasattr(dataset, "skipped")  # an ImageFolder: may drop unreadable images
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all samples), got {limit}")
        subset = _ReportingSubset if skipping else Subset
        dataset = subset(dataset, range(min(int(limit), len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"data spec {spec!r} (split {split!r}) holds no samples")
    if shuffle is None:
        shuffle = split == "train"
    generator = torch.Generator().manual_seed(seed)
    loader_cls = _SkippingDataLoader if skipping else DataLoader
    return loader_cls(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers,
                      collate_fn=skip_none_collate if skipping else None)


def split_overlap(spec: str, a: str, b: str) -> str | None:
    """Why splits ``a`` and ``b`` of a data spec share samples, or None when they are disjoint.

    digits and CIFAR-10: ``train`` and ``test`` are disjoint by construction (a fixed
    stratified split; separate files); ``all`` holds both, and a split overlaps itself.
    ImageFolder: each split is the folder(s) ``load_data`` reads for it; two splits overlap
    when they read the same folder or one lies inside the other (a tree without split folders
    is read whole for every split). Files are not compared: copies of one image in ``train/``
    and ``val/`` are not detected.

    Example:
        >>> split_overlap("digits", "train", "test") is None
        True
        >>> split_overlap("digits", "all", "test")
        "split 'all' holds every sample, including those of 'test'"
    """
    kind, path = _parse_spec(spec)
    if kind in ("digits", "cifar10"):
        _check_split(a)
        _check_split(b)
        if a == b:
            return f"both are split {a!r}"
        if "all" in (a, b):
            return f"split 'all' holds every sample, including those of {b if a == 'all' else a!r}"
        return None
    roots = {s: [os.path.realpath(r) for r in _imagefolder_roots(path, s)]  # type: ignore
             for s in (a, b)}
    for ra in roots[a]:
        for rb in roots[b]:
            if ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep):
                where = ra if ra == rb else min(ra, rb, key=len)
                return f"both read the images under {where}"
    return None


def num_classes(spec: str, *, split: str = "test") -> int:
    """How many classes a data spec has (digits 10, CIFAR-10 10, ImageFolder: class folders).

    Example:
        >>> num_classes("digits")
        10
    """
    kind, path = _parse_spec(spec)
    if kind in ("digits", "cifar10"):
        return 10
    root = _imagefolder_roots(path, split)[0]  # type: ignore[arg-type]
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(root)[0])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no class folders under {root!r} ({err})") from err
