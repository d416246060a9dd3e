"""G-NDI estimators (reverse, forward, probes; path steps; readouts) and exact ablations.

Everything runs on one :class:`~fxgndi.graph.InterventionGraph`:

* reverse mode: K vector-Jacobian products w.r.t. every alpha at once (``torch.func.vjp``
  under ``vmap`` over one-hot output cotangents), whatever the number of sites or channels;
* forward mode: one ``torch.func.jvp`` per site or channel (``vmap`` over one-hot tangents),
  also the engine of the path-integrated estimator, whose points differ per site;
* probes (p = 2): ``E_z[(z^T J v)^2] = ||J v||^2`` with Rademacher ``z``, for wide heads;
* ablation: ``alpha = 1`` for one site (or channel) at a time, batched with ``vmap``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from .checkpoint import check_world, load_state, rank_path, save_state
from .distributed import all_reduce_sums, my_batches, rank_and_world
from .errors import DataError, FxgndiError, NonFiniteError
from .graph import InterventionGraph, intervene
from .runtime import device_of, eval_mode, on_device
from .scores import Scores, Unit
from .sites import SiteSpec
from .streams import RunningMoments, first_batch, iter_batches, require_reiterable

READOUTS = ("logits", "probs", "loss", "margin")
MODES = ("auto", "reverse", "forward", "probe")
METRICS = ("accuracy", "loss", "logit_l2", "kl")
_SAMPLES_PER_CHUNK = 256  # vmapped batch size (chunk x B) kept under this by default


def readout(logits: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The output whose change G-NDI measures, shape [B, K].

    ``logits`` [B, K]; ``probs`` softmax [B, K]; ``loss`` per-sample cross-entropy [B, 1];
    ``margin`` true-class logit minus the best other logit [B, 1].

    Example:
        >>> readout(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), "margin")
        tensor([[2.]])
    """
    if kind == "logits":
        return logits
    if kind == "probs":
        return logits.softmax(-1)
    if kind not in READOUTS:
        raise ValueError(f"unknown readout {kind!r}: use one of {READOUTS}")
    if y is None:
        raise DataError(f"readout '{kind}' needs labels: pass batches of (x, y)")
    if kind == "loss":
        return F.cross_entropy(logits, y, reduction="none").unsqueeze(-1)
    true = logits.gather(-1, y.unsqueeze(-1))
    others = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), -math.inf)
    return true - others.amax(-1, keepdim=True)


def score(model: nn.Module | InterventionGraph, data: Iterable, *, sites: SiteSpec = "conv",
          granularity: str = "layer", baseline: Any = "zero", p: float = 2, steps: int = 1,
          readout: str = "logits", mode: str = "auto", chunk_size: int | None = None,
          channels: Sequence[tuple[str, int]] | None = None, probes: int = 64,
          seed: int = 0, device: torch.device | str | None = None,
          max_batches: int | None = None, progress: bool = True,
          leaf_modules: Sequence[str | type] = (), max_memory: int | str | None = None,
          checkpoint: str | os.PathLike | None = None, resume: bool = False,
          save_every: int = 50) -> Scores:
    """G-NDI importance of every site (or channel): ``E_x || d f(x) / d alpha ||_p``.

    Args:
        model: a traceable model (never modified), or an InterventionGraph to reuse (then
            ``sites``, ``granularity`` and ``baseline`` are taken from it).
        data: DataLoader or iterable of ``(x, y)`` or ``x``; labels only for loss/margin.
        steps: 1 is the paper's first-order G-NDI; ``m`` averages the tangent at the path
            midpoints ``(j + 1/2) / m`` before the norm (converges to the exact effect).
        readout: ``logits``, ``probs``, ``loss`` (per-sample CE) or ``margin``.
        mode: ``reverse`` (K VJPs), ``forward`` (one JVP per unit), ``probe`` (``probes``
            Rademacher VJPs, p = 2 only) or ``auto`` (the cheapest exact one).
        chunk_size: units (forward) or cotangents (reverse) per vmap call.
        channels: score only these ``(site, channel)`` pairs (implies channel granularity);
            forward mode then costs one JVP per listed channel.
        max_memory: bytes (or ``"4GB"``, ``"512MiB"``) for the activations and tangents of
            one step: batches are split and vmap chunks sized to fit (model weights and the
            input batch are not counted). Results do not change.
        checkpoint: a file for the partial sums, saved atomically every ``save_every``
            batches, at the end, and when the run is interrupted; ``resume=True`` continues
            from it (same settings, same data in the same order: a shuffling loader must be
            seeded afresh) and gives the uninterrupted result.

    Under ``torchrun`` (an initialised ``torch.distributed`` group) each rank scores the
    batches ``i`` with ``i % world == rank`` and the sums are all-reduced: every rank returns
    the result of one process.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> s = score(m, [torch.randn(4, 3, 32, 32)], sites="conv", progress=False)
        >>> len(s.values)
        20
    """
    _check_choice("readout", readout, READOUTS)
    _check_choice("mode", mode, MODES)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if p <= 0:
        raise ValueError(f"p must be positive, not {p}")
    if mode == "probe" and p != 2:
        raise ValueError("probe mode estimates the 2-norm only: use p=2 or mode='reverse'")
    if mode in ("reverse", "probe") and steps > 1:
        raise ValueError("path integration evaluates each site at its own point on the path: "
                         "use mode='forward' or 'auto' with steps > 1")
    budget = parse_bytes(max_memory)
    start = time.perf_counter()
    graph, device, units = _prepare(model, data, sites, granularity, baseline, device,
                                    leaf_modules, progress, channels)
    chosen, plan, costs = mode, {}, {}

    def norms_of_batch(x: torch.Tensor, y: torch.Tensor | None, index: int) -> torch.Tensor:
        nonlocal chosen
        if y is not None:
            _check_labels(graph(x[:1]), y)
        k_out = _readout_width(graph, x, y, readout)
        if chosen == "auto":
            chosen = "forward" if steps > 1 or len(units) < k_out else "reverse"
        z = None
        if chosen == "probe":  # drawn per batch, so that shards and resumed runs agree
            generator = torch.Generator().manual_seed(_batch_seed(seed, index))
            z = (2 * torch.randint(0, 2, (probes, x.shape[0], k_out), generator=generator) - 1)

        def step(xs, ys, chunk, lo=0):
            return _norms(graph, xs, ys, readout, chosen, units, p, steps, chunk,
                          None if z is None else z[:, lo:lo + xs.shape[0]])

        def trial(xs, ys, n):  # the step on n vmapped copies (outputs, probes or units)
            if chosen == "reverse":
                dtype = next(graph.parameters()).dtype
                cot = torch.eye(k_out, dtype=dtype, device=xs.device)[:n, None, :]
                reverse_tangents(graph, xs, ys, readout, n, cot.expand(n, xs.shape[0], k_out))
            elif chosen == "probe":
                _probe_norms(graph, xs, ys, readout, z[:n, :xs.shape[0]], n, units)
            else:
                forward_tangents(graph, xs, ys, readout, units[:n], 0.0, n)

        copies = {"reverse": k_out, "probe": probes, "forward": len(units)}[chosen]
        piece, chunk = _plan(trial, x, y, copies, budget, chunk_size,
                             costs.setdefault((tuple(x.shape[1:]), chosen), {}))
        plan.update(samples_per_step=piece, chunk=chunk)
        norms = torch.cat([step(xs, ys, chunk, lo) for lo, xs, ys in _pieces(x, y, piece)], 0)
        _check_finite(norms, units, "G-NDI tangents")
        return norms

    settings = {"estimator": "gndi", "readout": readout, "p": p, "steps": steps, "mode": mode,
                "probes": probes if mode == "probe" else None, "seed": seed,
                "baseline": baseline if isinstance(baseline, str) else "custom",
                "units": units,
                "max_batches": max_batches}
    with eval_mode(graph), torch.no_grad():
        stats = _accumulate(data, units, norms_of_batch, device=device, max_batches=max_batches,
                            need_labels=readout in ("loss", "margin"),
                            why=f"readout '{readout}'", desc="G-NDI", progress=progress,
                            checkpoint=checkpoint, resume=resume, save_every=save_every,
                            settings=settings)
    meta = {"readout": readout, "p": p, "steps": steps, "mode": chosen,
            "baseline": baseline if isinstance(baseline, str) else "custom",
            "granularity": graph.granularity, **_memory_meta(budget, plan)}
    return Scores(units, stats.mean.numpy(), stats.stderr.numpy(), stats.count, "gndi",
                  time.perf_counter() - start, meta)


def ablate(model: nn.Module | InterventionGraph, data: Iterable, *, sites: SiteSpec = "conv",
           granularity: str = "layer", baseline: Any = "zero", metric: str = "accuracy",
           channels: Sequence[tuple[str, int]] | None = None, chunk_size: int | None = None,
           device: torch.device | str | None = None, max_batches: int | None = None,
           progress: bool = True, leaf_modules: Sequence[str | type] = (),
           max_memory: int | str | None = None, checkpoint: str | os.PathLike | None = None,
           resume: bool = False, save_every: int = 50) -> Scores:
    """The exact effect of ``do(h := b)`` (alpha = 1) at each site, or each listed channel.

    Metrics: ``accuracy`` (drop in top-1 accuracy), ``loss`` (increase in mean cross-entropy),
    ``logit_l2`` (E_x of the L2 norm of the change of the logits), ``kl``
    (E_x KL(p_original || p_intervened)). Interventions are batched with ``vmap``.
    ``max_memory``, ``checkpoint``, ``resume``, ``save_every`` and ``torchrun`` work as in
    :func:`score`.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> a = ablate(m, [torch.randn(4, 3, 32, 32)], sites="layer4.*", metric="logit_l2",
        ...            progress=False)
        >>> a.names[:2]
        ['layer4.0.conv1', 'layer4.0.bn1']
    """
    _check_choice("metric", metric, METRICS)
    budget = parse_bytes(max_memory)
    start = time.perf_counter()
    graph, device, units = _prepare(model, data, sites, granularity, baseline, device,
                                    leaf_modules, progress, channels)

    plan, costs = {}, {}

    def step(xs: torch.Tensor, ys: torch.Tensor | None, chunk: int | None) -> torch.Tensor:
        reference = graph(xs)
        _check_labels(reference, ys)
        effects = [_effect(reference, o, ys, metric)
                   for o in ablated_outputs(graph, xs, units, chunk)]
        return torch.cat(effects, 0).T  # [B, units]

    def trial(xs: torch.Tensor, ys: torch.Tensor | None, n: int) -> None:
        graph(xs)
        list(ablated_outputs(graph, xs, units[:n], n))

    def effects_of_batch(x: torch.Tensor, y: torch.Tensor | None, index: int) -> torch.Tensor:
        piece, chunk = _plan(trial, x, y, len(units), budget, chunk_size,
                             costs.setdefault(tuple(x.shape[1:]), {}))
        plan.update(samples_per_step=piece, chunk=chunk)
        values = torch.cat([step(xs, ys, chunk) for _, xs, ys in _pieces(x, y, piece)], 0)
        _check_finite(values, units, "ablation effects")
        return values

    settings = {"estimator": "ablation", "metric": metric,
                "baseline": baseline if isinstance(baseline, str) else "custom",
                "units": units,
                "max_batches": max_batches}
    with eval_mode(graph), torch.no_grad():
        stats = _accumulate(data, units, effects_of_batch, device=device,
                            max_batches=max_batches, need_labels=metric in ("accuracy", "loss"),
                            why=f"metric '{metric}'", desc="ablate", progress=progress,
                            checkpoint=checkpoint, resume=resume, save_every=save_every,
                            settings=settings)
    meta = {"metric": metric, "baseline": baseline if isinstance(baseline, str) else "custom",
            "granularity": graph.granularity, **_memory_meta(budget, plan)}
    return Scores(units, stats.mean.numpy(), stats.stderr.numpy(), stats.count, "ablation",
                  time.perf_counter() - start, meta)


def _accumulate(data: Iterable, units: Sequence[Unit],
                per_batch: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor], *,
                device: torch.device, max_batches: int | None, need_labels: bool, why: str,
                desc: str, progress: bool, checkpoint: str | os.PathLike | None, resume: bool,
                save_every: int, settings: dict[str, Any]) -> RunningMoments:
    """The one accumulation path of score and ablate: this rank's batches (resumed where a
    saved state left off), per-sample values into running sums, the sums saved every
    ``save_every`` batches and on interruption, then summed over ranks."""
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1 batch, not {save_every}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH (the file the run saved)")
    rank, world = rank_and_world()
    stats = RunningMoments(len(units))
    settings = {**settings, "world": world}
    path = None if checkpoint is None else rank_path(checkpoint, rank, world)
    done = 0
    if resume:
        check_world(checkpoint, world)
        saved = load_state(path, settings=settings)
        if saved is not None:
            stats.load_state_dict(saved["sums"])
            done = saved["batches"]

    def save(complete: bool = False) -> None:
        if path is not None:
            save_state(path, settings=settings, batches=done, sums=stats.state_dict(),
                       complete=complete)

    batches = iter_batches(my_batches(data, start=done, max_batches=max_batches),
                           device=device, need_labels=need_labels, why=why,
                           allow_empty=world > 1 or done > 0)
    try:
        for x, y in tqdm(batches, desc=desc, disable=not progress or rank != 0,
                         initial=done):
            stats.update(per_batch(x, y, rank + done * world))
            done += 1
            if done % save_every == 0:
                save()
    except BaseException:
        save()  # what was summed so far is consistent: keep it for --resume
        raise
    save(complete=True)
    if world > 1:
        stats.load_state_dict(all_reduce_sums(stats.state_dict()))
    if stats.count == 0:
        raise DataError("the data yielded no batches (empty loader?): pass at least one batch")
    return stats


def _batch_seed(seed: int, index: int) -> int:
    """A seed for batch ``index`` of a run seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _norms(graph, x, y, kind, mode, units, p, steps, chunk, z) -> torch.Tensor:
    """Per-sample p-norms [B, U] of the tangents of ``units`` on one batch, in ``mode``."""
    if mode == "reverse":
        return _norms_of(reverse_tangents(graph, x, y, kind, chunk), units, p)
    if mode == "probe":
        return _probe_norms(graph, x, y, kind, z, chunk, units)
    tangents = [forward_tangents(graph, x, y, kind, units,
                                 (j + 0.5) / steps if steps > 1 else 0.0, chunk)
                for j in range(steps)]
    return torch.linalg.vector_norm(torch.stack(tangents).mean(0), ord=p, dim=-1)


def reverse_tangents(graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                     kind: str = "logits", chunk_size: int | None = None,
                     cotangents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tangents ``d readout / d alpha`` of every site at alpha = 0, by K reverse passes.

    Returns site name -> [B, K] (layer) or [B, C, K] (channel). With ``cotangents`` [R, B, K]
    (e.g. random probes) the last dim is R projections instead of K outputs.

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), sites="linear")
        >>> reverse_tangents(g, torch.randn(4, 3), None)["0"].shape
        torch.Size([4, 2])
    """
    alphas = _zero_alphas(graph, x)

    def f(a: dict[str, torch.Tensor]) -> torch.Tensor:
        return readout(graph(x, alphas=a), y, kind)

    with _transformable_attention():
        out, vjp_fn = torch.func.vjp(f, alphas)
        if cotangents is None:
            k = out.shape[-1]
            eye = torch.eye(k, dtype=out.dtype, device=out.device)
            cotangents = eye[:, None, :].expand(k, out.shape[0], k)
        chunk = chunk_size or max(1, _SAMPLES_PER_CHUNK // x.shape[0])
        (grads,) = torch.func.vmap(vjp_fn, chunk_size=chunk)(cotangents)
    return {name: g.movedim(0, -1) for name, g in grads.items()}


def forward_tangents(graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                     kind: str, units: Sequence[Unit], t: float = 0.0,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Tangent ``d readout / d alpha_u`` of each unit at ``alpha_u = t`` (others 0): [B, U, K].

    One JVP per unit, ``vmap``-ed over chunks of units.

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), sites="linear")
        >>> forward_tangents(g, torch.randn(4, 3), None, "logits", [("0", None)]).shape
        torch.Size([4, 1, 2])
    """
    def f(a: dict[str, torch.Tensor]) -> torch.Tensor:
        return readout(graph(x, alphas=a), y, kind)

    def jvp(primal, tangent):
        return torch.func.jvp(f, (primal,), (tangent,))[1]

    chunk = chunk_size or max(1, _SAMPLES_PER_CHUNK // x.shape[0])
    outs = []
    for lo in range(0, len(units), chunk):
        tangents = _one_hot_alphas(graph, x, units[lo:lo + chunk])
        primals = {name: v * t for name, v in tangents.items()}
        with _transformable_attention():
            outs.append(torch.func.vmap(jvp)(primals, tangents))  # [U, B, K]
    return torch.cat(outs, 0).movedim(0, 1)


def ablated_outputs(graph: InterventionGraph, x: torch.Tensor, units: Sequence[Unit],
                    chunk_size: int | None = None) -> Iterable[torch.Tensor]:
    """Model outputs with ``alpha_u = 1`` for each unit in turn, as chunks of [U, B, K].

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), sites="linear")
        >>> next(iter(ablated_outputs(g, torch.randn(4, 3), [("0", None), ("1", None)]))).shape
        torch.Size([2, 4, 2])
    """
    chunk = chunk_size or max(1, _SAMPLES_PER_CHUNK // x.shape[0])
    for lo in range(0, len(units), chunk):
        alphas = _one_hot_alphas(graph, x, units[lo:lo + chunk])
        with _transformable_attention():
            out = torch.func.vmap(lambda a: graph(x, alphas=a))(alphas)
        yield out


def _prepare(model, data, sites, granularity, baseline, device, leaf_modules, progress,
             channels=None):
    """The graph to work on (right device, shapes, baselines), its device and the units:
    every site or channel, or the listed ``channels`` (which imply channel granularity)."""
    graph, device = _prepare_graph(model, data, sites,
                                   "channel" if channels is not None else granularity,
                                   baseline, device, leaf_modules, progress)
    units = _all_units(graph) if channels is None else _check_units(graph, channels)
    return graph, device, units


def _prepare_graph(model, data, sites, granularity, baseline, device, leaf_modules, progress):
    require_reiterable(data)
    if isinstance(model, InterventionGraph):
        graph = model
        target = torch.device(device) if device is not None else device_of(graph)
        if target != device_of(graph):
            raise ValueError("an InterventionGraph is used on its own device; build it on "
                             f"{target} (move the model there first)")
        if any(s.shape is None for s in graph.sites):
            example = first_batch(iter_batches(data, device=target))
            check_accepts(graph, example)
            with eval_mode(graph):
                graph.describe(example[:1])
        return graph, target
    model, target = on_device(model, device)
    example = first_batch(iter_batches(data, device=target))
    check_accepts(model, example)
    # One sample records the shapes: a whole batch would cost memory outside max_memory.
    graph = intervene(model, sites, granularity=granularity, baseline=baseline, data=data,
                      example_inputs=example[:1], leaf_modules=leaf_modules, progress=progress)
    return graph, target


def check_accepts(model: nn.Module, x: torch.Tensor) -> None:
    """Raise DataError, naming the shape, when ``model`` fails on one sample of ``x``.

    Example:
        >>> check_accepts(nn.Linear(3, 2), torch.zeros(4, 5))
        Traceback (most recent call last):
        ...
        fxgndi.errors.DataError: the model rejects inputs of shape (4, 5) (RuntimeError: ...
    """
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    except FxgndiError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"the model rejects inputs of shape {tuple(x.shape)} "
                        f"({type(exc).__name__}: {reason}); feed it the input size and "
                        "channels it was built for (e.g. --image-size), or load the matching "
                        "model") from exc


def _all_units(graph: InterventionGraph) -> list[Unit]:
    if graph.granularity == "layer":
        return [(s.name, None) for s in graph.sites]
    return [(s.name, c) for s in graph.sites for c in range(s.channels)]


def _check_units(graph: InterventionGraph, channels: Sequence[tuple[str, int]]) -> list[Unit]:
    if graph.granularity != "channel":
        raise ValueError("listing channels needs an InterventionGraph built with "
                         "granularity='channel'")
    sizes = {s.name: s.channels for s in graph.sites}
    units = []
    for site, c in channels:
        if site not in sizes:
            raise ValueError(f"channel ({site!r}, {c}) names no selected site; sites: "
                             f"{', '.join(sizes)}")
        if not 0 <= int(c) < sizes[site]:
            raise ValueError(f"channel {c} is out of range for site '{site}' with "
                             f"{sizes[site]} channels")
        units.append((site, int(c)))
    return units


def _zero_alphas(graph: InterventionGraph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    b = x.shape[0]
    dtype = next(graph.parameters()).dtype if any(True for _ in graph.parameters()) \
        else torch.float32
    if graph.granularity == "layer":
        return {s.name: torch.zeros(b, dtype=dtype, device=x.device) for s in graph.sites}
    return {s.name: torch.zeros(b, s.channels, dtype=dtype, device=x.device)
            for s in graph.sites}


def _one_hot_alphas(graph: InterventionGraph, x: torch.Tensor,
                    units: Sequence[Unit]) -> dict[str, torch.Tensor]:
    """Alphas batched over units: entry u is 1 at unit u and 0 elsewhere, shape [U, B(, C)]."""
    zeros = _zero_alphas(graph, x)
    involved = {s for s, _ in units}
    alphas = {name: z.unsqueeze(0).repeat(len(units), *([1] * z.dim()))
              for name, z in zeros.items() if name in involved}
    for u, (site, c) in enumerate(units):
        if c is None:
            alphas[site][u] = 1
        else:
            alphas[site][u, :, c] = 1
    return alphas


def _norms_of(tangents: dict[str, torch.Tensor], units: Sequence[Unit],
              p: float) -> torch.Tensor:
    """Per-sample p-norms [B, U] of the tangents of ``units`` (in units order)."""
    per_site = {name: torch.linalg.vector_norm(t, ord=p, dim=-1) for name, t in tangents.items()}
    cols = [per_site[s] if c is None else per_site[s][:, c] for s, c in units]
    return torch.stack(cols, 1)


def _probe_norms(graph, x, y, kind, z, chunk_size, units) -> torch.Tensor:
    """Rademacher estimate of the per-sample 2-norms: sqrt(mean_r (z_r^T J v)^2), with the
    signs ``z`` [R, B, K] drawn by the caller."""
    z = z.to(device=x.device, dtype=next(graph.parameters()).dtype)
    projections = reverse_tangents(graph, x, y, kind, chunk_size, cotangents=z)
    rms = {name: t.pow(2).mean(-1).sqrt() for name, t in projections.items()}
    cols = [rms[s] if c is None else rms[s][:, c] for s, c in units]
    return torch.stack(cols, 1)


def _readout_width(graph: InterventionGraph, x, y, kind: str) -> int:
    with torch.no_grad():
        return readout(graph(x[:1]), None if y is None else y[:1], kind).shape[-1]


def _effect(reference: torch.Tensor, ablated: torch.Tensor, y: torch.Tensor | None,
            metric: str) -> torch.Tensor:
    """Per-sample effect [U, B] of each intervention on the outputs ``ablated`` [U, B, K]."""
    if metric == "logit_l2":
        return torch.linalg.vector_norm(ablated - reference, dim=-1)
    if metric == "kl":
        log_p = reference.log_softmax(-1)
        return (log_p.exp() * (log_p - ablated.log_softmax(-1))).sum(-1)
    if metric == "accuracy":
        correct = (reference.argmax(-1) == y).to(reference.dtype)
        return correct - (ablated.argmax(-1) == y).to(reference.dtype)
    ce = F.cross_entropy(ablated.flatten(0, 1), y.repeat(ablated.shape[0]), reduction="none")
    return ce.view(ablated.shape[:2]) - F.cross_entropy(reference, y, reduction="none")


def parse_bytes(size: int | float | str | None) -> int | None:
    """A memory size in bytes: an int, or a string such as ``"4GB"``, ``"512MiB"``, ``"2e9"``.

    Example:
        >>> parse_bytes("1.5GiB"), parse_bytes("200MB"), parse_bytes(None)
        (1610612736, 200000000, None)
    """
    if size is None:
        return None
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = float(size)
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)\s*", str(size).lower())
        if not match:
            raise ValueError(f"cannot read the memory size {size!r}: write bytes or a number "
                             "with a unit, e.g. 4GB, 512MiB")
        unit = match.group(2).rstrip("b")
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
                 "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}[unit]
        value = float(match.group(1)) * scale
    if value <= 0:
        raise ValueError(f"max_memory must be positive, not {size!r}")
    return int(value)


def _plan(trial: Callable[[torch.Tensor, torch.Tensor | None, int], Any], x: torch.Tensor,
          y: torch.Tensor | None, copies: int, budget: int | None, chunk_size: int | None,
          cost: dict[str, int]) -> tuple[int, int | None]:
    """``(samples per piece, vmap chunk)`` that keep one step within ``budget`` bytes.

    ``trial(x, y, n)`` runs the step on ``n`` vmapped copies only. Memory on ``b`` samples
    with a chunk of ``c`` copies is bounded by ``b * (fixed + c * per_copy)``, both measured
    on one sample by :func:`created_bytes` (every tensor the step creates, counted as if none
    were freed: an upper bound) with one and with two copies. ``copies`` caps the chunk
    (outputs for reverse mode, units for forward mode and ablations); ``cost`` caches the
    measurement (one per input shape and mode).
    """
    if budget is None:
        return x.shape[0], chunk_size
    if not cost:
        one = x[:1], None if y is None else y[:1]
        single = created_bytes(lambda: trial(*one, 1))
        per_copy = created_bytes(lambda: trial(*one, 2)) - single if copies > 1 else single
        cost["per_copy"] = max(per_copy, 1)
        cost["fixed"] = max(single - cost["per_copy"], 0)
    fixed, per_copy = cost["fixed"], cost["per_copy"]
    piece = min(x.shape[0], budget // (fixed + per_copy))
    if piece < 1:
        raise ValueError(f"max_memory={budget / 2 ** 20:.0f} MiB is below the "
                         f"{(fixed + per_copy) / 2 ** 20:.1f} MiB that one sample needs for "
                         f"inputs of shape {tuple(x.shape[1:])}: raise max_memory or use "
                         "smaller inputs")
    fit = max(1, (budget // piece - fixed) // per_copy)
    return piece, int(min(fit, copies, chunk_size or fit))


def created_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of all the tensors that ``fn()`` creates (views and in-place results excluded).

    An upper bound of its peak tensor memory: frees are not subtracted.

    Example:
        >>> created_bytes(lambda: torch.zeros(4, 8).add(1).relu_())
        256
    """
    counter = _ByteCounter()
    with counter:
        fn()
    return counter.total


class _ByteCounter(TorchDispatchMode):
    """Sums the bytes of every tensor an aten operation returns (views and in-place ops
    return no new memory and are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        aliasing = any(r.alias_info is not None for r in schema.returns)
        if not aliasing:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    size = t.numel() * t.element_size()
                    self.total += size
                    self.largest = max(self.largest, size)
        return out


def _memory_meta(budget: int | None, plan: dict[str, Any]) -> dict[str, Any]:
    """``max_memory`` and the split it chose (of the last batch), for Scores.meta."""
    return {} if budget is None else {"max_memory": budget, **plan}


def _pieces(x: torch.Tensor, y: torch.Tensor | None, piece: int
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(offset, x, y)`` slices of at most ``piece`` samples."""
    for lo in range(0, x.shape[0], piece):
        yield lo, x[lo:lo + piece], None if y is None else y[lo:lo + piece]


def _check_labels(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    """Labels must index the model's outputs: a mismatch means the wrong model or data."""
    if y is None or y.dtype.is_floating_point or y.dim() != 1 or y.numel() == 0:
        return
    classes = logits.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"the data has labels up to {hi}, but the model has {classes} outputs: "
                        f"build the model with num_classes={hi + 1} or more (--num-classes), "
                        "or use the data it was trained on")


def _check_finite(values: torch.Tensor, units: Sequence[Unit], what: str) -> None:
    bad = ~torch.isfinite(values).all(0)
    if bool(bad.any()):
        names = [f"{s}" if c is None else f"{s}[{c}]" for (s, c), b in zip(units, bad) if b]
        raise NonFiniteError(f"NaN or Inf in {what} at {', '.join(names[:10])}: check the "
                             "model's activations on this data (overflow, log of zero)")


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")


@contextlib.contextmanager
def _transformable_attention():
    """Attention kernels that torch.func can transform and batch.

    Forward-mode AD fails through the fused attention kernels on CPU, and neither
    ``_native_multi_head_attention`` nor the flash backward has a vmap batching rule (vmap
    would loop over the batch in Python): use the math kernel and MHA's plain path.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha else None
    if mha:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha:
            mha.set_fastpath_enabled(fastpath)
