"""Reading back what a benchmark import wrote: every sample of a split, by key."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ulm_dist.data.benchmarks import collect_benchmark
from ulm_dist.data.benchmarks.importer import BenchmarkImport, write_benchmark
from ulm_dist.data.build import WriteOptions
from ulm_dist.data.manifest import Manifest, read_manifest
from ulm_dist.data.shards import Encoding
from ulm_dist.storage import S3Options

# PNG, so that the stored pixels are the fabricated ones and a marked pixel stays marked.
LOSSLESS = WriteOptions(encoding=Encoding("png"), progress=False)


def prepare_benchmark(name: str, source: Path, dest: Path, image_size: int) -> BenchmarkImport:
    """What `python -m ulm_dist.data prepare NAME SOURCE DEST` does, at the tests' sizes."""
    imported = collect_benchmark(name, source, image_size=image_size)
    write_benchmark(imported, str(dest), image_size=image_size, shard_samples=4, write=LOSSLESS)
    return imported


@dataclass
class StoredSample:
    image: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    visible: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_split(dest: Path, split: str) -> tuple[Manifest, dict[str, StoredSample]]:
    manifest = read_manifest(str(dest / split), S3Options())
    samples: dict[str, StoredSample] = {}
    for url in manifest.urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, kind = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, StoredSample())
                if kind in ("png", "jpg"):
                    sample.image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                elif kind == "landmarks.npy":
                    sample.landmarks = np.load(io.BytesIO(data))
                elif kind == "visible.npy":
                    sample.visible = np.load(io.BytesIO(data))
                elif kind == "json":
                    sample.metadata = json.loads(data)
    return manifest, samples


def mark_pixel(path: Path, size: tuple[int, int], column: int, row: int) -> None:
    """Overwrites the image at `path` (whatever its extension) with a black (width, height)
    picture whose pixel (column, row) alone is white, losslessly (PNG bytes)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[row, column] = 255
    Image.fromarray(pixels).save(path, format="PNG")


def bright_centre(image: np.ndarray) -> np.ndarray:
    """The brightness-weighted centre (x, y) of a stored image, pixel j's centre at j + 0.5:
    where a single marked pixel of the source landed after the crop and resize (bilinear
    upsampling spreads it symmetrically about that point)."""
    weight = image.astype(np.float64).sum(axis=-1)
    rows, columns = np.indices(weight.shape) + 0.5
    return np.array([(weight * columns).sum(), (weight * rows).sum()]) / weight.sum()
