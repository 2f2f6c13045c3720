"""Atomic file writes: a finished file or none, never a half-written one (Ctrl-C safe)."""

from __future__ import annotations

import os
import pathlib
import tempfile

__all__ = ["atomic_write_bytes"]


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same folder and a rename.

  The parent folders are created. On any error (including KeyboardInterrupt) the temporary
  file is removed and `path` is left as it was.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
