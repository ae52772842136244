"""The per-worker meter's run-wide metrics, in one process (a gloo group of one)."""

import time

import pytest
import torch
import torch.distributed as dist
from s3_server import free_port

from ulm_dist.train.meters import DATA_WAIT, IntervalMeter


@pytest.fixture
def process_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


class FakeCollectives:
    """Collectives that took 0.05 s and were handed 3 MB in every micro-batch."""

    def reset(self) -> None:
        pass

    def read(self) -> tuple[float, int]:
        return 0.05, 3_000_000


def test_a_report_has_losses_step_time_breakdown_and_peak_memory(process_group):
    clock = FakeClock()
    meter = IntervalMeter(torch.device("cpu"), FakeCollectives(), clock=clock)
    for loss in (1.0, 3.0):
        with meter.phase(DATA_WAIT):
            clock.now += 0.25
        with meter.micro_batch(pairs=4, skipped=1):
            # Phases 0.1 s (forward), 0.3 s (backward) and 0.1 s (optimizer) long.
            for phase, seconds in (("forward", 0.1), ("backward", 0.3), ("optimizer", 0.1)):
                with meter.phase(phase):
                    clock.now += seconds
        meter.add_losses({"total": torch.tensor(loss)})
        meter.end_step()
    metrics = meter.flush(world_size=1)

    assert metrics["loss/total"] == 2.0
    assert metrics["time/data_wait_s"] == pytest.approx(0.25)
    assert metrics["time/forward_s"] == pytest.approx(0.1)
    assert metrics["time/backward_s"] == pytest.approx(0.3)
    assert metrics["time/optimizer_s"] == pytest.approx(0.1)
    assert metrics["time/step_s"] == pytest.approx(0.75)
    assert metrics["time/collectives_s"] == pytest.approx(0.05)
    assert metrics["comm/collective_mb"] == pytest.approx(3.0)
    assert metrics["data/skipped"] == 2
    assert metrics["throughput/pairs_per_s"] == pytest.approx(8 / 1.5)
    # This test process holds at least torch: tens of MiB, far from the KiB or byte units.
    assert 20 < metrics["memory/peak_rss_mib"] < 100_000
    assert "memory/peak_gpu_mib" not in metrics  # CPU worker


def test_marks_on_a_cpu_are_the_wall_clock(process_group):
    meter = IntervalMeter(torch.device("cpu"))
    begin = meter.mark()
    time.sleep(0.05)
    assert meter.mark() - begin >= 0.05
    with meter.micro_batch(pairs=1, skipped=0), meter.phase("forward"):
        time.sleep(0.01)
    meter.add_losses({"total": torch.tensor(1.0)})
    meter.end_step()
    metrics = meter.flush(world_size=1)
    assert metrics["time/forward_s"] >= 0.01
    assert "time/collectives_s" not in metrics and "comm/collective_mb" not in metrics
