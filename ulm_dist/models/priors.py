"""Landmark priors that every learner adds to its own loss.

    L_transform = |E_p(W(x)) - W(E_p(x))|^2   for a random warp W per image: a similarity
                                              after a smooth deformation (`similarity.py`)
    L_sep = mean over k != k' of exp(-|u_k - u_k'|^2 / (2 std^2))
    L_conc = mean over k of var(x) + var(y) under landmark k's score-map softmax

L_transform is the equivariance of Thewlis, Bilen and Vedaldi (2017), and the part-mean
equivariance of Lorenz et al. (2019), whose part learner is built on it. L_sep is the
separation prior of Zhang et al. (2018): it keeps the K landmarks from sitting on one point.
L_conc is Zhang et al.'s concentration prior: the landmarks are the maps' means, so the other
losses cannot tell a peaked map from a broad one leaning the same way, and broad maps that
lean apart satisfy L_sep and L_transform without sitting on any part. Xu et al. 2020 and
Jakab et al. 2018 have none of the three, so `loss.lambda_transform=0 loss.lambda_separation=0
loss.lambda_concentration=0` trains those papers' losses exactly; Lorenz et al.'s keeps the
default L_transform weight, which is theirs.

Reconstruction alone is too weak a signal in a short budget: BENCHMARKS.md compares the
learners with and without the priors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ulm_dist.config import LossConfig
from ulm_dist.models.similarity import RandomWarp, random_warps, transform_equivariance_loss


class WarpedDetections(NamedTuple):
    """Random warps of a batch of images and the landmarks found in the warped images, for a
    learner that detects them anyway (and so spares L_transform its own pass)."""

    warp: RandomWarp
    points: torch.Tensor  # (B, K, 2)


def separation_loss(points: torch.Tensor, std: float) -> torch.Tensor:
    """Mean over the batch and the K (K - 1) ordered pairs of distinct landmarks of
    exp(-|u_k - u_k'|^2 / (2 std^2)): 1 for coincident landmarks, ~0 for ones many std
    apart. points (B, K, 2) in normalised coordinates; 0 when K < 2."""
    count = points.shape[1]
    if count < 2:
        return points.new_zeros((), dtype=torch.float32)
    points = points.float()
    squared = ((points[:, :, None] - points[:, None]) ** 2).sum(-1)
    return torch.exp(-off_diagonal(squared) / (2 * std**2)).mean()


def off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The K (K - 1) off-diagonal entries of (B, K, K), row by row: (B, K (K - 1)).

    Flattened, the diagonal sits every K + 1 entries from the first; dropping the first and
    reading the rest as K - 1 rows of K + 1 puts each later diagonal entry last in a row.
    Views and a slice only: a boolean mask would be a data-dependent shape (a nonzero), which
    breaks torch.compile's graph.
    """
    b, k, _ = square.shape
    return square.flatten(1)[:, 1:].view(b, k - 1, k + 1)[:, :, :-1].reshape(b, -1)


def concentration_loss(spread: torch.Tensor) -> torch.Tensor:
    """Mean spread var(x) + var(y) of the landmarks' score maps, (B, K) -> scalar: 0 for maps
    that put all their mass on one position (`landmarks.spatial_softmax_with_spread`)."""
    return spread.float().mean()


def prior_weights(config: LossConfig) -> dict[str, float]:
    return {
        "transform": config.lambda_transform,
        "sep": config.lambda_separation,
        "conc": config.lambda_concentration,
    }


def landmark_priors(
    detect: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    points: torch.Tensor,
    config: LossConfig,
    *,
    spread: torch.Tensor | None = None,
    warped: WarpedDetections | None = None,
) -> dict[str, torch.Tensor]:
    """The priors with a non-zero weight, by name. `points` is detect(images) and `spread`
    its maps' spread, which the learner has already computed (L_conc needs the spread).
    L_transform uses `warped` when the learner has it, else costs one more detector pass."""
    terms = {}
    if config.lambda_transform:
        if warped is None:
            warp = random_warps(len(images), config.transform_deformation, device=images.device)
            warped = WarpedDetections(warp, detect(warp.images(images)))
        terms["transform"] = transform_equivariance_loss(warped.points, warped.warp, points)
    if config.lambda_separation:
        terms["sep"] = separation_loss(points, config.separation_std)
    if config.lambda_concentration:
        if spread is None:
            raise ValueError("loss.lambda_concentration > 0 needs the score maps' spread")
        terms["conc"] = concentration_loss(spread)
    return terms
