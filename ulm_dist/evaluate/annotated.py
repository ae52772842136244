"""The detector over annotated images, shared by the evaluate command (`command.py`) and
periodic evaluation during training (`periodic.py`): an annotated split read in order, and
the landmarks a learner finds on it in pixels. What the errors are divided by is chosen in
`protocols.py`."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ulm_dist.config import DataConfig
from ulm_dist.data import ShardSet, make_annotated_loader
from ulm_dist.models.landmarks import to_pixels


class EvaluationError(RuntimeError):
    """Input the evaluation cannot use; the message says what to give instead."""


def annotated_batches(
    data: DataConfig, shards: ShardSet, image_size: int, batch_size: int, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """The annotated images of `shards` in manifest order (the same on every worker), at most
    `limit` of them: per batch the images (B, 3, S, S) in [0, 1], their annotated landmarks
    (B, L, 2) in pixels, which of those are visible (B, L) bool, and the corrupt samples the
    loader skipped."""
    count = 0
    for batch in make_annotated_loader(data, shards, image_size, batch_size):
        keep = len(batch["image"]) if limit is None else limit - count
        images = batch["image"][:keep]
        landmarks = to_pixels(batch["landmarks"][:keep], image_size)
        yield images, landmarks, batch["visible"][:keep], int(batch["skipped"])
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
