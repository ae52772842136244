"""Shared fixtures: a real S3 server (moto's standalone server) on 127.0.0.1."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import ray
from s3_server import free_port, local_s3_server

# Dummy credentials and region: enough for boto3 and pyarrow's S3FileSystem to sign requests
# that moto accepts. Variables that could point a client elsewhere are cleared.
_S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_S3_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


@pytest.fixture
def unused_tcp_port() -> int:
    """A port on 127.0.0.1 with nothing listening (it was free a moment ago)."""
    return free_port()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Starts `moto_server` on 127.0.0.1 and yields its endpoint URL; stops it at the end.

    Sets dummy AWS credentials and region in the environment for the whole session. Pass the
    endpoint explicitly (boto3 `endpoint_url`, pyarrow `endpoint_override`, ulm_dist's
    `data.s3_endpoint_url`): AWS_ENDPOINT_URL is deliberately not set, so that a test fails
    if some code path forgets the endpoint.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _S3_ENVIRONMENT.items():
            patch.setenv(name, value)
        for name in _S3_CLEARED:
            patch.delenv(name, raising=False)
        log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
        with local_s3_server(log_path) as endpoint:
            yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test server, as "s3://name"."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model_overrides() -> list[str]:
    """A model small enough for end-to-end runs on 2 cores: 16px, 4 landmarks, pixel loss."""
    return [
        "model.image_size=16",
        "model.channels=[8, 16]",
        "model.flow_channels=8",
        "model.appearance_dim=8",
        "model.num_landmarks=4",
        "loss.perceptual_layers=[pixels]",
        "data.synthetic_samples=16",
        "train.batch_size=8",
    ]


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """A fresh local Ray cluster with 2 CPUs for one test module's training runs."""
    # Not one `ray start` may have left running; started after the S3 fixture has put the
    # test credentials in the environment, which the workers inherit.
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def common_args(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: None,
    log_dir: Path,
    tiny_model_overrides: list[str],
) -> list[str]:
    """Overrides for a short real training run: the tiny model, a quick warm-up, 32 images
    of periodic evaluation (256 would take 3 s of every run's start), the module's data
    cache and log folder."""
    cache = tmp_path_factory.mktemp("cache")
    return [
        *tiny_model_overrides,
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.eval_samples=32",
        f"data.cache_dir={cache}",
        f"train.log_dir={log_dir}",
    ]


# The MLflow experiments the tests record runs in (test_tracking, test_train, test_tune).
MLFLOW_EXPERIMENTS = ("unit", "learners", "sweeps")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real local MLflow store, SQLite in a temp folder, as its tracking URI: one for the
    session, as creating its tables takes seconds. Its experiments are made here with their
    artifacts in the temp folder too: one that a run creates keeps them in ./mlruns, in the
    working folder (MLflow's default for a database store)."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name in MLFLOW_EXPERIMENTS:
        client.create_experiment(name, artifact_location=(folder / name).as_uri())
    return uri
