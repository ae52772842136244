"""A credential inside a URL is redacted wherever a config or state is written or printed, while
the run itself keeps the URL as given."""

import pytest

import ulm_dist.train.driver
from ulm_dist.config import load_config
from ulm_dist.redaction import RedactedError, redact_url, redacted_errors
from ulm_dist.train.checkpoint import TrainState, write_train_state

SECRET = "planted-s3cr3t"
ENDPOINT = f"http://PLANTEDKEY:{SECRET}@127.0.0.1:1"
REDACTED_ENDPOINT = "http://***@127.0.0.1:1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://KEY:SECRET@host:9000/path", "http://***@host:9000/path"),
        ("https://token@host", "https://***@host"),
        ("endpoint https://KEY:p@ss@host/x?q=a@b", "endpoint https://***@host/x?q=a@b"),
        ("s3://bucket/folder@v2/shard.tar", "s3://bucket/folder@v2/shard.tar"),
        ("http://host/a@b and s3://K:S@bucket/c", "http://host/a@b and s3://***@bucket/c"),
        ("user:password@host, not a URL", "user:password@host, not a URL"),
    ],
)
def test_redact_url(text, expected):
    assert redact_url(text) == expected


class StopBeforeRay(Exception):
    """Raised where the driver would start Ray: everything it writes before that is written."""


def stop_before_ray(verbose: bool) -> None:
    raise StopBeforeRay


def test_a_secret_in_an_endpoint_url_is_in_no_written_config_or_state(
    tmp_path, monkeypatch, capsys, tiny_model_overrides
):
    monkeypatch.setattr(ulm_dist.train.driver, "start_ray", stop_before_ray)
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    cfg = load_config(
        None,
        [
            *tiny_model_overrides,
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.s3_endpoint_url={ENDPOINT}",
            f"train.storage={runs}",
            f"train.log_dir={logs}",
            "train.device=cpu",
        ],
    )
    with pytest.raises(StopBeforeRay):
        ulm_dist.train.driver.train(cfg)
    checkpoint = runs / "demo" / "checkpoint_00000001"
    checkpoint.mkdir()
    write_train_state(checkpoint, TrainState(step=1), cfg, world_size=2)

    written = [
        runs / "demo" / "config.yaml",
        logs / "demo" / "config.yaml",
        checkpoint / "train_state.json",
    ]
    for path in written:
        assert REDACTED_ENDPOINT in path.read_text(), path
    for path in [*runs.rglob("*"), *logs.rglob("*")]:
        assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in "".join(capsys.readouterr())
    assert cfg.data.s3_endpoint_url == ENDPOINT, "the run itself uses the URL as given"


def test_a_secret_in_an_endpoint_url_is_not_printed(capsys, tmp_path, s3_server, unused_tcp_port):
    # Nothing listens there: the driver's error names the endpoint.
    endpoint = f"http://PLANTEDKEY:{SECRET}@127.0.0.1:{unused_tcp_port}"
    argv = [
        f"train.storage={tmp_path / 'runs'}",
        f"train.log_dir={tmp_path / 'logs'}",
        "data.train=s3://bucket/faces",
        f"data.s3_endpoint_url={endpoint}",
    ]
    assert ulm_dist.train.driver.main(argv) == 2
    printed = capsys.readouterr()
    assert f"(endpoint http://***@127.0.0.1:{unused_tcp_port}): cannot reach" in printed.err
    assert SECRET not in printed.out + printed.err


def test_an_error_holding_a_credential_is_raised_again_without_it():
    # As a sweep's trial raises it to Tune, which writes it into the sweep's folder.
    with pytest.raises(RedactedError) as raised, redacted_errors():
        try:
            raise OSError(f"curl: could not connect to {ENDPOINT}")
        except OSError as cause:
            raise ValueError("reading the shards failed") from cause
    text = str(raised.value)
    assert text.startswith("ValueError: reading the shards failed\n")
    assert f"OSError: curl: could not connect to {REDACTED_ENDPOINT}" in text  # the cause
    assert SECRET not in text and raised.value.__cause__ is None
    assert raised.value.__suppress_context__

    with pytest.raises(KeyError), redacted_errors():  # nothing to redact: raised as it is
        raise KeyError("no credential here")
