"""Can fxgndi.prune prune every torchvision classifier? One row per model.

Each model (weights=None, random inputs at 224 px, 299 for inception_v3) is traced with
torch.fx, pruned with ``fxgndi.prune`` (channel ratio ``--sparsity``) and run once more; the
table gives the stage each model reached, MACs and parameters before and after, and seconds.
Every model runs in its own subprocess under ``--timeout`` so that one hang or crash does not
stall the sweep; a hang dumps the Python stack of every thread (faulthandler) into the error.

    OMP_NUM_THREADS=1 python benchmarks/prunability.py --out docs/prunability_gndi.json
    python benchmarks/prunability.py --models 'swin_*' 'shufflenet*' --importance l1 \\
        --out docs/prunability_l1.json   # merges into an existing --out file
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

COLUMNS = ["model", "traced", "scored", "pruned", "forward", "macs_before", "macs_after",
           "params_before", "params_after", "seconds", "error"]
_MARK = "PRUNABILITY_RESULT "


def image_size(name: str) -> int:
    """The input size torchvision's builder expects: 299 for inception_v3, else 224.

    Example:
        >>> image_size("inception_v3"), image_size("resnet18")
        (299, 224)
    """
    return 299 if name.startswith("inception") else 224


def select_models(patterns: list[str]) -> list[str]:
    """torchvision's classifiers that match ``patterns`` (names or globs), in the patterns'
    order (each glob's matches sorted), without repeats.

    Example:
        >>> select_models(["resnet5*", "resnet1*", "resnet50"])
        ['resnet50', 'resnet101', 'resnet152', 'resnet18']
    """
    from fxgndi.app.models import classification_models

    known = sorted(classification_models())
    chosen = list(dict.fromkeys(m for p in patterns for m in known if fnmatch.fnmatch(m, p)))
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(m, p) for m in known)]
    if unknown:
        raise SystemExit(f"no torchvision classifier matches {', '.join(unknown)}: see "
                         "torchvision.models.list_models(module=torchvision.models)")
    return chosen


def run_one(name: str, importance: str, sparsity: float, batch: int, num_classes: int,
            size: int | None = None) -> dict[str, Any]:
    """Trace, prune and run one model; the row of the table (stages reached, counts, error).

    Example:
        >>> run_one("resnet18", "l1", 0.5, 1, 10, size=32)["forward"]  # doctest: +SKIP
        True
    """
    import torch

    from fxgndi.fx.intervention import trace
    from fxgndi.app.models import load_model
    from fxgndi.pruning.width import prune

    row: dict[str, Any] = {"model": name, "traced": False, "scored": False, "pruned": False,
                           "forward": False}
    torch.manual_seed(0)
    size = size or image_size(name)
    model = load_model(name, num_classes=num_classes)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, num_classes, (batch,))
    stage = "trace"
    start = time.perf_counter()
    try:
        trace(model)
        row["traced"] = True
        stage = "prune"
        result = prune(model, [(x, y)], example_inputs=x[:1], sparsity=sparsity,
                       importance=importance, repair=False)
        row.update(scored=True, pruned=True, macs_before=result.macs_before,
                   macs_after=result.macs_after,
                   params_before=result.params_before, params_after=result.params_after,
                   architectures=result.settings.get("architectures", []))
        stage = "forward"
        with torch.no_grad():
            out = result.model.eval()(x)
        if tuple(out.shape) != (batch, num_classes):
            raise RuntimeError(f"pruned model returned shape {tuple(out.shape)}")
        row["forward"] = True
    except Exception as exc:  # the sweep records every failure with its cause
        row["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=-8)
        if stage == "prune":  # scored unless the importance itself raised
            frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
            row["scored"] = not any(f.endswith("importance.py") for f in frames)
    row["seconds"] = time.perf_counter() - start
    return row


def _child(args: argparse.Namespace) -> None:
    import faulthandler

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # A hang shows where it hangs: all stacks to stderr a little before the parent kills us.
    faulthandler.dump_traceback_later(max(1.0, args.timeout - 15), exit=False)
    row = run_one(args.one, args.importance, args.sparsity, args.batch, args.num_classes)
    print(_MARK + json.dumps(row), flush=True)


def _run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--importance",
           args.importance, "--sparsity", str(args.sparsity), "--batch", str(args.batch),
           "--num-classes", str(args.num_classes), "--timeout", str(args.timeout)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {"model": name, "traced": None, "pruned": False, "forward": False,
                "seconds": time.perf_counter() - start,
                "error": f"timeout after {args.timeout} s", "traceback": stderr[-6000:]}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return {"model": name, "traced": None, "pruned": False, "forward": False,
            "seconds": time.perf_counter() - start,
            "error": f"process exited with {proc.returncode}", "traceback": proc.stderr[-6000:]}


def _load(path: str | None) -> dict[str, dict[str, Any]]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {row["model"]: row for row in json.load(f)["rows"]}


def _save(path: str, rows: dict[str, dict[str, Any]], settings: dict[str, Any]) -> None:
    """JSON and CSV beside each other, each written to a temp file and renamed."""
    from fxgndi.core.files import atomic_path, write_json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ordered = [rows[k] for k in sorted(rows)]
    write_json(path, {"settings": settings, "rows": ordered})
    with atomic_path(os.path.splitext(path)[0] + ".csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of sweep rows (MACs in G, params in M).

    Example:
        >>> print(table([{"model": "m", "traced": True, "pruned": True, "forward": True,
        ...               "macs_before": 2e9, "macs_after": 1e9, "params_before": 4e6,
        ...               "params_after": 1e6, "seconds": 3.0}]))  # doctest: +SKIP
    """
    from fxgndi.core.report import format_table

    def mark(value: Any) -> str:
        return {True: "yes", False: "no", None: "?"}[value]

    out = []
    for r in rows:
        macs = (r["macs_before"] / 1e9, r["macs_after"] / 1e9) if r.get("pruned") else ("", "")
        params = ((r["params_before"] / 1e6, r["params_after"] / 1e6) if r.get("pruned")
                  else ("", ""))
        kept = f"{r['macs_after'] / r['macs_before']:.3f}" if r.get("pruned") else ""
        out.append((r["model"], mark(r["traced"]), mark(r.get("scored", r["pruned"] or None)),
                    mark(r["pruned"]), mark(r["forward"]),
                    *macs, kept, *params, r["seconds"],
                    ", ".join(r.get("architectures", [])), r.get("error", "")[:90]))
    return format_table(out, ["model", "traced", "scored", "pruned", "forward", "GMACs before",
                              "after", "MACs kept", "Mparams before", "after", "seconds",
                              "handling", "error"], floatfmt=".3f")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["*"], help="names or globs")
    parser.add_argument("--importance", default="gndi")
    parser.add_argument("--sparsity", type=float, default=0.5, help="channel ratio")
    parser.add_argument("--batch", type=int, default=2, help="random images for scoring")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="head size: G-NDI's reverse mode costs one VJP per class")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--out", help="JSON file (a CSV is written beside it); merged into "
                        "when it exists")
    parser.add_argument("--report", action="store_true",
                        help="print the table of the --out file; run nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the per-model subprocess
    args = parser.parse_args(argv)
    if args.one:
        _child(args)
        return []
    settings = {k: getattr(args, k) for k in ("importance", "sparsity", "batch",
                                              "num_classes", "timeout")}
    rows = _load(args.out)
    names = [] if args.report else select_models(args.models)
    for i, name in enumerate(names):
        row = _run_in_subprocess(name, args)
        rows[name] = row
        status = "ok" if row["forward"] else row.get("error", "")[:120]
        print(f"[{i + 1}/{len(names)}] {name}: {row['seconds']:.0f} s {status}", flush=True)
        if args.out:
            _save(args.out, rows, settings)
    done = [rows[k] for k in sorted(rows)]
    if args.report and args.out:
        with open(args.out) as f:
            settings = json.load(f)["settings"]
    print(f"importance={settings['importance']}, channel ratio {settings['sparsity']}, batch "
          f"{settings['batch']}, num_classes={settings['num_classes']}, 224 px (299 for "
          "inception_v3)")
    print(table(done))
    ok = sum(bool(r["forward"]) for r in done)
    print(f"{ok} of {len(done)} pruned and ran a forward pass")
    return done


if __name__ == "__main__":
    main()
