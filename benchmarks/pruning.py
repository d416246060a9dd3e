"""Accuracy after pruning the digits ResNet-18 to half its MACs, per importance, no fine-tuning.

    python benchmarks/pruning.py            # per-layer (local) pruning
    python benchmarks/pruning.py --global   # global pruning
"""

from __future__ import annotations

import argparse
import time

from fxgndi.data import load_data
from fxgndi.prune import prune
from fxgndi.report import format_table
from fxgndi.train import digits_resnet18, evaluate

RUNS = [("gndi (zero)", "gndi", False), ("gndi (channel-mean + compensate)", "gndi", True),
        ("l1", "l1", False), ("taylor", "taylor", False), ("fpgm", "fpgm", False),
        ("random", "random", False)]


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global", dest="global_pruning", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=256, help="train samples for scoring")
    args = parser.parse_args(argv)

    model = digits_resnet18(progress=False)
    score_data = load_data("digits", split="train", limit=args.samples, batch_size=64,
                           shuffle=False)
    test = load_data("digits", split="test", batch_size=256)
    dense = evaluate(model, test)
    rows = [("dense", dense["accuracy"], 1.0, 1.0, float("nan"), 0.0)]
    for label, importance, compensate in RUNS:
        start = time.perf_counter()
        r = prune(model, score_data, sparsity=args.sparsity, target="macs",
                  importance=importance, compensate=compensate,
                  global_pruning=args.global_pruning)
        seconds = time.perf_counter() - start
        rows.append((label, evaluate(r.model, test)["accuracy"], r.macs_after / r.macs_before,
                     r.params_after / r.params_before, r.pruning_ratio, seconds))
    print(f"digits ResNet-18, target=macs sparsity={args.sparsity}, "
          f"global_pruning={args.global_pruning}, no fine-tuning; scoring data: {args.samples} "
          f"train samples; held-out test n={dense['n']}")
    print(format_table(rows, ["importance", "test acc", "MACs kept", "params kept",
                              "channel ratio", "seconds"], floatfmt=".3f"))
    return rows


if __name__ == "__main__":
    main()
