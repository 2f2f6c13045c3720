"""The staged LightCluster runner: cache, resume, progress bars, outputs.

Stages (METHOD.md steps 1-9), each cached per image under `OUT/cache/<stage>-<hash>/`, where
the hash covers the weights, every config field the stage depends on and the upstream
stage's hash; so an interrupted run resumes where it stopped, and a re-run with a changed CRF
setting recomputes only the CRF and what follows it:

  features     ViT Keys / CLS / CLS attention per image          (per image, batched)
  masks        image-, category-, dataset-level + consistent fg   (needs the whole set)
  refine       soft fg probability -> pixels (bilinear) -> CRF    (per image, batched)
  regions      object regions, crops, crop CLS descriptors        (per image)
  labels       k-means of all descriptors -> class ids -> PNGs    (whole set, cheap)

Every file is written atomically (temporary file + rename), so Ctrl-C never leaves a
half-written artefact behind. `segment_arrays` runs the same stages in memory for notebooks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
import time
import warnings
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lightcluster_jax import assign as assign_lib
from lightcluster_jax import crf as crf_lib
from lightcluster_jax import features as features_lib
from lightcluster_jax import masks as masks_lib
from lightcluster_jax import vit
from lightcluster_jax.config import config_hash
from lightcluster_jax.resize import resize


# ----------------------------------------------------------------------------- storage


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same folder and a rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class Stage:
  """Artefacts of one stage: `<root>/<name>-<key>/<id>.npz`, or a dict when root is None."""

  def __init__(self, root: pathlib.Path | None, name: str, key: str, meta: dict | None = None):
    self.name, self.key = name, key
    self.dir = None if root is None else pathlib.Path(root) / f"{name}-{key}"
    self._mem: dict[str, dict] = {}
    if self.dir is not None:
      self.dir.mkdir(parents=True, exist_ok=True)
      if meta is not None and not (self.dir / "meta.json").exists():
        atomic_write_bytes(self.dir / "meta.json", json.dumps(meta, indent=1, default=str).encode())

  def _path(self, item_id: str) -> pathlib.Path:
    return self.dir / f"{item_id}.npz"

  def has(self, item_id: str, fingerprint: str | None = None) -> bool:
    """Whether `item_id` is stored (and, if given, stored for this input fingerprint)."""
    present = item_id in self._mem if self.dir is None else self._path(item_id).is_file()
    if not present or not fingerprint:
      return present
    if self.dir is None:
      return str(self._mem[item_id].get("fingerprint", "")) == fingerprint
    with np.load(self._path(item_id)) as f:
      return "fingerprint" in f.files and str(f["fingerprint"]) == fingerprint

  def save(self, item_id: str, arrays: dict) -> None:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if self.dir is None:
      self._mem[item_id] = arrays
      return
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(self._path(item_id), buf.getvalue())

  def load(self, item_id: str) -> dict:
    if self.dir is None:
      return self._mem[item_id]
    try:
      with np.load(self._path(item_id)) as f:
        return {k: f[k] for k in f.files}
    except Exception as e:
      raise RuntimeError(f"corrupt cache file {self._path(item_id)} ({e}); delete it to "
                         "recompute") from e


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: an id (file stem), how to get its pixels, and a content fingerprint.

  The fingerprint (file size + mtime, or a hash of an in-memory array) is stored with the
  cached features, so a changed image under an old id is recomputed, never reused.
  """
  id: str
  load: Callable[[], np.ndarray]
  fingerprint: str = ""


def items_from_paths(paths: Sequence[os.PathLike]) -> list[Item]:
  from lightcluster_jax.data import images as images_lib
  seen = {}
  for p in paths:
    p = pathlib.Path(p)
    if p.stem in seen:
      raise ValueError(f"two images share the id {p.stem!r}: {seen[p.stem]} and {p}")
    seen[p.stem] = p
  def fingerprint(p):
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"
  return [Item(stem, (lambda p=p: images_lib.load_image(p)), fingerprint(p))
          for stem, p in seen.items()]


def items_from_arrays(images: Sequence[np.ndarray], ids: Sequence[str] | None = None):
  """Items of in-memory [H, W, 3] uint8 arrays (ids default to 00000, 00001, ...)."""
  import hashlib
  ids = list(ids) if ids is not None else [f"{i:05d}" for i in range(len(images))]
  return [Item(i, (lambda a=a: np.asarray(a)),
               hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16])
          for i, a in zip(ids, images)]


# ----------------------------------------------------------------------------- stages


def _bar(iterable, *, total, desc, enabled):
  return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit="img",
              dynamic_ncols=True, leave=True)


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def run_features(stage: Stage, items: Sequence[Item], *, params, arch, cfg, progress=True,
                 skipped: dict | None = None) -> list[str]:
  """ViT features of every item not yet in `stage`; returns the ids that have features.

  Unreadable images are skipped with a warning naming the file (recorded in `skipped`).
  """
  config = vit.get_config(arch)
  image_size = cfg.image_size or None
  fn = features_lib.make_feature_fn(config, dtype=_dtype(cfg.dtype))
  todo = [it for it in items if not stage.has(it.id, it.fingerprint)]
  done = {it.id for it in items} - {it.id for it in todo}
  skipped = {} if skipped is None else skipped
  fingerprints = {it.id: it.fingerprint for it in items}

  def preprocessed():
    for it in todo:
      try:
        img = it.load()
        pre = features_lib.preprocess(img, image_size=image_size, patch_size=config.patch_size)
      except Exception as e:  # corrupt file / too small: skip, name it, go on
        warnings.warn(f"skipping image {it.id!r}: {e}")
        skipped[it.id] = str(e)
        continue
      yield it.id, pre

  bar = _bar(None, total=len(todo), desc="features", enabled=progress)
  for shape, group in features_lib.iter_batches(
      preprocessed(), batch_size=cfg.batch_size, bucket_multiple=cfg.bucket_multiple):
    pixels, mask = features_lib.pad_batch([g[1] for g in group], shape, config.patch_size,
                                          cfg.batch_size)
    out = jax.device_get(fn(params, pixels, mask))
    for b, (item_id, pre) in enumerate(group):
      feats = features_lib.unpad_features(out, b, pre.grid_hw, shape, pre.orig_hw)
      stage.save(item_id, dict(feats, fingerprint=fingerprints[item_id]))
      done.add(item_id)
    bar.update(len(group))
  bar.close()
  return [it.id for it in items if it.id in done]


def pad_grids(feats: Sequence[dict]):
  """Stacks per-image features on a common padded patch grid.

  Returns:
    keys [N, Hm*Wm, D], valid [N, Hm, Wm], cls [N, D], cls_attn [N, Hm*Wm].
  """
  hm = max(f["grid_hw"][0] for f in feats)
  wm = max(f["grid_hw"][1] for f in feats)
  d = feats[0]["keys"].shape[-1]
  n = len(feats)
  keys = np.zeros((n, hm, wm, d), np.float32)
  attn = np.zeros((n, hm, wm), np.float32)
  valid = np.zeros((n, hm, wm), bool)
  for i, f in enumerate(feats):
    h, w = (int(v) for v in f["grid_hw"])
    keys[i, :h, :w] = f["keys"].reshape(h, w, d)
    attn[i, :h, :w] = f["cls_attn"].reshape(h, w)
    valid[i, :h, :w] = True
  cls = np.stack([f["cls"] for f in feats])
  return keys.reshape(n, hm * wm, d), valid, cls, attn.reshape(n, hm * wm)


def decided_probability(fg: jax.Array, soft: jax.Array) -> jax.Array:
  """Patch fg probability whose side is decided by the consistent mask `fg`.

  The consistency rule decides foreground or background; the soft centroid probability
  `soft` only sets the confidence: p = max(s, 1-s) on foreground patches, min(s, 1-s) on
  background ones. So upsampling and the CRF start from exactly the consistent mask.
  """
  conf = jnp.maximum(soft, 1.0 - soft)
  return jnp.where(fg, conf, 1.0 - conf)


def run_masks(stage: Stage, feat_stage: Stage, ids: Sequence[str], *, cfg, seed: int,
              temperature: float, progress=True) -> None:
  """Multilevel consistent foreground masks and soft patch probabilities for the whole set."""
  if all(stage.has(i) for i in ids):
    return
  feats = [feat_stage.load(i) for i in _bar(ids, total=len(ids), desc="masks: load",
                                            enabled=progress)]
  keys, valid, cls, attn = pad_grids(feats)
  keys_j, valid_j = jnp.asarray(keys), jnp.asarray(valid)
  out = masks_lib.multilevel_foreground(
      keys_j, valid_j, jnp.asarray(cls), jnp.asarray(attn),
      key=jax.random.PRNGKey(seed), k_image=cfg.k_image, k_category=cfg.k_category,
      k_dataset=cfg.k_dataset, num_categories=min(cfg.num_categories, len(ids)),
      rule=cfg.rule, dilate=cfg.dilate, min_region_patches=cfg.min_region_patches,
      dataset_fit_patches=cfg.dataset_fit_patches, n_init=cfg.n_init,
      n_init_image=cfg.n_init)
  soft = masks_lib.soft_foreground(keys_j, out["fg_centroid"], out["bg_centroid"], valid_j,
                                   temperature=temperature)
  prob = decided_probability(out["consistent"], soft)
  out = jax.device_get(dict(out, prob=prob))
  for i, item_id in enumerate(ids):
    h, w = (int(v) for v in feats[i]["grid_hw"])
    stage.save(item_id, {
        **{lvl: out[lvl][i, :h, :w] for lvl in ("image", "category", "dataset", "consistent")},
        "prob": out["prob"][i, :h, :w], "group": out["groups"][i],
        "orig_hw": feats[i]["orig_hw"]})


def _round_up(n: int, multiple: int) -> int:
  return int(np.ceil(n / multiple) * multiple)


def _pixel_bucket(hw, multiple):
  return tuple(_round_up(n, multiple) for n in hw)


def _run_pixel_buckets(items: Sequence[Item], payload: Callable, flush: Callable, *,
                       bucket_pixels: int, batch: int) -> None:
  """Groups (id, payload(item), image) by padded pixel shape; calls flush(shape, group).

  Batches have a fixed size and a small set of shapes, so the jitted stage functions compile
  once per bucket, not per image; partial batches are flushed at the end.
  """
  groups: dict[tuple, list] = {}
  for it in items:
    img = it.load()
    shape = _pixel_bucket(img.shape[:2], bucket_pixels)
    group = groups.setdefault(shape, [])
    group.append((it.id, payload(it), img))
    if len(group) == batch:
      flush(shape, groups.pop(shape))
  for shape, group in groups.items():
    flush(shape, group)


@functools.lru_cache(maxsize=16)
def make_refine_fn(crf_params, backend, enabled: bool):
  """Jitted `(prob [B,h,w], grid_hw [B,2], image [B,H,W,3] uint8, orig_hw [B,2]) -> fg prob`.

  Upsamples each image's patch probability bilinearly (PyTorch align_corners=False) onto its
  own valid pixel area of the padded batch, then runs the dense CRF there.
  """
  def one(prob, grid_hw, image, orig_hw):
    hh, ww = image.shape[:2]
    p = resize(prob[..., None], (hh, ww), method="bilinear", in_valid_hw=(grid_hw[0], grid_hw[1]),
               out_valid_hw=(orig_hw[0], orig_hw[1]))[..., 0]
    p = jnp.clip(p, 1e-5, 1 - 1e-5)
    if not enabled:
      return p
    probs = jnp.stack([1.0 - p, p], axis=-1)
    unary = crf_lib.unary_from_probs(probs)
    kw = {} if backend is None else {"backend": backend}
    q = crf_lib.dense_crf(unary, image.astype(jnp.float32), params=crf_params,
                          valid_hw=(orig_hw[0], orig_hw[1]), **kw)
    return q[..., 1]
  return jax.jit(jax.vmap(one))


def run_refine(stage: Stage, mask_stage: Stage, items: Sequence[Item], *, cfg, progress=True):
  """Upsampling + CRF of every image's soft mask; stores the refined boolean mask."""
  todo = [it for it in items if not stage.has(it.id)]
  if not todo:
    return
  params = crf_lib.get_params(cfg.preset)
  backend = None if cfg.backend == "default" else cfg.backend
  fn = make_refine_fn(params, backend, cfg.enabled)
  bar = _bar(None, total=len(todo), desc="refine (CRF)" if cfg.enabled else "upsample",
             enabled=progress)
  batch = 2

  def flush(shape, group):
    hb, wb = shape
    # A small fixed set of grid capacities, so batches do not recompile per image.
    gh = _round_up(max(m["prob"].shape[0] for _, m, _ in group), 8)
    gw = _round_up(max(m["prob"].shape[1] for _, m, _ in group), 8)
    n = batch
    probs = np.zeros((n, gh, gw), np.float32)
    grid = np.ones((n, 2), np.int32)
    imgs = np.zeros((n, hb, wb, 3), np.uint8)
    orig = np.ones((n, 2), np.int32)
    for b, (_, m, img) in enumerate(group):
      h, w = m["prob"].shape
      probs[b, :h, :w] = m["prob"]
      grid[b] = (h, w)
      imgs[b, :img.shape[0], :img.shape[1]] = img
      orig[b] = img.shape[:2]
    fg = np.asarray(fn(probs, grid, imgs, orig))
    for b, (item_id, _, img) in enumerate(group):
      stage.save(item_id, {"fg": fg[b, :img.shape[0], :img.shape[1]] > 0.5,
                           "prob": fg[b, :img.shape[0], :img.shape[1]].astype(np.float16)})
    bar.update(len(group))

  _run_pixel_buckets(todo, lambda it: mask_stage.load(it.id), flush,
                     bucket_pixels=cfg.bucket_pixels, batch=batch)
  bar.close()


@functools.lru_cache(maxsize=16)
def make_regions_fn(arch, *, max_regions, min_region_pixels, whole_foreground, box_margin,
                    crop_size, dtype=jnp.float32):
  """Jitted `(params, fg [B,H,W], image [B,H,W,3] uint8, orig_hw [B,2])` ->
  (region labels [B,H,W], descriptors [B,R,D] L2-normalised crop CLS, valid [B,R])."""
  apply_fn = vit.make_apply_fn(arch, outputs=("cls",), dtype=dtype)
  mean = jnp.asarray(features_lib.IMAGENET_MEAN)
  std = jnp.asarray(features_lib.IMAGENET_STD)

  def one(fg, image, orig_hw):
    regions = assign_lib.find_regions(fg, max_regions=max_regions,
                                      min_region_pixels=min_region_pixels,
                                      whole_foreground=whole_foreground, valid_hw=orig_hw)
    pixels = (image.astype(jnp.float32) / 255.0 - mean) / std
    crops = assign_lib.crop_regions(pixels, regions, crop_size=crop_size,
                                    box_margin=box_margin, valid_hw=orig_hw)
    return regions, crops

  @jax.jit
  def fn(params, fg, image, orig_hw):
    regions, crops = jax.vmap(one)(fg, image, orig_hw)
    b, r = crops.shape[:2]
    cls = apply_fn(params, crops.reshape(b * r, crop_size, crop_size, 3))["cls"]
    cls = cls.astype(jnp.float32).reshape(b, r, -1)
    cls = cls / jnp.maximum(jnp.linalg.norm(cls, axis=-1, keepdims=True), 1e-12)
    return regions.labels, cls, regions.valid
  return fn


def run_regions(stage: Stage, refine_stage: Stage, items: Sequence[Item], *, params, arch,
                cfg, bucket_pixels: int, dtype="float32", progress=True) -> None:
  """Object regions and crop CLS descriptors of every image not yet in `stage`."""
  todo = [it for it in items if not stage.has(it.id)]
  if not todo:
    return
  fn = make_regions_fn(arch, max_regions=cfg.max_regions,
                       min_region_pixels=cfg.min_region_pixels,
                       whole_foreground=cfg.whole_foreground, box_margin=cfg.box_margin,
                       crop_size=cfg.crop_size, dtype=_dtype(dtype))
  bar = _bar(None, total=len(todo), desc="regions", enabled=progress)
  batch = 2

  def flush(shape, group):
    hb, wb = shape
    fg = np.zeros((batch, hb, wb), bool)
    imgs = np.zeros((batch, hb, wb, 3), np.uint8)
    orig = np.ones((batch, 2), np.int32)
    for b, (_, f, img) in enumerate(group):
      fg[b, :img.shape[0], :img.shape[1]] = f
      imgs[b, :img.shape[0], :img.shape[1]] = img
      orig[b] = img.shape[:2]
    labels, desc, valid = jax.device_get(fn(params, fg, imgs, orig))
    for b, (item_id, _, img) in enumerate(group):
      h, w = img.shape[:2]
      stage.save(item_id, {"regions": labels[b, :h, :w].astype(np.uint8),
                           "descriptors": desc[b], "valid": valid[b]})
    bar.update(len(group))

  _run_pixel_buckets(todo, lambda it: refine_stage.load(it.id)["fg"], flush,
                     bucket_pixels=bucket_pixels, batch=batch)
  bar.close()


def assign_classes(region_stage: Stage, ids: Sequence[str], *, cfg, seed: int):
  """k-means of all region descriptors of the set; returns {id: class id per region slot}."""
  loaded = [region_stage.load(i) for i in ids]
  if not loaded:
    return {}
  desc = np.concatenate([r["descriptors"] for r in loaded])
  valid = np.concatenate([r["valid"] for r in loaded])
  classes = np.asarray(assign_lib.cluster_descriptors(
      jnp.asarray(desc), jnp.asarray(valid), cfg.num_classes,
      key=jax.random.fold_in(jax.random.PRNGKey(seed), 1), n_init=cfg.n_init))
  out, start = {}, 0
  for item_id, r in zip(ids, loaded):
    n = len(r["valid"])
    out[item_id] = classes[start:start + n]
    start += n
  return out


# ----------------------------------------------------------------------------- runner


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
                                            if k not in ("num_classes", "n_init")})
  return {"features": feat, "masks": masks, "refine": refine, "regions": regions}


def segment(config: ml_collections.ConfigDict, items: Sequence[Item], *, params, arch=None,
            out_dir: os.PathLike | None = None, weights_id: str = "unknown",
            progress: bool = True) -> dict:
  """Runs every stage over `items`; writes outputs under `out_dir` (None: in memory).

  Returns:
    dict with "labels" {id: [H, W] uint8 label map (0 = background, class + 1)}, "masks"
    {id: per-stage patch masks}, "skipped" {id: reason}, "timings" {stage: seconds},
    "stage_keys", "num_regions".
  """
  arch = arch or config.arch
  root = None if out_dir is None else pathlib.Path(out_dir) / "cache"
  timings, skipped = {}, {}
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    raise ValueError("image ids must be unique")
  fp = {it.id: it.fingerprint for it in items}
  keys = stage_keys(config, weights_id, ids, [fp[i] for i in sorted(ids)])
  meta = {"config": config.to_dict(), "weights": weights_id}

  t = time.perf_counter()
  feat_stage = Stage(root, "features", keys["features"], meta)
  ok_ids = run_features(feat_stage, items, params=params, arch=arch, cfg=config.features,
                        progress=progress, skipped=skipped)
  timings["features"] = time.perf_counter() - t
  if not ok_ids:
    raise ValueError("no readable images to segment" +
                     (f" (skipped: {', '.join(skipped)})" if skipped else ""))
  if set(ok_ids) != set(ids):  # the set changed: dataset-level stages are keyed by it
    keys = stage_keys(config, weights_id, ok_ids, [fp[i] for i in sorted(ok_ids)])
  ok_items = [it for it in items if it.id in set(ok_ids)]

  t = time.perf_counter()
  mask_stage = Stage(root, "masks", keys["masks"], meta)
  run_masks(mask_stage, feat_stage, ok_ids, cfg=config.clustering, seed=config.seed,
            temperature=config.upsample.temperature, progress=progress)
  timings["masks"] = time.perf_counter() - t

  t = time.perf_counter()
  refine_stage = Stage(root, "refine", keys["refine"], meta)
  run_refine(refine_stage, mask_stage, ok_items, cfg=config.crf, progress=progress)
  timings["refine"] = time.perf_counter() - t

  t = time.perf_counter()
  region_stage = Stage(root, "regions", keys["regions"], meta)
  run_regions(region_stage, refine_stage, ok_items, params=params, arch=arch,
              cfg=config.assign, bucket_pixels=config.crf.bucket_pixels,
              dtype=config.features.dtype, progress=progress)
  timings["regions"] = time.perf_counter() - t

  t = time.perf_counter()
  classes = assign_classes(region_stage, ok_ids, cfg=config.assign, seed=config.seed)
  labels = {}
  for item_id in ok_ids:
    r = region_stage.load(item_id)
    labels[item_id] = np.asarray(assign_lib.paint_labels(
        jnp.asarray(r["regions"].astype(np.int32)), jnp.asarray(classes[item_id]))).astype(np.uint8)
  timings["labels"] = time.perf_counter() - t
  return {"labels": labels, "skipped": skipped, "timings": timings, "stage_keys": keys,
          "ids": ok_ids, "stages": {"features": feat_stage, "masks": mask_stage,
                                    "refine": refine_stage, "regions": region_stage},
          "num_regions": int(sum(int(region_stage.load(i)["valid"].sum()) for i in ok_ids))}


def write_outputs(result: dict, items: Sequence[Item], out_dir: os.PathLike, *,
                  config: ml_collections.ConfigDict, weights_id: str, overlays: bool = True,
                  progress: bool = True) -> dict:
  """Writes OUT/masks/<id>.png (VOC palette), OUT/overlays/<id>.jpg and OUT/summary.json."""
  from lightcluster_jax import viz
  from lightcluster_jax.data import voc
  out_dir = pathlib.Path(out_dir)
  by_id = {it.id: it for it in items}
  for item_id in _bar(result["ids"], total=len(result["ids"]), desc="write", enabled=progress):
    lab = result["labels"][item_id]
    voc.write_label_png(out_dir / "masks" / f"{item_id}.png", lab)
    if overlays:
      img = by_id[item_id].load()
      viz.save_image(out_dir / "overlays" / f"{item_id}.jpg", viz.overlay(img, lab))
  n = max(1, len(result["ids"]))
  summary = {
      "config": config.to_dict(), "weights_sha256": weights_id,
      "num_images": len(result["ids"]), "skipped": result["skipped"],
      "num_regions": result["num_regions"], "timings_s": result["timings"],
      "seconds_per_image": sum(result["timings"].values()) / n,
      "stage_keys": result["stage_keys"], "jax_devices": [str(d) for d in jax.devices()],
  }
  atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1).encode())
  return summary
