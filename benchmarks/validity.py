"""Causal validity tables: every importance measure against the exact effect of the ablation.

Protocols (the truth is always the exact effect of the same intervention):
  * channel level, 300 random channels, truth = mean L2 change of the logits, at conv outputs
    and at BatchNorm outputs (the activations pruning removes), zero and channel-mean baselines;
  * layer level, every conv and linear layer, truth = drop in accuracy, zero baseline.

    python benchmarks/validity.py                      # the digits ResNet-18, held-out split
    python benchmarks/validity.py --model resnet18 --checkpoint c10.pt --data cifar10:/data
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fxgndi.app.data import load_data, num_classes
from fxgndi.app.models import load_model
from fxgndi.app.zoo import digits_resnet18
from fxgndi.pruning.finetune import evaluate
from fxgndi.gndi.validate import DEFAULT_CHANNEL_METHODS, DEFAULT_METHODS, validate

LAYER_METHODS = (*DEFAULT_METHODS, "gndi_margin", "gndi_path_loss", "ablation")
PROTOCOLS = [
    # (title, granularity, sites, baseline, truth)
    ("channel, conv outputs, zero baseline (the paper's protocol)", "channel", "conv", "zero",
     "logit_l2"),
    ("channel, conv outputs, channel-mean baseline", "channel", "conv", "channel-mean",
     "logit_l2"),
    ("channel, BatchNorm outputs, zero baseline", "channel", "bn", "zero", "logit_l2"),
    ("channel, BatchNorm outputs, channel-mean baseline", "channel", "bn", "channel-mean",
     "logit_l2"),
    ("layer, conv and linear layers, zero baseline, truth = accuracy drop", "layer",
     ["conv", "linear"], "zero", "accuracy"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-resnet18")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--limit", type=int, default=None, help="samples of the held-out split")
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--n-channels", type=int, default=300)
    parser.add_argument("--n-boot", type=int, default=10000)
    parser.add_argument("--only", type=int, nargs="*", default=None,
                        help="run only these protocol numbers (1-based)")
    parser.add_argument("--plot", default=None, help="PNG path for the first protocol's figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.model == "digits-resnet18":
        model = digits_resnet18(progress=False)
    else:
        model = load_model(args.model, num_classes=num_classes(args.data),
                           checkpoint=args.checkpoint)
    data = load_data(args.data, split="test", batch_size=args.batch_size, limit=args.limit)
    accuracy = evaluate(model, data)["accuracy"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; model {args.model} on {args.data}: held-out accuracy "
          f"{accuracy:.1%} on {len(data.dataset)} samples\n")
    results = {"accuracy": accuracy, "protocols": []}
    for i, (title, granularity, sites, baseline, truth) in enumerate(PROTOCOLS, 1):
        if args.only and i not in args.only:
            continue
        start = time.perf_counter()
        report = validate(model, data, importances=LAYER_METHODS if granularity == "layer"
                          else DEFAULT_CHANNEL_METHODS, truth=truth, granularity=granularity,
                          sites=sites, baseline=baseline, n_channels=args.n_channels,
                          n_boot=args.n_boot, progress=False)
        print(f"{i}. {title}")
        print(report.table())
        print(f"({time.perf_counter() - start:.0f} s)\n")
        if args.plot and not results["protocols"]:
            report.plot(args.plot)
        results["protocols"].append({"title": title, **report.to_dict()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
