"""End to end through `python -m ulm_dist.tune`: 3 tiny trials with ASHA on a real local Ray
cluster, each a real training run (1 CPU worker, DeepSpeed). The sweep's driver is killed
(SIGINT, as Ctrl+C) once the first trial is done, then the same command continues it: the
finished trial is not run again, and the whole sweep ends with a table, a plot, a best trial
and its export. A second sweep keeps everything in S3 (a moto server on 127.0.0.1) and is
tracked in MLflow (a SQLite store), read back through its client. Several
minutes on 2 cores."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from mlflow import MlflowClient
from ray.tune import ExperimentAnalysis

from ulm_dist.deploy.artifact import load_detector
from ulm_dist.storage import S3Options, open_filesystem
from ulm_dist.tune.sweep import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NUM_TRIALS = 3
STEPS = 6


@pytest.fixture
def ray_cluster(s3_server):
    # Started after the S3 fixture has put the test credentials in the environment, which the
    # workers inherit. 3 logical CPUs: two trials' single workers (1 CPU each) plus their
    # drivers' token shares.
    context = ray.init(
        address="local", num_cpus=3, log_to_driver=False, logging_level=logging.ERROR
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def training_overrides(tmp_path: Path, tiny_model_overrides: list[str]) -> list[str]:
    return [
        *tiny_model_overrides,
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val=null",
        "train.num_workers=1",
        f"train.steps={STEPS}",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
    ]


@pytest.fixture
def sweep_file(tmp_path, tiny_model_overrides) -> Path:
    return write_sweep(
        tmp_path / "sweep.yaml",
        name="tiny",
        overrides=training_overrides(tmp_path, tiny_model_overrides),
        # The training loss stands in for the landmark error: no validation set to build.
        metric="loss/total",
        storage=str(tmp_path / "sweeps"),
        log_dir=str(tmp_path / "logs"),
        search={"algorithm": "random", "num_samples": NUM_TRIALS, "max_concurrent_trials": 2},
        scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2},
        space={
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "model.num_landmarks": {"values": [3, 4]},
        },
    )


def interrupt_after_first_trial(sweep_file: Path, runs: Path, gcs_address: str) -> str:
    """Run the sweep's driver in a process of its own and SIGINT it once a third trial has
    started: with two at a time, one trial is then done and the rest are not."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "ulm_dist.tune", "--config", str(sweep_file)],
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": gcs_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while len(list(runs.glob("trial_*"))) < 3:
            assert driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline, "no third trial started within 10 minutes"
            time.sleep(1)
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=300)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output
    assert "interrupted" in output
    return output


def test_sweep_survives_an_interrupt_and_exports_the_best(
    ray_cluster, sweep_file, tmp_path, capsys
):
    sweep_folder = tmp_path / "sweeps" / "tiny"
    logs = tmp_path / "logs" / "tiny"
    interrupt_after_first_trial(sweep_file, sweep_folder / "runs", ray_cluster)

    trials = ExperimentAnalysis(str(sweep_folder)).trials
    done = {f"trial_{t.trial_id}" for t in trials if t.status == "TERMINATED"}
    assert 1 <= len(done) < NUM_TRIALS
    # train() rewrites its run's config.yaml whenever it starts: a rerun trial would touch it.
    started = {name: (logs / name / "config.yaml").stat().st_mtime_ns for name in done}

    assert main(["--config", str(sweep_file)]) == 0
    summary = capsys.readouterr().out

    assert {name: (logs / name / "config.yaml").stat().st_mtime_ns for name in done} == started
    table = pq.read_table(sweep_folder / "trials.parquet").to_pylist()
    assert len(table) == NUM_TRIALS
    assert {row["status"] for row in table} <= {"finished", "stopped early"}
    assert any(row["status"] == "finished" and row["step"] == STEPS for row in table)
    for row in table:
        assert row["model.num_landmarks"] in (3, 4)
        assert 1e-4 <= row["train.lr"] <= 1e-2
        assert row["best/loss/total"] > 0
        assert Path(row["tensorboard"]).is_dir()
    best = min(table, key=lambda row: row["best/loss/total"])
    assert f"best: {best['trial']}" in summary
    assert (sweep_folder / "loss_total.png").is_file()

    detector = load_detector(logs / "best")
    assert detector.num_landmarks == best["model.num_landmarks"]


def test_sweep_on_s3_tracked_in_mlflow(
    ray_cluster, s3_server, s3_bucket, tmp_path, tiny_model_overrides, mlflow_store
):
    sweep_file = write_sweep(
        tmp_path / "sweep.yaml",
        name="on-s3",
        overrides=[
            *training_overrides(tmp_path, tiny_model_overrides),
            f"data.s3_endpoint_url={s3_server}",
            "train.tracking=mlflow",
            f"train.tracking_uri={mlflow_store}",
            "train.tracking_experiment=sweeps",
        ],
        metric="loss/total",
        storage=f"{s3_bucket}/sweeps",
        log_dir=str(tmp_path / "logs"),
        search={"algorithm": "grid", "num_samples": 1, "max_concurrent_trials": 2},
        scheduler={"name": "fifo"},
        space={"model.num_landmarks": {"values": [3, 4]}},
    )
    assert main(["--config", str(sweep_file)]) == 0

    filesystem, path = open_filesystem(f"{s3_bucket}/sweeps/on-s3", S3Options(s3_server))
    table = pq.read_table(f"{path}/trials.parquet", filesystem=filesystem).to_pylist()
    assert sorted(row["model.num_landmarks"] for row in table) == [3, 4]
    assert all(row["status"] == "finished" for row in table)
    assert all(row["checkpoint"].startswith(f"{s3_bucket}/sweeps/on-s3/runs/") for row in table)
    assert load_detector(tmp_path / "logs" / "on-s3" / "best").num_landmarks in (3, 4)

    # In MLflow: the sweep's run, and each trial's training run as its child.
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    (parent,) = client.search_runs([experiment], "attributes.run_name = 'on-s3'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["metric"] == "loss/total"
    assert parent.data.params["space.model.num_landmarks"] == "values [3, 4]"
    best = min(row["best/loss/total"] for row in table)
    assert parent.data.metrics["best/loss/total"] == pytest.approx(best)
    artifacts = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"trials.parquet", "loss_total.png", "summary.txt"}
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {row["trial"]: row for row in table}
    assert sorted(child.info.run_name for child in children) == sorted(by_trial)
    for child in children:
        row = by_trial[child.info.run_name]
        assert child.info.status == "FINISHED"
        assert child.data.params["model.num_landmarks"] == str(row["model.num_landmarks"])
        assert child.data.params["data.s3_endpoint_url"] == s3_server  # the whole config
        history = client.get_metric_history(child.info.run_id, "loss/total")
        assert [metric.step for metric in history] == [2, 4, STEPS]
        assert history[-1].value == pytest.approx(row["final/loss/total"])
