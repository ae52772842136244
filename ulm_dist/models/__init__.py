"""Landmark learners in plain PyTorch: no Ray, DeepSpeed or storage in here."""

from __future__ import annotations

from torch import nn

from ulm_dist.config import LossConfig, ModelConfig
from ulm_dist.models.cycle import CycleConsistencyModel, CycleLearner
from ulm_dist.models.imm import ConditionalGenerationLearner, ConditionalGenerationModel
from ulm_dist.models.part import PartLearner, PartModel

__all__ = [
    "ConditionalGenerationLearner",
    "ConditionalGenerationModel",
    "CycleConsistencyModel",
    "CycleLearner",
    "PartLearner",
    "PartModel",
    "build_learner",
]
LEARNERS = {"cycle": CycleLearner, "imm": ConditionalGenerationLearner, "part": PartLearner}


def build_learner(model: ModelConfig, loss: LossConfig) -> nn.Module:
    """The trainable module for `model.name`; forward(image_i, image_j) -> loss dict."""
    return LEARNERS[model.name](model, loss)
