"""Does halving the MACs halve the latency? Pruned against dense, eager and exported, on CPU.

    python benchmarks/speedup.py                 # 5 models, 224 px, batch 1 and 32, all runtimes
    python benchmarks/speedup.py --models resnet18 mobilenet_v2 --batches 1 --repeat 5
    python benchmarks/speedup.py --threads 1 --image-size 64 --repeat 3 --json speedup.json

Each torchvision model (``weights=None``: latency does not depend on the weights' values) is
pruned with ``fxgndi.prune(model, ..., target="macs", sparsity=0.5, importance="l1")`` to half
its MACs. The importance only decides *which* channels are kept; the pruned shapes, and so the
speed, are the same for any importance at the same MAC target, and L1 needs no data. The dense
and the pruned model are then timed by :func:`fxgndi.bench` on the same random inputs: eagerly,
as ``torch.export`` programs (``.pt2``, loaded back from disk) and on onnxruntime (``.onnx``),
each at every batch size. The table gives, per runtime and batch, the pruned model's latency
speed-up over the dense one *in the same runtime*, next to the MAC ratio (dense MACs / pruned
MACs, torch-pruning's count): a speed-up below the MAC ratio is overhead that pruning does not
remove (memory traffic, per-op dispatch, ops whose cost does not scale with width).

A model that fails to prune, export or run gets a row saying so, and the others go on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

import fxgndi
from fxgndi.app.models import load_model
from fxgndi.core.files import write_json
from fxgndi.core.report import format_table, pyplot, save_figure

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16")
RUNTIMES = {"eager": None, "pt2": ".pt2", "onnx": ".onnx"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of MACs to remove")
    p.add_argument("--round-to", type=int, default=None,
                   help="keep channel counts multiples of this (torch-pruning's round_to)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime threads (default: torch's current setting)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (eager)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every measurement")
    p.add_argument("--plot", default=None, metavar="PATH", help="speed-up vs MAC ratio (PNG)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the exported files here (default: a temporary directory)")
    return p.parse_args(argv)


def run_model(name: str, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    """Prune one model, export both versions, bench them; every failure is recorded."""
    out: dict[str, Any] = {"model": name, "error": None, "rows": []}
    shape = (3, args.image_size, args.image_size)
    example = torch.randn(1, *shape)
    try:
        kwargs = {"image_size": args.image_size} if name.startswith("vit_") else {}
        dense = load_model(name, **kwargs)
        start = time.perf_counter()
        result = fxgndi.prune(dense, [example], example_inputs=example, target="macs",
                              sparsity=args.sparsity, importance="l1",
                              round_to=args.round_to, repair=False)  # shapes are what count
        out["prune_seconds"] = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - reported in the table, the others go on
        out["error"] = f"prune failed: {_reason(exc)}"
        return out
    out["macs_ratio"] = result.macs_before / result.macs_after
    entries: dict[str, Any] = {}
    for version, model in (("dense", dense), ("pruned", result.model)):
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
                entries[key] = None  # bench records it as unavailable
                out.setdefault("export_errors", {})[key] = _reason(exc)
    report = fxgndi.bench({k: v for k, v in entries.items() if v is not None},
                          input_shape=shape, batch_sizes=args.batches, threads=args.threads,
                          warmup=args.warmup, repeat=args.repeat, compile=args.compile,
                          dense_exports=False)  # the dense model is exported above
    out["rows"] = report.to_dict()["rows"]
    out["settings"] = report.settings
    return out


def speedup_rows(results: list[dict[str, Any]]) -> list[tuple]:
    """One line per model, runtime and batch: dense and pruned latency, their ratio, MACs."""
    lines = []
    for res in results:
        if res["error"]:
            lines.append((res["model"], "-", None, None, None, None, None, None, None,
                          res["error"]))
            continue
        by_key = {(r["name"], r["batch"]): r for r in res["rows"]}
        dense_eager = {b: r for (n, b), r in by_key.items() if n == "dense eager"}
        runtimes = dict.fromkeys(n.split(" ", 1)[1] for n, _ in by_key)
        batches = sorted({b for _, b in by_key})
        for runtime in runtimes:
            for batch in batches:
                d = by_key.get((f"dense {runtime}", batch))
                p = by_key.get((f"pruned {runtime}", batch))
                errors = res.get("export_errors", {})
                status = "; ".join(f"{k}: {v}" for k, v in errors.items()
                                   if k.endswith(runtime)) or _status(d, p)
                ok = status == "ok" or status.startswith("noisy: ")
                speedup = d["median_ms"] / p["median_ms"] if ok else None
                vs_eager = (dense_eager[batch]["median_ms"] / p["median_ms"]
                            if ok and batch in dense_eager else None)
                lines.append((res["model"], runtime, batch,
                              d["median_ms"] if d else None, p["median_ms"] if p else None,
                              speedup, res["macs_ratio"],
                              speedup / res["macs_ratio"] if ok else None, vs_eager, status))
    return lines


HEADERS = ["model", "runtime", "batch", "dense ms", "pruned ms", "speed-up", "MAC ratio",
           "speed-up / MAC ratio", "pruned vs dense eager", "status"]


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
    ok = [line for line in lines if line[5] is not None]
    labels = [f"{m}\n{r} b{b}" for m, r, b, *_ in ok]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(ok)), 3.8))
    ax.bar(range(len(ok)), [line[5] for line in ok], label="latency speed-up")
    ax.scatter(range(len(ok)), [line[6] for line in ok], color="black", marker="_", s=300,
               label="MAC ratio", zorder=3)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(ok)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("dense / pruned")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.image_size} px, batches "
          f"{args.batches}, {args.repeat} timed calls after {args.warmup} warm-up, "
          f"prune: target=macs sparsity={args.sparsity} importance=l1", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        for name in args.models:
            start = time.perf_counter()
            res = run_model(name, args, folder)
            print(f"{name}: {res['error'] or 'done'} in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
            results.append(res)
    lines = speedup_rows(results)
    print(format_table(lines, HEADERS, floatfmt=".3g"))
    print("speed-up = dense median latency / pruned median latency in the same runtime; MAC "
          "ratio = dense MACs / pruned MACs (torch-pruning's count); pruned vs dense eager = "
          "dense eager latency / pruned latency in this runtime. Which channels are kept does "
          "not change the speed: any importance gives the same shapes at the same MAC target.")
    if args.json:
        write_json(args.json, {"settings": vars(args), "threads": threads, "results": results})
    if args.plot:
        plot(lines, args.plot)
    return 0


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


if __name__ == "__main__":
    sys.exit(main())
