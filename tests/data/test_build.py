import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import pytest
from shard_contents import LOSSLESS

from ulm_dist.config import DataConfig
from ulm_dist.data import (
    ensure_synthetic_dataset,
    make_annotated_loader,
    prepare_shards,
    read_manifest,
    resolve_shards,
)
from ulm_dist.data.__main__ import main
from ulm_dist.data.build import WriteOptions, build_from_folder, build_synthetic
from ulm_dist.data.image_folder import read_landmark_table
from ulm_dist.storage import S3Options

LOCAL = S3Options()


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_folder_build_keeps_landmarks_on_the_dot_through_crop_and_resize(tmp_path, make_dot_folder):
    # 48x40 images: the builder crops the centred 40x40 square and resizes it to 20x20.
    table = make_dot_folder(tmp_path / "images", 12)
    build_from_folder(
        tmp_path / "images",
        str(tmp_path / "shards"),
        table=table,
        image_size=20,
        shard_samples=5,
        write=LOSSLESS,
    )
    data = DataConfig(num_workers=0)
    shards = resolve_shards(data, str(tmp_path / "shards"), "train", image_size=20)
    assert shards.total_samples == 12 and len(shards.urls) == 3
    batches = list(make_annotated_loader(data, shards, 20, 5))
    images = np.concatenate([b["image"].numpy() for b in batches])
    landmarks = np.concatenate([b["landmarks"].numpy() for b in batches])
    brightness = images.sum(axis=1).reshape(12, -1)
    row, column = np.unravel_index(brightness.argmax(axis=1), (20, 20))
    pixels = (landmarks[:, 0] + 1) * 20 / 2  # back from [-1, 1] to pixels
    assert np.abs(pixels[:, 0] - (column + 0.5)).max() <= 0.5
    assert np.abs(pixels[:, 1] - (row + 0.5)).max() <= 0.5


def test_split_by_identity_is_disjoint_and_keeps_metadata(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 30)  # 10 identities, 3 images each
    manifests = build_from_folder(
        tmp_path / "images",
        str(tmp_path / "shards"),
        table=table,
        image_size=16,
        shard_samples=4,
        fractions={"test": 0.2},
        group_by="identity",
        seed=3,
        write=LOSSLESS,
    )
    assert set(manifests) == {"train", "test"}
    assert manifests["test"].samples == 6 and manifests["train"].samples == 24
    identities = {}
    for split, manifest in manifests.items():
        assert manifest.summary.metadata_fields == ("identity",)
        found = set()
        for shard in manifest.shards:
            for name, data in _tar_members(shard.url).items():
                if name.endswith(".json"):
                    found.add(json.loads(data)["identity"])
        identities[split] = found
    assert len(identities["test"]) == 2 and not identities["test"] & identities["train"]


def test_manifest_rows_match_the_shards(tmp_path):
    manifests = build_synthetic(
        str(tmp_path),
        split_samples={"train": 20, "test": 10},
        image_size=16,
        shard_samples=6,
        write=WriteOptions(progress=False),
    )
    manifest = read_manifest(str(tmp_path / "train"), LOCAL)
    assert manifest == manifests["train"]
    assert [s.samples for s in manifest.shards] == [6, 6, 6, 2]
    for shard in manifest.shards:
        with open(shard.url, "rb") as stream:
            data = stream.read()
        assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        images = [n for n in _tar_members(shard.url) if n.endswith(".jpg")]
        assert len(images) == shard.samples
    summary = manifest.summary
    assert (summary.split, summary.image_size, summary.num_landmarks) == ("train", 16, 10)
    assert summary.layout.eye_left == (0,) and summary.layout.eye_right == (1,)


def test_synthetic_build_is_reproducible_for_any_worker_count(tmp_path):
    sizes = {"train": 24}
    one = build_synthetic(
        str(tmp_path / "a"),
        split_samples=sizes,
        image_size=16,
        shard_samples=8,
        write=WriteOptions(progress=False, workers=1),
    )
    two = build_synthetic(
        str(tmp_path / "b"),
        split_samples=sizes,
        image_size=16,
        shard_samples=8,
        write=WriteOptions(progress=False, workers=2),
    )
    assert [s.sha256 for s in one["train"].shards] == [s.sha256 for s in two["train"].shards]


def test_shard_size_in_bytes_sets_samples_per_shard(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 24)
    manifests = build_from_folder(
        tmp_path / "images",
        str(tmp_path / "shards"),
        table=table,
        image_size=32,
        shard_bytes=8 * 1024,
        write=WriteOptions(progress=False),
    )
    shards = manifests["train"].shards
    assert len(shards) > 1
    assert all(shard.bytes <= 1.5 * 8 * 1024 for shard in shards)


def test_landmark_tables_in_csv_and_parquet_read_alike(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path, 6)
    parquet = tmp_path / "landmarks.parquet"
    pyarrow.parquet.write_table(pyarrow.csv.read_csv(table), parquet)
    from_csv, from_parquet = read_landmark_table(table), read_landmark_table(parquet)
    assert from_csv.images == from_parquet.images
    assert np.array_equal(from_csv.landmarks, from_parquet.landmarks)
    assert from_csv.landmarks.shape == (6, 1, 2) and list(from_csv.metadata) == ["identity"]


def test_landmark_table_with_unpaired_coordinates_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    pyarrow.csv.write_csv(
        pa.table({"image": ["a.png"], "x0": [1.0], "y0": [2.0], "x1": [3.0]}), path
    )
    with pytest.raises(ValueError, match=r"landmarks \['1'\] have an x or a y column"):
        read_landmark_table(path)


def test_cli_build_and_info(tmp_path, make_dot_folder, capsys):
    table = make_dot_folder(tmp_path / "images", 12)
    dest = tmp_path / "out"
    code = main(
        [
            "build",
            str(tmp_path / "images"),
            str(dest),
            "--landmarks",
            str(table),
            "--size",
            "16",
            "--samples-per-shard",
            "5",
            "--split-by",
            "identity",
            "--test-fraction",
            "0.25",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    assert read_manifest(str(dest / "test"), LOCAL).samples == 3
    assert main(["info", str(dest / "train")]) == 0
    assert "split train, 9 samples in 2 shards" in capsys.readouterr().out


def test_ensure_synthetic_dataset_builds_once(tmp_path):
    folder = ensure_synthetic_dataset(tmp_path, num_samples=16, image_size=16, seed=1)
    manifest = read_manifest(str(folder / "train"), LOCAL)
    assert manifest.samples == 16
    assert read_manifest(str(folder / "val"), LOCAL).samples == 64
    stamp = (folder / "train" / "manifest.parquet").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, num_samples=16, image_size=16, seed=1) == folder
    assert (folder / "train" / "manifest.parquet").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_resolve_synthetic_spec_and_shard_patterns(tmp_path):
    data = DataConfig(cache_dir=str(tmp_path / "cache"), synthetic_samples=16)
    synthetic = prepare_shards(data, "synthetic", "val", image_size=16)
    assert synthetic.summary.split == "val" and synthetic.total_samples == 64
    folder = synthetic.urls[0].rsplit("/", 1)[0]
    pattern = resolve_shards(data, f"{folder}/val-{{000000..000001}}.tar", "train", image_size=16)
    assert pattern.urls == synthetic.urls[:2]
    assert pattern.total_samples == sum(synthetic.sample_counts[u] for u in synthetic.urls[:2])
    with pytest.raises(FileNotFoundError, match="found neither"):
        resolve_shards(data, str(tmp_path / "nothing"), "train", image_size=16)
    # Shards that are missing are skipped by the reader, but a pattern must match one.
    partly = resolve_shards(data, f"{folder}/val-{{000000..000099}}.tar", "train", image_size=16)
    assert len(partly.urls) == 100
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_shards(data, f"{folder}/train-{{000000..000001}}.tar", "train", image_size=16)


def test_sample_keys_name_the_source_images(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 4)
    manifests = build_from_folder(
        tmp_path / "images",
        str(tmp_path / "s"),
        table=table,
        image_size=16,
        shard_samples=10,
        write=LOSSLESS,
    )
    names = sorted(_tar_members(manifests["train"].shards[0].url))
    assert "a/img_000.png" in names and "a/img_000.landmarks.npy" in names
    landmarks = np.load(
        io.BytesIO(_tar_members(manifests["train"].shards[0].url)["a/img_000.landmarks.npy"])
    )
    assert landmarks.shape == (1, 2) and landmarks.dtype == np.float32
