"""A store of per-image arrays as a few ArrayRecord shard files (local or any etils.epath).

One record = one image's arrays as `.npz` bytes, its id included (`id` entry), so a shard is
readable on its own: `grain.sources.ArrayRecordDataSource(store.shard_files())` +
`decode_record`. Records are buffered and written together as one shard file
(`<prefix>-p<process>-<token>.array_record`, ArrayRecord with group_size 1: random access),
followed by a small JSON index naming its ids (`<...>.index.json`). A shard counts only once
its index exists, and every file is written once under a unique name, so hosts sharing a
folder never collide and an object store (gs://) needs no atomic rename. A store of N images
needs about N / `shard_records` (or total bytes / `shard_bytes`) files, not N.

`flush()` writes the buffer; a hard kill loses at most the unwritten buffer. With
`folder=None` everything stays in memory.

Example:
  >>> store = ShardStore(OUT_DIR / "labels", shard_records=2)
  >>> for n in range(3):
  ...   store.save(f"img{n}", {"label": np.full((2, 3), n, np.uint8)})   # a shard per 2
  >>> store.flush()
  >>> len(store.shard_files()), sorted(ShardStore(OUT_DIR / "labels").ids())
  (2, ['img0', 'img1', 'img2'])
  >>> import grain   # any ArrayRecord reader reads the shards, e.g. Grain
  >>> src = grain.sources.ArrayRecordDataSource([str(f) for f in store.shard_files()])
  >>> sorted(decode_record(src[n])[0] for n in range(len(src)))
  ['img0', 'img1', 'img2']
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from lightcluster_jax.data import files

__all__ = ["ShardStore", "encode_record", "decode_record"]

_WRITER_OPTIONS = "group_size:1,uncompressed"   # group_size 1: fast random access
_READER_OPTIONS = "readahead_buffer_size:0"


def encode_record(item_id: str, arrays: dict) -> bytes:
  """One record: `arrays` and the id (entry `id`) as `.npz` bytes."""
  buf = io.BytesIO()
  np.savez(buf, id=np.str_(item_id), **arrays)
  return buf.getvalue()


def decode_record(record: bytes, fields: Sequence[str] | None = None) -> tuple[str, dict]:
  """(id, {field: array}) of a record; only `fields` when given (None = all)."""
  with np.load(io.BytesIO(record)) as f:
    names = [k for k in f.files if k != "id"] if fields is None else [
        k for k in fields if k in f.files]
    return str(f["id"]), {k: f[k] for k in names}


class ShardStore:
  """Per-image arrays in shard files under `folder` (None: in memory).

  Args:
    folder: local or `scheme://` folder (created); existing shards in it are indexed.
    prefix: shard file names start with it.
    shard_bytes, shard_records: a shard is written when the buffer reaches either.
  """

  def __init__(self, folder: os.PathLike | str | None, *, prefix: str = "shard",
               shard_bytes: int = 64 << 20, shard_records: int = 1024):
    self.dir = None if folder is None else files.as_path(folder)
    self.prefix, self.shard_bytes, self.shard_records = prefix, shard_bytes, shard_records
    self._pending: dict[str, bytes] = {}          # id -> record not yet in a shard
    self._fingerprints: dict[str, str] = {}       # id -> input fingerprint, if stored
    self._where: dict[str, tuple[str, int]] = {}  # id -> (shard file name, record index)
    self._readers: dict[str, object] = {}
    self._mirror = None                          # local copies of remote shards
    self._seq = 0
    if self.dir is not None:
      self.dir.mkdir(parents=True, exist_ok=True)
      for index in sorted(self.dir.glob(f"{prefix}-*.index.json")):  # writing order per host
        entry = json.loads(index.read_text())
        for n, (item_id, fp) in enumerate(zip(entry["ids"], entry["fingerprints"])):
          self._where[item_id] = (entry["shard"], n)
          self._fingerprints[item_id] = fp

  def __len__(self) -> int:
    return len(self._where.keys() | self._pending.keys())

  def ids(self) -> list[str]:
    """The stored ids (written shards first, in writing order, then the buffer)."""
    return list(dict.fromkeys([*self._where, *self._pending]))

  def shard_files(self) -> list:
    """The finished shard files (empty in memory)."""
    return [] if self.dir is None else sorted(self.dir.glob(f"{self.prefix}-*.array_record"))

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
    self._pending[item_id] = encode_record(item_id, arrays)
    if self.dir is not None and (len(self._pending) >= self.shard_records or
                                 sum(map(len, self._pending.values())) >= self.shard_bytes):
      self.flush()

  def flush(self) -> None:
    """Writes the buffered images as one shard file plus its index (nothing in memory)."""
    if self.dir is None or not self._pending:
      return
    name = f"{self.prefix}-p{jax.process_index():03d}-{time.time_ns():x}-{self._seq:04d}"
    self._seq += 1
    ids = list(self._pending)
    local_dir = None if files.is_remote(self.dir) else self.dir   # the writer needs a local file
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
      return decode_record(self._pending[item_id], fields)[1]
    if item_id not in self._where:
      raise KeyError(f"{item_id!r} is not stored in {self.dir or 'this in-memory store'}")
    shard, n = self._where[item_id]
    try:
      return decode_record(self._reader(shard).read([n])[0], fields)[1]
    except Exception as e:
      raise RuntimeError(f"corrupt shard {self.dir / shard} (record {n}, image {item_id!r}): "
                         f"{e}; delete the shard and its .index.json to recompute") from e

  def _reader(self, shard: str):
    if shard not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader
      if len(self._readers) >= 8:   # bounded open files
        self._readers.pop(next(iter(self._readers))).close()
      if files.is_remote(self.dir) and self._mirror is None:
        self._mirror = tempfile.TemporaryDirectory(prefix="lightcluster-shards-")
      local = files.local_copy(self.dir / shard, self._mirror.name if self._mirror else None)
      self._readers[shard] = ArrayRecordReader(os.fspath(local), _READER_OPTIONS)
    return self._readers[shard]
