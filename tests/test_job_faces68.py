"""jobs/faces68.yaml: the real-faces job loads, and its K=30 variant is the documented override."""

from pathlib import Path

from ulm_dist.config import load_config

JOB = Path(__file__).resolve().parents[1] / "jobs" / "faces68.yaml"


def test_faces68_job_trains_the_tiny_model_at_32px_and_validates_on_held_out_people():
    config = load_config(JOB)
    assert (config.model.image_size, config.model.num_landmarks) == (32, 10)
    assert config.model.channels == load_config().model.channels  # the tiny preset's widths
    assert config.data.train.endswith("/train") and config.data.val_spec().endswith("/val")


def test_faces68_k30_variant_is_two_overrides():
    # The overrides the job's header gives for the second preset.
    config = load_config(JOB, ["model.num_landmarks=30", "train.run_name=faces68-k30"])
    assert (config.model.num_landmarks, config.train.run_name) == (30, "faces68-k30")
