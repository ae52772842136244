"""Pictures of what a landmark learner does: landmarks on images, and what it makes of pairs.

Landmark k has the same colour in every picture, so consistency across images is visible at
a glance. Everything works on uint8 HWC arrays and returns PIL images.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from ulm_dist.models.landmarks import to_pixels

# Images an evaluation's pictures show.
SHOWN_IMAGES = 8


def landmark_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` well-separated, saturated colours (evenly spaced hues)."""
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / count, 0.9, 1.0)) for k in range(count)
    ]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (array * 255 + 0.5).astype(np.uint8)


def draw_points(
    image: np.ndarray,
    points: np.ndarray,
    colours: list[tuple[int, int, int]],
    *,
    scale: int = 1,
    marker: str = "dot",
) -> Image.Image:
    """Points (K, 2) in pixel coordinates of `image`, drawn on an upscaled copy.

    marker "dot" is a filled disc, "cross" an x: dots for predictions, crosses for the truth.
    """
    canvas = Image.fromarray(image).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(canvas)
    radius = max(2, scale + 1)
    for (x, y), colour in zip(points * scale, colours, strict=False):
        if marker == "dot":
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        else:
            draw.line([x - radius, y - radius, x + radius, y + radius], fill=colour, width=2)
            draw.line([x - radius, y + radius, x + radius, y - radius], fill=colour, width=2)
    return canvas


def grid(rows: list[list[Image.Image]], titles: list[str] | None = None) -> Image.Image:
    """Tiles of equal size in rows; optional column titles on a strip above."""
    tile_w, tile_h = rows[0][0].size
    top = 14 if titles else 0
    sheet = Image.new("RGB", (tile_w * len(rows[0]), top + tile_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles or []):
        draw.text((column * tile_w + 2, 1), title, fill="black")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * tile_w, top + r * tile_h))
    return sheet


def pair_sheet(
    model, image_i: torch.Tensor, image_j: torch.Tensor, scale: int = 4
) -> tuple[str, Image.Image]:
    """The sheet of what `model` makes of pairs, named after what it does (`cycle_sheet`,
    `generation_sheet`): one row per pair, one column per view that `model.views` gives of it
    (each model says what it can show: `models.learner.PairViews`), landmarks drawn where the
    view has them."""
    with torch.no_grad():
        views = model.views(image_i, image_j)
    size = image_i.shape[-1]
    count = next(points.shape[1] for _, _, points in views.columns if points is not None)
    colours = landmark_colours(count)
    no_points = np.zeros((len(image_i), 0, 2))
    columns = [
        (to_uint8(images), no_points if points is None else to_pixels(points.float().cpu(), size))
        for _, images, points in views.columns
    ]
    rows = [
        [
            draw_points(images[n], np.asarray(points[n]), colours, scale=scale)
            for images, points in columns
        ]
        for n in range(len(image_i))
    ]
    return f"{views.kind}_sheet", grid(rows, [title for title, _, _ in views.columns])


def regression_sheet(
    images: torch.Tensor,
    discovered: torch.Tensor,
    regressed: torch.Tensor,
    annotated: torch.Tensor,
    scale: int = 4,
) -> Image.Image:
    """Per image: the K discovered landmarks, then regressed (dots) over annotated (crosses).

    All points in pixel coordinates of `images` (B, 3, S, S).
    """
    pictures = to_uint8(images)
    k_colours = landmark_colours(discovered.shape[1])
    l_colours = landmark_colours(annotated.shape[1])
    rows = []
    for n, picture in enumerate(pictures):
        found = draw_points(picture, discovered[n].numpy(), k_colours, scale=scale)
        truth = draw_points(picture, annotated[n].numpy(), l_colours, scale=scale, marker="cross")
        overlay = np.asarray(truth)
        both = draw_points(overlay, regressed[n].numpy() * scale, l_colours, scale=1)
        rows.append([found, both])
    return grid(rows, ["discovered", "regressed vs truth"])


def evaluation_sheets(
    model,
    images: torch.Tensor,
    discovered: torch.Tensor,
    regressed: torch.Tensor,
    annotated: torch.Tensor,
) -> dict[str, Image.Image]:
    """The pictures of an evaluation, by name: the regression sheet of `images` and the
    sheet of what the model makes of pairs of them (first half with second half; an image
    with itself if only one), named after its kind (`cycle_sheet`, `generation_sheet`).

    `images` (B, 3, S, S) in the model's device and dtype; points in pixels, on the CPU.
    """
    half = max(1, len(images) // 2)
    name, pairs = pair_sheet(model, images[:half], images[-half:])
    return {
        "regression_sheet": regression_sheet(images, discovered, regressed, annotated),
        name: pairs,
    }
