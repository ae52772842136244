"""Training-step speed of one accelerator: img pairs/s, step-time breakdown, peak memory and
model FLOPs utilisation (MFU), for a plain PyTorch loop and for DeepSpeed's engine (one
process, ZeRO stages as asked), then the expected throughput of 8, 64 and 512 GPUs from the
measured step time and gradient volume. Not a test: it prints tables and writes JSON.

    python benchmarks/gpu_step.py --preset paper --precision bf16 --batch 32 --zero 0 2 3
    python benchmarks/gpu_step.py --preset paper --plain eager compile+channels-last --zero \
        --profile 3                 # eager against train.compile + train.channels_last

FLOPs are counted by torch's FlopCounterMode over one whole step (forward and backward of
the learner, the frozen VGG included, since its backward to the images is real work), so
MFU = counted FLOPs per step / step time / the GPU's dense bf16 (or fp32) peak. Data come
from memory: this measures the model and the engine, `data_throughput.py` the loaders.

`--plain` lists the plain-loop variants to time side by side in this one process: `eager`
(today's NCHW step) or `+`-joined speed options, `compile` (`train.compile`, with
`--compile-backend`) and `channels-last` (`train.channels_last`), applied by the training
path's own functions (`engine.convolutions_in_channels_last`, the in-place compile of
`engine.build_engine`). `--zero-with` applies options to the DeepSpeed rows, which are built
by `engine.build_engine` itself. Every row reports its first step's time (`first_step_s`,
compilation included) and its pairs/s against the first plain row's (`vs_first`).
`--profile N` adds the top kernels of N steps of the last plain variant (torch.profiler,
by self time on the GPU, on the CPU without one).

The gradient volume is measured: after its timed steps, each DeepSpeed row runs one more
step with DeepSpeed's comms logger on and records the bytes handed to each collective
(`collective_bytes`). The scaling table takes the all-reduce of a ZeRO 0 or 2 row (in one
process DeepSpeed still all-reduces every gradient once a step); without one it falls back
to trainable parameters x bytes per gradient, and says so (`gradient_bytes_source`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ulm_dist.config import load_config
from ulm_dist.models import build_learner
from ulm_dist.train.engine import (
    build_engine,
    convolutions_in_channels_last,
    deepspeed_config,
    skip_shared_memory_all_reduce,
)
from ulm_dist.train.meters import DeepSpeedCollectives, collective_bytes

# The local S3 server (and its free-port helper) is test tooling in tests/; benchmarks run
# from a checkout, which has that folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import free_port

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s.
PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}
# Scaling assumptions: ring all-reduce moves 2 (N-1)/N of the gradient bytes per GPU; NVLink
# inside an 8-GPU node, 400 Gb/s InfiniBand per GPU between nodes.
BANDWIDTH = {"nvlink": 450e9 * 0.8, "infiniband": 50e9 * 0.8}
SPEED_OPTIONS = ("compile", "channels-last")


def speed_options(variant: str) -> set[str]:
    """`eager` -> no option; `compile+channels-last` -> both (see the module doc)."""
    options = set() if variant == "eager" else set(variant.split("+"))
    unknown = options - set(SPEED_OPTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{variant}: expected eager or options from {SPEED_OPTIONS} joined by +"
        )
    return options


def peak_flops(precision: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((p[precision] for key, p in PEAKS.items() if key in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch(size: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(2, size, 3, image_size, image_size, generator=generator)
    return images[0].to(device), images[1].to(device)


def count_flops(learner, pair) -> int:
    with FlopCounterMode(display=False) as counter:
        learner(*pair)["total"].backward()
    learner.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def plain_loop(
    cfg, pair, precision: str, steps: int, warmup: int, variant: str, compile_backend: str
) -> dict:
    """Forward, backward and optimizer timed apart (a sync between them) over `steps`."""
    options = speed_options(variant)
    device = pair[0].device
    learner = build_learner(cfg.model, cfg.loss).to(device)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, cfg.train.lr)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    with autocast:
        flops = count_flops(learner, pair)
    if "channels-last" in options:
        convolutions_in_channels_last(learner)
    if "compile" in options:
        # Dynamo does not guard on module hooks: without a reset, a variant would run the
        # graph an earlier one compiled without its channels-last hooks.
        torch._dynamo.reset()
        learner.compile(backend=compile_backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast:
            losses = learner(*pair)
        sync()
        t1 = time.perf_counter()
        losses["total"].backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step == 0:
            first_step_s = time.perf_counter() - t0  # includes the compilation
        if step >= warmup:
            parts["forward"] += t1 - t0
            parts["backward"] += t2 - t1
            parts["optimizer"] += time.perf_counter() - t2
    step_s = sum(parts.values()) / steps
    return {
        "engine": "plain" + (f" {variant}" if options else ""),
        "step_s": step_s,
        "first_step_s": first_step_s,
        **{f"{name}_s": value / steps for name, value in parts.items()},
        "flops_per_step": flops,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_memory_mb": peak_memory_mb(device),
        "learner": learner,
        "optimizer": optimizer,
    }


def top_kernels(row: dict, pair, precision: str, steps: int, count: int = 10) -> list[dict]:
    """The `count` kernels with the most self time over `steps` more steps of a plain row's
    learner: on the GPU its kernels, on a CPU its operators."""
    from torch.profiler import ProfilerActivity, profile

    learner, optimizer = row["learner"], row["optimizer"]
    on_gpu = pair[0].device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu
    autocast = torch.autocast(pair[0].device.type, torch.bfloat16, enabled=precision == "bf16")
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            with autocast:
                losses = learner(*pair)
            losses["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if getattr(e, attribute) > 0]
    total = sum(getattr(e, attribute) for e in events)
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [
        {
            "name": event.key,
            "calls_per_step": event.count / steps,
            "ms_per_step": getattr(event, attribute) / 1e3 / steps,
            "share": getattr(event, attribute) / total,
        }
        for event in events[:count]
    ]


def deepspeed_loop(
    cfg,
    pair,
    precision: str,
    zero: int,
    steps: int,
    warmup: int,
    variant: str,
    compile_backend: str,
) -> dict:
    """The same step through the training path's DeepSpeed engine in one process (world
    size 1), with the speed options of `variant`."""
    import deepspeed

    options = speed_options(variant)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # another run may hold a fixed one
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    skip_shared_memory_all_reduce()
    deepspeed.init_distributed(verbose=False)
    train = dataclasses.replace(cfg.train, zero_stage=zero, batch_size=len(pair[0]))
    torch._dynamo.reset()  # as in `plain_loop`: each row compiles its own graphs
    engine = build_engine(
        build_learner(cfg.model, cfg.loss),
        deepspeed_config(train, 1, precision),
        compile_backend=compile_backend if "compile" in options else None,
        channels_last="channels-last" in options,
    )
    dtype, _ = engine.get_data_types()
    inputs = [image.to(engine.device, dtype) for image in pair]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            started = time.perf_counter()
        t0 = time.perf_counter()
        engine.backward(engine(*inputs)["total"])
        engine.step()
        if step == 0:
            sync()
            first_step_s = time.perf_counter() - t0
    sync()
    result = {
        "engine": f"deepspeed-zero{zero}" + (f" {variant}" if options else ""),
        "step_s": (time.perf_counter() - started) / steps,
        "first_step_s": first_step_s,
        "peak_memory_mb": peak_memory_mb(engine.device),
    }
    # The logger makes each collective blocking, so it stays off while the steps are timed.
    deepspeed.comm.configure(enabled=True, prof_all=True)
    DeepSpeedCollectives().reset()
    engine.backward(engine(*inputs)["total"])
    engine.step()
    result["collective_bytes"] = collective_bytes()
    deepspeed.comm.configure(enabled=False)
    engine.destroy()
    return result


def measured_gradient_bytes(results: list[dict]) -> tuple[int | None, str]:
    """The all-reduce volume of the first ZeRO 0 or 2 row that ran, and where it came from."""
    for row in results:
        if row["engine"].split()[0] in ("deepspeed-zero0", "deepspeed-zero2") and (
            "collective_bytes" in row
        ):
            return row["collective_bytes"].get("all_reduce"), f"measured: {row['engine']}"
    return None, ""


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def scaling_table(step_s: float, per_gpu_batch: int, gradient_bytes: int) -> list[dict]:
    """Expected pairs/s at 8, 64 and 512 GPUs: data parallel, all-reduce of every gradient
    once per step, either not overlapped with the backward pass (lower bound) or fully hidden
    behind it (upper bound, capped by the compute)."""
    rows = []
    for gpus in (8, 64, 512):
        bandwidth = BANDWIDTH["nvlink"] if gpus <= 8 else BANDWIDTH["infiniband"]
        comm_s = 2 * (gpus - 1) / gpus * gradient_bytes / bandwidth
        rows.append(
            {
                "gpus": gpus,
                "allreduce_ms": round(1e3 * comm_s, 3),
                "pairs_per_s_no_overlap": round(gpus * per_gpu_batch / (step_s + comm_s)),
                "pairs_per_s_full_overlap": round(gpus * per_gpu_batch / max(step_s, comm_s)),
            }
        )
    return rows


def tables(report: dict) -> str:
    """The engines and the scaling estimate as Markdown tables, ready for BENCHMARKS.md."""

    def ms(row: dict, name: str) -> str:
        return f"{1e3 * row[name]:,.1f}" if row.get(name) is not None else "-"

    def number(value: float | None, text: str) -> str:
        return "-" if value is None else text.format(value)

    lines = [
        f"{report['device']}, preset {report['preset']} ({report['image_size']} px, "
        f"K={report['num_landmarks']}), {report['precision']}, batch {report['batch']}",
        "",
        "| engine | step (ms) | forward / backward / optimizer (ms) | pairs/s | vs first "
        "| TFLOP/s | MFU | peak memory (MiB) | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['engine']} | failed: {row['error']} |")
            continue
        parts = " / ".join(ms(row, f"{phase}_s") for phase in ("forward", "backward", "optimizer"))
        lines.append(
            f"| {row['engine']} | {ms(row, 'step_s')} | {parts} | {row['pairs_per_s']:,.1f} "
            f"| {row['vs_first']:.2f}x | {row['achieved_tflops']:.2f} "
            f"| {number(row['mfu'], '{:.1%}')} | {number(row['peak_memory_mb'], '{:,.0f}')} "
            f"| {row['first_step_s']:.1f} |"
        )
    if report.get("top_kernels"):
        lines += [
            "",
            f"Top kernels of `{report['profiled']}` by self time",
            "",
            "| kernel | calls per step | ms per step | share |",
            "|---|---|---|---|",
        ]
        for kernel in report["top_kernels"]:
            lines.append(
                f"| `{kernel['name'][:80]}` | {kernel['calls_per_step']:g} "
                f"| {kernel['ms_per_step']:.2f} | {kernel['share']:.1%} |"
            )
    lines += [
        "",
        f"Gradient volume {report['gradient_bytes']:,} bytes per step "
        f"({report['gradient_bytes_source']}); scaled from the step of {report['scaling_from']}",
        "",
        "| GPUs | all-reduce per step (ms) | pairs/s, no overlap | pairs/s, full overlap |",
        "|---|---|---|---|",
    ]
    for row in report["scaling"]:
        lines.append(
            f"| {row['gpus']} | {row['allreduce_ms']} | {row['pairs_per_s_no_overlap']:,} "
            f"| {row['pairs_per_s_full_overlap']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch", type=int, default=32, help="image pairs per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--plain", nargs="+", default=["eager"], help="plain-loop variants (see the module doc)"
    )
    parser.add_argument("--zero", type=int, nargs="*", default=[2], help="DeepSpeed stages")
    parser.add_argument(
        "--zero-with", default="eager", help="speed options of the DeepSpeed rows, as --plain's"
    )
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument(
        "--profile", type=int, default=0, help="steps of the last plain variant to profile"
    )
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's peak")
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_step.json"))
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()
    for variant in [*args.plain, args.zero_with]:
        try:
            speed_options(variant)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))

    cfg = load_config(None, [f"model.preset={args.preset}", *args.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pair = batch(args.batch, cfg.model.image_size, device)
    plain = [
        plain_loop(
            cfg, pair, args.precision, args.steps, args.warmup, variant, args.compile_backend
        )
        for variant in args.plain
    ]
    kernels = top_kernels(plain[-1], pair, args.precision, args.profile) if args.profile else []
    for row in plain:  # their learners were kept for the profile only
        del row["learner"], row["optimizer"]
    results = list(plain)
    for zero in args.zero:
        try:
            results.append(
                deepspeed_loop(
                    cfg,
                    pair,
                    args.precision,
                    zero,
                    args.steps,
                    args.warmup,
                    args.zero_with,
                    args.compile_backend,
                )
            )
        except Exception as error:  # a benchmark reports what failed and goes on
            results.append({"engine": f"deepspeed-zero{zero}", "error": repr(error)[:300]})
    peak = peak_flops(args.precision, args.peak_tflops)
    flops = plain[0]["flops_per_step"]  # the same model in every row: counted once
    for row in results:
        if "step_s" in row:
            row["pairs_per_s"] = args.batch / row["step_s"]
            row["vs_first"] = plain[0]["step_s"] / row["step_s"]
            achieved = flops / row["step_s"]
            row["achieved_tflops"] = achieved / 1e12
            row["mfu"] = achieved / peak if peak else None
    gradient_bytes, source = measured_gradient_bytes(results)
    if gradient_bytes is None:
        # What DeepSpeed all-reduces when measured: bf16 gradients in bf16, fp32 in fp32.
        gradient_bytes = plain[0]["trainable_params"] * (2 if args.precision == "bf16" else 4)
        source = "counted: trainable parameters x bytes per gradient"
    fastest = min(plain, key=lambda row: row["step_s"])
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "preset": args.preset,
        "image_size": cfg.model.image_size,
        "num_landmarks": cfg.model.num_landmarks,
        "precision": args.precision,
        "batch": args.batch,
        "compile_backend": args.compile_backend,
        "peak_tflops": peak / 1e12 if peak else None,
        "results": results,
        "profiled": plain[-1]["engine"] if kernels else None,
        "top_kernels": kernels,
        "gradient_bytes": gradient_bytes,
        "gradient_bytes_source": source,
        # From the fastest plain variant: what a run with it would scale from.
        "scaling_from": fastest["engine"],
        "scaling": scaling_table(fastest["step_s"], args.batch, gradient_bytes),
        "scaling_assumptions": BANDWIDTH,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(tables(report))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
