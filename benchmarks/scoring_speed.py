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

Example:
    python benchmarks/scoring_speed.py --models resnet50 --batch 8 --image-size 64
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
import torchvision

import fxgndi
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

def build_model(name: str, image_size: int, seed: int = 0) -> nn.Module:
    """A torchvision model with random weights (seeded), 10 classes, in eval mode.

    torchvision's ViT zero-initialises its head, which would make every tangent 0: any Linear
    whose weight is all zeros is re-initialised (normal, std 0.01).

    Example:
        >>> m = build_model("resnet18", 64)
    """
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64,
                        help="input side in pixels; a multiple of 16 for vit_b_16")
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
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batch < 1 or args.channel_sample < 1:
        parser.error("--repeat, --batch and --channel-sample must be positive")
    if any(m.startswith("vit_") for m in args.models) and args.image_size % 16:
        parser.error("vit_b_16 needs --image-size a multiple of 16")
    return args


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    files.write_json(path, payload)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table; returns 0 when every agreement check passes."""
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored afterwards
        return _run(args)


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
