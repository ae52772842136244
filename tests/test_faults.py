"""Faults injected for real into short training runs (real Ray, real DeepSpeed): a checkpoint
missing its marker or one rank's file, Ctrl-C on the driver, and the S3 endpoint killed in
the middle of a run. The first three work on a copy of one finished 4-step run, so the
module trains that run once; it is the part-based learner's (Lorenz et al.) run through the
driver, so that its resumption is tested too (tests/train/test_train.py trains imm, and the
cycle model everywhere else). (A worker killed with SIGKILL: tests/train/test_train.py.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import ray
from s3_server import free_port

from ulm_dist.config import load_config
from ulm_dist.storage import S3Options, StorageError
from ulm_dist.train.checkpoint import MARKER_NAME, CheckpointStore, StoredCheckpoint
from ulm_dist.train.driver import (
    INTERRUPTED_EXIT_CODE,
    RunReporter,
    main,
    named_controller_error,
    named_worker_error,
)
from ulm_dist.train.metrics_log import METRICS_NAME, MetricsLog

pytestmark = [pytest.mark.slow, pytest.mark.faults]

BASE_RUN = "finished"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def run_args(common_args: list[str], storage: Path) -> list[str]:
    """A run checkpointing every 2 steps, keeping 2, with no periodic evaluation."""
    return [
        *common_args,
        f"train.storage={storage}",
        "data.val=null",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
    ]


@pytest.fixture(scope="module")
def finished_run(run_args: list[str]) -> list[str]:
    """Trains BASE_RUN, the part learner, to step 4 (checkpoints 2 and 4) once for the
    module; returns the arguments that continue it."""
    part = [*run_args, "model.name=part", "data.pairs=warped"]
    assert main([*part, f"train.run_name={BASE_RUN}", "train.steps=4"]) == 0
    return part


def copy_of_finished_run(storage: Path, log_dir: Path, name: str) -> CheckpointStore:
    """The finished run's checkpoints and metrics under another run name."""
    shutil.copytree(storage / BASE_RUN, storage / name)
    shutil.copytree(log_dir / BASE_RUN, log_dir / name)
    return CheckpointStore(str(storage), name)


def logged_steps(log_dir: Path, name: str) -> list[int]:
    return [record["step"] for record in MetricsLog(log_dir / name).records]


def test_a_checkpoint_missing_its_marker_is_passed_over(finished_run, storage, log_dir, capsys):
    store = copy_of_finished_run(storage, log_dir, "no_marker")
    newest = Path(store.run_path) / "checkpoint_00000004"
    (newest / MARKER_NAME).unlink()

    assert main([*finished_run, "train.run_name=no_marker", "train.steps=6"]) == 0

    output = capsys.readouterr().out
    assert f"skipping {newest}: incomplete (no {MARKER_NAME})" in output
    assert f"resuming from {store.run_path}/checkpoint_00000002 (step 2)" in output
    assert "the reports from step 4 on replace those of the failed attempt" in output
    assert logged_steps(log_dir, "no_marker") == [2, 4, 6]  # step 4 once, retrained
    # Checkpoint 2 stayed until 4 was complete again; no incomplete one was kept or counted.
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [4, 6] and run.incomplete == []
    assert f"checkpoint: {store.run_path}/checkpoint_00000006" in output


def test_a_checkpoint_missing_one_ranks_file_is_passed_over_by_a_rerun(
    finished_run, storage, log_dir, capsys
):
    store = copy_of_finished_run(storage, log_dir, "no_rng")
    (Path(store.run_path) / "checkpoint_00000004" / "rng" / "rank_00001.pt").unlink()

    # The same step count: step 4 is trained again, and the run ends at a complete step 4.
    assert main([*finished_run, "train.run_name=no_rng", "train.steps=4"]) == 0

    output = capsys.readouterr().out
    assert "incomplete (rng/rank_00001.pt missing" in output
    assert f"resuming from {store.run_path}/checkpoint_00000002 (step 2)" in output
    assert logged_steps(log_dir, "no_rng") == [2, 4]
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [2, 4] and run.incomplete == []
    assert f"checkpoint: {store.run_path}/checkpoint_00000004" in output


def test_ctrl_c_stops_the_workers_and_names_the_last_complete_checkpoint(
    finished_run, storage, log_dir
):
    store = copy_of_finished_run(storage, log_dir, "ctrl_c")
    command = [sys.executable, "-m", "ulm_dist.train", *finished_run]
    driver = subprocess.Popen(
        [*command, "train.run_name=ctrl_c", "train.steps=1000"],
        cwd=REPO,
        # The driver joins this module's cluster, as under `ray job submit`.
        env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: store.latest() is not None and store.latest().step > 4, driver)
        driver.send_signal(signal.SIGINT)
        # Stopping waits for Ray to tear the workers down, which took over 60 s once when a
        # full test run loaded both cores; the test is about what it says, not how fast.
        _, errors = driver.communicate(timeout=180)
    finally:
        driver.kill()

    assert driver.returncode == INTERRUPTED_EXIT_CODE, errors
    assert "interrupted (Ctrl-C): stopping the workers" in errors
    latest = store.latest()
    assert f"last complete checkpoint: {latest.path} (step {latest.step})" in errors
    # The workers are gone: nothing more is written.
    folders = sorted(os.listdir(store.run_path))
    time.sleep(3)
    assert sorted(os.listdir(store.run_path)) == folders
    assert store.open_checkpoint(latest.path) == latest


def wait_for(condition, driver: subprocess.Popen, timeout_s: float = 300) -> None:
    """Poll `condition` until it holds; fail if the driver exits or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if driver.poll() is not None:
            pytest.fail(f"the driver exited with {driver.returncode}: {driver.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"nothing happened within {timeout_s} s")
        time.sleep(0.5)


# The S3 endpoint of the outage test: a TCP relay to the test S3 server, in a process of its
# own. Killing it with SIGKILL is, for the run's clients, an S3 server killed (connections
# refused, open ones reset), while the server behind it keeps the bucket for the test to
# inspect and for the run to continue from once the relay is started again.
RELAY = """
import socket, sys, threading

def pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    client, _ = listener.accept()
    server = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    for source, sink in ((client, server), (server, client)):
        threading.Thread(target=pipe, args=(source, sink), daemon=True).start()
"""


class S3Relay:
    """An endpoint URL for the test S3 server that the test can kill and start again."""

    def __init__(self, server_endpoint: str):
        self.server_port = urlsplit(server_endpoint).port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        command = [sys.executable, "-c", RELAY, str(self.port), str(self.server_port)]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"the S3 relay did not listen on {self.url}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """`kill -9` of the endpoint's process."""
        self.process.kill()
        self.process.wait()


@pytest.fixture
def s3_relay(s3_server: str) -> Iterator[S3Relay]:
    relay = S3Relay(s3_server)
    relay.start()
    try:
        yield relay
    finally:
        relay.kill()


def test_an_s3_endpoint_killed_mid_run_fails_it_naming_the_store_and_keeps_the_checkpoints(
    run_args, s3_relay, s3_server, s3_bucket, log_dir, capsys
):
    name = "s3_outage"
    command = [
        *run_args,
        f"train.storage={s3_bucket}/runs",
        f"data.s3_endpoint_url={s3_relay.url}",
        "data.s3_max_attempts=2",
        "train.max_failures=0",  # a restart would fail the same way, and take longer
        f"train.run_name={name}",
    ]
    # The run's store as seen on the server itself, which the outage does not touch.
    store = CheckpointStore(f"{s3_bucket}/runs", name, S3Options(s3_server))
    before: dict[str, object] = {}

    def kill_the_endpoint_after_the_first_checkpoint() -> None:
        metrics = log_dir / name / METRICS_NAME
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            if time.monotonic() > deadline or before.get("run ended"):
                return
            time.sleep(0.1)
        before["latest"] = store.latest()
        before["marker"] = read_marker(store, before["latest"])
        s3_relay.kill()
        before["killed at"] = time.monotonic()

    killer = threading.Thread(target=kill_the_endpoint_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        code = main([*command, "train.steps=100"])
        ended = time.monotonic()
    finally:
        before["run ended"] = True
        killer.join()
    assert "killed at" in before, "the run ended before its first checkpoint was complete"
    errors = capsys.readouterr().err

    # The run failed, within bounds, saying which store failed doing what and what to do.
    # Refused connections fail each request at once: a few seconds are Ray Train stopping the
    # workers; the bound is generous for a loaded machine.
    assert code == 1, errors
    assert ended - before["killed at"] < 120
    run_uri = store.uri(store.run_path)
    assert "ulm_dist.train: training failed: " in errors
    operations = (
        r"saving checkpoint_\d+|marking checkpoint_\d+ complete|listing the checkpoints|"
        r"Ray Train's controller writing its list of checkpoints"
    )
    assert re.search(rf"({operations}) in {run_uri} failed: ", errors), errors
    assert f"the S3 store (endpoint {s3_relay.url}) failed 2 attempts" in errors
    assert "run the same command again" in errors and "AssertionError" not in errors

    # The checkpoint complete before the outage is still complete and unchanged; the newest
    # complete one (it, or one marked in the moment before the kill) is the latest.
    seen = before["latest"]
    assert store.open_checkpoint(store.uri(seen.path)) == seen
    assert read_marker(store, seen) == before["marker"]
    latest = store.latest()
    assert latest.step in (seen.step, seen.step + 2)
    assert all(folder.step > latest.step for folder in store.scan().incomplete)
    # Every report is a checkpoint's, logged once that checkpoint is complete: each step up
    # to the latest complete checkpoint once, none after it.
    assert logged_steps(log_dir, name) == list(range(2, latest.step + 1, 2))
    marker_at_outage = read_marker(store, latest)

    # The endpoint back, the same command continues from that checkpoint.
    s3_relay.start()
    assert main([*command, f"train.steps={latest.step + 2}"]) == 0
    output = capsys.readouterr().out
    assert f"resuming from {store.uri(latest.path)} (step {latest.step})" in output
    assert logged_steps(log_dir, name) == list(range(2, latest.step + 3, 2))
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [latest.step, latest.step + 2]
    assert run.incomplete == []
    assert read_marker(store, latest) == marker_at_outage


def read_marker(store: CheckpointStore, checkpoint: StoredCheckpoint) -> bytes:
    with store.filesystem.open_input_stream(f"{checkpoint.path}/{MARKER_NAME}") as stream:
        return stream.read()


def test_a_store_that_cannot_be_listed_does_not_keep_the_reporter_from_restarting(tmp_path):
    # Port 1 (tcpmux) has no listener: the listing is refused at once.
    store = CheckpointStore(
        "s3://bucket/runs", "run", S3Options("http://127.0.0.1:1", max_attempts=1)
    )
    lines = LineList()
    cfg = load_config(None, ["train.max_failures=1"])
    reporter = RunReporter(store, MetricsLog(tmp_path), cfg, lines)

    # Raised from here, the error would end the run in Ray Train's controller, with no
    # restart: the workers, which list the checkpoints again, find out whether S3 is back.
    reporter.after_exception(None, {1: RuntimeError("saving checkpoint_00000004 failed")})

    assert lines[0] == "worker 1 failed: saving checkpoint_00000004 failed"
    assert lines[1].startswith(
        "restarting the workers from the newest complete checkpoint (which could not be "
        "listed: listing the checkpoints in s3://bucket/runs/run failed: "
    )
    assert lines[1].endswith("(failure 1 of at most train.max_failures=1)")


class LineList(list):
    """Stands in for the reporter's queue of lines to print."""

    def put(self, line: str) -> None:
        self.append(line)


def test_a_workers_storage_error_is_shown_whole():
    message = "saving checkpoint_00000004 in s3://bucket/runs/run failed: " + "x" * 2000
    failures = {0: StorageError(message), 1: StorageError(message)}
    error = named_worker_error(ray.train.WorkerGroupError("a snippet", failures))
    assert str(error) == f"Training failed due to worker errors:\nworker 0, 1: {message}"
    assert error.worker_failures == failures


def test_the_controller_failing_to_write_its_checkpoint_list_is_named_as_the_stores_failure():
    store = CheckpointStore("s3://bucket/runs", "run", S3Options("http://KEY:SECRET@host:9"))
    snapshot = OSError("When uploading checkpoint_manager_snapshot.json: connection refused")
    named = named_controller_error(ray.train.ControllerError(snapshot), store)
    message = str(named.controller_failure)
    assert isinstance(named.controller_failure, StorageError)
    assert message.startswith(
        "Ray Train's controller writing its list of checkpoints in s3://bucket/runs/run failed: "
        "When uploading checkpoint_manager_snapshot.json: connection refused; the S3 store "
        "(endpoint http://***@host:9) failed"
    )
    assert "SECRET" not in message
    # Any other controller failure is not the store's to name.
    other = ray.train.ControllerError(OSError("the scheduler lost a node"))
    assert named_controller_error(other, store) is other
