"""Top-1 accuracy after pruning to 1.5x, 2x, 3x and 4x fewer MACs, per criterion: G-NDI, exact
ablation and every torch-pruning built-in, at the same MACs; as pruned, with BatchNorm
statistics re-estimated, with fxgndi's default repair (least-squares refits of the consumers,
then BatchNorm recalibration), and after fine-tuning the repaired model.

    python benchmarks/pruning.py                    # digits ResNet-18, all criteria, the plot
    python benchmarks/pruning.py --model digits-mobilenet_v2 --plot docs/pruning_mobilenet.png
    python benchmarks/pruning.py --criteria gndi-zero l1 --points 2 --finetune-epochs 0
    python benchmarks/pruning.py --global --normalizer mean    # global ranking, one normaliser
    python benchmarks/pruning.py --data cifar10:~/data --model resnet18 --checkpoint c.pt
    python benchmarks/pruning.py --criteria gndi-zero --points 2 --round-to none  # vs auto
    python benchmarks/pruning.py --criteria gndi-zero l1 --points 2 --target latency --global

Every criterion prunes a copy of the same model with ``fxgndi.prune(target="macs")`` (the
channel ratio is searched until the MACs removed are within 2% of the point), under the same
ranking scope (per-group local ratio, or ``--global``), and is pruned once; four accuracies
per pruned model: ``acc`` as pruned (``repair=False``); ``acc BN-recal``: a copy after
:func:`fxgndi.pruning.recalibrate.recalibrate_bn` on the scoring samples (running statistics
only, no weight changes); ``acc repair``: a copy after fxgndi's default repair on the scoring
samples (:func:`fxgndi.pruning.repair.repair_model` with ``Repair()``: what ``fxgndi.prune``
returns by default); ``acc FT``: the repaired copy after ``--finetune-epochs`` of
:func:`fxgndi.pruning.finetune.fine_tune` on the whole train split (BatchNorm recalibrated on it
first, then trained at peak rate ``--lr``, default ``FINETUNE_LR``). ``score s`` is the time the
importance spent scoring (G-NDI scores the dense model once, at the first point), ``repair s``
the repair's. Widths are rounded as ``--round-to`` says (default ``auto``, prune's default:
multiples of 8, or of 16 / 32 where this machine's kernels run faster per channel, eager,
batch 1; ``none``; or a multiple); ``rounded`` counts the groups it rounded. With ``--target
latency`` the points are latency reductions instead (measured eagerly, one thread, at batch
``--latency-batch``, against the dense model in alternation), ``speed-up`` the measured one:
with ``--global`` each group's scores are divided by the seconds one of its channels costs
(fxgndi.pruning.latency.PerLatency); the local rows are the MAC-ranked model of that latency
(a per-group ratio does not depend on the scores).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fxgndi.app.data import load_data, num_classes
from fxgndi.deploy.latency import Latency
from fxgndi.pruning.importance import AblationImportance, GNDIImportance
from fxgndi.app.models import load_model
from fxgndi.pruning.width import make_importance, prune
from fxgndi.pruning.recalibrate import recalibrate_bn
from fxgndi.pruning.repair import Repair, repair_model
from fxgndi.core.report import format_table, pyplot, save_figure
from fxgndi.app.zoo import digits_model
from fxgndi.pruning.finetune import FINETUNE_LR, evaluate, fine_tune


class Criterion(NamedTuple):
    """How one line of the table prunes: an importance name, G-NDI's baseline, compensation."""

    importance: str
    baseline: str | None = None
    compensate: bool = False

    @property
    def causal(self) -> bool:
        return self.importance in ("gndi", "ablation")


TP_BUILTINS = ("l1", "l2", "weight_taylor", "hessian", "lamp", "bn", "fpgm", "random")
CRITERIA: dict[str, Criterion] = {
    "gndi-zero": Criterion("gndi", "zero"),
    "gndi-zero+comp": Criterion("gndi", "zero", True),
    "gndi-mean": Criterion("gndi", "channel-mean"),
    "gndi-mean+comp": Criterion("gndi", "channel-mean", True),
    "ablation-zero": Criterion("ablation", "zero"),
    **{name: Criterion(name) for name in TP_BUILTINS},
}
NOTES = """\
Notes on torch-pruning {version}'s built-ins, run as shipped (their own default normaliser unless
--normalizer is given) except where fxgndi.prune supplies the gradients they read:
- weight_taylor: |w * dL/dw| summed over the group; its BatchNorm branch tests for GroupNorm's
  pruning function, so BatchNorm layers give the group no score (only conv / linear weights count).
- hessian: torch-pruning's accumulate_grad keeps only the last sample's squared gradient (it keys
  its sums by parameter but tests membership by name); fxgndi.prune accumulates the per-sample
  squared gradients of all scoring samples itself, so this row is the intended OBD estimate.
- weight_taylor and hessian use the cross-entropy on the scoring samples; l1, l2, lamp, bn, fpgm use
  weights only; random is seeded (seed 0)."""


def build_model(args: argparse.Namespace) -> nn.Module:
    if args.model.startswith("digits-"):
        return digits_model(args.model[len("digits-"):], progress=False)
    return load_model(args.model, num_classes=num_classes(args.data),
                      checkpoint=args.checkpoint)


def make_scorer(name: str, criterion: Criterion, data: Any, args: argparse.Namespace) -> Any:
    """The importance, built once per criterion: G-NDI's scores of the dense model are then
    computed once and reused at every MAC point (GNDIImportance caches them)."""
    options: dict[str, Any] = {}
    if args.normalizer is not None and name != "lamp":  # LAMP is its own normaliser
        options["normalizer"] = args.normalizer
    if criterion.importance == "ablation":  # one forward per channel and sample: fewer
        data = load_data(args.data, split="train", limit=min(args.samples, args.ablation_samples),
                         batch_size=64, shuffle=False, image_size=args.image_size)
    if criterion.causal:
        cls = GNDIImportance if criterion.importance == "gndi" else AblationImportance
        return cls(data, baseline=criterion.baseline, **options)
    return make_importance(criterion.importance, **options)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model = build_model(args).eval()
    score_data = load_data(args.data, split="train", limit=args.samples, batch_size=64,
                           shuffle=False, image_size=args.image_size)
    test = load_data(args.data, split="test", batch_size=256, limit=args.test_limit,
                     image_size=args.image_size)
    dense = evaluate(model, test)
    timing = Latency(batch_size=args.latency_batch, threads=1, repeat=7)
    example = next(iter(score_data))[0][:1]
    rows: list[dict[str, Any]] = []
    for name in args.criteria:
        criterion = CRITERIA[name]
        scorer = make_scorer(name, criterion, score_data, args)
        for factor in args.points:
            start = time.perf_counter()
            scored = getattr(scorer, "seconds", float("nan"))
            target = "macs" if args.target == "macs" else Latency(
                batch_size=args.latency_batch, threads=1)
            r = prune(model, score_data, sparsity=1 - 1 / factor, target=target,
                      importance=scorer,
                      repair={"compensate": criterion.compensate, "reconstruct": False,
                              "recalibrate_bn": False},
                      global_pruning=args.global_pruning, round_to=args.round_to,
                      allocate=Latency(batch_size=args.latency_batch, threads=1)
                      if args.allocate == "time" else "uniform")
            seconds = time.perf_counter() - start
            row = {"criterion": name, "reduction": factor,
                   "macs_kept": r.macs_after / r.macs_before,
                   "params_kept": r.params_after / r.params_before,
                   "channel_ratio": r.pruning_ratio, "seconds": seconds,
                   "round_to": r.settings["round_to"], "rounded": len(r.settings["rounded"]),
                   "speedup": 1 / r.settings["latency"]["ratio"] if "latency" in r.settings
                   else 1 / timing.ratio(r.model, model, example) if args.time
                   else float("nan"),
                   "score_seconds": getattr(scorer, "seconds", float("nan")) - scored,
                   "acc": evaluate(r.model, test)["accuracy"]}
            recalibrated = copy.deepcopy(r.model)
            recalibrate_bn(recalibrated, score_data)
            row["acc_recal"] = evaluate(recalibrated, test)["accuracy"]
            repaired = copy.deepcopy(r.model)
            ran = repair_model(repaired, score_data, Repair(), dense=model, kept_outputs=r.kept)
            row["repair_seconds"] = sum(ran["seconds"].values())
            row["acc_repair"] = evaluate(repaired, test)["accuracy"]
            row["acc_ft"] = float("nan")
            if args.finetune_epochs:
                # a fresh loader each time: every criterion fine-tunes on the same batch order
                train = load_data(args.data, split="train", batch_size=64, seed=0,
                                  limit=args.train_limit, image_size=args.image_size)
                fine_tune(repaired, train, epochs=args.finetune_epochs, lr=args.lr,
                          progress=False)
                row["acc_ft"] = evaluate(repaired, test)["accuracy"]
            rows.append(row)
            if not args.quiet:
                print(f"{name:16s} {factor:g}x: acc {row['acc']:.3f} BN-recal "
                      f"{row['acc_recal']:.3f} repair {row['acc_repair']:.3f} FT "
                      f"{row['acc_ft']:.3f} (prune {seconds:.0f} s, repair "
                      f"{row['repair_seconds']:.0f} s)", flush=True)
    return rows, dense


def verdict(rows: list[dict[str, Any]], key: str, gndi: str = "gndi-zero") -> list[tuple]:
    """Per point: the G-NDI criterion's accuracy against the best torch-pruning built-in's."""
    out = []
    for factor in sorted({r["reduction"] for r in rows}):
        at = {r["criterion"]: r.get(key, float("nan")) for r in rows if r["reduction"] == factor}
        builtins = {n: a for n, a in at.items() if n in TP_BUILTINS}
        if gndi not in at or not builtins:
            continue
        best = max(builtins, key=builtins.get)
        out.append((f"{factor:g}x", at[gndi], best, builtins[best],
                    "yes" if at[gndi] >= builtins[best] else "NO"))
    return out


def by_point(rows: list[dict[str, Any]], key: str) -> tuple[list[list[Any]], list[str]]:
    """One row per criterion, one column per MAC point: the accuracy ``key``."""
    factors = sorted({r["reduction"] for r in rows})
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    at = {(r["criterion"], r["reduction"]): r.get(key, float("nan")) for r in rows}
    return ([[n] + [at.get((n, f), float("nan")) for f in factors] for n in names],
            ["criterion"] + [f"{f:g}x" for f in factors])


def plot(rows: list[dict[str, Any]], dense: float, path: str, title: str) -> None:
    plt = pyplot()
    panels = [("acc", "as pruned"), ("acc_recal", "BN recalibrated"),
              ("acc_repair", "repaired (fxgndi default)"), ("acc_ft", "repaired + fine-tuned")]
    panels = [p for p in panels if any(r.get(p[0], float("nan")) == r.get(p[0], float("nan"))
                                       for r in rows)]  # drop all-NaN
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), sharey=True,
                             squeeze=False)
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    for ax, (key, label) in zip(axes[0], panels):
        for name in names:
            pts = sorted((r["reduction"], r[key]) for r in rows if r["criterion"] == name)
            style = "-" if CRITERIA[name].causal else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name,
                    color=colors[name], linewidth=2.2 if CRITERIA[name].causal else 1.2)
        ax.axhline(dense, color="black", linewidth=0.8, linestyle=":", label="dense")
        ax.set_title(label)
        factors = sorted({r["reduction"] for r in rows})
        ax.set_xticks(factors, [f"{f:g}x" for f in factors])
        ax.set_xlabel("MAC reduction")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy")
    fig.subplots_adjust(right=0.88)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center left",
               bbox_to_anchor=(0.89, 0.5))
    fig.suptitle(title)
    save_figure(fig, path)


def report(rows: list[dict[str, Any]], dense: dict[str, Any], s: dict[str, Any],
           plot_path: str) -> None:
    """Print the table, the verdicts and the notes; draw the figure when ``plot_path``."""
    scope = "global" if s["global_pruning"] else "local (per-group ratio)"
    head = (f"{s['model']} on {s['data']}: dense top-1 {dense['accuracy']:.3f} (test n="
            f"{dense['n']}); {scope} ranking, normaliser {s['normalizer'] or 'each its own'}; "
            f"scoring / BN recalibration: {s['samples']} train samples (ablation-zero's scores: "
            f"the first {min(s['samples'], s['ablation_samples'])}); fine-tuning: "
            f"{s['finetune_epochs']} epoch(s) at lr {s['lr']:g}; round_to "
            f"{s.get('round_to', None)}")
    print(head)
    target = s.get("target", "macs")
    print(format_table([(r["criterion"], f"{r['reduction']:g}x", r["macs_kept"],
                         r.get("speedup", float("nan")), r["acc"],
                         r["acc_recal"], r.get("acc_repair"), r["acc_ft"],
                         r.get("rounded"), r.get("score_seconds"), r.get("repair_seconds"),
                         r["seconds"]) for r in rows],
                       ["criterion", f"{'MAC' if target == 'macs' else 'latency'} red.",
                        "MACs kept", "speed-up", "acc", "acc BN-recal",
                        "acc repair", "acc FT", "rounded", "score s", "repair s", "prune s"],
                       floatfmt=".3f"))
    for key, label in (("acc_repair", "repaired (fxgndi.prune's default)"),
                       ("acc_recal", "BN-recal only")):
        print(f"\ntop-1 by MAC reduction, {label}:")
        print(format_table(*by_point(rows, key), floatfmt=".3f"))
    for key, label in (("acc", "as pruned"), ("acc_recal", "BN-recal"),
                       ("acc_repair", "repaired (default)"), ("acc_ft", "repaired + FT")):
        table = verdict(rows, key)
        if table:
            print(f"\ngndi-zero against the best torch-pruning built-in, {label}:")
            print(format_table(table, ["point", "gndi-zero", "best built-in", "its acc",
                                       "gndi >= best"], floatfmt=".3f"))
    if any(r["criterion"] in TP_BUILTINS for r in rows):
        from importlib.metadata import version  # torch_pruning.__version__ lags its releases
        print("\n" + NOTES.format(version=version("torch-pruning")))
    if plot_path:
        plot(rows, dense["accuracy"], plot_path, head.split(";")[0])
        print(f"\nfigure: {plot_path}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", help="data spec (fxgndi.app.data.load_data)")
    parser.add_argument("--model", default="digits-resnet18",
                        help="digits-resnet18, digits-mobilenet_v2, or a torchvision name with "
                             "--checkpoint")
    parser.add_argument("--checkpoint", default=None, help="state dict for --model")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument("--points", nargs="+", type=float, default=[1.5, 2.0, 3.0, 4.0],
                        help="MAC reduction factors (2 = half the MACs)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=FINETUNE_LR, help="fine-tuning peak lr")
    parser.add_argument("--samples", type=int, default=256,
                        help="train samples for scoring, compensation and BN recalibration")
    parser.add_argument("--ablation-samples", type=int, default=64,
                        help="train samples for ablation-zero's scores (the first of --samples)")
    parser.add_argument("--train-limit", type=int, default=None, help="fine-tune on fewer")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on fewer")
    parser.add_argument("--global", dest="global_pruning", action="store_true")
    parser.add_argument("--target", default="macs", choices=["macs", "latency"],
                        help="what the points reduce: MACs (default) or eager latency")
    parser.add_argument("--latency-batch", type=int, default=32,
                        help="the batch --target latency times on (one thread)")
    parser.add_argument("--allocate", default="uniform", choices=["uniform", "time"],
                        help="how a MAC target is spread over the groups: uniform (default "
                             "here: the criteria's tables were measured so) or time (prune's "
                             "default, timed at --latency-batch)")
    parser.add_argument("--time", action="store_true",
                        help="also time every pruned model against the dense one (speed-up "
                             "at --latency-batch, eager, one thread)")
    parser.add_argument("--round-to", type=_round_to, default="auto", metavar="auto|none|N",
                        help="prune's round_to (default auto; none: no rounding)")
    parser.add_argument("--normalizer", default=None,
                        help="one torch-pruning normaliser for every criterion (but LAMP); "
                             "default: each criterion's own")
    parser.add_argument("--plot", default="docs/pruning.png", help="'' for no figure")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                        help="run nothing: report the rows of earlier --json files together")
    args = parser.parse_args(argv)
    if any(f <= 1 for f in args.points):
        parser.error("--points are MAC reduction factors, each > 1 (2 = half the MACs)")

    if args.from_json:  # report saved runs together (e.g. criteria run in parallel)
        saved = [json.loads(Path(path).read_text()) for path in args.from_json]
        settings, dense = saved[0]["settings"], saved[0]["dense"]
        rows = [row for run_ in saved for row in run_["rows"]]
    else:
        torch.manual_seed(0)
        rows, dense = run(args)
        settings = vars(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"settings": settings, "dense": dense, "rows": rows}, f, indent=2)
    report(rows, dense, settings, args.plot)
    return rows


def _round_to(text: str) -> str | int | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--round-to takes auto, none or an integer >= 1, "
                                         f"not {text!r}")
    return int(text)


if __name__ == "__main__":
    main()
