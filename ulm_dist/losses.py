"""The loss terms of Xu et al. 2020, as plain functions of tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FeatureExtractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def perceptual_loss(
    target: torch.Tensor,
    output: torch.Tensor,
    features: FeatureExtractor | None,
    compare_pixels: bool,
) -> torch.Tensor:
    """P(target, output): sum over pixels and feature layers of the mean absolute difference.

    L1 per layer (as in AutoLink) rather than Jakab et al.'s squared L2 with running-average
    rescaling: L1 keeps every layer's gradient on a comparable scale without extra state.
    """
    total = output.new_zeros((), dtype=torch.float32)
    if compare_pixels:
        total = total + F.l1_loss(output.float(), target.float())
    if features is not None:
        # One pass over both halves: half the kernel launches, same result.
        for activations in features(torch.cat([target, output])).values():
            want, got = activations.float().chunk(2)
            total = total + F.l1_loss(got, want.detach())
    return total


def landmark_distance(points: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|p - q|^2 between matching landmarks (B, K, 2), averaged over batch and landmarks."""
    return ((other.float() - points.float()) ** 2).sum(-1).mean()


def invariance_loss(
    points: tuple[torch.Tensor, torch.Tensor], points_again: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """L_inv = |p_i' - p_i|^2 + |p_j' - p_j|^2, on landmark coordinates."""
    return sum(landmark_distance(p, q) for p, q in zip(points, points_again, strict=True))


def equivariance_loss(
    points: tuple[torch.Tensor, torch.Tensor], carried: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """L_equiv = |p_i - T^{i->j} o p_j|^2 + |p_j - T^{j->i} o p_i|^2.

    `carried` holds (T^{i->j} o p_j, T^{j->i} o p_i): each image's landmarks moved into the
    other image by the flow module.
    """
    return invariance_loss(points, carried)
