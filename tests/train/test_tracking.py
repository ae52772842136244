"""MLflow tracking against a real local store (SQLite in a temp folder), read back through
MLflow's client: the params are the whole resolved config, flattened, with no secret in them;
runs end with the status of how they ended; a child names its parent. The end-to-end runs
(a training run, a sweep) are tracked in test_train.py and test_tune.py."""

import os
import shutil

import pytest
from mlflow import MlflowClient

from ulm_dist.config import ConfigError, load_config
from ulm_dist.extras import MissingExtraError, require
from ulm_dist.train.driver import track_outputs
from ulm_dist.train.tracking import (
    PARENT_TAG,
    RESUMED_TAG,
    RUN_TAG,
    TrackingError,
    config_params,
    flat_params,
    training_run,
)

SECRET = "planted-s3cr3t"
ENDPOINT = f"http://PLANTEDKEY:{SECRET}@127.0.0.1:9000"


@pytest.fixture
def tracking_uri(mlflow_store) -> str:
    return mlflow_store


def tracked_config(tracking_uri: str, *overrides: str):
    return load_config(
        None,
        [
            "train.tracking=mlflow",
            f"train.tracking_uri={tracking_uri}",
            "train.tracking_experiment=unit",
            *overrides,
        ],
    )


def test_nested_mappings_flatten_to_dotted_keys():
    tree = {"model": {"channels": [8, 16], "norm": "batch"}, "debug": {"fail_at_step": None}}
    assert flat_params(tree) == {
        "model.channels": [8, 16],
        "model.norm": "batch",
        "debug.fail_at_step": None,
    }
    assert len(config_params(load_config(None, []))) > 60  # every field of every section


def test_a_run_records_the_whole_config_without_its_secrets(tracking_uri):
    cfg = tracked_config(tracking_uri, f"data.s3_endpoint_url={ENDPOINT}", "train.run_name=sec")
    run_uri = f"s3://bucket/runs/sec (endpoint {ENDPOINT})"
    with training_run(cfg, run_uri, "s3://bucket/runs/sec/checkpoint_00000002", None) as run:
        run.log_metrics({"step": 2, "loss/total": 1.5, "data/skipped": 0, "note": "text"})
        run.log_metrics({"step": 4, "loss/total": 0.75, "data/skipped": 1, "note": "text"})
        run.log_bytes(b"\x89PNG fake", "cycle_sheet.png", "evaluation/step_00000004")

    client = MlflowClient(tracking_uri)
    recorded = client.get_run(run.run_id)
    params = recorded.data.params
    expected = {name: str(value) for name, value in config_params(cfg).items()}
    assert params == expected
    assert params["data.s3_endpoint_url"] == "http://***@127.0.0.1:9000"
    assert params["train.tracking"] == "mlflow" and params["model.channels"] == "[16, 32, 64]"
    everything = [*params.values(), *recorded.data.tags.values(), recorded.info.run_name]
    assert not any(SECRET in value for value in everything)
    assert (
        recorded.data.tags[RUN_TAG] == "s3://bucket/runs/sec (endpoint http://***@127.0.0.1:9000)"
    )
    assert recorded.data.tags[RESUMED_TAG].endswith("checkpoint_00000002")
    assert recorded.info.run_name == "sec" and recorded.info.status == "FINISHED"
    experiment = client.get_experiment(recorded.info.experiment_id)
    assert experiment.name == "unit"

    history = client.get_metric_history(run.run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(2, 1.5), (4, 0.75)]
    assert [m.value for m in client.get_metric_history(run.run_id, "data/skipped")] == [0, 1]
    assert "note" not in recorded.data.metrics  # not a number
    (sheet,) = client.list_artifacts(run.run_id, "evaluation/step_00000004")
    assert sheet.path == "evaluation/step_00000004/cycle_sheet.png"


def test_a_child_names_its_parent_and_a_failed_run_says_so(tracking_uri):
    parent_cfg = tracked_config(tracking_uri, "train.run_name=parent")
    child_cfg = tracked_config(tracking_uri, "train.run_name=child")
    # A sweep's parent run is in the sweep's driver, a trial's run in the trial's process.
    with training_run(parent_cfg, "runs/parent", None, None) as parent:
        pass
    with (
        pytest.raises(ValueError, match="a worker failed"),
        training_run(child_cfg, "runs/child", None, parent) as child,
    ):
        raise ValueError("a worker failed")
    client = MlflowClient(tracking_uri)
    recorded = client.get_run(child.run_id)
    assert recorded.data.tags[PARENT_TAG] == parent.run_id
    assert recorded.info.status == "FAILED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert RESUMED_TAG not in recorded.data.tags


def test_tracking_fields_are_checked():
    assert load_config(None, []).train.tracking == "none"
    with pytest.raises(ConfigError, match=r"train\.tracking: expected one of"):
        load_config(None, ["train.tracking=wandb"])
    with pytest.raises(ConfigError, match=r"tracking_uri: set to .* but train\.tracking is none"):
        load_config(None, ["train.tracking_uri=http://mlflow:5000"])
    with pytest.raises(ConfigError, match=r"train\.tracking_experiment: expected"):
        load_config(None, ["train.tracking=mlflow", "train.tracking_experiment=' '"])
    with training_run(load_config(None, []), "runs/demo", None, None) as run:
        assert run is None  # tracking off: no MLflow at all


def test_a_server_that_cannot_be_reached_is_one_clear_error(monkeypatch, unused_tcp_port):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow retries for minutes
    uri = f"http://PLANTEDKEY:{SECRET}@127.0.0.1:{unused_tcp_port}"
    cfg = tracked_config(uri)
    with pytest.raises(TrackingError) as raised, training_run(cfg, "runs/demo", None, None):
        pass
    message = str(raised.value)
    assert message.startswith(
        f"train.tracking_uri: MLflow at http://***@127.0.0.1:{unused_tcp_port} cannot start a run"
    )
    assert "server is up and reachable" in message and SECRET not in message


def test_a_missing_extra_names_the_pip_command():
    with pytest.raises(MissingExtraError, match=r"pip install 'ulm-dist\[mlflow\]'"):
        require("ulm_dist_no_such_package", "mlflow", "train.tracking=mlflow")


def test_an_experiment_that_is_missing_is_created(tracking_uri):
    # No artifact is logged here: a new experiment's go to ./mlruns, in the working folder.
    cfg = load_config(
        None,
        [
            "train.tracking=mlflow",
            f"train.tracking_uri={tracking_uri}",
            "train.tracking_experiment=made-by-the-run",
        ],
    )
    with training_run(cfg, "runs/demo", None, None) as run:
        run.log_metrics({"step": 1, "loss/total": 2.0})
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("made-by-the-run")
    assert client.get_run(run.run_id).info.experiment_id == experiment.experiment_id


def test_a_store_gone_at_the_end_of_a_run_is_a_warning_and_the_run_ends(
    tracking_uri, tmp_path, capsys
):
    # A copy of the store, to break (its tables made already): every request to it fails
    # once they are gone.
    database = tmp_path / "mlflow.db"
    shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), database)
    summary = tmp_path / "summary.json"
    summary.write_text("{}\n")
    with training_run(tracked_config(f"sqlite:///{database}"), "runs/demo", None, None) as run:
        os.truncate(database, 0)
        track_outputs(run, [summary, None])  # what the driver logs once training is done
    warnings = capsys.readouterr().err
    assert "warning: MLflow: could not log summary.json: " in warnings
    assert f"warning: MLflow: could not end run {run.run_id} as FINISHED (it shows as RUNNING)" in (
        warnings
    )
    assert summary.read_text() == "{}\n"
