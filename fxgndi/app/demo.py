"""`fxgndi demo`: the whole idea end to end on the built-in digits ResNet-18.

Trains (or loads from the cache) a torchvision ResNet-18 on scikit-learn's digits, scores every
conv and linear layer with first-order and path-integrated G-NDI, runs the exact ablations of
the same interventions, prints how well each estimate ranks the layers and what it cost, then
prunes the model by depth (whole residual blocks) and by width (channels) at the same MACs,
repairs and fine-tunes the pruned models, exports them and times them.

Data roles: the layer and channel studies measure the trained model on the held-out test split
(nothing is trained there); the pruning scores, recalibrates and fine-tunes on the train split
and reports accuracy on the test split.

Everything it makes stays in one output folder (``--out``, default ``demo-out``): the pruned
models (``.pt2``), figures, ``demo.txt`` (all it printed) and ``demo.md``, the tables whose
numbers do not depend on the machine's speed, as named blocks
(``<!-- demo:NAME -->`` ... ``<!-- /demo:NAME -->``). ``make demo`` copies ``demo.md`` to
``docs/demo.md`` and quotes its blocks in the README (``scripts/quote_demo.py``).
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from scipy import stats

from fxgndi.app.data import load_data
from fxgndi.app.zoo import digits_resnet18
from fxgndi.core.cost import forward_seconds
from fxgndi.core.files import atomic_path
from fxgndi.core.report import format_table
from fxgndi.deploy.bench import bench
from fxgndi.deploy.export import export
from fxgndi.gndi.estimate import ablate, score
from fxgndi.gndi.scores import Scores
from fxgndi.gndi.validate import ValidityReport, validate
from fxgndi.pruning.depth import prune_depth
from fxgndi.pruning.finetune import FINETUNE_LR, evaluate, fine_tune
from fxgndi.pruning.recalibrate import recalibrate_bn
from fxgndi.pruning.repair import Repair, repair_model
from fxgndi.pruning.width import prune

SITES = ["conv", "linear"]
DEMO_OUT = "demo-out"
# The blocks of demo.md, in order (the README quotes some of them).
BLOCKS = ("layer", "layer-values", "channel", "channel-mean", "channel-zero", "pruning")


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


def format_layer_values(study: dict[str, Any]) -> str:
    """The per-layer table of a :func:`layer_study`: every estimate and both truths."""
    est, truths = study["estimates"], study["truths"]
    names = truths["logit_l2"].names
    columns = {**est, "exact logit L2": truths["logit_l2"],
               "exact accuracy drop": truths["accuracy"]}
    return format_table([(n, *[c.values[i] for c in columns.values()])
                         for i, n in enumerate(names)], ["site", *columns])


def format_agreement(study: dict[str, Any], *, cost: bool = True) -> str:
    """Rank agreement of each method of a :func:`layer_study` with both truths; ``cost`` adds
    the seconds and forward-pass equivalents (machine-dependent, so not in demo.md)."""
    headers = ["method", "Spearman vs logit L2", "Spearman vs acc. drop",
               "Kendall vs acc. drop"] + (["seconds", "forward passes"] if cost else [])
    rows = [(r["method"], r["spearman_logit_l2"], r["spearman_accuracy"], r["kendall_accuracy"],
             *((r["seconds"], r["forward_equivalents"]) if cost else ()))
            for r in study["rows"]]
    return format_table(rows, headers, floatfmt=".3f")


def cost_note(study: dict[str, Any]) -> str:
    """What each layer-level method computes, counted in passes."""
    n, m = len(study["truths"]["logit_l2"].names), study["steps"]
    return (f"Cost: first order = 10 VJPs per batch for all {n} sites at once; path m={m} = "
            f"{n} sites x {m} steps = {n * m} JVPs; exact ablation = {n} forwards. At layer "
            "level exact ablation is cheap: G-NDI's value there is speed, and its accuracy "
            "is what the rows above measure.")


def format_study(study: dict[str, Any]) -> str:
    """The two layer tables as the demo prints them: per-layer values, then agreement and
    cost per method."""
    return f"{format_layer_values(study)}\n\n{format_agreement(study)}\n\n{cost_note(study)}"


def format_validity(report: ValidityReport) -> str:
    """A channel-level validity report without its cost columns (machine-dependent)."""
    rows = [(r.importance, r.pearson, r.spearman,
             f"[{r.spearman_ci[0]:.3f}, {r.spearman_ci[1]:.3f}]", r.kendall,
             f"{r.within_layer_spearman:.3f} ({r.within_layer_groups})")
            for r in report.results]
    return format_table(rows, ["importance", "Pearson", "Spearman", "95% CI", "Kendall",
                               "within-layer Spearman (layers)"], floatfmt=".3f")


def channel_summary(reports: dict[str, ValidityReport]) -> str:
    """One row per baseline: G-NDI's Spearman with its 95% CI, G-NDI with the loss readout,
    the best classic criterion, magnitude L1 and random.

    Example:
        >>> print(channel_summary({"zero": report}))  # doctest: +SKIP
    """
    rows = []
    for baseline, report in reports.items():
        by = {r.importance: r for r in report.results}
        others = [r for r in report.results
                  if not r.importance.startswith("gndi") and r.importance != "random"]
        best = max(others, key=lambda r: r.spearman)
        g = by["gndi"]
        rows.append((baseline, f"{g.spearman:.3f} [{g.spearman_ci[0]:.3f}, "
                               f"{g.spearman_ci[1]:.3f}]",
                     by["gndi_loss"].spearman if "gndi_loss" in by else float("nan"),
                     f"{best.importance} {best.spearman:.3f}",
                     by["magnitude_l1"].spearman if "magnitude_l1" in by else float("nan"),
                     by["random"].spearman if "random" in by else float("nan")))
    return format_table(rows, ["baseline", "G-NDI Spearman [95% CI]", "G-NDI (loss readout)",
                               "best other criterion", "magnitude L1", "random"],
                        floatfmt=".3f")


def pruning_study(model, scoring, test, *, train: Callable[[], Any] | None = None,
                  n_blocks: int = 2, finetune_epochs: int = 1, progress: bool = True
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Depth pruning (``n_blocks`` G-NDI blocks) beside width pruning (G-NDI and L1 channels)
    at the MAC reduction depth pruning reached, scored on ``scoring``. Test accuracy as pruned
    (``repair=False``); with BatchNorm statistics re-estimated on ``scoring``; with fxgndi's
    default repair on ``scoring`` (least-squares refits of the layers that lost inputs, then
    BatchNorm recalibration: what ``fxgndi.prune`` returns); and, with ``train``, after
    ``finetune_epochs`` of :func:`fxgndi.pruning.finetune.fine_tune` from the repaired model on
    a fresh ``train()`` (every row sees the same batch order). Returns the rows and the final
    models by label (fine-tuned when ``train`` is given, else repaired).

    Example:
        >>> rows, models = pruning_study(model, train_subset, test_loader)  # doctest: +SKIP
    """
    depth = prune_depth(model, scoring, n_blocks=n_blocks, repair=False, progress=progress)
    results = {f"depth: {n_blocks} blocks by G-NDI path m=4 ({', '.join(depth.removed)})":
               depth}
    for importance in ("gndi", "l1"):
        results[f"width: {importance} channels"] = prune(
            model, scoring, target="macs", sparsity=depth.macs_reduction,
            importance=importance, repair=False, progress=progress)
    rows, final = [], {}
    for label, r in results.items():
        recalibrated = copy.deepcopy(r.model)
        recalibrate_bn(recalibrated, scoring)
        repaired = copy.deepcopy(r.model)
        repair_model(repaired, scoring, Repair(), dense=model,
                     kept_outputs=getattr(r, "kept", None))
        row = {"method": label, "macs_removed": r.macs_reduction,
               "params_removed": r.params_reduction,
               "test_accuracy": evaluate(r.model, test)["accuracy"],
               "test_accuracy_bn_recalibrated": evaluate(recalibrated, test)["accuracy"],
               "test_accuracy_repaired": evaluate(repaired, test)["accuracy"]}
        final[label] = repaired
        if train is not None:
            final[label] = fine_tune(copy.deepcopy(repaired), train(), epochs=finetune_epochs,
                                     recalibrate=False, progress=progress)
            row["test_accuracy_finetuned"] = evaluate(final[label], test)["accuracy"]
        rows.append(row)
    return rows, final


def format_pruning(rows: list[dict[str, Any]], finetune_epochs: int = 1) -> str:
    """The pruning table of :func:`pruning_study`."""
    headers = ["method", "MACs removed", "params removed", "as pruned", "BN-recal",
               "repaired (default)"]
    if rows and "test_accuracy_finetuned" in rows[0]:
        headers.append(f"fine-tuned {finetune_epochs} epoch")
    return format_table([tuple(r.values()) for r in rows], headers, floatfmt=".3f")


def speed_study(model, pruned: dict[str, Any], example, folder: str | Path, *,
                repeat: int = 10) -> tuple[list[dict[str, Any]], Any]:
    """Export each pruned model to ``folder/<name>.pt2`` (loaded back and checked against
    eager), then time the dense model, the pruned ones and their exports at batch 1 and 32 on
    one thread. ``pruned`` maps a label to ``(file name, model)``. Returns the export records
    and the :class:`fxgndi.deploy.bench.BenchReport`.

    Example:
        >>> exports, report = speed_study(model, {"depth": ("depth", m)}, x[:2], "out")
        ... # doctest: +SKIP
    """
    runs: dict[str, Any] = {"dense": model}
    exports = []
    for label, (name, m) in pruned.items():
        result = export(m, Path(folder) / f"{name}.pt2", example_inputs=example)
        exports.append({"model": label, **result.to_dict()})
        runs[label] = m
        runs[f"{label.split(':')[0]} .pt2"] = result.path
    report = bench(runs, input_shape=tuple(example.shape[1:]), batch_sizes=(1, 32),
                   threads=1, repeat=repeat)
    return exports, report


# Channel validity in the demo: fewer channels and samples than benchmarks/validity.py, and
# no GraSP (a Hessian-vector product per batch), to stay within a few minutes on 2 cores.
DEMO_CHANNEL_IMPORTANCES = ("gndi", "gndi_loss", "magnitude_l1", "snip", "synflow", "hrank",
                            "activation_taylor", "random")


def provenance() -> str:
    """The software the numbers came from, for demo.md's blocks.

    Example:
        >>> provenance().startswith("`make demo` with torch ")
        True
    """
    from importlib.metadata import version  # torch_pruning.__version__ lags its releases

    import torch
    import torchvision
    return (f"`make demo` with torch {torch.__version__}, torchvision {torchvision.__version__}"
            f", torch-pruning {version('torch-pruning')}, on the CPU")


def block(name: str, text: str) -> str:
    """``text`` between demo.md's markers for block ``name``.

    Example:
        >>> print(block("layer", "| a |"))
        <!-- demo:layer -->
        | a |
        <!-- /demo:layer -->
    """
    return f"<!-- demo:{name} -->\n{text.strip()}\n<!-- /demo:{name} -->"


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def run_demo(*, out: str | Path = DEMO_OUT, progress: bool = True,
             print_fn: Callable[[str], None] = print, n_channels: int = 150,
             channel_samples: int = 150, finetune_epochs: int = 1) -> dict:
    """Run the demo, print its tables and keep what it made in ``out`` (created if needed):
    the pruned models, figures, ``demo.txt`` (what it printed) and ``demo.md`` (the
    machine-independent tables as named blocks). Returns the numbers as a dict.

    Example:
        >>> results = run_demo(out="demo-out", progress=False)  # doctest: +SKIP
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    printed: list[str] = []
    recorded: dict[str, str] = {}
    figures = _has_matplotlib()

    def say(text: str) -> None:
        print_fn(text)
        printed.append(text)

    model = digits_resnet18(progress=progress)
    test = load_data("digits", split="test", batch_size=150)
    quality = evaluate(model, test)
    n_test = len(test.dataset)
    say(f"fxgndi demo: torchvision ResNet-18 trained on scikit-learn's digits "
        f"(held-out accuracy {quality['accuracy']:.1%} on {n_test} test images); output "
        f"folder {folder}\n")

    study = layer_study(model, test, progress=progress)
    n_sites = len(study["truths"]["logit_l2"].names)
    say(f"1. Layer level: every conv and linear layer, zero baseline, {n_test} held-out images")
    say(format_study(study))
    recorded["layer"] = (
        f"torchvision ResNet-18 trained on scikit-learn's digits: {quality['accuracy']:.1%} "
        f"accuracy on the {n_test} held-out test images. Every conv and linear layer "
        f"({n_sites} sites), zero baseline; truth = the exact ablation of the same "
        f"intervention on the same {n_test} images. Numbers from {provenance()}.\n\n"
        f"{format_agreement(study, cost=False)}\n\n{cost_note(study)}")
    recorded["layer-values"] = (f"Per layer (same run): the estimates and the exact effects."
                                f"\n\n{format_layer_values(study)}")
    if figures:
        study["estimates"]["G-NDI first order (logits)"].plot(folder / "layer_gndi.png")

    subset = load_data("digits", split="test", batch_size=channel_samples, limit=channel_samples)
    channel, reports = {}, {}
    for baseline in ("channel-mean", "zero"):
        report = validate(model, subset, importances=DEMO_CHANNEL_IMPORTANCES, truth="logit_l2",
                          granularity="channel", sites="conv", baseline=baseline,
                          n_channels=n_channels, n_boot=2000, progress=progress)
        say(f"\n2. Channel level, baseline {baseline}: {n_channels} random conv output "
            f"channels of the {len(subset.dataset)} first held-out images, truth = exact mean "
            "L2 change of the logits")
        say(report.table())
        channel[baseline] = [asdict(r) for r in report.results]
        reports[baseline] = report
        recorded[f"channel-{baseline.split('-')[-1]}"] = (
            f"Baseline {baseline}: {n_channels} random conv output channels, "
            f"{len(subset.dataset)} held-out images, truth = exact mean L2 change of the logits "
            f"under the same intervention ({provenance()}).\n\n{format_validity(report)}")
        if figures:
            report.plot(folder / f"validity_{baseline}.png")
    summary = channel_summary(reports)
    say(f"\nChannel level, summary\n{summary}")
    recorded["channel"] = (
        f"{n_channels} random conv output channels, the first {len(subset.dataset)} held-out "
        "test images, truth = exact mean L2 change of the logits under the same intervention; "
        f"Spearman (G-NDI with its 95% bootstrap CI). Numbers from {provenance()}.\n\n{summary}")

    scoring = load_data("digits", split="train", limit=256, batch_size=64, shuffle=False)

    def train():  # the same shuffled batch order for every row
        return load_data("digits", split="train", batch_size=64, seed=0)

    pruning, pruned = pruning_study(model, scoring, test, train=train,
                                    finetune_epochs=finetune_epochs, progress=progress)
    roles = (f"scored on {len(scoring.dataset)} train images; BN-recal: BatchNorm statistics "
             "re-estimated on them; repaired: fxgndi's default repair on them (least-squares "
             "refits of the layers that lost inputs, then BatchNorm recalibration: what "
             "fxgndi.prune returns); fine-tuned: the repaired model after fxgndi's default "
             f"fine-tuning, {finetune_epochs} epoch on all {len(train().dataset)} train images "
             f"at peak lr {FINETUNE_LR:g}; accuracy on the {n_test} held-out test images, "
             "which no step reads")
    say(f"\n3. Pruning at equal MACs ({roles})")
    say(format_pruning(pruning, finetune_epochs))
    recorded["pruning"] = (f"Depth and width pruning of the digits ResNet-18 at equal MACs: "
                           f"{roles}. Numbers from {provenance()}.\n\n"
                           f"{format_pruning(pruning, finetune_epochs)}")

    names = {label: ("depth" if label.startswith("depth") else
                     "width-" + label.split()[1]) for label in pruned}
    chosen = {label: (names[label], m) for label, m in pruned.items()
              if not label.startswith("width: l1")}
    exports, speed = speed_study(model, chosen, scoring.dataset[0][0][None].repeat(2, 1, 1, 1),
                                 folder)
    say("\n4. Export to .pt2 (torch.export, loaded back, largest difference from eager) "
        "and speed on one CPU thread")
    say(format_table([(e["model"], e["format"], e["max_abs_diff"], e["bytes"] / 2**20)
                      for e in exports], ["model", "format", "max |diff|", "MB"],
                     floatfmt=".3g"))
    say(speed.table())
    if figures:
        speed.plot(folder / "speed.png")

    _write(folder / "demo.md", _record(recorded))
    made = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    made = sorted({*made, "demo.txt"})
    say(f"\nKept in {folder}/: {', '.join(made)}"
        + ("" if figures else " (no figures: pip install 'fxgndi[figures]')"))
    _write(folder / "demo.txt", "\n".join(printed) + "\n")
    return {"accuracy": quality["accuracy"], "layer": study["rows"], "channel": channel,
            "pruning": pruning, "export": exports, "out": str(folder)}


def _record(blocks: dict[str, str]) -> str:
    """demo.md: a header, then the blocks in :data:`BLOCKS` order."""
    header = ("<!-- Written by `fxgndi demo` (make demo copies it to docs/demo.md and quotes "
              "its blocks in README.md): do not edit by hand, re-run `make demo`. -->\n"
              "# fxgndi demo: the numbers\n")
    body = "\n\n".join(block(name, blocks[name]) for name in BLOCKS if name in blocks)
    return f"{header}\n{body}\n"


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
