"""Inputs and the per-stage artefact cache of the runner.

An `Item` is one input image (an id, a loader, a content fingerprint). A `Stage` stores one
stage's per-image artefacts as `<root>/<name>-<key>/<id>.npz` (or in memory when root is
None); the key hashes everything the stage depends on, so an interrupted run resumes where it
stopped and a changed setting recomputes only what it affects. Every file is written
atomically (`data.files.atomic_write_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from lightcluster_jax.data import files
from lightcluster_jax.data import images as images_lib

__all__ = ["Stage", "Item", "items_from_paths", "items_from_arrays"]


class Stage:
  """Artefacts of one stage: `<root>/<name>-<key>/<id>.npz`, or a dict when root is None."""

  def __init__(self, root: pathlib.Path | None, name: str, key: str, meta: dict | None = None):
    self.name, self.key = name, key
    self.dir = None if root is None else pathlib.Path(root) / f"{name}-{key}"
    self._mem: dict[str, dict] = {}
    if self.dir is not None:
      self.dir.mkdir(parents=True, exist_ok=True)
      if meta is not None and not (self.dir / "meta.json").exists():
        files.atomic_write_bytes(self.dir / "meta.json",
                                 json.dumps(meta, indent=1, default=str).encode())

  def path(self, item_id: str) -> pathlib.Path:
    """The file of `item_id` (only for a stage on disk)."""
    return self.dir / f"{item_id}.npz"

  def has(self, item_id: str, fingerprint: str | None = None) -> bool:
    """Whether `item_id` is stored (and, if given, stored for this input fingerprint)."""
    present = item_id in self._mem if self.dir is None else self.path(item_id).is_file()
    if not present or not fingerprint:
      return present
    return str(self.load_fields(item_id, ("fingerprint",)).get("fingerprint", "")) == fingerprint

  def save(self, item_id: str, arrays: dict) -> None:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if self.dir is None:
      self._mem[item_id] = arrays
      return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files.atomic_write_bytes(self.path(item_id), buf.getvalue())

  def load(self, item_id: str) -> dict:
    """Every array stored for `item_id`."""
    return self.load_fields(item_id, None)

  def load_fields(self, item_id: str, fields: Sequence[str] | None) -> dict:
    """Only `fields` of `item_id` (an npz member is read only when asked for); a field that
    is not stored is left out. None = all fields."""
    if self.dir is None:
      d = self._mem[item_id]
      return dict(d) if fields is None else {k: d[k] for k in fields if k in d}
    try:
      with np.load(self.path(item_id)) as f:
        names = f.files if fields is None else [k for k in fields if k in f.files]
        return {k: f[k] for k in names}
    except Exception as e:
      raise RuntimeError(f"corrupt cache file {self.path(item_id)} ({e}); delete it to "
                         "recompute") from e


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: an id (file stem), how to get its pixels, and a content fingerprint.

  The fingerprint (file size + mtime, or a hash of an in-memory array) is stored with the
  cached features, so a changed image under an old id is recomputed, never reused.
  """
  id: str
  load: Callable[[], np.ndarray]
  fingerprint: str = ""


def items_from_paths(paths: Sequence[os.PathLike]) -> list[Item]:
  """Items of image files; the id is the file stem (two files with one stem are an error)."""
  seen = {}
  for p in paths:
    p = pathlib.Path(p)
    if p.stem in seen:
      raise ValueError(f"two images share the id {p.stem!r}: {seen[p.stem]} and {p}")
    seen[p.stem] = p

  def fingerprint(p):
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"
  return [Item(stem, (lambda p=p: images_lib.load_image(p)), fingerprint(p))
          for stem, p in seen.items()]


def items_from_arrays(images: Sequence[np.ndarray], ids: Sequence[str] | None = None):
  """Items of in-memory [H, W, 3] uint8 arrays (ids default to 00000, 00001, ...)."""
  ids = list(ids) if ids is not None else [f"{i:05d}" for i in range(len(images))]
  return [Item(i, (lambda a=a: np.asarray(a)),
               hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16])
          for i, a in zip(ids, images)]
