"""jobs/{celeba-mafl,aflw,cub,h36m}.yaml load through the config loader and keep the papers'
settings (shared/reference/what-the-papers-used.md), so that they cannot rot."""

import re
from pathlib import Path

import pytest

from ulm_dist.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# job -> learner, K, batch, perceptual loss (what-the-papers-used.md: IMM's K=10, batch 50
# and VGG-16 features; Lorenz et al.'s 16 parts, batch 16-32 and pixel reconstruction).
PAPERS = {
    "celeba-mafl": ("imm", 10, 50, "imagenet"),
    "aflw": ("imm", 10, 50, "imagenet"),
    "cub": ("part", 16, 32, "pixels"),
    "h36m": ("part", 16, 32, "pixels"),
}


@pytest.mark.parametrize("job", sorted(PAPERS))
def test_benchmark_job_loads_with_the_papers_settings(job):
    config = load_config(JOBS / f"{job}.yaml")
    name, parts, batch, perceptual = PAPERS[job]
    assert (config.model.name, config.model.num_landmarks) == (name, parts)
    assert (config.model.image_size, config.train.batch_size) == (128, batch)
    assert (config.loss.perceptual, config.train.lr) == (perceptual, 1e-3)
    assert config.data.pairs == "warped" and config.train.run_name == job
    # Trains on the prepared train split, validates on its val split, never on test.
    assert config.data.train == f"data/{job}/train" and config.data.val_spec() == f"data/{job}/val"


def test_imm_jobs_use_the_papers_warps_and_vgg_layers():
    config = load_config(JOBS / "celeba-mafl.yaml")
    data = config.data
    assert (data.warp_rotation_deg, data.warp_scale_std, data.warp_translation_std) == (
        5.0,
        0.1,
        0.1,
    )
    assert config.loss.perceptual_layers[0] == "pixels"
    assert [layer[-1] for layer in config.loss.perceptual_layers[1:]] == ["2"] * 5  # convX_2
    assert load_config(JOBS / "aflw.yaml").train.resume.startswith("runs/celeba-mafl/")


def test_aflw_fine_tunes_past_the_step_of_the_checkpoint_it_resumes():
    # The worker trains while step < train.steps, and the step restored from the checkpoint
    # counts: steps must be the total, beyond the checkpoint's (checkpoint_<step>).
    train = load_config(JOBS / "aflw.yaml").train
    resumed_step = int(re.fullmatch(r"checkpoint_(\d+)", Path(train.resume).name).group(1))
    assert resumed_step == load_config(JOBS / "celeba-mafl.yaml").train.steps
    assert train.steps > resumed_step


def test_part_jobs_use_lorenz_colour_jitter_and_equivariance_weight():
    for job in ("cub", "h36m"):
        config = load_config(JOBS / f"{job}.yaml")
        data = config.data
        assert (data.contrast, data.brightness, data.saturation, data.hue) == (0.5, 0.3, 0.1, 0.3)
        assert config.loss.lambda_transform == 5.0
