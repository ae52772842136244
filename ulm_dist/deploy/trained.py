"""A finished checkpoint as a plain PyTorch learner, for the tools that run after training
(evaluate, export, predict, report): no Ray and no DeepSpeed engine.

    trained = load_trained("runs/demo/checkpoint_00000300")   # or s3://bucket/.../checkpoint_*
    points = trained.learner.landmarks(images)                # (B, K, 2) in [-1, 1]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ulm_dist.config import MOVED_KEYS, Config, LossConfig, config_from_dict
from ulm_dist.models import build_learner
from ulm_dist.storage import S3Options
from ulm_dist.train.checkpoint import local_copy, read_learner_weights, read_train_state


@dataclass
class TrainedModel:
    config: Config  # the resolved config the run trained with
    learner: nn.Module  # in eval mode, on the CPU, fp32
    step: int
    uri: str  # where the checkpoint was read from
    info: dict[str, Any] = field(default_factory=dict)  # its completion marker's extras


def load_trained(uri: str, s3: S3Options | None = None) -> TrainedModel:
    """Build the learner a checkpoint was trained as and load its weights (ZeRO shards are
    gathered; bf16/fp16 runs give their fp32 master weights). A StorageError says what is
    wrong with a path that is not a complete checkpoint."""
    with local_copy(uri, s3 or S3Options()) as (folder, checkpoint):
        saved = read_train_state(folder, uri)
        config = config_from_dict(as_saved_run_trained(saved["config"]))
        weights = read_learner_weights(folder)
    learner = build_learner(config.model, loss_for_loading(config.loss))
    learner.load_state_dict(weights)
    learner.eval()
    return TrainedModel(config, learner, saved["step"], uri, checkpoint.info)


# Fields added after runs had been saved, with the value those runs trained with, so that a
# saved config without them builds the learner that wrote the checkpoint.
FIELDS_ADDED_LATER: dict[tuple[str, str], Any] = {
    ("model", "norm"): "group",
    ("loss", "recon_appearance"): "same",
    ("loss", "transform_deformation"): 0.0,
    ("loss", "lambda_concentration"): 0.0,
    ("train", "lr_schedule"): "cosine",
}


def as_saved_run_trained(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields it predates set as its run trained: `FIELDS_ADDED_LATER`,
    and `loss.perceptual` as ImageNet VGG-16 features when `loss.vgg_weights` was set, frozen
    random ones otherwise; keys that moved since (`config.MOVED_KEYS`) at their new place."""
    sections = {name: dict(raw.get(name) or {}) for name in ("model", "loss", "train", "debug")}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key in sections[old_section]:
            sections[new_section][new_key] = sections[old_section].pop(old_key)
    for (section, key), value in FIELDS_ADDED_LATER.items():
        sections[section].setdefault(key, value)
    loss = sections["loss"]
    loss.setdefault("perceptual", "imagenet" if loss.get("vgg_weights") else "random")
    return {**raw, **sections}


def loss_for_loading(loss: LossConfig) -> LossConfig:
    """The loss config to build a checkpoint's learner with. The checkpoint holds the frozen
    VGG-16's weights with the rest, so an imagenet run's learner is built with random ones of
    the same shape for them to overwrite: loading needs neither the weights file nor a
    download."""
    if loss.perceptual != "imagenet":
        return loss
    return dataclasses.replace(loss, perceptual="random", vgg_weights=None)
