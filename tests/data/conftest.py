"""Small data sets for the data tests: a synthetic set and an annotated image folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_contents import LOSSLESS

from ulm_dist.data.build import build_synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic 32px set: train 64 samples in 8 shards, val 24 in 3 (lossless PNG)."""
    root = tmp_path_factory.mktemp("synthetic")
    build_synthetic(
        str(root),
        split_samples={"train": 64, "val": 24},
        image_size=32,
        shard_samples=8,
        write=LOSSLESS,
    )
    return root


@pytest.fixture
def make_dot_folder():
    """The `write_dot_folder` helper, for tests that need an annotated image folder."""
    return write_dot_folder


def write_dot_folder(
    root: Path, count: int, *, size: tuple[int, int] = (48, 40), seed: int = 0
) -> Path:
    """`count` black images, each with one white 3x3 dot, in two nested folders, and the table
    `landmarks.csv` (file, identity, x0, y0): the dot's centre in pixels, the image spanning
    [0, W] x [0, H]. Identities cycle through count // 3 people. Returns the table's path."""
    rng = np.random.default_rng(seed)
    width, height = size
    rows = []
    for index in range(count):
        name = f"{'ab'[index % 2]}/img_{index:03d}.png"
        # Keep the dot inside the centred square crop the builder takes.
        margin = (width - min(size)) // 2 + 4
        column = int(rng.integers(margin, width - margin))
        row = int(rng.integers(4, height - 4))
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[row - 1 : row + 2, column - 1 : column + 2] = 255
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
        rows.append([name, f"person{index % max(1, count // 3)}", column + 0.5, row + 0.5])
    table = root / "landmarks.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "identity", "x0", "y0"])
        writer.writerows(rows)
    return table
