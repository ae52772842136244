"""VGG-16 features for the perceptual loss, written here so that torchvision is not needed.

Layer indices match torchvision's `vgg16().features`, so its ImageNet state dict
(`features.N.weight` / `.bias`; classifier entries are ignored) loads as it is:

    torch.save(torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict(), "vgg16.pth")

Nothing is downloaded. Without a weights file the network keeps a fixed-seed He
initialisation: frozen random convolutional features still measure local structure at
several scales (the "random perceptual loss" of the deep-image-prior literature), and the
loss also compares raw pixels, so training works, but landmarks are usually worse than with
ImageNet features. A warning says so once per process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ulm_dist.config import LossConfig

log = logging.getLogger(__name__)

# (name, out_channels) per conv; "M" is a 2x2 max-pool. Each conv is followed by its ReLU.
_VGG16_PLAN = [
    ("1_1", 64), ("1_2", 64), "M",
    ("2_1", 128), ("2_2", 128), "M",
    ("3_1", 256), ("3_2", 256), ("3_3", 256), "M",
    ("4_1", 512), ("4_2", 512), ("4_3", 512), "M",
    ("5_1", 512), ("5_2", 512), ("5_3", 512),
]  # fmt: skip
VGG16_LAYERS = tuple(f"relu{item[0]}" for item in _VGG16_PLAN if item != "M")

# torchvision's ImageNet preprocessing, which the pretrained weights expect.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_warned_random = False


class VGG16Features(nn.Module):
    """Frozen VGG-16 trunk returning the activations of the requested ReLU layers."""

    def __init__(self, layers: list[str], weights: str | Path | None = None):
        super().__init__()
        unknown = set(layers) - set(VGG16_LAYERS)
        if unknown:
            raise ValueError(f"unknown VGG-16 layers {sorted(unknown)}; known: {VGG16_LAYERS}")
        deepest = max(VGG16_LAYERS.index(name) for name in layers)
        modules, self._taps, previous = [], {}, 3
        for item in _VGG16_PLAN:
            if item == "M":
                modules.append(nn.MaxPool2d(2))
                continue
            name, width = item
            modules += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(inplace=False)]
            self._taps[len(modules) - 1] = f"relu{name}"
            previous = width
            if VGG16_LAYERS.index(f"relu{name}") == deepest:
                break
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
        global _warned_random
        if not _warned_random:
            log.warning(
                "No VGG-16 weights given (loss.vgg_weights): the perceptual loss uses frozen "
                "random VGG features plus pixels. Landmarks train, but ImageNet weights "
                "usually give better ones; see ulm_dist/models/perceptual.py to make the file."
            )
            _warned_random = True
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
                "see ulm_dist/models/perceptual.py for how to make one"
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


def perceptual_network(loss_config: LossConfig) -> VGG16Features | None:
    """The frozen VGG of `loss.perceptual_layers`, or None when only pixels are compared."""
    layers = [name for name in loss_config.perceptual_layers if name != "pixels"]
    return VGG16Features(layers, loss_config.vgg_weights) if layers else None
