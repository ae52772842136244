"""Convolutional parts shared by the landmark learners: encoders, the heatmap decoder and the
part autoencoder built from them.

`model.norm` picks the normalisation of every conv block. BatchNorm (the default, as in
Jakab et al. and Lorenz et al.) normalises with statistics of the whole batch, so an image's
own brightness and contrast survive into the features and the decoder can repaint its
colours. GroupNorm normalises each image on its own, which makes an image's outputs
independent of its batch but the bias-free encoders blind to its contrast.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ulm_dist.config import ModelConfig
from ulm_dist.models.landmarks import render_gaussian_heatmaps, spatial_softmax_with_spread

Norm = Literal["batch", "group"]


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d computed in float32 whatever the activations' dtype: DeepSpeed casts the
    parameters to bf16/fp16 but keeps buffers, the running statistics, in float32, and batch
    statistics summed in bf16 would be imprecise anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        normalised = F.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float(),
            self.bias.float(),
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )
        return normalised.to(x.dtype)


def normalisation(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return BatchNorm(channels)
    return nn.GroupNorm(min(8, channels), channels)


def conv_block(in_channels: int, out_channels: int, norm: Norm, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        normalisation(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Sequential):
    """Conv trunk: stage 0 keeps the resolution, every later stage halves it."""

    def __init__(self, channels: list[int], norm: Norm):
        stages, previous = [], 3
        for index, width in enumerate(channels):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    conv_block(previous, width, norm, stride), conv_block(width, width, norm)
                )
            )
            previous = width
        super().__init__(*stages)
        self.out_channels = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Centre [0, 1] images on zero: the N(I) of Xu et al.'s equations.
        return super().forward(images * 2 - 1)


class Pose(NamedTuple):
    """What the pose encoder finds in a batch of images."""

    points: torch.Tensor  # (B, K, 2) landmarks in [-1, 1]
    spread: torch.Tensor  # (B, K) variance of each score map's softmax (`landmarks.py`)
    features: torch.Tensor | None  # (B, C, h, w) matching features for the flow module


class PoseEncoder(nn.Module):
    """E_p: K score maps -> landmark coordinates; also the features the flow module matches."""

    def __init__(self, channels: list[int], num_landmarks: int, flow_channels: int, norm: Norm):
        super().__init__()
        self.trunk = Encoder(channels, norm)
        # No bias: the spatial softmax ignores a per-map constant, so it would never train.
        self.score_head = nn.Conv2d(self.trunk.out_channels, num_landmarks, 1, bias=False)
        # Learners without a flow module pass 0: a head that gets no gradient would only
        # cost optimizer state (and trip DeepSpeed's checks for unused parameters).
        self.flow_head = (
            nn.Conv2d(self.trunk.out_channels, flow_channels, 1) if flow_channels else None
        )

    def forward(self, images: torch.Tensor) -> Pose:
        features = self.trunk(images)
        matching = self.flow_head(features) if self.flow_head is not None else None
        return Pose(*spatial_softmax_with_spread(self.score_head(features)), matching)


class AppearanceEncoder(nn.Module):
    """E_a: one appearance code per landmark plus one for everything else.

    Each landmark's code is the encoder's features averaged under that landmark's Gaussian,
    as in Lorenz et al.'s part appearances. A spatial appearance map would carry image i's
    geometry into D(a_i, p_j); pooled codes leave geometry to the pose alone, which is what
    makes the unpaired swap of Xu et al. meaningful.
    """

    def __init__(self, channels: list[int], appearance_dim: int, norm: Norm):
        super().__init__()
        self.trunk = Encoder(channels, norm)
        self.project = nn.Conv2d(self.trunk.out_channels, appearance_dim, 1)

    def forward(self, images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        """heatmaps: (B, K, h, w) at the trunk's output size. Returns (B, K + 1, D)."""
        features = self.project(self.trunk(images))
        weights = heatmaps / heatmaps.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        parts = torch.einsum("bkhw,bdhw->bkd", weights, features)
        background = features.mean(dim=(2, 3)).unsqueeze(1)
        return torch.cat([parts, background], dim=1)


def paint_parts(
    appearance: torch.Tensor, landmarks: torch.Tensor, size: int, std: float
) -> torch.Tensor:
    """Each landmark's appearance code painted under its Gaussian, plus the background code
    everywhere: (B, K + 1, D) codes -> (B, 2 D, size, size) decoder input."""
    heatmaps = render_gaussian_heatmaps(landmarks, size, std)
    painted = torch.einsum("bkhw,bkd->bdhw", heatmaps, appearance[:, :-1])
    background = appearance[:, -1, :, None, None].expand(-1, -1, size, size)
    return torch.cat([painted, background], dim=1)


class HeatmapDecoder(nn.Module):
    """D(features, p): an image from a coarse feature map and the landmarks' Gaussian maps.

    The Gaussian maps are fed again at every scale (as in Lorenz et al.'s decoder) so that
    fine positions need not survive the coarse stages. The features are what each learner
    conditions on: painted part appearances (`paint_parts`) for the cycle model, the source
    image's feature map for conditional generation.
    """

    def __init__(
        self, channels: list[int], num_landmarks: int, in_channels: int, std: float, norm: Norm
    ):
        super().__init__()
        self.std = std
        widths = list(reversed(channels))
        self.stem = conv_block(in_channels + num_landmarks, widths[0], norm)
        self.stages = nn.ModuleList(
            nn.Sequential(
                conv_block(wide + num_landmarks, narrow, norm), conv_block(narrow, narrow, norm)
            )
            for wide, narrow in itertools.pairwise(widths)
        )
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, features: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """features (B, C, s, s), landmarks (B, K, 2); returns images (B, 3, s * 2^n, ...)."""
        heatmaps = render_gaussian_heatmaps(landmarks, features.shape[-1], self.std)
        x = self.stem(torch.cat([features, heatmaps], dim=1))
        for stage in self.stages:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            heatmaps = render_gaussian_heatmaps(landmarks, x.shape[-1], self.std)
            x = stage(torch.cat([x, heatmaps], dim=1))
        return torch.sigmoid(self.to_rgb(x))


class PartAutoencoder(nn.Module):
    """Shape and appearance of K parts, and an image drawn from both (Lorenz et al. 2019):
    E_p gives the part means, E_a pools one code per part under the part's Gaussian (plus a
    background code), and D paints each code at its part and decodes. The cycle and part
    learners build on it, so their networks, and their state-dict keys, are the same.
    """

    def __init__(self, config: ModelConfig, flow_channels: int):
        super().__init__()
        self.heatmap_std = config.heatmap_std
        self.pose_encoder = PoseEncoder(
            config.channels, config.num_landmarks, flow_channels, config.norm
        )
        self.appearance_encoder = AppearanceEncoder(
            config.channels, config.appearance_dim, config.norm
        )
        self.decoder = HeatmapDecoder(
            config.channels,
            config.num_landmarks,
            2 * config.appearance_dim,
            config.heatmap_std,
            config.norm,
        )
        self.stride = 2 ** (len(config.channels) - 1)
        self.coarse_size = config.image_size // self.stride

    def encode(self, images: torch.Tensor) -> tuple[Pose, torch.Tensor]:
        """Returns the pose and the appearance (B, K + 1, D)."""
        pose = self.pose_encoder(images)
        # The trunks' output size: each stride-2, padding-1 stage rounds a half up.
        size = math.ceil(images.shape[-1] / self.stride)
        heatmaps = render_gaussian_heatmaps(pose.points, size, self.heatmap_std)
        return pose, self.appearance_encoder(images, heatmaps)

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """The detector alone: images (B, 3, S, S) in [0, 1] -> landmarks (B, K, 2) in [-1, 1]."""
        return self.pose_encoder(images).points

    def decode(self, appearance: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """D(a, p): appearance (B, K + 1, D) painted at landmarks (B, K, 2) -> images."""
        painted = paint_parts(appearance, landmarks, self.coarse_size, self.heatmap_std)
        return self.decoder(painted, landmarks)
