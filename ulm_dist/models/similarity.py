"""Random similarity transforms of images and points, and the equivariance they give.

A detector is equivariant when it finds in a moved image the moved landmarks:
E_p(S(x)) = S(E_p(x)). With S drawn at random and applied by the learner itself, S is known
exactly, so the constraint needs no correspondence search (Thewlis, Bilen and Vedaldi 2017;
Lorenz et al. 2019's equivariance of part means). `warp_images` moves pixels and
`move_points` moves points by the same S, in the project's normalised coordinates
(`landmarks.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ulm_dist.losses import landmark_distance

# The random similarities, in the project's normalised coordinates (the image
# spans [-1, 1]): small enough that most of the object stays in view, as the data
# pipeline's own warps (data.warp_*).
ROTATION_STD = math.radians(10)
LOG_SCALE_STD = 0.1
SHIFT_STD = 0.1


def similarity_transforms(
    angles: torch.Tensor, log_scales: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """The point maps S(p) = s R(angle) p + shift as (B, 2, 3) matrices [s R | shift].

    angles, log_scales: (B,); shifts: (B, 2). Coordinates are normalised (x, y); on a
    square image, rotating these rotates the picture without shearing it.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    scales = torch.exp(log_scales)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return torch.cat([scales[:, None, None] * linear, shifts[:, :, None]], dim=-1)


def random_similarities(
    batch: int, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`batch` random similarity point maps (B, 2, 3), float32 (see the constants above)."""
    draws = torch.randn(batch, 4, device=device, generator=generator)
    return similarity_transforms(
        draws[:, 0] * ROTATION_STD, draws[:, 1] * LOG_SCALE_STD, draws[:, 2:] * SHIFT_STD
    )


def move_points(transforms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """S(p) = A p + t for each sample's (2, 3) map [A | t]: points (B, K, 2) -> (B, K, 2)."""
    linear, shift = transforms[..., :2], transforms[..., 2]
    moved = points.to(linear.dtype) @ linear.transpose(1, 2) + shift[:, None]
    return moved.to(points.dtype)


def invert_affine(transforms: torch.Tensor) -> torch.Tensor:
    """[A | t] -> [A^-1 | -A^-1 t], the map that undoes each of (B, 2, 3)."""
    inverse = torch.linalg.inv(transforms[..., :2].float())
    shift = -(inverse @ transforms[..., 2:].float())
    return torch.cat([inverse, shift], dim=-1)


def warp_images(images: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """The images moved by the point maps: what was at p in images[b] is at S_b(p) after.

    grid_sample reads each output pixel q from the input at S^-1(q), so the sampling grid is
    built from the inverse map. align_corners=False is the project's pixel convention
    (`landmarks.py`). Border padding, not black: a new dark frame would give the detector
    an edge that moves with the warp but is not the object. Sampled in float32: a bf16 grid
    would misplace pixels near the border by about a quarter pixel at 128 px.
    """
    grid = F.affine_grid(invert_affine(transforms), list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)
    return warped.to(images.dtype)


def transform_equivariance_loss(
    detect: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    points: torch.Tensor,
    transforms: torch.Tensor,
) -> torch.Tensor:
    """|detect(S(x)) - S(detect(x))|^2, averaged over batch and parts; `points` is
    detect(images), computed by the caller (the learner has it from the reconstruction)."""
    moved = detect(warp_images(images, transforms))
    return landmark_distance(moved, move_points(transforms, points))
