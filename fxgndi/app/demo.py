"""`fxgndi demo`: the whole idea end to end on the built-in digits ResNet-18.

Trains (or loads from the cache) a torchvision ResNet-18 on scikit-learn's digits, scores every
conv and linear layer with first-order and path-integrated G-NDI, runs the exact ablations of
the same interventions, prints how well each estimate ranks the layers and what it cost, then
prunes the model by depth (whole residual blocks) and by width (channels) at the same MACs,
exports the pruned models and times them.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import asdict
from typing import Any, Callable

from scipy import stats

from fxgndi.app.data import load_data
from fxgndi.app.zoo import digits_resnet18
from fxgndi.core.cost import forward_seconds
from fxgndi.core.report import format_table
from fxgndi.deploy.bench import bench
from fxgndi.deploy.export import export
from fxgndi.gndi.estimate import ablate, score
from fxgndi.gndi.scores import Scores
from fxgndi.gndi.validate import validate
from fxgndi.pruning.depth import prune_depth
from fxgndi.pruning.finetune import evaluate
from fxgndi.pruning.recalibrate import recalibrate_bn
from fxgndi.pruning.width import prune

SITES = ["conv", "linear"]


def layer_study(model, data, *, sites=SITES, baseline: str = "zero", steps: int = 4,
                progress: bool = True) -> dict[str, Any]:
    """Layer-level G-NDI estimates beside exact ablations, with rank agreement and cost.

    Returns a dict with ``estimates`` and ``truths`` (name -> Scores), ``forward_seconds``
    and ``rows`` (one per estimate: Spearman/Kendall against each truth, seconds, forward
    equivalents). Used by the demo; works on any classifier and labelled data.

    Example:
        >>> study = layer_study(model, loader, progress=False)  # doctest: +SKIP
        >>> print(format_study(study))  # doctest: +SKIP
    """
    kw = dict(sites=sites, baseline=baseline, progress=progress)
    estimates: dict[str, Scores] = {
        "G-NDI first order (logits)": score(model, data, **kw),
        f"G-NDI path m={steps} (logits)": score(model, data, steps=steps, **kw),
    }
    truths = {metric: ablate(model, data, metric=metric, **kw)
              for metric in ("logit_l2", "accuracy")}
    unit = forward_seconds(model, data)
    rows = []
    for name, s in [*estimates.items(), ("exact ablation (logit_l2)", truths["logit_l2"])]:
        rows.append({
            "method": name,
            "spearman_logit_l2": _rank(stats.spearmanr, s, truths["logit_l2"]),
            "spearman_accuracy": _rank(stats.spearmanr, s, truths["accuracy"]),
            "kendall_accuracy": _rank(stats.kendalltau, s, truths["accuracy"]),
            "seconds": s.seconds,
            "forward_equivalents": s.seconds / unit,
        })
    return {"estimates": estimates, "truths": truths, "forward_seconds": unit, "rows": rows,
            "steps": steps}


def _rank(fn: Callable, a: Scores, b: Scores) -> float:
    return float(fn(a.values, b.values)[0])


def format_study(study: dict[str, Any]) -> str:
    """The two demo tables: per-layer values, then agreement and cost per method."""
    est, truths = study["estimates"], study["truths"]
    names = truths["logit_l2"].names
    columns = {**est, "exact logit L2": truths["logit_l2"],
               "exact accuracy drop": truths["accuracy"]}
    per_layer = format_table([(n, *[c.values[i] for c in columns.values()])
                              for i, n in enumerate(names)], ["site", *columns])
    agreement = format_table(
        [(r["method"], r["spearman_logit_l2"], r["spearman_accuracy"], r["kendall_accuracy"],
          r["seconds"], r["forward_equivalents"]) for r in study["rows"]],
        ["method", "Spearman vs logit L2", "Spearman vs acc. drop", "Kendall vs acc. drop",
         "seconds", "forward passes"], floatfmt=".3f")
    n, m = len(names), study["steps"]
    note = (f"Cost: first order = 10 VJPs per batch for all {n} sites at once; path m={m} = "
            f"{n} sites x {m} steps = {n * m} JVPs; exact ablation = {n} forwards. At layer "
            "level exact ablation is cheap: G-NDI's value there is speed, and its accuracy "
            "is what the rows above measure.")
    return f"{per_layer}\n\n{agreement}\n\n{note}"


def pruning_study(model, scoring, test, *, n_blocks: int = 2,
                  progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Depth pruning (``n_blocks`` G-NDI blocks) beside width pruning (G-NDI and L1 channels)
    at the MAC reduction depth pruning reached; test accuracy without fine-tuning, as pruned
    and with BatchNorm statistics re-estimated on ``scoring``. Returns the rows and the pruned
    models by label.

    Example:
        >>> rows, models = pruning_study(model, train_subset, test_loader)  # doctest: +SKIP
    """
    depth = prune_depth(model, scoring, n_blocks=n_blocks, progress=progress)
    results = {f"depth: {n_blocks} blocks by G-NDI path m=4 ({', '.join(depth.removed)})":
               depth}
    for importance in ("gndi", "l1"):
        results[f"width: {importance} channels"] = prune(
            model, scoring, target="macs", sparsity=depth.macs_reduction,
            importance=importance, progress=progress)
    rows = []
    for label, r in results.items():
        recalibrated = copy.deepcopy(r.model)
        recalibrate_bn(recalibrated, scoring)
        rows.append({"method": label, "macs_removed": r.macs_reduction,
                     "params_removed": r.params_reduction,
                     "test_accuracy": evaluate(r.model, test)["accuracy"],
                     "test_accuracy_bn_recalibrated": evaluate(recalibrated, test)["accuracy"]})
    return rows, {label: r.model for label, r in results.items()}


def speed_study(model, pruned: dict[str, Any], example, *, repeat: int = 10
                ) -> tuple[list[dict[str, Any]], str]:
    """Export each pruned model to ``.pt2`` (loaded back and checked against eager), then time
    the dense model, the pruned ones and their exports at batch 1 and 32 on one thread.

    Example:
        >>> exports, table = speed_study(model, {"depth": m}, x[:2])  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory() as folder:
        runs: dict[str, Any] = {"dense": model}
        exports = []
        for i, (label, m) in enumerate(pruned.items()):
            result = export(m, os.path.join(folder, f"pruned{i}.pt2"), example_inputs=example)
            exports.append({"model": label, **result.to_dict()})
            runs[label] = m
            runs[f"{label.split(':')[0]} .pt2"] = result.path
        report = bench(runs, input_shape=tuple(example.shape[1:]), batch_sizes=(1, 32),
                       threads=1, repeat=repeat)
        return exports, report.table()


# Channel validity in the demo: fewer channels and samples than benchmarks/validity.py, and
# no GraSP (a Hessian-vector product per batch), to stay within a few minutes on 2 cores.
DEMO_CHANNEL_IMPORTANCES = ("gndi", "gndi_loss", "magnitude_l1", "snip", "synflow", "hrank",
                            "activation_taylor", "random")


def run_demo(*, progress: bool = True, print_fn: Callable[[str], None] = print,
             n_channels: int = 150, channel_samples: int = 150) -> dict:
    """Run the demo and print its tables; returns the numbers as a dict.

    Example:
        >>> results = run_demo(progress=False)  # doctest: +SKIP
    """
    model = digits_resnet18(progress=progress)
    test = load_data("digits", split="test", batch_size=150)
    quality = evaluate(model, test)
    print_fn(f"fxgndi demo: torchvision ResNet-18 trained on scikit-learn's digits "
             f"(held-out accuracy {quality['accuracy']:.1%} on {len(test.dataset)} images)\n")
    study = layer_study(model, test, progress=progress)
    print_fn(f"1. Layer level: every conv and linear layer, zero baseline, "
             f"{len(test.dataset)} held-out images")
    print_fn(format_study(study))
    subset = load_data("digits", split="test", batch_size=channel_samples, limit=channel_samples)
    channel = {}
    for baseline in ("channel-mean", "zero"):
        report = validate(model, subset, importances=DEMO_CHANNEL_IMPORTANCES, truth="logit_l2",
                          granularity="channel", sites="conv", baseline=baseline,
                          n_channels=n_channels, n_boot=2000, progress=progress)
        print_fn(f"\n2. Channel level, baseline {baseline}: {n_channels} random conv output "
                 f"channels, truth = exact mean L2 change of the logits")
        print_fn(report.table())
        channel[baseline] = [asdict(r) for r in report.results]
    scoring = load_data("digits", split="train", limit=256, batch_size=64, shuffle=False)
    pruning, pruned = pruning_study(model, scoring, test, progress=progress)
    print_fn("\n3. Pruning at equal MACs, no fine-tuning (scored on 256 train images, "
             f"accuracy on the {len(test.dataset)} held-out images; BN-recal: BatchNorm "
             "statistics re-estimated on the 256 images)")
    print_fn(format_table([tuple(r.values()) for r in pruning],
                          ["method", "MACs removed", "params removed", "test accuracy",
                           "BN-recal"], floatfmt=".3f"))
    chosen = {k: v for k, v in pruned.items() if not k.startswith("width: l1")}
    exports, speed = speed_study(model, chosen, scoring.dataset[0][0][None].repeat(2, 1, 1, 1))
    print_fn("\n4. Export to .pt2 (torch.export, loaded back, largest difference from eager) "
             "and speed on one CPU thread")
    print_fn(format_table([(e["model"], e["format"], e["max_abs_diff"], e["bytes"] / 2**20)
                           for e in exports], ["model", "format", "max |diff|", "MB"],
                          floatfmt=".3g"))
    print_fn(speed)
    return {"accuracy": quality["accuracy"], "layer": study["rows"], "channel": channel,
            "pruning": pruning, "export": exports}
