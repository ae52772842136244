"""Loading a checkpoint as a plain learner, whatever `loss.perceptual` its run used: the
checkpoint holds the perceptual network's weights, so none are looked up or downloaded."""

import json

import pytest
import torch

from ulm_dist.config import load_config
from ulm_dist.deploy.trained import FIELDS_ADDED_LATER, load_trained
from ulm_dist.models import build_learner, perceptual
from ulm_dist.train.checkpoint import ENGINE_TAG, TRAIN_STATE_NAME, CheckpointStore

SMALL = [
    "model.channels=[8,16]",
    "model.appearance_dim=8",
    "model.flow_channels=8",
    "model.num_landmarks=4",
    "loss.perceptual=random",
    "loss.perceptual_layers=[pixels,relu1_2]",
]


def write_checkpoint(root, raw_config: dict, state: dict[str, torch.Tensor]) -> str:
    """A complete checkpoint as training writes one without ZeRO: the engine's model states,
    train_state.json with the run's config, and the completion marker."""
    store = CheckpointStore(str(root), "run")
    folder = root / "run" / store.checkpoint_dir_name(10)
    (folder / ENGINE_TAG).mkdir(parents=True)
    torch.save({"module": state}, folder / ENGINE_TAG / "mp_rank_00_model_states.pt")
    (folder / TRAIN_STATE_NAME).write_text(json.dumps({"config": raw_config, "step": 10}))
    store.mark_complete(str(folder), 10)
    return str(folder)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty hub cache, and any attempt to find or download ImageNet weights fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint looked for the ImageNet weights")

    monkeypatch.setattr(perceptual, "imagenet_vgg16_weights", refuse)


def trained_learner_state() -> dict[str, torch.Tensor]:
    """A learner's state dict whose VGG-16 differs from the fixed-seed random one, as an
    imagenet run's does."""
    config = load_config(None, SMALL)
    learner = build_learner(config.model, config.loss)
    with torch.no_grad():
        for parameter in learner.vgg.parameters():
            parameter.add_(1.0)
    return learner.state_dict()


def test_an_imagenet_run_loads_without_the_weights_file(tmp_path, no_weights_anywhere):
    state = trained_learner_state()
    raw = load_config(None, [*SMALL, "loss.perceptual=imagenet"]).to_dict()
    trained = load_trained(write_checkpoint(tmp_path, raw, state))
    assert trained.config.loss.perceptual == "imagenet"  # the run's config, as it trained
    assert torch.equal(trained.learner.vgg.features[0].weight, state["vgg.features.0.weight"])


def test_a_checkpoint_from_before_the_choice_loads_as_random_features(
    tmp_path, no_weights_anywhere
):
    state = trained_learner_state()
    raw = load_config(None, SMALL).to_dict()
    del raw["loss"]["perceptual"]  # saved before loss.perceptual existed, without vgg_weights
    trained = load_trained(write_checkpoint(tmp_path, raw, state))
    assert trained.config.loss.perceptual == "random"
    assert torch.equal(trained.learner.vgg.features[2].bias, state["vgg.features.2.bias"])


def test_a_checkpoint_from_before_batch_norm_loads_with_the_group_norm_it_trained_with(
    tmp_path, no_weights_anywhere
):
    old_fields = ["model.norm=group", "loss.recon_appearance=same", "train.lr_schedule=cosine"]
    config = load_config(None, [*SMALL, *old_fields])
    state = build_learner(config.model, config.loss).state_dict()
    raw = config.to_dict()
    for (section, key), _ in FIELDS_ADDED_LATER.items():
        del raw[section][key]  # saved before these fields existed
    trained = load_trained(write_checkpoint(tmp_path, raw, state))
    assert trained.config.model.norm == "group"
    assert trained.config.loss.recon_appearance == "same"
    assert trained.config.train.lr_schedule == "cosine"


def test_a_checkpoint_saved_with_train_fail_at_step_loads_it_as_debug_fail_at_step(
    tmp_path, no_weights_anywhere
):
    config = load_config(None, SMALL)
    state = build_learner(config.model, config.loss).state_dict()
    raw = config.to_dict()
    del raw["debug"]  # saved before the debug section existed, with the switch in train
    raw["train"]["fail_at_step"] = 6
    trained = load_trained(write_checkpoint(tmp_path, raw, state))
    assert trained.config.debug.fail_at_step == 6
    assert trained.step == 10
