"""Shards on a real S3 server (moto_server on 127.0.0.1, see tests/conftest.py)."""

import subprocess
import sys

import boto3
import numpy as np
import pytest

from ulm_dist import storage
from ulm_dist.config import DataConfig
from ulm_dist.data import make_annotated_loader, make_pair_loader, read_manifest, resolve_shards
from ulm_dist.data.__main__ import main
from ulm_dist.data.build import WriteOptions, build_from_folder, build_synthetic
from ulm_dist.data.reader import SkipCounter, read_shard
from ulm_dist.storage import S3AccessError, S3Options

pytestmark = pytest.mark.slow  # a real S3 server


def _everything(data, shards, size):
    batches = list(make_annotated_loader(data, shards, size, 7))
    return (
        [key for batch in batches for key in batch["key"]],
        np.concatenate([batch["image"].numpy() for batch in batches]),
        np.concatenate([batch["landmarks"].numpy() for batch in batches]),
        sum(int(batch["skipped"]) for batch in batches),
    )


def test_synthetic_set_round_trips_through_s3(s3_server, s3_bucket, tmp_path):
    dest = f"{s3_bucket}/sets/synthetic"
    code = main(
        [
            "synth",
            dest,
            "--n",
            "20",
            "--size",
            "16",
            "--samples-per-shard",
            "6",
            "--workers",
            "2",
            "--endpoint-url",
            s3_server,
            "--no-progress",
        ]
    )
    assert code == 0
    build_synthetic(
        str(tmp_path),
        split_samples={"train": 20, "val": 64, "test": 64},
        image_size=16,
        shard_samples=6,
        write=WriteOptions(progress=False),
    )
    data = DataConfig(s3_endpoint_url=s3_server, num_workers=2)
    remote = resolve_shards(data, dest, "train", image_size=16)
    local = resolve_shards(data, str(tmp_path), "train", image_size=16)
    assert remote.urls[0].startswith(f"{dest}/train/")
    assert remote.total_samples == local.total_samples == 20
    remote_rows = read_manifest(f"{dest}/train", storage.S3Options(s3_server)).shards
    local_rows = read_manifest(str(tmp_path / "train"), storage.S3Options()).shards
    assert [r.sha256 for r in remote_rows] == [r.sha256 for r in local_rows]
    keys, images, landmarks, skipped = _everything(data, remote, 16)
    local_keys, local_images, local_landmarks, _ = _everything(data, local, 16)
    assert keys == local_keys and len(set(keys)) == 20 and skipped == 0
    assert np.array_equal(images, local_images) and np.array_equal(landmarks, local_landmarks)

    pairs = make_pair_loader(data, remote, 16, 4, rank=0, world_size=1, seed=0, resampled=False)
    assert sorted(k for batch in pairs for k in batch["key_i"]) == sorted(keys)


def test_annotated_folder_built_to_s3_keeps_its_landmarks(
    s3_server, s3_bucket, tmp_path, make_dot_folder
):
    table = make_dot_folder(tmp_path / "images", 10, size=(40, 40))
    write = WriteOptions(s3=S3Options(s3_server), progress=False)
    build_from_folder(
        tmp_path / "images",
        f"{s3_bucket}/dots",
        table=table,
        image_size=40,
        shard_samples=4,
        write=write,
    )
    data = DataConfig(s3_endpoint_url=s3_server, num_workers=0)
    keys, _, landmarks, _ = _everything(
        data, resolve_shards(data, f"{s3_bucket}/dots", "train", image_size=40), 40
    )
    rows = np.genfromtxt(table, delimiter=",", skip_header=1, usecols=(2, 3))
    expected = {f"{'ab'[i % 2]}/img_{i:03d}": rows[i] for i in range(10)}
    for key, points in zip(keys, landmarks, strict=True):
        assert np.allclose((points[0] + 1) * 20, expected[key], atol=1e-4)


def _twelve_val_samples_in_three_shards(s3_server: str, s3_bucket: str) -> None:
    """A synthetic val split of 12 images in shards of 5, 5 and 2 under <bucket>/set."""
    build_synthetic(
        f"{s3_bucket}/set",
        split_samples={"val": 12},
        image_size=16,
        shard_samples=5,
        write=WriteOptions(s3=S3Options(s3_server), progress=False),
    )


def test_missing_object_is_skipped_and_counted(s3_server, s3_bucket):
    _twelve_val_samples_in_three_shards(s3_server, s3_bucket)
    data = DataConfig(s3_endpoint_url=s3_server, num_workers=0)
    shards = resolve_shards(data, f"{s3_bucket}/set", "val", image_size=16)
    bucket, key = storage.split_s3_url(shards.urls[1])
    boto3.client("s3", endpoint_url=s3_server).delete_object(Bucket=bucket, Key=key)
    keys, _, _, skipped = _everything(data, shards, 16)
    assert len(keys) == 7 and skipped == 5


def test_a_shard_pattern_must_match_an_object(s3_server, s3_bucket):
    _twelve_val_samples_in_three_shards(s3_server, s3_bucket)
    data = DataConfig(s3_endpoint_url=s3_server)
    whole = resolve_shards(data, f"{s3_bucket}/set", "val", image_size=16)
    folder = whole.urls[0].rsplit("/", 1)[0]
    # 3 shards of 12 samples; the missing ones would be skipped by the reader.
    partly = resolve_shards(data, f"{folder}/val-{{000000..000009}}.tar", "val", image_size=16)
    assert partly.urls[:3] == whole.urls and len(partly.urls) == 10
    with pytest.raises(FileNotFoundError, match=r"val-\{000010\.\.000019\}\.tar'.*matches no"):
        resolve_shards(data, f"{folder}/val-{{000010..000019}}.tar", "val", image_size=16)


def test_missing_bucket_is_a_clear_error_naming_the_url(s3_server):
    data = DataConfig(s3_endpoint_url=s3_server)
    with pytest.raises(S3AccessError, match=r"s3://no-such-bucket/x.*bucket does not exist"):
        resolve_shards(data, "s3://no-such-bucket/x", "train", image_size=16)
    with pytest.raises(S3AccessError, match=r"s3://no-such-bucket/x/a\.tar"):
        list(
            read_shard(
                "s3://no-such-bucket/x/a.tar",
                3,
                S3Options(s3_server),
                SkipCounter(),
                with_landmarks=False,
            )
        )


def test_unreachable_endpoint_fails_after_bounded_retries(s3_server, unused_tcp_port):
    options = S3Options(endpoint_url=f"http://127.0.0.1:{unused_tcp_port}", max_attempts=2)
    with pytest.raises(S3AccessError, match=r"s3://bucket/key .*cannot reach.*after 2 attempts"):
        storage.read_object("s3://bucket/key", options)


def test_missing_credentials_are_a_clear_error(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    options = S3Options(endpoint_url=s3_server, max_attempts=1)  # a client not cached before
    with pytest.raises(S3AccessError, match=r"s3://bucket/key.*no AWS credentials"):
        storage.read_object("s3://bucket/key", options)


def test_large_files_upload_in_parts(s3_server, s3_bucket, tmp_path):
    payload = np.random.default_rng(0).bytes(11 * 2**20)
    path = tmp_path / "big.tar"
    path.write_bytes(payload)
    url = f"{s3_bucket}/big.tar"
    storage.upload_file(str(path), url, S3Options(s3_server), part_bytes=5 * 2**20)
    bucket, key = storage.split_s3_url(url)
    head = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # S3's ETag of a 3-part multipart upload
    assert storage.read_object(url, S3Options(s3_server)) == payload


LOADS_ONCE_CREDENTIALS_ARRIVE = """
import os, sys
from ulm_dist.config import DataConfig
from ulm_dist.data import make_annotated_loader, resolve_shards

local, remote, endpoint = sys.argv[1:]
data = DataConfig(s3_endpoint_url=endpoint, num_workers=1)
names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
credentials = {name: os.environ.pop(name) for name in names}
# A first loader starts its workers while there are no credentials...
list(make_annotated_loader(data, resolve_shards(data, local, "train", image_size=16), 16, 8))
# ... which arrive before the second one starts.
os.environ.update(credentials)
shards = resolve_shards(data, remote, "train", image_size=16)
print("read", sum(len(batch["key"]) for batch in make_annotated_loader(data, shards, 16, 8)))
"""


def test_loader_workers_read_with_the_credentials_set_when_the_loader_starts(
    s3_server, s3_bucket, tmp_path
):
    """Loader workers start from a fork server, which holds the environment of its own start:
    they must still see what the process has set since (here, the S3 credentials)."""
    remote = f"{s3_bucket}/sets/later"
    for dest, endpoint in ((str(tmp_path), []), (remote, ["--endpoint-url", s3_server])):
        argv = ["synth", dest, "--n", "8", "--size", "16", "--workers", "1", "--no-progress"]
        assert main([*argv, *endpoint]) == 0
    result = subprocess.run(
        [sys.executable, "-c", LOADS_ONCE_CREDENTIALS_ARRIVE, str(tmp_path), remote, s3_server],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["read", "8"]
