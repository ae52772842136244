"""Manifests: what a split's shards hold, so that readers size epochs without listing buckets.

Each split folder (local or S3) holds `manifest.parquet` beside its shards: one row per shard
(`url`: the shard's name relative to the manifest, `samples`, `bytes`, `sha256` of the tar)
and, in the Parquet schema metadata under `ulm_dist.summary`, a JSON summary of the split:
its name, sample and shard counts, image size and format, landmark count and names, the
landmark layout (eye indices for inter-ocular normalisation, flip permutation, the benchmark
protocol that evaluates it, if any), the extra
per-sample metadata fields and where the data came from. A builder writes the manifest last,
after every shard, so a manifest never lists a shard that is not there.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ulm_dist import storage
from ulm_dist.data.layouts import LandmarkLayout
from ulm_dist.storage import S3Options

MANIFEST_NAME = "manifest.parquet"
_SUMMARY_KEY = b"ulm_dist.summary"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class DatasetSummary:
    split: str
    image_size: int  # images are square: image_size x image_size pixels
    image_format: str  # the sample key holding the image: "jpg" or "png"
    num_landmarks: int  # 0 when the split has no landmarks
    source: str
    landmark_names: tuple[str, ...] = ()
    layout: LandmarkLayout | None = None
    metadata_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    shards: tuple[ShardInfo, ...]
    summary: DatasetSummary

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def urls(self) -> list[str]:
        return [shard.url for shard in self.shards]


def write_manifest(folder: str, manifest: Manifest, options: S3Options) -> str:
    """Writes the manifest of the shards in `folder` (urls relative to it); returns its URL."""
    table = pa.table(
        {
            "url": [shard.url for shard in manifest.shards],
            "samples": pa.array([shard.samples for shard in manifest.shards], pa.int64()),
            "bytes": pa.array([shard.bytes for shard in manifest.shards], pa.int64()),
            "sha256": [shard.sha256 for shard in manifest.shards],
        }
    )
    summary = _summary_to_json(manifest)
    table = table.replace_schema_metadata({_SUMMARY_KEY: summary.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    url = storage.join(folder, MANIFEST_NAME)
    storage.write_bytes(url, buffer.getvalue(), options)
    return url


def read_manifest(folder: str, options: S3Options) -> Manifest:
    """The manifest in `folder`, with shard urls made absolute (joined to `folder`)."""
    url = storage.join(folder, MANIFEST_NAME)
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, options)))
    metadata = table.schema.metadata or {}
    if _SUMMARY_KEY not in metadata:
        raise ValueError(
            f"{url}: expected a ulm_dist manifest with a summary in its schema metadata, found "
            f"keys {sorted(metadata)}; rebuild the shards with `python -m ulm_dist.data build`"
        )
    rows = table.to_pylist()
    shards = tuple(
        ShardInfo(storage.join(folder, row["url"]), row["samples"], row["bytes"], row["sha256"])
        for row in rows
    )
    return Manifest(shards, _summary_from_json(metadata[_SUMMARY_KEY].decode(), url))


def _summary_to_json(manifest: Manifest) -> str:
    summary = manifest.summary
    layout = summary.layout
    return json.dumps(
        {
            "format_version": _FORMAT_VERSION,
            "split": summary.split,
            # Counts are derived from the rows; they are repeated for readers of the summary alone.
            "samples": manifest.samples,
            "shards": len(manifest.shards),
            "image_size": summary.image_size,
            "image_format": summary.image_format,
            "num_landmarks": summary.num_landmarks,
            "landmark_names": list(summary.landmark_names),
            "eye_left": list(layout.eye_left) if layout else None,
            "eye_right": list(layout.eye_right) if layout else None,
            "flip_permutation": list(layout.flip_permutation) if layout else None,
            "protocol": layout.protocol if layout else None,
            "metadata_fields": list(summary.metadata_fields),
            "source": summary.source,
        }
    )


def _summary_from_json(text: str, url: str) -> DatasetSummary:
    raw = json.loads(text)
    if raw.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{url}: manifest format {raw.get('format_version')}, this reader expects "
            f"{_FORMAT_VERSION}; rebuild the shards with this version of ulm_dist"
        )
    layout = None
    if raw["flip_permutation"] is not None:
        layout = LandmarkLayout(
            eye_left=tuple(raw["eye_left"]),
            eye_right=tuple(raw["eye_right"]),
            flip_permutation=tuple(raw["flip_permutation"]),
            # Absent from manifests written before the benchmark importers.
            protocol=raw.get("protocol"),
        )
    return DatasetSummary(
        split=raw["split"],
        image_size=raw["image_size"],
        image_format=raw["image_format"],
        num_landmarks=raw["num_landmarks"],
        source=raw["source"],
        landmark_names=tuple(raw["landmark_names"]),
        layout=layout,
        metadata_fields=tuple(raw["metadata_fields"]),
    )
