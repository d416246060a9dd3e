"""Inference speed of models and their exports: latency, throughput, MACs, params, memory.

:func:`bench` times every entry on the same random inputs: each is warmed up on its own, then
all are called in turn for ``repeat`` rounds (so that the machine's drifting speed falls on
all alike), and each one's speed-up against a baseline at the same batch size, named in the
``vs`` column, is the median of the per-round ratios: against the dense model *in the same
runtime*. An exported file (``.pt2``,
``.onnx``, ``.ts``) whose runtime no entry before it runs in is compared with the first entry
(the dense ``nn.Module``) exported by :func:`fxgndi.export` to the same format, batch setting
and input shape (a row ``"<first> as .onnx"``, from a temporary folder); any other entry with
the first entry before it of the same runtime, else with the first entry. A row whose
interquartile range exceeds ``noisy_iqr`` (20%) of its median, or whose baseline's does, says
``noisy: ...`` in its status: its speed-up is not to be trusted. Anything that cannot run (an
export that fixed the batch size, ``torch.compile`` without a compiler, onnxruntime on a GPU)
gets a row that says ``unavailable: <reason>`` instead of stopping the run.

Peak memory, over the warm-up calls of one model at one batch size (at least one): on CUDA,
``torch.cuda.max_memory_allocated`` minus the memory allocated before them (tensors only, not
the caching allocator's reserve). On CPU, the rise of the process's resident set size (RSS)
above its level before the first call: Linux's ``VmHWM``
after resetting it through ``/proc/self/clear_refs``; elsewhere ``resource.getrusage``'s
``ru_maxrss``, which only shows a rise above the process's earlier peak (a lower bound, often
0). RSS counts every allocation of the process, onnxruntime's arenas included. Before each
entry, glibc's free pages are handed back to the kernel (``malloc_trim``) so that memory freed by
earlier entries and reused by this one is counted; memory other allocators keep (onnxruntime's
arenas) is not counted again.

Timing runs under :func:`fxgndi.core.heap.steady_heap` unless ``steady_heap=False``: freed
memory stays in glibc's heap for reuse, as onnxruntime's arena keeps its own, so the eager and
exported-to-torch rows do not pay (and do not vary with) page faults of fresh large tensors
(43% of mobilenet_v2's eager time at batch 32 here); untimed rounds in that state come first,
until one barely page-faults.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from fxgndi.core.cost import count_macs_params
from fxgndi.core.heap import trim_free_memory
from fxgndi.core.names import EXPORT_FORMATS
from fxgndi.deploy.export import OnnxModule, artifact_info, export, format_of, load
from fxgndi.deploy.latency import interleaved_seconds
from fxgndi.core.report import format_table, pyplot, save_figure
from fxgndi.core.runtime import on_device, torch_threads


NOISY_IQR = 0.2  # a row whose IQR exceeds this fraction of its median is flagged noisy


@dataclass
class BenchRow:
    """One model at one batch size. Times in milliseconds per call; ``speedup`` is
    ``baseline``'s median over this one; ``status`` is ``"ok"``, ``"noisy: <why>"`` or
    ``"unavailable: <reason>"`` (then the timings are NaN)."""

    name: str
    kind: str
    batch: int
    median_ms: float = float("nan")
    q1_ms: float = float("nan")
    q3_ms: float = float("nan")
    throughput: float = float("nan")
    speedup: float = float("nan")
    macs: int | None = None
    params: int | None = None
    peak_mem_mb: float = float("nan")
    status: str = "ok"
    baseline: str = ""

    @property
    def iqr_ms(self) -> float:
        """Interquartile range of the per-call latency."""
        return self.q3_ms - self.q1_ms


@dataclass
class BenchReport:
    """What :func:`bench` measured: one row per model and batch size, and the settings.

    Example:
        >>> r = BenchReport([BenchRow("a", "eager", 1, 2.0, 1.9, 2.1, 500.0, 1.0)], {})
        >>> r.to_dict()["rows"][0]["speedup"]
        1.0
    """

    rows: list[BenchRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """Latency (median [IQR]), throughput, speed-up and the baseline it is against, MACs
        (per sample), params, peak memory, status.

        Example:
            >>> r = BenchReport([BenchRow("a", "eager", 1, 2.0, 1.9, 2.1, 500.0, 1.0)], {})
            >>> "speed-up" in r.table()
            True
        """
        rows = [(r.name, r.kind, r.batch, r.median_ms, r.iqr_ms, r.throughput, r.speedup,
                 r.baseline, _scaled(r.macs, 1e9), _scaled(r.params, 1e6), r.peak_mem_mb,
                 r.status) for r in self.rows]
        headers = ["model", "runs as", "batch", "median ms", "IQR ms", "samples/s",
                   "speed-up", "vs", "GMACs/sample", "M params", "peak MB", "status"]
        noisy = self.settings.get("noisy_iqr", NOISY_IQR)
        note = (f"{self.settings.get('device', '?')}, {self.settings.get('threads', '?')} "
                f"threads, input {self.settings.get('input_shape', '?')}, "
                f"{self.settings.get('repeat', '?')} timed calls after "
                f"{self.settings.get('warmup', '?')} warm-up; speed-up = the median of the "
                "'vs' row (the dense model in the same runtime where there is one) / this "
                f"median at the same batch; noisy: IQR above {noisy:.0%} of the median (this "
                f"row's or its baseline's); peak MB: {self.settings.get('memory', '?')}")
        return f"{format_table(rows, headers, floatfmt='.3g')}\n{note}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN becomes None).

        Example:
            >>> BenchReport([BenchRow("a", "eager", 1)], {}).to_dict()["rows"][0]["median_ms"]
        """
        rows = [{**{k: _json(v) for k, v in vars(r).items()}, "iqr_ms": _json(r.iqr_ms)}
                for r in self.rows]
        return {"rows": rows, "settings": self.settings}

    def plot(self, path: str | os.PathLike) -> None:
        """A bar chart of each entry's speed-up against its baseline, one bar group per batch.

        Example:
            >>> BenchReport([BenchRow("a", "eager", 1, speedup=1.0)], {}).plot("speed.png")
            ... # doctest: +SKIP
        """
        plt = pyplot()
        names = list(dict.fromkeys(r.name for r in self.rows))
        batches = sorted({r.batch for r in self.rows})
        width = 0.8 / max(len(batches), 1)
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) * len(batches)), 3.5))
        for j, batch in enumerate(batches):
            values = [next((r.speedup for r in self.rows if r.name == n and r.batch == batch),
                           float("nan")) for n in names]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [0.0 if v != v else v for v in values], width, label=f"batch {batch}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel("speed-up vs baseline (same runtime)")
        ax.legend()
        save_figure(fig, path)


def bench(models: Mapping[str, Any], *, input_shape: Sequence[int],
          batch_sizes: Sequence[int] = (1, 32), device: str | torch.device | None = None,
          threads: int | None = None, warmup: int = 3, repeat: int = 20,
          compile: bool = False, seed: int = 0, dense_exports: bool = True,
          noisy_iqr: float = NOISY_IQR, steady_heap: bool = True) -> BenchReport:
    """Time each model on random inputs of ``(batch, *input_shape)`` for every batch size.

    Args:
        models: name -> what to run, in order; the first (the dense model) is the baseline
            of the speed-ups, in each runtime (see ``dense_exports``). An ``nn.Module`` runs
            eagerly (copied to ``device`` if it lives elsewhere; never changed); a path
            (``.pt2``, ``.onnx``, ``.ts``, ``.pth``) is loaded with :func:`fxgndi.load`
            (``.onnx`` by onnxruntime with ``threads`` threads); a
            ``torch.export.ExportedProgram`` runs its ``.module()``; an
            ``onnxruntime.InferenceSession`` runs as it was made.
        input_shape: one sample's shape, e.g. ``(3, 224, 224)``.
        device: ``"cpu"`` (default) or a CUDA device.
        threads: torch's intra-op threads during the run (restored after), and onnxruntime's
            for the sessions this function makes; default: torch's current setting, for both.
        warmup, repeat: untimed and timed calls per model and batch size.
        compile: also run each ``nn.Module`` entry through ``torch.compile`` (a row
            ``"<name> compiled"``; compilation happens in the warm-up and is not timed).
        dense_exports: when the first entry is an ``nn.Module``, export it (to a temporary
            folder) to the format of each exported file whose runtime no earlier entry runs
            in, with the file's batch setting, so that the file's speed-up is against the
            dense model in its own runtime, not against eager PyTorch. False: such files are
            compared with the first entry (the ``vs`` column says so).
        noisy_iqr: a row whose interquartile range exceeds this fraction of its median (or
            whose baseline's does) has the status ``"noisy: ..."``.
        steady_heap: time with freed memory kept for reuse (:mod:`fxgndi.core.heap`);
            False: as the process's allocator is, page faults included.

    MACs and params are torch-pruning's counts per sample: counted on the module for
    ``nn.Module`` entries, read from the record :func:`fxgndi.export` stores in an artifact
    (MACs only when it was exported for the same ``input_shape``), else left empty.

    Example:
        >>> report = bench({"linear": nn.Linear(8, 2)}, input_shape=(8,), batch_sizes=(1, 4),
        ...                repeat=3)
        >>> [(r.batch, r.speedup, r.baseline) for r in report.rows]
        [(1, 1.0, 'linear'), (4, 1.0, 'linear')]
    """
    dev = torch.device(device or "cpu")
    shape = [int(s) for s in input_shape]
    if not models:
        raise ValueError("bench needs at least one model: models={'name': model, ...}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, not {batch_sizes!r}")
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, not {warmup} and {repeat}")
    if not noisy_iqr > 0:
        raise ValueError(f"noisy_iqr must be > 0 (a fraction of the median), not {noisy_iqr}")
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="fxgndi-bench-") as folder:
        entries = _entries(models, dev, shape, threads or torch.get_num_threads(), compile)
        if dense_exports:
            entries = _with_dense_exports(entries, next(iter(models.values())), folder, dev,
                                          shape, threads or torch.get_num_threads())
        _unique_names(entries)
        _choose_baselines(entries)
        with torch_threads(threads), torch.inference_mode():
            for batch in batch_sizes:
                x = torch.randn([int(batch), *shape],
                                generator=torch.Generator().manual_seed(seed))
                measured = _measure(entries, x.to(dev), dev, warmup, repeat, steady_heap)
                for row, times in measured.values():
                    _compare(row, times, *measured[row.baseline], noisy_iqr)
                rows.extend(row for row, _ in measured.values())
    settings = {"device": str(dev), "input_shape": shape, "batch_sizes": list(batch_sizes),
                "threads": threads if threads is not None else torch.get_num_threads(),
                "warmup": warmup, "repeat": repeat, "memory": _memory_method(dev),
                "noisy_iqr": noisy_iqr, "steady_heap": steady_heap, "torch": torch.__version__}
    return BenchReport(rows=rows, settings=settings)


def _compare(row: BenchRow, times: list[float], base: BenchRow, base_times: list[float],
             noisy_iqr: float) -> None:
    """Speed-up against ``base``: the median of the per-round ratios of their alternated
    calls; and the noisy flag: this row's or its baseline's IQR above ``noisy_iqr`` of the
    median."""
    if times and base_times:
        row.speedup = statistics.median(b / t for b, t in zip(base_times, times))
    if not row.status == "ok":
        return
    why = []
    for label, whose, r in (("IQR", "the", row), (f"baseline {base.name!r} IQR", "its", base)):
        spread = r.iqr_ms / r.median_ms
        if spread > noisy_iqr and (r is row or base is not row):
            why.append(f"{label} {spread:.0%} of {whose} median")
    if why:
        row.status = "noisy: " + "; ".join(why)


@dataclass
class _Entry:
    name: str
    kind: str
    run: Callable[..., Any] | None
    macs: int | None = None
    params: int | None = None
    error: str | None = None
    info: dict[str, Any] | None = None  # an exported file's record (None: not a file)
    baseline: str | None = None


def _with_dense_exports(entries: list[_Entry], dense: Any, folder: str, device: torch.device,
                        shape: list[int], threads: int) -> list[_Entry]:
    """``entries`` with, before each exported file whose runtime no earlier entry runs in,
    the dense model exported to the file's format, batch setting and input shape."""
    if not isinstance(dense, nn.Module) or isinstance(dense, torch.jit.ScriptModule):
        return entries
    out: list[_Entry] = []
    made: dict[tuple, _Entry] = {}
    for entry in entries:
        if (entry.info is not None and entry.run is not None and entry.kind != "eager"
                and all(e.kind != entry.kind for e in out)):
            fmt = entry.info.get("format")
            suffix = next((k for k, v in EXPORT_FORMATS.items() if v == fmt), None)
            if suffix is not None:
                dynamic = entry.info.get("dynamic_batch", True)
                batch = None if dynamic else entry.info.get("batch_size")
                key = (suffix, batch)
                if key not in made:
                    made[key] = _dense_export(entries[0].name, dense, suffix, batch, folder,
                                              device, shape, threads)
                    out.append(made[key])
                entry.baseline = made[key].name if made[key].run is not None else None
        out.append(entry)
    return out


def _dense_export(name: str, dense: nn.Module, suffix: str, batch: int | None, folder: str,
                  device: torch.device, shape: list[int], threads: int) -> _Entry:
    label = f"{name} as {suffix}" + (f", batch {batch}" if batch else "")
    path = os.path.join(folder, f"dense-{len(os.listdir(folder))}{suffix}")
    try:
        model, _ = on_device(dense, device)
        example = torch.randn([batch or 2, *shape], device=device)
        export(model, path, example_inputs=example, dynamic_batch=batch is None)
        entry = _entry(label, path, device, shape, threads)
    except Exception as exc:  # the file's row then says which baseline it got instead
        return _Entry(label, _KINDS.get(EXPORT_FORMATS[suffix], "?"), None,
                      error=f"export failed: {_reason(exc)}")
    return entry


def _unique_names(entries: list[_Entry]) -> None:
    """Rows that fxgndi adds (``compiled``, ``as .onnx``) may repeat a user's name."""
    seen: set[str] = set()
    for entry in entries:
        name, k = entry.name, 2
        while entry.name in seen:
            entry.name, k = f"{name} ({k})", k + 1
        seen.add(entry.name)


def _choose_baselines(entries: list[_Entry]) -> None:
    """Each entry's baseline, where ``_with_dense_exports`` set none: the first runnable
    entry before it of the same runtime, else the first entry."""
    for k, entry in enumerate(entries):
        if entry.baseline is None:
            entry.baseline = next((e.name for e in entries[:k]
                                   if e.kind == entry.kind and e.run is not None),
                                  entries[0].name)


def _entries(models: Mapping[str, Any], device: torch.device, shape: list[int],
             threads: int | None, compile: bool) -> list[_Entry]:
    entries = []
    for name, obj in models.items():
        try:
            entry = _entry(name, obj, device, shape, threads)
        except Exception as exc:  # one unloadable entry must not stop the others
            entry = _Entry(name, "?", None, error=_reason(exc))
        entries.append(entry)
        if compile and entry.kind == "eager" and entry.run is not None:
            entries.append(_compiled(entry))
    return entries


def _entry(name: str, obj: Any, device: torch.device, shape: list[int],
           threads: int | None) -> _Entry:
    if isinstance(obj, (str, os.PathLike)):
        loaded = load(obj, threads=threads)
        info = artifact_info(obj)
        if isinstance(loaded, OnnxModule) and device.type != "cpu":
            raise RuntimeError("fxgndi runs .onnx files on onnxruntime's CPU provider only")
        if isinstance(loaded, nn.Module) and not isinstance(loaded, OnnxModule):
            loaded = loaded.to(device)
        kind = info.get("format") or format_of(obj)
        macs = info.get("macs") if info.get("input_shapes", [None])[0] == shape else None
        if kind == "state_dict":  # a real module: count it like any eager one
            return _module_entry(name, loaded, device, shape)
        return _Entry(name, _KINDS.get(kind, kind), loaded, macs, info.get("params"),
                      info={"format": kind, **info})
    if isinstance(obj, torch.export.ExportedProgram):
        params = sum(t.numel() for t in obj.state_dict.values())
        return _Entry(name, "torch.export", obj.module().to(device), None, params)
    if type(obj).__name__ == "InferenceSession":  # onnxruntime, without importing it
        return _Entry(name, "onnxruntime", _session_runner(obj))
    if isinstance(obj, torch.jit.ScriptModule):
        return _Entry(name, "torchscript", obj.to(device).eval(), None,
                      sum(p.numel() for p in obj.parameters()))
    if isinstance(obj, nn.Module):
        return _module_entry(name, obj, device, shape)
    raise TypeError(f"cannot run {type(obj).__name__}: pass an nn.Module, a path of an "
                    "exported file, a torch.export.ExportedProgram or an onnxruntime "
                    "InferenceSession")


_KINDS = {"pt2": "torch.export", "onnx": "onnxruntime", "torchscript": "torchscript"}


def _module_entry(name: str, model: nn.Module, device: torch.device,
                  shape: list[int]) -> _Entry:
    model, _ = on_device(model, device)
    macs, params = count_macs_params(model, torch.zeros([1, *shape], device=device))
    # Timed in eval mode; a copy only when the user's model is in training mode.
    runner = model if not model.training else _eval_copy(model)
    return _Entry(name, "eager", runner, int(macs), int(params))


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).eval()


def _compiled(entry: _Entry) -> _Entry:
    try:
        runner = torch.compile(entry.run, dynamic=False)
    except Exception as exc:
        return _Entry(f"{entry.name} compiled", "torch.compile", None, entry.macs,
                      entry.params, _reason(exc))
    return _Entry(f"{entry.name} compiled", "torch.compile", runner, entry.macs, entry.params)


def _session_runner(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    return run


def _measure(entries: list[_Entry], x: torch.Tensor, device: torch.device, warmup: int,
             repeat: int, steady_heap: bool) -> dict[str, tuple[BenchRow, list[float]]]:
    """Each entry's row and timed seconds at one batch: every entry is warmed up on its own
    (its peak memory is read there), then all are timed in alternation (``repeat`` rounds in
    which each runs once) so that a change in the machine's speed falls on all alike."""
    rows: dict[str, tuple[BenchRow, list[float]]] = {}
    ready = []
    for entry in entries:
        row = BenchRow(name=entry.name, kind=entry.kind, batch=len(x), macs=entry.macs,
                       params=entry.params, baseline=entry.baseline or entry.name)
        rows[entry.name] = (row, [])
        if entry.run is None:
            row.status = f"unavailable: {entry.error}"
            continue
        try:
            with _peak_memory(device) as peak:  # from the first call: later ones reuse it
                for _ in range(max(warmup, 1)):  # at least one: compilation, allocations
                    entry.run(x)
                _sync(device)
        except Exception as exc:
            row.status = f"unavailable: {_reason(exc)}"
            continue
        row.peak_mem_mb = peak["mb"]
        ready.append(entry)
    timed = interleaved_seconds([lambda e=e: e.run(x) for e in ready], repeat=repeat,
                                warmup=0, device=device,
                                steady_heap=steady_heap) if ready else []
    for entry, times in zip(ready, timed):
        row, _ = rows[entry.name] = (rows[entry.name][0], times)
        ms = sorted(t * 1e3 for t in times)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        row.median_ms, row.q1_ms, row.q3_ms = statistics.median(ms), quartiles[0], quartiles[2]
        row.throughput = len(x) / (row.median_ms / 1e3)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict whose ``"mb"`` holds, on exit, the peak rise in MiB (see the module
    docstring for what is counted)."""
    out = {"mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        out["mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    trim_free_memory()
    if _can_reset_hwm():
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        yield out
        out["mb"] = max(0, _status_kb("VmHWM") - before) / 1024
        return
    before = _maxrss_kb()
    yield out
    out["mb"] = max(0, _maxrss_kb() - before) / 1024


def _can_reset_hwm() -> bool:
    return sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _maxrss_kb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA max_memory_allocated rise from the first call on"
    if _can_reset_hwm():
        return "RSS high-water rise from the first call on (Linux VmHWM, reset before)"
    return "ru_maxrss rise (a lower bound: 0 unless above the process's earlier peak)"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


def _scaled(value: int | None, unit: float) -> float | None:
    return None if value is None else value / unit


def _json(value: Any) -> Any:
    return None if isinstance(value, float) and value != value else value
