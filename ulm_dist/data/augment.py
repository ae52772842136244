"""Augmentations, run on CPU loader workers: square crops, flips, colour jitter, warps.

A view is an image as the model sees it: float32 (3, S, S) in [0, 1], and its landmarks
normalised to [-1, 1] as u = 2 x / S - 1 (pixel i's centre at x = i + 0.5, the convention of
`grid_sample(align_corners=False)`). Geometric augmentations move the landmarks with the
pixels; a flip also re-indexes them with the layout's flip permutation, so that landmark k
keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ulm_dist.config import DataConfig
from ulm_dist.data import warps as warp_lib
from ulm_dist.data.layouts import flip_landmarks

# ITU-R BT.601 luma weights, and RGB -> YIQ, whose I/Q plane a hue shift rotates.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


@dataclass(frozen=True)
class AugmentOptions:
    crop_scale: float = 1.0
    flip_probability: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    warp_rotation_deg: float = 0.0
    warp_scale_std: float = 0.0
    warp_translation_std: float = 0.0
    warp_tps_std: float = 0.0

    @classmethod
    def from_config(cls, data: DataConfig) -> AugmentOptions:
        return cls(**{name: getattr(data, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class View:
    image: np.ndarray  # (3, S, S) float32 in [0, 1]
    landmarks: np.ndarray | None  # (L, 2) float32, normalised to [-1, 1]


def crop_box(
    width: int, height: int, scale: float, rng: np.random.Generator | None
) -> tuple[float, float, float]:
    """(left, top, side) of a square crop: with `rng`, a random side between `scale` and 1 of
    the shorter image side at a random place; without, the largest centred square."""
    shortest = min(width, height)
    side = shortest if rng is None else shortest * rng.uniform(scale, 1.0)
    if rng is None:
        return (width - side) / 2, (height - side) / 2, side
    return rng.uniform(0, width - side), rng.uniform(0, height - side), side


def square_view(
    image: Image.Image,
    landmarks: np.ndarray | None,
    size: int,
    box: tuple[float, float, float],
    flip: bool = False,
    flip_permutation: tuple[int, ...] | None = None,
) -> View:
    """The crop `box` resized to size x size, mirrored left-right if `flip`; flipping
    landmarks needs the layout's `flip_permutation`."""
    left, top, side = box
    box_corners = (left, top, left + side, top + side)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box_corners)
    pixels = np.asarray(resized, np.float32) / 255
    points = None
    if landmarks is not None:
        points = (landmarks - np.float32([left, top])) * np.float32(size / side)
    if flip:
        pixels = pixels[:, ::-1]
        if points is not None:
            if flip_permutation is None:
                raise ValueError("flipping landmarks needs the layout's flip permutation, got None")
            points = flip_landmarks(points, size, flip_permutation)
    normalised = None if points is None else (points * (2 / size) - 1).astype(np.float32)
    return View(np.ascontiguousarray(pixels.transpose(2, 0, 1)), normalised)


def colour_transform(
    options: AugmentOptions, rng: np.random.Generator, mean_rgb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A random affine colour map rgb -> A rgb + b: hue rotation and saturation (linear), then
    contrast about the mean grey of the result and brightness, as torchvision's ColorJitter."""
    brightness, contrast, saturation = (
        rng.uniform(1 - amount, 1 + amount)
        for amount in (options.brightness, options.contrast, options.saturation)
    )
    angle = 2 * np.pi * rng.uniform(-options.hue, options.hue)
    rotation = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]],
        np.float32,
    )
    hue = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
    desaturate = saturation * np.eye(3, dtype=np.float32) + (1 - saturation) * np.outer(
        np.ones(3), _LUMA
    )
    linear = desaturate @ hue
    mean_grey = _LUMA @ linear @ mean_rgb
    matrix = (brightness * contrast * linear).astype(np.float32)
    offset = np.full(3, brightness * (1 - contrast) * mean_grey, np.float32)
    return matrix, offset


def jitter_colours(
    image: np.ndarray, options: AugmentOptions, rng: np.random.Generator
) -> np.ndarray:
    """A random colour jitter of a (3, S, S) image in [0, 1]."""
    matrix, offset = colour_transform(options, rng, image.mean(axis=(1, 2)))
    jittered = np.tensordot(matrix, image, axes=1) + offset[:, None, None]
    return np.clip(jittered, 0, 1, out=jittered)


def random_view(
    image: Image.Image,
    landmarks: np.ndarray | None,
    size: int,
    options: AugmentOptions,
    rng: np.random.Generator,
    flip_permutation: tuple[int, ...] | None,
) -> View:
    """A random crop, maybe flipped; colours are jittered separately (`jitter_colours`)."""
    box = crop_box(image.width, image.height, options.crop_scale, rng)
    flip = bool(rng.random() < options.flip_probability)
    return square_view(image, landmarks, size, box, flip, flip_permutation)


def warped_view(view: View, options: AugmentOptions, rng: np.random.Generator) -> View:
    """The view under a random similarity + TPS warp (Jakab et al. 2018's second image)."""
    warp = warp_lib.sample_warps(
        rng,
        1,
        rotation_deg=options.warp_rotation_deg,
        scale_std=options.warp_scale_std,
        translation_std=options.warp_translation_std,
        tps_std=options.warp_tps_std,
    )
    size = view.image.shape[-1]
    grid = warp_lib.backward(
        warp, warp_lib.pixel_centres(size), warp_lib.grid_interpolation(size, warp.grid)
    )
    sampled = F.grid_sample(
        torch.from_numpy(view.image)[None],
        torch.from_numpy(grid.astype(np.float32)).reshape(1, size, size, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[0].numpy()
    landmarks = None
    if view.landmarks is not None:
        landmarks = warp_lib.forward(warp, view.landmarks[None])[0].astype(np.float32)
    return View(sampled, landmarks)
