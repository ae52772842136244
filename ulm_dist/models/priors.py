"""Two landmark priors that every learner adds to its own loss.

    L_transform = |E_p(S(x)) - S(E_p(x))|^2   for a random similarity S per image
    L_sep = mean over k != k' of exp(-|u_k - u_k'|^2 / (2 std^2))

L_transform is the equivariance of Thewlis, Bilen and Vedaldi (2017), and the part-mean
equivariance of Lorenz et al. (2019), whose part learner is built on it. L_sep is the
separation prior of Zhang et al. (2018): it keeps the K landmarks from sitting on one point.
Neither is in Xu et al. 2020 or Jakab et al. 2018, so `loss.lambda_transform=0
loss.lambda_separation=0` trains those papers' losses exactly; Lorenz et al.'s is
`loss.lambda_separation=0` with the default L_transform weight, which is theirs.

Why every learner gets them: reconstruction alone is too weak a signal in a short budget.
On the synthetic set (tiny preset, pixel loss, 300 steps of batch 16 on one CPU thread,
`benchmarks/accuracy.py --learners cycle imm part`) the landmark error with both priors off
was 57.1% (cycle), 54.8% (imm) and 59.0% (part) of the inter-ocular distance, against 58.2%
for the mean shape; with them 24.4%, 27.7% and 25.0%. Without L_sep, in a shorter trial,
the cycle model's K landmarks fell onto one point that followed the creature (37.9% after
200 steps, all K within 0.02 px of each other); with it they spread into a constellation
over the creature (27.3%).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ulm_dist.config import LossConfig
from ulm_dist.models.similarity import random_similarities, transform_equivariance_loss


def separation_loss(points: torch.Tensor, std: float) -> torch.Tensor:
    """Mean over the batch and the K (K - 1) ordered pairs of distinct landmarks of
    exp(-|u_k - u_k'|^2 / (2 std^2)): 1 for coincident landmarks, ~0 for ones many std
    apart. points (B, K, 2) in normalised coordinates; 0 when K < 2."""
    count = points.shape[1]
    if count < 2:
        return points.new_zeros((), dtype=torch.float32)
    points = points.float()
    squared = ((points[:, :, None] - points[:, None]) ** 2).sum(-1)
    distinct = ~torch.eye(count, dtype=torch.bool, device=points.device)
    return torch.exp(-squared[:, distinct] / (2 * std**2)).mean()


def prior_weights(config: LossConfig) -> dict[str, float]:
    return {"transform": config.lambda_transform, "sep": config.lambda_separation}


def landmark_priors(
    detect: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    points: torch.Tensor,
    config: LossConfig,
) -> dict[str, torch.Tensor]:
    """The priors with a non-zero weight, by name. `points` is detect(images), which the
    learner has already computed; L_transform costs one more detector pass."""
    terms = {}
    if config.lambda_transform:
        transforms = random_similarities(len(images), device=images.device)
        terms["transform"] = transform_equivariance_loss(detect, images, points, transforms)
    if config.lambda_separation:
        terms["sep"] = separation_loss(points, config.separation_std)
    return terms
