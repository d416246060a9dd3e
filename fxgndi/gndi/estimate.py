"""The two verbs of G-NDI on one intervention graph: ``score`` (the G-NDI estimate, by
:mod:`~fxgndi.gndi.tangents`) and ``ablate`` (the exact effect, by
:mod:`~fxgndi.gndi.ablation`), both run by the loop of :mod:`~fxgndi.gndi.run`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from fxgndi.core.checks import check_choice, check_finite
from fxgndi.core.names import DEFAULT_PROBES, METRICS, MODES, READOUTS
from fxgndi.core.options import RunKwargs, run_options
from fxgndi.core.runtime import eval_mode
from fxgndi.fx.intervention import InterventionGraph
from fxgndi.fx.sites import SiteSpec
from fxgndi.gndi.ablation import ablated_outputs, effect
from fxgndi.gndi.memory import memory_meta, pieces, plan_step
from fxgndi.gndi.readouts import check_labels, readout_width
from fxgndi.gndi.run import accumulate, prepare
from fxgndi.gndi.scores import Scores, unit_names
from fxgndi.gndi.tangents import (choose_mode, forward_tangents, probe_norms, probe_signs,
                                  reverse_tangents, unit_norms)

if TYPE_CHECKING:
    from typing_extensions import Unpack


def score(model: nn.Module | InterventionGraph, data: Iterable, *,
          sites: SiteSpec | None = None, granularity: str | None = None, baseline: Any = None,
          readout: str = "logits", steps: int = 1, p: float = 2, mode: str = "auto",
          probes: int = DEFAULT_PROBES, channels: Sequence[tuple[str, int]] | None = None,
          **run: Unpack[RunKwargs]) -> Scores:
    """G-NDI importance of every site (or channel): ``E_x || d f(x) / d alpha ||_p``.

    Args:
        model: a traceable model (never modified), or an InterventionGraph to reuse (it fixes
            ``sites``, ``granularity`` and ``baseline``: giving them too is an error).
        data: DataLoader or iterable of ``(x, y)`` or ``x``; labels only for loss/margin.
        sites, granularity, baseline: as :func:`fxgndi.intervene` (default ``"conv"``,
            ``"layer"``, ``"zero"``).
        readout: ``logits``, ``probs``, ``loss`` (per-sample CE) or ``margin``.
        steps: 1 is the paper's first-order G-NDI; ``m`` averages the tangent at the path
            midpoints ``(j + 1/2) / m`` before the norm (converges to the exact effect).
        p: the norm of the change of the readout.
        mode: how the tangents are computed: ``reverse`` (K VJPs), ``forward`` (one JVP per
            unit), ``probe`` (``probes`` Rademacher VJPs, p = 2 only) or ``auto`` (the
            cheaper exact one, or the probes when that costs at least twice as many passes:
            a head and a unit count both >= 2 x ``probes``, p = 2;
            :func:`fxgndi.gndi.tangents.choose_mode`).
            ``meta["mode"]`` says which ran.
        channels: score only these ``(site, channel)`` pairs (implies channel granularity);
            forward mode then costs one JVP per listed channel.
        **run: run options (:class:`fxgndi.RunOptions`): ``device``, ``max_batches``,
            ``max_memory`` (bytes or ``"4GB"`` for one step's activations and tangents:
            batches and vmap chunks are split to fit, results do not change),
            ``chunk_size``, ``progress``, ``seed`` (the probes), ``run_state`` / ``resume`` /
            ``save_every`` (partial sums saved atomically; a resumed run, on the same data in
            the same order, gives the uninterrupted result), ``leaf_modules``,
            ``concrete_args``.

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
    opts = run_options("score", run)
    check_choice("readout", readout, READOUTS)
    check_choice("mode", mode, MODES)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    if p <= 0:
        raise ValueError(f"p must be positive, not {p}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, not {probes!r}")
    if mode == "probe" and p != 2:
        raise ValueError("probe mode estimates the 2-norm only: use p=2 or mode='reverse'")
    if mode in ("reverse", "probe") and steps > 1:
        raise ValueError("path integration evaluates each site at its own point on the path: "
                         "use mode='forward' or 'auto' with steps > 1")
    start = time.perf_counter()
    graph, device, units = prepare(model, data, opts, sites=sites, granularity=granularity,
                                   baseline=baseline, channels=channels)
    labels = unit_names(units)
    chosen, plan, costs = mode, {}, {}

    def norms_of_batch(x: torch.Tensor, y: torch.Tensor | None, index: int,
                       tick: Callable[[float], None]) -> torch.Tensor:
        nonlocal chosen
        if y is not None:
            check_labels(graph(x[:1]), y)
        k_out = readout_width(graph, x, y, readout)
        if chosen == "auto":
            chosen = choose_mode(mode, k_out, probes, p, units=len(units), steps=steps)
        z = probe_signs(opts.seed, index, probes, x.shape[0], k_out) if chosen == "probe" \
            else None

        def step(xs, ys, chunk, lo=0):  # a path point of this piece: its share of a step
            return unit_norms(graph, xs, ys, readout, chosen, units, p, steps, chunk,
                              None if z is None else z[:, lo:lo + xs.shape[0]],
                              lambda: tick(xs.shape[0] / x.shape[0]))

        def trial(xs, ys, n):  # the step on n vmapped copies (outputs, probes or units)
            if chosen == "reverse":
                dtype = next(graph.parameters()).dtype
                cot = torch.eye(k_out, dtype=dtype, device=xs.device)[:n, None, :]
                reverse_tangents(graph, xs, ys, readout, n, cot.expand(n, xs.shape[0], k_out))
            elif chosen == "probe":
                probe_norms(graph, xs, ys, readout, z[:n, :xs.shape[0]], n, units)
            else:
                forward_tangents(graph, xs, ys, readout, units[:n], 0.0, n)

        copies = {"reverse": k_out, "probe": probes, "forward": len(units)}[chosen]
        piece, chunk = plan_step(trial, x, y, copies, opts.max_memory, opts.chunk_size,
                                 costs.setdefault((tuple(x.shape[1:]), chosen), {}))
        plan.update(samples_per_step=piece, chunk=chunk)
        norms = torch.cat([step(xs, ys, chunk, lo) for lo, xs, ys in pieces(x, y, piece)], 0)
        check_finite(norms, "G-NDI tangents", labels=labels)
        return norms

    baseline_name = _baseline_name(graph, baseline)
    settings = {"estimator": "gndi", "readout": readout, "p": p, "steps": steps, "mode": mode,
                "probes": None if mode in ("reverse", "forward") else probes, "seed": opts.seed,
                "baseline": baseline_name, "units": units, "max_batches": opts.max_batches}
    with eval_mode(graph), torch.no_grad():
        stats = accumulate(data, units, norms_of_batch, opts, device=device,
                           need_labels=readout in ("loss", "margin"),
                           why=f"readout '{readout}'", settings=settings,
                           desc="G-NDI" if steps == 1 else f"G-NDI ({steps} path points)",
                           steps_per_batch=steps, arity=graph.arity)
    meta = {"readout": readout, "p": p, "steps": steps, "mode": chosen,
            **({"probes": probes} if chosen == "probe" else {}), "baseline": baseline_name,
            "granularity": graph.granularity,
            **memory_meta(opts.max_memory, plan)}
    return Scores(units=units, values=stats.mean.numpy(), stderr=stats.stderr.numpy(),
                  n_samples=stats.count, importance="gndi",
                  seconds=time.perf_counter() - start, meta=meta)


def ablate(model: nn.Module | InterventionGraph, data: Iterable, *,
           sites: SiteSpec | None = None, granularity: str | None = None, baseline: Any = None,
           metric: str = "accuracy", channels: Sequence[tuple[str, int]] | None = None,
           **run: Unpack[RunKwargs]) -> Scores:
    """The exact effect of ``do(h := b)`` (alpha = 1) at each site, or each listed channel.

    Metrics: ``accuracy`` (drop in top-1 accuracy), ``loss`` (increase in mean cross-entropy),
    ``logit_l2`` (E_x of the L2 norm of the change of the logits), ``kl``
    (E_x KL(p_original || p_intervened)). Interventions are batched with ``vmap``. The other
    arguments and the run options (``max_memory``, ``run_state``, ``resume``, ...) and
    ``torchrun`` work as in :func:`score`. Outputs that are not finite raise NonFiniteError,
    whatever the metric.

    Example:
        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> a = ablate(m, [torch.randn(4, 3, 32, 32)], sites="layer4.*", metric="logit_l2",
        ...            progress=False)
        >>> a.names[:2]
        ['layer4.0.conv1', 'layer4.0.bn1']
    """
    opts = run_options("ablate", run)
    check_choice("metric", metric, METRICS)
    start = time.perf_counter()
    graph, device, units = prepare(model, data, opts, sites=sites, granularity=granularity,
                                   baseline=baseline, channels=channels)
    labels = unit_names(units)
    plan, costs = {}, {}

    def step(xs: torch.Tensor, ys: torch.Tensor | None, chunk: int | None) -> torch.Tensor:
        reference = graph(xs)
        check_labels(reference, ys)
        effects = [effect(reference, o, ys, metric)
                   for o in ablated_outputs(graph, xs, units, chunk)]
        return torch.cat(effects, 0).T  # [B, units]

    def trial(xs: torch.Tensor, ys: torch.Tensor | None, n: int) -> None:
        graph(xs)
        list(ablated_outputs(graph, xs, units[:n], n))

    def effects_of_batch(x: torch.Tensor, y: torch.Tensor | None, index: int,
                         tick: Callable[[float], None]) -> torch.Tensor:
        piece, chunk = plan_step(trial, x, y, len(units), opts.max_memory, opts.chunk_size,
                                 costs.setdefault(tuple(x.shape[1:]), {}))
        plan.update(samples_per_step=piece, chunk=chunk)
        values = torch.cat([step(xs, ys, chunk) for _, xs, ys in pieces(x, y, piece)], 0)
        check_finite(values, "ablation effects", labels=labels)
        return values

    baseline_name = _baseline_name(graph, baseline)
    settings = {"estimator": "ablation", "metric": metric, "baseline": baseline_name,
                "units": units, "max_batches": opts.max_batches}
    with eval_mode(graph), torch.no_grad():
        stats = accumulate(data, units, effects_of_batch, opts, device=device,
                           need_labels=metric in ("accuracy", "loss"),
                           why=f"metric '{metric}'", desc="ablate", settings=settings,
                           arity=graph.arity)
    meta = {"metric": metric, "baseline": baseline_name, "granularity": graph.granularity,
            **memory_meta(opts.max_memory, plan)}
    return Scores(units=units, values=stats.mean.numpy(), stderr=stats.stderr.numpy(),
                  n_samples=stats.count, importance="ablation",
                  seconds=time.perf_counter() - start, meta=meta)


def _baseline_name(graph: InterventionGraph, baseline: Any) -> str:
    """The baseline as reported in settings: its name, ``"custom"`` for tensors, or the
    graph's (an InterventionGraph records what it was built with)."""
    if baseline is None:
        return getattr(graph, "baseline", "zero")
    return baseline if isinstance(baseline, str) else "custom"
