import io
import logging
import os
import tarfile

import pytest

from ulm_dist.config import DataConfig
from ulm_dist.data import make_annotated_loader, make_pair_loader, resolve_shards
from ulm_dist.data.build import WriteOptions, build_synthetic

SHARD_SAMPLES = 8


@pytest.fixture
def shards(tmp_path):
    """A fresh 24-sample set in 3 shards, which each test then damages."""
    build_synthetic(
        str(tmp_path),
        split_samples={"val": 24},
        image_size=16,
        shard_samples=SHARD_SAMPLES,
        write=WriteOptions(progress=False),
    )
    return resolve_shards(DataConfig(), str(tmp_path), "val", image_size=16)


def _read_all(shards, num_workers=0):
    data = DataConfig(num_workers=num_workers)
    batches = list(make_annotated_loader(data, shards, 16, 5))
    keys = [key for batch in batches for key in batch["key"]]
    return keys, sum(int(batch["skipped"]) for batch in batches)


def _replace_member(url: str, suffix: str, data: bytes) -> str:
    """Rewrites the first member ending in `suffix` with `data`; returns its sample key."""
    with tarfile.open(url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(url, "w") as tar:
        for member, content in members:
            content = data if member.name == target else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    return target.split(".")[0]


def test_corrupt_image_is_skipped_counted_and_logged(shards, caplog):
    key = _replace_member(shards.urls[1], ".jpg", b"this is not a jpeg")
    with caplog.at_level(logging.WARNING, logger="ulm_dist.data"):
        keys, skipped = _read_all(shards)
    assert len(keys) == 23 and key not in keys and skipped == 1
    assert key in caplog.text and shards.urls[1] in caplog.text


def test_malformed_landmarks_are_skipped(shards):
    _replace_member(shards.urls[0], ".landmarks.npy", b"\x93NUMPY garbage")
    keys, skipped = _read_all(shards)
    assert len(keys) == 23 and skipped == 1


def test_truncated_shard_counts_the_samples_it_lost(shards, caplog):
    size = os.path.getsize(shards.urls[2])
    with open(shards.urls[2], "r+b") as stream:
        stream.truncate(int(size * 0.45))
    with caplog.at_level(logging.WARNING, logger="ulm_dist.data"):
        keys, skipped = _read_all(shards)
    assert 16 <= len(keys) < 24 and len(keys) + skipped == 24
    assert shards.urls[2] in caplog.text


def test_missing_shard_counts_its_manifest_samples(shards):
    os.unlink(shards.urls[0])
    keys, skipped = _read_all(shards)
    assert len(keys) == 16 and skipped == SHARD_SAMPLES


def test_counts_survive_loader_worker_processes(shards):
    _replace_member(shards.urls[0], ".jpg", b"garbage")
    os.unlink(shards.urls[2])
    data = DataConfig(num_workers=2)
    loader = make_pair_loader(data, shards, 16, 4, rank=0, world_size=1, seed=0, resampled=False)
    batches = list(loader)
    pairs = sum(len(batch["key_i"]) for batch in batches)
    assert pairs == 24 - 1 - SHARD_SAMPLES
    assert sum(int(batch["skipped"]) for batch in batches) == 1 + SHARD_SAMPLES


def test_endless_stream_over_unreadable_shards_fails_clearly(shards):
    for url in shards.urls:
        os.unlink(url)
    data = DataConfig(num_workers=0)
    loader = make_pair_loader(data, shards, 16, 4, rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match="shards in a row held no readable sample"):
        next(iter(loader))
