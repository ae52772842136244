"""Bad configurations stop `python -m ulm_dist.train` with a clear message before Ray or any
worker starts (exit code 2)."""

import time
from pathlib import Path

import pytest
import ray
import torch
from test_storage import UNREACHABLE_ENDPOINT, write_checkpoint

from ulm_dist.config import load_config
from ulm_dist.train.checkpoint import CheckpointStore
from ulm_dist.train.driver import announce_start, check_resume, main


@pytest.fixture
def run_args(tmp_path) -> list[str]:
    return [f"train.storage={tmp_path / 'runs'}", f"train.log_dir={tmp_path / 'logs'}"]


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    assert not ray.is_initialized(), "the error should come before Ray starts"
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.zero=2"], "unknown config key train.zero; known keys here: "),
        (["train.zero_stage=4"], "train.zero_stage: must be <= 3, got 4"),
        (
            ["train.device=cpu", "train.precision=fp16"],
            "train.precision: fp16 needs GPUs (its loss scaling and kernels are CUDA-only), "
            "but this run trains on CPU",
        ),
        (
            ["train.batch_size=15"],
            "train.batch_size: 15 pairs per step do not split evenly into 2 workers x 1 "
            "accumulation steps; use a multiple of 2",
        ),
        (
            ["train.num_workers=4", "train.grad_accum_steps=3", "train.batch_size=16"],
            "use a multiple of 12",
        ),
        (["train.precision=fp8"], "train.precision: expected one of ['auto', 'fp32', 'bf16'"),
        (["train.run_name=a/b"], "train.run_name: expected a plain folder name"),
        (["train.run_name=.."], "train.run_name: expected a plain folder name"),
        (["train.lr=.nan"], "train.lr: expected a finite number, got nan"),
        (["train.steps=[1"], "override 'train.steps=[1': invalid YAML at line 1, column 3"),
    ],
)
def test_impossible_values_are_refused(capsys, run_args, overrides, message):
    assert message in refused(capsys, [*run_args, *overrides])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("missing.yaml", "{folder}/missing.yaml: no such file; expected a YAML file"),
        (".", "{folder}: expected a YAML file, got a folder"),
        ("job.yaml", "{folder}/job.yaml: invalid YAML at line 3, column 1: expected ','"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_refused_in_one_line(
    capsys, tmp_path, run_args, config, message
):
    (tmp_path / "job.yaml").write_text("train:\n  steps: [1\n")
    error = refused(capsys, ["--config", str(tmp_path / config), *run_args])
    assert error.startswith(f"ulm_dist.train: error: {message.format(folder=tmp_path)}")
    assert error.count("\n") == 1, "one line, no traceback"


def test_unreachable_s3_storage_is_refused(capsys, tmp_path, s3_server):
    error = refused(
        capsys,
        [
            "train.storage=s3://bucket/runs",
            f"data.s3_endpoint_url={UNREACHABLE_ENDPOINT}",
            "data.s3_max_attempts=2",  # the default five spend 15 s in back-off
            f"train.log_dir={tmp_path}",
        ],
    )
    assert "train.storage: cannot write to s3://bucket/runs/demo" in error
    assert "data.s3_endpoint_url" in error


def test_unwritable_local_storage_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    error = refused(capsys, [f"train.storage={tmp_path / 'file'}"])
    assert f"train.storage: cannot write to {tmp_path / 'file' / 'demo'}" in error


def test_an_empty_folder_as_train_data_is_refused(capsys, tmp_path, run_args):
    (tmp_path / "faces").mkdir()
    error = refused(capsys, [*run_args, f"data.train={tmp_path / 'faces'}"])
    assert f"data.train: data spec '{tmp_path / 'faces'}': expected " in error
    assert "build the shards with `python -m ulm_dist.data build`" in error


def test_a_shard_pattern_matching_no_file_is_refused(capsys, tmp_path, run_args):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    pattern = f"{tmp_path}/trian-{{000000..000003}}.tar"
    error = refused(capsys, [*run_args, f"data.train={pattern}"])
    assert (
        f"data.train: shard pattern '{pattern}': matches no file (it names 4, from "
        f"{tmp_path}/trian-000000.tar to {tmp_path}/trian-000003.tar); check the folder"
    ) in error


def test_a_shard_pattern_in_s3_matching_no_file_is_refused(capsys, run_args, s3_server, s3_bucket):
    pattern = f"{s3_bucket}/faces/train-{{000000..000001}}.tar"
    overrides = [f"data.train={pattern}", f"data.s3_endpoint_url={s3_server}"]
    assert f"data.train: shard pattern '{pattern}': matches no file" in refused(
        capsys, [*run_args, *overrides]
    )


def test_a_missing_bucket_as_train_data_is_refused(capsys, run_args, s3_server):
    overrides = ["data.train=s3://no-such-bucket/faces", f"data.s3_endpoint_url={s3_server}"]
    error = refused(capsys, [*run_args, *overrides])
    assert "data.train: s3://no-such-bucket/faces/manifest.parquet" in error
    assert "the bucket does not exist; create it or fix the URL" in error


def test_an_s3_endpoint_with_nothing_listening_is_refused_in_seconds(
    capsys, run_args, s3_server, unused_tcp_port
):
    endpoint = f"http://127.0.0.1:{unused_tcp_port}"
    overrides = ["data.train=s3://bucket/faces", f"data.s3_endpoint_url={endpoint}"]
    started = time.monotonic()
    error = refused(capsys, [*run_args, *overrides])
    assert time.monotonic() - started < 20
    assert f"data.train: s3://bucket/faces/manifest.parquet (endpoint {endpoint}): cannot " in error
    assert "check data.s3_endpoint_url and the network" in error


def test_resume_never_refuses_a_run_that_has_checkpoints(capsys, tmp_path, run_args):
    write_checkpoint(CheckpointStore(str(tmp_path / "runs"), "demo"), 10)
    error = refused(capsys, [*run_args, "--resume", "never"])
    assert "train.resume: never, but run 'demo' already has checkpoints" in error


def test_resume_from_an_incomplete_checkpoint_is_refused(capsys, tmp_path, run_args):
    other = CheckpointStore(str(tmp_path / "elsewhere"), "old")
    path = write_checkpoint(other, 10, mark=False)
    error = refused(capsys, [*run_args, "--resume", path])
    assert f"{path}: not a complete checkpoint" in error


def test_resuming_with_another_number_of_workers_is_refused(capsys, tmp_path, run_args):
    write_checkpoint(CheckpointStore(str(tmp_path / "runs"), "demo"), 10)  # by 2 workers
    error = refused(capsys, [*run_args, "train.num_workers=4"])
    assert "train.num_workers: the checkpoint to resume from" in error
    assert "was written by 2 workers, this run has 4" in error


@pytest.mark.parametrize(
    ("storage", "run_name", "steps"),
    # demo_base: beside this run (demo), its name starting with this one's.
    [("elsewhere", "old", 10), ("runs", "demo_base", 4)],
)
def test_resuming_another_runs_checkpoint_at_or_past_train_steps_is_refused(
    capsys, tmp_path, run_args, storage, run_name, steps
):
    path = write_checkpoint(CheckpointStore(str(tmp_path / storage), run_name), 10)
    error = refused(capsys, [*run_args, "--resume", path, f"train.steps={steps}"])
    assert error.startswith(
        f"ulm_dist.train: error: train.steps: {steps}, but the checkpoint to start from "
        f"(train.resume: {path}) is already at step 10, so this run would train 0 steps; "
    )
    assert error.rstrip().endswith(
        "set it to the total, the checkpoint's step plus the steps to train from it (e.g. "
        f"train.steps={10 + steps} for {steps} more)"
    )


def test_a_run_resumed_from_another_runs_checkpoint_trains_to_train_steps(tmp_path):
    path = write_checkpoint(CheckpointStore(str(tmp_path / "elsewhere"), "old"), 10)
    cfg = load_config(
        None, [f"train.storage={tmp_path / 'runs'}", f"train.resume={path}", "train.steps=11"]
    )
    store = CheckpointStore(cfg.train.storage, cfg.train.run_name)
    assert check_resume(cfg, store).step == 10


def test_a_complete_run_run_again_says_so(capsys, tmp_path):
    store = CheckpointStore(str(tmp_path / "runs"), "demo")
    path = write_checkpoint(store, 10)
    cfg = load_config(None, ["train.steps=10"])
    start = check_resume(cfg, store)  # its own checkpoint: no refusal, the workers stop at once
    announce_start(cfg, store, start)
    assert capsys.readouterr().out == (
        f"run demo is already complete: its latest checkpoint {path} is at step 10 of "
        "train.steps=10; nothing is trained (raise train.steps to train it further)\n"
    )
    announce_start(load_config(None, ["train.steps=20"]), store, start)
    assert capsys.readouterr().out == f"resuming from {path} (step 10)\n"


def test_the_demo_job_file_is_the_embedded_default():
    # The README's demo and `--config jobs/demo.yaml` must stay the same job.
    demo_job = Path(__file__).parents[2] / "jobs" / "demo.yaml"
    assert load_config(demo_job) == load_config()


def test_gpu_training_on_a_cluster_without_gpus_asks_the_autoscaler_then_gives_up(capsys, run_args):
    # A real local Ray with CPUs only: the GPUs asked for never join.
    try:
        assert main([*run_args, "train.device=gpu", "train.gpu_wait_s=1"]) == 2
    finally:
        ray.shutdown()
    captured = capsys.readouterr()
    assert "waiting for GPU nodes: 0 of 2 GPUs in the cluster" in captured.out
    assert "2 workers need one GPU each but the Ray cluster has 0 after waiting 1 s" in (
        captured.err
    )


def test_imagenet_weights_that_cannot_be_had_stop_the_driver(
    capsys, run_args, tmp_path, monkeypatch
):
    # An empty hub cache and no network: the download fails as it does air-gapped.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, dst, *args, **kwargs):
        raise OSError(f"<urlopen error [Errno 101] Network is unreachable> ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    message = refused(capsys, [*run_args, "loss.perceptual=imagenet"])
    assert "loss.perceptual=imagenet" in message
    assert "python -m ulm_dist.fetch_weights" in message and "loss.perceptual=pixels" in message
