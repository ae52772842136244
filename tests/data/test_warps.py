import numpy as np

from ulm_dist.data import warps


def _random_warps(count: int, seed: int = 0) -> warps.Warps:
    return warps.sample_warps(
        np.random.default_rng(seed),
        count,
        rotation_deg=20,
        scale_std=0.15,
        translation_std=0.1,
        tps_std=0.06,
    )


def test_tps_interpolates_its_control_values():
    grid = 4
    control = warps.pixel_centres(grid) * grid / (grid - 1)
    values = np.random.default_rng(0).normal(size=(grid * grid, 2))
    assert np.allclose(warps.tps_interpolation_matrix(control, grid) @ values, values, atol=1e-8)


def test_tps_reproduces_affine_fields_exactly():
    # A TPS has an affine part: affine control values must give that affine field everywhere.
    grid = 5
    control = warps.pixel_centres(grid) * grid / (grid - 1)
    affine = np.array([[0.3, -0.2], [0.1, 0.5]])
    points = np.random.default_rng(1).uniform(-1, 1, (50, 2))
    shift = warps.tps_interpolation_matrix(points, grid) @ (control @ affine.T + [0.1, -0.3])
    assert np.allclose(shift, points @ affine.T + [0.1, -0.3], atol=1e-8)


def test_identity_warp_maps_points_to_themselves():
    identity = warps.Warps(
        rotation=np.zeros(1, np.float32),
        scale=np.ones(1, np.float32),
        translation=np.zeros((1, 2), np.float32),
        control_shift=np.zeros((1, 25, 2), np.float32),
    )
    points = warps.pixel_centres(8).astype(np.float32)
    assert np.allclose(warps.backward(identity, points), points)


def test_similarity_part_moves_points_as_documented():
    # Without TPS, a canonical point c appears at s R c + t.
    warp = warps.Warps(
        rotation=np.float32([np.pi / 2]),
        scale=np.float32([0.5]),
        translation=np.float32([[0.1, 0.2]]),
        control_shift=np.zeros((1, 25, 2), np.float32),
    )
    moved = warps.forward(warp, np.float32([[[0.4, 0.0]]]))
    assert np.allclose(moved, [[[0.1, 0.4]]], atol=1e-6)


def test_forward_inverts_backward():
    batch = _random_warps(16)
    points = np.random.default_rng(2).uniform(-0.8, 0.8, (16, 10, 2)).astype(np.float32)
    moved = warps.forward(batch, points)
    assert not np.allclose(moved, points, atol=0.01)
    assert np.allclose(warps.backward(batch, moved), points, atol=1e-5)


def test_points_shared_by_all_warps_map_like_per_warp_points():
    batch = _random_warps(5)
    points = warps.pixel_centres(6).astype(np.float32)
    per_warp = np.broadcast_to(points, (5, *points.shape)).copy()
    assert np.allclose(warps.backward(batch, points), warps.backward(batch, per_warp), atol=1e-6)
