"""From `DataConfig.train` / `.val` to the shards to read (`ShardSet`).

A data spec is one of:
- `synthetic`: the generated set under `data.cache_dir` (`build.prepare_shards` generates it on
  first use; this module only reads);
- a folder or `s3://bucket/prefix` holding `manifest.parquet`, or holding one split folder per
  split (`train/`, `val/`, `test/`, as `python -m ulm_dist.data build` writes them), from which
  the requested split is taken;
- a shard pattern such as `dir/train-{000000..000009}.tar` (brace-expanded); sample counts then
  come from a manifest beside the shards when there is one. A pattern that matches no file is
  refused; one that matches some is taken as is (the reader skips and counts missing shards).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import braceexpand

from ulm_dist import storage
from ulm_dist.config import DataConfig
from ulm_dist.data import synthetic
from ulm_dist.data.manifest import MANIFEST_NAME, DatasetSummary, Manifest, read_manifest
from ulm_dist.storage import S3Options, s3_options


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs to stream, with what their manifest says when there is one."""

    urls: tuple[str, ...]
    # Samples per shard URL, where known: sizes epochs and counts the samples a broken shard lost.
    sample_counts: dict[str, int] = field(default_factory=dict)
    summary: DatasetSummary | None = None

    @property
    def total_samples(self) -> int | None:
        if len(self.sample_counts) < len(self.urls):
            return None
        return sum(self.sample_counts[url] for url in self.urls)

    def require_landmarks(self, where: str, purpose: str) -> None:
        """Refuse shards whose manifest says they hold no landmarks; `where` names the
        setting that gave them, `purpose` what needs the landmarks (in the ValueError)."""
        if self.summary is not None and self.summary.num_landmarks == 0:
            raise ValueError(
                f"{where}: the {self.summary.split} split has no landmarks "
                f"({self.summary.source}); {purpose} needs annotated shards "
                "(python -m ulm_dist.data build --landmarks ...)"
            )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ShardSet:
        counts = {shard.url: shard.samples for shard in manifest.shards}
        return cls(tuple(manifest.urls), counts, manifest.summary)


def resolve_shards(data: DataConfig, spec: str, split: str, *, image_size: int) -> ShardSet:
    """The shards `spec` names (see the module docstring); `split` picks a split folder of a
    data set root and of the synthetic set, which must have been generated
    (`build.prepare_shards` does that first)."""
    options = s3_options(data)
    if spec == "synthetic":
        folder = synthetic.dataset_folder(
            data.cache_dir, data.synthetic_samples, image_size, data.synthetic_seed
        )
        try:
            return ShardSet.from_manifest(read_manifest(str(folder / split), options))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"data spec 'synthetic': {folder} holds no {split} split; generate the set "
                "first (ulm_dist.data.prepare_shards, or `python -m ulm_dist.data synth`)"
            ) from error
    if "{" in spec or spec.endswith(".tar"):
        return _from_pattern(spec, options)
    for folder in (spec, storage.join(spec, split)):
        try:
            return ShardSet.from_manifest(read_manifest(folder, options))
        except FileNotFoundError:
            continue
    raise FileNotFoundError(
        f"data spec {spec!r}: expected {storage.join(spec, MANIFEST_NAME)} or "
        f"{storage.join(spec, split, MANIFEST_NAME)}, found neither; build the shards with "
        "`python -m ulm_dist.data build` (or `synth`), or give a shard pattern like "
        "dir/train-{000000..000009}.tar"
    )


def _from_pattern(pattern: str, options: S3Options) -> ShardSet:
    urls = tuple(braceexpand.braceexpand(pattern))
    _check_matches_a_shard(pattern, urls, options)
    try:
        manifest = read_manifest(storage.parent(urls[0]), options)
    except FileNotFoundError:
        return ShardSet(urls)
    # Matched by file name: the pattern and the manifest may spell the folder differently.
    by_name = {posixpath.basename(shard.url): shard.samples for shard in manifest.shards}
    counts = {url: by_name[name] for url in urls if (name := posixpath.basename(url)) in by_name}
    return ShardSet(urls, counts, manifest.summary)


def _check_matches_a_shard(pattern: str, urls: tuple[str, ...], options: S3Options) -> None:
    """Refuse a pattern that names no existing file: every worker would find nothing to read.
    (Some missing shards are fine: the reader skips them and counts their samples.) One listing
    per folder, not one request per shard."""
    folders = {storage.parent(url) for url in urls}
    names = {folder: storage.list_names(folder, options) for folder in folders}
    if not any(posixpath.basename(url) in names[storage.parent(url)] for url in urls):
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: matches no file (it names {len(urls)}, from {urls[0]} "
            f"to {urls[-1]}); check the folder, the file names and the range in braces"
        )
