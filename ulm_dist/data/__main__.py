"""Command line: build shards from an image folder or the synthetic generator, inspect them.

    python -m ulm_dist.data build SRC DEST --landmarks table.csv --size 128 \\
        --split-by identity --test-fraction 0.1 --layout ibug68
    python -m ulm_dist.data build SRC DEST --landmarks table.csv --reduce-landmarks mafl5 ...
    python -m ulm_dist.data prepare celeba-mafl ~/data/celeba data/celeba-mafl --size 128
    python -m ulm_dist.data prepare {aflw,cub,h36m} SRC DEST ...
    python -m ulm_dist.data synth DEST --n 20000 --size 64
    python -m ulm_dist.data info DEST/train

DEST is a local folder or s3://bucket/prefix; each split goes to DEST/{split}/ with its
manifest. S3 credentials come from the standard AWS chain; --endpoint-url selects an
S3-compatible store.
"""

from __future__ import annotations

import argparse
import os
import sys

from ulm_dist import storage
from ulm_dist.arguments import positive_int, share
from ulm_dist.data.benchmarks import BENCHMARKS, ImportOptions, collect_benchmark
from ulm_dist.data.benchmarks.importer import write_benchmark
from ulm_dist.data.build import (
    WriteOptions,
    build_from_folder,
    build_synthetic,
    synthetic_shard_samples,
    synthetic_split_samples,
)
from ulm_dist.data.layouts import KNOWN_LAYOUTS, LANDMARK_REDUCTIONS
from ulm_dist.data.manifest import Manifest, read_manifest
from ulm_dist.data.shards import Encoding
from ulm_dist.extras import MissingExtraError
from ulm_dist.storage import S3Options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = S3Options(endpoint_url=args.endpoint_url, max_attempts=args.max_attempts)
    if args.command == "info":
        _print_manifest(read_manifest(args.folder, options), args.folder)
        return 0
    write = WriteOptions(
        encoding=Encoding(args.format, args.quality),
        s3=options,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.command == "prepare":
        try:
            return _prepare(args, write)
        # AnnotationError is a ValueError; ValueError also covers an empty split.
        except (ValueError, FileNotFoundError, MissingExtraError) as error:
            print(f"python -m ulm_dist.data prepare: error: {error}", file=sys.stderr)
            return 2
    if args.command == "build":
        fractions = {"val": args.val_fraction, "test": args.test_fraction}
        manifests = build_from_folder(
            args.source,
            args.dest,
            table=args.landmarks,
            image_size=args.size,
            shard_bytes=round(args.shard_mb * 2**20),
            shard_samples=args.samples_per_shard,
            fractions={split: f for split, f in fractions.items() if f > 0},
            group_by=args.split_by,
            seed=args.seed,
            layout=KNOWN_LAYOUTS[args.layout] if args.layout else None,
            reduction=LANDMARK_REDUCTIONS[args.reduce_landmarks] if args.reduce_landmarks else None,
            write=write,
        )
    else:
        splits = synthetic_split_samples(args.n)
        splits.update({"val": args.val_n or splits["val"], "test": args.test_n or splits["test"]})
        manifests = build_synthetic(
            args.dest,
            split_samples=splits,
            image_size=args.size,
            seed=args.seed,
            shard_samples=args.samples_per_shard or synthetic_shard_samples(args.n),
            write=write,
        )
    for split, manifest in manifests.items():
        _print_manifest(manifest, storage.join(args.dest, split))
    return 0


def _prepare(args: argparse.Namespace, write: WriteOptions) -> int:
    options = ImportOptions(
        crop_fraction=args.crop_fraction,
        frame_step=args.frame_step,
        all_joints=args.all_joints,
        keep_background=args.keep_background,
    )
    imported = collect_benchmark(args.name, args.source, args.size, options)
    print(imported.summary_line())
    for split, paths in imported.missing.items():
        if paths:
            print(f"  {split}: skipped {len(paths)} missing images, e.g. {paths[:3]}")
    manifests = write_benchmark(
        imported,
        args.dest,
        image_size=args.size,
        shard_samples=args.samples_per_shard,
        seed=args.seed,
        write=write,
    )
    for split, manifest in manifests.items():
        _print_manifest(manifest, storage.join(args.dest, split))
    return 0


def _print_manifest(manifest: Manifest, folder: str) -> None:
    summary = manifest.summary
    print(
        f"{folder}: split {summary.split}, {manifest.samples} samples in {len(manifest.shards)} "
        f"shards ({sum(s.bytes for s in manifest.shards) / 2**20:.1f} MiB), "
        f"{summary.image_size}px {summary.image_format}, {summary.num_landmarks} landmarks"
        + (f", metadata {list(summary.metadata_fields)}" if summary.metadata_fields else "")
    )


def _parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m ulm_dist.data", description=summary)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="shard an image folder (+ landmarks table)")
    build.add_argument("source", help="folder of jpg/png images, searched recursively")
    build.add_argument("dest", help="output folder or s3://bucket/prefix")
    build.add_argument(
        "--landmarks",
        help="CSV or Parquet table: image path (relative to SOURCE), x0, y0, x1, y1, ... in "
        "pixels, other columns kept as metadata",
    )
    build.add_argument("--size", type=int, default=128, help="side of the stored square images")
    size = build.add_mutually_exclusive_group()
    size.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB")
    size.add_argument("--samples-per-shard", type=int, help="fixed samples per shard instead")
    build.add_argument("--val-fraction", type=float, default=0.0, help="share held out as val")
    build.add_argument("--test-fraction", type=float, default=0.0, help="share held out as test")
    build.add_argument(
        "--split-by", help="metadata column whose groups stay in one split (e.g. identity)"
    )
    layout = build.add_mutually_exclusive_group()
    layout.add_argument("--layout", choices=sorted(KNOWN_LAYOUTS), help="the landmarks' layout")
    layout.add_argument(
        "--reduce-landmarks",
        choices=sorted(LANDMARK_REDUCTIONS),
        help="store an evaluation protocol's points instead of the table's (mafl5: the MAFL "
        "eye centres, nose tip and mouth corners from 68 iBUG points), with that layout",
    )

    prepare = commands.add_parser(
        "prepare", help="import a benchmark (celeba-mafl, aflw, cub, h36m) with its splits"
    )
    prepare.add_argument("name", choices=sorted(BENCHMARKS), help="the benchmark")
    prepare.add_argument("source", help="its folder, as the publisher distributes it (README)")
    prepare.add_argument("dest", help="output folder or s3://bucket/prefix")
    prepare.add_argument("--size", type=int, default=128, help="side of the stored images")
    prepare.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard")
    prepare.add_argument(
        "--crop-fraction",
        type=share,
        default=0.8,
        help="celeba-mafl: the centre share of the square-resized aligned image kept (IMM)",
    )
    prepare.add_argument(
        "--frame-step",
        type=positive_int,
        default=1,
        help="h36m: keep every n-th frame of a sequence",
    )
    prepare.add_argument(
        "--all-joints", action="store_true", help="h36m: keep all 32 joints, not the 17"
    )
    prepare.add_argument(
        "--keep-background", action="store_true", help="h36m: do not apply the masks"
    )

    synth = commands.add_parser("synth", help="write the synthetic set (train/val/test)")
    synth.add_argument("dest", help="output folder or s3://bucket/prefix")
    synth.add_argument("--n", type=int, default=20000, help="train images")
    synth.add_argument("--val-n", type=int, help="val images (default: n / 10, at least 64)")
    synth.add_argument("--test-n", type=int, help="test images (default: n / 10, at least 64)")
    synth.add_argument("--size", type=int, default=64, help="side of the images")
    synth.add_argument("--samples-per-shard", type=int, help="default: n / 8, 16 to 1000")

    for command in (build, prepare, synth):
        command.add_argument("--seed", type=int, default=0, help="seed of splits / generation")
        command.add_argument("--format", choices=["jpg", "png"], default="jpg")
        command.add_argument("--quality", type=int, default=95, help="JPEG quality (1-100)")
        command.add_argument(
            "--workers", type=int, default=os.cpu_count() or 1, help="parallel processes"
        )
        command.add_argument("--no-progress", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="print a split's manifest summary")
    info.add_argument("folder", help="a split folder (or s3:// prefix) holding manifest.parquet")

    for command in (build, prepare, synth, info):
        command.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS)")
        command.add_argument("--max-attempts", type=int, default=5, help="tries per S3 request")
    return parser


if __name__ == "__main__":
    sys.exit(main())
