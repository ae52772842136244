"""Data throughput: samples/s of the synthetic generator, and of the training pair loader
(read + decode + augment) from local disk and from S3 (a local moto_server), per number of
loader worker processes. Not a test: it prints numbers.

    .venv/bin/python benchmarks/data_throughput.py --samples 4000 --size 64 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ulm_dist.config import DataConfig
from ulm_dist.data import make_pair_loader, resolve_shards, synthetic
from ulm_dist.data.build import WriteOptions, build_synthetic
from ulm_dist.data.s3 import S3Options, s3_client
from ulm_dist.data.s3_server import local_s3_server


def generator_rate(size: int, count: int) -> tuple[float, float]:
    """Samples per wall second and per CPU second (the latter holds on a busy machine)."""
    synthetic.generate(8, size, np.random.default_rng(0))  # warm caches
    wall, cpu = time.perf_counter(), time.process_time()
    synthetic.generate(count, size, np.random.default_rng(1))
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


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
    shards = resolve_shards(data, spec, "train", image_size=size)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000, help="images in the shards")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    print(
        f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
        f"images {args.size}x{args.size}, batch {args.batch}"
    )
    wall, cpu = generator_rate(args.size, 2048)
    print(f"synthetic generator, 1 process: {wall:,.0f} samples/s ({cpu:,.0f} per CPU-second)")

    with tempfile.TemporaryDirectory() as scratch:
        local = str(Path(scratch, "shards"))
        write = WriteOptions(progress=False, workers=os.cpu_count() or 1)
        rate = build_rate(local, args.samples, args.size, write)
        print(
            f"synthetic build to local shards (generate + JPEG + tar), {write.workers} "
            f"processes: {rate:,.0f} samples/s"
        )
        with local_s3_server(Path(scratch, "moto.log")) as endpoint:
            s3_client(S3Options(endpoint)).create_bucket(Bucket="bench")
            remote = "s3://bench/shards"
            rate = build_rate(
                remote,
                args.samples,
                args.size,
                WriteOptions(progress=False, workers=write.workers, s3=S3Options(endpoint)),
            )
            print(f"synthetic build to S3 (local server): {rate:,.0f} samples/s")
            for workers in args.workers:
                data = DataConfig(num_workers=workers, s3_endpoint_url=endpoint)
                for name, spec in (("local disk", local), ("S3 (local server)", remote)):
                    rate = loader_rate(data, spec, args.size, args.samples, args.batch)
                    print(
                        f"pair loader, {name}, {workers} loader workers: "
                        f"{rate:,.0f} samples/s (read + decode + augment)"
                    )


if __name__ == "__main__":
    main()
