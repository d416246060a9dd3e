"""Save a (pruned) model as a deployable artifact and load it back.

Four formats, chosen by the file suffix:

- ``.pt2``: ``torch.export`` ExportedProgram (``torch.export.save``); loads with plain
  ``torch.export.load(path).module()``, no fxgndi needed;
- ``.onnx``: ``torch.onnx.export``, checked with onnxruntime when it is installed
  (``pip install 'fxgndi[onnx]'``);
- ``.ts``: TorchScript (``torch.jit.trace``);
- ``.pth``: torch-pruning's ``tp.state_dict`` (weights *and* the pruned layer shapes), rebuilt
  by :func:`load` on a fresh model of the same torchvision name.

Every export is written to a temporary file in the target directory, loaded back, run once on
the example inputs and compared with the eager model, then renamed into place: a failed or
interrupted export leaves no file behind. Exports in one process take turns (the exporters'
tracing state is global); concurrent exports to one path each write their own temporary file,
and the last to finish is the file that stays. Each artifact also carries a small JSON record
(``fxgndi.json``: MACs and parameters counted by torch-pruning, the example input shape, the
torchvision name when known) that :func:`artifact_info` reads and :func:`fxgndi.bench` reports.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from fxgndi.core.checks import check_finite
from fxgndi.core.cost import count_macs_params
from fxgndi.core.errors import FxgndiError, UntraceableModelError
from fxgndi.core.files import atomic_path
from fxgndi.core.names import EXPORT_FORMATS
from fxgndi.core.report import format_table
from fxgndi.core.runtime import eval_mode

FORMATS = EXPORT_FORMATS
_INFO_NAME = "fxgndi.json"  # name of the metadata record inside each artifact
_ONNX_OPSET = 17  # the first opset with LayerNormalization (ViT, ConvNeXt)
_ONE_AT_A_TIME = threading.RLock()  # exports of one process, whatever their paths


class ExportError(FxgndiError, ValueError):
    """The export cannot be written or read: bad path, unknown format, missing package."""


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: the artifact's path.
        format: ``"pt2"``, ``"onnx"``, ``"torchscript"`` or ``"state_dict"``.
        max_abs_diff: largest absolute difference between the artifact's output (loaded back
            from disk) and the eager model's, on the example inputs; NaN when it could not be
            run (ONNX without onnxruntime).
        bytes: file size.
        seconds: wall time of the whole export, check included.

    Example:
        >>> ExportResult("m.pt2", "pt2", 0.0, 1024, 0.5).to_dict()["format"]
        'pt2'
    """

    path: str
    format: str
    max_abs_diff: float
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN becomes None)."""
        out = asdict(self)
        if out["max_abs_diff"] != out["max_abs_diff"]:
            out["max_abs_diff"] = None
        return out

    def table(self) -> str:
        """One row: path, format, size, largest output difference, seconds.

        Example:
            >>> print(ExportResult("m.pt2", "pt2", 0.0, 2**20, 0.5).table())
            | path   | format   |   MB |   max abs diff |   seconds |
            |--------|----------|------|----------------|-----------|
            | m.pt2  | pt2      |    1 |              0 |       0.5 |
        """
        return format_table([(self.path, self.format, self.bytes / 2**20, self.max_abs_diff,
                              self.seconds)],
                            ["path", "format", "MB", "max abs diff", "seconds"], floatfmt=".3g")


def export(model: nn.Module, path: str | os.PathLike, *,
           example_inputs: torch.Tensor | Sequence[torch.Tensor], format: str | None = None,
           dynamic_batch: bool = True, model_name: str | None = None,
           model_kwargs: dict[str, Any] | None = None) -> ExportResult:
    """Export ``model`` (in eval mode) to ``path`` and check the artifact against it.

    Args:
        model: the model to export; its training flags are restored afterwards and it is
            not otherwise changed.
        path: the file to write; its suffix picks the format unless ``format`` is given.
        example_inputs: one input batch (a tensor or a tuple of tensors) to trace with and to
            check the artifact on.
        format: ``"pt2"``, ``"onnx"``, ``"torchscript"`` (or ``"ts"``), ``"state_dict"`` (or
            ``"pth"``); default: from the suffix of ``path``.
        dynamic_batch: the artifact accepts any batch size (first dimension of every input);
            otherwise it is fixed to the example's. ``.pth`` files are always dynamic.
        model_name, model_kwargs: the torchvision name and constructor arguments of the
            unpruned model (``torchvision.models.get_model(model_name, **model_kwargs)``), stored
            so that :func:`load` can rebuild a ``.pth`` file without being given a model.

    Raises:
        ExportError: unknown format, a directory that does not exist, a missing package.
        UntraceableModelError: torch.export / TorchScript / ONNX could not capture the model.
        NonFiniteError: the eager model's output on the example inputs is not finite.

    Example:
        >>> import tempfile
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> x = torch.randn(2, 3, 8, 8); _ = model(x)
        >>> folder = tempfile.mkdtemp()
        >>> r = export(model, f"{folder}/model.onnx", example_inputs=x)
        >>> r.format, r.max_abs_diff < 1e-5
        ('onnx', True)
    """
    start = time.perf_counter()
    path = os.fspath(path)
    fmt = _format(path, format)
    inputs = _as_tuple(example_inputs)
    _check_directory(path)
    with eval_mode(model):
        with torch.no_grad():
            expected = model(*inputs)
        check_finite(expected, "the model's output on example_inputs",
                     fix="check the weights and the inputs before exporting")
        info = _info(model, inputs, fmt, dynamic_batch, model_name, model_kwargs)
        # torch.export, TorchScript and the ONNX exporter keep global tracing state: two
        # exports in one process at once (threads) break each other, so they take turns.
        with _ONE_AT_A_TIME, atomic_path(path) as tmp:  # never a partial file at ``path``
            # Not under no_grad: there nn.MultiheadAttention takes its fused inference path
            # (aten::_native_multi_head_attention), which the ONNX exporter cannot translate.
            _WRITERS[fmt](model, tmp, inputs, dynamic_batch, info)
            with torch.no_grad():
                diff = _check(tmp, fmt, model, inputs, expected)
            size = os.path.getsize(tmp)
    return ExportResult(path=path, format=fmt, max_abs_diff=diff, bytes=size,
                        seconds=time.perf_counter() - start)


def load(path: str | os.PathLike, *, model: nn.Module | None = None, format: str | None = None,
         threads: int | None = None) -> Any:
    """Load an artifact written by :func:`export` (or any file of the four formats).

    Returns something to call like a module: ``.pt2`` the ExportedProgram's ``.module()``,
    ``.ts`` a ScriptModule, ``.onnx`` an :class:`OnnxModule` (onnxruntime session, torch
    tensors in and out, ``threads`` intra-op threads), ``.pth`` the pruned ``nn.Module``:
    torch-pruning's state dict loaded into ``model`` (a fresh, unpruned instance of the same
    architecture; default: rebuilt from the torchvision name stored at export). A ``.pth`` file
    is a pickle: load only files you trust.

    Example:
        >>> import tempfile
        >>> path = f"{tempfile.mkdtemp()}/linear.pt2"
        >>> _ = export(nn.Linear(3, 2), path, example_inputs=torch.randn(2, 3))
        >>> load(path)(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """
    path = os.fspath(path)
    fmt = _existing_format(path, format)
    try:
        return _load(path, fmt, model, threads)
    except ImportError as exc:
        raise ExportError(f"loading {fmt} files needs {exc.name}: pip install "
                          "'fxgndi[onnx]'") from exc


def _load(path: str, fmt: str, model: nn.Module | None, threads: int | None) -> Any:
    if fmt == "pt2":
        return torch.export.load(path).module()
    if fmt == "torchscript":
        with _quiet_jit():
            return torch.jit.load(path, map_location="cpu")
    if fmt == "onnx":
        return OnnxModule(path, threads=threads)
    return _load_state_dict(path, model)


def _check(path: str, fmt: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
           expected: Any) -> float:
    """Largest absolute output difference of the artifact at ``path`` from ``expected``."""
    try:
        # A .pth file is rebuilt on a copy of the model: only the saved state can matter.
        loaded = _load(path, fmt, copy.deepcopy(model) if fmt == "state_dict" else None, None)
    except ImportError:  # onnxruntime is optional: the file is written, unchecked
        return float("nan")
    return _max_abs_diff(expected, loaded(*inputs))


def artifact_info(path: str | os.PathLike) -> dict[str, Any]:
    """The record :func:`export` stored in the artifact (MACs and params per sample counted by
    torch-pruning on the eager model, example input shape, format, torchvision name), or
    ``{}`` for a file that has none.

    Example:
        >>> import tempfile
        >>> path = f"{tempfile.mkdtemp()}/linear.ts"
        >>> _ = export(nn.Linear(3, 2), path, example_inputs=torch.randn(2, 3))
        >>> artifact_info(path)["params"], artifact_info(path)["input_shapes"]
        (8, [[3]])
    """
    path = os.fspath(path)
    fmt = _existing_format(path, None)
    try:
        if fmt == "pt2":
            files = {_INFO_NAME: ""}
            torch.export.load(path, extra_files=files)
            text = files[_INFO_NAME]
        elif fmt == "torchscript":
            files = {_INFO_NAME: ""}
            with _quiet_jit():
                torch.jit.load(path, map_location="cpu", _extra_files=files)
            text = files[_INFO_NAME]
        elif fmt == "onnx":
            import onnx
            props = onnx.load(path, load_external_data=False).metadata_props
            text = next((p.value for p in props if p.key == _INFO_NAME), "")
        else:
            text = json.dumps(torch.load(path, map_location="cpu", weights_only=False)
                              .get("fxgndi", {}))
    except ImportError:
        return {}
    return json.loads(text) if text else {}


class OnnxModule(nn.Module):
    """An onnxruntime session behind a module's call: torch tensors in, torch tensors out.

    Example:
        >>> import tempfile
        >>> path = f"{tempfile.mkdtemp()}/linear.onnx"
        >>> _ = export(nn.Linear(3, 2), path, example_inputs=torch.randn(2, 3))
        >>> OnnxModule(path, threads=1)(torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def format_of(path: str | os.PathLike, format: str | None = None) -> str:
    """The export format of ``path``: ``format`` when given, else from the suffix; raises
    ExportError naming the known ones otherwise.

    Example:
        >>> format_of("pruned.onnx"), format_of("x.bin", "ts")
        ('onnx', 'torchscript')
    """
    return _format(os.fspath(path), format)


def _format(path: str, format: str | None) -> str:
    aliases = {"ts": "torchscript", "pth": "state_dict"}
    if format is not None:
        fmt = aliases.get(format, format)
        if fmt not in FORMATS.values():
            raise ExportError(f"unknown format {format!r}: use one of "
                              f"{', '.join(FORMATS.values())}")
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot tell the format of {path!r} from its suffix "
                          f"{suffix or '(none)'!r}: end the name with one of "
                          f"{', '.join(FORMATS)}, or pass format= (the CLI's --format)")
    return FORMATS[suffix]


def _existing_format(path: str, format: str | None) -> str:
    """The format of an artifact that must already exist (ExportError when it does not)."""
    fmt = _format(path, format)
    if not os.path.isfile(path):
        raise ExportError(f"{path!r} does not exist: pass the path of a file written by "
                          "fxgndi.export")
    return fmt


def _check_directory(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"{path!r} is a directory: pass a file path such as "
                          f"{os.path.join(path, 'model.pt2')!r}")
    if not os.path.isdir(folder):
        raise ExportError(f"the directory {folder!r} does not exist: create it first "
                          f"(mkdir -p {folder}) or pass another path")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"the directory {folder!r} is not writable: pass another path")


def _as_tuple(example: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError("example_inputs must be a tensor or a tuple of tensors (one input "
                          "batch), e.g. torch.randn(2, 3, 224, 224)")
    return inputs


def _trace_inputs(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
                  ) -> tuple[torch.Tensor, ...]:
    # torch.export specialises sizes 0 and 1: a dynamic batch needs an example of at least 2.
    if dynamic_batch and inputs[0].shape[0] < 2:
        return tuple(torch.cat([t, t]) for t in inputs)
    return inputs


def _info(model: nn.Module, inputs: tuple[torch.Tensor, ...], fmt: str, dynamic_batch: bool,
          name: str | None, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    macs, params = count_macs_params(model, tuple(t[:1] for t in inputs))
    return {"format": fmt, "input_shapes": [list(t.shape[1:]) for t in inputs],
            "dynamic_batch": dynamic_batch or fmt == "state_dict",
            "batch_size": int(inputs[0].shape[0]), "macs": int(macs),
            "params": int(params), "model_name": name, "model_kwargs": dict(kwargs or {}),
            "torch": torch.__version__}


def _untraceable(fmt: str, exc: BaseException) -> UntraceableModelError:
    if fmt == "ONNX":
        fix = ("an operation above has no ONNX translation at opset "
               f"{_ONNX_OPSET}: export to .pt2, .ts or .pth instead, or replace that operation")
    else:
        fix = ("remove data-dependent Python control flow from forward (or wrap it in "
               "torch.cond), pass dynamic_batch=False if the batch size is used as a Python "
               "number, or export to another format")
    return UntraceableModelError(f"{fmt} export could not capture the model "
                                 f"({type(exc).__name__}: {str(exc).strip()[:600]}). Fix: {fix}")


def _write_pt2(model: nn.Module, tmp: str, inputs: tuple[torch.Tensor, ...],
               dynamic_batch: bool, info: dict[str, Any]) -> None:
    traced = _trace_inputs(inputs, dynamic_batch)
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in traced)
    try:
        program = torch.export.export(model, traced, dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, ...)
        raise _untraceable("torch.export", exc) from exc
    torch.export.save(program, tmp, extra_files={_INFO_NAME: json.dumps(info)})


def _write_torchscript(model: nn.Module, tmp: str, inputs: tuple[torch.Tensor, ...],
                       dynamic_batch: bool, info: dict[str, Any]) -> None:
    traced = _trace_inputs(inputs, dynamic_batch)
    try:
        # check_trace re-runs and compares graphs, which fails spuriously on modules whose
        # graph names differ between runs (torchvision's MultiheadAttention); the output check
        # in export() is the real test.
        with _quiet_jit():
            script = torch.jit.trace(model, traced, check_trace=False)
    except Exception as exc:
        raise _untraceable("TorchScript", exc) from exc
    with _quiet_jit():
        torch.jit.save(script, tmp, _extra_files={_INFO_NAME: json.dumps(info)})


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence torch.jit's deprecation notices (the user asked for this format on purpose) and
    its tracer's warnings about Python values: export() checks the artifact's output itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=r".*legacy TorchScript-based ONNX")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _write_onnx(model: nn.Module, tmp: str, inputs: tuple[torch.Tensor, ...],
                dynamic_batch: bool, info: dict[str, Any]) -> None:
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n in names + ["output"]} if dynamic_batch else None
    try:
        # The TorchScript-based exporter (dynamo=False), not torch 2.14's default dynamo one:
        # it is much faster (README, "Export"), writes one self-contained file (the dynamo
        # exporter puts weights in a side file by default, which an atomic rename of one file
        # cannot cover) and needs no onnxscript. The output is checked with onnxruntime.
        with _quiet_jit():
            torch.onnx.export(model, _trace_inputs(inputs, dynamic_batch), tmp, dynamo=False,
                              input_names=names, output_names=["output"], dynamic_axes=axes,
                              opset_version=_ONNX_OPSET)
    except Exception as exc:
        raise _untraceable("ONNX", exc) from exc
    try:
        import onnx
    except ImportError:
        return  # the record is optional; onnx comes with the [onnx] extra
    proto = onnx.load(tmp)
    proto.metadata_props.add(key=_INFO_NAME, value=json.dumps(info))
    onnx.save(proto, tmp)


def _write_state_dict(model: nn.Module, tmp: str, inputs: tuple[torch.Tensor, ...],
                      dynamic_batch: bool, info: dict[str, Any]) -> None:
    import torch_pruning as tp

    if isinstance(model, torch.fx.GraphModule):
        raise ExportError("a .pth file rebuilds the unpruned architecture and loads pruned "
                          "weights into it, but this model is a torch.fx GraphModule (e.g. "
                          "depth-pruned) whose graph differs from that architecture: export "
                          "to .pt2, .onnx or .ts instead")
    try:
        torch.save({"fxgndi": info, "class": _class_path(model),
                    "torch_pruning": tp.state_dict(model)}, tmp)
    except Exception as exc:  # pickling fails on lambdas in hooks, open handles, ...
        raise ExportError(f"cannot pickle the model's state ({type(exc).__name__}: {exc}): "
                          "remove hooks or attributes holding functions, or export to .pt2")\
            from exc


_WRITERS = {"pt2": _write_pt2, "torchscript": _write_torchscript, "onnx": _write_onnx,
            "state_dict": _write_state_dict}


def _load_state_dict(path: str, model: nn.Module | None) -> nn.Module:
    import torch_pruning as tp

    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or "torch_pruning" not in saved:
        raise ExportError(f"{path!r} is not a pruned-model file written by fxgndi.export "
                          "(no torch-pruning state): for a plain state dict use "
                          "fxgndi.app.models.load_model(name, checkpoint=path)")
    info = saved.get("fxgndi", {})
    if model is None:
        if not info.get("model_name"):
            raise ExportError(f"{path!r} does not record which model it was pruned from: pass "
                              f"model=<a fresh {saved.get('class', 'model')}>, or export with "
                              "model_name=")
        import torchvision
        model = torchvision.models.get_model(info["model_name"], weights=None,
                                             **info.get("model_kwargs", {}))
    elif _class_path(model) != saved.get("class", _class_path(model)):
        raise ExportError(f"{path!r} holds a pruned {saved['class']}, not a "
                          f"{_class_path(model)}: pass a fresh model of the same architecture")
    return tp.load_state_dict(model, saved["torch_pruning"]).eval()


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _max_abs_diff(expected: Any, actual: Any) -> float:
    pairs = list(zip(_flatten(expected), _flatten(actual)))
    return max(float((e.detach().cpu().float() - a.detach().cpu().float()).abs().max())
               for e, a in pairs)


def _flatten(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [t for o in outputs for t in _flatten(o)]
