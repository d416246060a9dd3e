"""Train the digits models at another image size, for benchmarks whose timing needs larger
feature maps than the zoo's 32 px (where small kernels are dispatch-bound).

    python benchmarks/digits_models.py --image-size 112 --out ckpt/   # ~9 min on 2 cores
    python benchmarks/pruning.py --model mobilenet_v2 --checkpoint ckpt/mobilenet_v2_112.pt \\
        --image-size 112 --criteria gndi-zero l1 --points 2 3 --finetune-epochs 0 --time

Each architecture is ``torchvision.models.get_model(arch, num_classes=10)`` trained on the
digits train split, upsampled to ``--image-size``, with the zoo's recipe for it
(``fxgndi.app.zoo.DIGITS_RECIPES``: epochs, batch size, learning rate, seed); the state dict
goes to ``<out>/<arch>_<size>.pt`` and the test accuracy is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision

from fxgndi.app.data import load_data
from fxgndi.app.zoo import DIGITS_ARCHITECTURES, DIGITS_RECIPES
from fxgndi.core.files import atomic_path
from fxgndi.pruning.finetune import evaluate, seeded, train_classifier


def train(arch: str, image_size: int, epochs: int | None = None
          ) -> tuple[torch.nn.Module, dict]:
    """One digits model of ``arch`` at ``image_size`` (for ``epochs``: default the recipe's)
    and its test metrics."""
    recipe = {**DIGITS_RECIPES[arch], **({"epochs": epochs} if epochs else {})}
    with seeded(recipe["seed"], torch.device("cpu")):  # the initial weights
        model = torchvision.models.get_model(arch, num_classes=10)
    loader = load_data("digits", split="train", batch_size=recipe["batch_size"],
                       seed=recipe["seed"], image_size=image_size)
    train_classifier(model, loader, epochs=recipe["epochs"], lr=recipe["lr"],
                     weight_decay=recipe["weight_decay"], progress=False, seed=recipe["seed"])
    return model, evaluate(model, load_data("digits", split="test", batch_size=256,
                                            image_size=image_size))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--archs", nargs="+", default=list(DIGITS_ARCHITECTURES),
                   choices=list(DIGITS_ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=None, help="default: the zoo recipe's")
    p.add_argument("--out", default="ckpt", help="folder for <arch>_<size>.pt")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for arch in args.archs:
        start = time.perf_counter()
        model, test = train(arch, args.image_size, args.epochs)
        path = os.path.join(args.out, f"{arch}_{args.image_size}.pt")
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
        print(f"{arch} at {args.image_size} px: test accuracy {test['accuracy']:.3f} "
              f"(n={test['n']}), trained in {time.perf_counter() - start:.0f} s -> {path}")


if __name__ == "__main__":
    main()
