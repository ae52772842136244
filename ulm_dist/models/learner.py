"""What the optimiser sees, for every model: the model, the frozen perceptual network, the
loss weights and their weighted total.

Each learner (`cycle.py`, `imm.py`, `part.py`) subclasses `Learner` with its model and its
own loss terms; the perceptual comparison, the shared priors (`priors.py`) and the total
are the same for all of them, here.
"""

from __future__ import annotations

import torch
from torch import nn

from ulm_dist.config import LossConfig
from ulm_dist.losses import perceptual_distances
from ulm_dist.models.perceptual import perceptual_network
from ulm_dist.models.priors import landmark_priors, prior_weights


class Learner(nn.Module):
    """`weights` names the model's own loss terms; the priors' weights are added to them."""

    def __init__(self, model: nn.Module, loss_config: LossConfig, weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.vgg = perceptual_network(loss_config)
        self.compare_pixels = "pixels" in loss_config.perceptual_layers
        self.loss_config = loss_config
        self.weights = {**weights, **prior_weights(loss_config)}

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        """The detector: images (B, 3, S, S) in [0, 1] -> landmarks (B, K, 2) in [-1, 1]."""
        return self.model.landmarks(images)

    def perceptual(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """P(target, output) per output image (`losses.perceptual_distances`)."""
        return perceptual_distances(targets, outputs, self.vgg, self.compare_pixels)

    def priors(self, images: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared priors on `points`, the model's landmarks of `images`."""
        return landmark_priors(self.model.landmarks, images, points, self.loss_config)

    def with_total(
        self, losses: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | float]
    ) -> dict[str, torch.Tensor]:
        """`losses` plus "total", their sum weighted by `weights`."""
        losses["total"] = sum(weights[name] * value for name, value in losses.items())
        return losses
