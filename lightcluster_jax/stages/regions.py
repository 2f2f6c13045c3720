"""Class assignment: object regions -> crops -> CLS descriptors -> k-means -> label maps.

METHOD.md step 9. The refined foreground mask is split into regions (connected components
above `min_region_pixels`, or the whole foreground as one region); each region's bounding
box, grown by `box_margin`, is cropped from the image and resized to `crop_size`; the ViT's
CLS token of the crop (L2-normalised) describes the region. Patch tokens are deliberately not
used: clustered, they find object parts rather than classes (paper Fig. 5). k-means of all
region descriptors of the dataset gives class ids; pixels are painted `class + 1`.

Every per-image function is pure, static-shaped (regions padded to `max_regions` with a
validity mask) and vmaps over a padded batch of images.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightcluster_jax.blocks import kmeans as kmeans_lib
from lightcluster_jax.blocks import components
from lightcluster_jax.blocks.resize import interpolation_matrix


class Regions(NamedTuple):
  """Object regions of one image (padded to `max_regions`).

  Attributes:
    labels: [H, W] int32, region index + 1 per pixel (0 = background or dropped).
    boxes: [R, 4] int32 (y0, x0, y1, x1), end-exclusive, unpadded region boxes.
    sizes: [R] int32 pixel counts.
    valid: [R] bool.
  """
  labels: jax.Array
  boxes: jax.Array
  sizes: jax.Array
  valid: jax.Array


def find_regions(fg: jax.Array, *, max_regions: int, min_region_pixels: int,
                 whole_foreground: bool = False, valid_hw=None,
                 connectivity: int = 4) -> Regions:
  """Object regions of a binary mask, largest first.

  Args:
    fg: [H, W] bool foreground (False outside the valid region).
    max_regions: static number of region slots; if more components qualify, the largest
      `max_regions` are kept.
    min_region_pixels: components smaller than this are dropped.
    whole_foreground: if True, the whole foreground is one region (if it is big enough).
    valid_hw: optional (h, w) valid top-left region (traced ok); outside it is ignored.
    connectivity: 4 or 8.

  Returns:
    `Regions`.
  """
  fg = jnp.asarray(fg, bool)
  h, w = fg.shape
  if valid_hw is not None:
    rows = jnp.arange(h)[:, None] < valid_hw[0]
    cols = jnp.arange(w)[None, :] < valid_hw[1]
    fg = fg & rows & cols
  if whole_foreground:
    comp = fg.astype(jnp.int32)  # one component, label 1
  else:
    comp = components.connected_components(fg, connectivity=connectivity)
  # Compact arbitrary component labels into 0..n-1 (0 = background).
  flat = comp.reshape(-1)
  n_slots = h * w + 1
  sizes_all = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=n_slots)
  sizes_all = sizes_all.at[0].set(0)
  sizes_all = jnp.where(sizes_all >= min_region_pixels, sizes_all, 0)
  order = jnp.argsort(-sizes_all)[:max_regions]  # largest first
  sizes = sizes_all[order]
  valid = sizes > 0
  # Map each pixel's component to its slot (or -1).
  slot_of = jnp.full((n_slots,), -1, jnp.int32).at[order].set(
      jnp.where(valid, jnp.arange(max_regions, dtype=jnp.int32), -1))
  slot = slot_of[flat].reshape(h, w)
  labels = jnp.where(fg, slot + 1, 0)
  yy = jnp.broadcast_to(jnp.arange(h)[:, None], (h, w)).reshape(-1)
  xx = jnp.broadcast_to(jnp.arange(w)[None, :], (h, w)).reshape(-1)
  seg = jnp.where(slot.reshape(-1) >= 0, slot.reshape(-1), max_regions)
  y0 = jax.ops.segment_min(yy, seg, num_segments=max_regions + 1)[:max_regions]
  x0 = jax.ops.segment_min(xx, seg, num_segments=max_regions + 1)[:max_regions]
  y1 = jax.ops.segment_max(yy, seg, num_segments=max_regions + 1)[:max_regions] + 1
  x1 = jax.ops.segment_max(xx, seg, num_segments=max_regions + 1)[:max_regions] + 1
  boxes = jnp.stack([y0, x0, y1, x1], axis=-1).astype(jnp.int32)
  boxes = jnp.where(valid[:, None], boxes, 0)
  return Regions(labels.astype(jnp.int32), boxes, sizes.astype(jnp.int32), valid)


def grow_boxes(boxes: jax.Array, margin: float, image_hw) -> jax.Array:
  """Grows [R, 4] (y0, x0, y1, x1) boxes by `margin` x their size on each side, clipped."""
  boxes = boxes.astype(jnp.float32)
  dh = (boxes[:, 2] - boxes[:, 0]) * margin
  dw = (boxes[:, 3] - boxes[:, 1]) * margin
  y0 = jnp.clip(jnp.floor(boxes[:, 0] - dh), 0, image_hw[0] - 1)
  x0 = jnp.clip(jnp.floor(boxes[:, 1] - dw), 0, image_hw[1] - 1)
  y1 = jnp.clip(jnp.ceil(boxes[:, 2] + dh), y0 + 1, image_hw[0])
  x1 = jnp.clip(jnp.ceil(boxes[:, 3] + dw), x0 + 1, image_hw[1])
  return jnp.stack([y0, x0, y1, x1], axis=-1).astype(jnp.int32)


def _crop_matrix(start, stop, in_capacity: int, out_size: int) -> jax.Array:
  """[out_size, in_capacity] bilinear matrix resampling samples [start, stop) to out_size."""
  m = interpolation_matrix(stop - start, out_size, in_capacity=in_capacity,
                           out_capacity=out_size, method="bilinear")
  # Columns 0..(stop-start) of `m` are used; shift them to start..stop (no wrap: stop <= cap).
  return jnp.roll(m, start, axis=1)


def crop_and_resize(image: jax.Array, box: jax.Array, crop_size: int) -> jax.Array:
  """Bilinear crop of `box` (y0, x0, y1, x1) from `image` [H, W, C] to [crop, crop, C].

  Matches PyTorch `interpolate(image[y0:y1, x0:x1], size, mode="bilinear",
  align_corners=False)` (no antialias); jittable with a traced box.
  """
  h, w = image.shape[:2]
  my = _crop_matrix(box[0], box[2], h, crop_size)
  mx = _crop_matrix(box[1], box[3], w, crop_size)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("oh,hwc->owc", my, image.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,owc->opc", mx, out, precision=hp)


def crop_regions(image: jax.Array, regions: Regions, *, crop_size: int, box_margin: float,
                 valid_hw=None) -> jax.Array:
  """Crops every region slot of one image: [R, crop, crop, C] (garbage in invalid slots)."""
  image_hw = valid_hw if valid_hw is not None else image.shape[:2]
  boxes = grow_boxes(regions.boxes, box_margin, image_hw)
  return jax.vmap(lambda b: crop_and_resize(image, b, crop_size))(boxes)


def cluster_descriptors(descriptors: jax.Array, valid: jax.Array, num_classes: int, *,
                        key: jax.Array, n_init: int = 10, max_iter: int = 300):
  """k-means of region descriptors into `num_classes` (cosine: L2-normalised CLS).

  Args:
    descriptors: [R, D] CLS descriptors of all regions of the dataset (padded).
    valid: [R] bool.
    num_classes: number of classes (20 for VOC). If fewer regions than classes exist,
      k is reduced to the number of regions.

  Returns:
    classes: [R] int32 in 0..k-1 (-1 for invalid slots).
  """
  n_valid = int(jnp.sum(valid))
  k = max(1, min(num_classes, n_valid))
  if n_valid == 0:
    return jnp.full(valid.shape, -1, jnp.int32)
  res = kmeans_lib.kmeans(descriptors, k, key=key, mask=valid, n_init=n_init,
                          max_iter=max_iter, cosine=True)
  return jnp.where(valid, res.assignment, -1).astype(jnp.int32)


def paint_labels(region_labels: jax.Array, region_classes: jax.Array) -> jax.Array:
  """Label map [H, W]: `class + 1` on each region's pixels, 0 elsewhere.

  Args:
    region_labels: [H, W] int32 region index + 1 (0 = background), from `find_regions`.
    region_classes: [R] int32 class of each region slot (-1 = none).
  """
  table = jnp.concatenate([jnp.zeros((1,), jnp.int32), region_classes.astype(jnp.int32) + 1])
  table = jnp.maximum(table, 0)
  return table[region_labels]
