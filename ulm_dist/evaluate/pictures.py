"""Pictures of what a landmark learner does: landmarks on images and the cycle's images.

Landmark k has the same colour in every picture, so consistency across images is visible at
a glance. Everything works on uint8 HWC arrays and returns PIL images.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from ulm_dist.models.cycle import CycleConsistencyModel


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


def cycle_sheet(model, image_i: torch.Tensor, image_j: torch.Tensor, scale: int = 4) -> Image.Image:
    """One row per pair: I_i and I_j with their landmarks, the swaps I_ij and I_ji with the
    landmarks they should carry (p_j and p_i), and the cycle's reconstructions I_i', I_j'.

    `model` is a `CycleConsistencyModel` (anything whose forward returns `CycleOutputs`).
    """
    with torch.no_grad():
        out = model(image_i, image_j)
    size = image_i.shape[-1]
    p_i, p_j = ((p.float().cpu().numpy() + 1) * size / 2 for p in out.landmarks)
    colours = landmark_colours(p_i.shape[1])
    columns = [
        (to_uint8(image_i), p_i),
        (to_uint8(image_j), p_j),
        (to_uint8(out.swapped[0]), p_j),
        (to_uint8(out.swapped[1]), p_i),
        (to_uint8(out.reconstructed[0]), None),
        (to_uint8(out.reconstructed[1]), None),
    ]
    rows = []
    for n in range(image_i.shape[0]):
        row = []
        for images, points in columns:
            shown = points[n] if points is not None else np.zeros((0, 2))
            row.append(draw_points(images[n], shown, colours, scale=scale))
        rows.append(row)
    return grid(rows, ["I_i", "I_j", "I_ij (p_j)", "I_ji (p_i)", "I_i'", "I_j'"])


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
    """The pictures of an evaluation, by name: the regression sheet of `images` and the cycle
    sheet of pairs of them (first half with second half; an image with itself if only one),
    or for the other learners (imm, part), whose forward(source, target) redraws the target
    from the source, their generation sheet of those pairs.

    `images` (B, 3, S, S) in the model's device and dtype; points in pixels, on the CPU.
    """
    half = max(1, len(images) // 2)
    pair = images[:half], images[-half:]
    sheets = {"regression_sheet": regression_sheet(images, discovered, regressed, annotated)}
    if isinstance(model, CycleConsistencyModel):
        sheets["cycle_sheet"] = cycle_sheet(model, *pair)
    else:
        sheets["generation_sheet"] = generation_sheet(model, *pair)
    return sheets


def generation_sheet(
    model, source: torch.Tensor, target: torch.Tensor, scale: int = 4
) -> Image.Image:
    """One row per pair, for conditional generation: the source, the target with its
    landmarks, and the source redrawn in the target's landmarks: from its feature map
    (`ConditionalGenerationModel`) or its part appearances (`PartModel`, a shape/appearance
    swap)."""
    with torch.no_grad():
        out = model(source, target)
    size = source.shape[-1]
    points = (out.landmarks.float().cpu().numpy() + 1) * size / 2
    colours = landmark_colours(points.shape[1])
    rows = [
        [
            draw_points(to_uint8(source)[n], np.zeros((0, 2)), colours, scale=scale),
            draw_points(to_uint8(target)[n], points[n], colours, scale=scale),
            draw_points(to_uint8(out.generated)[n], points[n], colours, scale=scale),
        ]
        for n in range(len(source))
    ]
    return grid(rows, ["source", "target (p)", "D(source, p)"])
