"""Does halving the MACs halve the latency? Pruned against dense, eager and exported, on CPU.

    python benchmarks/speedup.py                 # 6 models, 224 px, batch 1 and 32, all runtimes
    python benchmarks/speedup.py --models resnet18 mobilenet_v2 --batches 1 --repeat 5
    python benchmarks/speedup.py --threads 1 --image-size 64 --repeat 3 --json speedup.json
    python benchmarks/speedup.py --smoke         # seconds: resnet18, 32 px, batch 1, eager
    python benchmarks/speedup.py --from-json a.json b.json --plot speedup.png  # runs nothing

Each torchvision model (``weights=None``: latency does not depend on the weights' values) is
pruned by ``fxgndi.prune(model, ..., sparsity=0.5, importance="l1")`` with the library's
defaults (``round_to="auto"``; ``--round-to 8`` or ``none`` forces a multiple or none) to each
target asked for: ``macs`` (half the MACs, spread over the groups by their time:
``allocate="time"``), ``macs-uniform`` (half the MACs, the same fraction of every group:
``allocate="uniform"``) and ``latency`` (half the latency), all measured by
``fxgndi.Latency(runtime=--latency-runtime, batch_size=--latency-batch, threads=--threads)``,
the same measurement ``round_to="auto"`` and the allocation time their kernels with. The
importance only decides *which* channels are kept; the pruned shapes, and so the speed, are the
same for any importance at the same MAC target, and L1 needs no data. The dense and the pruned
models are then timed by :func:`fxgndi.bench` on the same random inputs: eagerly, as
``torch.export`` programs (``.pt2``, loaded back from disk), on onnxruntime (``.onnx``) and,
with ``--compile``, through ``torch.compile`` (a row says why where it does not work), each at
every batch size. The table gives, per target, runtime and batch, the pruned model's speed-up
over the dense one *in the same runtime*, next to the MAC ratio (dense MACs / pruned MACs,
torch-pruning's count): a speed-up below the MAC ratio is overhead that pruning does not remove
(memory traffic, per-op dispatch, ops whose cost does not scale with width).

A model that fails to prune, export or run gets a row saying so, and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fxgndi
from fxgndi.app.models import load_model
from fxgndi.core.files import write_json
from fxgndi.core.report import format_table, pyplot, save_figure
from fxgndi.pruning.rounding import AutoRound
from fxgndi.pruning.width import output_layers

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16", "efficientnet_b0")
RUNTIMES = {"eager": None, "pt2": ".pt2", "onnx": ".onnx"}
# macs: prune's defaults (allocate="time"); macs-uniform: every group the same fraction
TARGETS = ("macs", "macs-uniform", "latency")
SMOKE = ["--models", "resnet18", "--image-size", "32", "--batches", "1", "--runtimes", "eager",
         "--repeat", "1", "--warmup", "0", "--latency-repeat", "1"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                   help="what the sparsity removes: MACs, or latency on --latency-runtime")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of the target removed")
    p.add_argument("--round-to", type=_round_to, default="auto", metavar="auto|none|N",
                   help="prune's round_to: auto (default), none, or keep channel counts "
                        "multiples of N")
    p.add_argument("--latency-runtime", default="eager", choices=["eager", "pt2", "onnx"],
                   help="where the latency target and round_to=auto measure (default eager)")
    p.add_argument("--latency-batch", type=int, default=None,
                   help="the batch they measure on (default: the largest of --batches)")
    p.add_argument("--latency-repeat", type=int, default=5,
                   help="timed calls per latency measurement while pruning")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime threads (default: torch's current setting)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (eager)")
    p.add_argument("--keep-width", default=None, metavar="REGEX",
                   help="layers (names, full match) whose output channels are not pruned, "
                        "besides the output layers: e.g. the block outputs of inverted "
                        "residuals, so that only their hidden channels are")
    p.add_argument("--system-heap", action="store_true",
                   help="time (and search latency targets) with glibc's page faults of fresh "
                        "large tensors included (default: a steady heap, fxgndi.core.heap)")
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run: " + " ".join(SMOKE) + " (later options win)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every measurement")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="run nothing: report the results of earlier --json files together "
                        "(e.g. models run in parallel, one per core)")
    p.add_argument("--plot", default=None, metavar="PATH", help="speed-up vs MAC ratio (PNG)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the exported files here (default: a temporary directory)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:
        argv = SMOKE + argv
    args = p.parse_args(argv)
    if args.latency_batch is None:
        args.latency_batch = max(args.batches)
    return args


def _round_to(text: str) -> str | int | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round-to takes auto, none or an integer >= 1, "
                                         f"not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--round-to N needs N >= 1, not {value}")
    return value


def measurement(args: argparse.Namespace) -> fxgndi.Latency:
    """The latency the latency target meets and round_to=auto times its kernels with."""
    return fxgndi.Latency(runtime=args.latency_runtime, batch_size=args.latency_batch,
                          threads=args.threads, repeat=args.latency_repeat, warmup=1,
                          steady_heap=not args.system_heap)


def prune(dense: torch.nn.Module, example: torch.Tensor, target: str,
          args: argparse.Namespace) -> Any:
    latency = measurement(args)
    round_to = AutoRound(latency=latency) if args.round_to == "auto" else args.round_to
    ignored: Any = "auto"  # the layers producing the output keep their width
    if args.keep_width:
        ignored = output_layers(dense, example) + [
            name for name, _ in dense.named_modules() if re.fullmatch(args.keep_width, name)]
    return fxgndi.prune(dense, [example], example_inputs=example,
                        target=latency if target == "latency" else "macs",
                        allocate="uniform" if target == "macs-uniform" else latency,
                        sparsity=args.sparsity, importance="l1", round_to=round_to,
                        ignored_layers=ignored, repair=False)  # shapes are what count


def run_model(name: str, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    """Prune one model to every target, export every version, bench them; every failure is
    recorded."""
    out: dict[str, Any] = {"model": name, "error": None, "rows": [], "targets": {}}
    shape = (3, args.image_size, args.image_size)
    example = torch.randn(1, *shape)
    kwargs = {"image_size": args.image_size} if name.startswith("vit_") else {}
    try:
        dense = load_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the others go on
        out["error"] = f"load failed: {_reason(exc)}"
        return out
    versions: dict[str, torch.nn.Module] = {"dense": dense}
    for target in args.targets:
        start = time.perf_counter()
        try:
            result = prune(dense, example, target, args)
        except Exception as exc:  # noqa: BLE001
            out["targets"][target] = {"error": f"prune failed: {_reason(exc)}"}
            continue
        versions[target] = result.model
        out["targets"][target] = {
            "error": None, "prune_seconds": time.perf_counter() - start,
            "macs_ratio": result.macs_before / result.macs_after,
            "rounded": result.settings["rounded"],
            "rounding_dropped": result.settings.get("rounding_dropped"),
            "latency": result.settings.get("latency")}
    entries: dict[str, Any] = {}
    for version, model in versions.items():
        for runtime in args.runtimes:
            suffix = RUNTIMES[runtime]
            key = f"{version} {runtime}"
            if suffix is None:
                entries[key] = model
                continue
            path = os.path.join(folder, f"{name}-{version}{suffix}")
            try:
                exported = fxgndi.export(model, path, example_inputs=example.repeat(2, 1, 1, 1),
                                         model_name=name, model_kwargs=kwargs)
                out.setdefault("exports", {})[key] = exported.to_dict()
                entries[key] = path
            except Exception as exc:  # noqa: BLE001
                out.setdefault("export_errors", {})[key] = _reason(exc)
    report = fxgndi.bench(entries, input_shape=shape, batch_sizes=args.batches,
                          threads=args.threads, warmup=args.warmup, repeat=args.repeat,
                          compile=args.compile, steady_heap=not args.system_heap,
                          dense_exports=False)  # the dense model is exported above
    out["rows"] = report.to_dict()["rows"]
    out["settings"] = report.settings
    return out


def speedup_rows(results: list[dict[str, Any]]) -> list[tuple]:
    """One line per model, target, runtime and batch: dense and pruned latency, their ratio,
    the MAC ratio."""
    lines = []
    for res in results:
        if res["error"]:
            lines.append((res["model"], "-", "-", None, None, None, None, None, None, None,
                          res["error"]))
            continue
        by_key = {(r["name"], r["batch"]): r for r in res["rows"]}
        runtimes = dict.fromkeys(n.split(" ", 1)[1] for n, _ in by_key)
        batches = sorted({b for _, b in by_key})
        errors = res.get("export_errors", {})
        for target, info in res["targets"].items():
            if info["error"]:
                lines.append((res["model"], target, "-", None, None, None, None, None, None,
                              None, info["error"]))
                continue
            ratio = info["macs_ratio"]
            for runtime in runtimes:
                for batch in batches:
                    d = by_key.get((f"dense {runtime}", batch))
                    p = by_key.get((f"{target} {runtime}", batch))
                    status = "; ".join(f"{k}: {v}" for k, v in errors.items()
                                       if k.split(" ", 1)[1] == runtime
                                       and k.split(" ", 1)[0] in ("dense", target)) \
                        or _status(d, p)
                    ok = status == "ok" or status.startswith("noisy: ")
                    # bench's: the median of per-round ratios against the dense model of
                    # this runtime (a ratio of the two medians would inherit the drift)
                    speedup = p["speedup"] if ok else None
                    eager = by_key.get(("dense eager", batch))
                    vs_eager = eager["median_ms"] / p["median_ms"] if ok and eager else None
                    lines.append((res["model"], target, runtime, batch,
                                  d["median_ms"] if d else None, p["median_ms"] if p else None,
                                  speedup, ratio, speedup / ratio if ok else None, vs_eager,
                                  status))
    return lines


HEADERS = ["model", "target", "runtime", "batch", "dense ms", "pruned ms", "speed-up",
           "MAC ratio", "speed-up / MAC ratio", "pruned vs dense eager", "status"]


def _status(dense: dict | None, pruned: dict | None) -> str:
    """"ok", "noisy: ..." (measured, IQR above fxgndi.bench's noisy_iqr of the median: the
    speed-up is shown but not to be trusted), or why a row is missing."""
    noisy = []
    for row in (dense, pruned):
        if row is None:
            return "not run"
        if row["status"].startswith("noisy: "):
            noisy.append(f"{row['name']} {row['status'][len('noisy: '):]}")
        elif row["status"] != "ok":
            return f"{row['name']}: {row['status']}"
    return f"noisy: {'; '.join(noisy)}" if noisy else "ok"


def plot(lines: list[tuple], path: str) -> None:
    plt = pyplot()
    ok = [line for line in lines if line[6] is not None]
    labels = [f"{m} {t}\n{r} b{b}" for m, t, r, b, *_ in ok]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(ok)), 3.8))
    ax.bar(range(len(ok)), [line[6] for line in ok], label="latency speed-up")
    ax.scatter(range(len(ok)), [line[7] for line in ok], color="black", marker="_", s=300,
               label="MAC ratio", zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(ok)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("dense / pruned")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        saved = [json.loads(Path(path).read_text()) for path in args.from_json]
        for run in saved:
            print(run["header"])
        return report([res for run in saved for res in run["results"]], args)
    threads = args.threads or torch.get_num_threads()
    header = (f"torch {torch.__version__}, {threads} threads, {args.image_size} px, batches "
              f"{args.batches}, {args.repeat} timed calls after {args.warmup} warm-up, "
              f"prune: targets {args.targets} sparsity={args.sparsity} importance=l1 round_to="
              f"{args.round_to}"
              + (f", output width kept by layers matching {args.keep_width!r}"
                 if args.keep_width else "")
              + f", latency and rounding measured on {measurement(args)}")
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        for name in args.models:
            start = time.perf_counter()
            res = run_model(name, args, folder)
            print(f"{name}: {res['error'] or 'done'} in {time.perf_counter() - start:.0f} s"
                  + "".join(f"; {t}: {i['error'] or 'MAC ratio %.2f' % i['macs_ratio']}"
                            for t, i in res["targets"].items()), file=sys.stderr, flush=True)
            results.append(res)
    if args.json:
        write_json(args.json, {"settings": vars(args), "threads": threads, "header": header,
                               "results": results})
    return report(results, args)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Print the table, what torch.compile did, the slower-than-dense rows; draw the figure."""
    lines = speedup_rows(results)
    print(format_table(lines, HEADERS, floatfmt=".3g"))
    print("speed-up = the median over rounds of alternated calls of dense / pruned latency in "
          "the same runtime; MAC "
          "ratio = dense MACs / pruned MACs (torch-pruning's count); pruned vs dense eager = "
          "dense eager latency / pruned latency in this runtime; target: what the sparsity removed "
          "(macs, or latency on the --latency-runtime at --latency-batch). Which channels are "
          "kept does not change the speed: any importance gives the same shapes at the same "
          "MAC target.")
    compiled = [line for line in lines if line[2] == "eager compiled"]
    if compiled and not any(line[6] is not None for line in compiled):
        print("torch.compile: no compiled row ran on this machine (see the status column)")
    slower = [f"{line[0]} {line[1]} {line[2]} b{line[3]}" for line in lines
              if line[6] is not None and line[6] < 1]
    print(f"pruned slower than dense: {', '.join(slower) or 'none'}")
    if args.plot:
        plot(lines, args.plot)
    return 0


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


if __name__ == "__main__":
    sys.exit(main())
