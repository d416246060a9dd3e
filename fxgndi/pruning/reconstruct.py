"""Least-squares repair: refit each consumer of removed channels so that its output on
calibration data matches the dense model's.

After channels are removed, every *consumer* (a conv or linear layer that lost input channels)
computes its output from fewer inputs. Following ThiNet / Channel Pruning (refit the next
layer by least squares) and OBC / SparseGPT (layer by layer, each fit on the inputs of the
*already repaired* pruned network), :func:`reconstruct` visits the consumers in the order the
pruned model runs them and, for each, solves the ridge-regularised normal equations

    min_{W, b} || X_p W^T + b - Y_d ||^2 + lambda ||W||^2

where ``X_p`` is what the layer reads in the pruned model (its kept input channels; a conv's
input unfolded into patches, each group of a grouped conv on its own) and ``Y_d`` the dense
layer's output at the kept output channels, both on the same calibration inputs. ``X^T X`` and
``X^T Y`` are accumulated in float64 over batches and sample chunks (memory: one layer's
``d x d`` system, ``d`` = kept inputs x kernel size, plus one chunk of patches), then solved
once. A bias is fitted too (a conv without one gets one): that is where the removed channels'
mean contribution goes (compensation is the bias-only special case). Depthwise convs are
members of a group, not consumers: their channels go with their inputs, nothing to refit.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxgndi.core.errors import DataError
from fxgndi.core.layers import in_width, tied_parameters
from fxgndi.core.runtime import device_of, eval_mode
from fxgndi.core.streams import call_model, input_arity, iter_batches

_CHUNK_BYTES = 256 * 2**20  # patches per accumulation step, when no max_memory is given


@dataclass
class LayerFit:
    """How one consumer was refit.

    Attributes:
        name: the layer's name in the model.
        rows: samples (x positions) the system was accumulated over.
        unknowns: weights per output of one group (+1 for the bias).
        relative_error_before, relative_error_after: ``||Y_p - Y_d|| / ||Y_d||`` of the layer's
            output on the calibration data, with the pruned weights as they were and after
            the refit (both on the repaired upstream network).
        condition: condition number of the regularised system, measured only when it was
            underdetermined (fewer rows than unknowns); NaN otherwise.

    Example:
        >>> LayerFit("fc", 100, 11, 0.5, 0.1).improvement
        0.8
    """

    name: str
    rows: int
    unknowns: int
    relative_error_before: float
    relative_error_after: float
    condition: float = float("nan")

    @property
    def improvement(self) -> float:
        """Fraction of the output error the refit removed."""
        return 1 - self.relative_error_after / max(self.relative_error_before, 1e-30)


@dataclass
class ReconstructionReport:
    """The layers :func:`reconstruct` refit, the ones it skipped (and why), and its time.

    Example:
        >>> ReconstructionReport().to_dict()["layers"]
        []
    """

    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {"layers": [vars(f) for f in self.layers], "skipped": dict(self.skipped),
                "seconds": self.seconds}


def consumers(pruned: nn.Module, dense: nn.Module) -> list[str]:
    """Names of the conv / linear layers of ``pruned`` that read fewer input channels than the
    same-named layer of ``dense`` (depthwise convs excluded: they are group members).

    Example:
        >>> consumers(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(3, 2)))
        ['0']
    """
    dense_modules = dict(dense.named_modules())
    out = []
    for name, layer in pruned.named_modules():
        if not _fittable(layer) or name not in dense_modules:
            continue
        if in_width(layer) < in_width(dense_modules[name]) and not _depthwise(layer):
            out.append(name)
    return out


def reconstruct(pruned: nn.Module, dense: nn.Module, data: Iterable, *,
                layers: Sequence[str] | None = None,
                kept_outputs: dict[str, Sequence[int]] | None = None, ridge: float = 1e-3,
                max_batches: int | None = None, max_memory: int | None = None,
                progress: bool = True) -> ReconstructionReport:
    """Refit ``layers`` of ``pruned`` (default: :func:`consumers`) in place, in the order the
    pruned model runs them, so that each one's output matches the same-named layer of
    ``dense`` on ``data`` (see the module docstring).

    Args:
        pruned: the pruned model; its layers are changed in place (weights, and a bias added
            where there was none). Its other modules and every flag stay as they are.
        dense: the model before pruning; only read.
        data: calibration batches ``x`` or ``(x, y)``, fed to both models; read once (at most
            ``max_batches``) and kept in memory for the passes.
        kept_outputs: layer name -> the original indices of the output channels the pruned
            layer kept (default: all of them, in order).
        ridge: the regulariser, relative to the mean diagonal of ``X^T X``. With fewer rows
            than unknowns the system is underdetermined: ``ridge=0`` is then a DataError, and
            any ``ridge > 0`` solves it with a warning naming the condition number.
        max_memory: bytes of patches per accumulation step (default 256 MiB).

    Example:
        >>> dense = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> pruned = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> r = reconstruct(pruned, dense, [torch.randn(32, 4)], progress=False,
        ...                 kept_outputs={"0": [0, 1]})
        >>> [f.name for f in r.layers]
        ['2']
    """
    start = time.perf_counter()
    report = ReconstructionReport()
    # Read once and kept: the dense targets and the pruned inputs of a layer come from
    # separate passes, which must see the same samples in the same order (a shuffling loader
    # would pair the inputs of one sample with the targets of another).
    data = [x for x, _ in iter_batches(data, device=device_of(pruned), max_batches=max_batches,
                                       arity=input_arity(dense))]
    max_batches = None
    names = list(consumers(pruned, dense) if layers is None else layers)
    pruned_modules, dense_modules = dict(pruned.named_modules()), dict(dense.named_modules())
    order, calls = _run_order(pruned, data, names)
    tied = {holder for holders in tied_parameters(pruned) for holder, _ in holders}
    for name in names:
        if name in tied:
            report.skipped[name] = ("holds a parameter tied to another layer: a refit of one "
                                    "holder would change the others")
        elif calls.get(name, 0) != 1:
            report.skipped[name] = ("not run by the forward pass" if not calls.get(name) else
                                    f"called {calls[name]} times per forward: one refit "
                                    "cannot match every call")
        elif not isinstance(pruned_modules[name], (nn.Linear, nn.Conv2d)):
            report.skipped[name] = f"{type(pruned_modules[name]).__name__}: only Linear and " \
                                   "Conv2d layers are refit"
    todo = [n for n in order if n in names and n not in report.skipped]
    kept_outputs = kept_outputs or {}
    budget = max_memory or _CHUNK_BYTES
    with eval_mode(pruned), eval_mode(dense), torch.no_grad(), \
            tqdm(total=len(todo), desc="least-squares repair", disable=not progress) as bar:
        for chunk in _chunks(dense, data, todo, dense_modules, budget, max_batches):
            # One dense pass per batch gives the targets of every layer of the chunk.
            targets = _dense_outputs(dense, data, [dense_modules[n] for n in chunk],
                                     max_batches)
            for name, outputs in zip(chunk, targets):
                rows = kept_outputs.get(name)
                if rows is not None:
                    index = torch.as_tensor(rows, device=outputs[0].device)
                    dim = _channel_dim(pruned_modules[name])
                    outputs = [y.index_select(dim, index) for y in outputs]
                report.layers.append(_refit(pruned, pruned_modules[name], name, data, outputs,
                                            ridge, max_batches, max_memory))
                bar.update(1)
    report.seconds = time.perf_counter() - start
    under = [f for f in report.layers if f.rows < f.unknowns]
    if under:
        worst = max(under, key=lambda f: f.unknowns / f.rows)
        warnings.warn(f"least-squares repair: {len(under)} of {len(report.layers)} layers had "
                      f"fewer rows (samples x positions) than unknowns, e.g. {worst.name!r} "
                      f"{worst.rows} for {worst.unknowns}; solved with ridge {ridge:g}, largest "
                      f"condition number {max(f.condition for f in under):.3g}: pass more "
                      "calibration data for an exact fit", RuntimeWarning, stacklevel=2)
    return report


def _chunks(dense: nn.Module, data: Iterable, names: list[str],
            modules: dict[str, nn.Module], budget: int, max_batches: int | None
            ) -> Iterator[list[str]]:
    """Consecutive runs of ``names`` whose dense outputs over all of ``data`` fit ``budget``
    bytes together (at least one layer per run)."""
    x = next(iter_batches(data, device=device_of(dense)))[0][:1]
    sizes = [o[0].numel() * o[0].element_size()
             for o in _dense_outputs(dense, [x], [modules[n] for n in names], None)]
    samples = sum(x.shape[0] for x, _ in iter_batches(data, max_batches=max_batches))
    chunk: list[str] = []
    used = 0
    for name, size in zip(names, sizes):
        if chunk and used + size * samples > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size * samples
    if chunk:
        yield chunk


def _dense_outputs(model: nn.Module, data: Iterable, layers: list[nn.Module],
                   max_batches: int | None) -> list[list[torch.Tensor]]:
    """Per layer, its output on each batch of ``data`` (one forward pass per batch, stopped
    after the last of ``layers`` has run)."""
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    seen: set[int] = set()

    def hook(index: int):
        def record(module, args, out):
            outputs[index].append(out)
            seen.add(index)
            if len(seen) == len(layers):
                raise _Stop
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for x, _ in iter_batches(data, device=device_of(model), max_batches=max_batches):
            seen.clear()
            try:
                call_model(model, x)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return outputs


def _refit(pruned: nn.Module, layer: nn.Module, name: str, data: Iterable,
           targets: list[torch.Tensor], ridge: float, max_batches: int | None,
           max_memory: int | None) -> LayerFit:
    """Refit ``layer`` of ``pruned`` so that its output on ``data`` matches ``targets`` (one
    tensor per batch).

    With at least as many rows as unknowns the ridge solution comes from the normal equations
    ``(X^T X + lambda I) w = X^T Y`` (d x d); with fewer (an underdetermined system, deep
    layers of small inputs) from the same solution's dual form ``w = X^T (X X^T + lambda I)^-1 Y``
    (rows x rows), for which the rows are kept while they are few."""
    device = device_of(pruned)
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    out_per_group = _out_channels(layer) // groups
    d = _in_per_group(layer) * _kernel_size(layer) + 1
    samples = sum(y.shape[0] for y in targets)
    positions = targets[0][0].numel() // _out_channels(layer) if targets else 0
    dual = samples * positions < d  # fewer rows than unknowns: solve rows x rows instead
    size = (groups, 0, 0) if dual else (groups, d, d)
    xtx = torch.zeros(size, dtype=torch.float64, device=device)
    xty = torch.zeros(size[:2] + (0 if dual else out_per_group,), dtype=torch.float64,
                      device=device)
    yty = torch.zeros(groups, dtype=torch.float64, device=device)
    before = torch.zeros((), dtype=torch.float64, device=device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    for (x, _), y in zip(iter_batches(data, device=device, max_batches=max_batches), targets):
        h = _capture(pruned, layer, x)
        before += (layer(h) - y).double().pow(2).sum()
        for feats, target in _systems(layer, h, y, max_memory):
            count += feats.shape[1]
            yty += target.double().pow(2).sum((1, 2))
            if dual:
                kept.append((feats.double(), target.double()))
            else:  # products in the model's precision, sums over chunks in float64
                xtx += torch.einsum("grd,gre->gde", feats, feats).double()
                xty += torch.einsum("grd,gro->gdo", feats, target).double()
    if count == 0:
        raise DataError(f"least-squares repair of {name!r} read no calibration batch: pass data")
    if count < d and ridge <= 0:
        raise DataError(
            f"least-squares repair of {name!r} has {d} unknowns per output but the calibration "
            f"data give only {count} rows (samples x positions): the system is "
            "underdetermined; pass more calibration data (or ridge > 0 to regularise)")
    condition = float("nan")
    norm = yty.sum().clamp_min(1e-300)
    if dual:
        features = torch.cat([f for f, _ in kept], 1)  # [groups, count, d]
        values = torch.cat([t for _, t in kept], 1)
        lam = ridge * features.pow(2).sum(1).mean(-1).clamp_min(1e-12)[:, None, None]
        gram = features @ features.transpose(1, 2)
        eye = torch.eye(count, dtype=torch.float64, device=device)
        solution = features.transpose(1, 2) @ torch.linalg.solve(gram + lam * eye, values)
        rss = (features @ solution - values).pow(2).sum()
        # X^T X has rank <= rows < d: its smallest eigenvalue is 0, so the regularised primal
        # system's condition number is (largest eigenvalue + lambda) / lambda.
        largest = torch.linalg.eigvalsh(gram)[:, -1]
        condition = float(((largest + lam[:, 0, 0]) / lam[:, 0, 0]).max())
    else:
        lam = ridge * xtx.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)[:, None, None]
        system = xtx + lam * torch.eye(d, dtype=torch.float64, device=device)
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):  # not positive definite in floating point: LU instead
            solution = torch.linalg.solve(system, xty)
        else:
            solution = torch.cholesky_solve(xty, factor)  # [groups, d, out_per_group]
        # With (X^T X + lambda I) w = X^T Y: ||X w - Y||^2 = Y^T Y - w . X^T Y - lambda |w|^2.
        rss = (yty.sum() - (solution * xty).sum() - (lam * solution.pow(2)).sum()).clamp_min(0)
    _assign(layer, solution)
    return LayerFit(name, count, d, float((before / norm).sqrt()), float((rss / norm).sqrt()),
                    condition)


def _systems(layer: nn.Module, h: torch.Tensor, y: torch.Tensor, max_memory: int | None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features [groups, rows, d], targets [groups, rows, out_per_group])`` in chunks of
    samples; the features end in a column of ones (the bias)."""
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    budget = max_memory or _CHUNK_BYTES
    if isinstance(layer, nn.Linear):
        feats = h.reshape(-1, h.shape[-1])
        target = y.reshape(-1, y.shape[-1])
        per_sample = max(1, feats.shape[0] // max(h.shape[0], 1))
        step = max(1, budget // (8 * per_sample * (feats.shape[1] + 1)))
        for lo in range(0, h.shape[0], step):
            f = feats[lo * per_sample:(lo + step) * per_sample]
            t = target[lo * per_sample:(lo + step) * per_sample]
            yield _with_ones(f)[None], t[None]
        return
    positions = y.shape[2] * y.shape[3]
    d = h.shape[1] // groups * _kernel_size(layer)
    step = max(1, budget // (8 * positions * (d + 1) * groups))
    for lo in range(0, h.shape[0], step):
        patches = F.unfold(h[lo:lo + step], layer.kernel_size, dilation=layer.dilation,
                           padding=layer.padding, stride=layer.stride)  # [b, C*k*k, P]
        b = patches.shape[0]
        patches = patches.view(b, groups, d, -1).permute(1, 0, 3, 2).reshape(groups, -1, d)
        out = y[lo:lo + step]
        out = out.reshape(b, groups, -1, positions).permute(1, 0, 3, 2).reshape(
            groups, b * positions, -1)
        yield _with_ones(patches), out


def _with_ones(features: torch.Tensor) -> torch.Tensor:
    ones = features.new_ones(*features.shape[:-1], 1)
    return torch.cat([features, ones], -1)


def _assign(layer: nn.Module, solution: torch.Tensor) -> None:
    """Write the solved weights [groups, d, out_per_group] (last row: the bias) into ``layer``."""
    weight = solution[:, :-1, :].permute(0, 2, 1)  # [groups, out_g, d - 1]
    bias = solution[:, -1, :].reshape(-1)
    weight = weight.reshape(layer.weight.shape).to(layer.weight)
    layer.weight.copy_(weight)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight))
    else:
        layer.bias.copy_(bias.to(layer.bias))


class _Stop(Exception):
    """Ends a forward pass once the layer of interest has run."""


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input in ``model(x)``, running the model only as far as that layer."""
    box: dict[str, torch.Tensor] = {}

    def pre(module, args):
        box["v"] = args[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(pre)
    try:
        call_model(model, x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "v" not in box:
        raise DataError(f"the forward pass did not reach {type(layer).__name__}: it cannot be "
                        "refit on this data")
    return box["v"]


def _run_order(model: nn.Module, data: Iterable, names: Sequence[str]
               ) -> tuple[list[str], dict[str, int]]:
    """The order in which one forward pass of ``model`` calls the named layers, and how often
    each is called."""
    modules = dict(model.named_modules())
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        x = next(iter_batches(data, device=device_of(model)))[0]
        with eval_mode(model), torch.no_grad():
            call_model(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _fittable(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and \
        not getattr(layer, "transposed", False)


def _depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 \
        and layer.groups == layer.in_channels


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_per_group(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels // layer.groups


def _kernel_size(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return 1
    size = 1
    for k in layer.kernel_size:
        size *= k
    return size


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1
