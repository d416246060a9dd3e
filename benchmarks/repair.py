"""What the one-shot repair needs: its ridge, its calibration size, and the pruning scope.

    python benchmarks/repair.py                                  # both digits models, 2x and 3x
    python benchmarks/repair.py --models digits-resnet18 --points 2 --studies ridge
    python benchmarks/repair.py --studies calibration --sizes 64 256 1347 --json repair.json

Each model is pruned once per point by G-NDI (``fxgndi.prune(target="macs", repair=False)``,
scored on the first ``--samples`` train images, the calibration set), then:

- ``ridge``: the default repair (:class:`fxgndi.Repair`) with each ``--ridges`` value on the
  calibration set, scored on the train images the calibration did not use (validation): the
  ridge is chosen without reading the test split;
- ``calibration``: the default repair on the first n train images, n in ``--sizes``, scored on
  the test split;
- ``scope``: ``fxgndi.prune`` with its default repair, local (per-group ratio) or global
  ranking, in one step or three (each step repaired before the next is scored), on the test
  split; seconds are wall time of the whole call.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from fxgndi.app.data import load_data, make_dataset
from fxgndi.app.zoo import digits_model
from fxgndi.core.errors import FxgndiError
from fxgndi.core.files import write_json
from fxgndi.core.report import format_table
from fxgndi.pruning.finetune import evaluate
from fxgndi.pruning.repair import Repair, repair_model
from fxgndi.pruning.width import prune

# Every group loses the same fraction of its channels: the README's tables were measured so
# (prune's allocate="time", the default since, moves the cut by measured time).
ALLOCATE = "uniform"

STUDIES = ("ridge", "calibration", "scope")
SCOPES = {"local, 1 step": {}, "local, 3 steps": {"iterative_steps": 3},
          "global, 1 step": {"global_pruning": True},
          "global, 3 steps": {"global_pruning": True, "iterative_steps": 3}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet18", "digits-mobilenet_v2"])
    p.add_argument("--points", type=float, nargs="+", default=[2.0, 3.0],
                   help="MAC reductions (2 = half the MACs)")
    p.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    p.add_argument("--samples", type=int, default=256, help="calibration (scoring) images")
    p.add_argument("--ridges", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1347],
                   help="calibration sizes of the calibration study")
    p.add_argument("--json", default=None, metavar="PATH", help="write every row")
    return p.parse_args(argv)


def train_images(start: int, stop: int | None) -> DataLoader:
    """The digits train images ``start:stop`` in their stored order."""
    dataset = make_dataset("digits", split="train")
    return DataLoader(Subset(dataset, range(start, min(stop or len(dataset), len(dataset)))),
                      batch_size=64, shuffle=False)


def repaired_accuracy(pruned: Any, dense: torch.nn.Module, data: DataLoader,
                      evaluate_on: DataLoader, repair: Repair) -> float:
    model = copy.deepcopy(pruned.model)
    repair_model(model, data, repair, dense=dense, kept_outputs=pruned.kept)
    return evaluate(model, evaluate_on)["accuracy"]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    calibration = train_images(0, args.samples)
    validation = train_images(args.samples, None)
    test = load_data("digits", split="test", batch_size=256)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        dense = digits_model(name.removeprefix("digits-"), progress=False)
        for factor in args.points:
            sparsity = 1 - 1 / factor
            pruned = prune(dense, calibration, target="macs", sparsity=sparsity, repair=False,
                           allocate=ALLOCATE)
            base = {"model": name, "reduction": factor}
            if "ridge" in args.studies:
                for ridge in args.ridges:
                    acc = repaired_accuracy(pruned, dense, calibration, validation,
                                            Repair(ridge=ridge))
                    rows.append({**base, "study": "ridge", "setting": f"ridge {ridge:g}",
                                 "split": "validation", "accuracy": acc})
            if "calibration" in args.studies:
                for size in args.sizes:
                    acc = repaired_accuracy(pruned, dense, train_images(0, size), test, Repair())
                    rows.append({**base, "study": "calibration", "setting": f"{size} images",
                                 "split": "test", "accuracy": acc})
            if "scope" in args.studies:
                for label, options in SCOPES.items():
                    start = time.perf_counter()
                    row = {**base, "study": "scope", "setting": label, "split": "test"}
                    try:
                        r = prune(dense, calibration, target="macs", sparsity=sparsity,
                                  allocate=ALLOCATE, **options)
                    except FxgndiError as error:  # a global ranking may not reach the target
                        rows.append({**row, "accuracy": float("nan"),
                                     "error": str(error).split(": the")[0]})
                        continue
                    rows.append({**row, "accuracy": evaluate(r.model, test)["accuracy"],
                                 "macs_kept": r.macs_after / r.macs_before,
                                 "seconds": time.perf_counter() - start})
            print(f"{name} {factor:g}x done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = run(args)
    for study in args.studies:
        picked = [r for r in rows if r["study"] == study]
        headers = ["model", "MAC red.", "setting", "split", "accuracy"]
        if study == "scope":
            headers += ["MACs kept", "s"]
        print(f"\n{study}:")
        print(format_table(
            [[r["model"], f"{r['reduction']:g}x", r["setting"], r["split"],
              r.get("error") or f"{r['accuracy']:.3f}"]
             + ([f"{r['macs_kept']:.3f}" if "macs_kept" in r else "",
                 f"{r['seconds']:.0f}" if "seconds" in r else ""] if study == "scope" else [])
             for r in picked], headers))
    if args.json:
        write_json(args.json, {"settings": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
