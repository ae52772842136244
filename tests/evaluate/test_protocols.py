"""evaluate/protocols.py and the regression it drives: each benchmark's protocol, chosen from
the manifest's layout, scored on small worked examples whose errors are computed by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ulm_dist.data import ShardSet
from ulm_dist.data.layouts import IBUG68, MAFL5, LandmarkLayout
from ulm_dist.data.manifest import DatasetSummary
from ulm_dist.evaluate.protocols import (
    ProtocolError,
    choose_normalisation,
    fit_split_for,
    flip_permutation_for,
    groups_for,
    protocol_of,
    uses_visibility,
)
from ulm_dist.evaluate.regression import fit_linear_map, landmark_regression

NO_EYES = LandmarkLayout((), (), (1, 0, 2))
# Three joints, the first and last a left-right pair, as Human3.6M's l_X and r_X.
JOINTS3 = LandmarkLayout((), (), (2, 1, 0), protocol="h36m")


def shards_with(layout: LandmarkLayout | None) -> ShardSet:
    count = layout.num_landmarks if layout else 5
    summary = DatasetSummary("test", 64, "png", count, "test", layout=layout)
    return ShardSet(("x.tar",), {"x.tar": 1}, summary)


def score(layout, test_annotated, test_predicted, *, visible=None, metadata=None, size=100):
    """The protocol of `layout` on test images whose regressed points are `test_predicted`:
    the fit images' discovered points are their annotations, so the fitted map is the
    identity and the test images' discovered points come out unchanged."""
    shards = shards_with(layout)
    normalisation = choose_normalisation(shards, image_size=size)
    points = test_annotated.shape[1]
    train = torch.rand(6 * points, points, 2, generator=torch.Generator().manual_seed(0)) * 90
    return landmark_regression(
        train,
        train,
        test_predicted,
        test_annotated,
        eyes=normalisation.eyes,
        image_size=normalisation.image_size,
        train_visible=None if visible is None else torch.ones(len(train), points, dtype=bool),
        test_visible=visible,
        flip_permutation=flip_permutation_for(shards),
        test_groups=groups_for(shards, metadata or [{}] * len(test_annotated)),
    )


@pytest.mark.parametrize(("protocol", "fit_split"), [("mafl", "mafl_train"), ("aflw", "train")])
def test_face_protocols_divide_by_the_inter_ocular_distance(protocol, fit_split):
    # Eyes 30 pixels apart; every point 5 pixels off (3, 4): 5 / 30 = 16.67 %.
    face = torch.tensor([[[10.0, 20.0], [40.0, 20.0], [25.0, 30.0], [15.0, 40.0], [35.0, 40.0]]])
    layout = dataclasses.replace(MAFL5, protocol=protocol)
    report = score(layout, face, face + torch.tensor([3.0, 4.0]))
    assert report.error == pytest.approx(100 * 5 / 30, rel=1e-4)
    assert fit_split_for(protocol_of(shards_with(layout).summary)) == fit_split


def test_cub_divides_by_the_image_side_and_counts_visible_parts_only():
    # Image side 100: part 0 is 5 pixels off, part 1 is 50 off but hidden, part 2 exact.
    parts = torch.tensor([[[20.0, 20.0], [60.0, 20.0], [40.0, 60.0]]])
    predicted = parts + torch.tensor([[[3.0, 4.0], [30.0, 40.0], [0.0, 0.0]]])
    visible = torch.tensor([[True, False, True]])
    layout = dataclasses.replace(NO_EYES, protocol="cub")
    report = score(layout, parts, predicted, visible=visible)
    assert report.error == pytest.approx((5 + 0) / 2, rel=1e-4)  # percent of 100 pixels
    assert uses_visibility(shards_with(layout)) and report.per_group == {}


def test_h36m_averages_per_activity_and_forgives_a_left_right_swap():
    # Side 100. "posing": two images 10 and 20 pixels off at every joint (10 %, 20 %).
    # "waiting": one image whose prediction is its mirror (joints 0 and 2 swapped) 4 pixels
    # off: 4 % against the swapped annotation, far more against the annotation itself.
    pose = torch.tensor([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    annotated = torch.stack([pose, pose, pose])
    predicted = torch.stack(
        [pose + torch.tensor([6.0, 8.0]), pose + torch.tensor([12.0, 16.0]), pose[[2, 1, 0]]]
    )
    predicted[2] += torch.tensor([0.0, 4.0])
    activities = [{"activity": a} for a in ("posing", "posing", "waiting")]
    report = score(JOINTS3, annotated, predicted, metadata=activities)
    assert report.per_group == pytest.approx({"posing": 15.0, "waiting": 4.0}, rel=1e-4)
    # The mean of the two activities' means, not the pooled (10 + 20 + 4) / 3.
    assert report.error == pytest.approx(9.5, rel=1e-4)


def test_h36m_needs_each_images_activity():
    with pytest.raises(ProtocolError, match="1 of 2 images have no 'activity'"):
        groups_for(shards_with(JOINTS3), [{"activity": "posing"}, {"subject": "S11"}])


def test_data_sets_without_a_protocol_keep_the_generic_rule():
    assert choose_normalisation(shards_with(IBUG68), 64).eyes == (IBUG68.eye_left, IBUG68.eye_right)
    assert choose_normalisation(shards_with(None), 64).name == "bbox-diagonal"
    assert choose_normalisation(shards_with(NO_EYES), 64).name == "bbox-diagonal"
    assert fit_split_for(protocol_of(shards_with(IBUG68).summary)) == "train"
    assert not uses_visibility(shards_with(None))
    assert flip_permutation_for(shards_with(NO_EYES)) is None
    assert groups_for(shards_with(NO_EYES), [{}]) is None


def test_inter_ocular_on_a_layout_without_eyes_is_refused():
    with pytest.raises(ProtocolError, match="no landmark layout naming the eyes"):
        choose_normalisation(
            shards_with(dataclasses.replace(NO_EYES, protocol="h36m")), 64, "inter-ocular"
        )


def test_an_unknown_protocol_is_refused_with_its_name():
    with pytest.raises(ProtocolError, match="'birds3000'"):
        protocol_of(shards_with(dataclasses.replace(NO_EYES, protocol="birds3000")).summary)


def test_the_fit_ignores_invisible_points_whatever_their_coordinates():
    torch.manual_seed(0)
    discovered = torch.rand(40, 3, 2) * 32
    true_map = torch.randn(6, 4)
    annotated = (discovered.flatten(1) @ true_map).reshape(40, 2, 2)
    visible = torch.ones(40, 2, dtype=torch.bool)
    visible[::3, 1] = False
    corrupted = annotated.clone()
    corrupted[~visible] = 1000.0  # CUB writes (0, 0) for a hidden part; any value must do
    weights = fit_linear_map(discovered, corrupted, visible=visible)
    assert torch.allclose(weights.float(), true_map, atol=1e-3)
    assert not torch.allclose(fit_linear_map(discovered, corrupted).float(), true_map, atol=1)


def test_image_size_errors_count_visible_points_only():
    # The mean-shape baseline, worked by hand: landmark 0 of every fit image at (10, 10),
    # landmark 1 at (30, 10) where visible (and a hidden (0, 0) that must not move the mean).
    train = torch.tensor([[[10.0, 10.0], [30.0, 10.0]], [[10.0, 10.0], [0.0, 0.0]]])
    train_visible = torch.tensor([[True, True], [True, False]])
    # Test: landmark 0 is 5 pixels off (3, 4), landmark 1 is 10 off but hidden.
    test = torch.tensor([[[13.0, 14.0], [40.0, 10.0]]])
    test_visible = torch.tensor([[True, False]])
    report = landmark_regression(
        train,
        train,
        test,
        test,
        image_size=50,
        train_visible=train_visible,
        test_visible=test_visible,
    )
    assert report.baseline_error == pytest.approx(10.0)  # 5 / 50 pixels, in percent
    assert report.reverse_error != report.reverse_error  # NaN: hidden points are no inputs
    per_landmark = report.per_landmark
    assert per_landmark[1] != per_landmark[1] and per_landmark[0] == pytest.approx(report.error)


def test_without_visibility_flags_the_protocol_is_unchanged():
    torch.manual_seed(2)
    discovered, annotated = torch.rand(30, 4, 2) * 20, torch.rand(30, 3, 2) * 20
    everything = torch.ones(30, 3, dtype=torch.bool)
    plain = landmark_regression(discovered[:20], annotated[:20], discovered[20:], annotated[20:])
    flagged = landmark_regression(
        discovered[:20],
        annotated[:20],
        discovered[20:],
        annotated[20:],
        train_visible=everything[:20],
        test_visible=everything[20:],
    )
    assert flagged.error == pytest.approx(plain.error, rel=1e-5)
    assert flagged.reverse_error == pytest.approx(plain.reverse_error, rel=1e-5)
    assert flagged.baseline_error == pytest.approx(plain.baseline_error, rel=1e-5)
