"""One GPU, one run, one Markdown table: today's eager step against `train.compile` +
`train.channels_last`, DeepSpeed's ZeRO stages against the plain loop, the data loader
against the new speed, and `python -m ulm_dist.train` end to end through Ray (issue 19).

    python benchmarks/gpu_check.py                  # on one GPU: under 8 minutes
    python benchmarks/gpu_check.py --cpu-smoke      # the same stages, tiny, on a CPU

Each stage is its own process with its own time limit (and all of them together a budget,
`--budget-s`), so a stage that fails or hangs leaves the other rows in the table, marked
with what went wrong. The stages, in order, the ones that matter most first (a stage the
budget cut can be run again alone, `--stages tiny zero3`, with the compile cache warm):

- paper: `gpu_step.py`, the paper preset in bf16 at batch 64, plain loop, eager against
  compile + channels-last, with a torch.profiler summary of the latter's top kernels;
- zero: the plain loop with compile + channels-last against DeepSpeed's engine at ZeRO 0
  and 2 with the same options, peak GPU memory of each;
- train: `python -m ulm_dist.train` on one GPU worker with compile + channels-last, a short
  run of the paper preset through Ray, DeepSpeed (ZeRO 2, bf16, batch 64: the zero stage's
  graph, so inductor's cache spares most of its compile) and a checkpoint;
- data: `data_throughput.py` at 128 px, one loader process, against the fastest paper
  pairs/s measured above;
- tiny: the tiny preset, eager against compile + channels-last (other shapes: a compile of
  its own);
- zero3: ZeRO 3 with compile + channels-last, last because DeepSpeed's parameter hooks
  break the compiled graph at every layer (measured on CPU) and it may use up its time.

`--cpu-smoke` runs every stage with tiny sizes and the `aot_eager` backend (inductor takes
minutes to compile on a CPU), so that the whole script is tried without a GPU; its numbers
mean nothing (3 minutes on a loaded 2-core machine). Everything the stages write, their
JSON and logs, goes to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
FAST = "compile+channels-last"
# The loader's pairs/s are compared with this when the paper stage gave none: the eager
# paper preset on an H100 (BENCHMARKS.md).
EAGER_PAPER_PAIRS_PER_S = 255.0


@dataclass(frozen=True)
class Sizes:
    """What the stages run at: the GPU sizes, or the CPU smoke's."""

    paper: list[str]  # gpu_step.py's preset, precision and batch
    tiny: list[str]
    model: list[str]  # config overrides of every stage's model
    steps: list[str]  # gpu_step.py's --steps and --warmup
    backend: str
    profile_steps: int
    data: list[str]  # data_throughput.py's sizes
    train: list[str]  # ulm_dist.train overrides
    limits_s: dict[str, float] = field(default_factory=dict)


GPU = Sizes(
    paper=["--preset", "paper", "--precision", "bf16", "--batch", "64"],
    tiny=["--preset", "tiny", "--precision", "bf16", "--batch", "64"],
    model=[],
    steps=["--steps", "20", "--warmup", "5"],
    backend="inductor",
    profile_steps=5,
    data=["--sizes", "128", "--samples", "1024", "--generator-samples", "64", "--batch", "64"],
    train=[
        "model.preset=paper",
        "train.device=gpu",
        "train.batch_size=64",
        "train.steps=60",
        "train.log_every=20",
        "train.checkpoint_every=60",
        "data.synthetic_samples=1024",
    ],
    limits_s={"paper": 210, "zero": 180, "train": 150, "data": 60, "tiny": 90, "zero3": 120},
)
# 16 px, two stages, K = 4, batch 2: every stage's code runs, in seconds rather than minutes.
SMOKE_MODEL = ["model.image_size=16", "model.channels=[8,16]", "model.num_landmarks=4"]
CPU_SMOKE = Sizes(
    paper=["--preset", "tiny", "--precision", "fp32", "--batch", "2"],
    tiny=["--preset", "tiny", "--precision", "fp32", "--batch", "2"],
    model=SMOKE_MODEL,
    steps=["--steps", "1", "--warmup", "1"],
    backend="aot_eager",
    profile_steps=1,
    data=["--sizes", "16", "--samples", "32", "--generator-samples", "8", "--batch", "8"],
    train=[
        "train.device=cpu",
        "train.batch_size=2",
        "train.steps=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.compile_backend=aot_eager",
        "data.synthetic_samples=16",
    ],
    limits_s={"paper": 120, "zero": 120, "tiny": 120, "data": 120, "train": 240, "zero3": 120},
)
STAGES = ("paper", "zero", "train", "data", "tiny", "zero3")
TOP_KERNELS = 5  # of the profile's ten, in the table (all ten are in paper.json)


@dataclass
class Stage:
    """One stage's outcome: its JSON report, or why there is none."""

    name: str
    report: dict[str, Any] | None = None
    problem: str | None = None
    seconds: float = 0.0


def run_stage(
    name: str, command: list[str], limit_s: float, out: Path, read: Callable[[], dict]
) -> Stage:
    """Run `command` with its output in `out/<name>.log`; `read` then gives its report."""
    log_path = out / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        # A session of its own, so that a stage past its limit is stopped with everything it
        # started (the train stage's Ray processes, the loaders' workers).
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=limit_s)
            problem = None if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            stop_session(process)
            problem = f"timed out after {limit_s:.0f} s"
    stage = Stage(name, seconds=time.perf_counter() - started, problem=problem)
    if problem is None:
        try:
            stage.report = read()
        except (OSError, ValueError, KeyError, IndexError) as error:
            stage.problem = f"no report: {error!r}"
    if stage.problem:
        stage.problem += f" (log: {log_path})"
    return stage


def stop_session(process: subprocess.Popen, grace_s: float = 20) -> None:
    """Ctrl-C to the process's session (ulm_dist.train then stops its Ray workers), and
    SIGKILL to whatever is left after `grace_s`."""
    os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):  # the session may be gone already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def gpu_step(sizes: Sizes, preset: list[str], out: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(BENCHMARKS / "gpu_step.py"),
        *preset,
        *sizes.steps,
        "--compile-backend",
        sizes.backend,
        "--out",
        str(out / f"{name}.json"),
        *extra,
        "--",  # config overrides last, apart: a bare --zero would take them as stages
        *sizes.model,
    ]


def stage_command(name: str, sizes: Sizes, out: Path, stages: dict[str, Stage]) -> list[str]:
    """The command of stage `name`; `stages` holds those that ran before it."""
    if name == "paper":
        return gpu_step(
            sizes, sizes.paper, out, name, "--plain", "eager", FAST, "--zero",
            "--profile", str(sizes.profile_steps),
        )  # fmt: skip
    if name in ("zero", "zero3"):
        zero = ["0", "2"] if name == "zero" else ["3"]
        return gpu_step(
            sizes, sizes.paper, out, name, "--plain", FAST, "--zero", *zero, "--zero-with", FAST
        )
    if name == "tiny":
        return gpu_step(sizes, sizes.tiny, out, name, "--plain", "eager", FAST, "--zero")
    if name == "data":
        return [
            sys.executable,
            str(BENCHMARKS / "data_throughput.py"),
            *sizes.data,
            "--workers", "1",
            "--gpu-pairs-per-s", f"{fastest_paper_pairs_per_s(stages):.1f}",
            "--out", str(out / "data.json"),
        ]  # fmt: skip
    if name == "train":
        # As a user runs it: a local Ray cluster, one worker, the speed options on.
        run = out / "train_run"
        return [
            sys.executable, "-m", "ulm_dist.train",
            "train.num_workers=1", "train.compile=true", "train.channels_last=true",
            "train.run_name=gpu_check", "train.warmup_steps=5",
            f"train.storage={run / 'runs'}", f"train.log_dir={run / 'logs'}",
            f"data.cache_dir={run / 'cache'}",
            *sizes.model, *sizes.train,
        ]  # fmt: skip
    raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")


def stage_report(name: str, out: Path) -> dict[str, Any]:
    """What stage `name` measured: its JSON, or for the train stage the run's last metrics
    and its checkpoints."""
    if name != "train":
        return json.loads((out / f"{name}.json").read_text())
    run = out / "train_run"
    metrics = (run / "logs" / "gpu_check" / "metrics.jsonl").read_text().splitlines()
    checkpoints = sorted(
        path.name for path in (run / "runs" / "gpu_check").glob("checkpoint_*") if path.is_dir()
    )
    return {"last": json.loads(metrics[-1]), "checkpoints": checkpoints}


def fastest_paper_pairs_per_s(stages: dict[str, Stage]) -> float:
    paper = stages.get("paper")
    if paper is None or paper.report is None:
        return EAGER_PAPER_PAIRS_PER_S
    return max(row["pairs_per_s"] for row in paper.report["results"] if "pairs_per_s" in row)


def table(stages: dict[str, Stage], device: str) -> str:
    """The one Markdown table of every stage's rows."""
    lines = [
        f"{device}, {time.strftime('%Y-%m-%d')}",
        "",
        "| stage | what | pairs/s | vs the stage's first row | MFU | peak memory (MiB) "
        "| first step (s) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in stages.values():
        if stage.report is None:
            lines.append(f"| {stage.name} | - | - | - | - | - | - | {stage.problem} |")
        elif stage.name in ("paper", "zero", "tiny", "zero3"):
            lines += step_rows(stage)
        elif stage.name == "data":
            lines.append(data_row(stage.report))
        else:
            lines.append(train_row(stage.report))
    return "\n".join(lines)


def number(value: float | None, text: str) -> str:
    return "-" if value is None else text.format(value)


def step_rows(stage: Stage) -> list[str]:
    report = stage.report
    setting = f"{report['preset']} {report['image_size']} px, {report['precision']}"
    rows = []
    for row in report["results"]:
        if "error" in row:
            rows.append(f"| {stage.name} | {row['engine']} | - | - | - | - | - | {row['error']} |")
            continue
        rows.append(
            f"| {stage.name} | {row['engine']}, {setting}, batch {report['batch']} "
            f"| {row['pairs_per_s']:,.1f} | {row['vs_first']:.2f}x "
            f"| {number(row['mfu'], '{:.1%}')} | {number(row['peak_memory_mb'], '{:,.0f}')} "
            f"| {row['first_step_s']:.1f} | {report['compile_backend']} |"
        )
    for kernel in report.get("top_kernels", [])[:TOP_KERNELS]:
        rows.append(
            f"| {stage.name} | top kernel `{kernel['name'][:60]}` | - | - | - | - | - "
            f"| {kernel['share']:.1%} of the self time, {kernel['ms_per_step']:.2f} ms "
            f"and {kernel['calls_per_step']:g} calls per step |"
        )
    return rows


def data_row(report: dict[str, Any]) -> str:
    # The cycle model's unpaired pairs from local disk: the common case.
    row = next(
        r for r in report["loaders"] if r["pairs"] == "unpaired" and r["source"] == "local disk"
    )
    needed = row["processes_per_gpu"]
    verdict = "keeps up" if needed <= 1 else f"does not keep up: {needed:.1f} processes needed"
    return (
        f"| data | one loader process, {row['size']} px, unpaired, local disk "
        f"| {row['pairs_per_s_per_process']:,.1f} | - | - | - | - "
        f"| {verdict} at {report['gpu_pairs_per_s']:,.1f} pairs/s |"
    )


def train_row(report: dict[str, Any]) -> str:
    last = report["last"]
    gpu = last.get("memory/peak_gpu_mib")
    return (
        f"| train | python -m ulm_dist.train, 1 worker, {FAST}, step {last['step']} "
        f"| {last['throughput/pairs_per_s']:,.1f} | - | - | {number(gpu, '{:,.0f}')} | - "
        f"| loss {last['loss/total']:.3f}; checkpoints {', '.join(report['checkpoints'])} |"
    )


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, aot_eager")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument(
        "--budget-s", type=float, default=450, help="all stages together (each has its limit)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_check"))
    args = parser.parse_args()
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    stages: dict[str, Stage] = {}
    for name in STAGES:
        if name not in args.stages:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            stages[name] = Stage(
                name, problem=f"not run: the {args.budget_s:.0f} s budget is spent"
            )
            continue
        command = stage_command(name, sizes, args.out, stages)
        limit_s = min(sizes.limits_s[name], left)
        stages[name] = run_stage(
            name, command, limit_s, args.out, lambda name=name: stage_report(name, args.out)
        )
        print(f"{name}: {stages[name].seconds:.0f} s, {stages[name].problem or 'done'}", flush=True)
    print()
    smoke = " (CPU smoke: the sizes are too small for the numbers to mean anything)"
    print(table(stages, device_name() + smoke * args.cpu_smoke))


if __name__ == "__main__":
    main()
