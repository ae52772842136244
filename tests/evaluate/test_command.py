"""Evaluation end to end: one real training run (Ray, 2 workers, DeepSpeed ZeRO-3, checkpoints
on a local S3 server) with periodic evaluation on data.val, then `python -m ulm_dist.evaluate`
on its checkpoint. The run is trained once for the whole module (about a minute on 2 cores).
"""

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ulm_dist.config import load_config
from ulm_dist.data import make_annotated_loader, prepare_shards
from ulm_dist.data.build import WriteOptions, build_from_folder, build_synthetic
from ulm_dist.evaluate.command import main
from ulm_dist.models.landmarks import to_pixels
from ulm_dist.storage import S3Options
from ulm_dist.train.checkpoint import CheckpointStore, picture_file
from ulm_dist.train.driver import train
from ulm_dist.train.metrics_log import METRICS_NAME, TENSORBOARD_NAME

pytestmark = pytest.mark.slow

RUN = "evaluated"
OUTPUTS = ["summary.json", "summary.parquet", "landmarks.parquet"]
PICTURES = ["regression_sheet.png", "cycle_sheet.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_server, tiny_model_overrides):
    """Trains 4 steps: reports at 2 (checkpoint), 3 (evaluation) and 4 (both: the last step)."""
    bucket = f"eval-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("evaluated")
    cfg = load_config(
        None,
        [
            *tiny_model_overrides,
            f"data.cache_dir={folder / 'cache'}",
            f"data.s3_endpoint_url={s3_server}",
            f"train.storage=s3://{bucket}/runs",
            f"train.log_dir={folder / 'logs'}",
            f"train.run_name={RUN}",
            "train.zero_stage=3",
            "train.steps=4",
            "train.log_every=2",
            "train.checkpoint_every=2",
            "train.eval_every=3",
            "train.eval_samples=24",
        ],
    )
    assert cfg.data.val_spec() == "synthetic"  # data.val's default, as in the demo job
    # Started after the S3 fixture has put the test credentials in the environment.
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level=logging.ERROR)
    try:
        train(cfg)
    finally:
        ray.shutdown()
    store = CheckpointStore(cfg.train.storage, RUN, S3Options(s3_server))
    return cfg, store, folder


@pytest.fixture(scope="module")
def local_checkpoint(run) -> Path:
    """The last checkpoint, copied into a local run folder."""
    _, store, folder = run
    latest = store.latest()
    return store.download(latest, folder / "local_runs" / RUN / Path(latest.path).name)


def test_training_reports_val_metrics_and_keeps_them_with_the_checkpoint(run):
    _, store, folder = run
    records = [json.loads(line) for line in (folder / "logs" / RUN / METRICS_NAME).open()]
    assert [record["step"] for record in records] == [2, 3, 4]
    val_names = ["val/landmark_error", "val/landmark_error_reverse", "val/mean_shape_error"]
    assert not any(name in records[0] for name in val_names)  # step 2: not an evaluation step
    for record in records[1:]:
        assert all(np.isfinite(record[name]) and record[name] > 0 for name in val_names)

    early, last = store.checkpoints()
    assert (early.step, last.step) == (2, 4)
    assert early.info["metrics"] == {}
    assert last.info["metrics"] == {name: records[2][name] for name in val_names}

    # The pictures: in the evaluated checkpoint, and from there in TensorBoard at its step.
    files = {
        info.base_name for info in store.filesystem.get_file_info(pafs.FileSelector(last.path))
    }
    cycle_pictures = {"val/regression_sheet", "val/cycle_sheet"}  # the cycle model's
    assert {picture_file(tag) for tag in cycle_pictures} <= files
    events = EventAccumulator(str(folder / "logs" / RUN / TENSORBOARD_NAME), size_guidance={})
    events.Reload()
    assert set(events.Tags()["images"]) == cycle_pictures
    assert [image.step for image in events.Images("val/cycle_sheet")] == [4]


def test_evaluate_writes_results_that_agree_with_the_table_and_the_annotations(
    run, local_checkpoint, capsys
):
    cfg = run[0]
    assert main([str(local_checkpoint), "--data", "synthetic"]) == 0
    table = capsys.readouterr().out
    out = local_checkpoint.parent / "evaluation" / local_checkpoint.name  # the default
    for name in OUTPUTS + PICTURES:
        assert (out / name).is_file(), name
    assert (out / "training_curves.png").is_file()  # from the run's metrics.jsonl

    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["normaliser"] == "inter-ocular"
    # data.synthetic_samples=16: 16 train images; test is a tenth of that, at least 64.
    assert (summary["fit_images"], summary["test_images"]) == (16, 64)
    assert summary["fit_skipped"] == summary["test_skipped"] == 0
    for name in ("landmark_error", "landmark_error_reverse", "mean_shape_error"):
        assert f"{summary[name]:8.2f}" in table
    per_landmark = pq.read_table(out / "landmarks.parquet").to_pylist()
    assert [row["name"] for row in per_landmark][:2] == ["left_eye", "right_eye"]
    assert per_landmark == summary["per_landmark"]
    assert np.mean([row["error"] for row in per_landmark]) == pytest.approx(
        summary["landmark_error"], rel=1e-5
    )
    assert (
        pq.read_table(out / "summary.parquet").to_pylist()[0]["landmark_error"]
        == (summary["landmark_error"])
    )

    # The mean-shape baseline from the annotations alone.
    size = cfg.model.image_size
    fit, test = (annotations(cfg, split) for split in ("train", "test"))
    iod = (test[:, 0] - test[:, 1]).norm(dim=-1)
    baseline = (100 * (test - fit.mean(0)).norm(dim=-1) / iod[:, None]).mean().item()
    assert summary["mean_shape_error"] == pytest.approx(baseline, rel=1e-5)
    assert Image.open(out / "regression_sheet.png").size == (2 * 4 * size, 14 + 8 * 4 * size)
    assert Image.open(out / "cycle_sheet.png").size == (6 * 4 * size, 14 + 4 * 4 * size)


def annotations(cfg, split: str) -> torch.Tensor:
    size = cfg.model.image_size
    shards = prepare_shards(cfg.data, "synthetic", split, image_size=size)
    batches = make_annotated_loader(cfg.data, shards, size, batch_size=100)
    return torch.cat([to_pixels(batch["landmarks"], size) for batch in batches])


def test_evaluate_options_reach_the_protocol(local_checkpoint, tmp_path):
    out = tmp_path / "results"
    argv = ["--data", "synthetic", "--normaliser", "bbox-diagonal", "--bias", "--ridge", "0.5"]
    assert main([str(local_checkpoint), *argv, "--max-images", "12", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["normaliser"] == "bbox-diagonal"
    assert (summary["bias"], summary["ridge"]) == (True, 0.5)
    assert (summary["fit_images"], summary["test_images"]) == (12, 12)


def test_evaluate_reads_a_checkpoint_on_s3_and_resizes_other_shards(
    run, s3_server, tmp_path, monkeypatch, capsys
):
    _, store, _ = run
    # 32px shards for the 16px model.
    build_synthetic(
        str(tmp_path / "shards32"),
        split_samples={"train": 16, "test": 8},
        image_size=32,
        write=WriteOptions(progress=False),
    )
    monkeypatch.chdir(tmp_path)
    uri = store.uri(store.latest().path)
    argv = [uri, "--data", str(tmp_path / "shards32"), "--s3-endpoint-url", s3_server]
    assert main(argv) == 0
    assert "note: 32px images are resized to 16px" in capsys.readouterr().out
    summary = json.loads(
        (tmp_path / "evaluation" / RUN / "checkpoint_00000004" / "summary.json").read_text()
    )
    assert summary["checkpoint"] == uri and summary["test_images"] == 8


def unannotated_shards(root: Path) -> Path:
    images = root / "images"
    images.mkdir()
    for index in range(4):
        Image.new("RGB", (16, 16), (60 * index, 0, 0)).save(images / f"{index}.png")
    build_from_folder(
        images,
        str(root / "shards"),
        table=None,
        image_size=16,
        shard_samples=4,
        fractions={"test": 0.5},
        write=WriteOptions(progress=False),
    )
    return root / "shards"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_a_checkpoint", "not a complete checkpoint"),
        ("no_shards", "found neither; build the shards with `python -m ulm_dist.data build`"),
        ("a_split_folder", "the train and test splits are the same shards"),
        ("unannotated", "the test split has no landmarks"),
    ],
)
def test_bad_input_is_one_clear_line(case, message, run, local_checkpoint, tmp_path, capsys):
    checkpoint, data = str(local_checkpoint), str(tmp_path)
    if case == "not_a_checkpoint":
        checkpoint, data = str(tmp_path), "synthetic"
    elif case == "a_split_folder":
        data = str(prepare_shards(run[0].data, "synthetic", "test", image_size=16).urls[0])
        data = str(Path(data).parent)
    elif case == "unannotated":
        data = str(unannotated_shards(tmp_path))
    assert main([checkpoint, "--data", data, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    # Before it, at most the progress bar of loading the checkpoint.
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("ulm_dist.evaluate: error: ") and message in last_line
    assert "Traceback" not in error


def test_the_command_exits_non_zero_without_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ulm_dist.evaluate", str(tmp_path), "--data", "synthetic"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "not a complete checkpoint" in done.stderr and "Traceback" not in done.stderr
