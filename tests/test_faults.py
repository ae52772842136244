"""Faults injected for real into short training runs (real Ray, real DeepSpeed): a checkpoint
missing its marker or one rank's file, and Ctrl-C on the driver. Each test works on a copy
of one finished 4-step run, so the module trains that run once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from ulm_dist.metrics_log import MetricsLog
from ulm_dist.store import MARKER_NAME, CheckpointStore
from ulm_dist.train import INTERRUPTED_EXIT_CODE, main

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
    """Trains BASE_RUN to step 4 (checkpoints 2 and 4) once for the module."""
    assert main([*run_args, f"train.run_name={BASE_RUN}", "train.steps=4"]) == 0
    return run_args


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
        _, errors = driver.communicate(timeout=60)
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
