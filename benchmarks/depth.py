"""Depth pruning against width pruning: accuracy on the digits ResNet-18, latency on big nets.

    python benchmarks/depth.py accuracy --plot docs/depth.png   # digits ResNet-18, 1-3 blocks
    python benchmarks/depth.py speed               # resnet50, convnext_tiny, vit_b_16 at 224 px
    python benchmarks/depth.py speed --models resnet50 --batch 1 8 --threads 2

Accuracy: remove k residual branches (greedy, no fine-tuning) by first-order G-NDI (zero and
channel-mean baselines), path-integrated G-NDI (m = 4), their exact ablation (logit L2) and in
random order (mean and standard deviation over seeds); then width pruning (fxgndi.prune,
G-NDI and L1) and depth + width ("both": one G-NDI-path block, then G-NDI channels) at the MAC
reduction that depth pruning reached. Each pruned model is evaluated as pruned and with its
BatchNorm statistics re-estimated on the scoring images (no weight changes). Speed: weights=None
models (speed does not depend on the weights) pruned to the same
MAC reduction by depth and by width (L1: which channels go does not change the speed);
latency is the median of ``--repeat`` timed forward passes, measured in this process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from fxgndi.core.cost import count_macs_params
from fxgndi.app.data import load_data
from fxgndi.pruning.depth import prune_depth
from fxgndi.pruning.width import prune
from fxgndi.pruning.recalibrate import recalibrate_bn
from fxgndi.core.report import format_table, pyplot, save_figure
from fxgndi.core.runtime import eval_mode, torch_threads
from fxgndi.app.zoo import digits_resnet18
from fxgndi.pruning.finetune import evaluate

# Every group loses the same fraction of its channels: the README's tables were measured so
# (prune's allocate="time", the default since, moves the cut by measured time).
ALLOCATE = "uniform"

DEPTH_RUNS = [("depth: gndi first order (zero)", "gndi", "zero", 1),
              ("depth: gndi first order (channel-mean)", "gndi", "channel-mean", 1),
              ("depth: gndi path m=4 (zero)", "gndi", "zero", 4),
              ("depth: ablation (logit L2)", "ablation", "zero", 1)]
BOTH = DEPTH_RUNS[2]  # the block of depth + width: G-NDI path, zero baseline
SPEED_MODELS = ("resnet50", "convnext_tiny", "vit_b_16")


def accuracy(args: argparse.Namespace) -> list[tuple]:
    """Digits ResNet-18: test accuracy after removing k blocks, against width pruning."""
    model = digits_resnet18(progress=False)
    scoring = load_data("digits", split="train", limit=args.samples, batch_size=64,
                        shuffle=False)
    test = load_data("digits", split="test", batch_size=256)

    def accuracies(pruned: torch.nn.Module) -> tuple[float, float]:
        """Test accuracy as pruned, and with BatchNorm statistics re-estimated on ``scoring``."""
        recalibrated = copy.deepcopy(pruned)
        recalibrate_bn(recalibrated, scoring)
        return evaluate(pruned, test)["accuracy"], evaluate(recalibrated, test)["accuracy"]

    dense = evaluate(model, test)
    rows: list[tuple] = [(0, "dense", dense["accuracy"], None, dense["accuracy"], 0.0, "")]
    for k in args.blocks:
        reached = None
        for label, criterion, baseline, steps in DEPTH_RUNS:
            r = prune_depth(model, scoring, n_blocks=k, importance=criterion, baseline=baseline,
                            steps=steps, repair=False)
            as_pruned, recal = accuracies(r.model)
            rows.append((k, label, as_pruned, None, recal, r.macs_reduction,
                         " ".join(r.removed)))
            reached = r.macs_reduction
        random_runs = [prune_depth(model, scoring, n_blocks=k, importance="random", seed=s,
                                   repair=False) for s in range(args.random_seeds)]
        accs = [accuracies(r.model) for r in random_runs]
        rows.append((k, f"depth: random order ({args.random_seeds} seeds)",
                     statistics.mean(a for a, _ in accs), statistics.pstdev(a for a, _ in accs),
                     statistics.mean(b for _, b in accs),
                     statistics.mean(r.macs_reduction for r in random_runs), ""))
        for label, importance in (("width: gndi", "gndi"), ("width: l1", "l1")):
            r = prune(model, scoring, target="macs", sparsity=reached, importance=importance,
                      repair=False, allocate=ALLOCATE)
            as_pruned, recal = accuracies(r.model)
            rows.append((k, label, as_pruned, None, recal, r.macs_reduction, ""))
        if k > 1:
            _, criterion, baseline, steps = BOTH
            first = prune_depth(model, scoring, n_blocks=1, importance=criterion,
                                baseline=baseline, steps=steps, repair=False)
            rest = 1 - (1 - reached) / (1 - first.macs_reduction)
            r = prune(first.model, scoring, target="macs", sparsity=rest, importance="gndi",
                      repair=False, allocate=ALLOCATE)
            as_pruned, recal = accuracies(r.model)
            rows.append((k, "both: 1 block (gndi path) + width gndi", as_pruned, None, recal,
                         1 - r.macs_after / first.macs_before, " ".join(first.removed)))
    print(f"digits ResNet-18, no fine-tuning; scored on {args.samples} train images, "
          f"accuracy on {dense['n']} held-out test images")
    print(format_table(rows, ["blocks", "method", "test acc", "sd", "acc BN-recal",
                              "MACs removed", "removed (in order)"], floatfmt=".3f"))
    if args.plot:
        plot_accuracy(rows, args.plot)
    return rows


def plot_accuracy(rows: list[tuple], path: str) -> None:
    """Test accuracy against MACs removed, one line per method (the dense model at 0)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r for r in rows if r[1] == "dense")
    for method in dict.fromkeys(r[1] for r in rows if r[1] != "dense"):
        points = [(0.0, dense[2])] + [(r[5], r[2]) for r in rows if r[1] == method]
        style = "--" if method.startswith("width") else ":" if method.startswith("both") \
            else "-"
        ax.plot(*zip(*points), style, marker="o", label=method)
    ax.set_xlabel("fraction of MACs removed")
    ax.set_ylabel("test accuracy (no fine-tuning)")
    ax.set_title("digits ResNet-18: depth vs width pruning")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _latency(model: torch.nn.Module, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of one forward pass (after two warm-up passes)."""
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(repeat + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> list[tuple]:
    """Latency of depth- and width-pruned models at equal MAC reduction."""
    with torch_threads(args.threads):
        return _speed_rows(args)


def _speed_rows(args: argparse.Namespace) -> list[tuple]:
    rows: list[tuple] = []
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        data = [torch.randn(2, 3, args.size, args.size)]
        example = data[0][:1]
        try:
            depth = prune_depth(model, data, target="macs", sparsity=args.sparsity,
                                importance=args.importance, max_memory=args.max_memory,
                                repair=False)
            pruned = {f"depth ({args.importance})": depth}
            pruned["width (l1)"] = prune(model, data, target="macs",
                                         sparsity=depth.macs_reduction, importance="l1",
                                         repair=False, allocate=ALLOCATE)
        except Exception as exc:  # report and go on with the next model
            rows.append((name, "error", f"{type(exc).__name__}: {exc}"[:120], "", "", "", ""))
            continue
        macs0 = count_macs_params(model, example)[0]
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size)
            dense = _latency(model, x, args.repeat)
            rows.append((name, "dense", batch, 0.0, 1e3 * dense, 1.0, ""))
            for label, r in pruned.items():
                seconds = _latency(r.model, x, args.repeat)
                cut = 1 - count_macs_params(r.model, example)[0] / macs0
                gain = (1 - seconds / dense) / cut
                rows.append((name, label, batch, cut, 1e3 * seconds, dense / seconds, gain))
    print(f"{args.size} px, weights=None, {args.threads} thread(s), median of {args.repeat}; "
          "latency gain per MAC removed = (1 - latency ratio) / MAC reduction")
    print(format_table(rows, ["model", "pruning", "batch", "MACs removed", "latency (ms)",
                              "speed-up", "latency gain per MAC removed"], floatfmt=".3f"))
    return rows


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["accuracy", "speed"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=256, help="train images for scoring")
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--plot", default=None, help="accuracy part: write the figure here")
    parser.add_argument("--models", nargs="+", default=list(SPEED_MODELS))
    parser.add_argument("--sparsity", type=float, default=0.25,
                        help="MAC fraction depth pruning removes in the speed part")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--importance", default="gndi", choices=["gndi", "ablation", "random"],
                        help="speed part: how depth pruning picks blocks (G-NDI path m=4)")
    parser.add_argument("--max-memory", default="4GB", help="speed part: scoring budget")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    return accuracy(args) if args.part == "accuracy" else speed(args)


if __name__ == "__main__":
    main()
