import numpy as np

from ulm_dist.data.layouts import IBUG68, MAFL5, flip_landmarks, ibug68_to_mafl5


def test_mafl5_takes_eye_centres_nose_tip_and_mouth_corners_from_68_points():
    points = np.random.default_rng(0).uniform(0, 128, (3, 68, 2))
    five = ibug68_to_mafl5(points)
    assert five.shape == (3, 5, 2)
    np.testing.assert_allclose(five[:, 0], points[:, 36:42].mean(axis=1))
    np.testing.assert_allclose(five[:, 1], points[:, 42:48].mean(axis=1))
    np.testing.assert_array_equal(five[:, 2:], points[:, [30, 48, 54]])


def test_flipping_68_points_then_reducing_equals_reducing_then_flipping_5():
    points = np.random.default_rng(1).uniform(0, 128, (68, 2))
    flipped_first = ibug68_to_mafl5(flip_landmarks(points, 128, IBUG68.flip_permutation))
    reduced_first = flip_landmarks(ibug68_to_mafl5(points), 128, MAFL5.flip_permutation)
    np.testing.assert_allclose(flipped_first, reduced_first)
