"""Conditional image generation (Jakab, Gupta, Bilen and Vedaldi, NeurIPS 2018), the `imm`
baseline: landmarks are what a generator needs, besides the source image, to redraw its warp.

For an image x and a warped copy x' (`data.pairs: warped`):
    p' = E_p(x')                  landmarks of the target, through the heatmap bottleneck
    f  = E_a(x)                   a spatial feature map of the source
    x^ = D(f, p')                 the target redrawn from the source's features
and the loss is the perceptual distance P(x', x^). The source's features carry everything
but the geometry of the warp, so the generator can only redraw x' where the landmarks say;
that is the whole learning signal. The bottleneck (spatial softmax, Gaussian maps), the
decoder and the perceptual network are the cycle model's own (`networks.py`,
`perceptual.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ulm_dist.config import LossConfig, ModelConfig
from ulm_dist.models.learner import Learner, PairViews, generation_views
from ulm_dist.models.networks import Encoder, HeatmapDecoder, Pose, PoseEncoder


@dataclass
class GenerationOutputs:
    pose: Pose  # of the target (points: p', (B, K, 2))
    generated: torch.Tensor  # x^: (B, 3, S, S)

    @property
    def landmarks(self) -> torch.Tensor:
        return self.pose.points


class ConditionalGenerationModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pose_encoder = PoseEncoder(
            config.channels, config.num_landmarks, flow_channels=0, norm=config.norm
        )
        self.appearance_encoder = Encoder(config.channels, config.norm)
        self.decoder = HeatmapDecoder(
            config.channels,
            config.num_landmarks,
            config.channels[-1],
            config.heatmap_std,
            config.norm,
        )

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        return self.pose_encoder(images).points

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> GenerationOutputs:
        pose = self.pose_encoder(target)
        return GenerationOutputs(pose, self.decoder(self.appearance_encoder(source), pose.points))

    def views(self, source: torch.Tensor, target: torch.Tensor) -> PairViews:
        return generation_views(source, target, self(source, target))


class ConditionalGenerationLearner(Learner):
    """`forward(image, warped)` returns {"recon", "total"} and the priors' scalars (on the
    target's landmarks); recon is P(warped, D(E_a(image), p'))."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig):
        model = ConditionalGenerationModel(model_config)
        super().__init__(model, loss_config, {"recon": loss_config.lambda_recon})

    def forward(self, image: torch.Tensor, warped: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(image, warped)
        losses = {
            "recon": self.perceptual(warped, out.generated).mean(),
            **self.priors(warped, out.pose),
        }
        return self.with_total(losses, self.weights)
