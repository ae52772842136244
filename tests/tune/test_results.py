"""A finished sweep's results without running trials (Tune's results stood in for): what they
write to the sweep's folder, print and log into MLflow holds no credential from a trial's error.
The sweep itself, tracked end to end, is in test_tune.py."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
from mlflow import MlflowClient
from test_storage import write_checkpoint

from ulm_dist.config import load_config
from ulm_dist.storage import StorageFolder
from ulm_dist.train.checkpoint import CheckpointStore
from ulm_dist.train.tracking import MlflowRun, mlflow_run
from ulm_dist.tune.config import sweep_config_from_dict
from ulm_dist.tune.results import TABLE_NAME, collect_results
from ulm_dist.tune.sweep import SUMMARY_NAME, track_results

SECRET = "planted-s3cr3t"
ENDPOINT = f"http://PLANTEDKEY:{SECRET}@127.0.0.1:9000"
METRIC = "loss/total"


def tune_result(name: str, lr: float, losses: list[float], error: Exception | None = None):
    """What collect_results reads of a ray.tune.Result (the trial's run is read from disk)."""
    steps = list(range(1, len(losses) + 1))
    history = pd.DataFrame({"step": steps, METRIC: losses}) if losses else None
    metrics = {"step": steps[-1], METRIC: losses[-1]} if losses else {}
    return SimpleNamespace(
        path=f"/tune/sweep/{name}",
        metrics=metrics,
        metrics_dataframe=history,
        config={"train.lr": lr} if losses else None,
        error=error,
    )


def test_a_credential_in_a_failed_trials_error_is_in_no_table_summary_or_mlflow_artifact(
    tmp_path, mlflow_store, capsys
):
    sweep = sweep_config_from_dict(
        {
            "name": "leak",
            "metric": METRIC,
            "storage": str(tmp_path / "sweeps"),
            "space": {"train.lr": {"values": [0.001, 0.01]}},
        }
    )
    # As Ray gives a trial's failure: its own message over the worker's traceback, which
    # quotes a StorageError, an S3 client's error or pyarrow's words about the endpoint.
    failure = RuntimeError(
        f"Training failed: could not reach the S3 store (endpoint {ENDPOINT})\n"
        f"Traceback ...\nOSError: curl: could not connect to {ENDPOINT}/bucket"
    )
    write_checkpoint(CheckpointStore(str(tmp_path / "runs"), "trial_a"), 2)
    grid = [
        tune_result("trial_a", 0.001, [2.0, 1.5]),
        tune_result("trial_b", 0.01, [], failure),
    ]
    folder = StorageFolder(sweep.storage, sweep.name)
    folder.check_writable()
    results = collect_results(
        grid, sweep, load_config(None, []), str(tmp_path / "runs"), tmp_path / "logs"
    )
    results.write(folder)

    failed = next(trial for trial in results.trials if trial.name == "trial_b")
    assert failed.status == "failed"
    assert failed.error.startswith("Training failed: could not reach the S3 store (endpoint ")
    assert "http://***@127.0.0.1:9000" in failed.error
    table = pq.read_table(tmp_path / "sweeps" / "leak" / TABLE_NAME).to_pylist()
    assert {row["trial"]: row["error"] for row in table}["trial_b"] == failed.error
    assert SECRET.encode() not in (tmp_path / "sweeps" / "leak" / TABLE_NAME).read_bytes()
    summary = results.summary()
    assert "trial_b: failed: Training failed: could not reach the S3 store" in summary
    assert SECRET not in summary

    with mlflow_run(mlflow_store, "unit", "leak", {}, {}) as parent:
        track_results(parent, results)
    client = MlflowClient(mlflow_store)
    logged = {artifact.path for artifact in client.list_artifacts(parent.run_id)}
    assert {TABLE_NAME, SUMMARY_NAME} <= logged
    for name in logged:
        data = Path(client.download_artifacts(parent.run_id, name, str(tmp_path))).read_bytes()
        assert SECRET.encode() not in data, name
    uploaded = pq.read_table(tmp_path / TABLE_NAME).to_pylist()
    assert not any(SECRET in str(value) for row in uploaded for value in row.values())
    assert client.get_run(parent.run_id).data.metrics[f"best/{METRIC}"] == 1.5
    assert SECRET not in "".join(capsys.readouterr())


def test_a_tracking_store_gone_at_the_end_of_a_sweep_is_a_warning(
    tmp_path, monkeypatch, unused_tcp_port, capsys
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow retries for minutes
    sweep = sweep_config_from_dict(
        {"name": "gone", "metric": METRIC, "space": {"train.lr": {"values": [0.001, 0.01]}}}
    )
    write_checkpoint(CheckpointStore(str(tmp_path / "runs"), "trial_a"), 2)
    results = collect_results(
        [tune_result("trial_a", 0.001, [2.0, 1.5])],
        sweep,
        load_config(None, []),
        str(tmp_path / "runs"),
        tmp_path / "logs",
    )
    parent = MlflowRun(f"http://127.0.0.1:{unused_tcp_port}", "0123456789abcdef")
    track_results(parent, results)  # no error: the sweep's own results are all written
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0].startswith(f"warning: MLflow: could not log {SUMMARY_NAME}: ")
    assert warnings[1].startswith("warning: MLflow: could not log the best trial's metric: ")
