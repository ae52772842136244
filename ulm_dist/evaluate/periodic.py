"""Periodic evaluation during training: the landmark-regression error (evaluate.py) of the
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
from ulm_dist.data import ShardSet, make_annotated_loader
from ulm_dist.evaluate.pictures import evaluation_sheets
from ulm_dist.evaluate.regression import landmark_regression
from ulm_dist.models.landmarks import to_pixels

SHOWN_IMAGES = 8
# Loader batch while loading, and detector batch while evaluating.
BATCH_SIZE = 64


@dataclass
class ValidationSet:
    images: torch.Tensor  # (N, 3, S, S) in [0, 1], on the CPU
    annotated: torch.Tensor  # (N, L, 2) pixels
    eyes: tuple[tuple[int, ...], tuple[int, ...]] | None  # for the inter-ocular distance


def load_validation_set(
    data: DataConfig, shards: ShardSet, image_size: int, samples: int
) -> ValidationSet:
    """The first `samples` annotated images of `shards`, in manifest order (the same on
    every worker)."""
    images, annotated = [], []
    for batch in make_annotated_loader(data, shards, image_size, min(BATCH_SIZE, samples)):
        images.append(batch["image"])
        annotated.append(to_pixels(batch["landmarks"], image_size))
        if sum(len(chunk) for chunk in images) >= samples:
            break
    count = sum(len(chunk) for chunk in images)
    if count < 2:
        raise ValueError(
            f"data.val: {count} annotated images could be read, at least 2 are needed (one to "
            "fit the regressor, one to score it); point data.val at a larger annotated split"
        )
    layout = shards.summary.layout if shards.summary else None
    return ValidationSet(
        images=torch.cat(images)[:samples],
        annotated=torch.cat(annotated)[:samples],
        eyes=(layout.eye_left, layout.eye_right) if layout else None,
    )


def validate(
    learner: nn.Module, val: ValidationSet, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, float], dict[str, bytes]]:
    """The `val/` metrics and the pictures (PNG bytes by TensorBoard tag) of `learner` (any
    of `models.LEARNERS`) now. Every worker must call it at the same step (see the module
    doc)."""
    size = val.images.shape[-1]
    fit = len(val.images) // 2
    shown = slice(fit, fit + SHOWN_IMAGES)
    was_training = learner.training
    learner.eval()
    with torch.no_grad():
        discovered = torch.cat(
            [
                to_pixels(learner.landmarks(chunk.to(device, dtype)).float().cpu(), size)
                for chunk in val.images.split(BATCH_SIZE)
            ]
        )
        eye_left, eye_right = val.eyes or (None, None)
        report = landmark_regression(
            discovered[:fit],
            val.annotated[:fit],
            discovered[fit:],
            val.annotated[fit:],
            eye_left=eye_left,
            eye_right=eye_right,
        )
        pictures = evaluation_sheets(
            learner.model,
            val.images[shown].to(device, dtype),
            discovered[shown],
            report.predicted[:SHOWN_IMAGES],
            val.annotated[shown],
        )
    learner.train(was_training)
    return report.as_metrics("val/"), {
        f"val/{name}": png_bytes(image) for name, image in pictures.items()
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
