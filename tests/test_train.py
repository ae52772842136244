"""End to end through `python -m ulm_dist.train`'s `main`: real Ray (2 CPU workers), real
DeepSpeed, a real S3 server on 127.0.0.1. A tiny model and few steps keep each run to about
a minute on 2 cores."""

import json
from pathlib import Path

import pytest
import torch

from ulm_dist.config import load_config
from ulm_dist.engine import read_learner_weights
from ulm_dist.metrics_log import METRICS_NAME
from ulm_dist.models import build_learner
from ulm_dist.store import CheckpointStore
from ulm_dist.train import main

pytestmark = pytest.mark.slow


def metric_records(log_dir: Path, run_name: str) -> list[dict]:
    lines = (log_dir / run_name / METRICS_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_weights(store: CheckpointStore, tmp_path) -> dict[str, torch.Tensor]:
    latest = store.latest()
    return read_learner_weights(store.download(latest, tmp_path / f"copy_{latest.step}"))


def test_zero2_on_s3_survives_a_killed_worker(common_args, log_dir, s3_server, s3_bucket, tmp_path):
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
        "train.fail_at_step=6",  # after the checkpoint at 4: steps 5 and 6 are redone
        "train.max_failures=1",
        "train.time_collectives=true",
    ]
    assert main(args) == 0

    cfg = load_config(None, args)
    store = CheckpointStore(cfg.train.storage, "zero2", s3_server)
    assert store.exists("fault_injected_at_step_6"), "the worker kill did not happen"
    assert [checkpoint.step for checkpoint in store.checkpoints()] == [8, 12]
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


def test_zero3_resumed_runs_match_an_uninterrupted_one(common_args, log_dir, tmp_path):
    storage = tmp_path / "runs"
    base = [
        *common_args,
        f"train.storage={storage}",
        "train.zero_stage=3",
        "train.steps=6",
        "train.log_every=3",
        "train.checkpoint_every=3",
    ]
    assert main([*base, "train.run_name=straight"]) == 0

    # Killed after its checkpoint at step 3 with no restarts allowed: the run fails...
    interrupted = [*base, "train.run_name=interrupted", "train.fail_at_step=3", "--resume=auto"]
    assert main([*interrupted, "train.max_failures=0"]) == 1
    # ... and the same command again continues it from that checkpoint to step 6.
    assert main(interrupted) == 0

    # A new run started from the uninterrupted run's checkpoint at step 3.
    straight_store = CheckpointStore(str(storage), "straight")
    step3 = straight_store.uri(straight_store.checkpoints()[0].path)
    assert step3.endswith("checkpoint_00000003")
    assert main([*base, "train.run_name=branched", f"--resume={step3}"]) == 0

    expected = final_weights(straight_store, tmp_path)
    for run_name in ("interrupted", "branched"):
        store = CheckpointStore(str(storage), run_name)
        assert store.latest().step == 6
        weights = final_weights(store, tmp_path / run_name)
        assert weights.keys() == expected.keys()
        for name, value in weights.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        steps = [record["step"] for record in metric_records(log_dir, run_name)]
        assert steps == ([3, 6] if run_name == "interrupted" else [6])


@pytest.mark.parametrize("learner_name", ["imm", "part"])
def test_the_other_learners_train_through_the_same_driver(
    learner_name, common_args, log_dir, tmp_path
):
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
    ]
    assert main(args) == 0

    records = metric_records(log_dir, run_name)
    assert [record["step"] for record in records] == [2, 4]
    # The learner's own term and the shared priors, averaged over both workers.
    assert {"loss/recon", "loss/transform", "loss/sep", "loss/total"} <= records[-1].keys()
    assert "val/landmark_error" in records[-1]
    cfg = load_config(None, args)
    learner = build_learner(cfg.model, cfg.loss)
    learner.load_state_dict(final_weights(CheckpointStore(cfg.train.storage, run_name), tmp_path))
    assert learner.landmarks(torch.rand(2, 3, 16, 16)).shape == (2, 4, 2)
