"""Peak memory of channel-level G-NDI scoring against the ``max_memory`` budget.

For each budget, and once without one (the baseline), a fresh Python process builds a
torchvision model (``weights=None``, ``--classes`` outputs, eval mode, seed 0) and one random
batch, then runs ``fxgndi.score(model, [x], granularity="channel", mode="reverse",
max_memory=budget)`` on every conv site.

How memory is measured (CPU): ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water
mark of the process's resident memory, read after scoring; ``before`` is the resident memory
(``/proc/self/statm``) right before the ``score`` call, with torch, the model and the batch
loaded. The budget is for what ``score`` allocates (activations and tangents; not the weights
nor the batch), so the column to hold against it is ``peak - before``. Resident memory also
counts the allocator's slack and the libraries' one-off buffers: it is an upper bound of what
the tensors needed. On CUDA (``--device cuda``) the peak is
``torch.cuda.max_memory_allocated()`` and ``before`` is ``torch.cuda.memory_allocated()``.

Before the measured call, each process scores one sample with the same settings (a
warm-up). ``peak - before`` includes what that first call costs once (on the CPU: library
code paged in, oneDNN kernels, allocator arenas: not tensors); ``peak - warm`` starts from the
resident memory after the warm-up, so it shows what the batch itself adds (it can
under-count by what the warm-up left in the allocator and the batch reused). ``within``
judges the cold column.

Each process also writes its scores; the table gives their largest relative difference from
the reference run (unbudgeted unless ``--reference``; splitting the work must not change
them) and the time ratio to it.
Exit code 1 when a budgeted run exceeds its budget or changes the scores.

Example:
    python benchmarks/memory.py                                    # resnet18, 112 px, batch 32
    python benchmarks/memory.py --model resnet50 --image-size 224 --batch 64 \\
        --budgets 2GiB 1GiB --reference 4GiB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

MIB = 2 ** 20


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch
    import torchvision

    import fxgndi

    torch.manual_seed(0)
    device = torch.device(config["device"])
    model = getattr(torchvision.models, config["model"])(num_classes=config["classes"])
    model = model.eval().to(device)
    x = torch.randn(config["batch"], 3, config["image_size"], config["image_size"],
                    generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    kw = dict(sites="conv", granularity="channel", mode="reverse", max_memory=config["budget"],
              progress=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
    fxgndi.score(model, [x[:1]], **kw)  # warm-up: one-off costs of the first call
    warm = torch.cuda.memory_allocated() if cuda else _rss()
    start = time.perf_counter()
    scores = fxgndi.score(model, [x], **kw)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    np.save(config["values"], scores.values)
    return {"before": before, "warm": warm, "peak": peak, "seconds": seconds,
            "samples_per_step": scores.meta.get("samples_per_step", config["batch"]),
            "chunk": scores.meta.get("chunk"), "channels": len(scores.values)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter, so each peak is its own."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                           json.dumps(config)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed for budget {config['budget']}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--budgets", nargs="+", default=["256MiB", "64MiB"])
    parser.add_argument("--reference", default=None,
                        help="budget of the reference run (default: none, i.e. unbudgeted); "
                             "for configurations whose unbudgeted run does not fit in memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from fxgndi.core.options import parse_bytes
    from fxgndi.core.report import format_table

    rows, records, failed = [], [], False
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = {"model": args.model, "image_size": args.image_size, "batch": args.batch,
                    "classes": args.classes, "device": args.device}
        reference = parse_bytes(args.reference)
        budgets = [reference] + [parse_bytes(b) for b in args.budgets]
        results = {}
        for i, budget in enumerate(budgets):
            cfg = {**base_cfg, "budget": budget, "values": os.path.join(tmp, f"{i}.npy")}
            results[budget] = run_child(cfg)
            results[budget]["values"] = np.load(cfg["values"])
        ref = results[reference]
        for budget in budgets:
            r = results[budget]
            used, used_warm = r["peak"] - r["before"], r["peak"] - r["warm"]
            diff = float(np.max(np.abs(r["values"] - ref["values"]) /
                                np.maximum(np.abs(ref["values"]), 1e-30)))
            within = None if budget is None else used <= budget
            name = "none" if budget is None else f"{budget / MIB:.0f}"
            failed |= within is False or diff > 1e-4
            rows.append([name + (" (reference)" if budget == reference else ""),
                         r["samples_per_step"], r["chunk"] or "default", r["before"] / MIB,
                         r["peak"] / MIB, used / MIB,
                         "" if budget is None else f"{used / budget:.2f}",
                         {None: "", True: "yes", False: "NO"}[within], used_warm / MIB,
                         "" if budget is None else f"{used_warm / budget:.2f}",
                         r["seconds"], r["seconds"] / ref["seconds"], diff])
            records.append({"budget": budget, **{k: v for k, v in r.items() if k != "values"},
                            "max_rel_diff": diff})
    what = "CUDA allocated" if args.device.startswith("cuda") else "resident (ru_maxrss)"
    print(f"{args.model}, batch {args.batch} x 3 x {args.image_size}^2, {args.classes} outputs, "
          f"channel level ({ref['channels']} conv channels), reverse mode, {args.device}; "
          f"memory: {what}, MiB")
    print(format_table(rows, ["budget MiB", "samples/step", "vmap chunk", "before", "peak",
                              "peak - before", "used / budget", "within",
                              "peak - warm", "warm used / budget", "seconds", "time vs reference",
                              "max rel diff"], floatfmt=".3g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": records}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
