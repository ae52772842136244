"""Random smooth image warps: a similarity transform plus a thin-plate-spline (TPS) field.

Used twice: the synthetic generator poses its creature with one, and the `warped` pair mode
makes the second view of an image with one (Jakab et al. 2018's self-supervision).

All coordinates are normalised to [-1, 1] with pixel centres at (2i + 1) / S - 1, the
convention of `grid_sample(align_corners=False)`. A warp is stored as its backward map, the
one image resampling needs:

    backward(p) = R(-theta) (p + D(p) - t) / s

where D is a TPS displacement field interpolating random shifts of a `grid` x `grid` lattice
of control points. Under it an object drawn at canonical point c appears near s R c + t,
rotated by theta, scaled by s and moved by t. Points (landmarks) move with the inverse map,
`forward`, found by fixed-point iteration because a TPS has no closed-form inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Fixed-point iterations of `forward`: each shrinks the error by the field's Lipschitz constant
# (0.2-0.5 at the shifts used here), so ~15 reach the tolerance (1e-5 of the half-width, far
# below a pixel); the cap only guards against a field too strong to invert.
_INVERSE_ITERATIONS = 50
_INVERSE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Warps:
    """A batch of N warps; see the module docstring for the meaning of each field."""

    rotation: np.ndarray  # (N,) radians
    scale: np.ndarray  # (N,)
    translation: np.ndarray  # (N, 2)
    control_shift: np.ndarray  # (N, grid * grid, 2): D at the control points

    @property
    def grid(self) -> int:
        return round(self.control_shift.shape[1] ** 0.5)


def sample_warps(
    rng: np.random.Generator,
    count: int,
    *,
    rotation_deg: float,
    scale_std: float,
    translation_std: float,
    tps_std: float,
    base_scale: float = 1.0,
    grid: int = 5,
) -> Warps:
    """N random warps (float32, like the images they warp); each normal draw is clipped at
    two standard deviations so that a rare tail draw cannot push the object out of the frame."""

    def clipped_normal(std: float, shape: tuple[int, ...]) -> np.ndarray:
        return std * np.clip(rng.standard_normal(shape), -2.0, 2.0)

    return Warps(
        rotation=np.deg2rad(clipped_normal(rotation_deg, (count,))).astype(np.float32),
        scale=(base_scale * np.exp(clipped_normal(scale_std, (count,)))).astype(np.float32),
        translation=clipped_normal(translation_std, (count, 2)).astype(np.float32),
        control_shift=clipped_normal(tps_std, (count, grid * grid, 2)).astype(np.float32),
    )


def pixel_centres(size: int) -> np.ndarray:
    """(size * size, 2) normalised (x, y) centres of a size x size image, row-major."""
    axis = (2 * np.arange(size) + 1) / size - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([x.ravel(), y.ravel()], axis=-1)


@lru_cache(maxsize=8)
def grid_interpolation(size: int, grid: int) -> np.ndarray:
    """`tps_interpolation_matrix` of the pixel centres of a size x size image (float32, cached)."""
    return tps_interpolation_matrix(pixel_centres(size), grid).astype(np.float32)


def tps_interpolation_matrix(points: np.ndarray, grid: int) -> np.ndarray:
    """Matrix W (..., P, C) with D(points) = W @ values for the TPS through the C = grid^2
    control points (a regular lattice over [-1, 1]^2) taking `values` there.

    The TPS solves [[K, Q], [Q^T, 0]] [w; a] = [values; 0] with K_ij = U(|c_i - c_j|),
    U(r) = r^2 log r^2 and Q = [1, x, y] (Bookstein 1989); W = [U(|p - c|), 1, p] L^-1[:, :C].
    """
    basis = _tps_basis(points, _control_points(grid).astype(points.dtype))
    return basis @ _tps_solve_operator(grid).astype(points.dtype)


@lru_cache(maxsize=8)
def _tps_solve_operator(grid: int) -> np.ndarray:
    control = _control_points(grid)
    count = len(control)
    system = np.zeros((count + 3, count + 3))
    system[:count, :count] = _radial(((control[:, None] - control[None]) ** 2).sum(-1))
    system[:count, count] = 1
    system[:count, count + 1 :] = control
    system[count:, :count] = system[:count, count:].T
    return np.linalg.inv(system)[:, :count]


def _control_points(grid: int) -> np.ndarray:
    """A regular grid x grid lattice with its corners at (+-1, +-1)."""
    return pixel_centres(grid) * grid / (grid - 1)


def _radial(squared_distance: np.ndarray) -> np.ndarray:
    """U = r^2 log r^2, with the limit U(0) = 0 (the offset keeps log finite there)."""
    return squared_distance * np.log(squared_distance + 1e-30)


def _tps_basis(points: np.ndarray, control: np.ndarray) -> np.ndarray:
    squared = (points[..., :, None, 0] - control[:, 0]) ** 2
    squared += (points[..., :, None, 1] - control[:, 1]) ** 2
    ones = np.ones((*points.shape[:-1], 1), points.dtype)
    return np.concatenate([_radial(squared), ones, points], axis=-1)


def backward(
    warps: Warps, points: np.ndarray, interpolation: np.ndarray | None = None
) -> np.ndarray:
    """Where each output point samples the source: (N, P, 2) from points (P, 2) shared by all
    warps or (N, P, 2) per warp. `interpolation` may pass a precomputed
    `tps_interpolation_matrix(points, grid)` when the same points are used again."""
    if interpolation is None:
        interpolation = tps_interpolation_matrix(points, warps.grid)
    if interpolation.ndim == 2:
        # One (P, C) @ (C, 2N) product: a single BLAS call instead of N thin ones.
        count, controls, _ = warps.control_shift.shape
        columns = warps.control_shift.transpose(1, 0, 2).reshape(controls, 2 * count)
        shift = (interpolation @ columns).reshape(len(points), count, 2).transpose(1, 0, 2)
    else:
        shift = interpolation @ warps.control_shift
    displaced = points + shift - warps.translation[:, None]
    return _rotate(displaced, -warps.rotation) / warps.scale[:, None, None]


def forward(warps: Warps, points: np.ndarray) -> np.ndarray:
    """Where source points (N, P, 2) appear in the output: the inverse of `backward`."""
    target = (
        _rotate(points * warps.scale[:, None, None], warps.rotation) + warps.translation[:, None]
    )
    # Solve p + D(p) = target by p <- target - D(p); D is a contraction for the shifts used.
    estimate = target
    for _ in range(_INVERSE_ITERATIONS):
        shift = tps_interpolation_matrix(estimate, warps.grid) @ warps.control_shift
        estimate, previous = target - shift, estimate
        if np.abs(estimate - previous).max(initial=0.0) < _INVERSE_TOLERANCE:
            break
    return estimate


def _rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = points[..., 0], points[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)
