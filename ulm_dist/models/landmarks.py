"""The heatmap bottleneck: score maps -> landmark coordinates -> Gaussian maps.

Coordinates are normalised to [-1, 1] in (x, y) order, with the image spanning
[-1, 1] edge to edge, so pixel i of n has its centre at (2i + 1) / n - 1. This is the
convention of `grid_sample(align_corners=False)`, which the flow module relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_centres(size: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised coordinates of the centres of `size` pixels along one axis."""
    return (2 * torch.arange(size, device=device, dtype=dtype) + 1) / size - 1


def spatial_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Expected (x, y) position under the softmax of each score map.

    scores: (B, K, H, W). Returns (B, K, 2) in normalised coordinates. The softmax runs over
    all H*W positions jointly (a proper 2D distribution), then the marginals give the
    expectations.
    """
    return spatial_softmax_with_spread(scores)[0]


def spatial_softmax_with_spread(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`spatial_softmax`'s points and the spread of each map: the variance var(x) + var(y)
    of its softmax distribution, (B, K), in normalised units squared.

    The points are the maps' means, so no loss on the points alone can tell a peaked map from
    a broad one that leans the same way; the spread is what a concentration loss (Zhang et
    al. 2018, eq. 3) acts on.
    """
    b, k, h, w = scores.shape
    prob = F.softmax(scores.reshape(b, k, h * w).float(), dim=-1).reshape(b, k, h, w)
    xs = pixel_centres(w, device=scores.device)
    ys = pixel_centres(h, device=scores.device)
    marginal_x, marginal_y = prob.sum(dim=2), prob.sum(dim=3)
    x = (marginal_x * xs).sum(dim=-1)
    y = (marginal_y * ys).sum(dim=-1)
    # E[x^2] - E[x]^2 loses precision when the map is sharp: take the centred moments.
    spread = (marginal_x * (xs - x[..., None]) ** 2).sum(-1) + (
        marginal_y * (ys - y[..., None]) ** 2
    ).sum(-1)
    return torch.stack([x, y], dim=-1).to(scores.dtype), spread


def render_gaussian_heatmaps(points: torch.Tensor, size: int, std: float) -> torch.Tensor:
    """Isotropic Gaussian maps exp(-|p - u_k|^2 / (2 std^2)) centred at `points`.

    points: (B, K, 2) normalised; std in normalised units. Returns (B, K, size, size) with
    peak value 1 (not normalised to unit mass: the decoder wants a scale-free code).
    """
    grid = pixel_centres(size, device=points.device, dtype=points.dtype)
    dx = (grid.view(1, 1, 1, size) - points[..., 0, None, None]) ** 2
    dy = (grid.view(1, 1, size, 1) - points[..., 1, None, None]) ** 2
    return torch.exp(-(dx + dy) / (2 * std**2))


def to_pixels(points: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised coordinates to continuous pixel coordinates of a `size`-pixel image."""
    return (points + 1) * size / 2
