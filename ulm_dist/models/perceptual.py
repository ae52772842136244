"""The perceptual comparison of the reconstruction losses: `loss.perceptual` picks one of

- `pixels` (the default): the mean absolute pixel difference only, no network. It needs no
  download, so training works anywhere out of the box.
- `imagenet`: ImageNet VGG-16 features at `loss.perceptual_layers` (plus pixels when that
  list holds "pixels"), as in the papers; their published numbers use these features.
- `random`: the same VGG-16 with frozen fixed-seed He-initialised weights instead. Random
  convolutional features still measure local structure at several scales (the "random
  perceptual loss" of the deep-image-prior literature), but usually give worse landmarks
  than ImageNet ones. Used only when asked for, never as a stand-in for missing weights.

The VGG-16 is written here so that torchvision is not needed. Its layer indices match
torchvision's `vgg16().features`, so torchvision's ImageNet state dict (`features.N.weight`
/ `.bias`; classifier entries are ignored) loads as it is. `imagenet` reads it from
`loss.vgg_weights` when that path is set, else from PyTorch's hub cache
(`torch.hub.get_dir()/checkpoints/`, under `$TORCH_HOME`), under torchvision's file name,
downloading it there once if it is missing. The 8 hex digits in that name are the start of
the file's SHA-256 (torchvision's convention): a download and a cached file are both
checked against them, so a truncated or corrupt file is refused rather than loaded.
Without network the error says what to do; `python -m ulm_dist.fetch_weights` prefetches
the file for air-gapped machines.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ulm_dist.config import VGG16_LAYERS, LossConfig

log = logging.getLogger(__name__)

# torchvision's ImageNet VGG-16 (IMAGENET1K_V1). The file name ends in the first 8 hex
# digits of the file's SHA-256; the Dockerfile's VGG16_URL must stay equal to this URL.
VGG16_SHA256_PREFIX = "397923af"
VGG16_URL = f"https://download.pytorch.org/models/vgg16-{VGG16_SHA256_PREFIX}.pth"
FETCH_COMMAND = "python -m ulm_dist.fetch_weights"
# name-<hex>.ext, as torch.hub.HASH_REGEX reads it.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")

# Output channels of the convolutions of each block (config.VGG16_LAYERS names them
# relu<block>_<conv>). Each conv is followed by its ReLU; a 2x2 max-pool ends every block
# but the last.
_BLOCK_WIDTHS = {"1": 64, "2": 128, "3": 256, "4": 512, "5": 512}

# torchvision's ImageNet preprocessing, which the pretrained weights expect.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsError(RuntimeError):
    """ImageNet VGG-16 weights that cannot be found, downloaded or trusted; says what to do."""


class VGG16Features(nn.Module):
    """Frozen VGG-16 trunk returning the activations of the requested ReLU layers.

    `weights`: a torchvision VGG-16 state dict file, or None for frozen fixed-seed random
    weights (`loss.perceptual=random`).
    """

    def __init__(self, layers: list[str], weights: str | Path | None = None):
        super().__init__()
        unknown = set(layers) - set(VGG16_LAYERS)
        if unknown or not layers:
            raise ValueError(
                f"expected VGG-16 layers from {VGG16_LAYERS}, got {sorted(unknown) or '[]'}"
            )
        deepest = max(VGG16_LAYERS.index(name) for name in layers)
        modules, self._taps, channels, previous_block = [], {}, 3, "1"
        for layer in VGG16_LAYERS[: deepest + 1]:
            block = layer.removeprefix("relu").partition("_")[0]
            if block != previous_block:
                modules.append(nn.MaxPool2d(2))
            width = _BLOCK_WIDTHS[block]
            modules += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=False)]
            self._taps[len(modules) - 1] = layer
            channels, previous_block = width, block
        self.features = nn.Sequential(*modules)
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            self._init_random()
        else:
            self._load(Path(weights))
        self.requires_grad_(False)

    def _init_random(self) -> None:
        # A fixed seed: every worker and every run compares images with the same features.
        generator = torch.Generator().manual_seed(0)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * 9
                with torch.no_grad():
                    module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
                    module.bias.zero_()

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ours = self.features.state_dict()
        missing = [key for key in ours if f"features.{key}" not in state]
        if missing:
            raise ValueError(
                f"{path}: not a torchvision VGG-16 state dict (no features.{missing[0]}); "
                f"use torchvision's file ({VGG16_URL}, or `{FETCH_COMMAND}`)"
            )
        self.features.load_state_dict({key: state[f"features.{key}"] for key in ours})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1]. Returns {layer name: activations}."""
        # The weights' dtype, not the buffers': DeepSpeed casts parameters to bf16/fp16 but
        # keeps buffers in fp32.
        dtype = self.features[0].weight.dtype
        x = (images.to(dtype) - self.mean.to(dtype)) / self.std.to(dtype)
        taps = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if self._taps.get(index) in self.layers:
                taps[self._taps[index]] = x
        return taps


def perceptual_network(loss_config: LossConfig, url: str = VGG16_URL) -> VGG16Features | None:
    """The frozen VGG-16 that `loss.perceptual` asks for, at the VGG layers of
    `loss.perceptual_layers`; None for `pixels`, which compares pixels only.

    For `imagenet` the weights are `loss.vgg_weights`, else torchvision's file in the hub
    cache, downloaded from `url` if it is not there (`imagenet_vgg16_weights`).
    """
    if loss_config.perceptual == "pixels":
        return None
    layers = [name for name in loss_config.perceptual_layers if name != "pixels"]
    if loss_config.perceptual == "random":
        return VGG16Features(layers)
    if loss_config.perceptual == "imagenet":
        return VGG16Features(layers, loss_config.vgg_weights or imagenet_vgg16_weights(url))
    raise ValueError(
        f"loss.perceptual: expected pixels, imagenet or random, got {loss_config.perceptual!r}"
    )


def compares_pixels(loss_config: LossConfig) -> bool:
    """Whether the perceptual distance has the pixel term: always for `pixels` (its only
    term), else when `loss.perceptual_layers` lists "pixels"."""
    return loss_config.perceptual == "pixels" or "pixels" in loss_config.perceptual_layers


def hub_weights_folder() -> Path:
    """Where PyTorch keeps downloaded weights: `torch.hub.get_dir()/checkpoints`, by default
    ~/.cache/torch/hub/checkpoints (`$TORCH_HOME/hub/checkpoints` when TORCH_HOME is set)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_prefix_in_name(url: str) -> str:
    """The start of the SHA-256 that a torchvision weights file names itself with:
    .../vgg16-397923af.pth -> 397923af."""
    name = url.rsplit("/", 1)[-1]
    found = _HASH_IN_NAME.search(name)
    if found is None:
        raise ValueError(
            f"{name}: expected a weights file named with the start of its SHA-256, as "
            "torchvision names them (name-<hex digits>.pth)"
        )
    return found[1]


def imagenet_vgg16_weights(
    url: str = VGG16_URL, folder: str | Path | None = None, progress: bool = False
) -> Path:
    """The path of the weights file of `url` in `folder` (default: the hub cache), its
    SHA-256 checked against its name; downloaded there first if it is missing.

    Raises PerceptualWeightsError, saying what to do, when the file is neither there nor
    downloadable, or when it (or the download) is not the file its name promises.
    """
    folder = hub_weights_folder() if folder is None else Path(folder)
    prefix = sha256_prefix_in_name(url)
    path = folder / url.rsplit("/", 1)[-1]
    if path.is_file():
        check_sha256_prefix(path, prefix)
        return path
    log.warning("downloading the VGG-16 weights from %s to %s (once)", url, path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written to a temporary file beside `path` and moved into place only once its hash
        # matches, so neither a failed download nor a concurrent one leaves a partial file.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=progress)
    except OSError as error:  # no network, no such URL or file, a refused or full folder
        raise PerceptualWeightsError(_unavailable(path, url, error)) from error
    except RuntimeError as error:  # torch.hub's hash check
        raise PerceptualWeightsError(
            f"{url}: the download is not the expected file ({error}), so nothing was saved "
            f"to {path}; try again, or fetch it elsewhere with `{FETCH_COMMAND}`"
        ) from error
    return path


def check_sha256_prefix(path: Path, prefix: str) -> None:
    """Refuse `path` unless its SHA-256 starts with `prefix` (a truncated or corrupt file)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    found = digest.hexdigest()
    if not found.startswith(prefix):
        raise PerceptualWeightsError(
            f"{path}: its SHA-256 starts with {found[: len(prefix)]}, not {prefix} as its name "
            f"says, so it is truncated or corrupt; delete it and fetch it again (`{FETCH_COMMAND}`"
            ", or let training download it)"
        )


def _unavailable(path: Path, url: str, error: Exception) -> str:
    return (
        "loss.perceptual=imagenet needs torchvision's ImageNet VGG-16 weights, but "
        f"{path} does not exist and downloading {url} failed ({error}). Either:\n"
        f"  - on a machine with internet, run `{FETCH_COMMAND} --dir DIR`, copy DIR to this "
        f"machine and pass loss.vgg_weights=DIR/{path.name}, or put the file at {path} (set "
        f"TORCH_HOME to use $TORCH_HOME/hub/checkpoints/{path.name} instead);\n"
        "  - or choose loss.perceptual=pixels, which needs no weights "
        "(or loss.perceptual=random: frozen random VGG-16 features)."
    )
