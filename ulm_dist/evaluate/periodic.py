"""Periodic evaluation during training: the landmark-regression error (regression.py) of the
detector as it trains, on `data.val`, reported with the training metrics as `val/...` so that
Ray Tune can optimise `val/landmark_error` and the exporter can pick the best checkpoint.

Each worker loads the same first `train.eval_samples` val images once, and every worker runs
the detector over all of them: under ZeRO-3 a forward pass gathers each layer's weights from
every rank, so all ranks must run the same passes, and repeating a few hundred small images
on each is simpler than splitting them and gathering the results. The regressor is fit on the
first half and scored on the second, both from the val split: choosing checkpoints or
hyperparameters by this number then never looks at the test split that
`python -m ulm_dist.evaluate` reports on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from ulm_dist.config import DataConfig
from ulm_dist.data import ShardSet
from ulm_dist.evaluate.annotated import annotated_batches, detect
from ulm_dist.evaluate.pictures import SHOWN_IMAGES, evaluation_sheets
from ulm_dist.evaluate.protocols import (
    Normalisation,
    choose_normalisation,
    flip_permutation_for,
    groups_for,
    uses_visibility,
)
from ulm_dist.evaluate.regression import VAL_PREFIX, landmark_regression

# Loader batch while loading, and detector batch while evaluating.
BATCH_SIZE = 64


@dataclass
class ValidationSet:
    images: torch.Tensor  # (N, 3, S, S) in [0, 1], on the CPU
    annotated: torch.Tensor  # (N, L, 2) pixels
    normalisation: Normalisation  # the shards' protocol's (protocols.py)
    visible: torch.Tensor | None = None  # (N, L) bool, when the protocol counts visible only
    # The protocol's left-right permutation and each image's group (Human3.6M), or None.
    flip_permutation: tuple[int, ...] | None = None
    groups: list[str] | None = None


def load_validation_set(
    data: DataConfig, shards: ShardSet, image_size: int, samples: int
) -> ValidationSet:
    """The first `samples` annotated images of `shards`, in manifest order (the same on
    every worker)."""
    batches = list(annotated_batches(data, shards, image_size, min(BATCH_SIZE, samples), samples))
    count = sum(len(batch.images) for batch in batches)
    if count < 2:
        raise ValueError(
            f"data.val: {count} annotated images could be read, at least 2 are needed (one to "
            "fit the regressor, one to score it); point data.val at a larger annotated split"
        )
    return ValidationSet(
        images=torch.cat([batch.images for batch in batches]),
        annotated=torch.cat([batch.landmarks for batch in batches]),
        normalisation=choose_normalisation(shards, image_size),
        visible=torch.cat([b.visible for b in batches]) if uses_visibility(shards) else None,
        flip_permutation=flip_permutation_for(shards),
        groups=groups_for(shards, [record for batch in batches for record in batch.metadata]),
    )


def validate(
    learner: nn.Module, val: ValidationSet, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, float], dict[str, bytes]]:
    """The `val/` metrics and the pictures (PNG bytes by TensorBoard tag) of `learner` (any
    of `models.LEARNERS`) now. Every worker must call it at the same step (see the module
    doc)."""
    fit = len(val.images) // 2
    shown = slice(fit, fit + SHOWN_IMAGES)
    was_training = learner.training
    learner.eval()
    discovered = torch.cat(
        [detect(learner, chunk, device, dtype) for chunk in val.images.split(BATCH_SIZE)]
    )
    visible = val.visible
    report = landmark_regression(
        discovered[:fit],
        val.annotated[:fit],
        discovered[fit:],
        val.annotated[fit:],
        eyes=val.normalisation.eyes,
        image_size=val.normalisation.image_size,
        train_visible=None if visible is None else visible[:fit],
        test_visible=None if visible is None else visible[fit:],
        flip_permutation=val.flip_permutation,
        test_groups=None if val.groups is None else val.groups[fit:],
    )
    pictures = evaluation_sheets(
        learner.model,
        val.images[shown].to(device, dtype),
        discovered[shown],
        report.predicted[:SHOWN_IMAGES],
        val.annotated[shown],
    )
    learner.train(was_training)
    return report.as_metrics(VAL_PREFIX), {
        VAL_PREFIX + name: png_bytes(image) for name, image in pictures.items()
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
