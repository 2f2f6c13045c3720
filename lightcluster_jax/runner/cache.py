"""Inputs and the per-stage artefact cache of the runner.

An `Item` is one input image (an id, a loader, a content fingerprint). A `Stage` stores one
stage's per-image artefacts (a dict of arrays per image id) under `<root>/<name>-<key>/`, or
in memory when root is None; the key hashes everything the stage depends on, so an
interrupted run resumes where it stopped and a changed setting recomputes only what it
affects.

On disk a stage is a bounded number of shard files, not one file per image (COCO train would
be half a million files per stage): the arrays of consecutive images are buffered and written
together as one ArrayRecord file (one record = one image's arrays as `.npz` bytes; random
access), followed by a small JSON index naming its ids. A shard counts only once its index
exists, and every file is written once under a unique name (`shard-p<process>-<token>`), so
hosts sharing a folder never collide and an object store (gs://, via `etils.epath`) needs no
atomic rename. `flush()` (called at the end of every stage, on Ctrl-C too) writes the buffer;
a hard kill loses at most one unwritten shard (`shard_bytes`, `shard_records`).

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
import io
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np

from lightcluster_jax.data import files
from lightcluster_jax.data import sources

__all__ = ["Stage", "Item", "items_from_paths", "items_from_arrays", "items_from_source"]

_WRITER_OPTIONS = "group_size:1,uncompressed"   # group_size 1: fast random access
_READER_OPTIONS = "readahead_buffer_size:0"


def _encode(arrays: dict) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _decode(record: bytes, fields: Sequence[str] | None) -> dict:
  with np.load(io.BytesIO(record)) as f:
    names = f.files if fields is None else [k for k in fields if k in f.files]
    return {k: f[k] for k in names}


class Stage:
  """Artefacts of one stage: shard files under `<root>/<name>-<key>/`, or a dict (root None).

  Args:
    root: the cache folder (local or `scheme://`), or None to keep everything in memory.
    name, key: the stage's name and cache key (the folder is `<name>-<key>`).
    meta: written once to `meta.json` (what produced the stage).
    shard_bytes, shard_records: a shard is written when the buffer reaches either.
  """

  def __init__(self, root: os.PathLike | None, name: str, key: str, meta: dict | None = None,
               *, shard_bytes: int = 64 << 20, shard_records: int = 1024):
    self.name, self.key = name, key
    self.shard_bytes, self.shard_records = shard_bytes, shard_records
    self.dir = None if root is None else files.as_path(root) / f"{name}-{key}"
    self._pending: dict[str, bytes] = {}          # id -> record not yet in a shard
    self._fingerprints: dict[str, str] = {}       # id -> input fingerprint, if stored
    self._where: dict[str, tuple[str, int]] = {}  # id -> (shard file name, record index)
    self._readers: dict[str, object] = {}
    self._mirror = None                          # local copies of remote shards
    self._seq = 0
    if self.dir is not None:
      self.dir.mkdir(parents=True, exist_ok=True)
      if meta is not None and not (self.dir / "meta.json").exists():
        files.atomic_write_bytes(self.dir / "meta.json",
                                 json.dumps(meta, indent=1, default=str).encode())
      for index in sorted(self.dir.glob("shard-*.index.json")):  # in writing order per host
        entry = json.loads(index.read_text())
        for n, (item_id, fp) in enumerate(zip(entry["ids"], entry["fingerprints"])):
          self._where[item_id] = (entry["shard"], n)
          self._fingerprints[item_id] = fp

  def __len__(self) -> int:
    return len(set(self._where) | set(self._pending))

  def shard_files(self) -> list:
    """The finished shard files of this stage (empty in memory)."""
    return [] if self.dir is None else sorted(self.dir.glob("shard-*.array_record"))

  def has(self, item_id: str, fingerprint: str | None = None) -> bool:
    """Whether `item_id` is stored (and, if given, stored for this input fingerprint)."""
    present = item_id in self._pending or item_id in self._where
    if not present or not fingerprint:
      return present
    return self._fingerprints.get(item_id, "") == fingerprint

  def save(self, item_id: str, arrays: dict) -> None:
    """Stores `arrays` of `item_id` (buffered; in a shard at the latest at `flush`).

    A `fingerprint` entry is also kept in the index (`has(id, fingerprint)`)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._fingerprints[item_id] = str(arrays["fingerprint"]) if "fingerprint" in arrays else ""
    self._pending[item_id] = _encode(arrays)
    if self.dir is not None and (len(self._pending) >= self.shard_records or
                                 sum(map(len, self._pending.values())) >= self.shard_bytes):
      self.flush()

  def flush(self) -> None:
    """Writes the buffered images as one shard file plus its index (nothing in memory)."""
    if self.dir is None or not self._pending:
      return
    name = f"shard-p{jax.process_index():03d}-{time.time_ns():x}-{self._seq:04d}"
    self._seq += 1
    ids = list(self._pending)
    local_dir = self.dir if not files.is_remote(self.dir) else None
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
      from array_record.python.array_record_module import ArrayRecordWriter
      writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
      for item_id in ids:
        writer.write(self._pending[item_id])
      writer.close()
      files.publish_file(tmp, self.dir / f"{name}.array_record")
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    index = {"shard": f"{name}.array_record", "ids": ids,
             "fingerprints": [self._fingerprints.get(i, "") for i in ids]}
    files.atomic_write_bytes(self.dir / f"{name}.index.json", json.dumps(index).encode())
    for n, item_id in enumerate(ids):
      self._where[item_id] = (index["shard"], n)
    self._pending.clear()

  def close(self) -> None:
    """`flush`, then closes the open readers."""
    self.flush()
    for r in self._readers.values():
      r.close()
    self._readers.clear()

  def load(self, item_id: str) -> dict:
    """Every array stored for `item_id`."""
    return self.load_fields(item_id, None)

  def load_fields(self, item_id: str, fields: Sequence[str] | None) -> dict:
    """Only `fields` of `item_id` (a field that is not stored is left out; None = all)."""
    if item_id in self._pending:
      return _decode(self._pending[item_id], fields)
    if item_id not in self._where:
      raise KeyError(f"{item_id!r} is not in the {self.name} stage")
    shard, n = self._where[item_id]
    try:
      return _decode(self._reader(shard).read([n])[0], fields)
    except Exception as e:
      raise RuntimeError(f"corrupt cache shard {self.dir / shard} (record {n}, image "
                         f"{item_id!r}): {e}; delete the shard and its .index.json to "
                         "recompute") from e

  def _reader(self, shard: str):
    if shard not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader
      if len(self._readers) >= 8:   # bounded open files
        self._readers.pop(next(iter(self._readers))).close()
      if files.is_remote(self.dir) and self._mirror is None:
        self._mirror = tempfile.TemporaryDirectory(prefix=f"lightcluster-{self.name}-")
      local = files.local_copy(self.dir / shard, self._mirror.name if self._mirror else None)
      self._readers[shard] = ArrayRecordReader(os.fspath(local), _READER_OPTIONS)
    return self._readers[shard]


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
  """Items of a random-access source (`data.sources`: a folder, a TFDS split, ...)."""
  return [Item(item_id, functools.partial(source.image, n), source.fingerprint(n))
          for n, item_id in enumerate(source.ids)]


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
