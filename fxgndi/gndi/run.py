"""The run loop shared by score and ablate: the graph and units of a run, this rank's
batches (resumed where a saved state left off), per-sample values into running sums saved every
few batches and on interruption, and the sums of all ranks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fxgndi.core.errors import DataError, FxgndiError
from fxgndi.core.moments import RunningMoments
from fxgndi.core.options import RunOptions
from fxgndi.core.runtime import device_of, eval_mode, on_device
from fxgndi.core.streams import (Inputs, as_inputs, batch_count, call_model, example_input,
                                 first_batch, input_arity, iter_batches, require_reiterable)
from fxgndi.fx.intervention import InterventionGraph, intervene
from fxgndi.fx.sites import SiteSpec
from fxgndi.fx.trace import bind_defaults
from fxgndi.gndi.checkpoint import check_world, load_state, rank_path, save_state
from fxgndi.gndi.distributed import all_reduce_sums, my_batches, rank_and_world
from fxgndi.gndi.scores import Unit


def accumulate(data: Iterable, units: Sequence[Unit],
               per_batch: Callable[[torch.Tensor, torch.Tensor | None, int,
                                    Callable[[float], None]], torch.Tensor],
               run: RunOptions, *, device: torch.device, need_labels: bool, why: str,
               desc: str, settings: dict[str, Any], steps_per_batch: int = 1,
               arity: int = 1) -> RunningMoments:
    """The one accumulation path of score and ablate: this rank's batches (resumed where a
    saved state left off), per-sample values into running sums, the sums saved to
    ``run.run_state`` every ``run.save_every`` batches and on interruption, then summed over
    ranks. ``per_batch(x, y, index, tick)`` gives the [B, units] values of batch ``index``;
    the progress bar counts ``steps_per_batch`` steps per batch (path points), of which
    ``tick(n)`` reports ``n`` done (it may be a fraction: part of a batch). ``arity``: the
    model's positional inputs (how a batch is split: :func:`fxgndi.core.streams.split_batch`)."""
    rank, world = rank_and_world()
    stats = RunningMoments(len(units))
    settings = {**settings, "world": world}
    path = None if run.run_state is None else rank_path(run.run_state, rank, world)
    done = 0
    if run.resume:
        check_world(run.run_state, world)
        saved = load_state(path, settings=settings)
        if saved is not None:
            stats.load_state_dict(saved["sums"])
            done = saved["batches"]

    def save(complete: bool = False) -> None:
        if path is not None:
            save_state(path, settings=settings, batches=done, sums=stats.state_dict(),
                       complete=complete)

    batches = iter_batches(my_batches(data, start=done, max_batches=run.max_batches),
                           device=device, need_labels=need_labels, why=why,
                           allow_empty=world > 1 or done > 0, arity=arity)
    total = _rank_share(batch_count(data, run.max_batches), world)
    work = max(1, steps_per_batch)
    bar = tqdm(desc=desc, disable=not run.progress or rank != 0, initial=done * work,
               total=None if total is None else total * work,
               unit="batch" if work == 1 else "step")
    try:
        with bar, run.heap():
            for x, y in batches:
                stats.update(per_batch(x, y, rank + done * world, _ticker(bar)))
                done += 1
                bar.update(done * work - bar.n)
                bar.n = done * work  # whole steps (an int), whatever the ticks summed to
                if done % run.save_every == 0:
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


def _ticker(bar: Any) -> Callable[[float], None]:
    """``bar.update``, keeping whole steps integers (so that the bar shows 3/8, not 3.0/8)."""
    return lambda n: bar.update(int(n) if float(n).is_integer() else n)


def _rank_share(n: int | None, world: int) -> int | None:
    return None if n is None else -(-n // world)


def batch_seed(seed: int, index: int) -> int:
    """A seed for batch ``index`` of a run seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def prepare(model: nn.Module | InterventionGraph, data: Iterable, run: RunOptions, *,
            sites: SiteSpec | None, granularity: str | None, baseline: Any,
            channels: Sequence[tuple[str, int]] | None = None
            ) -> tuple[InterventionGraph, torch.device, list[Unit]]:
    """The graph to work on (right device, shapes, baselines), its device and the units:
    every site or channel, or the listed ``channels`` (which imply channel granularity).

    A model is traced with ``sites`` (default ``"conv"``), ``granularity`` (default
    ``"layer"``) and ``baseline`` (default ``"zero"``); an InterventionGraph already fixes
    them, so giving any of them with one is an error rather than silently ignored."""
    require_reiterable(data)
    if isinstance(model, InterventionGraph):
        given = [k for k, v in (("sites", sites), ("granularity", granularity),
                                ("baseline", baseline)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be changed on an InterventionGraph: "
                             "it fixed them when it was built (fxgndi.intervene); build another "
                             "graph, or pass the model instead")
        graph, device = _existing_graph(model, data, run.device)
    else:
        if channels is not None:
            granularity = "channel"
        model, device = on_device(model, run.device)
        arity = input_arity(model)
        example = first_batch(iter_batches(data, device=device, arity=arity)) \
            if run.example_inputs is None \
            else as_inputs(example_input(data, run.example_inputs, device))
        check_accepts(model, example)
        run = replace(run, concrete_args=bind_defaults(
            model, example[:1], leaf_modules=run.leaf_modules, concrete_args=run.concrete_args))
        # One sample records the shapes: a whole batch would cost memory outside max_memory.
        graph = intervene(model, "conv" if sites is None else sites,
                          granularity=granularity or "layer",
                          baseline="zero" if baseline is None else baseline, data=data,
                          example_inputs=example[:1], leaf_modules=run.leaf_modules,
                          concrete_args=run.concrete_args, output=run.output,
                          progress=run.progress)
    units = all_units(graph) if channels is None else _check_units(graph, channels)
    return graph, device, units


def _existing_graph(graph: InterventionGraph, data: Iterable, device: Any
                    ) -> tuple[InterventionGraph, torch.device]:
    target = torch.device(device) if device is not None else device_of(graph)
    if target != device_of(graph):
        raise ValueError("an InterventionGraph is used on its own device; build it on "
                         f"{target} (move the model there first)")
    if any(s.shape is None for s in graph.sites):
        example = first_batch(iter_batches(data, device=target, arity=graph.arity))
        check_accepts(graph, example)
        with eval_mode(graph):
            graph.describe(example[:1])
    return graph, target


def check_accepts(model: nn.Module, x: torch.Tensor) -> None:
    """Raise DataError, naming the shape, when ``model`` fails on one sample of ``x``.

    Example:
        >>> check_accepts(nn.Linear(3, 2), torch.zeros(4, 5))
        Traceback (most recent call last):
        ...
        fxgndi.core.errors.DataError: the model rejects inputs of shape (4, 5) (RuntimeError: ...
    """
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, x[:1])
    except FxgndiError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        shape = [tuple(t.shape) for t in x.tensors()] if isinstance(x, Inputs) \
            else tuple(x.shape)
        raise DataError(f"the model rejects inputs of shape {shape} "
                        f"({type(exc).__name__}: {reason}); feed it the input size and "
                        "channels it was built for (e.g. --image-size), or load the matching "
                        "model") from exc


def all_units(graph: InterventionGraph) -> list[Unit]:
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
