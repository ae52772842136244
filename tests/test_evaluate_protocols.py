"""evaluate/protocols.py and the visibility-aware regression: each benchmark's normaliser,
splits and visibility rule, chosen from the manifest's layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ulm_dist.data import ShardSet
from ulm_dist.data.layouts import IBUG68, MAFL5, LandmarkLayout
from ulm_dist.data.manifest import DatasetSummary
from ulm_dist.evaluate.protocols import (
    PROTOCOLS,
    ProtocolError,
    choose_normalisation,
    fit_split_for,
    uses_visibility,
)
from ulm_dist.evaluate.regression import fit_linear_map, landmark_regression

NO_EYES = LandmarkLayout((), (), (1, 0, 2))


def shards_with(layout: LandmarkLayout | None) -> ShardSet:
    count = layout.num_landmarks if layout else 5
    summary = DatasetSummary("test", 64, "png", count, "test", layout=layout)
    return ShardSet(("x.tar",), {"x.tar": 1}, summary)


@pytest.mark.parametrize(
    ("protocol", "normaliser", "fit_split", "visible_only"),
    [
        ("mafl", "inter-ocular", "mafl_train", False),
        ("aflw", "inter-ocular", "train", False),
        ("cub", "image-size", "train", True),
        ("h36m", "image-size", "train", False),
    ],
)
def test_each_benchmark_layout_selects_its_protocol(protocol, normaliser, fit_split, visible_only):
    base = MAFL5 if protocol in ("mafl", "aflw") else NO_EYES
    shards = shards_with(dataclasses.replace(base, protocol=protocol))
    chosen = choose_normalisation(shards, image_size=128)
    assert chosen.name == normaliser
    assert fit_split_for(shards) == fit_split and PROTOCOLS[protocol].test_split == "test"
    assert uses_visibility(shards) is visible_only
    assert (chosen.image_size, chosen.eyes) == (
        (128, None) if normaliser == "image-size" else (None, ((0,), (1,)))
    )


def test_data_sets_without_a_protocol_keep_the_generic_rule():
    assert choose_normalisation(shards_with(IBUG68), 64).eyes == (IBUG68.eye_left, IBUG68.eye_right)
    assert choose_normalisation(shards_with(None), 64).name == "bbox-diagonal"
    assert choose_normalisation(shards_with(NO_EYES), 64).name == "bbox-diagonal"
    assert fit_split_for(shards_with(IBUG68)) == "train" and not uses_visibility(shards_with(None))


def test_inter_ocular_on_a_layout_without_eyes_is_refused():
    with pytest.raises(ProtocolError, match="no landmark layout naming the eyes"):
        choose_normalisation(
            shards_with(dataclasses.replace(NO_EYES, protocol="h36m")), 64, "inter-ocular"
        )


def test_an_unknown_protocol_is_refused_with_its_name():
    with pytest.raises(ProtocolError, match="'birds3000'"):
        fit_split_for(shards_with(dataclasses.replace(NO_EYES, protocol="birds3000")))


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
