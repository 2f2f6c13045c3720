"""Paths and atomic writes, for local folders and any `etils.epath` filesystem (gs://, ...).

A path with a scheme (`gs://bucket/x`, `s3://...`) is an `etils.epath.Path`; a plain one a
`pathlib.Path` (`as_path`): both have the same API (`open`, `read_bytes`, `glob`, `mkdir`, ...),
so the runner writes `as_path(p) / name` and never calls `open()` on a local-only path.

Writes are atomic: a reader sees a finished file or none, never a half-written one (Ctrl-C
safe). Locally through a temporary file in the same folder and `os.replace`; elsewhere the
data goes to a hidden temporary name that is renamed into place (object stores have no atomic
rename: names that are written once, plus an index written last, make that safe; see
`runner.cache`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import BinaryIO, Iterator

__all__ = ["as_path", "is_remote", "atomic_open", "atomic_write_bytes", "publish_file",
           "local_copy"]


def is_remote(path: os.PathLike | str) -> bool:
  """Whether `path` names a non-local filesystem (`scheme://...`)."""
  return "://" in os.fspath(path)


def as_path(path: os.PathLike | str):
  """`etils.epath.Path` for `scheme://...`, `pathlib.Path` (user `~` expanded) otherwise.

  Example:
    >>> as_path("~/x").name, type(as_path("/tmp/x")).__name__
    ('x', 'PosixPath')
  """
  if is_remote(path):
    from etils import epath
    return epath.Path(os.fspath(path))
  return pathlib.Path(os.fspath(path)).expanduser()


@contextlib.contextmanager
def atomic_open(path: os.PathLike, *, fsync: bool = False) -> Iterator[BinaryIO]:
  """A binary file to write that appears at `path` only if the `with` block succeeds.

  Locally the data goes to a temporary file in the same folder (`.<name>.<random>.tmp`),
  renamed onto `path` when the block ends without an exception; on any exception (including
  KeyboardInterrupt, or a check that fails inside the block) it is removed and `path` is left
  as it was. The parent folders are created. `fsync=True` flushes to disk before the rename
  (large files that must survive a crash: weights). A remote `path` is written from memory
  to a hidden temporary name, then renamed.

  Example:
    >>> with atomic_open(OUT_DIR / "a.txt") as f:
    ...   _ = f.write(b"done")
    >>> (OUT_DIR / "a.txt").read_bytes()
    b'done'
  """
  if is_remote(path):
    buf = io.BytesIO()
    yield buf
    _remote_write(as_path(path), buf.getvalue())
    return
  path = as_path(path)
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


def _remote_write(path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.rename(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (`atomic_open`)."""
  with atomic_open(path) as f:
    f.write(data)


def publish_file(local_file: os.PathLike, dest: os.PathLike) -> None:
  """Moves a finished local file to `dest` (local or remote) so that it appears whole.

  For writers that need a local path (the ArrayRecord writer does): write to a temporary
  local file, then publish it. Locally an `os.replace` (same filesystem: write the temporary
  file next to `dest`); remotely a copy to a hidden name and a rename.
  """
  if not is_remote(dest):
    dest = as_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.replace(local_file, dest)
    except OSError:  # another filesystem
      shutil.move(os.fspath(local_file), dest)
    return
  _remote_write(as_path(dest), pathlib.Path(local_file).read_bytes())
  os.unlink(local_file)


def local_copy(path: os.PathLike, folder: os.PathLike) -> pathlib.Path:
  """A local file with the content of `path`: itself when local, else a copy in `folder`
  (made once; for readers that need a local path, such as ArrayRecord's)."""
  if not is_remote(path):
    return as_path(path)
  src = as_path(path)
  local = pathlib.Path(folder) / src.name
  if not local.exists():
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, local)
  return local
