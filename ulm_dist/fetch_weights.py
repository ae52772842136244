"""Fetch the ImageNet VGG-16 weights of `loss.perceptual=imagenet` ahead of training.

    python -m ulm_dist.fetch_weights [--dir DIR] [--url URL]

Without --dir the file goes where training looks for it, PyTorch's hub cache on this
machine (`$TORCH_HOME/hub/checkpoints`, by default ~/.cache/torch/hub/checkpoints). For an
air-gapped cluster, run it with --dir on a machine with internet and copy DIR over; the
output says how to point training at the copy. A file already there is checked (SHA-256)
and kept. Exit status: 0 with the file in place, 2 when it could not be fetched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ulm_dist.models.perceptual import (
    VGG16_URL,
    PerceptualWeightsError,
    hub_weights_folder,
    imagenet_vgg16_weights,
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = hub_weights_folder() if args.dir is None else args.dir
    try:
        path = imagenet_vgg16_weights(args.url, folder, progress=True).resolve()
    except (PerceptualWeightsError, ValueError) as error:
        print(f"ulm_dist.fetch_weights: error: {error}", file=sys.stderr)
        return 2
    print(f"VGG-16 weights: {path} (SHA-256 checked)")
    if args.dir is None:
        print("Training with loss.perceptual=imagenet on this machine finds them there.")
    else:
        print(
            "To train with them, copy this folder to the machines that train, then either\n"
            f"  pass loss.perceptual=imagenet loss.vgg_weights=<the copy of {path.name}>, or\n"
            f"  put {path.name} in their hub cache, {hub_weights_folder()} here "
            "($TORCH_HOME/hub/checkpoints if TORCH_HOME is set), and pass "
            "loss.perceptual=imagenet."
        )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.fetch_weights",
        description="Download torchvision's ImageNet VGG-16 weights for loss.perceptual=imagenet.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="the folder to put the file in (default: PyTorch's hub cache, where training looks)",
    )
    parser.add_argument(
        "--url",
        default=VGG16_URL,
        help="where to download it from (default: torchvision's); a mirror must keep the "
        "file name, whose hex digits are the start of the file's SHA-256 and are checked",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
