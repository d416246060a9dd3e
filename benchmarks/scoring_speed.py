"""Scoring speed: fxgndi's reverse-mode G-NDI against the paper's one-JVP-per-unit loop.

For every model (torchvision, ``weights=None``, 10 classes, eval mode, fixed seed) and every
conv and linear site (zero baseline, logits readout, p = 2), one run measures:

1. fxgndi layer level: ``fxgndi.score(graph, [x], mode="reverse")`` on an
   InterventionGraph built once beforehand (the graph build is timed separately);
2. the paper's way: one ``torch.autograd.functional.jvp`` per site through a plain forward hook
   ``h + a * (b - h)`` on the original torchvision module (a per-sample alpha of shape [B],
   a0 = 0, v = 1), written without fxgndi;
3. one plain forward + backward with parameter gradients (the unit of cost);
4. fxgndi channel level (every channel of every site) against one hooked JVP per channel, timed
   on a seeded random sample of channels and extrapolated to all channels.

Times are medians of ``--repeat`` runs after one warm-up (methods interleaved inside each
repeat, so a load change on the machine hits all of them). It also checks that fxgndi agrees
with the hook-based JVPs to 1e-4 relative (``max |a - b| / max |b|``), prints PASS/FAIL and
exits non-zero on FAIL.

With ``--pruning-cost`` it measures instead what G-NDI pruning costs on wide heads: for every
model (1000 classes by default, BatchNorm statistics and affines randomised, seeded, or
``--batchnorm recalibrated``; the same ``--samples`` images and labels for every method, one
run), the wall time of one ``fxgndi.prune`` call (``target="channels"``, ``--sparsity``) per
importance: ``l1``,
``weight_taylor`` (torch-pruning's GroupTaylorImportance), ``gndi`` by name with its defaults
(``auto``: probes on a head wider than the default R), G-NDI with ``R`` probes for every
``--probes`` R, and exact G-NDI (one VJP per output); then the probe-vs-exact agreement on the
groups the pruner scored: the within-group Spearman of the probe scores against the exact ones
(mean, median, min over groups), and the exact importance of the channels the probe ranking
would remove at 50% per group over that of the channels the exact ranking removes (1 = the same
cost; > 1 = worse).

Example:
    python benchmarks/scoring_speed.py --models resnet50 --batch 8 --image-size 64
    python benchmarks/scoring_speed.py --pruning-cost --models resnet18 --image-size 112 \
        --samples 32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

import fxgndi
import fxgndi.core.names
from fxgndi.core import files
from fxgndi.core.report import format_table
from fxgndi.core.runtime import torch_threads

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16")
SITES = ["conv", "linear"]
NUM_CLASSES = 10
TOLERANCE = 1e-4
LAYER_TARGET = 15.0     # acceptance: layer-level speed-up over the per-site JVP loop
CHANNEL_TARGET = 1000.0  # acceptance: channel-level speed-up over one JVP per channel


# ----------------------------------------------------------------------------- models and data

def build_model(name: str, image_size: int, seed: int = 0,
                num_classes: int = NUM_CLASSES) -> nn.Module:
    """A torchvision model with random weights (seeded), ``num_classes`` outputs, in eval mode.

    torchvision's ViT zero-initialises its head, which would make every tangent 0: any Linear
    whose weight is all zeros is re-initialised (normal, std 0.01).

    Example:
        >>> m = build_model("resnet18", 64)
    """
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not bool(module.weight.detach().any()):
            nn.init.normal_(module.weight, std=0.01)
    return model.eval()


def make_input(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """A fixed random input batch [B, 3, S, S]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=gen)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """The math SDPA backend (double backward through CPU flash attention is not supported)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


# ------------------------------------------------------------------- the paper's way: hooks + JVP

def channel_dim_of(module: nn.Module, ndim: int) -> int:
    """Where a module's output keeps channels: dim 1 for conv, the last dim for linear."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    if isinstance(module, nn.Linear):
        return ndim - 1
    raise TypeError(f"no channel dim known for {type(module).__name__}")


def _alpha_view(alpha: torch.Tensor, h: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Broadcast alpha [B] (layer) or [B, C] (channel) over the activation h."""
    view = [1] * h.dim()
    view[0] = h.shape[0]
    if alpha.dim() == 2:
        view[channel_dim_of(module, h.dim())] = alpha.shape[1]
    return alpha.reshape(view)


def hooked_tangent(model: nn.Module, module: nn.Module, x: torch.Tensor,
                   tangent: torch.Tensor) -> torch.Tensor:
    """d model(x) / d alpha along ``tangent`` at alpha = 0, for ``h -> h + a * (0 - h)``.

    One ``torch.autograd.functional.jvp`` through a forward hook on ``module`` (the paper's
    way). ``tangent`` is [B] (layer) or [B, C] (channel); returns per-sample tangents [B, K].
    """
    def f(a: torch.Tensor) -> torch.Tensor:
        def hook(mod: nn.Module, args: Any, h: torch.Tensor) -> torch.Tensor:
            return h + _alpha_view(a, h, mod) * (torch.zeros_like(h) - h)

        handle = module.register_forward_hook(hook)
        try:
            return model(x)
        finally:
            handle.remove()

    a0 = torch.zeros_like(tangent)
    _, jvp = torch.autograd.functional.jvp(f, a0, tangent)
    return jvp


def gndi_value(tangents: torch.Tensor) -> float:
    """Per-sample L2 norm over the outputs, mean over the batch."""
    return float(torch.linalg.vector_norm(tangents.double(), dim=-1).mean())


def per_site_jvp_loop(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """The paper's layer-level G-NDI: one hooked JVP per site (alpha [B], v = 1)."""
    ones = torch.ones(x.shape[0])
    return {name: gndi_value(hooked_tangent(model, model.get_submodule(name), x, ones))
            for name in names}


def channel_jvp(model: nn.Module, x: torch.Tensor, name: str, channel: int,
                channels: int) -> float:
    """The paper's channel-level G-NDI of one channel: alpha [B, C], v one-hot at ``channel``."""
    v = torch.zeros(x.shape[0], channels)
    v[:, channel] = 1
    return gndi_value(hooked_tangent(model, model.get_submodule(name), x, v))


def plain_forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    """One forward plus backward with parameter gradients (the unit of cost)."""
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


# ---------------------------------------------------------------------------------- measuring

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def relative_error(ours: Sequence[float], reference: Sequence[float]) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a = torch.tensor(list(ours), dtype=torch.float64)
    b = torch.tensor(list(reference), dtype=torch.float64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def bench_model(name: str, *, batch: int, image_size: int, repeat: int, channel_sample: int,
                seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every method on one model; returns a dict of seconds, ratios and errors."""
    model = build_model(name, image_size, seed)
    x = make_input(batch, image_size, seed)

    build_layer_s, layer_graph = timed(lambda: fxgndi.intervene(
        model, SITES, granularity="layer", example_inputs=x))
    build_channel_s, channel_graph = timed(lambda: fxgndi.intervene(
        model, SITES, granularity="channel", example_inputs=x))
    sites = layer_graph.sites
    names = [s.name for s in sites]
    widths = {s.name: int(s.channels) for s in channel_graph.sites}
    total_channels = sum(widths.values())
    log(f"[{name}] {len(sites)} sites, {total_channels} channels; graph build "
        f"{build_layer_s:.2f} s (layer), {build_channel_s:.2f} s (channel)")

    def fx_layer() -> fxgndi.Scores:
        return fxgndi.score(layer_graph, [x], mode="reverse",
                            progress=False)

    def fx_channel() -> fxgndi.Scores:
        return fxgndi.score(channel_graph, [x], mode="reverse",
                            progress=False)

    def hooks_layer() -> dict[str, float]:
        with math_attention():
            return per_site_jvp_loop(model, x, names)

    def fwd_bwd() -> None:
        plain_forward_backward(model, x)

    # Warm-up: one call of each fxgndi method and of fwd+bwd; one hooked JVP at the first site
    # (its backward runs through the whole network, so every kernel is warm).
    fx_layer(), fx_channel(), fwd_bwd()
    with math_attention():
        hooked_tangent(model, model.get_submodule(names[0]), x, torch.ones(batch))

    times: dict[str, list[float]] = {"fx_layer": [], "hooks_layer": [], "fwd_bwd": [],
                                     "fx_channel": []}
    fx_layer_scores = fx_channel_scores = hook_values = None
    for r in range(repeat):
        t, fx_layer_scores = timed(fx_layer)
        times["fx_layer"].append(t)
        t, hook_values = timed(hooks_layer)
        times["hooks_layer"].append(t)
        t, _ = timed(fwd_bwd)
        times["fwd_bwd"].append(t)
        t, fx_channel_scores = timed(fx_channel)
        times["fx_channel"].append(t)
        log(f"[{name}] repeat {r + 1}/{repeat}: " + ", ".join(
            f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    model.zero_grad(set_to_none=True)

    # One hooked JVP per channel, on a seeded uniform sample of all (site, channel) units.
    units = [(s, c) for s in names for c in range(widths[s])]
    sample = random.Random(seed).sample(units, min(channel_sample, len(units)))
    channel_times: list[float] = []
    sampled_hooks: list[float] = []
    with math_attention():
        for site, c in sample:
            t, value = timed(lambda: channel_jvp(model, x, site, c, widths[site]))
            channel_times.append(t)
            sampled_hooks.append(value)
    per_channel_jvp_s = statistics.fmean(channel_times)
    per_channel_total_s = per_channel_jvp_s * total_channels

    by_site = fx_channel_scores.by_site()
    sampled_fx = [float(by_site[s][c]) for s, c in sample]
    layer_fx = [float(fx_layer_scores[n]) for n in names]
    layer_hooks = [hook_values[n] for n in names]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": name, "sites": len(names), "channels": total_channels,
        "batch": batch, "image_size": image_size, "repeat": repeat,
        "build_layer_s": build_layer_s, "build_channel_s": build_channel_s,
        "fx_layer_s": med["fx_layer"], "hooks_layer_s": med["hooks_layer"],
        "fwd_bwd_s": med["fwd_bwd"], "fx_channel_s": med["fx_channel"],
        "layer_speedup": med["hooks_layer"] / med["fx_layer"],
        "layer_cost_fwd_bwd": med["fx_layer"] / med["fwd_bwd"],
        "channel_sample": len(sample), "per_channel_jvp_s": per_channel_jvp_s,
        "per_channel_total_s": per_channel_total_s,
        "channel_speedup": per_channel_total_s / med["fx_channel"],
        "layer_rel_err": relative_error(layer_fx, layer_hooks),
        "channel_rel_err": relative_error(sampled_fx, sampled_hooks),
        "times": times, "channel_jvp_times": channel_times,
        "sampled_channels": [[s, c] for s, c in sample],
        "layer_values": {"fxgndi": dict(zip(names, layer_fx)),
                         "hooks": dict(zip(names, layer_hooks))},
    }
    result["pass"] = (result["layer_rel_err"] <= TOLERANCE
                      and result["channel_rel_err"] <= TOLERANCE)
    return result


# ------------------------------------------------------------------------------- pruning cost

PRUNING_CLASSES = 1000
PRUNING_METHODS = ("l1", "weight_taylor", "gndi", "gndi-probes", "gndi-exact")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Uniform random BatchNorm statistics and affines (as tests/helpers.py does): a model
    with weights=None has identical BatchNorms, whose channels differ only through the convs.

    Example:
        >>> m = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                for t, (lo, hi) in ((bn.running_mean, (-0.5, 0.5)), (bn.running_var, (0.5, 2)),
                                    (bn.weight, (0.5, 1.5)), (bn.bias, (-0.2, 0.2))):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model.eval()


class RecordedImportance(tp.importance.Importance):
    """Passes groups to ``inner`` and keeps what it returned, by root layer and channel count.

    Example:
        >>> rec = RecordedImportance(tp.importance.GroupMagnitudeImportance())
    """

    def __init__(self, inner: tp.importance.Importance) -> None:
        self.inner, self.scores = inner, {}

    def __call__(self, group: Any) -> torch.Tensor:
        out = self.inner(group)
        self.scores[(group[0].dep.target.name, len(group[0].idxs))] = out.detach().clone()
        return out


def pruning_batches(samples: int, batch: int, image_size: int, classes: int,
                    seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` fixed random images with random labels, in batches of ``batch``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, samples, batch):
        n = min(batch, samples - lo)
        out.append((torch.randn(n, 3, image_size, image_size, generator=gen),
                    torch.randint(0, classes, (n,), generator=gen)))
    return out


def agreement(exact: dict, probe: dict) -> dict[str, float]:
    """Within-group Spearman of probe against exact scores (groups of >= 3 channels), and the
    exact importance the probe ranking removes at 50% per group over the exact ranking's."""
    from scipy.stats import spearmanr

    rhos, regrets = [], []
    for key, a in exact.items():
        b = probe[key]
        if len(a) < 3:
            continue
        rhos.append(float(spearmanr(a.numpy(), b.numpy())[0]))
        half = len(a) // 2
        best = float(a.sort().values[:half].sum())
        regrets.append(float(a[b.argsort()[:half]].sum()) / best if best > 0 else 1.0)
    rho = torch.tensor(rhos, dtype=torch.float64)
    return {"groups": len(rhos), "spearman_mean": float(rho.mean()),
            "spearman_median": float(rho.median()), "spearman_min": float(rho.min()),
            "removed_exact_ratio": statistics.fmean(regrets)}


def pruning_cost_model(name: str, args: argparse.Namespace,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """One model: the wall time of ``fxgndi.prune`` per importance, on the same batches, and
    the probe-vs-exact agreement on the groups the pruner scored."""
    from fxgndi.gndi.tangents import choose_mode
    from fxgndi.pruning.architectures import plan_for
    from fxgndi.pruning.importance import GNDIImportance

    model = build_model(name, args.image_size, args.seed, args.num_classes)
    data = pruning_batches(args.samples, args.batch, args.image_size, args.num_classes,
                           args.seed)
    if args.batchnorm == "random":
        randomize_batchnorm(model, args.seed)
    else:  # the statistics of these batches, affines 1 and 0: channels alike by construction
        from fxgndi.pruning.recalibrate import recalibrate_bn
        recalibrate_bn(model, data)
    consumers = plan_for(model).consumers
    common = dict(sparsity=args.sparsity, max_memory=args.max_memory, seed=args.seed)

    def gndi(**kw: Any) -> RecordedImportance:
        return RecordedImportance(GNDIImportance(data, consumers=consumers,
                                                 max_memory=args.max_memory, seed=args.seed,
                                                 **kw))

    runs: list[tuple[str, Callable[[], Any]]] = []
    for method in args.methods:
        if method == "gndi-probes":
            runs += [(f"gndi probe R={r}", lambda r=r: gndi(mode="probe", probes=r))
                     for r in args.probes]
        elif method == "gndi-exact":
            runs.append(("gndi exact", lambda: gndi(mode="reverse")))
        else:
            runs.append((method, lambda m=method: m))
    # Untimed warm-up on two samples: the first torch.func transform and the first dependency
    # graph of a process pay one-off costs that would land on whichever method runs first.
    warm = [(data[0][0][:2], data[0][1][:2])]
    for importance in ("weight_taylor", "gndi"):
        fxgndi.prune(model, warm, importance=importance, sparsity=args.sparsity)
    rows, recorded = [], {}
    for label, make in runs:
        importance = make()
        seconds, result = timed(lambda: fxgndi.prune(model, data, importance=importance,
                                                     **common))
        options = result.settings["importance_options"]
        row = {"method": label, "seconds": seconds,
               "scoring_seconds": result.settings.get("scoring_seconds"),
               "mode": options.get("chosen_mode"), "probes": options.get("probes"),
               "macs_reduction": result.macs_reduction}
        if isinstance(importance, RecordedImportance):
            inner = importance.inner
            row.update(scoring_seconds=inner.seconds, mode=inner.chosen_mode,
                       probes=inner.probes if inner.chosen_mode == "probe" else None)
            recorded[label] = importance.scores
        rows.append(row)
        log(f"[{name}] {label}: {seconds:.2f} s (mode {row['mode']})")
    taylor = next((r["seconds"] for r in rows if r["method"] == "weight_taylor"), None)
    for r in rows:
        r["vs_weight_taylor"] = r["seconds"] / taylor if taylor else None
    agreements = []
    if "gndi exact" in recorded:
        exact = recorded["gndi exact"]
        spread = [float(a.std() / a.mean()) for a in exact.values() if len(a) > 2]
        for r in args.probes:
            if f"gndi probe R={r}" in recorded:
                agreements.append({"probes": r, "exact_cv": statistics.fmean(spread),
                                   **agreement(exact, recorded[f"gndi probe R={r}"])})
    default = choose_mode("auto", args.num_classes, fxgndi.core.names.DEFAULT_PROBES, 2)
    return {"model": name, "image_size": args.image_size, "samples": args.samples,
            "batch": args.batch, "classes": args.num_classes, "default_mode": default,
            "rows": rows, "agreement": agreements}


def pruning_cost_tables(results: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The cost rows and the agreement rows."""
    cost = [(r["model"], row["method"], row["mode"] or "", row["probes"] or "",
             row["seconds"], row["scoring_seconds"] if row["scoring_seconds"] else "",
             f"{row['vs_weight_taylor']:.2f}x" if row["vs_weight_taylor"] else "")
            for r in results for row in r["rows"]]
    agree = [(r["model"], a["probes"], a["groups"], a["spearman_mean"], a["spearman_median"],
              a["spearman_min"], a["removed_exact_ratio"], a["exact_cv"])
             for r in results for a in r["agreement"]]
    return (format_table(cost, ["model", "importance", "mode", "R", "prune s", "scoring s",
                                "vs weight_taylor"]),
            format_table(agree, ["model", "R", "groups", "Spearman mean", "median", "min",
                                 "removed exact (probe / exact)", "exact CV in group"]))


def run_pruning_cost(args: argparse.Namespace) -> int:
    """The --pruning-cost benchmark; returns 0 (it measures, it checks nothing)."""
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"config: {args.samples} samples in batches of {args.batch}, {args.image_size} px, "
          f"{args.num_classes} outputs, BatchNorms {args.batchnorm}, target channels, sparsity "
          f"{args.sparsity}, probes {args.probes}, default R "
          f"{fxgndi.core.names.DEFAULT_PROBES}, seed {args.seed}, one run per method")
    start = time.perf_counter()
    results = []
    for name in args.models:  # each model in turn: one in memory at a time
        results.append(pruning_cost_model(name, args, log))
    cost, agree = pruning_cost_tables(results)
    print()
    print(cost)
    print()
    print("prune s: one fxgndi.prune call, wall time (tracing, dependency graph, scoring, "
          "pruning); scoring s: G-NDI's own time within it. One run each, after an untimed "
          "warm-up on two samples.")
    if any(r["agreement"] for r in results):
        print()
        print(agree)
        print()
        print("Spearman: within each group the pruner scored, probe vs exact G-NDI scores "
              "(groups of >= 3 channels); removed exact: the exact G-NDI of the half of each "
              "group that the probe ranking removes, over that of the half the exact ranking "
              "removes (mean over groups); exact CV: the spread of the exact scores in a group "
              "(std / mean), the harder to rank the smaller it is.")
    for r in results:
        gndi = next((row for row in r["rows"] if row["method"] == "gndi"), None)
        taylor = next((row for row in r["rows"] if row["method"] == "weight_taylor"), None)
        if gndi and taylor:
            print(f"{r['model']}: prune(importance='gndi') / prune(importance='weight_taylor') "
                  f"= {gndi['seconds'] / taylor['seconds']:.2f} (mode {gndi['mode']}; bar "
                  "<= 3x, goal <= 1.5x)")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": results})
    return 0


# ------------------------------------------------------------------------------------ reporting

def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"processor": platform.processor() or platform.machine(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def results_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per model."""
    headers = ["model", "sites", "channels", "build s", "fxgndi layer s", "per-site JVP s",
               "layer speed-up", "fwd+bwd s", "layer cost (fwd+bwd)", "fxgndi channel s",
               "per-channel JVP s*", "channel speed-up*", "max rel err layer/channel"]
    rows = [(r["model"], r["sites"], r["channels"], r["build_layer_s"], r["fx_layer_s"],
             r["hooks_layer_s"], f"{r['layer_speedup']:.1f}x", r["fwd_bwd_s"],
             f"{r['layer_cost_fwd_bwd']:.2f}", r["fx_channel_s"],
             r["per_channel_total_s"], f"{r['channel_speedup']:.0f}x",
             f"{r['layer_rel_err']:.1e} / {r['channel_rel_err']:.1e}") for r in results]
    return format_table(rows, headers)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="torchvision model names (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per batch (default 8; 32 with --pruning-cost)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input side in pixels; a multiple of 16 for vit_b_16 (default 64; "
                             "224 with --pruning-cost)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument("--channel-sample", type=int, default=32,
                        help="channels timed with one JVP each, extrapolated to all channels")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared 2-core machine, "
                             "2 OpenMP threads slow down 5-40x whenever another process holds "
                             "a core; the ratios are what this benchmark reports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no per-repeat progress lines")
    cost = parser.add_argument_group("pruning cost (--pruning-cost)")
    cost.add_argument("--pruning-cost", action="store_true",
                      help="time fxgndi.prune per importance on wide heads, and the "
                           "probe-vs-exact agreement, instead of the scoring-speed table")
    cost.add_argument("--samples", type=int, default=64, help="images scored (default 64)")
    cost.add_argument("--num-classes", type=int, default=PRUNING_CLASSES,
                      help="outputs of the models (default %(default)s)")
    cost.add_argument("--methods", nargs="+", default=list(PRUNING_METHODS),
                      choices=PRUNING_METHODS,
                      help="importances timed: gndi is prune(importance='gndi') with its "
                           "defaults, gndi-probes one row per --probes, gndi-exact one VJP per "
                           "output (needed for the agreement table)")
    cost.add_argument("--probes", type=int, nargs="+", default=[8, 16, 32, 64],
                      help="probe counts R of the gndi-probes rows and the agreement table")
    cost.add_argument("--sparsity", type=float, default=0.3,
                      help="fraction of channels removed (target channels)")
    cost.add_argument("--batchnorm", choices=("random", "recalibrated"), default="random",
                      help="random: BatchNorm statistics and affines drawn uniformly (channels "
                           "differ, as in trained models); recalibrated: the statistics of the "
                           "scored batches with unit affines (channels nearly alike: the hard "
                           "case for ranking)")
    cost.add_argument("--max-memory", default=None,
                      help="G-NDI's max_memory, e.g. 8GB (exact scoring of a 224 px model on "
                           "a 32-sample batch can need more than the machine has)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.pruning_cost else 8)
    args.image_size = args.image_size or (224 if args.pruning_cost else 64)
    if args.repeat < 1 or args.batch < 1 or args.channel_sample < 1 or args.samples < 1:
        parser.error("--repeat, --batch, --samples and --channel-sample must be positive")
    if any(r < 1 for r in args.probes):
        parser.error("--probes must be positive")
    if any(m.startswith("vit_") for m in args.models) and args.image_size % 16:
        parser.error("vit_b_16 needs --image-size a multiple of 16")
    return args


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    files.write_json(path, payload)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table; returns 0 when every agreement check passes (with
    ``--pruning-cost``: the pruning-cost and agreement tables, returns 0)."""
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored afterwards
        return run_pruning_cost(args) if args.pruning_cost else _run(args)


def _run(args: argparse.Namespace) -> int:
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"config: batch {args.batch}, {args.image_size} px, {NUM_CLASSES} outputs, sites "
          f"conv+linear, zero baseline, logits readout, p=2, median of {args.repeat} "
          f"(after one warm-up), channel sample {args.channel_sample}, seed {args.seed}")
    start = time.perf_counter()
    results = [bench_model(name, batch=args.batch, image_size=args.image_size,
                           repeat=args.repeat, channel_sample=args.channel_sample,
                           seed=args.seed, log=log) for name in args.models]
    print()
    print(results_table(results))
    print()
    print("build s: fxgndi.intervene (trace + insert + shapes) of the layer graph, timed once "
          "and NOT included in 'fxgndi layer s' (pure scoring on the prebuilt graph).")
    print("per-site JVP: one torch.autograd.functional.jvp per site through a forward hook on "
          "the original model (alpha [B], v = 1); fwd+bwd: model(x).sum().backward() with "
          "parameter grads; layer cost = fxgndi layer s / fwd+bwd s.")
    print("* per-channel JVP s is EXTRAPOLATED: the mean time of one hooked JVP (alpha [B, C], "
          "one-hot v) over a seeded random sample of channels (n shown below), times the "
          "total channel count.")
    print(f"max rel err = max|fxgndi - hooks| / max|hooks| over all sites (layer) and over the "
          f"sampled channels (channel); tolerance {TOLERANCE:g}.")
    ok = True
    for r in results:
        status = "PASS" if r["pass"] else "FAIL"
        ok &= r["pass"]
        layer_met = "yes" if r["layer_speedup"] >= LAYER_TARGET else "no"
        channel_met = "yes" if r["channel_speedup"] >= CHANNEL_TARGET else "no"
        targets = (f"layer >= {LAYER_TARGET:g}x: {layer_met}, "
                   f"channel >= {CHANNEL_TARGET:g}x: {channel_met}")
        print(f"{status} {r['model']}: agreement layer {r['layer_rel_err']:.2e}, channel "
              f"{r['channel_rel_err']:.2e} on {r['channel_sample']} sampled channels "
              f"(one JVP {r['per_channel_jvp_s']:.3f} s); targets: {targets}")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": results})
    print("PASS" if ok else "FAIL: fxgndi disagrees with the hook-based JVPs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
