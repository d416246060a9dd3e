"""The ``fxgndi`` command: wires the library's functions to arguments; no logic of its own.

Exit codes: 0 ok, 1 failure (a clear one-line message; ``--debug`` shows the traceback),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

# Only the vocabulary at import time: `fxgndi --help` must not pay for torch, torch-pruning,
# scipy or matplotlib. Each subcommand imports what it runs.
from fxgndi.core.names import (BASELINES, DATA_SPLITS, DEFAULT_PROBES, DEPTH_BASELINES,
                               DEPTH_IMPORTANCES, DEPTH_TARGETS, EXPORT_FORMATS, GRANULARITIES,
                               LATENCY_RUNTIMES, METRICS, MODES, PRUNE_IMPORTANCES,
                               PRUNE_TARGETS, READOUTS, VALIDITY_IMPORTANCES)

EXAMPLES = """examples:
  fxgndi demo
  fxgndi sites --model resnet18 --data digits
  fxgndi score --model digits-resnet18 --data digits --sites conv linear --steps 4
  fxgndi score --model resnet50 --weights IMAGENET1K_V2 --data imagefolder:/data/val \\
      --granularity channel --baseline channel-mean --json
  fxgndi ablate --model digits-resnet18 --data digits --metric accuracy --plot ablate.png
  fxgndi validate --model digits-resnet18 --data digits --granularity channel \\
      --baseline channel-mean --truth logit_l2 --plot validity.png
  fxgndi prune --model digits-resnet18 --data digits --sparsity 0.5 --target macs \\
      --finetune-epochs 1       # scores and fine-tunes on train, reports accuracy on test
  fxgndi prune --model resnet50 --data digits --importance l1 --target macs --out pruned.pt2
  fxgndi bench --model resnet50 --pruned pruned.pt2 --batch 1 32
  fxgndi export --model resnet18 --checkpoint r18.pt --num-classes 10 --out resnet18.onnx
  fxgndi score --model resnet50 --data imagefolder:/data/val --granularity channel \\
      --max-memory 8GB --run-state run.pt --save-every 20      # later: same command + --resume
  torchrun --nproc-per-node 8 -m fxgndi score --model resnet50 --data imagefolder:/data/val \\
      --device cuda --granularity channel --json
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxgndi`` console script; returns the exit code.

    Example:
        >>> main(["sites", "--model", "resnet18", "--data", "digits", "--quiet"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    import torch

    from fxgndi.gndi.distributed import init_from_env

    torch.manual_seed(args.seed)
    # torch's own forward-AD set-up scripts a decomposition on first use and warns about
    # TorchScript's deprecation: nothing a user of the command can act on.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated",
                            category=FutureWarning)
    try:
        _check_before_work(args)
    except Exception as exc:  # under torchrun every rank fails here: rank 0 says why
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"fxgndi: error: {exc}", file=sys.stderr)
        else:  # torchrun stops every process when one exits: give rank 0 time to say why
            time.sleep(1.0)
        return 1
    try:
        args.device = init_from_env(args.device)
        args.run(args)
        _report_skipped(args)
    except KeyboardInterrupt:
        saved = getattr(args, "run_state", None)
        print("fxgndi: interrupted" + (f"; the partial sums are in {saved}: rerun the same "
                                       "command with --resume" if saved else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line unless --debug
        if args.debug:
            raise
        hint = (" (on the command line: --leaf-module NAME, --concrete-arg NAME=VALUE)"
                if type(exc).__name__ == "UntraceableModelError" else "")
        print(f"fxgndi: error: {exc}{hint}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fxgndi", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Causal layer and channel importance (G-NDI) on torch.fx.")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands")

    demo = _command(sub, "demo", _run_demo, "train (or load) the digits ResNet-18 and compare "
                    "G-NDI with exact ablations", "fxgndi demo --out demo-out")
    demo.add_argument("--out", default="demo-out", metavar="DIR",
                      help="folder for what the demo makes: pruned models (.pt2), figures, "
                           "demo.txt (all it printed), demo.md (its tables); default demo-out")

    sites = _command(sub, "sites", _run_sites, "list the intervention sites of a model",
                     "fxgndi sites --model resnet18 --data digits --sites block")
    _model_args(sites)
    _site_args(sites)

    scorer = _command(sub, "score", _run_score, "G-NDI importance of every site or channel",
                      "fxgndi score --model digits-resnet18 --data digits --steps 4 --json")
    _model_args(scorer)
    _site_args(scorer)
    scorer.add_argument("--readout", default="logits", choices=READOUTS)
    scorer.add_argument("--steps", type=int, default=1,
                        help="1 = first order; m > 1 = path-integrated over m midpoints")
    scorer.add_argument("--p", type=float, default=2.0, help="norm of the output change")
    scorer.add_argument("--mode", default="auto", choices=MODES,
                        help="how the tangents are computed (the value is the same)")
    scorer.add_argument("--probes", type=int, default=DEFAULT_PROBES,
                        help="Rademacher probes (probe mode; auto uses them on wide heads; "
                             "default %(default)s)")
    _long_run_args(scorer)

    ablater = _command(sub, "ablate", _run_ablate, "exact effect of do(h := b) at every site",
                       "fxgndi ablate --model digits-resnet18 --data digits --metric logit_l2")
    _model_args(ablater)
    _site_args(ablater)
    ablater.add_argument("--metric", default="accuracy", choices=METRICS)
    _long_run_args(ablater)

    pruner = _command(sub, "prune", _run_prune,
                      "remove the least important channels with torch-pruning",
                      "fxgndi prune --model digits-resnet18 --data digits --sparsity 0.5 "
                      "--target macs --importance gndi")
    _model_args(pruner, roles=True)
    pruner.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of channels / params / MACs to remove, in (0, 1)")
    pruner.add_argument("--target", default="channels", choices=PRUNE_TARGETS)
    _latency_args(pruner)
    pruner.add_argument("--importance", default="gndi", choices=PRUNE_IMPORTANCES)
    pruner.add_argument("--global-pruning", action="store_true")
    pruner.add_argument("--round-to", type=_round_to, default="auto", metavar="auto|none|N",
                        help="kept channel counts: 'auto' (default) rounds each group to the "
                             "multiple its kernels measure fastest at, 'none' leaves them, N "
                             "keeps multiples of N")
    pruner.add_argument("--allocate", default=None, choices=["uniform", "time"],
                        help="how a MAC target is spread over the groups: 'time' tilts it "
                             "toward the channels that cost the most time per MAC, timed on "
                             "--runtime at --latency-batch; 'uniform' the same fraction of "
                             "every group (default: prune's)")
    pruner.add_argument("--compensate", action="store_true",
                        help="fold removed channels' means into the consumers' biases")
    _repair_args(pruner)
    pruner.add_argument("--out", default=None, metavar="PATH",
                        help="also export the pruned model: .pt2, .onnx, .ts or .pth")
    _format_arg(pruner)

    depth = _command(sub, "prune-depth", _run_prune_depth,
                     "remove whole residual branches, least causally important first",
                     "fxgndi prune-depth --model digits-resnet18 --data digits --blocks 2")
    _model_args(depth, roles=True)
    depth.add_argument("--blocks", type=int, default=None, help="how many blocks to remove")
    depth.add_argument("--target", default=None, choices=DEPTH_TARGETS,
                       help="instead of --blocks: remove blocks until --sparsity of this is gone")
    _latency_args(depth)
    depth.add_argument("--sparsity", type=float, default=None)
    depth.add_argument("--importance", default="gndi", choices=DEPTH_IMPORTANCES)
    depth.add_argument("--steps", type=int, default=4,
                       help="G-NDI path midpoints (1 = first order)")
    depth.add_argument("--baseline", default="zero", choices=DEPTH_BASELINES,
                       help="what a removed branch becomes: nothing, or its per-channel mean")
    depth.add_argument("--no-greedy", dest="greedy", action="store_false",
                       help="rank once instead of re-scoring after each removal")
    _repair_args(depth)
    depth.add_argument("--out", default=None, metavar="PATH",
                       help="also export the pruned model: .pt2, .onnx or .ts")
    _format_arg(depth)

    exporter = _command(sub, "export", _run_export,
                        "save a model as .pt2, .onnx, .ts or .pth, checked against eager",
                        "fxgndi export --model resnet18 --num-classes 10 --out resnet18.onnx")
    _model_args(exporter)
    exporter.add_argument("--out", required=True, metavar="PATH",
                          help="the file to write; its suffix (.pt2 .onnx .ts .pth) picks the "
                               "format unless --format is given")
    _format_arg(exporter)
    exporter.set_defaults(plot=None)

    bencher = _command(sub, "bench", _run_bench,
                       "latency, throughput, MACs and memory of a model and its pruned exports",
                       "fxgndi bench --model resnet50 --pruned pruned.pt2 --batch 1 32")
    bencher.add_argument("--model", required=True,
                         help="the baseline: a torchvision model name, or digits-resnet18")
    bencher.add_argument("--weights", default=None)
    bencher.add_argument("--checkpoint", default=None, help="a state-dict file to load")
    bencher.add_argument("--num-classes", type=int, default=None,
                         help="default: the one recorded in the first --pruned file, else 1000")
    bencher.add_argument("--pruned", nargs="*", default=[], metavar="FILE",
                         help="exported files (.pt2 .onnx .ts .pth) to compare with --model, "
                              "each against --model exported to its format (the 'vs' column)")
    bencher.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    bencher.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="N",
                         help="one sample's shape (default: the first --pruned file's, else "
                              "3 224 224)")
    bencher.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads")
    bencher.add_argument("--warmup", type=int, default=3)
    bencher.add_argument("--repeat", type=int, default=20)
    bencher.add_argument("--compile", action="store_true", help="add torch.compile rows")
    bencher.add_argument("--system-heap", action="store_true",
                         help=_SYSTEM_HEAP_HELP)
    bencher.add_argument("--plot", default=None, help="write a speed-up bar chart (PNG)")

    validator = _command(sub, "validate", _run_validate,
                         "how well each importance measure ranks the exact ablation effect",
                         "fxgndi validate --model digits-resnet18 --data digits "
                         "--granularity channel --baseline channel-mean --truth logit_l2")
    _model_args(validator)
    _site_args(validator)
    validator.add_argument("--truth", default="accuracy", choices=METRICS,
                           help="the metric of the exact ablation the estimates are ranked by")
    validator.add_argument("--importances", nargs="+", default=None,
                           choices=VALIDITY_IMPORTANCES, metavar="NAME",
                           help="G-NDI variants and criteria to compare (default: all but "
                                f"ablation); from {', '.join(VALIDITY_IMPORTANCES)}")
    validator.add_argument("--n-channels", type=int, default=300)
    validator.add_argument("--n-boot", type=int, default=10000)
    return parser


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None, choices=[*EXPORT_FORMATS.values(), "ts", "pth"],
                   help="the export format of --out (default: from its suffix)")


def _repair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-repair", action="store_true",
                   help="return the model as torch-pruning leaves it (by default it is repaired "
                        "on the --calib-split: least-squares refits of the layers that lost "
                        "inputs, then BatchNorm statistics re-estimated)")
    p.add_argument("--no-reconstruct", action="store_true",
                   help="skip the least-squares refits of the layers that lost inputs")
    p.add_argument("--no-recalibrate-bn", action="store_true",
                   help="keep the dense model's BatchNorm running statistics")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="make BatchNorm recalibration an error when it cannot run (by default "
                        "it runs when it can)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune the pruned model on the --calib-split for this many epochs "
                        "(BatchNorm is recalibrated first; both accuracies are reported)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="peak learning rate of the fine-tuning (AdamW, warm-up + cosine; "
                        "default 1e-4, fxgndi.pruning.finetune.FINETUNE_LR)")


def _repair(args, *, compensate: bool = False) -> dict[str, Any]:
    """The repair steps prune / prune_depth run (a dict of fxgndi.Repair's fields). Fine-tuning
    is not among them: the CLI runs it after measuring the repaired, untrained model
    (:func:`_fine_tune`)."""
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, not {args.finetune_epochs}")
    if args.no_repair:
        return {"reconstruct": False, "recalibrate_bn": False, "compensate": compensate,
                "finetune": None}
    recalibrate = True if args.recalibrate_bn else False if args.no_recalibrate_bn else "auto"
    return {"reconstruct": not args.no_reconstruct, "recalibrate_bn": recalibrate,
            "compensate": compensate, "finetune": None}


def _finetune_settings(args) -> dict[str, Any]:
    from fxgndi.pruning.finetune import FINETUNE_LR
    return {"epochs": args.finetune_epochs,
            "lr": FINETUNE_LR if args.finetune_lr is None else args.finetune_lr}


def _command(sub, name: str, run: Callable, help_text: str, example: str):
    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run, command=name)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    return p


def _model_args(p: argparse.ArgumentParser, *, roles: bool = False) -> None:
    """The model and data arguments; with ``roles`` (the pruning commands) the data has two
    splits: one that scoring, calibration, repair and fine-tuning read, and a held-out one the
    accuracy is measured on."""
    p.add_argument("--model", required=True,
                   help="a torchvision model name, or digits-resnet18 (the built-in trained one)")
    p.add_argument("--weights", default=None, help="torchvision weights name, e.g. DEFAULT")
    p.add_argument("--checkpoint", default=None, help="a state-dict file to load")
    p.add_argument("--num-classes", type=int, default=None,
                   help="output width (default: the data's number of classes)")
    p.add_argument("--data", default="digits",
                   help="digits | cifar10:/root | imagefolder:/path (default: digits)")
    if roles:
        p.add_argument("--calib-split", "--split", dest="calib_split", default="train",
                       choices=DATA_SPLITS,
                       help="the split that scoring, calibration, repair and fine-tuning read "
                            "(default: train)")
        p.add_argument("--eval-split", default="test", choices=DATA_SPLITS,
                       help="the held-out split the accuracy before / after is measured on "
                            "(default: test); it must not overlap --calib-split")
        p.add_argument("--allow-overlap", action="store_true",
                       help="accept an --eval-split that shares samples with --calib-split "
                            "(the accuracy is then not held-out, and the output says so)")
    else:
        p.add_argument("--split", default="test", choices=DATA_SPLITS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N samples (of each split)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--strict", action="store_true",
                   help="fail on an unreadable image instead of skipping it (ImageFolder)")
    p.add_argument("--concrete-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a forward argument while tracing, e.g. return_features=False "
                        "(a Python literal; repeatable)")
    p.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="keep this module opaque to torch.fx (repeatable)")
    p.add_argument("--output", default=None, metavar="KEY",
                   help="which entry of a dict / tuple output to read (a key or an index; "
                        "default: a dict's logits or out, a tuple's first)")


def _long_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", default=None,
                   help="memory for activations and tangents, e.g. 4GB: batches and vmap "
                        "chunks are split to fit")
    p.add_argument("--run-state", default=None, metavar="PATH",
                   help="save the partial sums here every --save-every batches (atomically)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --run-state (same command, same data)")
    p.add_argument("--save-every", type=int, default=50, metavar="N")


def _trace_kwargs(args) -> dict[str, Any]:
    """The run options that say how to trace and read the model (--concrete-arg,
    --leaf-module, --output)."""
    import ast
    concrete = {}
    for item in args.concrete_arg:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--concrete-arg {item!r}: write NAME=VALUE, e.g. "
                             "return_features=False")
        try:
            concrete[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--concrete-arg {item!r}: the value must be a Python literal "
                             "(False, 3, 'mode', None)") from None
    output = args.output
    if output is not None and output.lstrip("-").isdigit():
        output = int(output)
    return {"concrete_args": concrete or None, "leaf_modules": tuple(args.leaf_module),
            "output": output}


def _long_run_kwargs(args) -> dict[str, Any]:
    if args.resume and not args.run_state:
        raise ValueError("--resume needs --run-state PATH, the file the interrupted run saved")
    return {"max_memory": args.max_memory, "run_state": args.run_state, "resume": args.resume,
            "save_every": args.save_every}


def _check_before_work(args) -> None:
    """Fail before any loading, tracing or process-group set-up when the device cannot be used
    or an output file could not be written."""
    from fxgndi.core.runtime import check_device
    from fxgndi.gndi.distributed import launched_by_torchrun
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) \
        if launched_by_torchrun() else None
    check_device(args.device, processes_per_node=per_node)
    _check_outputs(args)
    _check_splits(args)


def _check_splits(args) -> None:
    """Refuse an --eval-split that shares samples with --calib-split (unless --allow-overlap)."""
    if getattr(args, "eval_split", None) is None:
        return
    from fxgndi.app.data import split_overlap
    args.overlap = split_overlap(args.data, args.calib_split, args.eval_split)
    if args.overlap and not args.allow_overlap:
        raise ValueError(f"--eval-split {args.eval_split} overlaps --calib-split "
                         f"{args.calib_split} ({args.overlap}), so the accuracy would be "
                         "measured on samples the pruning read: use disjoint splits (e.g. "
                         "--calib-split train --eval-split test), or pass --allow-overlap")


def _check_outputs(args) -> None:
    """Fail before any work when an output file could not be written."""
    for flag in ("plot", "run_state", "out"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise FileNotFoundError(f"cannot write --{flag.replace('_', '-')} {path}: folder "
                                    f"{folder} does not exist or is not writable")


def _report_skipped(args) -> None:
    from fxgndi.gndi.distributed import is_main
    for loader in (getattr(args, "loaded_data", None), getattr(args, "eval_data", None)):
        dataset = getattr(loader, "dataset", None)
        skipped = getattr(dataset, "skipped", 0)
        if skipped and is_main():
            print(f"fxgndi: skipped {skipped} unreadable image(s) (--strict makes this an "
                  f"error): {', '.join(dataset.skipped_files[:5])}", file=sys.stderr)


def _site_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", nargs="+", default=["conv"],
                   help="kinds (conv linear bn norm act block), names or globs")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    p.add_argument("--baseline", default="zero", choices=BASELINES)
    p.add_argument("--plot", default=None, help="write a bar chart to this PNG path")


def _load(args) -> tuple[Any, Any]:
    """The data and the model the arguments name: the data of --split, or, for the pruning
    commands, of --calib-split (the held-out --eval-split is loaded into ``args.eval_data``)."""
    from fxgndi.app.data import load_data, num_classes

    def split(name: str):
        return load_data(args.data, split=name, batch_size=args.batch_size, limit=args.limit,
                         image_size=args.image_size, seed=args.seed, strict=args.strict)

    roles = getattr(args, "eval_split", None) is not None
    data = split(args.calib_split if roles else args.split)
    args.loaded_data = data
    if roles:
        args.eval_data = split(args.eval_split)
    classes = args.num_classes
    if classes is None and args.weights is None and args.model != "digits-resnet18":
        classes = num_classes(args.data)
    model = _model(args, num_classes=classes, image_size=args.image_size)
    if args.device:
        model = model.to(args.device)
    return model.eval(), data


def _model(args, *, num_classes: int | None, image_size: int | None) -> Any:
    """The one place the CLI builds a model: the built-in digits ResNet-18, or a torchvision
    classifier with --weights or --checkpoint."""
    if args.model == "digits-resnet18":
        from fxgndi.app.zoo import digits_resnet18
        return digits_resnet18(progress=not args.quiet)
    from fxgndi.app.models import load_model
    # torchvision's ViTs are built for one image size; others adapt to any.
    extra = {"image_size": image_size} if image_size and args.model.startswith("vit_") else {}
    return load_model(args.model, num_classes=num_classes, weights=args.weights,
                      checkpoint=args.checkpoint, **extra)


def _emit(args, result) -> None:
    """Print a Scores or ValidityReport as JSON or a table, and plot it when asked (on
    rank 0 only under torchrun)."""
    from fxgndi.gndi.distributed import is_main
    if not is_main():
        return
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if args.plot:
        result.plot(args.plot)
        print(f"fxgndi: plot written to {os.path.abspath(args.plot)}", file=sys.stderr)


def _run_validate(args) -> None:
    from fxgndi.gndi.validate import validate
    model, data = _load(args)
    report = validate(model, data, importances=args.importances, truth=args.truth,
                      granularity=args.granularity, sites=args.sites, baseline=args.baseline,
                      n_channels=args.n_channels, n_boot=args.n_boot, seed=args.seed,
                      progress=not args.quiet, **_trace_kwargs(args))
    _emit(args, report)


def _round_to(text: str) -> str | int | None:
    """--round-to: auto, none, or a positive integer."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--round-to takes auto, none or an integer, not "
                                         f"{text!r}") from None


_SYSTEM_HEAP_HELP = ("time with glibc's page faults of fresh large tensors included (default: "
                     "freed memory kept for reuse, readings that do not depend on the "
                     "process's history; see fxgndi.core.heap)")


def _latency_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where time is measured (--target latency, --allocate "
                                      "time)")
    group.add_argument("--runtime", default="eager", choices=LATENCY_RUNTIMES,
                       help="what the latency is measured on: the eager module, its torch.export "
                            "program (pt2) or onnxruntime (onnx)")
    group.add_argument("--latency-batch", type=int, default=1, metavar="N",
                       help="the batch size the latency is measured at")
    group.add_argument("--system-heap", action="store_true",
                       help=_SYSTEM_HEAP_HELP)


def _allocate(args) -> dict:
    """prune's allocate: the Latency that --runtime / --latency-batch describe for 'time'."""
    if args.allocate is None:
        return {}
    if args.allocate == "uniform":
        return {"allocate": "uniform"}
    from fxgndi.deploy.latency import Latency
    return {"allocate": Latency(runtime=args.runtime, batch_size=args.latency_batch,
                                steady_heap=not args.system_heap)}


def _target(args):
    """The pruning target: a name, or the Latency that --runtime / --latency-batch describe."""
    if args.target != "latency":
        return args.target
    from fxgndi.deploy.latency import Latency
    return Latency(runtime=args.runtime, batch_size=args.latency_batch,
                   steady_heap=not args.system_heap)


def _run_prune(args) -> None:
    from fxgndi.pruning.width import prune
    if args.out:
        _check_format(args)
    model, data = _load(args)
    result = prune(model, data, sparsity=args.sparsity, target=_target(args),
                   importance=args.importance, global_pruning=args.global_pruning,
                   round_to=args.round_to, repair=_repair(args, compensate=args.compensate),
                   seed=args.seed, progress=not args.quiet, **_allocate(args),
                   **_trace_kwargs(args))
    _finish_pruning(args, model, data, result,
                    scored=args.importance in ("gndi", "ablation", "weight_taylor", "hessian"))


def _finish_pruning(args, model, data, result, *, scored: bool) -> None:
    """Fine-tune when asked (after measuring the recalibrated, untrained model), export the
    pruned model when --out is given, then print the pruning table (or JSON) with the
    accuracy on the held-out --eval-split and which split did what."""
    from fxgndi.pruning.finetune import evaluate
    args.repair_ran = result.settings.get("repair_ran")
    held_out = args.eval_data
    accuracy = {"before": evaluate(model, held_out)["accuracy"]}
    if args.finetune_epochs > 0:
        accuracy["repaired_untrained"] = evaluate(result.model, held_out)["accuracy"]
        _fine_tune(args, result, data)
    accuracy["after"] = evaluate(result.model, held_out)["accuracy"]
    if args.out:
        result.settings["export"] = _export(args, result.model, data).to_dict()
    roles = _data_roles(args, data, held_out, scored=scored)
    if args.json:
        print(json.dumps({**result.to_dict(), "accuracy": accuracy, "data": roles}, indent=2))
    else:
        print(result.table())
        print(f"\n{_roles_line(roles)}")
        print(_accuracy_table(args, accuracy, roles["evaluation"]))
    if args.out and not args.json:
        print(f"\nexported to {args.out}: {_export_summary(result.settings['export'])}")


def _fine_tune(args, result, data) -> None:
    """``repair_model``'s fine-tuning step, run here so that the model before it (pruned and
    recalibrated by prune / prune_depth) is measured too."""
    from fxgndi.pruning.finetune import fine_tune
    settings = _finetune_settings(args)
    recalibrated = bool(result.settings["repair_ran"]["recalibrate_bn"])
    fine_tune(result.model, data, **settings, recalibrate=not recalibrated, seed=args.seed,
              progress=not args.quiet)
    result.settings["repair"] = {**result.settings["repair"], "finetune": settings}


def _data_roles(args, data, held_out, *, scored: bool) -> dict[str, Any]:
    """Which split did what, with how many samples (for the output)."""
    used = ["scoring"] if scored else []
    used += _repair_steps(args)
    if args.finetune_epochs > 0:
        used.append("fine-tuning")
    return {"calibration": {"split": args.calib_split, "samples": len(data.dataset),
                            "used_for": used or ["tracing and counting MACs only"]},
            "evaluation": {"split": args.eval_split, "samples": len(held_out.dataset),
                           "used_for": ["accuracy"], "overlaps_calibration": args.overlap}}


def _repair_steps(args) -> list[str]:
    """What the repair did, in words (from the result's record of what ran)."""
    ran = getattr(args, "repair_ran", None) or {}
    steps = []
    if getattr(args, "compensate", False):
        steps.append("channel means folded")
    if ran.get("reconstruct") and ran["reconstruct"]["layers"]:
        steps.append(f"least-squares refits of {len(ran['reconstruct']['layers'])} layers")
    if ran.get("recalibrate_bn"):
        steps.append("BatchNorm recalibration")
    return steps


def _roles_line(roles: dict[str, Any]) -> str:
    calib, held = roles["calibration"], roles["evaluation"]
    used = calib["used_for"]
    what = used[0] if len(used) == 1 else f"{', '.join(used[:-1])} and {used[-1]}"
    line = (f"data: the {calib['split']} split ({calib['samples']} samples) for {what}; the "
            f"{held['split']} split ({held['samples']} samples) for the accuracy, ")
    if held["overlaps_calibration"]:
        return line + f"NOT held-out: {held['overlaps_calibration']} (--allow-overlap)"
    return line + "disjoint from it"


def _accuracy_table(args, accuracy: dict[str, float], held: dict[str, Any]) -> str:
    from fxgndi.core.report import format_table
    rows = [("dense", accuracy["before"])]
    steps = ", ".join(_repair_steps(args)) or "no repair"
    if "repaired_untrained" in accuracy:
        ft = _finetune_settings(args)
        rows += [(f"pruned and repaired ({steps}), untrained", accuracy["repaired_untrained"]),
                 (f"then fine-tuned {ft['epochs']} epoch(s) at peak lr {ft['lr']:g}",
                  accuracy["after"])]
    else:
        rows.append((f"pruned and repaired ({steps})", accuracy["after"]))
    return format_table([(label, f"{value:.1%}") for label, value in rows],
                        ["model", f"accuracy on {held['split']} ({held['samples']})"])


def _run_prune_depth(args) -> None:
    from fxgndi.pruning.depth import prune_depth
    if args.blocks is None and args.target is None:
        raise ValueError("say how much to remove: --blocks N, or --target macs --sparsity 0.3")
    if args.out:
        _check_format(args, graph_module=True)
    model, data = _load(args)
    result = prune_depth(model, data, n_blocks=args.blocks, target=_target(args),
                         sparsity=args.sparsity, importance=args.importance,
                         baseline=args.baseline, greedy=args.greedy, steps=args.steps,
                         repair=_repair(args), seed=args.seed, progress=not args.quiet,
                         **_trace_kwargs(args))
    _finish_pruning(args, model, data, result, scored=args.importance != "random")


def _run_demo(args) -> None:
    from fxgndi.app.demo import run_demo
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} is a file: the demo writes a folder there; "
                              "pass another --out")
    results = run_demo(out=args.out, progress=not args.quiet,
                       print_fn=(lambda s: None) if args.json else print)
    if args.json:
        print(json.dumps(results, indent=2))


def _run_sites(args) -> None:
    from fxgndi.fx.intervention import intervene
    from fxgndi.core.streams import first_batch
    model, data = _load(args)
    graph = intervene(model, args.sites, granularity=args.granularity,
                      example_inputs=first_batch(data), **_trace_kwargs(args))
    if args.json:
        print(json.dumps([{"name": s.name, "kind": s.kind, "shape": s.shape,
                           "channels": s.channels} for s in graph.sites], indent=2))
    else:
        print(graph.table())


def _run_score(args) -> None:
    from fxgndi.gndi.estimate import score
    model, data = _load(args)
    _emit(args, score(model, data, sites=args.sites, granularity=args.granularity,
                      baseline=args.baseline, p=args.p, steps=args.steps, readout=args.readout,
                      mode=args.mode, probes=args.probes, seed=args.seed,
                      progress=not args.quiet, **_long_run_kwargs(args),
                      **_trace_kwargs(args)))


def _run_ablate(args) -> None:
    from fxgndi.gndi.estimate import ablate
    model, data = _load(args)
    _emit(args, ablate(model, data, sites=args.sites, granularity=args.granularity,
                       baseline=args.baseline, metric=args.metric, progress=not args.quiet,
                       **_trace_kwargs(args),
                       **_long_run_kwargs(args)))


def _check_format(args, *, graph_module: bool = False) -> None:
    """Fail before any work when the export format is unknown, or (``graph_module``: the
    model will be a torch.fx GraphModule, as depth pruning returns) a .pth file."""
    from fxgndi.deploy.export import format_of
    fmt = format_of(args.out, args.format)
    if graph_module and fmt == "state_dict":
        raise ValueError(f"--out {args.out}: a depth-pruned model is a torch.fx GraphModule, "
                         "which a .pth file (torch-pruning's state dict, rebuilt on the "
                         "unpruned architecture) cannot hold: use .pt2, .onnx or .ts")


def _model_source(args) -> tuple[str, dict[str, Any]]:
    """The torchvision name and constructor arguments ``_load`` built the model from, stored
    in exports so that fxgndi.load can rebuild a .pth file."""
    from fxgndi.app.data import num_classes
    if args.model == "digits-resnet18":
        return "resnet18", {"num_classes": 10}
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None or args.weights is None:
        kwargs["num_classes"] = args.num_classes or num_classes(args.data)
    if args.image_size and args.model.startswith("vit_"):
        kwargs["image_size"] = args.image_size
    return args.model, kwargs


def _export(args, model: Any, data: Any):
    from fxgndi.deploy.export import export
    from fxgndi.core.streams import first_batch
    name, kwargs = _model_source(args)
    example = first_batch(data)[:2].to(args.device or "cpu")
    return export(model, args.out, example_inputs=example, format=args.format, model_name=name,
                  model_kwargs=kwargs)


def _export_summary(result: dict[str, Any]) -> str:
    return (f"{result['format']}, {result['bytes'] / 2**20:.1f} MB, largest output difference "
            f"from eager {result['max_abs_diff']:.3g}, {result['seconds']:.1f} s")


def _run_export(args) -> None:
    _check_format(args)
    model, data = _load(args)
    _emit(args, _export(args, model, data))


def _run_bench(args) -> None:
    from fxgndi.deploy.bench import bench
    from fxgndi.deploy.export import artifact_info
    infos = [artifact_info(path) for path in args.pruned]  # a missing file fails here
    recorded = next((i for i in infos if i.get("input_shapes")), {})
    shape = args.input_shape or recorded.get("input_shapes", [[3, 224, 224]])[0]
    classes = args.num_classes
    if classes is None and args.weights is None:
        classes = recorded.get("model_kwargs", {}).get("num_classes")
    model = _model(args, num_classes=classes, image_size=shape[-1])
    report = bench({args.model: model, **{path: path for path in args.pruned}},
                   input_shape=shape, batch_sizes=args.batch, device=args.device,
                   threads=args.threads, warmup=args.warmup, repeat=args.repeat,
                   compile=args.compile, seed=args.seed, steady_heap=not args.system_heap)
    _emit(args, report)


if __name__ == "__main__":
    sys.exit(main())
