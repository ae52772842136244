"""What the optimiser sees, for every model: the model, the frozen perceptual network, the
loss weights and their weighted total.

Each learner (`cycle.py`, `imm.py`, `part.py`) subclasses `Learner` with its model and its
own loss terms; the perceptual comparison, the shared priors (`priors.py`) and the total
are the same for all of them, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ulm_dist.config import LossConfig
from ulm_dist.models.losses import perceptual_distances
from ulm_dist.models.networks import Pose
from ulm_dist.models.perceptual import compares_pixels, perceptual_network
from ulm_dist.models.priors import WarpedDetections, landmark_priors, prior_weights
from ulm_dist.models.similarity import RandomWarp, random_warps


@dataclass
class PairViews:
    """What a model makes of a pair of images, for a reader to look at: `kind` names what it
    does with the pair ("cycle", "generation"); each column has a title, images (B, 3, S, S)
    in [0, 1] and the landmarks drawn on them, (B, K, 2) in [-1, 1], or None."""

    kind: str
    columns: list[tuple[str, torch.Tensor, torch.Tensor | None]]


class GenerationOutputs(Protocol):
    landmarks: torch.Tensor  # of the target: (B, K, 2)
    generated: torch.Tensor  # the source redrawn in the target's landmarks: (B, 3, S, S)


def generation_views(
    source: torch.Tensor, target: torch.Tensor, out: GenerationOutputs
) -> PairViews:
    """The views of a model whose forward(source, target) redraws the source in the target's
    landmarks (imm from its feature map, part from its part appearances)."""
    return PairViews(
        "generation",
        [
            ("source", source, None),
            ("target (p)", target, out.landmarks),
            ("D(source, p)", out.generated, out.landmarks),
        ],
    )


class Learner(nn.Module):
    """`weights` names the model's own loss terms; the priors' weights are added to them."""

    def __init__(self, model: nn.Module, loss_config: LossConfig, weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.vgg = perceptual_network(loss_config)
        self.compare_pixels = compares_pixels(loss_config)
        self.loss_config = loss_config
        self.weights = {**weights, **prior_weights(loss_config)}

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """The detector: images (B, 3, S, S) in [0, 1] -> landmarks (B, K, 2) in [-1, 1]."""
        return self.model.landmarks(images)

    def perceptual(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """P(target, output) per output image (`losses.perceptual_distances`)."""
        return perceptual_distances(
            targets, outputs, self.vgg, self.compare_pixels, self.loss_config.lambda_edges
        )

    def warped_views(self, images: torch.Tensor) -> tuple[RandomWarp, torch.Tensor]:
        """Random warps, as L_transform draws them, and the images they give, for learners
        that encode the warped images themselves (see `priors`)."""
        warp = random_warps(
            len(images), self.loss_config.transform_deformation, device=images.device
        )
        return warp, warp.images(images)

    def priors(
        self, images: torch.Tensor, pose: Pose, warped: WarpedDetections | None = None
    ) -> dict[str, torch.Tensor]:
        """The shared priors on `pose`, the model's pose of `images`; `warped` as in
        `priors.landmark_priors`."""
        return landmark_priors(
            self.model.landmarks,
            images,
            pose.points,
            self.loss_config,
            spread=pose.spread,
            warped=warped,
        )

    def with_total(
        self, losses: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | float]
    ) -> dict[str, torch.Tensor]:
        """`losses` plus "total", their sum weighted by `weights`."""
        losses["total"] = sum(weights[name] * value for name, value in losses.items())
        return losses
