"""Writing a segmentation run's outputs: label PNGs, overlays and summary.json."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import jax
import ml_collections

from lightcluster_jax.apps import viz
from lightcluster_jax.data import files, voc
from lightcluster_jax.runner.cache import Item
from lightcluster_jax.runner.pipeline import SegmentResult
from lightcluster_jax.runner.progress import progress_bar

__all__ = ["write_outputs"]


def write_outputs(result: SegmentResult, items: Sequence[Item], out_dir: os.PathLike, *,
                  config: ml_collections.ConfigDict, weights_id: str, overlays: bool = True,
                  progress: bool = True) -> dict:
  """Writes OUT/masks/<id>.png (VOC palette), OUT/overlays/<id>.jpg and OUT/summary.json.

  Returns:
    the summary dict (also written as summary.json).
  """
  out_dir = pathlib.Path(out_dir)
  by_id = {it.id: it for it in items}
  for item_id in progress_bar(result.ids, total=len(result.ids), desc="write",
                              enabled=progress):
    lab = result.labels[item_id]
    voc.write_label_png(out_dir / "masks" / f"{item_id}.png", lab)
    if overlays:
      img = by_id[item_id].load()
      viz.save_image(out_dir / "overlays" / f"{item_id}.jpg", viz.overlay(img, lab))
  n = max(1, len(result.ids))
  summary = {
      "config": config.to_dict(), "weights_sha256": weights_id,
      "num_images": len(result.ids), "skipped": result.skipped,
      "num_regions": result.num_regions, "timings_s": result.timings,
      "seconds_per_image": sum(result.timings.values()) / n,
      "stage_keys": result.stage_keys, "jax_devices": [str(d) for d in jax.devices()],
  }
  files.atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
  return summary
