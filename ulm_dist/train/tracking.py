"""Experiment tracking in MLflow, `train.tracking: mlflow` (`pip install 'ulm-dist[mlflow]'`).

Each call of `train.driver.train` with it on is one MLflow run in `train.tracking_experiment`
at `train.tracking_uri`, named after `train.run_name`, holding:

    params     the whole resolved config, flattened to dotted keys (`train.lr`, `model.name`),
               with URL credentials redacted as in every written config (`redaction.py`)
    metrics    every report's numbers (losses, throughput, timings, val/...) at its step
    artifacts  evaluation/step_<step>/<sheet>.png  the val pictures of each evaluated step
               summary.json, metrics.jsonl, training_curves.png, config.yaml  at the end
    tags       ulm_dist.run: the run folder; ulm_dist.resumed_from: the checkpoint it
               continued from, if any

A store that cannot be reached when the run starts stops it there (`TrackingError`), before
Ray starts. Once it runs, MLflow is a copy of what the run folder and metrics.jsonl record: a
failure to log into it, or to end its run, is a warning line (`tracking_warning`), and the run
goes on and ends as it would without tracking.

A rerun that resumes is a new MLflow run with the same `ulm_dist.run` tag (a resumed config may
change values that MLflow would refuse to log again into the first run). A sweep
(`tune/sweep.py`) is one parent run, and each trial's training run is its child (MLflow's
`mlflow.parentRunId` tag), so MLflow's UI shows the trials under the sweep.

How Ray's MLflow integration (`ray.air.integrations.mlflow`) is used:
- `setup_mlflow` starts the run, in the process that calls `train()`: the driver of
  `python -m ulm_dist.train`, the Tune trial of a sweep, or the sweep's driver for the parent
  run. It picks the tracking URI, creates the experiment if missing and starts the run with its
  tags; the params are then sent in one `log_params` batch (setup_mlflow's own `config=` sends
  them one request each, which an SQLite store takes seconds for).
- The metrics and pictures are written with `MlflowClient`, by run id, from Ray Train's
  controller (the driver's `RunReporter`): reports arrive there once every worker has made its
  own, and the controller is a process of its own, with no active MLflow run. setup_mlflow is
  meant for the workers' loop, where each worker holds only its share of the metrics.
- `MLflowLoggerCallback` is not used for sweeps: it would record each trial as a run of what
  Tune sees (only the reports that carry the sweep's metric, at Tune's iteration count, with
  the searched values as params), beside the trial's own training run, which records every
  report at its step with the whole config: each trial would be there twice.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulm_dist.config import Config
from ulm_dist.extras import require
from ulm_dist.redaction import print_redacted, redact_url, redacted, redacted_config

RUN_TAG = "ulm_dist.run"
RESUMED_TAG = "ulm_dist.resumed_from"
SWEEP_TAG = "ulm_dist.sweep"
# MLflow's own tag for nested runs (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID).
PARENT_TAG = "mlflow.parentRunId"
EVALUATION_FOLDER = "evaluation"


class TrackingError(RuntimeError):
    """The tracking server or store cannot start a run; names it and says what to check."""


@dataclass
class MlflowRun:
    """A started MLflow run, by id: small and picklable, so that Ray Train's controller can
    write into the run that the driver started."""

    tracking_uri: str
    run_id: str
    # Set in the process that started the run to end it otherwise than the block ends.
    end_status: str | None = field(default=None, compare=False)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One report's numbers, at its `step`, in one request."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, record["step"])
            for name, value in record.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        client(self.tracking_uri).log_batch(self.run_id, metrics=metrics)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        client(self.tracking_uri).log_artifact(self.run_id, str(path), folder)

    def log_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        """`data` as the artifact `<folder>/<name>`."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / name
            path.write_bytes(data)
            self.log_file(path, folder)


@functools.cache
def client(tracking_uri: str) -> Any:
    """One MlflowClient per store and process (opening an SQLite store checks its schema)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`),
    the form of command-line overrides; lists and None are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(cfg: Config) -> dict[str, Any]:
    """The run's params: the resolved config, flattened, URL credentials redacted."""
    return flat_params(redacted_config(cfg))


@contextlib.contextmanager
def mlflow_run(
    tracking_uri: str | None,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> Iterator[MlflowRun]:
    """Start an MLflow run in this process (Ray's `setup_mlflow`) with `params` (already
    free of secrets) and `tags`; it ends when the block does: FINISHED, KILLED on Ctrl-C,
    FAILED on an exception."""
    mlflow = require("mlflow", "mlflow", "train.tracking=mlflow")
    from ray.air.integrations.mlflow import setup_mlflow

    if mlflow.active_run() is not None:
        # setup_mlflow would log into it instead of starting one (a notebook's own run).
        raise TrackingError(
            f"an MLflow run ({mlflow.active_run().info.run_id}) is already active in this "
            "process; end it (mlflow.end_run()) before training with train.tracking=mlflow"
        )
    try:
        session = setup_mlflow(
            tracking_uri=tracking_uri,
            experiment_name=experiment,
            run_name=run_name,
            tags={key: redact_url(value) for key, value in tags.items()},
            create_experiment_if_not_exists=True,
        )
    except mlflow.exceptions.MlflowException as error:
        where = redact_url(tracking_uri or mlflow.get_tracking_uri())
        raise TrackingError(
            f"train.tracking_uri: MLflow at {where} cannot start a run in experiment "
            f"{experiment!r}: {redact_url(str(error).splitlines()[0])}; check that the "
            "server is up and reachable from here, or set train.tracking=none"
        ) from error
    run = MlflowRun(session.get_tracking_uri(), session.active_run().info.run_id)
    status = "FAILED"
    try:
        session.log_params(redacted(params))
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        status = run.end_status or status
        # MLflow takes the run off this process's stack before it asks the store: after a
        # failure here, no run is left active.
        warning = tracking_warning(
            f"end run {run.run_id} as {status} (it shows as RUNNING)", session.end_run, status
        )
        if warning is not None:
            print_redacted(warning, file=sys.stderr)


def tracking_warning(action: str, log: Callable[..., None], *args: Any) -> str | None:
    """`log(*args)` into MLflow; None, or the warning line to show when it failed (`action`
    says what: "log summary.json"). A tracking store's outage must not end a run that the
    store and metrics.jsonl record: the caller shows the line and goes on."""
    try:
        log(*args)
    except Exception as error:  # MlflowException, a connection error, a full disk
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        return redact_url(f"warning: MLflow: could not {action}: {first_line}")
    return None


def check_tracking(cfg: Config) -> None:
    """Before anything starts: the package that `train.tracking` needs is installed."""
    if cfg.train.tracking == "mlflow":
        require("mlflow", "mlflow", "train.tracking=mlflow")


def training_run(
    cfg: Config, run_uri: str, resumed_from: str | None, parent: MlflowRun | None
) -> contextlib.AbstractContextManager[MlflowRun | None]:
    """The MLflow run of one training run with `train.tracking: mlflow`, a child of `parent`
    if given (a sweep's); a context that yields None when tracking is off."""
    if cfg.train.tracking != "mlflow":
        return contextlib.nullcontext()
    tags = {RUN_TAG: run_uri}
    if resumed_from is not None:
        tags[RESUMED_TAG] = resumed_from
    if parent is not None:
        tags[PARENT_TAG] = parent.run_id
    return mlflow_run(
        cfg.train.tracking_uri,
        cfg.train.tracking_experiment,
        cfg.train.run_name,
        config_params(cfg),
        tags,
    )
