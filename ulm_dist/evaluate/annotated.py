"""The detector over annotated images, shared by the evaluate command (`command.py`) and
periodic evaluation during training (`periodic.py`): an annotated split read in order, the
landmarks a learner finds on it in pixels, and which annotated points are the eyes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ulm_dist.config import DataConfig
from ulm_dist.data import ShardSet, make_annotated_loader
from ulm_dist.evaluate.regression import NORMALISERS
from ulm_dist.models.landmarks import to_pixels

# The left and the right eye's landmark indices, for the inter-ocular distance.
Eyes = tuple[tuple[int, ...], tuple[int, ...]]


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use; the message says what to give instead."""


def annotated_batches(
    data: DataConfig, shards: ShardSet, image_size: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The annotated images of `shards` in manifest order (the same on every worker), at most
    `limit` of them: per batch the images (B, 3, S, S) in [0, 1], their annotated landmarks
    (B, L, 2) in pixels, and the corrupt samples the loader skipped."""
    count = 0
    for batch in make_annotated_loader(data, shards, image_size, batch_size):
        keep = len(batch["image"]) if limit is None else limit - count
        images = batch["image"][:keep]
        yield images, to_pixels(batch["landmarks"][:keep], image_size), int(batch["skipped"])
        count += len(images)
        if count == limit:
            return


@torch.no_grad()
def detect(
    learner: nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The learner's landmarks of `images` (B, 3, S, S), in pixels, on the CPU."""
    points = learner.landmarks(images.to(device, dtype)).float().cpu()
    return to_pixels(points, images.shape[-1])


def choose_eyes(shards: ShardSet, normaliser: str | None = None) -> Eyes | None:
    """The eye indices for the inter-ocular distance, or None for the bounding-box diagonal.
    `normaliser` (one of `NORMALISERS`) None: inter-ocular when the shards' landmark layout
    names the eyes."""
    assert normaliser is None or normaliser in NORMALISERS, normaliser
    layout = shards.summary.layout if shards.summary else None
    if normaliser == "bbox-diagonal" or (normaliser is None and layout is None):
        return None
    if layout is None:
        raise EvaluationError(
            "--normaliser inter-ocular: the shards' manifest has no landmark layout naming the "
            "eyes; use --normaliser bbox-diagonal, or rebuild the shards with --layout"
        )
    return layout.eye_left, layout.eye_right
