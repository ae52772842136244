"""The detector over annotated images, shared by the evaluate command (`command.py`) and
periodic evaluation during training (`periodic.py`): an annotated split read in order, and
the landmarks a learner finds on it in pixels. What the errors are divided by is chosen in
`protocols.py`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ulm_dist.config import DataConfig
from ulm_dist.data import ShardSet, make_annotated_loader
from ulm_dist.models.landmarks import to_pixels


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use; the message says what to give instead."""


class AnnotatedBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) in [0, 1]
    landmarks: torch.Tensor  # (B, L, 2) annotated, pixels
    visible: torch.Tensor  # (B, L) bool
    metadata: list[dict[str, Any]]  # each image's metadata (Human3.6M: its activity)
    skipped: int  # corrupt samples the loader skipped


def annotated_batches(
    data: DataConfig, shards: ShardSet, image_size: int, batch_size: int, limit: int | None = None
) -> Iterator[AnnotatedBatch]:
    """The annotated images of `shards` in manifest order (the same on every worker), at most
    `limit` of them."""
    count = 0
    for batch in make_annotated_loader(data, shards, image_size, batch_size):
        keep = len(batch["image"]) if limit is None else limit - count
        images = batch["image"][:keep]
        landmarks = to_pixels(batch["landmarks"][:keep], image_size)
        yield AnnotatedBatch(
            images,
            landmarks,
            batch["visible"][:keep],
            list(batch["metadata"][:keep]),
            int(batch["skipped"]),
        )
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
