"""Data throughput: pairs/s of the training pair loader (read + decode + augment) from local
disk and from S3 (a local moto_server), per image size, kind of pair and number of loader
processes; beside it the synthetic generator's and the shard writer's samples/s, and how many
loader processes one GPU needs. Not a test: it prints two Markdown tables and writes JSON.

    python benchmarks/data_throughput.py                 # 64 and 128 px, 0/1/2 loader processes
    python benchmarks/data_throughput.py --sizes 128 --workers 2 --gpu-pairs-per-s 255

A pair is two augmented images: unpaired (the cycle model) decodes two samples, warped
(imm, part) decodes one and warps a copy. Loader processes are `data.num_workers`; 0 loads in
the training process itself, which then counts as one process. `--gpu-pairs-per-s` is what
one GPU trains on (default: the paper preset on an H100 in BENCHMARKS.md, 255 pairs/s); the
last column divides it by the pairs/s of one loader process. What the training workers of
this machine consume, measured in the same run, is `matrix.py`'s data/use column.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ulm_dist.config import DataConfig
from ulm_dist.data import make_pair_loader, prepare_shards, synthetic
from ulm_dist.data.build import WriteOptions, build_synthetic
from ulm_dist.storage import S3Options, s3_client

# The local S3 server (and its free-port helper) is test tooling in tests/; benchmarks run
# from a checkout, which has that folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import local_s3_server

PAIRS = ("unpaired", "warped")


def generator_rate(size: int, count: int) -> float:
    """Samples per CPU second of one process (which holds on a busy machine too)."""
    synthetic.generate(8, size, np.random.default_rng(0))  # warm caches
    started = time.process_time()
    synthetic.generate(count, size, np.random.default_rng(1))
    return count / (time.process_time() - started)


def build_rate(dest: str, samples: int, size: int, write: WriteOptions) -> float:
    started = time.perf_counter()
    build_synthetic(
        dest,
        split_samples={"train": samples},
        image_size=size,
        shard_samples=max(1, samples // 16),
        write=write,
    )
    return samples / (time.perf_counter() - started)


def loader_rate(data: DataConfig, spec: str, size: int, samples: int, batch: int) -> float:
    """Pairs per wall second of one pair loader over `samples` pairs, start-up excluded."""
    shards = prepare_shards(data, spec, "train", image_size=size)
    loader = make_pair_loader(
        data, shards, size, batch, rank=0, world_size=1, seed=0, epoch_samples=samples
    )
    batches = iter(loader)
    first = next(batches)  # worker start-up is not throughput
    started, seen = time.perf_counter(), 0
    for item in batches:
        seen += len(item["image_i"])
    del first
    return seen / (time.perf_counter() - started)


def measure(args: argparse.Namespace, scratch: Path, endpoint: str) -> dict[str, list[dict]]:
    writers = os.cpu_count() or 1
    s3 = S3Options(endpoint)
    s3_client(s3).create_bucket(Bucket="bench")
    sources, loaders = [], []
    for size in args.sizes:
        local, remote = str(scratch / f"shards_{size}"), f"s3://bench/shards_{size}"
        sources.append(
            {
                "size": size,
                "generator_per_process": generator_rate(size, args.generator_samples),
                "build_local": build_rate(
                    local, args.samples, size, WriteOptions(progress=False, workers=writers)
                ),
                "build_s3": build_rate(
                    remote, args.samples, size, WriteOptions(progress=False, workers=writers, s3=s3)
                ),
                "writer_processes": writers,
            }
        )
        places = (("local disk", local), ("S3 (local server)", remote))
        for pairs, (source, spec), workers in itertools.product(PAIRS, places, args.workers):
            data = DataConfig(num_workers=workers, s3_endpoint_url=endpoint, pairs=pairs)
            rate = loader_rate(data, spec, size, args.samples, args.batch)
            per_process = rate / max(1, workers)
            loaders.append(
                {
                    "size": size,
                    "pairs": pairs,
                    "source": source,
                    "loader_processes": workers,
                    "pairs_per_s": rate,
                    "pairs_per_s_per_process": per_process,
                    "processes_per_gpu": args.gpu_pairs_per_s / per_process,
                }
            )
            print(f"{size} px, {pairs}, {source}, loader processes {workers}: {rate:,.0f} pairs/s")
    return {"sources": sources, "loaders": loaders}


def tables(report: dict[str, Any]) -> str:
    lines = [
        "| size | synthetic generator (samples/s per process) | build to local shards "
        "(samples/s) | build to S3 (samples/s) |",
        "|---|---|---|---|",
    ]
    for row in report["sources"]:
        lines.append(
            f"| {row['size']} | {row['generator_per_process']:,.0f} | {row['build_local']:,.0f} "
            f"| {row['build_s3']:,.0f} |"
        )
    lines += [
        "",
        "| size | pairs | source | loader processes | pairs/s | per process "
        f"| processes per GPU at {report['gpu_pairs_per_s']:g} pairs/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["loaders"]:
        lines.append(
            f"| {row['size']} | {row['pairs']} | {row['source']} | {row['loader_processes']} "
            f"| {row['pairs_per_s']:,.0f} | {row['pairs_per_s_per_process']:,.0f} "
            f"| {row['processes_per_gpu']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="images in the shards")
    parser.add_argument("--generator-samples", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gpu-pairs-per-s", type=float, default=255.0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/data_throughput.json"))
    args = parser.parse_args()
    # The local server accepts any credentials; boto3 only needs some to sign with.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    report: dict[str, Any] = {
        "cores": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "batch": args.batch,
        "samples": args.samples,
        "gpu_pairs_per_s": args.gpu_pairs_per_s,
    }
    with (
        tempfile.TemporaryDirectory() as scratch,
        local_s3_server(Path(scratch, "moto.log")) as endpoint,
    ):
        report.update(measure(args, Path(scratch), endpoint))
    report["load_average_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"\n{report['cores']} cores, load average {report['load_average_start']:.1f} at the "
        f"start, {report['load_average_end']:.1f} at the end; batch {args.batch}, "
        f"{args.samples} images per shard set\n"
    )
    print(tables(report))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
