"""Building MAFL 5-point shards from the real faces68-dev crops (skipped where absent)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv
import pytest

from ulm_dist.data import read_manifest
from ulm_dist.data.__main__ import main
from ulm_dist.data.build import build_from_folder
from ulm_dist.data.layouts import LANDMARK_REDUCTIONS, MAFL5, ibug68_to_mafl5
from ulm_dist.storage import S3Options

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces68-dev"
IDENTITIES = 40
SIZE = 32  # the crops are 128 px: landmarks scale by a quarter


@pytest.fixture
def faces_subset(tmp_path) -> Path:
    """The landmarks table of the first IDENTITIES people (about 400 images), for speed."""
    if not (FACES / "landmarks.csv").is_file():
        pytest.skip(f"real faces not found at {FACES.resolve()} (a checkout without ../shared)")
    table = pyarrow.csv.read_csv(FACES / "landmarks.csv")
    people = sorted(set(table.column("identity").to_pylist()))[:IDENTITIES]
    subset = table.filter(pc.is_in(table.column("identity"), pyarrow.array(people)))
    path = tmp_path / "landmarks.csv"
    pyarrow.csv.write_csv(subset, path)
    return path


def _shard_samples(manifest) -> dict[str, tuple[str, np.ndarray]]:
    """key -> (identity, landmarks in pixels) over all shards of a split."""
    found: dict[str, dict] = {}
    for shard in manifest.shards:
        with tarfile.open(shard.url) as tar:
            for member in tar.getmembers():
                key, _, kind = member.name.partition(".")
                data = tar.extractfile(member).read()
                if kind == "json":
                    found.setdefault(key, {})["identity"] = json.loads(data)["identity"]
                elif kind == "landmarks.npy":
                    found.setdefault(key, {})["points"] = np.load(io.BytesIO(data))
    return {key: (sample["identity"], sample["points"]) for key, sample in found.items()}


def test_mafl5_build_of_real_faces_splits_by_person_and_keeps_5_points(tmp_path, faces_subset):
    dest = tmp_path / "shards"
    argv = ["build", str(FACES / "img"), str(dest), "--landmarks", str(faces_subset)]
    argv += ["--reduce-landmarks", "mafl5", "--split-by", "identity", "--test-fraction", "0.25"]
    argv += ["--size", str(SIZE), "--samples-per-shard", "100", "--workers", "1", "--no-progress"]
    assert main(argv) == 0

    table = pyarrow.csv.read_csv(faces_subset).to_pylist()
    ibug = {row["file"].removesuffix(".jpg"): row for row in table}
    identities = {}
    for split in ("train", "test"):
        manifest = read_manifest(str(dest / split), S3Options())
        summary = manifest.summary
        assert summary.num_landmarks == 5 and summary.layout == MAFL5
        assert summary.landmark_names == LANDMARK_REDUCTIONS["mafl5"].names
        samples = _shard_samples(manifest)
        assert len(samples) == manifest.samples
        identities[split] = {identity for identity, _ in samples.values()}
        for key, (_, points) in list(samples.items())[:20]:
            row = ibug[key]
            full = np.array([[row[f"x{i}"], row[f"y{i}"]] for i in range(68)], np.float32)
            np.testing.assert_allclose(points, ibug68_to_mafl5(full) * SIZE / 128, atol=1e-4)
    assert len(identities["test"]) == IDENTITIES // 4
    assert len(identities["train"]) == IDENTITIES - IDENTITIES // 4
    assert not identities["train"] & identities["test"]


def test_reduction_refuses_a_table_without_68_points(tmp_path, make_dot_folder):
    table = make_dot_folder(tmp_path / "images", 6)  # one landmark per image
    with pytest.raises(ValueError, match="needs a table with 68 landmarks, got 1"):
        build_from_folder(
            tmp_path / "images",
            str(tmp_path / "shards"),
            table=table,
            image_size=16,
            shard_samples=4,
            reduction=LANDMARK_REDUCTIONS["mafl5"],
        )
