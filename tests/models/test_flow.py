import pytest
import torch
import torch.nn.functional as F

from ulm_dist.models.flow import (
    CrossImageFlow,
    FactorisedConv4d,
    cosine_correlation,
    expected_source_positions,
    transform_points,
)
from ulm_dist.models.landmarks import pixel_centres
from ulm_dist.models.losses import equivariance_loss


def identity_field(size: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(pixel_centres(size), pixel_centres(size), indexing="ij")
    return torch.stack([xs, ys]).unsqueeze(0)


def test_cosine_correlation_is_one_on_the_diagonal_and_bounded():
    torch.manual_seed(0)
    f = torch.randn(2, 16, 5, 6)
    corr = cosine_correlation(f, 3 * f)  # scale must not matter
    assert corr.shape == (2, 5, 6, 5, 6)
    diagonal = corr.reshape(2, 30, 30).diagonal(dim1=1, dim2=2)
    assert torch.allclose(diagonal, torch.ones_like(diagonal), atol=1e-5)
    assert corr.abs().max() <= 1 + 1e-5


def test_same_image_gives_the_identity_flow():
    torch.manual_seed(0)
    f = torch.randn(2, 32, 8, 8)
    i_from_j, j_from_i = CrossImageFlow(kernel_size=3, temperature=0.05)(f, f)
    assert torch.allclose(i_from_j, identity_field(8).expand(2, -1, -1, -1), atol=1e-3)
    assert torch.allclose(j_from_i, i_from_j, atol=1e-6)


def test_shifted_features_give_the_shift():
    torch.manual_seed(0)
    f_i = torch.randn(1, 32, 8, 8)
    f_j = torch.roll(f_i, shifts=(1, 2), dims=(2, 3))  # j = i moved down 1 and right 2
    flow = expected_source_positions(cosine_correlation(f_i, f_j), temperature=0.05)
    # Pixel (y, x) of j came from (y - 1, x - 2) of i: 2 pixels = 0.5 normalised units in x.
    expected = identity_field(8)[:, :, 1:, 2:] - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    assert torch.allclose(flow[:, :, 1:, 2:], expected, atol=1e-3)


def test_factorised_conv_equals_the_4d_convolution_with_the_outer_product_kernel():
    torch.manual_seed(0)
    conv = FactorisedConv4d(kernel_size=3)
    with torch.no_grad():
        conv.over_source.weight.normal_()
        conv.over_target.weight.normal_()
    corr = torch.randn(1, 5, 5, 4, 4)
    got = conv(corr)
    w_source = conv.over_source.weight[0, 0]
    w_target = conv.over_target.weight[0, 0]
    padded = F.pad(corr, (1, 1, 1, 1, 1, 1, 1, 1))
    want = torch.zeros_like(corr)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                for d in range(3):
                    window = padded[:, a : a + 5, b : b + 5, c : c + 4, d : d + 4]
                    want += w_source[a, b] * w_target[c, d] * window
    assert torch.allclose(got, want, atol=1e-4)


def test_transform_points_reads_the_field_at_the_points():
    field = identity_field(8) * 0.5 + torch.tensor([0.1, -0.2]).view(1, 2, 1, 1)
    points = torch.tensor([[[0.3, -0.4], [-0.6, 0.1]]])
    assert torch.allclose(transform_points(field, points), points * 0.5 + torch.tensor([0.1, -0.2]))


def test_equivariance_loss_is_zero_for_consistent_landmarks_and_not_otherwise():
    shift = torch.tensor([0.25, -0.125]).view(1, 2, 1, 1)
    i_from_j = identity_field(8) - shift  # T^{i->j}: a point of j sits at p - shift in i
    j_from_i = identity_field(8) + shift
    points_j = torch.tensor([[[0.1, 0.2], [-0.3, 0.05], [0.4, -0.35]]])
    points_i = points_j - shift.view(1, 1, 2)

    def loss(p_i, p_j):
        carried = (transform_points(i_from_j, p_j), transform_points(j_from_i, p_i))
        return equivariance_loss((p_i, p_j), carried).item()

    assert loss(points_i, points_j) == pytest.approx(0.0, abs=1e-10)
    assert loss(points_i.flip(1), points_j) > 0.1  # same points, landmark identities permuted
