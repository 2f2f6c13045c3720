"""Inputs and the per-stage artefact cache of the runner.

An `Item` is one input image (an id, a loader, a content fingerprint). A `Stage` stores one
stage's per-image artefacts (a dict of arrays per image id) under `<root>/<name>-<key>/`, or
in memory when root is None; the key hashes everything the stage depends on, so an
interrupted run resumes where it stopped and a changed setting recomputes only what it
affects.

On disk a stage is a bounded number of ArrayRecord shard files, not one file per image (COCO
train would be half a million files per stage): `data.shards.ShardStore`. `flush()` (called
at the end of every stage, and on Ctrl-C) writes the buffered images; a hard kill loses at
most one unwritten shard.

Example (in memory; pass a folder or a gs:// path as root for the sharded files):
  >>> st = Stage(None, "masks", "k")
  >>> st.save("img1", {"fg": np.ones((2, 3), bool)})
  >>> st.has("img1"), st.has("img2"), st.load("img1")["fg"].shape
  (True, False, (2, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np

from lightcluster_jax.data import files
from lightcluster_jax.data import shards
from lightcluster_jax.data import sources

__all__ = ["Stage", "Item", "items_from_paths", "items_from_arrays", "items_from_source"]


class Stage(shards.ShardStore):
  """Artefacts of one stage: shard files under `<root>/<name>-<key>/` (`data.shards`), or
  in memory when root is None.

  Args:
    root: the cache folder (local or `scheme://`), or None to keep everything in memory.
    name, key: the stage's name and cache key (the folder is `<name>-<key>`).
    meta: written once to `meta.json` (what produced the stage).
    **kwargs: `ShardStore`'s (shard_bytes, shard_records).
  """

  def __init__(self, root: os.PathLike | None, name: str, key: str, meta: dict | None = None,
               **kwargs):
    self.name, self.key = name, key
    super().__init__(None if root is None else files.as_path(root) / f"{name}-{key}", **kwargs)
    if self.dir is not None and meta is not None and not (self.dir / "meta.json").exists():
      files.atomic_write_bytes(self.dir / "meta.json",
                               json.dumps(meta, indent=1, default=str).encode())


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: an id (file stem), how to get its pixels, and a content fingerprint.

  The fingerprint (file size + mtime, or a hash of an in-memory array) is stored with the
  cached features, so a changed image under an old id is recomputed, never reused.
  """
  id: str
  load: Callable[[], np.ndarray]
  fingerprint: str = ""


def items_from_source(source: sources.ImageSource) -> list[Item]:
  """Items of a random-access source (`data.sources`: a folder, a TFDS split, ...), in id
  order: the same images give the same run whatever order the source stores them in (TFDS
  shuffles examples when it prepares a dataset)."""
  order = sorted(range(len(source.ids)), key=lambda n: source.ids[n])
  return [Item(source.ids[n], functools.partial(source.image, n), source.fingerprint(n))
          for n in order]


def items_from_paths(paths: Sequence[os.PathLike]) -> list[Item]:
  """Items of image files (local or gs://...); the id is the file stem (two files with one
  stem are an error)."""
  return items_from_source(sources.FolderSource(paths))


def items_from_arrays(images: Sequence[np.ndarray], ids: Sequence[str] | None = None):
  """Items of in-memory [H, W, 3] uint8 arrays (ids default to 00000, 00001, ...)."""
  ids = list(ids) if ids is not None else [f"{i:05d}" for i in range(len(images))]
  return [Item(i, (lambda a=a: np.asarray(a)),
               hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16])
          for i, a in zip(ids, images)]
