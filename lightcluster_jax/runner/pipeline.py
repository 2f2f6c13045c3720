"""The staged LightCluster runner: every stage over a set of images, cached and resumable.

Stages (docs/method.md §1-9), each cached per image under `OUT/cache/<stage>-<hash>/`
(`runner.cache`), where the hash covers the weights, every config field the stage depends on
and the upstream stage's hash; so an interrupted run resumes where it stopped, and a re-run
with a changed CRF setting recomputes only the CRF and what follows it:

  features  ViT Keys / CLS / CLS attention per image          (stages.features, batched)
  masks     image-, category-, dataset-level + consistent fg   (stages.masks, streamed over
            chunks of clustering.chunk_images: runner.masks_stream)
  refine    decided fg probability -> pixels -> CRF            (stages.refine, batched)
  regions   object regions, crops, crop CLS descriptors        (stages.regions, batched)
  labels    k-means of all descriptors -> class ids            (stages.labels, whole set)

Scale-out (`blocks.sharding`): the per-image stages run data-parallel over the local devices;
the dataset statistics are psum-ed over them and summed across hosts; in a multi-host run
each process segments and writes its own block of the images (`runner.plan`). With
`out_dir=None` everything stays in memory (notebooks).

Example: `res = segment(config, items_from_paths(paths), params=params, arch=arch,
out_dir=OUT)` runs every stage; `res.labels[image_id]` is the [H, W] uint8 label map of an
image, `res.artefacts("masks", image_id)` what a stage stored for it (tests/test_pipeline.py
runs it on a random 2-block ViT; compiling every stage takes a minute or more on a CPU, too
long for an example here). What a changed setting recomputes follows from the cache keys:
  >>> from lightcluster_jax import config as config_lib
  >>> imgs = [np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8) for i in range(3)]
  >>> items = items_from_arrays(imgs)       # in-memory images; files: items_from_paths(paths)
  >>> ids = [it.id for it in items]
  >>> ids
  ['00000', '00001', '00002']
  >>> c = config_lib.default_config()
  >>> before = stage_keys(c, "sha256-of-weights", ids, [it.fingerprint for it in items])
  >>> c.crf.preset = "krahenbuhl"
  >>> after = stage_keys(c, "sha256-of-weights", ids, [it.fingerprint for it in items])
  >>> [stage for stage in before if before[stage] != after[stage]]   # features, masks reused
  ['refine', 'regions']
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lightcluster_jax.blocks import crf as crf_lib
from lightcluster_jax.blocks import sharding
from lightcluster_jax.blocks import vit
from lightcluster_jax.config import config_hash
from lightcluster_jax.data import batching
from lightcluster_jax.data import files
from lightcluster_jax.data import sources
from lightcluster_jax.data.batching import pad_grids
from lightcluster_jax.runner import plan
from lightcluster_jax.runner.cache import (Item, Stage, items_from_arrays, items_from_paths,
                                           items_from_source)
from lightcluster_jax.runner.masks_stream import run_masks_streamed
from lightcluster_jax.runner.progress import progress_bar
from lightcluster_jax.stages import features as features_lib
from lightcluster_jax.stages import labels as labels_lib
from lightcluster_jax.stages import masks as masks_lib
from lightcluster_jax.stages import refine as refine_lib
from lightcluster_jax.stages import regions as regions_lib

__all__ = ["SegmentResult", "LabelMaps", "segment", "stage_keys", "pixel_canvases",
           "run_features", "run_masks", "run_refine", "run_regions", "assign_classes", "Item",
           "Stage", "items_from_arrays", "items_from_paths", "items_from_source", "pad_grids"]

STAGES = ("features", "masks", "refine", "regions")


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _parallel(fn, mesh, batch_argnums, compiler_options=None):
  """`fn` data-parallel over `mesh` (itself, jitted with `compiler_options`, on one device)."""
  if sharding.mesh_size(mesh) <= 1:
    return fn if compiler_options is None else jax.jit(fn, compiler_options=compiler_options)
  return sharding.data_parallel(fn, mesh, batch_argnums=batch_argnums,
                                compiler_options=compiler_options)


def _run_pixel_batches(stage: Stage, items: Sequence[Item], payload, compute, *,
                       bucket_pixels: int, batch: int, desc: str, progress: bool,
                       read_threads: int = 0, canvas: tuple | None = None) -> None:
  """Runs a per-image pixel stage over the items not yet in `stage`.

  Images are padded to one `canvas` (H, W) when given (one compile), else grouped by padded
  pixel shape (sides rounded up to `bucket_pixels`), into batches of `batch` (the jitted
  functions compile once per shape);
  `compute(shape, group)` gets [(id, payload(item), image)] and returns {id: arrays to save}.
  Images are decoded `read_threads` threads ahead (`sources.prefetch`); `payload` (the
  upstream stage's arrays) is read in this thread.
  """
  todo = [it for it in items if not stage.has(it.id)]
  if not todo:
    return
  bar = progress_bar(None, total=len(todo), desc=desc, enabled=progress)

  def entries():
    for it, img, err in sources.prefetch(lambda it: it.load(), todo, threads=read_threads):
      if err is not None:
        raise RuntimeError(f"image {it.id!r} could not be read again ({err})") from err
      yield it.id, payload(it), img

  def shape_of(e):
    return canvas or batching.bucket_shape(e[2].shape[:2], bucket_pixels)

  for shape, group in batching.batches_by_shape(entries(), shape_of, batch):
    for item_id, arrays in compute(shape, group).items():
      stage.save(item_id, arrays)
    bar.update(len(group))
  bar.close()
  stage.flush()


def run_features(stage: Stage, items: Sequence[Item], *, params, arch, cfg, progress=True,
                 skipped: dict | None = None, mesh=None, read_threads: int = 0,
                 prefetch: int = 16) -> list[str]:
  """ViT features of every item not yet in `stage`; returns the ids that have features.

  Unreadable images are skipped with a warning naming the file (recorded in `skipped`).
  With a `mesh` of n devices the batch is rounded up to a multiple of n and split over them.
  Decoding and preprocessing run `read_threads` threads ahead of the ViT, up to `prefetch`
  images (`sources.prefetch`).
  """
  config = vit.get_config(arch)
  image_size = cfg.image_size or None
  fn = _parallel(features_lib.make_feature_fn(config, dtype=_dtype(cfg.dtype)), mesh, (1, 2))
  batch_size = batching.round_up(cfg.batch_size, sharding.mesh_size(mesh))
  todo = [it for it in items if not stage.has(it.id, it.fingerprint)]
  done = {it.id for it in items} - {it.id for it in todo}
  skipped = {} if skipped is None else skipped
  fingerprints = {it.id: it.fingerprint for it in items}

  def load(it):
    return features_lib.preprocess(it.load(), image_size=image_size,
                                   patch_size=config.patch_size)

  def preprocessed():
    for it, pre, err in sources.prefetch(load, todo, threads=read_threads, buffer=prefetch):
      if err is not None:  # corrupt file / too small: skip, name it, go on
        warnings.warn(f"skipping image {it.id!r}: {err}")
        skipped[it.id] = str(err)
        continue
      yield it.id, pre

  bar = progress_bar(None, total=len(todo), desc="features", enabled=progress)
  for shape, group in batching.batches_by_shape(
      preprocessed(), lambda e: batching.bucket_shape(e[1].grid_hw, cfg.bucket_multiple),
      batch_size):
    pixels, mask = features_lib.pad_batch([g[1] for g in group], shape, config.patch_size,
                                          batch_size)
    out = jax.device_get(fn(params, pixels, mask))
    for b, (item_id, pre) in enumerate(group):
      feats = features_lib.unpad_features(out, b, pre.grid_hw, shape, pre.orig_hw)
      stage.save(item_id, dict(feats, fingerprint=fingerprints[item_id]))
      done.add(item_id)
    bar.update(len(group))
  bar.close()
  stage.flush()
  return [it.id for it in items if it.id in done]


def run_masks(stage: Stage, feat_stage: Stage, ids: Sequence[str], *, cfg, seed: int,
              temperature: float, progress=True, mesh=None,
              local_range: tuple[int, int] | None = None) -> None:
  """Multilevel consistent foreground masks and decided patch probabilities of the set.

  `cfg.chunk_images > 0` (default): `masks_stream.run_masks_streamed` (bounded memory,
  sharded over `mesh`, multi-host over `local_range`); 0: everything in memory at once, one
  call of `masks.multilevel_foreground` (the reference the streamed path reproduces).
  """
  chunk = int(cfg.get("chunk_images", 0) or 0)
  start, end = (0, len(ids)) if local_range is None else local_range
  missing = sum(not stage.has(i) for i in ids[start:end])
  if jax.process_count() > 1:
    missing = int(sharding.host_sum(np.asarray(missing, np.int64)))
  if not missing:
    return
  if chunk > 0 or jax.process_count() > 1:
    run_masks_streamed(stage, feat_stage, ids, cfg=cfg, seed=seed, temperature=temperature,
                       progress=progress, mesh=mesh, local_range=local_range)
    return
  feats = [feat_stage.load(i) for i in progress_bar(ids, total=len(ids), desc="masks: load",
                                                    enabled=progress)]
  keys, valid, cls, attn = pad_grids(feats)
  keys_j, valid_j = jnp.asarray(keys), jnp.asarray(valid)
  out = masks_lib.multilevel_foreground(
      keys_j, valid_j, jnp.asarray(cls), jnp.asarray(attn), key=jax.random.PRNGKey(seed),
      **masks_kwargs(cfg, len(ids)))
  soft = masks_lib.soft_foreground(keys_j, out["fg_centroid"], out["bg_centroid"], valid_j,
                                   temperature=temperature)
  prob = refine_lib.decided_probability(out["consistent"], soft)
  out = jax.device_get(dict(out, prob=prob))
  for i, item_id in enumerate(ids):
    h, w = (int(v) for v in feats[i]["grid_hw"])
    stage.save(item_id, {
        **{lvl: out[lvl][i, :h, :w] for lvl in ("image", "category", "dataset", "consistent")},
        "prob": out["prob"][i, :h, :w], "group": out["groups"][i],
        "orig_hw": feats[i]["orig_hw"]})


def masks_kwargs(cfg: ml_collections.ConfigDict, num_images: int) -> dict:
  """`masks.multilevel_foreground` keyword arguments from the `clustering` config section."""
  return dict(
      k_image=cfg.k_image, k_category=cfg.k_category, k_dataset=cfg.k_dataset,
      num_categories=min(cfg.num_categories, num_images), rule=cfg.rule, dilate=cfg.dilate,
      min_region_patches=cfg.min_region_patches, dataset_fit_patches=cfg.dataset_fit_patches,
      n_init=cfg.n_init, n_init_image=cfg.n_init, max_iter=cfg.max_iter,
      connectivity=cfg.connectivity, fg_min_share=cfg.fg_min_share,
      fallback_share=cfg.fallback_share, min_image_share=cfg.min_image_share,
      flip_image_level=cfg.flip_image_level, flip_share=cfg.flip_share,
      arbitrate=cfg.arbitrate, arbitrate_margin=cfg.arbitrate_margin,
      arbitrate_min_contrast=cfg.arbitrate_min_contrast)


def run_refine(stage: Stage, mask_stage: Stage, items: Sequence[Item], *, cfg, progress=True,
               mesh=None, read_threads: int = 0, canvas: tuple | None = None,
               grid_canvas: tuple | None = None):
  """Upsampling + CRF of every image's patch mask; stores the refined mask.

  The CRF starts from `refine.crf_start(consistent, prob, cfg.unary)`; with the CRF off the
  decided soft probability is upsampled and thresholded at 0.5. `canvas` / `grid_canvas`:
  one padded pixel / patch-grid shape for every batch (`pixel_canvases`), else per batch.
  """
  if cfg.unary not in refine_lib.UNARIES:
    raise ValueError(f"crf.unary={cfg.unary!r}; expected one of {refine_lib.UNARIES}")
  params = crf_lib.get_params(cfg.preset)
  backend = None if cfg.backend == "default" else cfg.backend
  fn = _parallel(refine_lib.refine_batch_fn(params, backend, cfg.enabled), mesh, (0, 1, 2, 3),
                 compiler_options=crf_lib.XLA_OPTIONS)
  batch = batching.round_up(2, sharding.mesh_size(mesh))

  def compute(shape, group):
    probs = [refine_lib.crf_start(m["consistent"], m["prob"], cfg.unary) if cfg.enabled
             else m["prob"] for _, m, _ in group]
    # One grid capacity for the set, or a small fixed set of them: few recompiles.
    grid = grid_canvas or batching.bucket_shape(np.max([p.shape for p in probs], axis=0), 8)
    imgs = [img for _, _, img in group]
    fg = np.asarray(fn(batching.stack_padded(probs, grid, batch, dtype=np.float32),
                       _sizes([p.shape for p in probs], batch),
                       batching.stack_padded(imgs, shape, batch, dtype=np.uint8),
                       _sizes([img.shape[:2] for img in imgs], batch)))
    return {item_id: {"fg": fg[b, :img.shape[0], :img.shape[1]] > 0.5,
                      "prob": fg[b, :img.shape[0], :img.shape[1]].astype(np.float16)}
            for b, (item_id, _, img) in enumerate(group)}

  _run_pixel_batches(stage, items,
                     lambda it: mask_stage.load_fields(it.id, ("prob", "consistent")), compute,
                     bucket_pixels=cfg.bucket_pixels, batch=batch,
                     desc="refine (CRF)" if cfg.enabled else "upsample", progress=progress,
                     read_threads=read_threads, canvas=canvas)


def _sizes(shapes, batch: int) -> np.ndarray:
  """[batch, 2] int32 (h, w) of each slot; filler slots get (1, 1)."""
  out = np.ones((batch, 2), np.int32)
  out[:len(shapes)] = [tuple(s[:2]) for s in shapes]
  return out


def run_regions(stage: Stage, refine_stage: Stage, items: Sequence[Item], *, params, arch,
                cfg, bucket_pixels: int, dtype="float32", progress=True, mesh=None,
                read_threads: int = 0, canvas: tuple | None = None) -> None:
  """Object regions and crop CLS descriptors of every image not yet in `stage`.

  Regions and crops are computed per pixel bucket (`regions.make_crops_fn`); the valid crops
  of many images are packed into fixed batches of `cfg.crop_batch` for the ViT
  (`regions.make_describe_fn`), so the ViT runs once per region, not `max_regions` times per
  image, and compiles once. An image is saved when all its crops are described.
  """
  crops_fn = _parallel(regions_lib.make_crops_fn(
      max_regions=cfg.max_regions, min_region_pixels=cfg.min_region_pixels,
      whole_foreground=cfg.whole_foreground, box_margin=cfg.box_margin,
      crop_size=cfg.crop_size), mesh, (0, 1, 2))
  describe = _parallel(regions_lib.make_describe_fn(arch, dtype=_dtype(dtype)), mesh, (1,))
  batch = batching.round_up(2, sharding.mesh_size(mesh))
  crop_batch = batching.round_up(cfg.crop_batch, sharding.mesh_size(mesh))
  dim = vit.get_config(arch).width
  pending, queue = {}, []   # id -> arrays with descriptors to fill; [(id, slot, crop)]

  def describe_queue(final: bool):
    while len(queue) >= crop_batch or (final and queue):
      chunk, queue[:] = queue[:crop_batch], queue[crop_batch:]
      desc = np.asarray(describe(params, batching.stack_padded(
          [c for _, _, c in chunk], (cfg.crop_size, cfg.crop_size), crop_batch,
          dtype=np.float32)))
      for (item_id, slot, _), d in zip(chunk, desc):
        entry = pending[item_id]
        entry["descriptors"][slot] = d
        entry["missing"] -= 1
        if entry["missing"] == 0:
          stage.save(item_id, _regions_arrays(pending.pop(item_id)))

  def compute(shape, group):
    imgs = [img for _, _, img in group]
    labels, crops, valid = jax.device_get(crops_fn(
        batching.stack_padded([f for _, f, _ in group], shape, batch, dtype=bool),
        batching.stack_padded(imgs, shape, batch, dtype=np.uint8),
        _sizes([img.shape[:2] for img in imgs], batch)))
    done = {}
    for b, (item_id, _, img) in enumerate(group):
      entry = {"regions": labels[b, :img.shape[0], :img.shape[1]].astype(np.uint8),
               "valid": valid[b], "missing": int(valid[b].sum()),
               "descriptors": np.zeros((len(valid[b]), dim), np.float32)}
      if entry["missing"] == 0:
        done[item_id] = _regions_arrays(entry)
        continue
      pending[item_id] = entry
      queue.extend((item_id, r, crops[b, r]) for r in np.flatnonzero(valid[b]))
    describe_queue(final=False)
    return done

  _run_pixel_batches(stage, items, lambda it: refine_stage.load_fields(it.id, ("fg",))["fg"],
                     compute, bucket_pixels=bucket_pixels, batch=batch, desc="regions",
                     progress=progress, read_threads=read_threads, canvas=canvas)
  describe_queue(final=True)
  stage.flush()
  assert not pending, sorted(pending)


def _regions_arrays(entry: dict) -> dict:
  """What the regions stage stores for one image."""
  return {k: entry[k] for k in ("regions", "descriptors", "valid")}


def assign_classes(region_stage: Stage, ids: Sequence[str], *, cfg, seed: int,
                   local_range: tuple[int, int] | None = None):
  """k-means of all region descriptors of the set; returns {id: class id per region slot}.

  Multi-host: this host holds the regions of `ids[start:end]` (`local_range`); the
  descriptors (small: max_regions x D per image) are all-gathered, every host runs the same
  k-means and keeps the classes of its own images.
  """
  start, end = (0, len(ids)) if local_range is None else local_range
  loaded = [region_stage.load_fields(i, ("descriptors", "valid")) for i in ids[start:end]]
  if jax.process_count() > 1:
    r = int(sharding.host_max(np.asarray(len(loaded[0]["valid"]) if loaded else 0)))
    dd = int(sharding.host_max(np.asarray(loaded[0]["descriptors"].shape[-1] if loaded else 0)))
    desc = plan.gather_rows(np.stack([x["descriptors"] for x in loaded]).astype(np.float32)
                            if loaded else np.zeros((0, r, dd), np.float32), start, len(ids))
    valid = plan.gather_rows(np.stack([x["valid"] for x in loaded]) if loaded else
                             np.zeros((0, r), bool), start, len(ids))
    loaded = [dict(descriptors=a, valid=b) for a, b in zip(desc, valid)]
    ids = list(ids)
  else:
    ids = list(ids[start:end])
  if not loaded:
    return {}
  desc = np.concatenate([r["descriptors"] for r in loaded])
  valid = np.concatenate([r["valid"] for r in loaded])
  classes = np.asarray(labels_lib.cluster_descriptors(
      jnp.asarray(desc), jnp.asarray(valid), cfg.num_classes,
      key=jax.random.fold_in(jax.random.PRNGKey(seed), 1), n_init=cfg.n_init))
  out, start = {}, 0
  for item_id, r in zip(ids, loaded):
    n = len(r["valid"])
    out[item_id] = classes[start:start + n]
    start += n
  return out


def pixel_canvases(mask_stage: Stage, ids: Sequence[str], cfg) -> tuple:
  """(pixel canvas, patch-grid canvas) shared by the refine and regions batches of `ids`, or
  (None, None) for per-batch shapes (`batching.common_canvas` with `cfg.canvas_overhead`)."""
  if cfg.canvas_overhead <= 0 or not ids:
    return None, None
  sizes, grids = [], []
  for item_id in ids:
    m = mask_stage.load_fields(item_id, ("orig_hw", "prob"))
    sizes.append(tuple(int(v) for v in m["orig_hw"]))
    grids.append(m["prob"].shape)
  canvas = batching.common_canvas(sizes, cfg.bucket_pixels, cfg.canvas_overhead)
  if canvas is None:
    return None, None
  return canvas, batching.common_canvas(grids, 8, float("inf"))


def stage_keys(config: ml_collections.ConfigDict, weights_id: str, ids: Sequence[str],
               fingerprints: Sequence[str] = ()) -> dict:
  """Cache keys of every stage: each covers its own config and everything upstream.

  The dataset-level stages (masks onwards) also cover the set of images and their content
  fingerprints, so adding, removing or changing an image recomputes them.
  """
  feat = config_hash("features", weights_id, config.arch, config.features)
  masks = config_hash("masks", feat, config.clustering, config.upsample, config.seed,
                      sorted(ids), fingerprints)
  refine = config_hash("refine", masks, config.crf)
  regions = config_hash("regions", refine, {k: v for k, v in config.assign.items()
                                            if k not in ("num_classes", "n_init", "crop_batch")})
  return {"features": feat, "masks": masks, "refine": refine, "regions": regions}


class LabelMaps(Mapping):
  """{id: [H, W] uint8 label map}, painted on access from the regions stage and the classes
  of each image's region slots (nothing per image is held: memory stays flat in N)."""

  def __init__(self, region_stage: Stage, classes: dict):
    self._stage, self._classes = region_stage, classes

  def __getitem__(self, item_id: str) -> np.ndarray:
    regions = self._stage.load_fields(item_id, ("regions",))["regions"]
    return np.asarray(labels_lib.paint_labels(
        jnp.asarray(regions.astype(np.int32)), jnp.asarray(self._classes[item_id]))
    ).astype(np.uint8)

  def __iter__(self):
    return iter(self._classes)

  def __len__(self) -> int:
    return len(self._classes)


@dataclasses.dataclass(frozen=True)
class SegmentResult:
  """What `segment` returns for this host's images.

  Attributes:
    ids: this host's segmented image ids, in input order.
    labels: {id: [H, W] uint8 label map (0 = background, class + 1)}, a `LabelMaps`
      (read on access).
    skipped: {id: reason} of the images that could not be read.
    timings: {stage: seconds}.
    stage_keys: {stage: cache key}.
    num_regions: object regions over this host's images.
    stages: {stage name: its `Stage` store}; `artefacts` reads them.
  """
  ids: list
  labels: dict
  skipped: dict
  timings: dict
  stage_keys: dict
  num_regions: int
  stages: dict

  def artefacts(self, stage: str, item_id: str) -> dict:
    """The arrays stage `stage` (features / masks / refine / regions) stored for `item_id`."""
    if stage not in self.stages:
      raise KeyError(f"unknown stage {stage!r}; expected one of {sorted(self.stages)}")
    return self.stages[stage].load(item_id)


def segment(config: ml_collections.ConfigDict, items: Sequence[Item], *, params, arch=None,
            out_dir: os.PathLike | None = None, weights_id: str = "unknown",
            progress: bool = True, mesh=None) -> SegmentResult:
  """Runs every stage over `items`; caches under `out_dir/cache` (None: in memory).

  Scale-out: the per-image stages run data-parallel over `mesh` (default: all local devices
  when there are several; `sharding.local_mesh()`), the masks stage is streamed
  (`config.clustering.chunk_images`). In a multi-host run (`sharding.initialize` called
  first) every process passes the *same* full `items` list; each processes and writes its
  own `sharding.host_shard(items)` (give each host its own `out_dir`, or a shared one), and
  the dataset-level statistics are combined across hosts. The result holds this host's images.
  """
  arch = arch or config.arch
  if mesh is None and jax.local_device_count() > 1:
    mesh = sharding.local_mesh()
  root = None if out_dir is None else files.as_path(out_dir) / "cache"
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    raise ValueError("image ids must be unique")
  fp = {it.id: it.fingerprint for it in items}
  keys = stage_keys(config, weights_id, ids, [fp[i] for i in sorted(ids)])
  meta = {"config": config.to_dict(), "weights": weights_id}
  my_items = sharding.host_shard(items) if jax.process_count() > 1 else list(items)
  timings, skipped = {}, {}

  threads = dict(read_threads=config.input.read_threads)
  feat_stage = Stage(root, "features", keys["features"], meta)
  stages = {"features": feat_stage}
  try:  # whatever happens (Ctrl-C too), finished images are written to the cache
    t = time.perf_counter()
    my_ok = run_features(feat_stage, my_items, params=params, arch=arch, cfg=config.features,
                         progress=progress, skipped=skipped, mesh=mesh,
                         prefetch=config.input.prefetch, **threads)
    ok_ids = plan.readable_ids(ids, my_ok)
    timings["features"] = time.perf_counter() - t
    if not ok_ids:
      raise ValueError("no readable images to segment" +
                       (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    if set(ok_ids) != set(ids):  # the set changed: dataset-level stages are keyed by it
      keys = stage_keys(config, weights_id, ok_ids, [fp[i] for i in sorted(ok_ids)])
    local_range = plan.local_range(ids, ok_ids, my_ok)
    mine = set(my_ok)
    ok_items = [it for it in my_items if it.id in mine]
    my_ids = list(ok_ids[local_range[0]:local_range[1]])
    stages.update({name: Stage(root, name, keys[name], meta) for name in STAGES[1:]})

    t = time.perf_counter()
    run_masks(stages["masks"], feat_stage, ok_ids, cfg=config.clustering, seed=config.seed,
              temperature=config.upsample.temperature, progress=progress, mesh=mesh,
              local_range=local_range)
    stages["masks"].flush()
    timings["masks"] = time.perf_counter() - t

    t = time.perf_counter()
    canvas, grid_canvas = pixel_canvases(stages["masks"], [it.id for it in ok_items],
                                         config.crf)
    run_refine(stages["refine"], stages["masks"], ok_items, cfg=config.crf,
               progress=progress, mesh=mesh, canvas=canvas, grid_canvas=grid_canvas,
               **threads)
    timings["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    run_regions(stages["regions"], stages["refine"], ok_items, params=params, arch=arch,
                cfg=config.assign, bucket_pixels=config.crf.bucket_pixels,
                dtype=config.features.dtype, progress=progress, mesh=mesh, canvas=canvas,
                **threads)
    timings["regions"] = time.perf_counter() - t
  finally:
    for st in stages.values():
      st.flush()

  t = time.perf_counter()
  classes = assign_classes(stages["regions"], ok_ids, cfg=config.assign, seed=config.seed,
                           local_range=local_range)
  labels = LabelMaps(stages["regions"], {i: classes[i] for i in my_ids})
  num_regions = sum(int((classes[i] >= 0).sum()) for i in my_ids)
  timings["labels"] = time.perf_counter() - t
  return SegmentResult(ids=my_ids, labels=labels, skipped=skipped, timings=timings,
                       stage_keys=keys, num_regions=num_regions, stages=stages)
