"""End to end through `python -m ulm_dist.train`'s `main`: real Ray (2 CPU workers), real
DeepSpeed, a real S3 server on 127.0.0.1. A tiny model and few steps keep each run to about
a minute on 2 cores."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from mlflow import MlflowClient
from ray.train.v2.api.callback import UserCallback

from ulm_dist.config import load_config
from ulm_dist.models import build_learner
from ulm_dist.storage import S3Options
from ulm_dist.train.checkpoint import CheckpointStore, read_learner_weights
from ulm_dist.train.curves import CURVES_NAME
from ulm_dist.train.driver import main, train
from ulm_dist.train.metrics_log import METRICS_NAME

pytestmark = pytest.mark.slow


def metric_records(log_dir: Path, run_name: str) -> list[dict]:
    lines = (log_dir / run_name / METRICS_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_weights(store: CheckpointStore, tmp_path) -> dict[str, torch.Tensor]:
    latest = store.latest()
    return read_learner_weights(store.download(latest, tmp_path / f"copy_{latest.step}"))


@pytest.mark.faults
def test_zero2_on_s3_survives_a_killed_worker(
    common_args, log_dir, s3_server, s3_bucket, tmp_path, capsys
):
    args = [
        *common_args,
        f"train.storage={s3_bucket}/runs",
        f"data.s3_endpoint_url={s3_server}",
        "train.run_name=zero2",
        "train.zero_stage=2",
        "train.steps=12",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
        "train.max_failures=1",
        "train.time_collectives=true",
    ]
    cfg = load_config(None, args)
    store = CheckpointStore(cfg.train.storage, "zero2", S3Options(s3_server))
    events = tmp_path / "reports.txt"
    # Once checkpoint 4 is complete, a worker process is killed with SIGKILL.
    killer = WorkerKiller(events, after_step=4)
    killer.start()
    try:
        train(cfg, callbacks=[report_recorder(events)])
    finally:
        killer.stop()
    assert killer.error is None, killer.error

    output = capsys.readouterr().out
    restarts = re.findall(r"restarting the workers from checkpoint_(\d+) \(failure 1 of", output)
    assert len(restarts) == 1, output
    resumed_from = int(restarts[0])
    # The newest complete checkpoint when the worker died: the one seen just before the kill
    # (or one completed in the moment between that look and the kill).
    complete_at_kill = max(step for step in killer.reported_at_kill if step % 4 == 0)
    assert resumed_from in (4, 8) and resumed_from >= complete_at_kill, output
    # What Ray Train's controller saw, both attempts: the restarted workers' first report is
    # the step after that checkpoint, so they resumed from it and from no older one (and
    # wrote no checkpoint at or before it again).
    seen = events.read_text().split()
    assert seen.count("failed") == 1, seen
    assert seen[seen.index("failed") + 1] == str(resumed_from + 2), seen
    # Complete checkpoints only, the two newest kept; the upload the kill cut short (if any)
    # was passed over and deleted once a newer checkpoint was complete.
    run = store.scan()
    assert [checkpoint.step for checkpoint in run.complete] == [8, 12] and run.incomplete == []
    assert store.exists("config.yaml")

    records = metric_records(log_dir, "zero2")
    assert [record["step"] for record in records] == [2, 4, 6, 8, 10, 12]
    assert records[-1]["samples_seen"] == 12 * 8
    losses = [record["loss/total"] for record in records]
    assert sum(losses[-2:]) / 2 < losses[0], f"loss did not fall: {losses}"
    for record in records:
        phases = [record[f"time/{phase}_s"] for phase in ("forward", "backward", "optimizer")]
        assert min(phases) > 0 and record["time/data_wait_s"] > 0
        assert record["time/data_wait_s"] + sum(phases) <= record["time/step_s"]
        # ZeRO-2 reduces gradients and gathers updated weights across the two workers.
        assert 0 < record["time/collectives_s"] < phases[1] + phases[2]

    learner = build_learner(cfg.model, cfg.loss)
    gradient_mb = 4 * sum(p.numel() for p in learner.parameters() if p.requires_grad) / 1e6
    for record in records:
        # Every fp32 gradient is reduced once a step, and each worker gathers the other's
        # half of the updated weights (at most one more gradient's worth).
        assert gradient_mb <= record["comm/collective_mb"] <= 2 * gradient_mb

    weights = final_weights(store, tmp_path)
    learner.load_state_dict(weights)  # strict: every parameter and buffer is in the checkpoint
    landmarks = learner.landmarks(torch.rand(2, 3, 16, 16))
    assert landmarks.shape == (2, 4, 2) and landmarks.abs().max() <= 1


def report_recorder(path: Path) -> UserCallback:
    """A callback that appends to `path`, in Ray Train's controller, the step of every report
    the workers make and `failed` at every worker failure: the run's history over all its
    attempts."""

    # Defined here so that Ray pickles the class by value: the controller process cannot
    # import a test module.
    class ReportRecorder(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
            with open(path, "a") as events:
                events.write(f"{metrics[0]['step']}\n")

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            with open(path, "a") as events:
                events.write("failed\n")

    return ReportRecorder()


def recorded_events(path: Path) -> list[str]:
    """The lines a `report_recorder` has written so far (a line still being written excluded)."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].split()


def ray_train_worker_pids() -> list[int]:
    """This process's Ray Train workers. The local Ray cluster was started by this process,
    so its worker processes are among its descendants; a Ray Train worker is an actor whose
    process title is `ray::RayTrainWorker...`, and so are its data-loader processes (forked
    from it), which are left out. Another Ray cluster on the machine is never looked at."""
    titled = {}
    for process in psutil.Process().children(recursive=True):
        try:
            title, parent = process.cmdline(), process.ppid()
        except psutil.Error:  # ended since it was listed
            continue
        if title and title[0].startswith("ray::RayTrainWorker"):
            titled[process.pid] = parent
    return sorted(pid for pid, parent in titled.items() if parent not in titled)


class WorkerKiller(threading.Thread):
    """Kills one Ray Train worker process with SIGKILL (`kill -9`) as soon as the run's
    reports (a `report_recorder`'s file) reach `after_step`; `error` says why it could not."""

    def __init__(self, events: Path, after_step: int, timeout_s: float = 300):
        super().__init__(name="worker-killer", daemon=True)
        self.events = events
        self.after_step = after_step
        self.timeout_s = timeout_s
        self.reported_at_kill: list[int] = []
        self.error: str | None = "the run ended first"
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not any(
            event.isdigit() and int(event) >= self.after_step
            for event in recorded_events(self.events)
        ):
            if time.monotonic() > deadline:
                self.error = f"no report of step {self.after_step} within {self.timeout_s} s"
                return
            if self.done.wait(0.1):
                return
        pids = ray_train_worker_pids()
        self.reported_at_kill = [int(e) for e in recorded_events(self.events) if e.isdigit()]
        if len(pids) != 2:
            self.error = f"expected the 2 Ray Train worker processes, found pids {pids}"
            return
        os.kill(pids[-1], signal.SIGKILL)
        self.error = None

    def stop(self) -> None:
        """Stop waiting (the run has ended) and return once the thread has."""
        self.done.set()
        self.join()


def test_zero3_resumed_runs_match_an_uninterrupted_one(common_args, log_dir, tmp_path):
    storage = tmp_path / "runs"
    base = [
        *common_args,
        f"train.storage={storage}",
        "train.zero_stage=3",
        "train.steps=6",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
    ]
    assert main([*base, "train.run_name=straight"]) == 0
    straight_store = CheckpointStore(str(storage), "straight")
    step2 = straight_store.uri(straight_store.checkpoints()[0].path)
    assert step2.endswith("checkpoint_00000002")

    # A new run started from the uninterrupted run's checkpoint at step 2 (--resume=<it>), killed
    # after its own checkpoint at step 4 with no restarts allowed: the run fails...
    branched = [*base, "train.run_name=branched", f"--resume={step2}", "debug.fail_at_step=4"]
    assert main([*branched, "train.max_failures=0"]) == 1
    # ... and the same command again continues it from its own checkpoint at step 4 to step 6.
    assert main(branched) == 0

    expected = final_weights(straight_store, tmp_path)
    store = CheckpointStore(str(storage), "branched")
    assert store.latest().step == 6
    weights = final_weights(store, tmp_path / "branched")
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert [record["step"] for record in metric_records(log_dir, "branched")] == [4, 6]


def test_the_imm_learner_trains_through_the_same_driver_tracked_in_mlflow(
    common_args, log_dir, tmp_path, mlflow_store
):
    """The conditional-generation baseline (Jakab et al.) through the driver at ZeRO-3, with
    the run in MLflow. The part learner's run through the driver is tests/test_faults.py's."""
    learner_name = "imm"
    run_name = f"learner_{learner_name}"
    args = [
        *common_args,
        f"model.name={learner_name}",
        "data.pairs=warped",
        f"train.storage={tmp_path / 'runs'}",
        f"train.run_name={run_name}",
        "train.zero_stage=3",
        "train.steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        "train.tracking=mlflow",
        f"train.tracking_uri={mlflow_store}",
        "train.tracking_experiment=learners",
    ]
    assert main(args) == 0

    records = metric_records(log_dir, run_name)
    assert [record["step"] for record in records] == [2, 4]
    # The learner's own term and the shared priors, averaged over both workers.
    assert {"loss/recon", "loss/transform", "loss/sep", "loss/total"} <= records[-1].keys()
    assert "val/landmark_error" in records[-1]
    assert (log_dir / run_name / CURVES_NAME).is_file()
    summary = json.loads((log_dir / run_name / "summary.json").read_text())
    assert summary["final"] == records[-1] and summary["best"]["step"] == 4
    cfg = load_config(None, args)
    learner = build_learner(cfg.model, cfg.loss)
    learner.load_state_dict(final_weights(CheckpointStore(cfg.train.storage, run_name), tmp_path))
    assert learner.landmarks(torch.rand(2, 3, 16, 16)).shape == (2, 4, 2)
    check_the_mlflow_run(mlflow_store, run_name, learner_name, records)


def check_the_mlflow_run(store: str, run_name: str, learner_name: str, records: list[dict]):
    """The run in MLflow, read back from the store: the config, every report's metrics at its
    step, the end's files and the evaluated step's sheets."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("learners")
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == learner_name
    assert run.data.params["train.steps"] == "4"
    assert run.data.params["data.pairs"] == "warped"
    for name in ("loss/total", "val/landmark_error", "throughput/pairs_per_s"):
        history = client.get_metric_history(run.info.run_id, name)
        expected = [(r["step"], pytest.approx(r[name])) for r in records if name in r]
        assert [(m.step, m.value) for m in history] == expected, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", CURVES_NAME, "config.yaml"} <= artifacts
    sheets = client.list_artifacts(run.info.run_id, "evaluation/step_00000004")
    names = {a.path.rpartition("/")[2] for a in sheets}
    assert names == {"regression_sheet.png", "generation_sheet.png"}  # imm's pictures
