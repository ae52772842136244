import pytest
import torch

from ulm_dist.config import load_config
from ulm_dist.models.priors import (
    WarpedDetections,
    concentration_loss,
    landmark_priors,
    off_diagonal,
    separation_loss,
)
from ulm_dist.models.similarity import random_warps


def test_separation_is_one_for_coincident_landmarks_and_vanishes_far_apart():
    together = torch.zeros(2, 4, 2)
    assert separation_loss(together, std=0.1).item() == pytest.approx(1.0)
    corners = torch.tensor([[[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]])
    assert separation_loss(corners, std=0.1).item() < 1e-30


def test_separation_matches_the_formula_for_two_landmarks_and_ignores_their_order():
    points = torch.tensor([[[0.0, 0.0], [0.3, 0.4]]])  # 0.5 apart
    expected = torch.exp(torch.tensor(-(0.5**2) / (2 * 0.2**2)))
    assert separation_loss(points, std=0.2) == pytest.approx(expected.item())
    assert separation_loss(points.flip(1), std=0.2) == pytest.approx(expected.item())


def test_separation_pushes_landmarks_apart_and_is_zero_for_one_landmark():
    points = torch.tensor([[[0.0, 0.0], [0.1, 0.0]]], requires_grad=True)
    separation_loss(points, std=0.2).backward()
    # Descending the gradient moves the left landmark left and the right one right.
    assert points.grad[0, 0, 0] > 0 and points.grad[0, 1, 0] < 0
    assert separation_loss(torch.zeros(3, 1, 2), std=0.2).item() == 0


@pytest.mark.parametrize("count", [1, 2, 5])
def test_off_diagonal_entries_are_those_a_mask_of_the_diagonal_picks_in_order(count):
    square = torch.randn(3, count, count)
    distinct = ~torch.eye(count, dtype=torch.bool)
    assert torch.equal(off_diagonal(square), square[:, distinct])


def test_priors_with_zero_weight_are_not_computed():
    config = load_config(
        None,
        ["loss.lambda_transform=0", "loss.lambda_separation=2", "loss.lambda_concentration=0"],
    ).loss

    def detect(images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the transform prior is off: no extra detector pass")

    points = torch.zeros(2, 3, 2)
    terms = landmark_priors(detect, torch.zeros(2, 3, 8, 8), points, config)
    assert set(terms) == {"sep"} and terms["sep"].item() == pytest.approx(1.0)


def test_concentration_is_the_mean_spread_and_needs_the_spread():
    spread = torch.tensor([[0.1, 0.3], [0.2, 0.0]])
    assert concentration_loss(spread).item() == pytest.approx(0.15)
    config = load_config(None, ["loss.lambda_transform=0", "loss.lambda_concentration=1"]).loss
    points = torch.zeros(2, 2, 2)
    terms = landmark_priors(None, torch.zeros(2, 3, 8, 8), points, config, spread=spread)
    assert terms["conc"].item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="spread"):
        landmark_priors(None, torch.zeros(2, 3, 8, 8), points, config)


def test_transform_prior_uses_the_learners_own_detections_when_given():
    config = load_config(None, ["loss.lambda_separation=0", "loss.lambda_concentration=0"]).loss

    def detect(images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the learner's detections are given: no extra detector pass")

    warp = random_warps(2, 0.05, generator=torch.Generator().manual_seed(0))
    points = torch.rand(2, 3, 2) - 0.5
    exact = WarpedDetections(warp, warp.points(points))
    terms = landmark_priors(detect, torch.zeros(2, 3, 8, 8), points, config, warped=exact)
    assert terms["transform"].item() == pytest.approx(0.0, abs=1e-10)
    off = WarpedDetections(warp, exact.points + 0.1)
    terms = landmark_priors(detect, torch.zeros(2, 3, 8, 8), points, config, warped=off)
    assert terms["transform"].item() == pytest.approx(2 * 0.1**2, rel=1e-4)
