"""What the distributed stack costs: training throughput through Ray Train + DeepSpeed with
one worker against a plain single-process PyTorch loop doing the same work (same model,
batch, precision, optimizer, clipping and data loader), then 2 workers against 1. Not a test:
it prints numbers.

    .venv/bin/python benchmarks/train_overhead.py [--intervals 6] [--interval 10] [key=value ...]

Both sides are timed in intervals of `--interval` steps after one warm-up interval: the stack
by the wall time between its reports (so the reports count; its one checkpoint, at the end,
does not), the plain loop by the same clock around the same number of steps. On a machine
shared with other work single intervals swing by more than the effect measured, so it prints
the median and the best interval of each side; the best is the closest to an unloaded
machine. Each side trains with one PyTorch thread, which is what Ray gives a worker that
reserves one CPU, and one data-loader process.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from ulm_dist.config import Config, load_config
from ulm_dist.data import make_pair_loader, prepare_shards
from ulm_dist.models import build_learner
from ulm_dist.train.driver import train
from ulm_dist.train.metrics_log import MetricsLog
from ulm_dist.train.worker import seed_everything


def plain_loop_rates(
    cfg: Config,
    micro_batch: int,
    intervals: int,
    interval: int,
    precision: str = "fp32",
    device: str = "cpu",
) -> list[float]:
    """Pairs/s of a bare PyTorch loop (AdamW, gradient clipping, the same pair loader), one
    value per interval after the warm-up interval. bf16 is autocast, the plain-PyTorch way to
    what DeepSpeed's bf16 does with bf16 weights and fp32 master copies."""
    torch.set_num_threads(1)
    seed_everything(cfg.train.seed)
    learner = build_learner(cfg.model, cfg.loss).to(device)
    trainable = [parameter for parameter in learner.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    autocast = torch.autocast(
        torch.device(device).type, torch.bfloat16, enabled=precision == "bf16"
    )
    shards = prepare_shards(cfg.data, cfg.data.train, "train", image_size=cfg.model.image_size)
    loader = make_pair_loader(
        cfg.data, shards, cfg.model.image_size, micro_batch, rank=0, world_size=1, seed=0
    )
    batches = iter(loader)
    rates = []
    for _ in range(1 + intervals):
        started = time.perf_counter()
        for _ in range(interval):
            batch = next(batches)
            with autocast:
                losses = learner(batch["image_i"].to(device), batch["image_j"].to(device))
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(interval * micro_batch / (time.perf_counter() - started))
    return rates[1:]


def stack_records(
    overrides: list[str], workers: int, micro_batch: int, intervals: int, interval: int
) -> list[dict]:
    """The metrics records of `ulm_dist.train` on `workers` workers (`micro_batch` pairs per
    worker and step), one per report of `interval` steps, the first (start-up: loader
    workers, first batches) left out."""
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(
            None,
            [
                *overrides,
                f"train.num_workers={workers}",
                f"train.batch_size={workers * micro_batch}",
                f"train.steps={(1 + intervals) * interval}",
                f"train.log_every={interval}",
                f"train.checkpoint_every={(1 + intervals) * interval}",
                f"train.storage={scratch}/runs",
                f"train.log_dir={scratch}/logs",
                f"train.run_name=overhead-{workers}",
            ],
        )
        train(cfg)
        records = MetricsLog(Path(scratch) / "logs" / cfg.train.run_name).records
    return records[1:]


def stack_rates(
    overrides: list[str], workers: int, micro_batch: int, intervals: int, interval: int
) -> list[float]:
    """Pairs/s of `ulm_dist.train` on `workers` workers, one value per report after the
    first."""
    records = stack_records(overrides, workers, micro_batch, intervals, interval)
    return [record["throughput/pairs_per_s"] for record in records]


def summary(name: str, rates: list[float], reference: list[float] | None, unit: str) -> str:
    median, best = statistics.median(rates), max(rates)
    line = f"{name:<30}: median {median:6.2f}, best {best:6.2f} pairs/s"
    if reference:
        line += (
            f"  = {median / statistics.median(reference):.3f} (median), "
            f"{best / max(reference):.3f} (best) x {unit}"
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--intervals", type=int, default=6, help="measured intervals per side")
    parser.add_argument("--interval", type=int, default=10, help="steps per interval")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per worker per step")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.image_size=64")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    # A fresh local cluster, not whichever one `ray start` left running on this machine.
    ray.init(address="local", log_to_driver=False, logging_level=logging.ERROR)

    measure = (args.micro_batch, args.intervals, args.interval)
    # The plain loop runs on both sides of the 1-worker stack, to share the machine's drift.
    plain = plain_loop_rates(cfg, *measure)
    one_worker = stack_rates(args.overrides, 1, *measure)
    plain += plain_loop_rates(cfg, *measure)
    two_workers = stack_rates(args.overrides, 2, *measure)

    print(
        f"\nmodel {cfg.model.preset} {cfg.model.image_size}px, {args.micro_batch} pairs per "
        f"step per worker, ZeRO-{cfg.train.zero_stage}, fp32 on CPU, intervals of "
        f"{args.interval} steps"
    )
    print(summary("plain PyTorch loop, 1 process", plain, None, ""))
    print(summary("Ray + DeepSpeed, 1 worker", one_worker, plain, "plain"))
    print(summary("Ray + DeepSpeed, 2 workers", two_workers, one_worker, "1 worker"))


if __name__ == "__main__":
    main()
