"""`lightcluster demo`: the whole pipeline on the sample images shipped in the package.

Writes, for every sample image, a panel PNG (image | consistent patch mask | CRF-refined
mask | final labels) plus the usual masks/, overlays/ and summary.json.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

from lightcluster_jax import config as config_lib
from lightcluster_jax import weights as weights_lib
from lightcluster_jax.apps import outputs, viz
from lightcluster_jax.runner import pipeline

OFFLINE_HELP = (
    "could not download the official DINO ViT-S/8 weights ({error}). Provide a checkpoint "
    "instead: `lightcluster demo --weights PATH` with an official DINO/DINOv2 .pth, a Hugging "
    "Face .safetensors, or an .npz made by `lightcluster convert`.")


def demo_config(image_size: int = 224, num_images: int = 4):
  """The default config scaled to a handful of small images."""
  c = config_lib.default_config()
  c.features.image_size = image_size
  c.clustering.num_categories = max(1, min(2, num_images))
  c.assign.num_classes = max(1, min(3, num_images))
  c.assign.min_region_pixels = 400
  c.assign.n_init = 4
  return c


def _weights(weights):
  """(arch, params, sha256) of `weights`, or of the official DINO ViT-S/8 when None."""
  if weights is None:
    try:
      weights = weights_lib.fetch_official("dino_vits8")
    except Exception as e:  # offline, proxy, ...
      raise weights_lib.WeightsError(OFFLINE_HELP.format(error=e)) from e
  return weights_lib.load_for_run(weights)


def panel(image: np.ndarray, masks: dict, refined: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The stages of one image as a titled mosaic (`viz.stage_panel`): [H', W', 3] uint8.

  Row 1: image | image-level mask | dataset-level mask; row 2: consistent patch mask |
  CRF-refined mask | final labels over the image. Tiles are 240 pixels high (masks drawn on
  the image, patch masks blocky); a level missing from `masks` is left out.
  """
  stages = {f"{lvl}-level mask": masks.get(lvl) for lvl in ("image", "dataset")}
  stages["consistent mask"] = masks["consistent"]
  stages = {k: None if v is None else np.asarray(v, bool) for k, v in stages.items()}
  stages["after CRF"] = np.asarray(refined, bool)
  stages["labels"] = np.asarray(labels).astype(np.int32)
  return viz.stage_panel(image, stages, ncols=3, tile_height=240)


def run(*, weights=None, out=pathlib.Path("lightcluster_demo"), image_size: int = 224,
        progress: bool = True) -> list[pathlib.Path]:
  """Runs the demo; returns the paths of the panel pictures written."""
  from lightcluster_jax import data
  out = pathlib.Path(out)
  paths = data.sample_images()
  arch, params, sha = _weights(weights)
  config = demo_config(image_size, len(paths))
  config.arch = arch if isinstance(arch, str) else arch.name
  items = pipeline.items_from_paths(paths)
  result = pipeline.segment(config, items, params=params, arch=arch, out_dir=out,
                            weights_id=sha, progress=progress)
  outputs.write_outputs(result, items, out, config=config, weights_id=sha, progress=progress)
  written = []
  for it in items:
    if it.id not in result.labels:
      continue
    pic = panel(it.load(), result.artefacts("masks", it.id),
                result.artefacts("refine", it.id)["fg"], result.labels[it.id])
    path = out / "pictures" / f"{it.id}.png"
    viz.save_image(path, pic)
    written.append(path)
  return written
