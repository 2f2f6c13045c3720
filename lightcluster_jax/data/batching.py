"""Bucketing and padding: ragged per-image arrays into a few fixed batch shapes (host NumPy).

Every stage that batches images of different sizes uses these: a jitted function compiles
once per bucket shape, not per image, and padded slots / pixels are marked invalid by the
caller (patch-validity masks, `valid_hw`).

Example:
  >>> list(batches_by_shape([(5, 7), (6, 8), (9, 3)], lambda hw: bucket_shape(hw, 4), 2))
  [((8, 8), [(5, 7), (6, 8)]), ((12, 4), [(9, 3)])]
  >>> stack_padded([np.ones((1, 2)), np.ones((2, 1))], (2, 2), 3).sum(axis=(1, 2))
  array([2., 2., 0.])
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

__all__ = ["round_up", "bucket_shape", "common_canvas", "batches_by_shape", "stack_padded",
           "pad_grids"]

T = TypeVar("T")


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n."""
  return int(math.ceil(n / multiple) * multiple)


def bucket_shape(hw: Sequence[int], multiple: int) -> tuple[int, ...]:
  """Padded shape of `hw`: each side rounded up to a multiple of `multiple`."""
  return tuple(round_up(int(n), multiple) for n in hw)


def common_canvas(shapes: Sequence[Sequence[int]], multiple: int, max_overhead: float
                  ) -> tuple[int, int] | None:
  """One padded (H, W) for every shape, if that is cheap enough; else None.

  The canvas is `bucket_shape` of the largest sides. It is used when its total area over all
  shapes is at most `max_overhead` times the area of their own buckets (each padded on its
  own): on a CPU a compile of the refine stage costs about as much as running it on ~100
  images, so one canvas wins whenever the sizes are alike (VOC: every image <= 500 px, one
  512 x 512 canvas for 1.3x the pixels of per-image buckets, one compile instead of 3-6).
  `max_overhead` <= 0: never (per-image buckets).

  Example:
    >>> common_canvas([(375, 500), (500, 375), (333, 500)], 64, 2.0)
    (512, 512)
    >>> common_canvas([(100, 120)] * 3 + [(2000, 3000)], 64, 2.0) is None   # 4x the pixels
    True
  """
  if max_overhead <= 0 or not len(shapes):
    return None
  canvas = bucket_shape(np.max(np.asarray(shapes)[:, :2], axis=0), multiple)
  own = sum(math.prod(bucket_shape(s[:2], multiple)) for s in shapes)
  if len(shapes) * math.prod(canvas) > max_overhead * own:
    return None
  return canvas


def batches_by_shape(entries: Iterable[T], shape_of: Callable[[T], Hashable],
                     batch_size: int) -> Iterator[tuple[Hashable, list[T]]]:
  """Groups entries by `shape_of(entry)` into batches of at most `batch_size`.

  A batch is yielded as soon as it is full; the partial batches are flushed at the end, in
  the order their shapes were first seen. Entries keep their order within a shape.
  """
  pending: dict[Hashable, list[T]] = {}
  for entry in entries:
    shape = shape_of(entry)
    group = pending.setdefault(shape, [])
    group.append(entry)
    if len(group) == batch_size:
      yield shape, pending.pop(shape)
  yield from pending.items()


def stack_padded(arrays: Sequence[np.ndarray], shape: Sequence[int], batch_size: int, *,
                 dtype=None) -> np.ndarray:
  """Stacks arrays [h_i, w_i, ...] into [batch_size, *shape, ...], zero-padded bottom/right.

  Slots after `len(arrays)` are all zeros (filler images).
  """
  first = np.asarray(arrays[0])
  dtype = first.dtype if dtype is None else dtype
  out = np.zeros((batch_size, *shape, *first.shape[len(shape):]), dtype)
  for i, a in enumerate(arrays):
    a = np.asarray(a)
    out[(i, *(slice(0, n) for n in a.shape[:len(shape)]))] = a
  return out


def pad_grids(feats: Sequence[dict]):
  """Stacks per-image features (`stages.features` dicts) on a common padded patch grid.

  Args:
    feats: dicts with "keys" [h*w, D], "cls" [D], "cls_attn" [h*w], "grid_hw" (h, w).

  Returns:
    keys [N, Hm*Wm, D] float32, valid [N, Hm, Wm] bool, cls [N, D], cls_attn [N, Hm*Wm]
    float32, on the grid Hm x Wm = the largest grid sides.
  """
  grids = [tuple(int(v) for v in f["grid_hw"]) for f in feats]
  hm, wm = (max(g[i] for g in grids) for i in (0, 1))
  d = feats[0]["keys"].shape[-1]
  n = len(feats)
  keys = stack_padded([f["keys"].reshape(h, w, d) for f, (h, w) in zip(feats, grids)],
                      (hm, wm), n, dtype=np.float32)
  attn = stack_padded([f["cls_attn"].reshape(h, w) for f, (h, w) in zip(feats, grids)],
                      (hm, wm), n, dtype=np.float32)
  valid = stack_padded([np.ones(g, bool) for g in grids], (hm, wm), n)
  cls = np.stack([f["cls"] for f in feats])
  return keys.reshape(n, hm * wm, d), valid, cls, attn.reshape(n, hm * wm)
