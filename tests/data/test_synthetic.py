import dataclasses

import numpy as np

from ulm_dist.data import synthetic, warps


def test_same_seed_same_images_and_landmarks():
    first = synthetic.generate(6, 32, np.random.default_rng(7))
    second = synthetic.generate(6, 32, np.random.default_rng(7))
    other = synthetic.generate(6, 32, np.random.default_rng(8))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_shapes_and_landmarks_inside_the_image():
    images, landmarks = synthetic.generate(50, 48, np.random.default_rng(0))
    assert images.shape == (50, 48, 48, 3) and images.dtype == np.uint8
    assert landmarks.shape == (50, len(synthetic.LANDMARK_NAMES), 2)
    assert landmarks.dtype == np.float32
    assert (landmarks > 0).all() and (landmarks < 48).all()


def test_landmarks_keep_their_meaning_in_every_image():
    # Rotations stay within +-30 degrees, so image-left parts stay left of their mirror parts
    # and the face keeps its top-to-bottom order.
    _, points = synthetic.generate(200, 32, np.random.default_rng(1))
    name = {label: k for k, label in enumerate(synthetic.LANDMARK_NAMES)}
    x, y = points[..., 0], points[..., 1]
    for left, right in [
        ("left_eye", "right_eye"),
        ("mouth_left", "mouth_right"),
        ("left_ear_tip", "right_ear_tip"),
        ("left_cheek", "right_cheek"),
    ]:
        assert (x[:, name[left]] < x[:, name[right]]).all(), (left, right)
    eyes = (y[:, name["left_eye"]] + y[:, name["right_eye"]]) / 2
    assert (eyes < y[:, name["nose"]]).all()
    assert (y[:, name["nose"]] < y[:, name["chin"]]).all()


def test_layout_flip_permutation_swaps_mirror_parts():
    names = synthetic.LANDMARK_NAMES
    for index, source in enumerate(synthetic.SYNTHETIC_LAYOUT.flip_permutation):
        assert names[index].replace("left", "right") == names[source] or (
            names[index].replace("right", "left") == names[source]
        )


def test_rendered_parts_sit_at_their_landmarks():
    # Paint the eyes and the nose pure red on a green world: the pixel under each of those
    # landmarks must be red, which checks the pose warp, its inverse and the pixel convention.
    rng = np.random.default_rng(3)
    count, size = 20, 64
    scene = synthetic._sample_scene(rng, count)
    red, green = np.float32([1, 0, 0]), np.float32([0, 1, 0])

    def paint(part: synthetic.Ellipses, colour: np.ndarray) -> synthetic.Ellipses:
        return dataclasses.replace(part, colour=np.tile(colour, (count, 1)))

    parts = tuple(
        (name, paint(part, red if name in ("sclera", "iris", "nose") else green))
        for name, part in scene.parts
    )
    scene = dataclasses.replace(
        scene,
        parts=parts,
        fur=dataclasses.replace(scene.fur, strength=np.zeros(count, np.float32)),
        background=np.tile(green, (count, 2, 1)),
        light=np.zeros((count, 2), np.float32),
    )
    grid = warps.pixel_centres(size).astype(np.float32)
    canonical = warps.backward(scene.pose, grid, warps.grid_interpolation(size, scene.pose.grid))
    images = synthetic._render(scene, canonical, grid, rng)
    landmarks = (warps.forward(scene.pose, scene.landmarks) + 1) * size / 2
    for k in (0, 1, 2):  # left eye, right eye, nose
        column, row = np.floor(landmarks[:, k]).astype(int).T
        pixel = images[np.arange(count), row, column].astype(int)
        assert (pixel[:, 0] > 200).all() and (pixel[:, 1] < 60).all(), (k, pixel)
