import pytest
import torch

from ulm_dist.models.landmarks import (
    pixel_centres,
    render_gaussian_heatmaps,
    spatial_softmax,
    spatial_softmax_with_spread,
    to_pixels,
)


def test_pixel_centres_follow_the_align_corners_false_convention():
    assert torch.allclose(pixel_centres(4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(to_pixels(pixel_centres(4), 4), torch.tensor([0.5, 1.5, 2.5, 3.5]))


@pytest.mark.parametrize(("row", "col"), [(0, 0), (3, 12), (15, 7), (9, 15)])
def test_sharp_peak_gives_that_pixels_normalised_coordinate(row, col):
    scores = torch.full((1, 1, 16, 16), -1e4)
    scores[0, 0, row, col] = 0.0
    (x, y) = spatial_softmax(scores)[0, 0]
    assert x.item() == pytest.approx((2 * col + 1) / 16 - 1, abs=1e-6)
    assert y.item() == pytest.approx((2 * row + 1) / 16 - 1, abs=1e-6)


def test_uniform_scores_give_the_image_centre():
    points = spatial_softmax(torch.zeros(2, 3, 8, 8))
    assert torch.allclose(points, torch.zeros(2, 3, 2), atol=1e-6)


def test_gaussian_peaks_at_its_point_with_the_requested_width():
    point = torch.tensor([[[pixel_centres(32)[20], pixel_centres(32)[5]]]])
    std = 0.1
    maps = render_gaussian_heatmaps(point, 32, std)[0, 0]
    assert maps.argmax().item() == 5 * 32 + 20
    assert maps[5, 20].item() == pytest.approx(1.0)
    # One std away along x the value is exp(-1/2); a pixel is 2/32 normalised units wide.
    offset = pixel_centres(32)[20] + std
    expected = torch.exp(torch.tensor(-0.5))
    one_std = render_gaussian_heatmaps(torch.tensor([[[offset, point[0, 0, 1]]]]), 32, std)
    assert one_std[0, 0, 5, 20].item() == pytest.approx(expected.item(), rel=1e-5)


def test_render_then_softmax_round_trips_off_grid_points():
    torch.manual_seed(0)
    points = torch.rand(4, 10, 2) * 1.2 - 0.6  # away from the borders: no truncation
    maps = render_gaussian_heatmaps(points, 64, std=0.08)
    recovered = spatial_softmax(maps.clamp_min(1e-30).log())
    assert torch.allclose(recovered, points, atol=1e-4)


def test_spatial_softmax_is_differentiable_towards_higher_scores():
    scores = torch.zeros(1, 1, 8, 8, requires_grad=True)
    x = spatial_softmax(scores)[0, 0, 0]
    x.backward()
    # Raising scores on the right moves x right.
    assert scores.grad[0, 0, :, -1].gt(0).all() and scores.grad[0, 0, :, 0].lt(0).all()


def test_spread_is_zero_for_a_delta_and_the_variance_of_a_gaussian():
    delta = torch.full((1, 1, 16, 16), -1e4)
    delta[0, 0, 4, 9] = 0.0
    assert spatial_softmax_with_spread(delta)[1].item() == pytest.approx(0.0, abs=1e-8)
    # A Gaussian log-score map is a Gaussian distribution: var(x) + var(y) = 2 std^2, up to
    # the grid's discretisation, for a point well inside the image.
    std = 0.1
    maps = render_gaussian_heatmaps(torch.tensor([[[0.1, -0.2]]]), 64, std)
    points, spread = spatial_softmax_with_spread(maps.clamp_min(1e-30).log())
    assert torch.allclose(points, torch.tensor([[[0.1, -0.2]]]), atol=1e-4)
    assert spread.item() == pytest.approx(2 * std**2, rel=0.02)


def test_uniform_scores_spread_as_a_uniform_distribution_over_pixel_centres():
    size = 8
    spread = spatial_softmax_with_spread(torch.zeros(1, 1, size, size))[1]
    per_axis = (pixel_centres(size) ** 2).mean()  # centred on 0 by symmetry
    assert spread.item() == pytest.approx(2 * per_axis.item(), rel=1e-6)
