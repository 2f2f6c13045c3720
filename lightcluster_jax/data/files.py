"""Atomic file writes: a finished file or none, never a half-written one (Ctrl-C safe)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import BinaryIO, Iterator

__all__ = ["atomic_open", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_open(path: os.PathLike, *, fsync: bool = False) -> Iterator[BinaryIO]:
  """A binary file to write that appears at `path` only if the `with` block succeeds.

  The data goes to a temporary file in the same folder (`.<name>.<random>.tmp`), which is
  renamed onto `path` when the block ends without an exception; on any exception (including
  KeyboardInterrupt, or a check that fails inside the block) it is removed and `path` is left
  as it was. The parent folders are created. `fsync=True` flushes to disk before the rename
  (large files that must survive a crash: weights).

  Example:
    >>> with atomic_open(OUT_DIR / "a.txt") as f:
    ...   _ = f.write(b"done")
    >>> (OUT_DIR / "a.txt").read_bytes()
    b'done'
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (`atomic_open`)."""
  with atomic_open(path) as f:
    f.write(data)
