"""The field's benchmark data sets, read as their publishers distribute them and written as
shards with their official splits: `python -m ulm_dist.data prepare NAME SRC DEST`.

One module per data set, each with its file layout and splits in its docstring:
- `celeba_mafl.py`: CelebA for training, MAFL's 19,000 / 1,000 faces for the regressor;
- `aflw.py`: AFLW in the MAFL-style 5-point version, 10,122 / 2,995 faces;
- `cub.py`: CUB-200-2011, 15 parts with visibility flags;
- `h36m.py`: the simplified Human3.6M of Zhang et al. 2018 (six activities, S11 held out).
Each has `collect(source, image_size, options)`, taking the `ImportOptions` that concern it.
What they share (framing images, the splits with their missing images, pixel origins,
writing) is in `importer.py`, the reading of annotation files in `annotation_files.py`.
Each manifest's layout names the evaluation protocol (`ulm_dist.evaluate.protocols`) that
scores models on it. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ulm_dist.data.benchmarks.importer import BenchmarkImport, ImportOptions

__all__ = ["BENCHMARKS", "ImportOptions", "collect_benchmark"]

# Benchmark name -> its importer module.
BENCHMARKS = {
    "celeba-mafl": "ulm_dist.data.benchmarks.celeba_mafl",
    "aflw": "ulm_dist.data.benchmarks.aflw",
    "cub": "ulm_dist.data.benchmarks.cub",
    "h36m": "ulm_dist.data.benchmarks.h36m",
}


def collect_benchmark(
    name: str, source: str | Path, image_size: int, options: ImportOptions | None = None
) -> BenchmarkImport:
    """Reads benchmark `name` from its publisher's layout under `source` (no image opened)."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder; expected the {name} distribution")
    module = importlib.import_module(BENCHMARKS[name])
    return module.collect(source, image_size, options or ImportOptions())
