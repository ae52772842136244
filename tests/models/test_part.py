from functools import partial

import pytest
import torch
from small_learners import blobs, gradient_coverage, loss_history
from small_learners import small_learner as build_small_learner

from ulm_dist.config import ConfigError, load_config
from ulm_dist.evaluate.pictures import evaluation_sheets, pair_sheet
from ulm_dist.models.similarity import random_similarities, warp_images

small_learner = partial(build_small_learner, "part")


def test_part_needs_warped_pairs_and_says_so():
    with pytest.raises(ConfigError, match=r"data\.pairs: model\.name=part learns from an image"):
        load_config(None, ["model.name=part"])


def test_the_source_reaches_the_decoder_only_through_its_part_codes():
    model = small_learner().model
    source, target = blobs(2, seed=1).requires_grad_(), blobs(2, seed=2).requires_grad_()
    out = model(source, target)
    assert out.appearance.shape == (2, 11, 16)
    total = out.generated.sum()
    source_grad, target_grad = torch.autograd.grad(total, [source, target], retain_graph=True)
    # The same gradients, pushed through the pooled codes and the part means alone.
    code_grad, point_grad = torch.autograd.grad(
        total, [out.appearance, out.landmarks], retain_graph=True
    )
    (through_codes,) = torch.autograd.grad(out.appearance, source, grad_outputs=code_grad)
    (through_points,) = torch.autograd.grad(out.landmarks, target, grad_outputs=point_grad)
    assert source_grad.abs().sum() > 0 and target_grad.abs().sum() > 0
    assert torch.allclose(source_grad, through_codes, atol=1e-6)
    assert torch.allclose(target_grad, through_points, atol=1e-6)


def test_each_view_is_redrawn_in_its_own_parts_with_the_other_views_codes():
    # Evaluation mode: BatchNorm then normalises each image on its own, as a lone call does.
    learner = small_learner("loss.perceptual=pixels").eval()
    image, warped = blobs(2, seed=3), blobs(2, seed=4)
    with torch.no_grad():
        losses = learner(image, warped)
        from_warped, from_image = learner.model(warped, image), learner.model(image, warped)
    expected = (from_warped.generated - image).abs().mean() + (
        from_image.generated - warped
    ).abs().mean()
    assert torch.allclose(losses["recon"], expected, atol=1e-6)


def test_every_trainable_parameter_gets_a_gradient_and_vgg_stays_frozen():
    learner = small_learner()
    losses = learner(blobs(4, seed=3), blobs(4, seed=4))
    assert set(losses) == {"recon", "transform", "sep", "conc", "total"}
    losses["total"].backward()
    trainable, no_grad = gradient_coverage(learner)
    assert trainable and no_grad == []
    assert all(p.grad is None for p in learner.vgg.parameters())


def test_the_total_weighs_the_terms_by_the_config():
    learner = small_learner(
        "loss.lambda_recon=2",
        "loss.lambda_transform=5",
        "loss.lambda_separation=3",
        "loss.lambda_concentration=0.5",
    )
    losses = learner(blobs(2, seed=5), blobs(2, seed=6))
    expected = (
        2 * losses["recon"] + 5 * losses["transform"] + 3 * losses["sep"] + 0.5 * losses["conc"]
    )
    assert torch.allclose(losses["total"], expected)


def test_training_on_a_fixed_pair_reduces_the_loss():
    learner = small_learner()
    image = blobs(4, seed=5)
    warped = warp_images(image, random_similarities(4, generator=torch.Generator().manual_seed(2)))
    history = loss_history(learner, image, warped, steps=40)
    assert sum(history[-5:]) < 0.6 * sum(history[:5]), history[::5]


def test_the_evaluation_draws_the_part_swap_in_a_generation_sheet():
    model = small_learner().model
    name, sheet = pair_sheet(model, blobs(3, seed=7), blobs(3, seed=8), scale=2)
    assert name == "generation_sheet"
    assert sheet.size == (3 * 2 * 32, 14 + 3 * 2 * 32)
    images, points = blobs(4, seed=9), torch.rand(4, 5, 2) * 32
    sheets = evaluation_sheets(model, images, points, points, points)
    assert set(sheets) == {"regression_sheet", "generation_sheet"}
