"""Object regions: refined mask -> connected regions -> crops -> crop CLS descriptors.

docs/method.md §9 (first half; `stages.labels` clusters the descriptors). The refined
foreground mask is split into regions (connected components above `min_region_pixels`, or the
whole foreground as one region); each region's bounding box, grown by `box_margin`, is cropped
from the image and resized to `crop_size`; the ViT's CLS token of the crop (L2-normalised)
describes the region. Patch tokens are deliberately not used: clustered, they find object
parts rather than classes (paper Fig. 5).

Every per-image function is pure, static-shaped (regions padded to `max_regions` with a
validity mask) and vmaps over a padded batch of images.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lightcluster_jax.blocks import components
from lightcluster_jax.blocks import kmeans as kmeans_lib
from lightcluster_jax.blocks import vit
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


@functools.lru_cache(maxsize=16)
def make_crops_fn(*, max_regions, min_region_pixels, whole_foreground, box_margin, crop_size):
  """Jitted `(fg [B,H,W], image [B,H,W,3] uint8, orig_hw [B,2])` -> (region labels [B,H,W],
  crops [B,R,crop,crop,3] ImageNet-normalised, valid [B,R]).

  Images are padded bottom/right to [H, W]; `orig_hw` is each image's valid size. Only the
  valid crops need the ViT (`make_describe_fn`): the runner packs them from many images
  into fixed-size batches instead of running `max_regions` slots per image.
  """
  mean = jnp.asarray(vit.IMAGENET_MEAN)
  std = jnp.asarray(vit.IMAGENET_STD)

  def one(fg, image, orig_hw):
    regions = find_regions(fg, max_regions=max_regions, min_region_pixels=min_region_pixels,
                           whole_foreground=whole_foreground, valid_hw=orig_hw)
    pixels = (image.astype(jnp.float32) / 255.0 - mean) / std
    crops = crop_regions(pixels, regions, crop_size=crop_size, box_margin=box_margin,
                         valid_hw=orig_hw)
    return regions.labels, crops, regions.valid

  return jax.jit(jax.vmap(one))


@functools.lru_cache(maxsize=16)
def make_describe_fn(arch, *, dtype=jnp.float32):
  """Jitted `(params, crops [C,crop,crop,3])` -> [C, D] L2-normalised ViT CLS descriptors."""
  apply_fn = vit.make_apply_fn(arch, outputs=("cls",), dtype=dtype)

  @jax.jit
  def fn(params, crops):
    return kmeans_lib.l2_normalize(apply_fn(params, crops)["cls"].astype(jnp.float32))
  return fn
