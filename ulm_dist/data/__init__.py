"""The data side: synthetic landmark data, WebDataset shards on local disk or S3, loaders.

Shard format: each split is a folder (or s3:// prefix) of tars `{split}-000000.tar, ...` and
`manifest.parquet` (see `manifest.py`). Every sample in a tar has the members
- `{key}.jpg` (or `.png`): an RGB image, square, `image_size` pixels a side;
- `{key}.landmarks.npy` (optional): float32 (L, 2) landmark (x, y) coordinates in pixels of
  the stored image, continuous, the image spanning [0, W] x [0, H] (pixel i's centre at i + 0.5);
- `{key}.visible.npy` (optional): bool (L,), which landmarks are annotated as visible (CUB's
  parts); without it every landmark counts as visible;
- `{key}.json` (optional): per-sample metadata, e.g. the `identity` column of a landmarks table.
Loaders return landmarks normalised to [-1, 1]: u = 2 x / W - 1, as `grid_sample` with
align_corners=False reads them.

Driver and workers use:
- `prepare_shards(data, spec, split, image_size=...)` -> `ShardSet`, generating the synthetic
  set first if asked for it (on the driver); `resolve_shards(...)` only reads;
- `ensure_synthetic_dataset(cache_dir, num_samples, image_size, seed)` -> folder of splits;
- `make_pair_loader(...)`: training pairs; `make_annotated_loader(...)`: evaluation images.
Command line: `python -m ulm_dist.data {build,prepare,synth,info} ...` (see `__main__.py`);
`prepare` imports the field's benchmarks as their publishers distribute them (`benchmarks/`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use, so that a process that only writes shards (a builder's worker
# process, say) does not pay for importing torch.
_EXPORTS = {
    "DatasetSummary": "ulm_dist.data.manifest",
    "EpochLoader": "ulm_dist.data.loaders",
    "Manifest": "ulm_dist.data.manifest",
    "ObjectNotFound": "ulm_dist.storage",
    "S3AccessError": "ulm_dist.storage",
    "ShardSet": "ulm_dist.data.resolve",
    "ensure_synthetic_dataset": "ulm_dist.data.build",
    "make_annotated_loader": "ulm_dist.data.loaders",
    "make_pair_loader": "ulm_dist.data.loaders",
    "read_manifest": "ulm_dist.data.manifest",
    "prepare_shards": "ulm_dist.data.build",
    "resolve_shards": "ulm_dist.data.resolve",
}
__all__ = [
    "DatasetSummary",
    "EpochLoader",
    "Manifest",
    "ObjectNotFound",
    "S3AccessError",
    "ShardSet",
    "ensure_synthetic_dataset",
    "make_annotated_loader",
    "make_pair_loader",
    "prepare_shards",
    "read_manifest",
    "resolve_shards",
]

if TYPE_CHECKING:
    from ulm_dist.data.build import ensure_synthetic_dataset, prepare_shards
    from ulm_dist.data.loaders import EpochLoader, make_annotated_loader, make_pair_loader
    from ulm_dist.data.manifest import DatasetSummary, Manifest, read_manifest
    from ulm_dist.data.resolve import ShardSet, resolve_shards
    from ulm_dist.storage import ObjectNotFound, S3AccessError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ulm_dist.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
