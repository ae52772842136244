"""Export of a real checkpoint: trained once by the real driver (2 Ray workers, DeepSpeed
ZeRO-2, so the weights are gathered from shards), exported, and loaded back as a detector."""

import json
import logging

import pyarrow.fs as pafs
import pytest
import ray
import torch
import yaml

from ulm_dist.config import config_from_dict, load_config
from ulm_dist.deploy import artifact
from ulm_dist.deploy.artifact import Regressor, load_detector
from ulm_dist.deploy.export import choose_checkpoint, main
from ulm_dist.deploy.onnx_detector import ONNX_OPSET, ONNX_TOLERANCE
from ulm_dist.deploy.trained import load_trained
from ulm_dist.evaluate.regression import apply_linear_map
from ulm_dist.models import CycleConsistencyModel
from ulm_dist.models.landmarks import to_pixels
from ulm_dist.storage import S3Options
from ulm_dist.train.checkpoint import CheckpointStore, StoredCheckpoint
from ulm_dist.train.driver import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_overrides):
    """A finished 2-step run with checkpoints at steps 1 and 2, each validated (on the
    synthetic val split); returns its store."""
    root = tmp_path_factory.mktemp("export")
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level=logging.ERROR)
    try:
        cfg = load_config(
            None,
            [
                *tiny_model_overrides,
                f"data.cache_dir={root / 'cache'}",
                f"train.storage={root / 'runs'}",
                f"train.log_dir={root / 'logs'}",
                "train.run_name=tiny",
                "train.num_workers=2",
                "train.zero_stage=2",
                "train.steps=2",
                "train.warmup_steps=1",
                "train.log_every=1",
                "train.checkpoint_every=1",
                "train.eval_samples=32",
            ],
        )
        train(cfg)
    finally:
        ray.shutdown()
    return CheckpointStore(cfg.train.storage, cfg.train.run_name)


def test_the_exported_detector_gives_the_best_checkpoints_landmarks(run, tmp_path, capsys):
    # Periodic validation put each checkpoint's error into its completion marker.
    errors = {c.step: c.info["metrics"]["val/landmark_error"] for c in run.checkpoints()}
    best = min(errors, key=errors.get)
    out = tmp_path / "artifact"
    assert main([run.run_path, "--out", str(out)]) == 0
    assert "best: lowest val/landmark_error" in capsys.readouterr().out

    names = {path.name for path in out.iterdir()}
    assert names == {
        "detector.pt2",
        "detector.onnx",
        "model.pt",
        "config.yaml",
        "metadata.json",
        "README.md",
    }
    assert not list(tmp_path.glob(".artifact.*")), "the staging folder was left behind"
    metadata = json.loads((out / artifact.METADATA_NAME).read_text())
    assert metadata["step"] == best and metadata["source"].endswith(f"checkpoint_{best:08d}")
    assert metadata["metrics"]["val/landmark_error"] == errors[best]
    assert (metadata["image_size"], metadata["num_landmarks"]) == (16, 4)
    assert metadata["onnx_opset"] == ONNX_OPSET

    trained = load_trained(metadata["source"])
    detector = load_detector(out)
    images = torch.rand(5, 3, 16, 16)  # a batch size the export did not see
    expected = to_pixels(trained.learner.landmarks(images), 16)
    torch.testing.assert_close(detector(images), expected, atol=1e-5 * 8, rtol=0)
    # The ONNX model of the gathered ZeRO-2 weights, in onnxruntime.
    onnx_points = load_detector(out, runtime="onnx")(images)
    torch.testing.assert_close(onnx_points, expected, atol=ONNX_TOLERANCE * 8, rtol=0)
    # On another device nothing may stay on the CPU (the meta device stands in for a GPU).
    assert load_detector(out, "meta")(images.to("meta")).device.type == "meta"

    config = config_from_dict(yaml.safe_load((out / artifact.CONFIG_NAME).read_text()))
    assert config == trained.config
    model = CycleConsistencyModel(config.model)
    model.load_state_dict(torch.load(out / artifact.MODEL_WEIGHTS_NAME))  # strict
    readme = (out / artifact.README_NAME).read_text()
    assert f"step {best}" in readme and "| val/landmark_error |" in readme


def test_best_is_the_lowest_validation_error_and_a_regressor_travels_along(
    run, s3_server, s3_bucket, tmp_path, capsys
):
    # A copy of the run in S3 whose markers say that the older checkpoint scored better.
    copy = CheckpointStore(f"{s3_bucket}/runs", "scored", S3Options(s3_server))
    pafs.copy_files(
        run.run_path,
        copy.run_path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=copy.filesystem,
    )
    for checkpoint, error in zip(copy.checkpoints(), (3.5, 7.0), strict=True):
        copy.mark_complete(checkpoint.path, checkpoint.step, metrics={"val/landmark_error": error})
    regressor_file = tmp_path / "regressor.json"
    weights = torch.randn(8, 6, dtype=torch.float64)  # K = 4 landmarks -> L = 3
    regressor_file.write_text(json.dumps({"weights": weights.tolist(), "layout": "three"}))

    out = tmp_path / "best"
    source = copy.uri(copy.run_path)
    args = ["--regressor", str(regressor_file), "--s3-endpoint-url", s3_server, "--no-onnx"]
    assert main([source, "--out", str(out), *args]) == 0
    assert "best: lowest val/landmark_error = 3.5" in capsys.readouterr().out
    metadata = json.loads((out / artifact.METADATA_NAME).read_text())
    assert metadata["step"] == 1 and metadata["metrics"] == {"val/landmark_error": 3.5}
    assert metadata["source"] == f"{source}/checkpoint_00000001"
    assert (metadata["layout"], metadata["num_annotated"]) == ("three", 3)
    readme = (out / artifact.README_NAME).read_text()
    assert "| val/landmark_error | 3.5 |" in readme
    assert "No `detector.onnx` was written (exported with --no-onnx)" in readme
    assert not (out / "detector.onnx").exists() and metadata["onnx_opset"] is None

    detector = load_detector(out)
    points = detector(torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(detector.regress(points), apply_linear_map(weights, points))


def checkpoints(*errors):
    return [
        StoredCheckpoint(step, f"run/checkpoint_{step}", {"metrics": {"val/landmark_error": e}})
        if e is not None
        else StoredCheckpoint(step, f"run/checkpoint_{step}")
        for step, e in zip((10, 20, 30), errors, strict=True)
    ]


def test_choosing_among_a_runs_checkpoints():
    assert choose_checkpoint(checkpoints(5.0, 2.0, 4.0), "best")[0].step == 20
    assert choose_checkpoint(checkpoints(None, 2.0, None), "best")[0].step == 20
    chosen, reason = choose_checkpoint(checkpoints(None, None, None), "best")
    assert chosen.step == 30 and reason.startswith("latest")
    assert choose_checkpoint(checkpoints(5.0, 2.0, 4.0), "latest")[0].step == 30
    assert choose_checkpoint(checkpoints(5.0, 2.0, 4.0), "10")[0].step == 10


def test_clear_errors_for_what_cannot_be_exported(run, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    cases = {
        str(tmp_path / "nowhere"): "neither a run folder with checkpoints",
        str(tmp_path / "runs" / "empty"): "neither a run folder with checkpoints",
        str(tmp_path / "runs" / "checkpoint_00000001"): "not a complete checkpoint",
    }
    for source, message in cases.items():
        assert main([source, *out]) == 2
        assert message in capsys.readouterr().err

    assert main([run.run_path, *out, "--checkpoint", "123"]) == 2
    assert "no complete checkpoint at that step; it has steps [1, 2]" in capsys.readouterr().err
    assert main([run.run_path, *out, "--checkpoint", "first"]) == 2
    assert "expected best, latest or a step number" in capsys.readouterr().err

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"weights": [[0.0] * 6] * 5}))
    assert main([run.run_path, *out, "--regressor", str(wrong)]) == 2
    assert "do not map this model's 4 landmarks" in capsys.readouterr().err
    wrong.write_text("{'weights': ")
    assert main([run.run_path, *out, "--regressor", str(wrong)]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    (tmp_path / "taken").mkdir()
    assert main([run.run_path, "--out", str(tmp_path / "taken")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_regressor_must_fit_the_models_landmarks():
    with pytest.raises(artifact.ArtifactError, match=r"expected \(9, 2L\)"):
        Regressor.from_dict({"weights": [[0.0] * 4] * 8, "bias": True}, 4, "file")
