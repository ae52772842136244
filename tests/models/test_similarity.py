import math

import torch
from small_learners import blobs

from ulm_dist.models.landmarks import render_gaussian_heatmaps, spatial_softmax
from ulm_dist.models.similarity import (
    RandomWarp,
    invert_affine,
    move_points,
    random_similarities,
    random_warps,
    similarity_transforms,
    transform_equivariance_loss,
    warp_images,
)


def identity(batch: int) -> torch.Tensor:
    return similarity_transforms(torch.zeros(batch), torch.zeros(batch), torch.zeros(batch, 2))


def blob_centres(images: torch.Tensor) -> torch.Tensor:
    """An exactly equivariant detector: the centre of mass of each channel, (B, C, 2)."""
    return spatial_softmax(images.clamp_min(1e-30).log())


def test_the_identity_moves_neither_points_nor_pixels():
    images = blobs(2, seed=1)
    points = torch.rand(2, 5, 2) * 2 - 1
    assert torch.allclose(warp_images(images, identity(2)), images, atol=1e-6)
    assert torch.allclose(move_points(identity(2), points), points)


def test_similarity_transforms_rotate_a_quarter_turn_scale_and_shift():
    turn = similarity_transforms(
        torch.tensor([math.pi / 2]), torch.tensor([math.log(2.0)]), torch.tensor([[0.1, -0.2]])
    )
    # (1, 0) rotated a quarter turn is (0, 1); doubled, then shifted.
    moved = move_points(turn, torch.tensor([[[1.0, 0.0]]]))
    assert torch.allclose(moved, torch.tensor([[[0.1, 1.8]]]), atol=1e-6)


def test_a_blob_moved_by_the_image_warp_lands_where_the_point_map_says():
    count = 6
    torch.manual_seed(0)
    centres = (torch.rand(count, 1, 2) - 0.5) * 0.4  # the moved blobs stay clear of the border
    images = render_gaussian_heatmaps(centres, 32, std=0.1)
    shifts = torch.tensor([[0.3, -0.3], [-0.3, 0.3], [0.3, 0.3], [-0.3, -0.3], [0.3, 0], [0, -0.3]])
    transforms = similarity_transforms(
        torch.linspace(-0.6, 0.6, count), torch.linspace(-0.2, 0.2, count), shifts
    )
    found = blob_centres(warp_images(images, transforms))
    expected = move_points(transforms, centres)
    # Tight enough to catch the other pixel convention (align_corners=True scales the shifts
    # by 31/32 here, off by about 0.009) and, by far, the inverse map.
    assert (found - expected).norm(dim=-1).max() < 2e-3
    assert (found - move_points(invert_affine(transforms), centres)).norm(dim=-1).min() > 0.05


def test_inverting_a_transform_undoes_it():
    transforms = random_similarities(4, generator=torch.Generator().manual_seed(0))
    points = torch.rand(4, 7, 2) * 2 - 1
    back = move_points(invert_affine(transforms), move_points(transforms, points))
    assert torch.allclose(back, points, atol=1e-5)
    assert torch.allclose(invert_affine(invert_affine(transforms)), transforms, atol=1e-5)


def test_the_equivariance_loss_is_zero_only_for_an_equivariant_detector():
    centres = torch.rand(4, 3, 2) - 0.5
    images = render_gaussian_heatmaps(centres, 64, std=0.06)
    transforms = random_similarities(4, generator=torch.Generator().manual_seed(1))
    warp = RandomWarp(transforms, None)
    moved = warp.images(images)
    exact = transform_equivariance_loss(blob_centres(moved), warp, blob_centres(images))
    assert exact < 1e-5

    def fixed(images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), 3, 2)

    def invariant(images: torch.Tensor) -> torch.Tensor:
        return centres  # right on x, and ignores the warp

    assert transform_equivariance_loss(fixed(moved), warp, fixed(images)) > 100 * exact
    assert transform_equivariance_loss(invariant(moved), warp, centres) > 100 * exact


def test_deformed_warps_move_points_with_the_pixels():
    centres = torch.rand(6, 3, 2) - 0.5
    images = render_gaussian_heatmaps(centres, 64, std=0.05)
    warp = random_warps(6, 0.06, generator=torch.Generator().manual_seed(2))
    assert warp.offsets is not None
    found = blob_centres(warp.images(images))
    assert torch.allclose(found, warp.points(centres), atol=0.02)  # well under a pixel (1/32)
    # The deformation is not a similarity: the best similarity misses by more.
    similarity_only = RandomWarp(warp.similarities, None)
    miss = (found - similarity_only.points(centres)).norm(dim=-1).mean()
    hit = (found - warp.points(centres)).norm(dim=-1).mean()
    assert miss > 3 * hit


def test_a_zero_deformation_is_the_similarity_alone():
    warp = random_warps(3, 0.05, generator=torch.Generator().manual_seed(4))
    flat = RandomWarp(warp.similarities, torch.zeros_like(warp.offsets))
    rigid = RandomWarp(warp.similarities, None)
    images, points = torch.rand(3, 3, 16, 16), torch.rand(3, 5, 2) - 0.5
    assert torch.allclose(flat.points(points), rigid.points(points), atol=1e-6)
    assert torch.allclose(flat.images(images), rigid.images(images), atol=1e-5)
