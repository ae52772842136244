import json

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ulm_dist.train.curves import (
    CURVES_NAME,
    LOSSES_TITLE,
    VAL_TITLE,
    training_curves,
    write_training_curves,
)
from ulm_dist.train.metrics_log import MetricsLog, format_duration, progress_line


def record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "loss/total": loss,
        "loss/cycle": loss / 2,
        "time/step_s": 1.0,
        "time/data_wait_s": 0.1,
        "time/forward_s": 0.4,
        "time/backward_s": 0.4,
        "time/optimizer_s": 0.1,
        "throughput/pairs_per_s": 16.0,
        "throughput/pairs_per_s_per_worker": 8.0,
        "data/skipped": 0,
    }


def steps_in_file(log: MetricsLog) -> list[int]:
    return [json.loads(line)["step"] for line in log.path.read_text().splitlines()]


def test_a_resumed_attempt_replaces_what_the_failed_one_logged_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (2, 4, 6):  # the attempt that fails after step 6; last checkpoint at step 4
        assert not log.append(record(step, 1.0))
    assert log.append(record(6, 0.5))  # the resumed attempt reports step 6 again
    assert not log.append(record(8, 0.25))
    log.close()
    assert steps_in_file(log) == [2, 4, 6, 8]
    assert [r["loss/total"] for r in log.records] == [1.0, 1.0, 0.5, 0.25]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # TensorBoard hides the failed attempt's step 6 (purge), so each step shows once.
    scalars = events.Scalars("loss/total")
    assert [(s.step, s.value) for s in scalars] == [(2, 1.0), (4, 1.0), (6, 0.5), (8, 0.25)]


def test_a_rerun_continues_the_log_left_on_disk(tmp_path):
    first = MetricsLog(tmp_path)
    for step in (2, 4, 6):
        first.append(record(step, 1.0))
    first.close()
    rerun = MetricsLog(tmp_path)
    assert [r["step"] for r in rerun.records] == [2, 4, 6]
    assert rerun.append(record(6, 0.7))
    rerun.close()
    assert steps_in_file(rerun) == [2, 4, 6]


def test_the_progress_line_has_step_losses_throughput_data_share_and_eta():
    line = progress_line(record(10, 2.5), total_steps=100)
    assert line == (
        "step  10/100 | loss 2.5000 (cycle 1.2500) | 16.0 pairs/s (8.0/worker) | "
        "data wait 10% | ETA 1m30s"
    )


def test_durations_read_as_minutes_or_hours():
    assert format_duration(59.6) == "1m00s"
    assert format_duration(3725) == "1h02m"


def evaluated(step: int, loss: float, error: float | None) -> dict:
    values = {**record(step, loss), "loss/sep": 0.01 * loss}
    if error is not None:
        values |= {"val/landmark_error": error, "val/mean_shape_error": 20.0}
    return values


def test_the_training_curves_show_every_loss_and_the_validation_error_by_step():
    records = [evaluated(2, 4.0, None), evaluated(4, 2.0, 12.5), evaluated(6, 1.0, None)]
    records.append(evaluated(8, 0.5, 8.0))
    figure = training_curves(records, "demo", mark_step=8)
    losses, validation = figure.axes
    assert (losses.get_title(), validation.get_title()) == (LOSSES_TITLE, VAL_TITLE)
    assert figure.get_suptitle() == "demo"
    lines = {line.get_label(): line for line in losses.lines}
    assert set(lines) == {"cycle", "sep", "total", "step 8"}
    np.testing.assert_allclose(lines["total"].get_xdata(), [2, 4, 6, 8])
    np.testing.assert_allclose(lines["total"].get_ydata(), [4.0, 2.0, 1.0, 0.5])
    np.testing.assert_allclose(lines["sep"].get_ydata(), [0.04, 0.02, 0.01, 0.005])
    assert losses.get_yscale() == "log"
    lines = {line.get_label(): line for line in validation.lines}
    # Only the evaluated steps: no gaps drawn as zeros.
    np.testing.assert_allclose(lines["val/landmark_error"].get_xdata(), [4, 8])
    np.testing.assert_allclose(lines["val/landmark_error"].get_ydata(), [12.5, 8.0])
    np.testing.assert_allclose(lines["val/mean_shape_error"].get_ydata(), [20.0, 20.0])
    np.testing.assert_allclose(lines["step 8"].get_xdata(), [8, 8])


def test_a_run_without_validation_gets_the_losses_panel_alone_written_beside_its_log(
    tmp_path,
):
    assert write_training_curves(tmp_path) is None  # no metrics.jsonl: nothing to draw
    log = MetricsLog(tmp_path / "run")
    for step in (2, 4):
        log.append(record(step, 1.0 / step))
    log.close()
    path = write_training_curves(tmp_path / "run")
    assert path == tmp_path / "run" / CURVES_NAME
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (losses,) = training_curves(log.records).axes
    assert losses.get_title() == LOSSES_TITLE
    assert {line.get_label() for line in losses.lines} == {"cycle", "total"}
