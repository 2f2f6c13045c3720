"""Weights for a run: a local file checked, loaded and fingerprinted in one call."""

from __future__ import annotations

import os
import pathlib

from lightcluster_jax.weights import store

__all__ = ["load_for_run"]


def load_for_run(path: os.PathLike):
  """(arch name or ViTConfig, params, file sha256) of a weights file; the architecture comes
  from the file. Raises `WeightsError` naming the file when it is missing or unreadable."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise store.WeightsError(f"weights file not found: {path}")
  try:
    arch, params = store.load_any(path)
  except Exception as e:
    raise store.WeightsError(f"could not load weights {path}: {e}") from e
  return arch, params, store.file_sha256(path)
