"""Overhead of the intervention graph at alpha = 0 against the plain model.

For every model (torchvision, ``weights=None``, 10 classes, eval mode, fixed seed), every batch
size and every conv and linear site, under ``torch.no_grad``:

* ``model(x)``: the original torchvision module;
* ``traced(x)``: ``fxgndi.trace(model)`` with no intervention nodes (diagnostic: what torch.fx
  codegen alone costs or saves);
* ``graph(x)``: the InterventionGraph with no alphas (every inserted node returns h untouched);
* ``graph(x, alphas=0)``: explicit zero alphas for every site (two elementwise ops per site).

Times come from ``torch.utils.benchmark.Timer`` with ``time.thread_time`` as the clock (CPU
time, one torch thread: robust to other processes on a shared machine), interleaved over
rounds (each round times every variant once, in rotating order); overheads are medians of the
per-round paired ratios. It checks ``torch.equal(model(x), graph(x))`` and the same with zero
alphas, and exits non-zero when an output differs (``--strict`` also fails on an overhead above 5%).

Example:
    python benchmarks/overhead.py --models resnet18 --batches 8
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

import fxgndi
from fxgndi.core.report import format_table
from fxgndi.core.runtime import torch_threads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scoring_speed import SITES, build_model, make_input, write_json  # noqa: E402

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16")
LIMIT = 0.05  # the bound on the no-alpha overhead
VARIANTS = ("model", "traced", "graph", "graph_zero")


def measure(fns: dict[str, Callable[[], Any]], *, rounds: int,
            block: float) -> dict[str, list[float]]:
    """Per-call CPU seconds of each function, one sample per function per round.

    The calls are interleaved: every round times each function once (``Timer.timeit`` with the
    same ``number`` of calls for all, sized so one sample lasts about ``block`` seconds),
    starting from a different function each round, so a change of load on the machine hits
    every variant alike and round r of one variant can be paired with round r of another.
    The clock is ``time.thread_time`` (CPU time of this thread; torch runs on it with one
    intra-op thread), so the time the thread spends descheduled by other processes is left out.
    """
    names = list(fns)
    timers = {n: Timer(stmt="fn()", globals={"fn": fns[n]}, timer=time.thread_time,
                       num_threads=torch.get_num_threads(), label=n) for n in names}
    first = fns[names[0]]
    first()  # warm-up
    single = timers[names[0]].timeit(1).median
    number = max(1, round(block / max(single, 1e-6)))
    for n in names:  # warm every variant
        timers[n].timeit(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timers[n].timeit(number).median)
    return times


def paired_overhead(times: dict[str, list[float]], variant: str, reference: str) -> float:
    """Median over rounds of ``variant / reference - 1`` (samples of the same round paired)."""
    return statistics.median(a / b - 1 for a, b in zip(times[variant], times[reference]))


def node_call_seconds(graph: fxgndi.InterventionGraph, repeat: int = 2000) -> float:
    """CPU seconds of one call of an inserted node with no alpha (it returns h untouched)."""
    node = graph.node(graph.site_names[0])
    h = torch.zeros(1)
    with torch.no_grad():
        for _ in range(100):
            node(h, None)
        start = time.thread_time()
        for _ in range(repeat):
            node(h, None)
    return (time.thread_time() - start) / repeat


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that a block of code dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """How many times ``fn()`` calls each aten operator (a noise-free view of the work)."""
    with torch.no_grad(), _OpCounter() as counter:
        fn()
    return counter.counts


def op_diff(ops: collections.Counter[str], reference: collections.Counter[str]) -> str:
    """``same``, or the operators called more (+) and less (-) often than in ``reference``."""
    more, less = ops - reference, reference - ops
    if not more and not less:
        return "same"
    parts = [f"+{n} {op.split('.')[-1]}" for op, n in sorted(more.items())]
    parts += [f"-{n} {op.split('.')[-1]}" for op, n in sorted(less.items())]
    return " ".join(parts)


def bench_model(name: str, *, batches: Sequence[int], image_size: int, rounds: int,
                block: float, seed: int = 0,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per batch size: median milliseconds, overheads, output equality."""
    model = build_model(name, image_size, seed)
    graph = fxgndi.intervene(model, SITES, example_inputs=make_input(2, image_size, seed))
    traced = fxgndi.trace(model)
    graph.eval(), traced.eval()
    node_s = node_call_seconds(graph)
    rows = []
    for batch in batches:
        x = make_input(batch, image_size, seed)
        zeros = {s: torch.zeros(batch) for s in graph.site_names}
        with torch.no_grad():
            reference = model(x)
            equal_none = torch.equal(reference, graph(x))
            equal_zero = torch.equal(reference, graph(x, alphas=zeros))
            equal_traced = torch.equal(reference, traced(x))
        ops_model = aten_ops(lambda: model(x))
        ops_traced = aten_ops(lambda: traced(x))
        ops_graph = aten_ops(lambda: graph(x))
        with torch.no_grad():
            fns = {"model": lambda: model(x), "traced": lambda: traced(x),
                   "graph": lambda: graph(x), "graph_zero": lambda: graph(x, alphas=zeros)}
            times = measure(fns, rounds=rounds, block=block)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "batch": batch, "image_size": image_size,
               "sites": len(graph.sites), "rounds": rounds,
               **{f"{k}_ms": 1e3 * v for k, v in med.items()},
               "traced_overhead": paired_overhead(times, "traced", "model"),
               "graph_overhead": paired_overhead(times, "graph", "model"),
               "graph_zero_overhead": paired_overhead(times, "graph_zero", "model"),
               "graph_vs_traced": paired_overhead(times, "graph", "traced"),
               **{f"{k}_min_ms": 1e3 * min(v) for k, v in times.items()},
               "graph_overhead_min": min(times["graph"]) / min(times["model"]) - 1,
               "graph_zero_overhead_min": min(times["graph_zero"]) / min(times["model"]) - 1,
               "node_call_us": 1e6 * node_s,
               "node_calls_share": len(graph.sites) * node_s / med["model"],
               "equal_none": equal_none, "equal_zero": equal_zero,
               "equal_traced": equal_traced,
               "ops_graph_vs_model": op_diff(ops_graph, ops_model),
               "ops_graph_vs_traced": op_diff(ops_graph, ops_traced),
               "times_s": times}
        log(f"[{name} b{batch}] " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()))
        rows.append(row)
    return rows


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per model and batch size."""
    headers = ["model", "batch", "sites", "model(x) ms", "traced ms", "traced overhead "
               "(control)", "graph(x) ms", "no-alpha overhead (min)", "graph(x, 0) ms",
               "zero-alpha overhead (min)", "graph vs traced", "node calls",
               "aten ops graph(x) vs traced / model", "equal (none / zero)"]
    out = [(r["model"], r["batch"], r["sites"], r["model_ms"], r["traced_ms"],
            f"{100 * r['traced_overhead']:+.1f}%", r["graph_ms"],
            f"{100 * r['graph_overhead']:+.1f}% ({100 * r['graph_overhead_min']:+.1f}%)"
            + (" OVER" if r["graph_overhead"] > LIMIT else ""),
            r["graph_zero_ms"],
            f"{100 * r['graph_zero_overhead']:+.1f}% ({100 * r['graph_zero_overhead_min']:+.1f}%)",
            f"{100 * r['graph_vs_traced']:+.1f}%", f"{100 * r['node_calls_share']:.2f}%",
            f"{r['ops_graph_vs_traced']} / {r['ops_graph_vs_model']}",
            f"{r['equal_none']} / {r['equal_zero']}") for r in rows]
    return format_table(out, headers)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--image-size", type=int, default=64,
                        help="input side in pixels; a multiple of 16 for vit_b_16")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; each times every variant once")
    parser.add_argument("--block", type=float, default=0.05,
                        help="about this many seconds per timed sample (Timer.timeit)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: stable on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true",
                        help="also exit non-zero when the no-alpha overhead exceeds 5%%")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if any(m.startswith("vit_") for m in args.models) and args.image_size % 16:
        parser.error("vit_b_16 needs --image-size a multiple of 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 when every output is bit-identical."""
    args = parse_args(argv)
    with torch_threads(args.threads):  # the caller's setting is restored afterwards
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    info = {"processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"config: {args.image_size} px, batches {args.batches}, sites conv+linear, eval, "
          f"torch.no_grad, {args.rounds} interleaved rounds of Timer.timeit (~{args.block} s "
          "a sample), CPU time (time.thread_time) of the one torch thread")
    start = time.perf_counter()
    rows = [row for name in args.models
            for row in bench_model(name, batches=args.batches, image_size=args.image_size,
                                   rounds=args.rounds, block=args.block,
                                   seed=args.seed, log=log)]
    print()
    print(results_table(rows))
    print()
    print("ms: median over rounds of the per-call CPU time. overhead: median over rounds of "
          "variant / model(x) - 1, each round's samples paired (interleaved, so load drift "
          "cancels); (min): min(variant) / min(model(x)) - 1, the least-disturbed samples. "
          "traced = fxgndi.trace(model) with no intervention nodes: the same kernels as "
          "model(x), so its overhead is a negative control that shows the noise level; "
          "graph vs traced = paired cost of the inserted nodes alone; node calls = sites x "
          "the measured CPU time of one inserted node called with no alpha, as a share of "
          "model(x): the structural overhead, free of noise; aten ops: the operators graph(x) "
          "dispatches, compared with traced and model (counted with a TorchDispatchMode). "
          "graph(x, 0) passes a zero alpha tensor [B] for every site.")
    equal = all(r["equal_none"] and r["equal_zero"] for r in rows)
    within = all(r["graph_overhead"] <= LIMIT for r in rows)
    for key, what in (("traced_overhead", "traced (control, same kernels, no nodes)"),
                      ("graph_overhead", "graph(x), no alphas"),
                      ("graph_zero_overhead", "graph(x, 0), zero alphas")):
        mean = statistics.geometric_mean(1 + r[key] for r in rows) - 1
        print(f"geometric mean over rows, {what}: {100 * mean:+.1f}%")
    same_ops = all(r["ops_graph_vs_traced"] == "same" for r in rows)
    print(f"graph(x) with no alphas dispatches exactly the aten ops of the traced model "
          f"(no intervention nodes) on every row: {'yes' if same_ops else 'NO'}")
    print(f"outputs bit-identical (torch.equal) with no alphas and with zero alphas: "
          f"{'PASS' if equal else 'FAIL'}")
    print(f"no-alpha overhead <= {100 * LIMIT:g}% on every row: {'PASS' if within else 'FAIL'}"
          f" (worst {100 * max(r['graph_overhead'] for r in rows):+.1f}%)")
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": rows})
    return 0 if equal and (within or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
