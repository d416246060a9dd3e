"""How much of a CPU model's eager time is page faults, and what a steady heap gives back.

    python benchmarks/heap.py                                   # 4 models, batch 32, 112 px
    python benchmarks/heap.py --models mobilenet_v2 --batch 8 --image-size 224 --repeat 9

glibc maps every block above its mmap threshold (at most 32 MiB by default) afresh and unmaps
it at free, so each call of a model with large activations faults them in again
(:mod:`fxgndi.core.heap`). For each torchvision model (``weights=None``, eval, one thread,
``torch.inference_mode``) and each heap setting, a fresh interpreter (no allocation history)
times ``--repeat`` calls after ``--warmup`` and reports the medians of the wall time, the
kernel (system) time and the minor page faults per call:

* ``system``: glibc as a process starts;
* ``tunables``: the same process started with ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB, what a deployment can set without fxgndi;
* ``steady``: :func:`fxgndi.core.heap.steady_heap` around the calls, what ``fxgndi.Latency``,
  ``fxgndi.bench`` and the scoring loops use.

The speed-up column is each setting's median time over ``system``'s, per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

SETTINGS = ("system", "tunables", "steady")
TUNABLES = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(name: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model's per-call medians in this (fresh) interpreter."""
    import contextlib
    import resource

    import torch

    from fxgndi.app.models import load_model
    from fxgndi.core.heap import steady_heap

    torch.set_num_threads(1)
    model = load_model(name, weights=None).eval()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size,
                    generator=torch.Generator().manual_seed(0))
    rows = []
    heap = steady_heap() if setting == "steady" else contextlib.nullcontext()
    with heap, torch.inference_mode():
        for i in range(args.warmup + args.repeat):
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            model(x)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            if i >= args.warmup:
                rows.append((wall, after.ru_stime - before.ru_stime,
                             after.ru_minflt - before.ru_minflt))
    return {"model": name, "heap": setting,
            **{key: statistics.median(r[i] for r in rows)
               for i, key in enumerate(("seconds", "system_seconds", "page_faults"))}}


def run(name: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter with ``setting``'s environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(TUNABLES if setting == "tunables" else {})}
    command = [sys.executable, __file__, "--child", name, setting, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--warmup", str(args.warmup),
               "--repeat", str(args.repeat)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "heap": setting, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict[str, Any]]) -> str:
    """The results as one table, with each setting's speed-up over ``system``."""
    from fxgndi.core.report import format_table

    base = {r["model"]: r.get("seconds") for r in results if r["heap"] == "system"}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["heap"], "-", "-", "-", r["error"]])
            continue
        ref = base.get(r["model"])
        rows.append([r["model"], r["heap"], f"{r['seconds'] * 1e3:.1f}",
                     f"{r['system_seconds'] * 1e3:.1f}", f"{r['page_faults']:.0f}",
                     f"{ref / r['seconds']:.2f}" if ref else "-"])
    return format_table(rows, ["model", "heap", "ms per call", "kernel ms", "page faults",
                               "speed-up vs system"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    if platform.libc_ver()[0] != "glibc":
        print("not glibc: nothing to measure (steady_heap does nothing here)")
        return 0
    results = [run(name, setting, args) for name in args.models for setting in SETTINGS]
    print(f"batch {args.batch}, {args.image_size} px, one thread, median of {args.repeat} calls "
          f"after {args.warmup}; {platform.machine()}, {platform.libc_ver()[1]} glibc")
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
