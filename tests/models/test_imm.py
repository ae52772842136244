from functools import partial

import pytest
import torch
from small_learners import blobs, gradient_coverage, loss_history
from small_learners import small_learner as build_small_learner

from ulm_dist.config import ConfigError, load_config
from ulm_dist.evaluate.pictures import pair_sheet

small_learner = partial(build_small_learner, "imm")


def test_imm_needs_warped_pairs_and_says_so():
    with pytest.raises(ConfigError, match=r"data\.pairs: model\.name=imm learns from an image"):
        load_config(None, ["model.name=imm"])


def test_the_target_reaches_the_generator_only_through_its_landmarks():
    model = small_learner().model
    source, target = blobs(2, seed=1), blobs(2, seed=2).requires_grad_()
    out = model(source, target)
    (image_grad,) = torch.autograd.grad(out.generated.sum(), target, retain_graph=True)
    # The same gradient, pushed through the K landmark coordinates alone.
    (point_grad,) = torch.autograd.grad(out.generated.sum(), out.landmarks, retain_graph=True)
    (through_points,) = torch.autograd.grad(out.landmarks, target, grad_outputs=point_grad)
    assert image_grad.abs().sum() > 0
    assert torch.allclose(image_grad, through_points, atol=1e-6)


def test_every_trainable_parameter_gets_a_gradient_and_vgg_stays_frozen():
    learner = small_learner()
    learner(blobs(4, seed=3), blobs(4, seed=4))["total"].backward()
    trainable, no_grad = gradient_coverage(learner)
    assert trainable and no_grad == []
    assert all(p.grad is None for p in learner.vgg.parameters())


def test_training_on_a_fixed_pair_reduces_the_loss():
    learner = small_learner()
    history = loss_history(learner, blobs(4, seed=5), blobs(4, seed=6), steps=100)
    assert sum(history[-10:]) < 0.6 * sum(history[:10]), history[::10]


def test_generation_sheet_shows_source_target_and_generated_per_pair():
    model = small_learner().model
    name, sheet = pair_sheet(model, blobs(3, seed=7), blobs(3, seed=8), scale=2)
    assert name == "generation_sheet"
    assert sheet.size == (3 * 2 * 32, 14 + 3 * 2 * 32)
