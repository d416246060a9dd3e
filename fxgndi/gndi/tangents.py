"""G-NDI tangents ``d readout / d alpha`` at alpha = 0 (or on the path), three ways.

* reverse mode: K vector-Jacobian products w.r.t. every alpha at once (``torch.func.vjp``
  under ``vmap`` over one-hot output cotangents), whatever the number of sites or channels;
* forward mode: one ``torch.func.jvp`` per site or channel (``vmap`` over one-hot tangents),
  also the engine of the path-integrated estimator, whose points differ per site;
* probes (p = 2): ``E_z[(z^T J v)^2] = ||J v||^2`` with Rademacher ``z``, for wide heads
  (``R`` projections instead of K outputs; ``auto`` takes them for K >= 2R: :func:`choose_mode`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
import torch.nn as nn

from fxgndi.fx.intervention import InterventionGraph, intervene, observe  # noqa: F401 (doctests)
from fxgndi.gndi.readouts import readout
from fxgndi.gndi.run import batch_seed
from fxgndi.gndi.scores import Unit

SAMPLES_PER_CHUNK = 256  # vmapped batch size (chunk x B) kept under this by default
# Reverse mode: site elements (per sample x samples x cotangents) vmapped at once by default.
# On CPU, vmapping a backward over large activations is slower per cotangent than one at a
# time, over small ones faster (one thread, ms per cotangent, vmapped 1 / 2 / 8 at a time:
# resnet18 112 px x 32 samples, 17.6M elements each: 595 / 628 / 779; mobilenet_v2 the same,
# 55M: 677 / 843 / 1545; mobilenet_v2 64 px x 8, 4.4M: 77 / 58 / 60; resnet18 32 px x 8,
# 0.36M: 26 / 18 / 14).
ELEMENTS_PER_CHUNK = 2 ** 24


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
    parts: list[dict[str, torch.Tensor]] = []
    each_reverse_chunk(graph, x, y, parts.append, kind, chunk_size, cotangents)
    return {name: torch.cat([part[name] for part in parts], -1) for name in parts[0]}


def each_reverse_chunk(graph: InterventionGraph, x: torch.Tensor, y: torch.Tensor | None,
                       fn: Callable[[dict[str, torch.Tensor]], Any], kind: str = "logits",
                       chunk_size: int | None = None, cotangents: torch.Tensor | None = None,
                       sites: Collection[str] | None = None) -> None:
    """:func:`reverse_tangents` one chunk of cotangents at a time: ``fn`` gets each chunk's
    tangents (site -> [B, (C,) chunk]), so that a caller who reduces them holds one chunk.

    One forward pass (``torch.func.vjp``) serves every chunk; ``chunk_size`` cotangents are
    ``vmap``-ed together (default :func:`reverse_chunk`). ``sites`` (default all) limits the
    tangents to those sites: the backward pass stops at the earliest of them.

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 4)), sites="linear")
        >>> seen = []
        >>> each_reverse_chunk(g, torch.randn(2, 3), None, lambda t: seen.append(t["0"].shape),
        ...                    chunk_size=3)
        >>> seen
        [torch.Size([2, 3]), torch.Size([2, 1])]
    """
    chosen = [s for s in graph.sites if sites is None or s.name in sites]
    shapes = graph.site_shapes(x)
    zero = torch.zeros((), dtype=_dtype_of(graph), device=x.device)
    shifts = {s.name: zero.expand(x.shape[0], *shapes[s.name]) for s in chosen}

    def f(d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with observe(graph, d) as seen:
            out = readout(graph(x), y, kind)
        return out, {name: seen[name] for name in d}

    with transformable_kernels(graph):
        out, vjp_fn, activations = torch.func.vjp(f, shifts, has_aux=True)
        directions = {s.name: _direction(graph, s, activations[s.name]) for s in chosen}
        per_channel = graph.granularity == "channel"
        del activations
        if cotangents is None:
            k = out.shape[-1]
            eye = torch.eye(k, dtype=out.dtype, device=out.device)
            cotangents = eye[:, None, :].expand(k, out.shape[0], k)
        chunk = chunk_size or reverse_chunk(graph, x.shape[0])
        for lo in range(0, cotangents.shape[0], chunk):
            if chunk == 1:  # vmap over one cotangent costs 30% more than a plain call
                grads = {name: g[None] for name, g in vjp_fn(cotangents[lo])[0].items()}
            else:
                (grads,) = torch.func.vmap(vjp_fn)(cotangents[lo:lo + chunk])
            fn({name: _inner_products(g, *directions[name], per_channel).movedim(0, -1)
                for name, g in grads.items()})


def _direction(graph: InterventionGraph, site: Any, h: torch.Tensor
               ) -> tuple[torch.Tensor, float, int | None]:
    """``b - h`` of one site as ``sign * direction`` with ``direction`` [rows, N, 1] for
    :func:`_inner_products`, and the dim of ``h`` moved next to the batch to get there.

    Layer granularity: rows = B (N = all of a sample); channel: rows = B * C (N = a channel's
    elements). A zero baseline gives ``-1 * h`` itself: no copy of the activation.
    """
    baseline = graph.node(site.name).baseline
    sign, direction = (-1.0, h) if baseline is None else (1.0, baseline.expand_as(h) - h)
    if graph.granularity == "layer" or h.dim() == 1:
        return direction.reshape(h.shape[0], -1, 1), sign, None
    dim = site.resolved_channel_dim() % h.dim()
    direction = direction.movedim(dim, 1)
    return direction.reshape(h.shape[0] * direction.shape[1], -1, 1), sign, dim


def _inner_products(grads: torch.Tensor, direction: torch.Tensor, sign: float,
                    channel_dim: int | None, per_channel: bool) -> torch.Tensor:
    """``<grad_r, b - h>`` per sample (and channel) of R gradients [R, B, *S] at one site:
    [R, B] or [R, B, C].

    This is the tangent ``d readout / d alpha`` of the node ``h + alpha (b - h)`` at alpha = 0,
    by the chain rule from the gradient at the activation, in one batched matrix product.
    Differentiating the node itself makes two activation-sized tensors per cotangent
    (``grad * (1 - alpha)`` and ``grad * h``), and on CPU every fresh allocation that large
    page-faults: 20-25% of the reverse pass of torch-pruning's TransposeConv test model.
    """
    r, b = grads.shape[:2]
    if channel_dim is not None:
        grads = grads.movedim(channel_dim + 1, 2)
    rows = direction.shape[0]
    inner = torch.bmm(grads.reshape(r, rows, -1).transpose(0, 1), direction)  # [rows, R, 1]
    inner = inner.reshape(b, rows // b, r).permute(2, 0, 1).mul_(sign)  # [R, B, C]
    return inner if per_channel else inner.squeeze(-1)


def reverse_chunk(graph: InterventionGraph, batch: int) -> int:
    """The default number of cotangents ``vmap``-ed together for ``batch`` samples: about
    ELEMENTS_PER_CHUNK site elements (SAMPLES_PER_CHUNK samples before the sites' shapes are
    known).

    Example:
        >>> g = intervene(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), sites="linear")
        >>> reverse_chunk(g, 8)
        32
        >>> _ = g.describe(torch.zeros(1, 3)); reverse_chunk(g, 8)  # 2 ** 24 // (8 * (4 + 2))
        349525
    """
    if any(s.shape is None for s in graph.sites):
        return max(1, SAMPLES_PER_CHUNK // batch)
    per_sample = sum(math.prod(s.shape) for s in graph.sites) or 1
    return max(1, ELEMENTS_PER_CHUNK // (batch * per_sample))


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

    chunk = chunk_size or max(1, SAMPLES_PER_CHUNK // x.shape[0])
    outs = []
    for lo in range(0, len(units), chunk):
        tangents = one_hot_alphas(graph, x, units[lo:lo + chunk])
        primals = {name: v * t for name, v in tangents.items()}
        with transformable_kernels(graph):
            outs.append(torch.func.vmap(jvp)(primals, tangents))  # [U, B, K]
    return torch.cat(outs, 0).movedim(0, 1)


def unit_norms(graph, x, y, kind, mode, units, p, steps, chunk, z,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-sample p-norms [B, U] of the tangents of ``units`` on one batch, in ``mode``;
    ``on_step()`` after each of the ``steps`` path points."""
    if mode == "reverse":
        return norms_of(reverse_tangents(graph, x, y, kind, chunk), units, p)
    if mode == "probe":
        return probe_norms(graph, x, y, kind, z, chunk, units)
    tangents = []
    for j in range(steps):
        tangents.append(forward_tangents(graph, x, y, kind, units,
                                         (j + 0.5) / steps if steps > 1 else 0.0, chunk))
        if on_step is not None:
            on_step()
    return torch.linalg.vector_norm(torch.stack(tangents).mean(0), ord=p, dim=-1)


def norms_of(tangents: dict[str, torch.Tensor], units: Sequence[Unit],
             p: float) -> torch.Tensor:
    """Per-sample p-norms [B, U] of the tangents of ``units`` (in units order)."""
    per_site = {name: torch.linalg.vector_norm(t, ord=p, dim=-1) for name, t in tangents.items()}
    cols = [per_site[s] if c is None else per_site[s][:, c] for s, c in units]
    return torch.stack(cols, 1)


def probe_norms(graph, x, y, kind, z, chunk_size, units) -> torch.Tensor:
    """Rademacher estimate of the per-sample 2-norms: sqrt(mean_r (z_r^T J v)^2), with the
    signs ``z`` [R, B, K] drawn by the caller."""
    z = z.to(device=x.device, dtype=next(graph.parameters()).dtype)
    projections = reverse_tangents(graph, x, y, kind, chunk_size, cotangents=z)
    rms = {name: t.pow(2).mean(-1).sqrt() for name, t in projections.items()}
    cols = [rms[s] if c is None else rms[s][:, c] for s, c in units]
    return torch.stack(cols, 1)


def choose_mode(mode: str, outputs: int, probes: int, p: float, *, units: int | None = None,
                steps: int = 1) -> str:
    """The tangent mode that ``mode="auto"`` stands for; any other mode is returned as it is.

    Path integration (``steps > 1``) needs forward mode. Otherwise the cheaper exact mode:
    reverse (one VJP per readout output) or forward (one JVP per unit; ``units=None`` where it
    is not offered); but when that costs at least twice the ``probes`` passes (a readout at
    least ``2 * probes`` wide: an ImageNet head, not a 10-class one) and p = 2, the ``probes``
    Rademacher VJPs: an estimate is worth its noise only where it halves the cost.

    Example:
        >>> choose_mode("auto", 10, 8, 2), choose_mode("auto", 1000, 8, 2)
        ('reverse', 'probe')
        >>> choose_mode("auto", 1000, 8, 2, units=12), choose_mode("auto", 1000, 8, 1)
        ('forward', 'reverse')
    """
    if mode != "auto":
        return mode
    if steps > 1:
        return "forward"
    exact, cost = ("forward", units) if units is not None and units < outputs \
        else ("reverse", outputs)
    return "probe" if p == 2 and cost >= 2 * probes else exact


def probe_signs(seed: int, index: int, probes: int, batch: int, width: int) -> torch.Tensor:
    """The Rademacher signs [probes, batch, width] (+-1, int8) of batch ``index`` of a run
    seeded with ``seed``: drawn per batch, so that shards, resumed runs and repeated runs agree.

    int8 draws the same signs as int64 from one seed, at a fifth of the time and an eighth of
    the memory (a dense 8 x 448 x 448 output: 1.6M signs per probe).

    Example:
        >>> z = probe_signs(0, 3, 2, 4, 5)
        >>> z.shape, sorted(z.unique().tolist()), torch.equal(z, probe_signs(0, 3, 2, 4, 5))
        (torch.Size([2, 4, 5]), [-1, 1], True)
    """
    generator = torch.Generator().manual_seed(batch_seed(seed, index))
    signs = torch.randint(0, 2, (probes, batch, width), generator=generator, dtype=torch.int8)
    return signs.mul_(2).sub_(1)


def zero_alphas(graph: InterventionGraph, x: torch.Tensor,
                sites: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Alphas 0 [B] (layer) or [B, C] (channel) for every site, or for ``sites``."""
    b = x.shape[0]
    dtype = _dtype_of(graph)
    chosen = [s for s in graph.sites if sites is None or s.name in sites]
    if graph.granularity == "layer":
        return {s.name: torch.zeros(b, dtype=dtype, device=x.device) for s in chosen}
    return {s.name: torch.zeros(b, s.channels, dtype=dtype, device=x.device) for s in chosen}


def _dtype_of(graph: nn.Module) -> torch.dtype:
    """The dtype of the graph's parameters (float32 for a graph without any)."""
    return next((p.dtype for p in graph.parameters()), torch.float32)


def one_hot_alphas(graph: InterventionGraph, x: torch.Tensor,
                   units: Sequence[Unit]) -> dict[str, torch.Tensor]:
    """Alphas batched over units: entry u is 1 at unit u and 0 elsewhere, shape [U, B(, C)]."""
    zeros = zero_alphas(graph, x)
    involved = {s for s, _ in units}
    alphas = {name: z.unsqueeze(0).repeat(len(units), *([1] * z.dim()))
              for name, z in zeros.items() if name in involved}
    for u, (site, c) in enumerate(units):
        if c is None:
            alphas[site][u] = 1
        else:
            alphas[site][u, :, c] = 1
    return alphas


@contextlib.contextmanager
def transformable_kernels(graph: nn.Module) -> Iterator[None]:
    """Kernels of ``graph`` that torch.func can transform and batch.

    Forward-mode AD fails through the fused attention kernels on CPU, and neither
    ``_native_multi_head_attention`` nor the flash backward has a vmap batching rule (vmap
    would loop over the batch in Python): use the math kernel and MHA's plain path. RNNs (LSTM,
    GRU) run without oneDNN: under torch.func its RNN kernel keeps no workspace, and the
    backward fails ("got None for argument 'workspace'": timm's Sequencer2d could not be
    scored); the native kernel's backward transforms (its forward-mode tangents do not batch).

    Example:
        >>> lstm = nn.LSTM(2, 3)
        >>> with transformable_kernels(lstm):
        ...     _ = torch.func.vjp(lambda x: lstm(x)[0], torch.randn(4, 2))
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha:
            stack.callback(mha.set_fastpath_enabled, mha.get_fastpath_enabled())
            mha.set_fastpath_enabled(False)
        for rnn in (m for m in graph.modules() if isinstance(m, nn.RNNBase)):
            stack.enter_context(_without_onednn(rnn))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


@contextlib.contextmanager
def _without_onednn(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s forward runs with oneDNN (mkldnn) off, the rest as set."""
    flags: list[bool] = []  # the setting each running forward found (a stack: reentrant)

    def off(*_: Any) -> None:
        flags.append(torch.backends.mkldnn.enabled)
        torch.backends.mkldnn.enabled = False

    def restore(*_: Any) -> None:
        torch.backends.mkldnn.enabled = flags.pop()

    pre, post = module.register_forward_pre_hook(off), module.register_forward_hook(restore)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        while flags:  # a forward that raised never reached its post hook
            restore()
