"""Can fxgndi.prune prune every model of a zoo? One row per model.

Zoos (``--zoo``):

- ``torchvision`` (default): every torchvision classifier, random inputs at 224 px (299 for
  inception_v3).
- ``torchvision-segmentation``: every torchvision segmentation builder (fcn, deeplabv3,
  lraspp), ``weights_backbone=None``, with the auxiliary head where the builder has one
  (``aux_loss=True``), random 64 px inputs (``--size``); the dict output's ``"out"`` entry is
  read (``output="out"``) and the pruned model must return both entries at the dense shape.
- ``timm`` (optional: ``pip install fxgndi[timm]``): one model per timm architecture family.
  The families are timm's own registry, not a hand-picked list: ``timm.list_modules()``, and in
  each module (``timm.list_models(module=m)``) the model with the fewest parameters (counted on
  the meta device, ties by name; cached in ``~/.cache/fxgndi``). Built with
  ``pretrained=False``; at ``--size`` px (64) when the model takes it (``img_size=`` where the
  builder has it), else at its default config's input size.

Each model (weights=None, ``--num-classes`` outputs) is traced with torch.fx, pruned with
``fxgndi.prune`` (channel ratio ``--sparsity``, ``--importance``, no repair) and run once
more; the table gives the stage each model reached, MACs and parameters before and after,
and seconds. Every model runs in its own subprocess under ``--timeout`` so that one hang or
crash does not stall the sweep; a hang dumps the Python stack of every thread (faulthandler)
into the error.

    OMP_NUM_THREADS=1 python benchmarks/prunability.py --out docs/prunability_gndi.json
    python benchmarks/prunability.py --models 'swin_*' 'shufflenet*' --importance l1 \\
        --out docs/prunability_l1.json   # merges into an existing --out file
    python benchmarks/prunability.py --zoo torchvision-segmentation \\
        --out docs/prunability_segmentation.json
    python benchmarks/prunability.py --zoo timm --limit 10 --timeout 600 \\
        --out docs/prunability_timm.json
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
from dataclasses import dataclass
from typing import Any, Callable

COLUMNS = ["model", "family", "size", "traced", "scored", "pruned", "forward", "macs_before",
           "macs_after", "params_before", "params_after", "seconds", "error", "sweep"]
ZOOS = ("torchvision", "torchvision-segmentation", "timm")
SEGMENTATION_SIZE = TIMM_SIZE = 64
_MARK = "PRUNABILITY_RESULT "


def image_size(name: str) -> int:
    """The input size torchvision's builder expects: 299 for inception_v3, else 224.

    Example:
        >>> image_size("inception_v3"), image_size("resnet18")
        (299, 224)
    """
    return 299 if name.startswith("inception") else 224


def zoo_models(zoo: str) -> list[str]:
    """The model names of ``zoo`` (one of ``ZOOS``), sorted.

    Example:
        >>> zoo_models("torchvision-segmentation")[:2]
        ['deeplabv3_mobilenet_v3_large', 'deeplabv3_resnet101']
    """
    import torchvision

    from fxgndi.core.checks import check_choice

    check_choice("zoo", zoo, ZOOS)
    if zoo == "torchvision":
        from fxgndi.app.models import classification_models
        return sorted(classification_models())
    if zoo == "torchvision-segmentation":
        return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))
    return sorted(f["model"] for f in timm_families())


def select_models(patterns: list[str], zoo: str = "torchvision") -> list[str]:
    """The models of ``zoo`` that match ``patterns`` (names or globs), in the patterns' order
    (each glob's matches sorted), without repeats.

    Example:
        >>> select_models(["resnet5*", "resnet1*", "resnet50"])
        ['resnet50', 'resnet101', 'resnet152', 'resnet18']
    """
    known = zoo_models(zoo)
    chosen = list(dict.fromkeys(m for p in patterns for m in known if fnmatch.fnmatch(m, p)))
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(m, p) for m in known)]
    if unknown:
        raise SystemExit(f"no model of the {zoo} zoo matches {', '.join(unknown)}: see "
                         f"zoo_models({zoo!r})")
    return chosen


def timm_families(cache_dir: str | None = None) -> list[dict[str, Any]]:
    """One model per timm architecture family: for each module of ``timm.list_modules()``,
    the model of ``timm.list_models(module=m)`` with the fewest parameters (built on the meta
    device; ties by name). Models that do not build there are left out of the ranking; a family
    none of whose models builds keeps its first name with ``params`` None. Cached per timm
    version in ``cache_dir`` (default ``~/.cache/fxgndi``): ranking every model takes minutes.

    Example:
        >>> [f for f in timm_families() if f["family"] == "resnet"]  # doctest: +SKIP
        [{'family': 'resnet', 'model': 'resnet10t', 'params': 4923868, 'candidates': 163}]
    """
    import warnings

    import timm
    import torch

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fxgndi")
    path = os.path.join(cache_dir, f"timm_families_{timm.__version__}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    families = []
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        sizes = []
        for name in names:
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                sizes.append((sum(p.numel() for p in model.parameters()), name))
            except Exception:  # noqa: BLE001 - a model that cannot be built is not ranked
                continue
        params, model_name = min(sizes) if sizes else (None, names[0])
        families.append({"family": module, "model": model_name, "params": params,
                         "candidates": len(names)})
    from fxgndi.core.files import write_json
    os.makedirs(cache_dir, exist_ok=True)
    write_json(path, families)
    return families


@dataclass
class Case:
    """One model of a zoo, ready to prune: the model, a batch, which output prune reads, and
    the check the pruned model's output must pass."""

    model: Any
    x: Any
    y: Any
    size: int
    output: Any = None
    check: Callable[[Any], None] | None = None


def _shape_check(batch: int, shapes: dict[Any, tuple[int, ...]]) -> Callable[[Any], None]:
    def check(out: Any) -> None:
        for key, shape in shapes.items():
            got = tuple((out if key is None else out[key]).shape)
            if got != (batch, *shape):
                where = "" if key is None else f"[{key!r}]"
                raise RuntimeError(f"pruned model returned{where} shape {got}, expected "
                                   f"{(batch, *shape)}")
    return check


def build_case(zoo: str, name: str, batch: int, num_classes: int,
               size: int | None = None) -> Case:
    """The model ``name`` of ``zoo`` (weights=None), random inputs and labels at ``size`` px,
    the output selector and the check of the pruned model's output.

    Example:
        >>> case = build_case("torchvision-segmentation", "lraspp_mobilenet_v3_large", 1, 3)
        >>> case.output, tuple(case.x.shape), tuple(case.y.shape)
        ('out', (1, 3, 64, 64), (1, 64, 64))
    """
    import torch

    from fxgndi.core.checks import check_choice

    if zoo == "torchvision":
        from fxgndi.app.models import load_model
        size = size or image_size(name)
        return Case(load_model(name, num_classes=num_classes), torch.randn(batch, 3, size, size),
                    torch.randint(0, num_classes, (batch,)), size,
                    check=_shape_check(batch, {None: (num_classes,)}))
    if zoo == "torchvision-segmentation":
        import torchvision
        size = size or SEGMENTATION_SIZE
        kwargs = {} if name.startswith("lraspp") else {"aux_loss": True}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=num_classes, **kwargs).eval()
        keys = ("out", "aux") if kwargs else ("out",)
        return Case(model, torch.randn(batch, 3, size, size),
                    torch.randint(0, num_classes, (batch, size, size)), size, output="out",
                    check=_shape_check(batch, {k: (num_classes, size, size) for k in keys}))
    check_choice("zoo", zoo, ZOOS)
    model, height, width = _timm_model(name, num_classes, size or TIMM_SIZE)
    return Case(model, torch.randn(batch, 3, height, width),
                torch.randint(0, num_classes, (batch,)), height,
                check=_shape_check(batch, {None: (num_classes,)}))


def _timm_model(name: str, num_classes: int, size: int) -> tuple[Any, int, int]:
    """The timm model at ``size`` px if it runs there (with ``img_size=size`` where its builder
    takes it, else as built), otherwise at its default config's input size."""
    import timm
    import torch

    default = timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    tries = [({"img_size": size}, size, size), ({}, size, size),
             ({}, int(default[-2]), int(default[-1]))]
    error: Exception | None = None
    for kwargs, height, width in tries:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                      **kwargs).eval()
            with torch.no_grad():
                model(torch.randn(1, 3, height, width))
            return model, height, width
        except Exception as exc:  # noqa: BLE001 - the next size is tried
            error = exc
    assert error is not None
    raise error


def run_one(name: str, importance: str, sparsity: float, batch: int, num_classes: int,
            size: int | None = None, zoo: str = "torchvision") -> dict[str, Any]:
    """Build, trace, prune and run one model of ``zoo``; the row of the table (stages reached,
    counts, error).

    Example:
        >>> run_one("resnet18", "l1", 0.5, 1, 10, size=32)["forward"]  # doctest: +SKIP
        True
    """
    import torch

    from fxgndi.fx.intervention import trace
    from fxgndi.pruning.width import prune

    row: dict[str, Any] = {"model": name, "traced": False, "scored": False, "pruned": False,
                           "forward": False}
    torch.manual_seed(0)
    stage = "build"
    start = time.perf_counter()
    try:
        case = build_case(zoo, name, batch, num_classes, size)
        row["size"] = case.size
        stage = "trace"
        trace(case.model)
        row["traced"] = True
        stage = "prune"
        result = prune(case.model, [(case.x, case.y)], example_inputs=case.x[:1],
                       sparsity=sparsity, importance=importance, repair=False,
                       output=case.output)
        row.update(scored=True, pruned=True, macs_before=result.macs_before,
                   macs_after=result.macs_after,
                   params_before=result.params_before, params_after=result.params_after,
                   architectures=result.settings.get("architectures", []),
                   skipped=len(result.skipped))
        stage = "forward"
        with torch.no_grad():
            out = result.model.eval()(case.x)
        if case.check is not None:
            case.check(out)
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
    row = run_one(args.one, args.importance, args.sparsity, args.batch, args.num_classes,
                  size=args.size, zoo=args.zoo)
    print(_MARK + json.dumps(row), flush=True)


def _run_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--importance",
           args.importance, "--sparsity", str(args.sparsity), "--batch", str(args.batch),
           "--num-classes", str(args.num_classes), "--timeout", str(args.timeout),
           "--zoo", args.zoo] + (["--size", str(args.size)] if args.size else [])
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
        out.append((r["model"], r.get("family", ""), r.get("size", ""), mark(r["traced"]),
                    mark(r.get("scored", r["pruned"] or None)), mark(r["pruned"]),
                    mark(r["forward"]),
                    *macs, kept, *params, r["seconds"],
                    ", ".join(r.get("architectures", [])), r.get("error", "")[:90]))
    return format_table(out, ["model", "family", "px", "traced", "scored", "pruned", "forward",
                              "GMACs before", "after", "MACs kept", "Mparams before", "after",
                              "seconds", "handling", "error"], floatfmt=".3f")


CAUSES = (  # (cause, test on the row's error), the first that matches
    ("timeout", lambda e: e.startswith("timeout")),
    ("crashed", lambda e: e.startswith("process exited")),
    ("does not build", lambda e: e.startswith("build:")),
    ("untraceable by torch.fx", lambda e: "UntraceableModelError" in e),
    ("torch-pruning's dependency graph", lambda e: "could not build the dependency graph" in e),
    ("pruned model fails its forward", lambda e: "fails its forward" in e
     or e.startswith("forward:")),
    ("other prune error", lambda e: True),
)


def failure_cause(row: dict[str, Any]) -> str:
    """Why a sweep row did not reach a forward pass of the pruned model ("ok" if it did): the
    first of :data:`CAUSES` its error matches.

    Example:
        >>> failure_cause({"forward": False, "error": "timeout after 600 s"})
        'timeout'
    """
    if row.get("forward"):
        return "ok"
    error = row.get("error") or ""
    return next(cause for cause, test in CAUSES if test(error))


def summary(rows: list[dict[str, Any]]) -> str:
    """How many rows ran, then one line per failure cause with its models.

    Example:
        >>> print(summary([{"model": "a", "forward": True},
        ...                {"model": "b", "forward": False, "error": "timeout after 9 s"}]))
        1 of 2 pruned and ran a forward pass
        timeout (1): b
    """
    by_cause: dict[str, list[str]] = {}
    for row in rows:
        by_cause.setdefault(failure_cause(row), []).append(row["model"])
    ok = len(by_cause.pop("ok", []))
    lines = [f"{ok} of {len(rows)} pruned and ran a forward pass"]
    for cause, _ in CAUSES:
        if cause in by_cause:
            names = by_cause[cause]
            lines.append(f"{cause} ({len(names)}): {', '.join(sorted(names))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=ZOOS, default="torchvision",
                        help="which models (see the module docstring)")
    parser.add_argument("--models", nargs="+", default=["*"], help="names or globs")
    parser.add_argument("--limit", type=int, help="the first LIMIT matching models only")
    parser.add_argument("--size", type=int, help="input px (default: the zoo's)")
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
    settings = {k: getattr(args, k) for k in ("zoo", "importance", "sparsity", "batch",
                                              "num_classes", "size", "timeout")}
    rows = _load(args.out)
    names = [] if args.report else select_models(args.models, args.zoo)[:args.limit]
    family = ({f["model"]: f["family"] for f in timm_families()} if args.zoo == "timm"
              and names else {})
    for i, name in enumerate(names):
        row = _run_in_subprocess(name, args)
        if name in family:
            row["family"] = family[name]
        rows[name] = row
        status = "ok" if row["forward"] else row.get("error", "")[:120]
        print(f"[{i + 1}/{len(names)}] {name}: {row['seconds']:.0f} s {status}", flush=True)
        if args.out:
            _save(args.out, rows, settings)
    done = [rows[k] for k in sorted(rows)]
    if args.report and args.out:
        with open(args.out) as f:
            settings = json.load(f)["settings"]
    print(f"zoo {settings.get('zoo', 'torchvision')}, importance={settings['importance']}, "
          f"channel ratio {settings['sparsity']}, batch {settings['batch']}, "
          f"num_classes={settings['num_classes']}, input px in the table")
    print(table(done))
    print(summary(done))
    return done


if __name__ == "__main__":
    main()
