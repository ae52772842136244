import collections
import io
import tarfile

import numpy as np
import pytest
import torch

from ulm_dist.config import DataConfig
from ulm_dist.data import make_annotated_loader, make_pair_loader, resolve_shards
from ulm_dist.data.augment import AugmentOptions, View, jitter_colours, warped_view
from ulm_dist.data.build import WriteOptions, build_from_folder
from ulm_dist.data.reader import shards_for_worker, unpaired
from ulm_dist.data.shards import Encoding

# No random crop or colour change: views are the stored images, resized.
PLAIN = {"crop_scale": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def _shards(root, split="train", **fields):
    data = DataConfig(**fields)
    return data, resolve_shards(data, str(root), split, image_size=32)


def _stored_landmarks(shards) -> dict[str, np.ndarray]:
    """Landmarks as stored in the shards, in pixels, by sample key."""
    found = {}
    for url in shards.urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".landmarks.npy"):
                    key = member.name.split(".")[0]
                    found[key] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return found


def test_two_ranks_two_workers_see_every_sample_once(synthetic_root):
    data, shards = _shards(synthetic_root, num_workers=2, shuffle_buffer=8)
    seen = collections.Counter()
    for rank in range(2):
        loader = make_pair_loader(
            data, shards, 32, 5, rank=rank, world_size=2, seed=1, resampled=False
        )
        for batch in loader:
            seen.update(batch["key_i"])
            assert all(i != j for i, j in zip(batch["key_i"], batch["key_j"], strict=True))
            assert int(batch["skipped"]) == 0
    assert len(seen) == 64 and set(seen.values()) == {1}


def test_shard_split_is_a_partition_for_any_seed():
    urls = [f"s{i}" for i in range(11)]
    for seed in (None, [0, 1], [5, 2]):
        parts = [
            shards_for_worker(urls, rank=r, world_size=2, worker=w, num_workers=3, seed=seed)
            for r in range(2)
            for w in range(3)
        ]
        assert sorted(url for part in parts for url in part) == sorted(urls)


def test_unpaired_pairs_each_item_once_with_another_item():
    rng = np.random.default_rng(0)
    pairs = list(unpaired(range(50), 7, rng))
    assert sorted(first for first, _ in pairs) == list(range(50))
    assert all(first != partner for first, partner in pairs)
    assert [first for first, _ in pairs] != list(range(50))  # shuffled


def test_resampled_ranks_get_equal_batch_counts_from_uneven_shards(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 23)
    build_from_folder(
        tmp_path / "images",
        str(tmp_path / "shards"),
        table=table,
        image_size=16,
        shard_samples=7,
        write=WriteOptions(progress=False),
    )  # shards of 7, 7, 7 and 2 samples
    data = DataConfig(num_workers=2, **PLAIN)
    shards = resolve_shards(data, str(tmp_path / "shards"), "train", image_size=16)
    for rank in range(3):
        loader = make_pair_loader(
            data, shards, 16, 4, rank=rank, world_size=3, seed=0, epoch_samples=50
        )
        counts = [len(batch["image_i"]) for batch in loader]
        assert counts == [4] * 5  # ceil(50 / (4 * 3)) full batches on every rank


def test_resampled_without_epoch_size_streams_forever(synthetic_root):
    data, shards = _shards(synthetic_root, num_workers=0)
    batches = iter(make_pair_loader(data, shards, 32, 16, rank=0, world_size=1, seed=0))
    keys = [key for _ in range(10) for key in next(batches)["key_i"]]
    assert len(keys) == 160 > 64  # more than the data set: shards were drawn again


def test_seed_and_epoch_change_the_order_and_same_seed_repeats_it(synthetic_root):
    data, shards = _shards(synthetic_root, num_workers=0)

    def order(seed, epochs=1):
        loader = make_pair_loader(
            data, shards, 32, 8, rank=0, world_size=1, seed=seed, resampled=False
        )
        return [[k for batch in loader for k in batch["key_i"]] for _ in range(epochs)]

    first, second_epoch = order(0, epochs=2)
    assert order(0)[0] == first
    assert order(1)[0] != first
    assert second_epoch != first and sorted(second_epoch) == sorted(first)


def test_landmarks_are_normalised_from_stored_pixels(synthetic_root):
    data, shards = _shards(synthetic_root, "val", num_workers=0)
    stored = _stored_landmarks(shards)
    for size in (32, 64):  # the stored size, and a resize: normalised values do not change
        batches = list(make_annotated_loader(data, shards, size, 10))
        assert [len(b["key"]) for b in batches] == [10, 10, 4]
        for batch in batches:
            assert batch["image"].shape[1:] == (3, size, size)
            for key, landmarks in zip(batch["key"], batch["landmarks"].numpy(), strict=True):
                assert np.allclose(landmarks, stored[key] * 2 / 32 - 1, atol=1e-6)


def test_annotated_loader_keeps_manifest_order(synthetic_root):
    data, shards = _shards(synthetic_root, "val", num_workers=0)
    keys = [k for batch in make_annotated_loader(data, shards, 32, 5) for k in batch["key"]]
    assert keys == sorted(keys) and len(keys) == 24


def test_flip_mirrors_landmarks_and_keeps_their_meaning(synthetic_root):
    data, shards = _shards(synthetic_root, "val", num_workers=0, flip_probability=1.0, **PLAIN)
    stored = _stored_landmarks(shards)
    permutation = list(shards.summary.layout.flip_permutation)
    loader = make_pair_loader(
        data, shards, 32, 24, rank=0, world_size=1, seed=0, resampled=False, with_landmarks=True
    )
    batch = next(iter(loader))
    reference = next(iter(make_annotated_loader(DataConfig(num_workers=0), shards, 32, 24)))
    originals = dict(zip(reference["key"], reference["image"].numpy(), strict=True))
    landmarks_i = batch["landmarks_i"].numpy()
    for key, image, landmarks in zip(batch["key_i"], batch["image_i"], landmarks_i, strict=True):
        expected = stored[key][permutation] * 2 / 32 - 1
        expected[:, 0] *= -1
        assert np.allclose(landmarks, expected, atol=1e-5)
        assert landmarks[0, 0] < landmarks[1, 0]  # landmark 0 is still the image-left eye
        assert np.allclose(image.numpy(), originals[key][:, :, ::-1], atol=1e-5)


def test_warped_pairs_move_landmarks_with_the_pixels():
    size = 48
    rng = np.random.default_rng(0)
    options = AugmentOptions(
        warp_rotation_deg=20, warp_scale_std=0.1, warp_translation_std=0.1, warp_tps_std=0.05
    )
    for _ in range(5):
        image = np.zeros((3, size, size), np.float32)
        column, row = rng.integers(16, 32, 2)
        image[:, row - 1 : row + 2, column - 1 : column + 2] = 1
        landmark = np.float32([[(column + 0.5) * 2 / size - 1, (row + 0.5) * 2 / size - 1]])
        warped = warped_view(View(image, landmark), options, rng)
        weights = warped.image[0]
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        centre = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
        assert np.allclose((warped.landmarks[0] + 1) * size / 2, centre, atol=0.5)


def test_colour_jitter_keeps_greys_grey_under_hue_and_saturation():
    grey = np.full((3, 4, 4), 0.4, np.float32)
    options = AugmentOptions(saturation=0.9, hue=0.5)
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert np.allclose(jitter_colours(grey, options, rng), grey, atol=1e-5)
    colourful = np.random.default_rng(1).random((3, 4, 4), dtype=np.float32)
    assert np.allclose(jitter_colours(colourful, AugmentOptions(), rng), colourful, atol=1e-6)
    assert not np.allclose(jitter_colours(colourful, options, rng), colourful, atol=1e-3)


def test_flipping_landmarks_without_a_layout_is_refused(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 4)
    build_from_folder(
        tmp_path / "images",
        str(tmp_path / "s"),
        table=table,
        image_size=16,
        shard_samples=4,
        write=WriteOptions(encoding=Encoding("png"), progress=False),
    )
    data = DataConfig(flip_probability=0.5)
    shards = resolve_shards(data, str(tmp_path / "s"), "train", image_size=16)
    with pytest.raises(ValueError, match="flip permutation"):
        make_pair_loader(data, shards, 16, 2, rank=0, world_size=1, seed=0, with_landmarks=True)


def test_pair_batches_hold_float_images_in_unit_range(synthetic_root):
    data, shards = _shards(synthetic_root, num_workers=0)
    batch = next(
        iter(
            make_pair_loader(
                data,
                shards,
                32,
                6,
                rank=0,
                world_size=1,
                seed=0,
                epoch_samples=6,
                with_landmarks=True,
            )
        )
    )
    assert batch["image_i"].dtype == batch["image_j"].dtype == torch.float32
    assert batch["image_i"].shape == batch["image_j"].shape == (6, 3, 32, 32)
    assert batch["image_i"].min() >= 0 and batch["image_i"].max() <= 1
    assert batch["landmarks_j"].shape == (6, 10, 2)
    assert batch["skipped"].dtype == torch.int64 and batch["skipped"].ndim == 0


def test_the_two_views_of_a_warped_pair_share_one_colour_jitter(synthetic_root):
    strong_jitter = {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2}
    no_warp = {f"warp_{name}": 0.0 for name in ("rotation_deg", "scale_std", "translation_std")}
    data, shards = _shards(
        synthetic_root,
        num_workers=0,
        pairs="warped",
        crop_scale=1.0,
        warp_tps_std=0.0,
        **no_warp,
        **strong_jitter,
    )
    loader = make_pair_loader(data, shards, 32, 8, rank=0, world_size=1, seed=0, epoch_samples=8)
    batch = next(iter(loader))
    # With the identity warp the second view is the first, colours included.
    assert torch.allclose(batch["image_i"], batch["image_j"], atol=1e-5)
    plain_data, _ = _shards(synthetic_root, num_workers=0, pairs="warped", **PLAIN)
    plain = make_pair_loader(
        plain_data, shards, 32, 8, rank=0, world_size=1, seed=0, epoch_samples=8
    )
    assert (next(iter(plain))["image_i"] - batch["image_i"]).abs().mean() > 0.02  # jittered

    # Under a real warp the views agree in colour where they show the same thing: at the
    # landmarks, which move with the pixels.
    data, shards = _shards(synthetic_root, num_workers=0, pairs="warped", **strong_jitter)
    loader = make_pair_loader(
        data, shards, 32, 8, rank=0, world_size=1, seed=0, epoch_samples=8, with_landmarks=True
    )
    batch = next(iter(loader))
    colours = [
        torch.nn.functional.grid_sample(
            batch[f"image_{view}"], batch[f"landmarks_{view}"][:, None], align_corners=False
        )
        for view in "ij"
    ]
    assert (colours[0] - colours[1]).abs().mean() < 0.03
