"""The per-worker meter's run-wide metrics, in one process (a gloo group of one)."""

import time

import pytest
import torch
import torch.distributed as dist
from s3_server import free_port

from ulm_dist.train.worker import IntervalMeter


@pytest.fixture
def process_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_a_report_has_losses_step_time_breakdown_and_peak_memory(process_group):
    meter = IntervalMeter(torch.device("cpu"), time_collectives=True)
    for loss in (1.0, 3.0):
        # Phase boundaries 0.1 s (forward), 0.3 s (backward) and 0.1 s (optimizer) apart.
        marks = [10.0, 10.1, 10.4, 10.5]
        meter.add_micro_batch(
            {"total": torch.tensor(loss)},
            pairs=4,
            skipped=1,
            data_wait=0.25,
            phase_marks=marks,
            collectives=0.05,
            collective_bytes=3_000_000,
        )
        meter.end_step()
    metrics = meter.flush(world_size=1)

    assert metrics["loss/total"] == 2.0
    assert metrics["time/data_wait_s"] == 0.25
    assert metrics["time/forward_s"] == pytest.approx(0.1)
    assert metrics["time/backward_s"] == pytest.approx(0.3)
    assert metrics["time/optimizer_s"] == pytest.approx(0.1)
    assert metrics["time/collectives_s"] == pytest.approx(0.05)
    assert metrics["comm/collective_mb"] == pytest.approx(3.0)
    assert metrics["data/skipped"] == 2
    assert metrics["throughput/pairs_per_s"] > 0
    # This test process holds at least torch: tens of MiB, far from the KiB or byte units.
    assert 20 < metrics["memory/peak_rss_mib"] < 100_000
    assert "memory/peak_gpu_mib" not in metrics  # CPU worker


def test_marks_on_a_cpu_are_the_wall_clock(process_group):
    meter = IntervalMeter(torch.device("cpu"))
    begin = meter.mark()
    time.sleep(0.05)
    assert meter.mark() - begin >= 0.05
    meter.add_micro_batch(
        {"total": torch.tensor(1.0)}, pairs=1, skipped=0, data_wait=0, phase_marks=[0, 1, 2, 3]
    )
    meter.end_step()
    metrics = meter.flush(world_size=1)
    assert "time/collectives_s" not in metrics and "comm/collective_mb" not in metrics
