"""Tests of fxgndi.app.data: digits, ImageFolder (with a corrupt file), CIFAR-10, spec errors."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from fxgndi.app.data import (DIGITS_MEAN, DIGITS_STD, _digits_tensors, digits_dataset,
                             load_data, num_classes)


# --------------------------------------------------------------------------- digits

def test_digits_shapes_splits_and_labels():
    train, test, full = (digits_dataset(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1347, 450, 1797)
    x, y = next(iter(load_data("digits", split="test", batch_size=32)))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    for ds in (train, test):
        assert set(ds.tensors[1].tolist()) == set(range(10))
    # stratified: every class keeps about 25% of its samples in the test split
    counts = torch.bincount(test.tensors[1], minlength=10).float()
    totals = torch.bincount(full.tensors[1], minlength=10).float()
    assert torch.allclose(counts / totals, torch.full((10,), 0.25), atol=0.02)


def test_digits_splits_are_disjoint_and_cover_all():
    _, _, is_train = _digits_tensors(32)
    assert int(is_train.sum()) == 1347
    full = digits_dataset("all").tensors[0]
    train = digits_dataset("train").tensors[0]
    assert torch.equal(full[is_train], train)


def test_digits_normalisation_matches_train_statistics():
    x = digits_dataset("train").tensors[0]
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    raw = _digits_tensors(32)[0][_digits_tensors(32)[2]]
    assert abs(raw.mean().item() - DIGITS_MEAN) < 1e-4
    assert abs(raw.std().item() - DIGITS_STD) < 1e-4


def test_digits_image_size_and_determinism():
    x, _ = next(iter(load_data("digits", image_size=16, batch_size=4)))
    assert x.shape == (4, 3, 16, 16)
    a = [y for _, y in load_data("digits", split="train", seed=3)]
    b = [y for _, y in load_data("digits", split="train", seed=3)]
    c = [y for _, y in load_data("digits", split="train", seed=4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    # test split is not shuffled by default
    y_test = torch.cat([y for _, y in load_data("digits", batch_size=100)])
    assert torch.equal(y_test, digits_dataset("test").tensors[1])


def test_limit_keeps_first_samples():
    loader = load_data("digits", split="test", batch_size=8, limit=20)
    assert len(loader.dataset) == 20
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, digits_dataset("test").tensors[1][:20])
    with pytest.raises(ValueError, match="limit"):
        load_data("digits", limit=0)


# --------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec", ["mnist", "digits:/x", "cifar10", "imagefolder:", "",
                                  "cifar100:/x"])
def test_unknown_spec_raises_value_error(spec):
    with pytest.raises(ValueError, match="digits|path|spec"):
        load_data(spec)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="split"):
        load_data("digits", split="validation")


def test_num_classes(tmp_path):
    assert num_classes("digits") == 10
    assert num_classes(f"cifar10:{tmp_path}") == 10
    root = _image_folder(tmp_path, corrupt=False)
    assert num_classes(f"imagefolder:{root}") == 2


# --------------------------------------------------------------------------- imagefolder

def _image_folder(tmp_path, corrupt: bool = True):
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"this is not a png \x00\x01\x02" * 10)
    return root


def test_imagefolder_loads_and_skips_corrupt_file(tmp_path):
    root = _image_folder(tmp_path)
    loader = load_data(f"imagefolder:{root}", image_size=16, batch_size=4)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        batches = list(loader)
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (6, 3, 16, 16) and xs.dtype == torch.float32
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]
    assert loader.dataset.skipped == 1
    assert loader.dataset.skipped_files[0].endswith("broken.png")
    # a second pass does not count the same file twice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(loader)
    assert loader.dataset.skipped == 1


def test_imagefolder_skip_count_reaches_main_process_from_workers(tmp_path):
    root = _image_folder(tmp_path)
    loader = load_data(f"imagefolder:{root}", image_size=8, batch_size=4, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raised inside the worker process
        assert sum(len(y) for _, y in loader) == 6
    assert loader.dataset.skipped == 1


def test_imagefolder_dataset_pickles_for_spawned_workers(tmp_path):
    # spawn / forkserver workers (macOS, Windows, Python >= 3.14) pickle the dataset
    dataset = load_data(f"imagefolder:{_image_folder(tmp_path)}", image_size=8).dataset
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 7 and clone.skipped == 0


def test_imagefolder_batch_of_only_corrupt_files_is_skipped(tmp_path):
    root = _image_folder(tmp_path)
    loader = load_data(f"imagefolder:{root}", image_size=8, batch_size=1)
    with pytest.warns(RuntimeWarning):
        batches = list(loader)
    assert len(batches) == 6


def test_imagefolder_strict_raises_naming_file(tmp_path):
    root = _image_folder(tmp_path)
    loader = load_data(f"imagefolder:{root}", image_size=8, batch_size=8, strict=True)
    with pytest.raises(ValueError, match="broken.png"):
        list(loader)


def test_imagefolder_split_subfolders(tmp_path):
    _image_folder(tmp_path, corrupt=False).rename(tmp_path / "train")
    with pytest.raises(ValueError, match="split folders"):  # not the root's "train" class
        load_data(f"imagefolder:{tmp_path}", split="test")
    _image_folder(tmp_path, corrupt=False).rename(tmp_path / "val")
    test = load_data(f"imagefolder:{tmp_path}", split="test", image_size=8)
    assert test.dataset.root == str(tmp_path / "val") and len(test.dataset) == 6
    assert len(load_data(f"imagefolder:{tmp_path}", split="all", image_size=8).dataset) == 12
    assert num_classes(f"imagefolder:{tmp_path}") == 2


def test_imagefolder_limit_keeps_skip_report(tmp_path):
    root = _image_folder(tmp_path)
    (root / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
    loader = load_data(f"imagefolder:{root}", image_size=8, limit=2)
    with pytest.warns(RuntimeWarning, match="0.png"):
        (x, y), = list(loader)
    assert x.shape[0] == 1 and loader.dataset.skipped == 1


def test_imagefolder_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(f"imagefolder:{missing}")


def test_imagefolder_without_class_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="class"):
        load_data(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------------------- cifar10

def test_cifar10_missing_root_explains_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"download=True") as info:
        load_data(f"cifar10:{tmp_path / 'cifar'}")
    assert str(tmp_path / "cifar") in str(info.value)
    with pytest.raises(FileNotFoundError, match="CIFAR10"):  # root exists, data does not
        load_data(f"cifar10:{tmp_path}")


def _fake_cifar(root, n_per_batch: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, size=n_per_batch)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return root


def test_cifar10_on_fake_local_copy(tmp_path, monkeypatch):
    # torchvision checks the md5 of every batch file; a fake copy cannot match, so the check
    # is patched out: this tests fxgndi's wiring (splits, transforms), not the real files.
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    root = _fake_cifar(tmp_path)
    x, y = next(iter(load_data(f"cifar10:{root}", split="train", batch_size=100)))
    assert x.shape == (20, 3, 32, 32) and y.dtype == torch.int64
    assert len(load_data(f"cifar10:{root}", split="test").dataset) == 4
    assert len(load_data(f"cifar10:{root}", split="all").dataset) == 24
    x, _ = next(iter(load_data(f"cifar10:{root / 'cifar-10-batches-py'}", image_size=48)))
    assert x.shape == (4, 3, 48, 48)


def test_split_overlap_of_digits_and_cifar():
    from fxgndi.app.data import split_overlap
    for spec in ("digits", "cifar10:/nowhere"):
        assert split_overlap(spec, "train", "test") is None
        assert split_overlap(spec, "test", "train") is None
        assert "both are split 'test'" in split_overlap(spec, "test", "test")
        assert "'all' holds every sample" in split_overlap(spec, "all", "test")
        assert "'all' holds every sample" in split_overlap(spec, "train", "all")
    # digits train / test share no image: checked on the data itself
    from fxgndi.app.data import digits_dataset
    train = {tuple(x.flatten().tolist()) for x, _ in digits_dataset("train")}
    test = [tuple(x.flatten().tolist()) for x, _ in digits_dataset("test")]
    assert len(test) == 450 and sum(t in train for t in test) <= 5  # duplicates in the source


def test_split_overlap_of_imagefolder_trees(tmp_path):
    from fxgndi.app.data import split_overlap
    split = tmp_path / "split"
    for d in ("train/cat", "val/cat"):
        (split / d).mkdir(parents=True)
    spec = f"imagefolder:{split}"
    assert split_overlap(spec, "train", "test") is None  # test reads val/
    assert split_overlap(spec, "train", "val") is None
    assert "val" in split_overlap(spec, "test", "val")  # both read val/
    assert split_overlap(spec, "all", "train") is not None
    flat = tmp_path / "flat"
    (flat / "cat").mkdir(parents=True)
    reason = split_overlap(f"imagefolder:{flat}", "train", "test")
    assert reason == f"both read the images under {flat.resolve()}"
