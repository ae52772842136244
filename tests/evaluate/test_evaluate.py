import pytest
import torch

from ulm_dist.evaluate.regression import (
    apply_linear_map,
    bounding_box_diagonal,
    fit_linear_map,
    inter_ocular_distance,
    landmark_regression,
)


def test_fit_recovers_an_exact_linear_map():
    torch.manual_seed(0)
    discovered = torch.rand(50, 4, 2) * 32
    true_map = torch.randn(8, 6)
    annotated = (discovered.flatten(1) @ true_map).reshape(50, 3, 2)
    weights = fit_linear_map(discovered, annotated)
    assert torch.allclose(weights.float(), true_map, atol=1e-4)
    assert torch.allclose(apply_linear_map(weights, discovered), annotated, atol=1e-3)


def test_bias_term_captures_an_offset_that_no_intercept_cannot():
    torch.manual_seed(0)
    discovered = torch.randn(40, 2, 2)
    annotated = discovered + torch.tensor([5.0, -3.0])
    with_bias = apply_linear_map(fit_linear_map(discovered, annotated, bias=True), discovered, True)
    without = apply_linear_map(fit_linear_map(discovered, annotated), discovered)
    assert torch.allclose(with_bias, annotated, atol=1e-4)
    assert (without - annotated).abs().max() > 1


def test_inter_ocular_distance_uses_eye_centres():
    points = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [12.0, 0.0]]])
    assert inter_ocular_distance(points, (0, 1), (2, 3)).item() == pytest.approx(10.0)


def test_bounding_box_diagonal_spans_the_extreme_points():
    points = torch.tensor([[[1.0, 1.0], [4.0, 2.0], [2.0, 5.0]]])
    assert bounding_box_diagonal(points).item() == pytest.approx(5.0)  # a 3 x 4 box


def test_without_eye_indices_errors_are_relative_to_the_bounding_box_diagonal():
    torch.manual_seed(0)
    annotated = torch.rand(30, 3, 2) * 20
    report = landmark_regression(annotated[:20], annotated[:20], annotated[20:], annotated[20:])
    test = annotated[20:]
    diagonal = (test.amax(dim=1) - test.amin(dim=1)).norm(dim=-1)
    expected = (100 * (test - annotated[:20].mean(0)).norm(dim=-1) / diagonal[:, None]).mean()
    assert report.baseline_error == pytest.approx(expected.item(), rel=1e-5)


def test_protocol_reports_zero_for_perfect_landmarks_and_the_mean_shape_baseline():
    torch.manual_seed(0)
    annotated = torch.rand(60, 3, 2) * 20 + torch.tensor([[0.0, 0.0], [30.0, 0.0], [15.0, 20.0]])
    report = landmark_regression(
        annotated[:40],
        annotated[:40],
        annotated[40:],
        annotated[40:],
        eyes=((0,), (1,)),
    )
    assert report.error == pytest.approx(0.0, abs=1e-3)
    assert report.reverse_error == pytest.approx(0.0, abs=1e-3)
    mean_shape = annotated[:40].mean(0)
    iod = (annotated[40:, 0] - annotated[40:, 1]).norm(dim=-1)
    expected = (100 * (annotated[40:] - mean_shape).norm(dim=-1) / iod[:, None]).mean()
    assert report.baseline_error == pytest.approx(expected.item(), rel=1e-5)
    assert len(report.per_landmark) == 3


def test_uninformative_landmarks_do_no_better_than_the_mean_shape():
    torch.manual_seed(1)
    annotated = torch.rand(400, 3, 2) * 20 + torch.tensor([[0.0, 0.0], [30.0, 0.0], [15.0, 20.0]])
    noise = torch.rand(400, 5, 2) * 32
    report = landmark_regression(
        noise[:300],
        annotated[:300],
        noise[300:],
        annotated[300:],
        eyes=((0,), (1,)),
        bias=True,
    )
    assert report.error > 0.95 * report.baseline_error
