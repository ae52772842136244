"""The loss terms of Xu et al. 2020, as plain functions of tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch

FeatureExtractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def perceptual_distances(
    targets: torch.Tensor,
    outputs: torch.Tensor,
    features: FeatureExtractor | None,
    compare_pixels: bool,
    edge_weight: float = 0.0,
) -> torch.Tensor:
    """P(target, output) per output image: the sum over pixels and feature layers of the
    mean absolute difference. Returns (len(outputs),).

    `outputs` may stack several reconstructions of the same targets, (m * B, 3, H, W) against
    (B, 3, H, W): the targets' features are computed once and reused for each of them.
    L1 per layer (as in AutoLink) rather than Jakab et al.'s squared L2 with running-average
    rescaling: L1 keeps every layer's gradient on a comparable scale without extra state.

    `edge_weight` (`loss.lambda_edges`) adds that weight times the mean absolute difference of
    the images' neighbouring-pixel differences (`image_differences`), horizontal plus
    vertical. Without a pretrained network this is what makes small parts count: in pixels
    an eye is a few percent of the image and the head's outline dominates, but its edges
    are as strong as the outline's, and a flat colour error, which no landmark can fix,
    costs nothing here.
    """
    repeats = outputs.shape[0] // targets.shape[0]
    distances = outputs.new_zeros(outputs.shape[0], dtype=torch.float32)
    if compare_pixels:
        distances = distances + _mean_abs(outputs, targets.repeat(repeats, 1, 1, 1))
    if edge_weight:
        wanted_edges = [e.repeat(repeats, 1, 1, 1) for e in image_differences(targets)]
        for got, wanted in zip(image_differences(outputs), wanted_edges, strict=True):
            distances = distances + edge_weight * _mean_abs(got, wanted)
    if features is not None:
        with torch.no_grad():
            wanted = features(targets)
        for name, got in features(outputs).items():
            distances = distances + _mean_abs(got, wanted[name].repeat(repeats, 1, 1, 1))
    return distances


def image_differences(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The differences between horizontally and between vertically neighbouring pixels of
    (B, C, H, W) images: (B, C, H, W - 1) and (B, C, H - 1, W)."""
    return images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().flatten(1).mean(dim=1)


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
