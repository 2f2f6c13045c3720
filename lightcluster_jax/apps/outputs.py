"""A segmentation run's outputs: label maps, overlays, summary.json; and reading them back.

Label maps go to `OUT/masks/<id>.png` (VOC palette; the default) or, for datasets too big
for one file per image, to ArrayRecord shards `OUT/labels/labels-*.array_record` (one
record per image: `{"id", "label"}` as `.npz` bytes, `data.shards`), readable with
`open_labels(OUT / "labels")` or any ArrayRecord reader (Grain). OUT may be any
`etils.epath` path (gs://...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Sequence

import jax
import ml_collections
import numpy as np

from lightcluster_jax.apps import viz
from lightcluster_jax.data import files, shards, voc
from lightcluster_jax.runner.cache import Item
from lightcluster_jax.runner.pipeline import SegmentResult
from lightcluster_jax.runner.progress import progress_bar

__all__ = ["FORMATS", "write_outputs", "open_labels", "LabelFolder"]

FORMATS = ("png", "array_record")


def write_outputs(result: SegmentResult, items: Sequence[Item], out_dir: os.PathLike, *,
                  config: ml_collections.ConfigDict, weights_id: str, overlays: bool = True,
                  progress: bool = True, format: str = "png") -> dict:
  """Writes the label maps (`format`: png | array_record), OUT/overlays/<id>.jpg and
  OUT/summary.json (`summary-p<process>.json` in a multi-host run), one image at a time
  (memory flat in the number of images).

  Returns:
    the summary dict (also written as summary.json).
  """
  if format not in FORMATS:
    raise ValueError(f"output format {format!r}; expected one of {FORMATS}")
  out_dir = files.as_path(out_dir)
  by_id = {it.id: it for it in items}
  store = (shards.ShardStore(out_dir / "labels", prefix="labels", shard_records=256)
           if format == "array_record" else None)
  for item_id in progress_bar(result.ids, total=len(result.ids), desc="write",
                              enabled=progress):
    lab = result.labels[item_id]
    if store is None:
      voc.write_label_png(out_dir / "masks" / f"{item_id}.png", lab)
    else:
      store.save(item_id, {"label": lab})
    if overlays:
      img = by_id[item_id].load()
      viz.save_image(out_dir / "overlays" / f"{item_id}.jpg", viz.overlay(img, lab))
  if store is not None:
    store.close()
  n = max(1, len(result.ids))
  summary = {
      "config": config.to_dict(), "weights_sha256": weights_id,
      "num_images": len(result.ids), "skipped": result.skipped,
      "num_regions": result.num_regions, "timings_s": result.timings,
      "seconds_per_image": sum(result.timings.values()) / n,
      "stage_keys": result.stage_keys, "jax_devices": [str(d) for d in jax.devices()],
      "labels": "masks/<id>.png" if store is None else "labels/labels-*.array_record",
  }
  # Hosts sharing one OUT (a multi-host run) each write their own summary.
  name = ("summary.json" if jax.process_count() == 1 else
          f"summary-p{jax.process_index():03d}.json")
  files.atomic_write_bytes(out_dir / name, json.dumps(summary, indent=1).encode())
  return summary


class LabelFolder(Mapping):
  """{id: [H, W] uint8} of the `<id>.png` label maps in a folder (read on access)."""

  def __init__(self, folder: os.PathLike):
    self.dir = files.as_path(folder)
    if not self.dir.is_dir():
      raise FileNotFoundError(f"label folder not found: {self.dir}")
    self._ids = sorted(p.stem for p in self.dir.glob("*.png"))

  def __getitem__(self, item_id: str) -> np.ndarray:
    path = self.dir / f"{item_id}.png"
    if not path.is_file():
      raise KeyError(f"{item_id!r}: no {path}")
    return voc.read_label_png(path)

  def __iter__(self):
    return iter(self._ids)

  def __len__(self) -> int:
    return len(self._ids)


class _ShardLabels(Mapping):
  """{id: label} of the label shards written by `write_outputs(format="array_record")`."""

  def __init__(self, folder):
    self._store = shards.ShardStore(folder, prefix="labels")

  def __getitem__(self, item_id: str) -> np.ndarray:
    if not self._store.has(item_id):
      raise KeyError(item_id)
    return self._store.load_fields(item_id, ("label",))["label"]

  def __iter__(self):
    return iter(sorted(self._store.ids()))

  def __len__(self) -> int:
    return len(self._store)


def open_labels(path: os.PathLike) -> Mapping:
  """The label maps of a run: `OUT`, `OUT/masks` (PNGs) or `OUT/labels` (shards), or any
  folder of `<id>.png` label maps -> {id: [H, W] uint8}, read on access.

  Raises:
    FileNotFoundError: naming `path` when it holds neither.
  """
  path = files.as_path(path)
  for folder in (path, path / "labels", path / "masks"):
    if folder.is_dir() and any(folder.glob("labels-*.index.json")):
      return _ShardLabels(folder)
    if folder.is_dir() and any(folder.glob("*.png")):
      return LabelFolder(folder)
  raise FileNotFoundError(f"no label maps (<id>.png or labels-*.array_record shards) in {path}")
