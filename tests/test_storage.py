import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
import ray.train
from ray.train.v2._internal.execution.storage import StorageContext
from s3_server import local_s3_server_process

from ulm_dist.storage import S3AccessError, S3Options, StorageError, read_object
from ulm_dist.train.checkpoint import MARKER_NAME, CheckpointStore, local_copy

# Port 1 (tcpmux) has no listener on any machine these tests run on: connections are refused.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:1"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "runs"), "run")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return CheckpointStore(f"{bucket}/runs", "run", S3Options(endpoint))


def write_checkpoint(store: CheckpointStore, step: int, mark: bool = True) -> str:
    """A checkpoint folder as the workers would upload it, marked complete or not."""
    path = f"{store.run_path}/{store.checkpoint_dir_name(step)}"
    store.filesystem.create_dir(f"{path}/engine", recursive=True)
    for name, payload in {"engine/weights.pt": b"w" * step, "train_state.json": b"{}"}.items():
        with store.filesystem.open_output_stream(f"{path}/{name}") as stream:
            stream.write(payload)
    if mark:
        store.mark_complete(path, step, world_size=2)
    return path


def test_lists_marked_checkpoints_by_step_with_their_info(store):
    store.check_writable()
    for step in (20, 5, 10):
        write_checkpoint(store, step)
    assert [checkpoint.step for checkpoint in store.checkpoints()] == [5, 10, 20]
    latest = store.latest()
    assert latest.step == 20 and latest.info == {"world_size": 2}
    assert latest.path == f"{store.run_path}/checkpoint_00000020"
    assert store.open_checkpoint(store.uri(latest.path)) == latest


def test_a_half_written_checkpoint_is_never_the_latest(store):
    write_checkpoint(store, 1)
    write_checkpoint(store, 2, mark=False)  # upload still running: no marker yet
    assert store.latest().step == 1
    assert store.has_checkpoint_folders()


def test_a_checkpoint_missing_a_listed_file_or_with_a_torn_marker_is_ignored(store):
    write_checkpoint(store, 1)
    pruned = write_checkpoint(store, 2)
    store.filesystem.delete_file(f"{pruned}/engine/weights.pt")  # deletion interrupted
    torn = write_checkpoint(store, 3)
    with store.filesystem.open_output_stream(f"{torn}/{MARKER_NAME}") as stream:
        stream.write(b'{"step": 3, "fil')
    assert [checkpoint.step for checkpoint in store.checkpoints()] == [1]
    with pytest.raises(StorageError, match="not a complete checkpoint"):
        store.open_checkpoint(store.uri(pruned))


def test_the_marker_lists_every_file_with_its_size(store):
    path = write_checkpoint(store, 7)
    with store.filesystem.open_input_stream(f"{path}/{MARKER_NAME}") as stream:
        marker = json.loads(stream.read())
    assert marker["files"] == {"engine/weights.pt": 7, "train_state.json": 2}


def test_an_empty_run_has_no_checkpoints(store):
    assert store.checkpoints() == [] and store.latest() is None
    assert not store.has_checkpoint_folders()


def test_download_copies_the_checkpoint_folder(store, tmp_path):
    write_checkpoint(store, 4)
    local = store.download(store.latest(), tmp_path / "copy")
    assert (local / "engine" / "weights.pt").read_bytes() == b"wwww"


def test_small_files_go_into_the_run_folder(store):
    uri = store.write_text("config.yaml", "train: {}\n")
    assert uri.endswith("/run/config.yaml") and store.exists("config.yaml")
    assert not store.exists("other.yaml")


def test_unwritable_local_storage_is_refused_with_the_reason(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=r"train.storage: cannot write to .*a_file/runs/run"):
        CheckpointStore(str(blocker / "runs"), "run").check_writable()


@pytest.mark.usefixtures("s3_server")
def test_unreachable_s3_endpoint_is_refused_quickly():
    # Two attempts: the default five spend 15 s in back-off here.
    store = CheckpointStore(
        "s3://bucket/runs", "run", S3Options(UNREACHABLE_ENDPOINT, max_attempts=2)
    )
    with pytest.raises(StorageError, match=r"cannot write to s3://bucket/runs/run: .*connect"):
        store.check_writable()


def test_missing_bucket_is_refused(s3_server):
    store = CheckpointStore("s3://no-such-bucket/runs", "run", S3Options(s3_server))
    with pytest.raises(StorageError, match="check the path or that the bucket exists"):
        store.check_writable()


def test_other_schemes_are_refused():
    with pytest.raises(StorageError, match=r"gs://b/p: expected a local folder or s3://"):
        CheckpointStore("gs://b/p", "run")


def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = CheckpointStore("runs", "demo")
    assert isinstance(store.filesystem, pafs.LocalFileSystem)
    assert store.run_path == str(tmp_path / "runs" / "demo")


def test_a_local_copy_holds_the_checkpoint_and_a_downloaded_one_is_deleted_afterwards(store):
    path = write_checkpoint(store, step=7)
    with local_copy(store.uri(path), store.s3) as (folder, checkpoint):
        assert checkpoint.step == 7
        assert (folder / "engine" / "weights.pt").read_bytes() == b"w" * 7
        copied = folder
    is_local = isinstance(store.filesystem, pafs.LocalFileSystem)
    assert copied.exists() == is_local  # never delete the user's own folder


def test_incomplete_checkpoints_are_listed_with_the_reason(store):
    write_checkpoint(store, 1)
    write_checkpoint(store, 2, mark=False)
    cut = write_checkpoint(store, 3)
    store.filesystem.delete_file(f"{cut}/engine/weights.pt")
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [1]
    reasons = {checkpoint.step: checkpoint.reason for checkpoint in run.incomplete}
    assert reasons == {
        2: f"no {MARKER_NAME}",
        3: "engine/weights.pt missing or of another size than its marker says",
    }
    with pytest.raises(StorageError, match=r"not a complete checkpoint \(no checkpoint_complete"):
        store.open_checkpoint(store.uri(f"{store.run_path}/checkpoint_00000002"))


def test_pruning_keeps_the_newest_complete_and_never_counts_incomplete_ones(store):
    for step in (1, 3, 4):
        write_checkpoint(store, step)
    write_checkpoint(store, 2, mark=False)  # abandoned before the newest complete one
    write_checkpoint(store, 5, mark=False)  # maybe being uploaded right now
    deleted = store.prune(keep=2)
    assert deleted == ["checkpoint_00000001", "checkpoint_00000002"]
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [3, 4]
    assert [checkpoint.step for checkpoint in run.incomplete] == [5]


def test_pruning_a_run_with_no_complete_checkpoint_deletes_nothing(store):
    write_checkpoint(store, 2, mark=False)
    assert store.prune(keep=1) == []
    assert store.has_checkpoint_folders()


@pytest.fixture
def outage_store(s3_server, tmp_path) -> Iterator[tuple[CheckpointStore, subprocess.Popen]]:
    """A store on an S3 server of its own (the test stops or kills it), holding checkpoint 2;
    2 attempts of at most 1 s each."""
    with local_s3_server_process(tmp_path / "moto.log") as (endpoint, server):
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="outage")
        store = CheckpointStore(
            "s3://outage/runs", "run", S3Options(endpoint, max_attempts=2, read_timeout_s=1)
        )
        write_checkpoint(store, 2)
        yield store, server


@pytest.mark.faults
def test_a_hung_s3_server_fails_a_listing_within_the_attempts_naming_the_store(outage_store):
    store, server = outage_store
    server.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        store.latest()
    assert time.monotonic() - started < 10  # 2 attempts of 1 s, and the backoff between
    message = str(raised.value)
    assert message.startswith("listing the checkpoints in s3://outage/runs/run failed: ")
    assert "failed 2 attempts of at most 1 s each (data.s3_max_attempts)" in message
    assert f"endpoint {store.s3.endpoint_url}" in message
    assert "run the same command again" in message


@pytest.mark.faults
def test_a_killed_s3_server_fails_marking_a_checkpoint_naming_the_operation(outage_store):
    store, server = outage_store
    server.kill()
    server.wait()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^marking checkpoint_00000002 complete in s3://"):
        store.mark_complete(f"{store.run_path}/checkpoint_00000002", 2)
    assert time.monotonic() - started < 10


def test_store_errors_keep_credentials_in_the_endpoint_out_of_the_message():
    store = CheckpointStore(
        "s3://bucket/runs", "run", S3Options("http://KEY:PLANTED_SECRET@127.0.0.1:1")
    )
    with pytest.raises(StorageError) as raised, store.named_errors("listing the checkpoints"):
        raise OSError("curl: could not reach http://KEY:PLANTED_SECRET@127.0.0.1:1")
    assert "PLANTED_SECRET" not in str(raised.value)
    assert "endpoint http://***@127.0.0.1:1" in str(raised.value)


def test_s3_client_errors_keep_credentials_in_the_endpoint_out_of_the_message(
    monkeypatch, unused_tcp_port
):
    # The message, not only its printout: a sweep keeps a failed trial's error in its table.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://KEY:PLANTED_SECRET@127.0.0.1:{unused_tcp_port}"
    with pytest.raises(S3AccessError) as raised:
        read_object("s3://bucket/shard.tar", S3Options(endpoint, max_attempts=1))
    assert f"(endpoint http://***@127.0.0.1:{unused_tcp_port}): cannot reach" in str(raised.value)
    assert "PLANTED_SECRET" not in str(raised.value)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted on a folder of `tmp_path`, unmounted afterwards; skips where
    mounting is not permitted (it needs root)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    try:
        mounted = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({error}); it needs root")
    if mounted.returncode != 0:
        reason = mounted.stderr.strip() or f"exit {mounted.returncode}"
        pytest.skip(f"cannot mount a small tmpfs to fill up ({reason}); it needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


@pytest.mark.faults
def test_a_checkpoint_that_does_not_fit_on_the_disk_fails_naming_free_space(small_disk, tmp_path):
    store = CheckpointStore(str(small_disk / "runs"), "run")
    store.check_writable()
    write_checkpoint(store, 1)
    # A worker's part of checkpoint 2, written locally and uploaded into the store as
    # loop.save_checkpoint has Ray do it within report(): Ray Train's storage context, on the
    # store's filesystem, under the same named_errors.
    part = tmp_path / "worker_part"
    (part / "engine").mkdir(parents=True)
    (part / "engine" / "weights.pt").write_bytes(b"w" * (2 << 20))  # twice the disk
    (part / "train_state.json").write_text("{}")
    ray_storage = StorageContext(store.root, "run", storage_filesystem=store.filesystem)
    name = store.checkpoint_dir_name(2)
    with pytest.raises(StorageError) as raised, store.named_errors(f"saving {name}"):
        ray_storage.persist_current_checkpoint(ray.train.Checkpoint.from_directory(part), name)
    message = str(raised.value)
    assert message.startswith(f"saving {name} in {store.run_path} failed: ")
    assert f"no space left on the device holding {store.run_path}" in message
    assert "free space there or point train.storage elsewhere" in message
    assert "run the same command again" in message
    # The earlier checkpoint is untouched and still where the run stands; the half-written one
    # has no marker and does not count.
    assert store.latest().step == 1
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [1]
    assert {checkpoint.step: checkpoint.reason for checkpoint in run.incomplete} == {
        2: f"no {MARKER_NAME}"
    }
