"""The benchmark matrix in one command: training through the real stack (Ray Train + DeepSpeed)
for presets x precision x ZeRO stage x workers, each cell with pairs/s, step time split into
data wait, forward, backward, optimizer and collectives, and peak memory; beside them the
plain single-process loop (what the stack costs), the pair loader's rate (data against
consumption) and the accuracy after a small budget. Prints one Markdown table and writes
one JSON. Not a test.

    python -m benchmarks.matrix                  # --quick: what a 2-core CPU machine can do
    python -m benchmarks.matrix --full           # all presets, longer intervals, more steps
    python -m benchmarks.matrix --zero 2 --workers 2 --accuracy-steps 0 [key=value ...]

The columns:
- pairs/s: the median over the reports after the first (start-up), each `--interval` steps.
- x plain: pairs/s over those of the plain PyTorch loop (train_overhead.py) with the same
  preset, precision and per-worker batch in one process. With 2 workers it is also the
  scaling: 2.0 would be perfect.
- step, data wait, forward, backward, optimizer, collectives (ms): medians of what each
  worker's loop measures (train/meters.py's IntervalMeter), averaged over workers. Data wait is the
  host time in `next(batches)`; forward, backward and optimizer are the engine's three calls
  (on a GPU, timed by CUDA events); collectives is the part of those three that DeepSpeed's
  collectives took, waiting for the slowest worker included (`train.time_collectives`, on in
  every cell: on a GPU it makes each collective blocking, so pairs/s is a lower bound). Step
  is wall time over the interval, the reports included.
- collective MB: what each worker hands DeepSpeed's collectives per step (the tensors' sizes;
  a ring all-reduce puts about twice its tensor on the wire). With one worker it is the
  gradients, the volume behind gpu_step.py's scaling table; with two, ZeRO 2 and 3 add their
  gathers of the weights.
- data/use: one pair loader's pairs/s (data_throughput.py's `loader_rate`: same data spec,
  image size and data.num_workers, measured alone) over the pairs/s each worker trains on.
  Above 1 the loader keeps up, given cores of its own; the data-wait column says whether it
  did in the run.
- peak RSS, peak GPU (MiB): the largest worker's, of its training process (loop.py).

Accuracy runs accuracy.py as a subprocess (in-memory data, plain loop) for `--accuracy-steps`
steps. The quick budget shows that the path works, not what the model can learn: the runs
with real budgets are in BENCHMARKS.md's accuracy section.

Without a GPU, fp16 and the paper preset are skipped, and so is bf16 on CPUs without bf16
instructions (the last two unless named in --presets or --precisions: they run, but slowly);
the reason is printed. With GPUs, the cells that need more workers than there are GPUs are
skipped.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from benchmarks.data_throughput import loader_rate
from benchmarks.train_overhead import plain_loop_rates, stack_records
from ulm_dist.config import load_config
from ulm_dist.train.meters import PHASES

QUICK = {
    "presets": ["tiny"],
    "intervals": 2,
    "interval": 5,
    "loader_samples": 512,
    "accuracy_steps": 30,
    "accuracy_samples": 1000,
}
FULL = {
    "presets": ["tiny", "paper"],
    "intervals": 5,
    "interval": 10,
    "loader_samples": 4000,
    "accuracy_steps": 2000,
    "accuracy_samples": 4000,
}
ACCURACY_SCRIPT = Path(__file__).with_name("accuracy.py")
# The step-time columns after data wait, as loop.py reports them (time/<part>_s).
STEP_PARTS = (*PHASES, "collectives")


@dataclass(frozen=True)
class Cell:
    preset: str
    precision: str
    zero: int
    workers: int

    def overrides(self) -> list[str]:
        return [
            f"model.preset={self.preset}",
            f"train.precision={self.precision}",
            f"train.zero_stage={self.zero}",
            # Training alone: periodic validation is no part of the step.
            "data.val=null",
            "train.time_collectives=true",
        ]


def plan(args: argparse.Namespace, gpus: int) -> tuple[list[Cell], list[str]]:
    """The cells this machine can run, and why the others are left out."""
    skipped = []
    presets = args.presets
    if gpus == 0 and "paper" in presets and not args.presets_named:
        presets = [preset for preset in presets if preset != "paper"]
        skipped.append(
            "paper preset: no GPU (128 px, 4 stages; seconds per step on a CPU); name it in "
            "--presets to run it anyway"
        )
    precisions = args.precisions
    if gpus == 0 and "fp16" in precisions:
        precisions = [precision for precision in precisions if precision != "fp16"]
        skipped.append("fp16: needs a GPU (loss scaling and kernels are CUDA-only)")
    if gpus == 0 and "bf16" in precisions and not args.precisions_named and not cpu_has_bf16():
        precisions = [precision for precision in precisions if precision != "bf16"]
        skipped.append(
            "bf16: no GPU, and this CPU has no bf16 instructions (AMX or AVX512-BF16), without "
            "which bf16 trains far slower than fp32 (15x in the plain loop on the AMD EPYC "
            "machine of BENCHMARKS.md); name it in --precisions to run it anyway"
        )
    workers = args.workers
    if gpus and max(workers) > gpus:
        too_many = [count for count in workers if count > gpus]
        workers = [count for count in workers if count <= gpus]
        skipped.append(f"{too_many} workers: one GPU each, and this machine has {gpus}")
    cells = [
        Cell(preset, precision, zero, count)
        for preset, precision, zero, count in itertools.product(
            presets, precisions, args.zero, workers
        )
    ]
    return cells, skipped


def cpuinfo() -> str:
    """Linux's description of the CPU; empty elsewhere."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (Linux's flags for Intel AMX and AVX512-BF16);
    with them the plain loop trains bf16 faster than fp32, without them many times slower."""
    return bool(set(cpuinfo().split()) & {"amx_bf16", "avx512_bf16"})


def measure_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """One cell through `ulm_dist.train`: medians over the reports after the first."""
    records = stack_records(
        [*args.overrides, *cell.overrides()],
        cell.workers,
        args.micro_batch,
        args.intervals,
        args.interval,
    )

    def median(name: str) -> float:
        return statistics.median(record[name] for record in records)

    def peak(name: str) -> float | None:
        values = [record[name] for record in records if name in record]
        return max(values) if values else None

    return {
        "pairs_per_s": median("throughput/pairs_per_s"),
        "pairs_per_s_per_worker": median("throughput/pairs_per_s_per_worker"),
        "step_s": median("time/step_s"),
        "data_wait_s": median("time/data_wait_s"),
        **{f"{phase}_s": median(f"time/{phase}_s") for phase in STEP_PARTS},
        "collective_mb": median("comm/collective_mb"),
        "peak_rss_mib": peak("memory/peak_rss_mib"),
        "peak_gpu_mib": peak("memory/peak_gpu_mib"),
    }


def run_accuracy(args: argparse.Namespace, preset: str, scratch: Path) -> dict[str, Any]:
    """accuracy.py in its own process, for `--accuracy-steps` steps; its summary JSON."""
    out = scratch / "accuracy"
    command = [
        sys.executable,
        str(ACCURACY_SCRIPT),
        "--data",
        "synthetic",
        "--steps",
        str(args.accuracy_steps),
        "--eval-every",
        str(args.accuracy_steps),
        "--train-samples",
        str(args.accuracy_samples),
        "--out",
        str(out),
        f"model.preset={preset}",
        *args.overrides,
    ]
    log = scratch / "accuracy.log"
    with log.open("w") as stream:
        finished = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if finished.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        return {"error": f"accuracy.py exited with {finished.returncode}: {' / '.join(tail)}"}
    summary = json.loads((out / "accuracy.json").read_text())
    keep = ("steps", "pairs_per_s", "landmark_error", "mean_shape_error", "device", "precision")
    return {"preset": preset, **{name: summary[name] for name in keep}}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    names = [line for line in cpuinfo().splitlines() if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
    }


def table(report: dict[str, Any]) -> str:
    """The cells as one Markdown table, ready for BENCHMARKS.md."""
    header = (
        "| preset | precision | ZeRO | workers | pairs/s | x plain | step (ms) | data wait (ms) "
        "| forward (ms) | backward (ms) | optimizer (ms) | collectives (ms) | collective MB "
        "| data/use | peak RSS (MiB) | peak GPU (MiB) |"
    )
    lines = [header, "|---" * header.count(" | ") + "|---|"]

    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    for row in report["cells"]:
        cell = f"| {row['preset']} | {row['precision']} | {row['zero']} | {row['workers']} |"
        if "error" in row:
            lines.append(f"{cell} failed: {row['error']} |")
            continue
        lines.append(
            f"{cell} {number(row['pairs_per_s'], 1)} | {number(row['x_plain'], 2)} "
            f"| {number(1e3 * row['step_s'])} | "
            + " | ".join(number(1e3 * row[f"{part}_s"]) for part in ("data_wait", *STEP_PARTS))
            + f" | {number(row['collective_mb'], 2)} | {number(row['data_over_use'], 1)} "
            f"| {number(row['peak_rss_mib'])} | {number(row['peak_gpu_mib'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: tiny preset, few steps")
    mode.add_argument("--full", action="store_true", help="all presets, longer runs")
    parser.add_argument("--presets", nargs="+", choices=["tiny", "paper"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--zero", nargs="+", type=int, choices=[0, 1, 2, 3], default=[0, 2, 3])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per worker per step")
    parser.add_argument("--intervals", type=int, help="measured reports per cell")
    parser.add_argument("--interval", type=int, help="steps per report")
    parser.add_argument("--loader-samples", type=int, help="pairs the loader rate is timed on")
    parser.add_argument("--accuracy-steps", type=int, help="accuracy.py's budget; 0 skips it")
    parser.add_argument("--accuracy-samples", type=int, help="accuracy.py's synthetic train set")
    parser.add_argument("--out", type=Path, default=Path("bench_out/matrix.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every cell")
    args = parser.parse_args(argv)
    args.presets_named = args.presets is not None
    args.precisions_named = args.precisions is not None
    args.precisions = args.precisions or ["fp32", "bf16"]
    for name, value in (FULL if args.full else QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "settings": vars(args).copy()}
    report["settings"]["out"] = str(args.out)
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    cells, skipped = plan(args, gpus)
    report["skipped"] = skipped
    for reason in skipped:
        print(f"skipped: {reason}", flush=True)

    # A fresh local cluster, not whichever one `ray start` left running on this machine.
    ray.init(address="local", log_to_driver=False, logging_level=logging.ERROR)
    plain: dict[tuple[str, str], float] = {}
    loader: dict[str, float] = {}
    measure = (args.micro_batch, args.intervals, args.interval)
    for preset, precision in dict.fromkeys((cell.preset, cell.precision) for cell in cells):
        cfg = load_config(None, [*args.overrides, f"model.preset={preset}"])
        rates = plain_loop_rates(cfg, *measure, precision=precision, device=device)
        plain[preset, precision] = statistics.median(rates)
        print(f"plain loop, {preset} {precision}: {plain[preset, precision]:.1f} pairs/s")
        if preset not in loader:
            loader[preset] = loader_rate(
                cfg.data, cfg.data.train, cfg.model.image_size, args.loader_samples, 8
            )
            print(f"pair loader, {preset}: {loader[preset]:.1f} pairs/s", flush=True)
    if device == "cuda":
        # The workers share this GPU with the driver: hand back what the plain loop cached.
        torch.cuda.empty_cache()

    rows = []
    for cell in cells:
        print(f"\n== {cell}", flush=True)
        row: dict[str, Any] = asdict(cell)
        started = time.perf_counter()
        try:
            row.update(measure_cell(cell, args))
        except Exception as error:  # a benchmark reports what failed and goes on
            row["error"] = repr(error)[:300]
        else:
            row["wall_s"] = time.perf_counter() - started
            row["x_plain"] = row["pairs_per_s"] / plain[cell.preset, cell.precision]
            row["data_over_use"] = loader[cell.preset] / row["pairs_per_s_per_worker"]
        rows.append(row)
    ray.shutdown()
    report["cells"] = rows
    report["plain_loop_pairs_per_s"] = [
        {"preset": preset, "precision": precision, "pairs_per_s": rate}
        for (preset, precision), rate in plain.items()
    ]
    report["loader_pairs_per_s"] = loader

    if args.accuracy_steps > 0 and cells:
        with tempfile.TemporaryDirectory() as scratch:
            report["accuracy"] = run_accuracy(args, cells[0].preset, Path(scratch))
    report["machine"]["load_average_end"] = os.getloadavg()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    info = report["machine"]
    print(
        f"\n{info['cores']} cores ({info['cpu']}), GPU {info['gpu'] or 'none'}, torch "
        f"{info['torch']}, {info['date']}; load average {info['load_average_start'][0]:.1f} "
        f"at the start, {info['load_average_end'][0]:.1f} at the end; {args.micro_batch} pairs "
        f"per worker and step, medians of {args.intervals} reports of {args.interval} steps"
    )
    print(table(report))
    for row in report["plain_loop_pairs_per_s"]:
        print(f"plain loop: {row}")
    print(f"pair loader (pairs/s, one loader): {loader}")
    if "accuracy" in report:
        print(f"accuracy: {report['accuracy']}")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
