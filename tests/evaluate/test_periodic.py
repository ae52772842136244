"""Periodic evaluation on a plain learner (no Ray): what `loop.train_func` calls on data.val."""

import io

import pytest
import ray
import torch
from PIL import Image

from ulm_dist.config import load_config
from ulm_dist.data import prepare_shards
from ulm_dist.evaluate.periodic import load_validation_set, validate
from ulm_dist.models import build_learner
from ulm_dist.train.checkpoint import picture_file, picture_tag
from ulm_dist.train.driver import main as train_main


def test_validation_reports_the_protocol_on_the_val_split(tmp_path, tiny_model_overrides):
    cfg = load_config(None, [*tiny_model_overrides, f"data.cache_dir={tmp_path}"])
    assert cfg.data.val_spec() == "synthetic"
    size = cfg.model.image_size
    shards = prepare_shards(cfg.data, "synthetic", "val", image_size=size)
    val = load_validation_set(cfg.data, shards, size, samples=20)
    assert val.images.shape == (20, 3, size, size)
    assert val.normalisation.eyes == ((0,), (1,))  # the synthetic layout's eyes

    torch.manual_seed(0)
    learner = build_learner(cfg.model, cfg.loss)
    scores, pictures = validate(learner, val, torch.device("cpu"), torch.float32)
    assert learner.training, "validate must leave the learner in training mode"

    assert set(scores) == {
        "val/landmark_error",
        "val/landmark_error_reverse",
        "val/mean_shape_error",
    }
    # The baseline needs no model: the fit half's mean shape, scored on the other half.
    fit, scored = val.annotated[:10], val.annotated[10:]
    iod = (scored[:, 0] - scored[:, 1]).norm(dim=-1)
    baseline = (100 * (scored - fit.mean(0)).norm(dim=-1) / iod[:, None]).mean().item()
    assert scores["val/mean_shape_error"] == pytest.approx(baseline, rel=1e-5)
    assert all(value > 0 for value in scores.values())

    assert set(pictures) == {"val/regression_sheet", "val/cycle_sheet"}
    # each has a file name in the checkpoint, which the driver reads back as its tag
    assert {picture_tag(picture_file(tag)) for tag in pictures} == set(pictures)
    regression = Image.open(io.BytesIO(pictures["val/regression_sheet"]))
    cycle = Image.open(io.BytesIO(pictures["val/cycle_sheet"]))
    tile = 4 * size
    assert regression.size == (2 * tile, 14 + 8 * tile)  # 8 scored images, 2 columns
    assert cycle.size == (6 * tile, 14 + 4 * tile)  # 4 pairs of them


def test_auto_validation_follows_the_training_data():
    assert load_config(None, ["data.train=s3://b/faces/train"]).data.val_spec() is None
    assert load_config(None, ["data.val=null"]).data.val_spec() is None
    explicit = load_config(None, ["data.train=s3://b/x", "data.val=s3://b/y"])
    assert explicit.data.val_spec() == "s3://b/y"


def test_data_val_without_shards_is_refused_before_training(tmp_path, capsys, tiny_model_overrides):
    argv = [
        *tiny_model_overrides,
        "train.device=cpu",
        f"train.storage={tmp_path / 'runs'}",
        f"train.log_dir={tmp_path / 'logs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.val={tmp_path / 'nothing'}",
    ]
    assert train_main(argv) == 2
    assert not ray.is_initialized()
    assert f"data.val: data spec '{tmp_path / 'nothing'}': expected" in capsys.readouterr().err
