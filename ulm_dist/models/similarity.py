"""Random warps of images and points, a similarity after a smooth deformation, and the
equivariance they give.

A detector is equivariant when it finds in a warped image the warped landmarks:
E_p(W(x)) = W(E_p(x)). With W drawn at random and applied by the learner itself, W is known
exactly, so the constraint needs no correspondence search (Thewlis, Bilen and Vedaldi 2017;
Zhang et al. 2018; Lorenz et al. 2019's equivariance of part means). `warp_images` moves
pixels and `move_points` moves points by the same similarity S, in the project's normalised
coordinates (`landmarks.py`); `RandomWarp` composes S with a smooth deformation D.

Why the deformation: a similarity moves every point of the image alike, so landmarks fixed
in the object's similarity frame, a ring around it say, are exactly equivariant to it
without sitting on any part. Under a deformation that differs from place to place, only a
landmark that follows what is drawn where it sits can be equivariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ulm_dist.models.losses import landmark_distance

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


# The deformation's control lattice: DEFORMATION_GRID x DEFORMATION_GRID shifts with the
# corners at (+-1, +-1), interpolated bicubically. Points are moved by inverting the field
# by fixed-point iteration, which converges while the field's slope stays below 1; at the
# shifts used (a few hundredths of the half-width over a lattice spacing of 2/3) it is about
# 0.1, so a few iterations reach far below a pixel.
DEFORMATION_GRID = 4
_INVERSE_ITERATIONS = 6


def deformation_at(offsets: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The displacement D(p) of the smooth field through the control shifts `offsets`
    (B, 2, g, g), at points (B, ..., 2) in normalised coordinates: (B, ..., 2)."""
    grid = points.reshape(len(points), 1, -1, 2).to(offsets.dtype)
    shift = F.grid_sample(offsets, grid, mode="bicubic", align_corners=True)  # (B, 2, 1, P)
    return shift[:, :, 0].transpose(1, 2).reshape(points.shape)


@dataclass(frozen=True)
class RandomWarp:
    """The warp W = S o D per image: a smooth deformation D first, then the similarity S.
    D is given by its backward field, r -> r + field(r) (`deformation_at`), which is what
    image resampling needs; points move with its inverse. `offsets` None: S alone."""

    similarities: torch.Tensor  # (B, 2, 3) point maps [A | t]
    offsets: torch.Tensor | None  # (B, 2, g, g) control shifts of the deformation

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """The images warped: what was at p is at W(p) after."""
        if self.offsets is None:
            return warp_images(images, self.similarities)
        size = list(images.shape)
        # Output pixel q samples the source at r + field(r), with r = S^-1(q).
        before = F.affine_grid(invert_affine(self.similarities), size, align_corners=False)
        grid = before + deformation_at(self.offsets, before)
        warped = F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)
        return warped.to(images.dtype)

    def points(self, points: torch.Tensor) -> torch.Tensor:
        """W(p) for points (B, K, 2): where the image's content at p appears after."""
        if self.offsets is None:
            return move_points(self.similarities, points)
        # The source point p appears where r + field(r) = p: solve r <- p - field(r).
        source = points.float()
        deformed = source
        for _ in range(_INVERSE_ITERATIONS):
            deformed = source - deformation_at(self.offsets, deformed)
        return move_points(self.similarities, deformed).to(points.dtype)


def random_warps(
    batch: int,
    deformation_std: float,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> RandomWarp:
    """`batch` random warps: similarities as `random_similarities` and, when
    `deformation_std` > 0, control shifts with that std (normalised units)."""
    similarities = random_similarities(batch, device=device, generator=generator)
    if not deformation_std:
        return RandomWarp(similarities, None)
    shape = (batch, 2, DEFORMATION_GRID, DEFORMATION_GRID)
    offsets = torch.randn(shape, device=device, generator=generator) * deformation_std
    return RandomWarp(similarities, offsets)


def transform_equivariance_loss(
    warped_points: torch.Tensor, warp: RandomWarp, points: torch.Tensor
) -> torch.Tensor:
    """|E_p(W(x)) - W(E_p(x))|^2, averaged over batch and parts: `points` is E_p(x) and
    `warped_points` E_p(W(x)), the detector's landmarks of the warped images."""
    return landmark_distance(warped_points, warp.points(points))
