"""Run an exported detector on image files: a landmarks table and overlay pictures.

    python -m ulm_dist.predict ARTIFACT IMAGES... --out DIR [--batch-size N]
                               [--device cpu|cuda|auto] [--format csv|parquet]
                               [--runtime torch|onnx]

--runtime torch (the default) runs the artifact's torch.export program with PyTorch; onnx runs
its detector.onnx with onnxruntime (`pip install 'ulm-dist[onnx]'`), on the CPU provider, or
CUDA's when onnxruntime has it (onnxruntime-gpu) and --device is auto or cuda. Both write the
same table and overlays; their landmarks agree within `onnx_detector.ONNX_TOLERANCE`.

IMAGES are files or folders (searched recursively for jpg, png, bmp, webp and tiff). Each
image is converted to RGB and, as in evaluation, its largest centred square is resized to the
detector's S x S (bilinear); the landmarks are mapped back to the original image. Writes
`DIR/landmarks.csv` (or `.parquet`), one row per image and landmark: `image`, `kind`
(`discovered`, or `regressed` for the annotated landmarks when the artifact has a regressor),
`landmark`, and `x`, `y` in pixels of the original image (continuous, pixel i's centre at
i + 0.5); and `DIR/overlays/<n>_<name>.png`, the n-th image with its landmarks as dots
(regressed ones as crosses), at most 1024 pixels on its long side.

Large images are decoded at no more than the resolution the detector and the overlay need
(JPEGs at 1/2, 1/4 or 1/8 scale, which their decoder does cheaply) and are not kept after
that, so that a folder of camera or scan images does not fill the memory.

An image that cannot be read is named in a warning, counted and skipped; the others are still
processed. Exit status: 0 if at least one image got landmarks, 1 if none did (none was
readable), 2 for unusable arguments (no such path, no image found, not an artifact).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import torch
from PIL import Image
from tqdm import tqdm

from ulm_dist.data.augment import crop_box, square_view
from ulm_dist.data.image_folder import IMAGE_SUFFIXES
from ulm_dist.deploy.artifact import ArtifactError, Detector, load_detector
from ulm_dist.deploy.onnx_detector import CUDA_PROVIDER, available_providers
from ulm_dist.evaluate.pictures import draw_points, landmark_colours
from ulm_dist.extras import MissingExtraError

# Beyond what the shard builder takes: prediction also meets other common camera/scan formats.
PREDICT_SUFFIXES = IMAGE_SUFFIXES | {".bmp", ".webp", ".tif", ".tiff"}
TABLE_NAME = "landmarks"
OVERLAY_FOLDER = "overlays"
# Overlays of small images are upscaled to at least this many pixels a side, so the dots
# do not cover the object; those of large ones are downscaled to at most this many on the long
# side (an 8000 x 8000 photo would give a 192 MB overlay, far more than is needed to see dots).
OVERLAY_MIN_SIDE = 256
OVERLAY_MAX_SIDE = 1024


class PredictError(RuntimeError):
    """Arguments that cannot be used; says what was expected."""


@dataclass
class SquareImage:
    """An image as read: the centred square the detector sees, where that square lies in the
    original image (left, top, side), and a copy of at most OVERLAY_MAX_SIDE pixels a side to
    draw the landmarks on."""

    index: int  # position among all inputs: names the overlay
    path: Path
    picture: Image.Image  # for the overlay
    picture_scale: float  # pixels of `picture` per pixel of the original image
    pixels: torch.Tensor  # (3, S, S) in [0, 1]
    box: tuple[float, float, float]

    def to_original(self, points: np.ndarray, size: int) -> np.ndarray:
        """Pixel coordinates of the S x S square -> of the original image."""
        left, top, side = self.box
        return points * (side / size) + np.float32([left, top])


@dataclass
class Predictions:
    columns: dict[str, list] = field(
        default_factory=lambda: {"image": [], "kind": [], "landmark": [], "x": [], "y": []}
    )
    succeeded: int = 0
    failed: int = 0

    def add(self, path: Path, kind: str, points: np.ndarray) -> None:
        for landmark, (x, y) in enumerate(points.tolist()):
            for name, value in zip(self.columns, (str(path), kind, landmark, x, y), strict=True):
                self.columns[name].append(value)

    def write(self, folder: Path, table_format: str) -> Path:
        table = pa.table(self.columns)
        path = folder / f"{TABLE_NAME}.{table_format}"
        if table_format == "csv":
            pyarrow.csv.write_csv(table, path)
        else:
            pyarrow.parquet.write_table(table, path)
        return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        paths = find_images(args.images)
        device = resolve_device(args.device, args.runtime)
        detector = load_detector(args.artifact, device, args.runtime)
    except (ArtifactError, PredictError, MissingExtraError) as error:
        print(f"ulm_dist.predict: error: {error}", file=sys.stderr)
        return 2
    predictions = predict(detector, paths, args.out, args.batch_size)
    table = predictions.write(args.out, args.format)
    failed = f", {predictions.failed} failed (see the warnings above)" if predictions.failed else ""
    print(
        f"{len(paths)} image{'s' if len(paths) != 1 else ''} found: {predictions.succeeded} "
        f"predicted{failed}; landmarks in {table}, overlays in {args.out / OVERLAY_FOLDER}"
    )
    return 0 if predictions.succeeded else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.predict",
        description="Landmarks of image files with a detector from `python -m ulm_dist.export`.",
        epilog="Exit status: 0 if any image got landmarks, 1 if none did, 2 for bad arguments "
        "(including no image found).",
    )
    parser.add_argument("artifact", type=Path, help="the folder ulm_dist.export wrote")
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--out", required=True, type=Path, help="folder for table and overlays")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: detector.pt2 with PyTorch; onnx: detector.onnx with onnxruntime",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected at least 1, got {args.batch_size}")
    return args


def resolve_device(name: str, runtime: str = "torch") -> torch.device:
    if runtime == "onnx":
        has_cuda = CUDA_PROVIDER in available_providers()
        if name == "cuda" and not has_cuda:
            raise PredictError(
                "--device cuda: onnxruntime has no CUDAExecutionProvider here (install "
                "onnxruntime-gpu in place of onnxruntime); use --device cpu or auto"
            )
        return torch.device("cuda" if name != "cpu" and has_cuda else "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: PyTorch sees no GPU here; use --device cpu or auto")
    return torch.device(name)


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given, and the image files below folders, in sorted order per folder."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in PREDICT_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder")
    if not found:
        raise PredictError(
            f"no images found in {', '.join(map(str, paths))}: expected image files or folders "
            f"holding files ending in {', '.join(sorted(PREDICT_SUFFIXES))}"
        )
    return found


def predict(detector: Detector, paths: list[Path], out: Path, batch_size: int) -> Predictions:
    """Landmarks of every readable image in `paths`; overlays go to `out/overlays`."""
    (out / OVERLAY_FOLDER).mkdir(parents=True, exist_ok=True)
    predictions = Predictions()
    batch: list[SquareImage] = []
    with tqdm(total=len(paths), unit="img", disable=len(paths) <= batch_size) as progress:
        for index, path in enumerate(paths):
            try:
                batch.append(read_square(index, path, detector.image_size))
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                progress.write(f"warning: {path}: cannot read the image ({error}); skipped")
                predictions.failed += 1
            progress.update()
            if len(batch) == batch_size or (batch and index == len(paths) - 1):
                run_batch(detector, batch, predictions, out / OVERLAY_FOLDER)
                batch = []
    return predictions


def read_square(index: int, path: Path, size: int) -> SquareImage:
    """The image at `path`, decoded at no more than the resolution that the detector's S x S
    view and the overlay need; the decoded image is dropped once both are made."""
    with Image.open(path) as opened:
        width, height = opened.size
        # JPEGs decode at 1/2, 1/4 or 1/8 scale if that is still at least the size asked for;
        # other formats ignore this and decode in full. `draft` says the scale it chose.
        drafted = opened.draft("RGB", decode_size(width, height, size))
        # convert() would copy an image that is RGB already: a second full-size copy.
        decoded = opened if opened.mode == "RGB" else opened.convert("RGB")
        decoded_scale = 1.0 if drafted is None else drafted[1][2] / width
        box = crop_box(width, height, 1.0, None)
        view = square_view(decoded, None, size, tuple(v * decoded_scale for v in box))
        picture = fit_within(decoded, OVERLAY_MAX_SIDE)
    return SquareImage(
        index, path, picture, picture.width / width, torch.from_numpy(view.image), box
    )


def decode_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The smallest size to decode a width x height image at: its long side needs no more
    than OVERLAY_MAX_SIDE pixels (the overlay), its short side at least `size` (the detector's
    centred square)."""
    scale = min(1.0, max(OVERLAY_MAX_SIDE / max(width, height), size / min(width, height)))
    return math.ceil(width * scale), math.ceil(height * scale)


def fit_within(picture: Image.Image, max_side: int) -> Image.Image:
    """A copy of `picture`, downscaled to at most `max_side` pixels on its long side."""
    scale = max_side / max(picture.size)
    if scale >= 1:
        return picture.copy()
    shape = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(shape, Image.Resampling.BILINEAR, reducing_gap=2.0)


def run_batch(
    detector: Detector, batch: list[SquareImage], predictions: Predictions, overlays: Path
) -> None:
    points = detector(torch.stack([image.pixels for image in batch]))
    regressed = detector.regress(points)
    for n, image in enumerate(batch):
        found = image.to_original(points[n].cpu().numpy(), detector.image_size)
        predictions.add(image.path, "discovered", found)
        annotated = None
        if regressed is not None:
            annotated = image.to_original(regressed[n].cpu().numpy(), detector.image_size)
            predictions.add(image.path, "regressed", annotated)
        overlay(image, found, annotated).save(overlays / f"{image.index:05d}_{image.path.stem}.png")
        predictions.succeeded += 1


def overlay(image: SquareImage, found: np.ndarray, annotated: np.ndarray | None) -> Image.Image:
    """Discovered landmarks as dots, regressed annotated ones as crosses, on the image;
    `found` and `annotated` are in pixels of the original image."""
    scale = max(1, math.ceil(OVERLAY_MIN_SIDE / max(image.picture.size)))
    found = found * image.picture_scale
    picture = draw_points(
        np.asarray(image.picture), found, landmark_colours(len(found)), scale=scale
    )
    if annotated is None:
        return picture
    colours = landmark_colours(len(annotated))
    annotated = annotated * (image.picture_scale * scale)
    return draw_points(np.asarray(picture), annotated, colours, marker="cross")
