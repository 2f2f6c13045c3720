"""Pictures: colour palettes, label overlays, image saving (used by the CLI and notebooks)."""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map: [n, 3] uint8 (bit-interleaved label index)."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """[H, W] int labels -> [H, W, 3] uint8 colours (VOC palette by default)."""
  palette = voc_palette() if palette is None else palette
  return palette[np.asarray(labels) % len(palette)]


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.55,
            palette: np.ndarray | None = None) -> np.ndarray:
  """Blends label colours over `image` [H, W, 3] uint8 where labels > 0."""
  image = np.asarray(image, np.uint8)
  labels = np.asarray(labels)
  if labels.shape != image.shape[:2]:
    raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
  colours = colorize(labels, palette).astype(np.float32)
  out = image.astype(np.float32)
  fg = labels > 0
  out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
  return np.clip(out, 0, 255).astype(np.uint8)


def save_image(path: os.PathLike, image: np.ndarray, *, quality: int = 90) -> None:
  """Saves an [H, W, 3] uint8 image atomically (format from the suffix)."""
  from lightcluster_jax.pipeline import atomic_write_bytes
  path = pathlib.Path(path)
  buf = io.BytesIO()
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt, **(
      {"quality": quality} if fmt == "JPEG" else {}))
  atomic_write_bytes(path, buf.getvalue())
