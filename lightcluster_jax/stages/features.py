"""Image batch -> ViT Keys / CLS tokens, with bucketed padding and patch-validity masks.

Images of different sizes are resized (short side `image_size`, long side rounded to a
multiple of the patch size), padded bottom/right into a small set of bucket shapes and run
through the ViT with a patch-validity mask; a padded image gives the same features as the
image alone (the ViT masks padded tokens out of attention and resamples the position
embedding to each image's own grid), so bucketing changes speed, never results.

Example (WEIGHTS: a weights file such as dinov2_vits14.npz; the doctests use a tiny random
ViT with 8-pixel patches and D = 32):
  >>> from lightcluster_jax import weights
  >>> arch, params = weights.load_any(WEIGHTS)
  >>> img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
  >>> feats = extract_features(params, [img], arch=arch, image_size=32)  # 448 in real runs
  >>> feats[0]["grid_hw"], feats[0]["orig_hw"]   # 32 x 48 pixels -> a 4 x 6 patch grid
  ((4, 6), (40, 60))
  >>> feats[0]["keys"].shape, feats[0]["cls"].shape   # [h * w, D] L2-normalised Keys, [D]
  ((24, 32), (32,))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lightcluster_jax.blocks import kmeans, vit
from lightcluster_jax.data import batching

IMAGENET_MEAN = np.asarray(vit.IMAGENET_MEAN, np.float32)   # the ViT's input normalisation
IMAGENET_STD = np.asarray(vit.IMAGENET_STD, np.float32)


@dataclasses.dataclass(frozen=True)
class Preprocessed:
  """One image ready for the ViT.

  Attributes:
    pixels: [h * p, w * p, 3] float32, ImageNet-normalised.
    grid_hw: (h, w) patch grid of the image.
    orig_hw: (H, W) size of the original image; the grid covers the whole original image.
  """
  pixels: np.ndarray
  grid_hw: tuple[int, int]
  orig_hw: tuple[int, int]


def model_input_size(orig_hw: tuple[int, int], *, image_size: int | None,
                     patch_size: int) -> tuple[int, int]:
  """Model input (height, width): short side `image_size`, sides multiples of the patch.

  `image_size=None` ("native") keeps the original size, rounded to the nearest multiple of
  the patch size. The aspect ratio changes by at most half a patch per side, which lets the
  patch grid cover the whole original image (nothing is cropped away).
  """
  h, w = orig_hw
  if image_size is None:
    scale = 1.0
  else:
    if image_size < patch_size:
      raise ValueError(f"image_size={image_size} is smaller than one patch ({patch_size})")
    scale = image_size / min(h, w)
  def fit(n):
    return max(patch_size, int(round(n * scale / patch_size)) * patch_size)
  return fit(h), fit(w)


def preprocess(image: np.ndarray, *, image_size: int | None, patch_size: int) -> Preprocessed:
  """Resizes (PIL bicubic, antialiased like torchvision) and ImageNet-normalises one image.

  Args:
    image: [H, W, 3] uint8 RGB.
    image_size: target short side in pixels, or None for the native size.
    patch_size: the ViT's patch size.

  Returns:
    A `Preprocessed` with pixels [h * p, w * p, 3] float32.
  """
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
  orig_hw = image.shape[:2]
  if min(orig_hw) < patch_size:
    raise ValueError(f"image of size {orig_hw[0]}x{orig_hw[1]} is smaller than one "
                     f"{patch_size}x{patch_size} patch")
  out_h, out_w = model_input_size(orig_hw, image_size=image_size, patch_size=patch_size)
  if (out_h, out_w) != tuple(orig_hw):
    image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BICUBIC))
  pixels = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return Preprocessed(pixels, (out_h // patch_size, out_w // patch_size), tuple(orig_hw))


def pad_batch(items: Sequence[Preprocessed], grid_hw: tuple[int, int], patch_size: int,
              batch_size: int):
  """Pads preprocessed images into one fixed-shape batch.

  Returns:
    pixels: [batch_size, gh * p, gw * p, 3] float32 (zeros in padding).
    mask: [batch_size, gh, gw] bool patch validity (all False for filler slots).
  """
  gh, gw = grid_hw
  pixels = batching.stack_padded([it.pixels for it in items],
                                 (gh * patch_size, gw * patch_size), batch_size, dtype=np.float32)
  mask = batching.stack_padded([np.ones(it.grid_hw, bool) for it in items], (gh, gw), batch_size)
  return pixels, mask


@functools.lru_cache(maxsize=16)
def make_feature_fn(arch, *, dtype=jnp.float32):
  """Jitted `(params, pixels [B,H,W,3], mask [B,h,w]) -> dict` of method features.

  Returned dict: "keys" [B, P, D] L2-normalised last-block Keys, "cls" [B, D] final CLS,
  "cls_attn" [B, P] last-block CLS->patch attention averaged over heads.
  """
  apply_fn = vit.make_apply_fn(arch, outputs=("keys", "cls", "cls_attn"), dtype=dtype)

  @jax.jit
  def fn(params, pixels, mask):
    out = apply_fn(params, pixels, mask)
    return {"keys": kmeans.l2_normalize(out["keys"].astype(jnp.float32)),
            "cls": out["cls"].astype(jnp.float32),
            "cls_attn": out["cls_attn"].astype(jnp.float32).mean(axis=1)}
  return fn


def extract_features(params, images: Sequence[np.ndarray], *, arch, image_size: int | None = 448,
                     batch_size: int = 8, bucket_multiple: int = 4, dtype=jnp.float32,
                     feature_fn=None) -> list[dict]:
  """Method features of a list of images (in memory; the pipeline streams to a cache).

  Args:
    params: ViT parameters.
    images: list of [H, W, 3] uint8 RGB arrays of any sizes.
    arch: ViT architecture name or config.
    image_size: short side in pixels (None: native size).
    batch_size: images per ViT call (fixed, filler slots are masked).
    bucket_multiple: bucket sides are multiples of this many patches.

  Returns:
    One dict per image: "keys" [h*w, D] (L2-normalised), "cls" [D], "cls_attn" [h*w],
    "grid_hw" (h, w), "orig_hw" (H, W).
  """
  config = vit.get_config(arch) if isinstance(arch, str) else arch
  fn = feature_fn or make_feature_fn(config, dtype=dtype)
  pre = ((i, preprocess(img, image_size=image_size, patch_size=config.patch_size))
         for i, img in enumerate(images))
  results: list[dict | None] = [None] * len(images)
  for shape, group in batching.batches_by_shape(
      pre, lambda e: batching.bucket_shape(e[1].grid_hw, bucket_multiple), batch_size):
    pixels, mask = pad_batch([g[1] for g in group], shape, config.patch_size, batch_size)
    out = jax.device_get(fn(params, pixels, mask))
    for b, (i, item) in enumerate(group):
      results[i] = unpad_features(out, b, item.grid_hw, shape, item.orig_hw)
  return results


def unpad_features(out: dict, b: int, grid_hw, bucket_hw, orig_hw) -> dict:
  """Cuts image `b`'s valid patches out of a padded batch output (host NumPy)."""
  h, w = grid_hw
  gh, gw = bucket_hw
  keys = np.asarray(out["keys"][b]).reshape(gh, gw, -1)[:h, :w].reshape(h * w, -1)
  attn = np.asarray(out["cls_attn"][b]).reshape(gh, gw)[:h, :w].reshape(h * w)
  return {"keys": keys, "cls": np.asarray(out["cls"][b]), "cls_attn": attn,
          "grid_hw": (h, w), "orig_hw": tuple(orig_hw)}
