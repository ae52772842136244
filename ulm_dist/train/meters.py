"""What a worker measures between two reports, made run-wide: losses, the step's time split
into data wait and the `PHASES`, DeepSpeed's collectives, throughput, skipped samples, peak
memory.

The loop marks its parts with context managers (`with meter.phase("forward"):`), so timing
sits around the step's math instead of between its lines. `flush` turns the interval's sums
into metrics (a collective: every worker calls it at the same step).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

# The timed parts of a micro-batch after its data arrived, in order.
PHASES = ("forward", "backward", "optimizer")
DATA_WAIT = "data_wait"
Mark = float | torch.cuda.Event


class DeepSpeedCollectives:
    """Time and bytes of DeepSpeed's collectives, from its comms logger
    (`train.time_collectives`, which turns the logger on). The logger waits for each
    collective to finish, so on a GPU they no longer overlap with compute."""

    def reset(self) -> None:
        """Start timing afresh: only what follows counts."""
        # Imported on use, as everywhere: importing DeepSpeed probes for an accelerator.
        from deepspeed.comm import comm

        # The logger keeps a record of every call for the whole run, which nothing here reads.
        comm.reset_log()
        # The logger keeps one timer per kind of collective and never resets it (each call's
        # recorded latency is that timer's running total); reset here, a timer's total is the
        # time its collectives took since this call.
        for timer in comm.timers.get_timers().values():
            timer.reset()

    def read(self) -> tuple[float, int]:
        """Seconds spent in collectives since `reset`, and bytes handed to them."""
        return collective_seconds(), sum(collective_bytes().values())


def collective_seconds() -> float:
    """Seconds this worker spent in DeepSpeed's collectives since the last reset, as its
    comms logger timed them."""
    from deepspeed.comm import comm

    timers = comm.timers.get_timers().values()
    return sum(timer.elapsed(reset=False) for timer in timers) / 1e3  # ms


def collective_bytes() -> dict[str, int]:
    """Bytes this worker handed to each kind of DeepSpeed collective since the last reset,
    summed over calls: the sizes of the tensors DeepSpeed passed in (for reduce-scatter the
    whole input, for all-gather this worker's shard), not the bytes a ring algorithm puts on
    the wire."""
    from deepspeed.comm import comm

    return {
        name: sum(size * record[0] for size, record in calls.items())  # record[0]: call count
        for name, calls in comm.comms_logger.comms_dict.items()
    }


class IntervalMeter:
    """Sums what happens on this worker between two reports.

    Data wait is host time (`next(batches)`); the `PHASES` are timed on the device: on CUDA by
    events that the GPU passes when it gets there, read only at `flush`, so timing adds no
    synchronisation; on a CPU each kernel has finished when its call returns, and the wall
    clock is exact. With `collectives`, the time DeepSpeed's collectives took within the
    phases (waiting for the slowest worker included) and the bytes handed to them."""

    def __init__(
        self,
        device: torch.device,
        collectives: DeepSpeedCollectives | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.device = device
        self.collectives = collectives
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        # Wall time of the whole interval: steps, and the reports and checkpoints in between.
        self.started = self.clock()
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.steps = 0
        self.pairs = 0
        self.skipped = 0
        self.data_wait = 0.0
        self.spans: dict[str, list[tuple[Mark, Mark]]] = {phase: [] for phase in PHASES}
        self.collective_s = 0.0
        self.collective_bytes = 0

    def mark(self) -> Mark:
        """A point in the step's work (see the class doc)."""
        if self.device.type != "cuda":
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as `name`: DATA_WAIT (host time) or one of `PHASES`."""
        if name == DATA_WAIT:
            started = self.clock()
            yield
            self.data_wait += self.clock() - started
            return
        begin = self.mark()
        yield
        self.spans[name].append((begin, self.mark()))

    @contextlib.contextmanager
    def micro_batch(self, pairs: int, skipped: int) -> Iterator[None]:
        """Count a micro-batch of `pairs` (`skipped` bad samples left out of it); with
        `collectives`, only the block's collectives count for it."""
        if self.collectives is not None:
            self.collectives.reset()
        yield
        if self.collectives is not None:
            seconds, handed = self.collectives.read()
            self.collective_s += seconds
            self.collective_bytes += handed
        self.micro_batches += 1
        self.pairs += pairs
        self.skipped += skipped

    def add_losses(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            # Summed on the device: reading a value every step would stall a GPU's queue.
            self.loss_sums[name] = self.loss_sums.get(name, 0) + value.detach().float()

    def end_step(self) -> None:
        self.steps += 1

    def phase_seconds(self) -> list[float]:
        """Seconds spent in each of `PHASES`, summed over the interval's micro-batches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [sum(seconds_between(*span) for span in self.spans[phase]) for phase in PHASES]

    def flush(self, world_size: int) -> dict[str, float | int]:
        names = sorted(self.loss_sums)
        losses = torch.stack([self.loss_sums[name] for name in names]) / self.micro_batches
        wall = self.clock() - self.started
        # Seconds, then megabytes, per step.
        totals = [
            wall,
            self.data_wait,
            *self.phase_seconds(),
            self.collective_s,
            self.collective_bytes / 1e6,
        ]
        counters = torch.tensor(
            [*(total / self.steps for total in totals), self.pairs / wall, self.skipped]
        )
        summed = torch.cat([losses.to(self.device), counters.to(self.device)])
        dist.all_reduce(summed)
        values = summed.tolist()
        loss_sums = values[: len(names)]
        step_time, data_wait, *phases, collectives, collective_mb, pairs_per_s, skipped = values[
            len(names) :
        ]
        metrics: dict[str, float | int] = {
            f"loss/{name}": value / world_size for name, value in zip(names, loss_sums, strict=True)
        }
        metrics.update(
            {
                "time/step_s": step_time / world_size,
                "time/data_wait_s": data_wait / world_size,
                **{
                    f"time/{phase}_s": seconds / world_size
                    for phase, seconds in zip(PHASES, phases, strict=True)
                },
                "throughput/pairs_per_s": pairs_per_s,
                "throughput/pairs_per_s_per_worker": pairs_per_s / world_size,
                "data/skipped": round(skipped),
            }
        )
        if self.collectives is not None:
            metrics["time/collectives_s"] = collectives / world_size
            metrics["comm/collective_mb"] = collective_mb / world_size
        metrics.update(peak_memory_mib(self.device))
        self._reset()
        return metrics


def seconds_between(begin: Mark, end: Mark) -> float:
    if isinstance(begin, torch.cuda.Event):
        return begin.elapsed_time(end) / 1e3  # CUDA events measure milliseconds
    return end - begin


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """The largest worker's peaks so far, in MiB (a collective): resident memory of the worker
    process (its data-loader processes are not counted) and, on CUDA, the tensors allocated
    on its GPU. Both come from counters the OS and the allocator keep, read at reports only."""
    # ru_maxrss is in KiB on Linux.
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10]
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    largest = torch.tensor(peaks, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    names = ("memory/peak_rss_mib", "memory/peak_gpu_mib")
    return dict(zip(names, largest.tolist(), strict=False))
