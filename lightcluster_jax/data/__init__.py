"""Data: image folders, VOC2012 / COCO-81 readers, TFDS builders, demo sample images.

`lightcluster_jax.data.tfds_builders` (TFDS builders `voc2012_segmentation`,
`coco81_semantic`) is imported only on demand, so tensorflow-datasets stays optional.
"""

from __future__ import annotations

import importlib.resources
import pathlib

import numpy as np

from lightcluster_jax.data.coco import COCO_CATEGORY_IDS, COCOSemantic, render_semantic_label
from lightcluster_jax.data.images import (IMAGE_EXTENSIONS, ImageError, check_min_size,
                                          image_ids, iter_images, list_images, load_image)
from lightcluster_jax.data.voc import VOCSegmentation, read_label_png, write_label_png


def sample_images() -> list[pathlib.Path]:
  """Paths of the small public-domain / CC0 demo photos shipped in `data/samples/`.

  Four photos (astronaut, cat, coffee cup, rocket; short side 300-448 px, 260 KB in all);
  their sources and licences are in `data/samples/PROVENANCE.txt`.

  Returns:
    sorted list of `pathlib.Path` (the package must be installed as files, not zipped).
  """
  folder = pathlib.Path(str(importlib.resources.files("lightcluster_jax.data") / "samples"))
  return list_images(folder)


def synthetic_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A textured background with one bright ellipse: a tiny scene for smoke tests and benchmarks.

  Returns:
    [h, w, 3] uint8 RGB; the ellipse (about a quarter of the area) is the foreground.
  """
  rng = np.random.RandomState(seed)
  img = (rng.rand(h, w, 3) * 60 + 40).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  cy, cx = h * (0.4 + 0.2 * rng.rand()), w * (0.4 + 0.2 * rng.rand())
  inside = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.25 * w)) ** 2 < 1
  img[inside] = (rng.rand(3) * 80 + 170).astype(np.uint8)
  return img


__all__ = [
    "COCOSemantic", "COCO_CATEGORY_IDS", "IMAGE_EXTENSIONS", "ImageError", "VOCSegmentation",
    "check_min_size", "image_ids", "iter_images", "list_images", "load_image",
    "read_label_png", "render_semantic_label", "sample_images", "synthetic_scene",
    "write_label_png",
]
