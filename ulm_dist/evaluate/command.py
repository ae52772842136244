"""`python -m ulm_dist.evaluate`: the landmark-regression protocol (regression.py) on a trained
checkpoint and an annotated data set.

    python -m ulm_dist.evaluate runs/demo/checkpoint_00000300 --data synthetic
    python -m ulm_dist.evaluate s3://bucket/runs/faces/checkpoint_00050000 \\
        --data s3://bucket/datasets/faces-128 --out results/faces

The frozen detector runs over the fit split and the test split (default `test`) of the data
set (the fit split, the normaliser and the visibility rule by default those of the benchmark
protocol its manifest names, `protocols.py`; else `train`), streamed from local disk or S3
and resized to the model's image size; the linear map is fit on the first and scored on the
second. The table goes to the terminal; into --out go `summary.json` (everything),
`summary.parquet` (one row), `landmarks.parquet` (one row per annotated landmark), and the
pictures `regression_sheet.png` and `cycle_sheet.png` of the first test images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ulm_dist.arguments import non_negative_float, positive_int
from ulm_dist.config import DataConfig
from ulm_dist.data import S3AccessError, ShardSet, prepare_shards
from ulm_dist.deploy.trained import TrainedModel, load_trained
from ulm_dist.evaluate.annotated import EvaluationError, annotated_batches, detect
from ulm_dist.evaluate.pictures import SHOWN_IMAGES, evaluation_sheets
from ulm_dist.evaluate.protocols import (
    choose_normalisation,
    fit_split_for,
    flip_permutation_for,
    groups_for,
    protocol_of,
    uses_visibility,
)
from ulm_dist.evaluate.regression import (
    LANDMARK_ERROR,
    LANDMARK_ERROR_REVERSE,
    MEAN_SHAPE_ERROR,
    NORMALISERS,
    RegressionReport,
    landmark_regression,
)
from ulm_dist.storage import S3_SCHEME, S3Options, StorageError
from ulm_dist.train.curves import CURVES_NAME, write_run_curves


@dataclass
class Detections:
    """The detector's points and the annotations of one split, in pixels of the model's size."""

    discovered: torch.Tensor  # (N, K, 2)
    annotated: torch.Tensor  # (N, L, 2)
    visible: torch.Tensor  # (N, L) bool
    metadata: list[dict[str, Any]]  # each image's
    shown: torch.Tensor  # the first SHOWN_IMAGES images (B, 3, S, S), for the pictures
    skipped: int  # corrupt samples the loader skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate_checkpoint(args)
    except (EvaluationError, StorageError, FileNotFoundError, S3AccessError) as error:
        print(f"ulm_dist.evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.evaluate",
        description="Landmark-regression error of a trained checkpoint on annotated shards.",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, local or s3://...")
    parser.add_argument(
        "--data",
        required=True,
        help="annotated shards: a data set root holding the split folders, or s3://..., or "
        "'synthetic' (the set the checkpoint's config generates)",
    )
    parser.add_argument(
        "--fit-split",
        help="split the regressor is fit on (default: the benchmark protocol's, else train)",
    )
    parser.add_argument("--test-split", default="test", help="split the error is reported on")
    parser.add_argument(
        "--normaliser",
        choices=NORMALISERS,
        help="what errors are divided by (default: the benchmark protocol's; else "
        "inter-ocular when the shards' landmark layout names the eyes, else the bounding-box "
        "diagonal)",
    )
    parser.add_argument(
        "--ridge", type=non_negative_float, default=0.0, help="ridge penalty of the fit"
    )
    parser.add_argument("--bias", action="store_true", help="give the linear map an intercept")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per detector pass"
    )
    parser.add_argument("--max-images", type=positive_int, help="use at most this many per split")
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default: <run folder>/evaluation/<checkpoint> for a local "
        "checkpoint, ./evaluation/<run>/<checkpoint> for one on S3)",
    )
    parser.add_argument(
        "--s3-endpoint-url", help="S3-compatible endpoint for the checkpoint and the data"
    )
    return parser.parse_args(argv)


def evaluate_checkpoint(args: argparse.Namespace) -> Path:
    """The whole command: returns the results folder."""
    trained = load_trained(args.checkpoint, S3Options(endpoint_url=args.s3_endpoint_url))
    size = trained.config.model.image_size
    data = dataclasses.replace(trained.config.data, s3_endpoint_url=args.s3_endpoint_url)
    # The test split's manifest names the protocol, which names the fit split.
    test_shards = resolve_split(data, args.data, args.test_split, size)
    protocol = protocol_of(test_shards.summary)
    args.fit_split = args.fit_split or fit_split_for(protocol)
    fit_shards = resolve_split(data, args.data, args.fit_split, size)
    if fit_shards.urls == test_shards.urls:
        raise EvaluationError(
            f"--data {args.data}: the {args.fit_split} and {args.test_split} splits are the same "
            "shards; give the data set root that holds both split folders"
        )
    normalisation = choose_normalisation(test_shards, size, args.normaliser)
    visible_only = uses_visibility(test_shards)
    source_size = test_shards.summary.image_size if test_shards.summary else size
    if source_size != size:
        print(f"note: {source_size}px images are resized to {size}px, the model's image size")

    fit = detect_split(trained, data, fit_shards, args.fit_split, args.batch_size, args.max_images)
    test = detect_split(
        trained, data, test_shards, args.test_split, args.batch_size, args.max_images
    )
    if fit.annotated.shape[1] != test.annotated.shape[1]:
        raise EvaluationError(
            f"--data {args.data}: the {args.fit_split} split has {fit.annotated.shape[1]} "
            f"landmarks per image, the {args.test_split} split {test.annotated.shape[1]}"
        )
    report = landmark_regression(
        fit.discovered,
        fit.annotated,
        test.discovered,
        test.annotated,
        eyes=normalisation.eyes,
        bias=args.bias,
        ridge=args.ridge,
        image_size=normalisation.image_size,
        train_visible=fit.visible if visible_only else None,
        test_visible=test.visible if visible_only else None,
        flip_permutation=flip_permutation_for(test_shards),
        test_groups=groups_for(test_shards, test.metadata),
    )
    summary = {
        "checkpoint": trained.uri,
        "step": trained.step,
        "data": args.data,
        "fit_split": args.fit_split,
        "test_split": args.test_split,
        "protocol": protocol.name if protocol else "generic",
        "reference": protocol.reference if protocol else None,
        "normaliser": normalisation.name,
        "bias": args.bias,
        "ridge": args.ridge,
        "image_size": size,
        "discovered_landmarks": fit.discovered.shape[1],
        "annotated_landmarks": fit.annotated.shape[1],
        "fit_images": len(fit.discovered),
        "test_images": len(test.discovered),
        "fit_skipped": fit.skipped,
        "test_skipped": test.skipped,
        **report.as_metrics(),
    }
    if report.per_group:
        summary["per_group"] = report.per_group
    names = landmark_names(test_shards, len(report.per_landmark))
    per_landmark = [
        {"landmark": index, "name": name, "error": error}
        for index, (name, error) in enumerate(zip(names, report.per_landmark, strict=True))
    ]
    out = args.out or default_out(args.checkpoint)
    write_results(out, summary, per_landmark)
    write_pictures(out, trained, test, report)
    curves = write_run_curves(trained.config.train, out / CURVES_NAME, mark_step=trained.step)
    print(results_table(summary, per_landmark))
    print(f"training curves: {curves or 'none (the run has no metrics.jsonl on this machine)'}")
    print(f"results: {out}")
    return out


def resolve_split(data: DataConfig, spec: str, split: str, image_size: int) -> ShardSet:
    """The annotated shards of one split, or an EvaluationError saying what is missing."""
    try:
        shards = prepare_shards(data, spec, split, image_size=image_size)
        shards.require_landmarks(f"--data {spec}", "evaluation")
    except ValueError as error:  # a manifest this version cannot read, or no landmarks
        raise EvaluationError(str(error)) from error
    return shards


def detect_split(
    trained: TrainedModel,
    data: DataConfig,
    shards: ShardSet,
    split: str,
    batch_size: int,
    limit: int | None,
) -> Detections:
    """The detector over at most `limit` images of one split, with a progress bar."""
    size = trained.config.model.image_size
    total = shards.total_samples
    if limit is not None:
        total = min(total or limit, limit)
    discovered, annotated, visible, shown = [], [], [], []
    metadata: list[dict[str, Any]] = []
    count = skipped = 0
    cpu = torch.device("cpu")
    with tqdm(total=total, unit="img", desc=f"detecting {split}") as bar:
        batches = annotated_batches(data, shards, size, batch_size, limit)
        for images, landmarks, flags, records, lost in batches:
            skipped += lost
            discovered.append(detect(trained.learner, images, cpu, torch.float32))
            annotated.append(landmarks)
            visible.append(flags)
            metadata.extend(records)
            shown.append(images[: max(0, SHOWN_IMAGES - count)])
            count += len(images)
            bar.update(len(images))
    if count == 0:
        raise EvaluationError(
            f"the {split} split yielded no readable images ({skipped} corrupt samples skipped)"
        )
    return Detections(
        torch.cat(discovered),
        torch.cat(annotated),
        torch.cat(visible),
        metadata,
        torch.cat(shown),
        skipped,
    )


def landmark_names(shards: ShardSet, count: int) -> list[str]:
    names = list(shards.summary.landmark_names) if shards.summary else []
    return names if len(names) == count else [f"landmark {k}" for k in range(count)]


def default_out(checkpoint: str) -> Path:
    """Local checkpoints: beside them in their run folder; S3 ones: under the current folder."""
    if checkpoint.startswith(S3_SCHEME):
        run_folder, name = posixpath.split(checkpoint.removeprefix(S3_SCHEME).rstrip("/"))
        return Path("evaluation") / posixpath.basename(run_folder) / name
    folder = Path(checkpoint).expanduser().resolve()
    return folder.parent / "evaluation" / folder.name


def write_results(out: Path, summary: dict[str, Any], per_landmark: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(
        json.dumps({**summary, "per_landmark": per_landmark}, indent=1) + "\n"
    )
    pq.write_table(pa.Table.from_pylist([summary]), out / "summary.parquet")
    pq.write_table(pa.Table.from_pylist(per_landmark), out / "landmarks.parquet")


def write_pictures(
    out: Path, trained: TrainedModel, test: Detections, report: RegressionReport
) -> None:
    shown = len(test.shown)
    pictures = evaluation_sheets(
        trained.learner.model,
        test.shown,
        test.discovered[:shown],
        report.predicted[:shown],
        test.annotated[:shown],
    )
    for name, image in pictures.items():
        image.save(out / f"{name}.png")


def results_table(summary: dict[str, Any], per_landmark: list[dict[str, Any]]) -> str:
    normaliser = {
        "inter-ocular": "inter-ocular distance",
        "bbox-diagonal": "bounding-box diagonal",
        "image-size": "image side",
    }
    lines = [
        f"checkpoint  {summary['checkpoint']} (step {summary['step']}, "
        f"{summary['discovered_landmarks']} landmarks)",
        f"data        {summary['data']}: fit on {summary['fit_split']} "
        f"({summary['fit_images']} images, {summary['fit_skipped']} skipped), test on "
        f"{summary['test_split']} ({summary['test_images']} images, "
        f"{summary['test_skipped']} skipped)",
        f"linear map  {'with' if summary['bias'] else 'without'} intercept, "
        f"ridge {summary['ridge']:g}",
        "",
        f"error, % of the {normaliser[summary['normaliser']]}",
        f"  discovered -> annotated  {summary[LANDMARK_ERROR]:8.2f}",
        f"  annotated -> discovered  {summary[LANDMARK_ERROR_REVERSE]:8.2f}",
        f"  mean-shape baseline      {summary[MEAN_SHAPE_ERROR]:8.2f}",
        "",
    ]
    if summary.get("per_group"):
        lines += ["per group (the error above is their mean)"]
        lines += [f"  {name:<24} {error:8.2f}" for name, error in summary["per_group"].items()]
        lines += [""]
    lines += ["per annotated landmark"]
    width = max(len(row["name"]) for row in per_landmark)
    lines += [
        f"  {row['landmark']:>3}  {row['name']:<{width}}  {row['error']:8.2f}"
        for row in per_landmark
    ]
    return "\n".join(lines)
