"""The staged LightCluster runner: cache, resume, progress bars, outputs.

Stages (METHOD.md steps 1-9), each cached per image under `OUT/cache/<stage>-<hash>/`, where
the hash covers the weights, every config field the stage depends on and the upstream
stage's hash; so an interrupted run resumes where it stopped, and a re-run with a changed CRF
setting recomputes only the CRF and what follows it:

  features     ViT Keys / CLS / CLS attention per image          (per image, batched)
  masks        image-, category-, dataset-level + consistent fg   (whole set, streamed in
               chunks of clustering.chunk_images from the features cache)
  refine       soft fg probability -> pixels (bilinear) -> CRF    (per image, batched)
  regions      object regions, crops, crop CLS descriptors        (per image)
  labels       k-means of all descriptors -> class ids -> PNGs    (whole set, cheap)

Scale-out (lightcluster_jax.sharding): the per-image stages run data-parallel over the local
devices; the dataset statistics are psum-ed over them and summed across hosts; in a
multi-host run each process segments and writes `sharding.host_shard(items)`.

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

from lightcluster_jax.stages import regions as assign_lib
from lightcluster_jax.blocks import crf as crf_lib
from lightcluster_jax.stages import features as features_lib
from lightcluster_jax.blocks import kmeans as kmeans_lib
from lightcluster_jax.stages import masks as masks_lib
from lightcluster_jax.blocks import vit
from lightcluster_jax.config import config_hash
from lightcluster_jax.blocks.resize import resize


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


def _mesh_batch(batch: int, mesh) -> int:
  """A batch size that splits evenly over the mesh's devices."""
  from lightcluster_jax.blocks import sharding
  return _round_up(batch, sharding.mesh_size(mesh))


def _parallel(fn, mesh, batch_argnums):
  from lightcluster_jax.blocks import sharding
  if sharding.mesh_size(mesh) <= 1:
    return fn
  return sharding.data_parallel(fn, mesh, batch_argnums=batch_argnums)


def run_features(stage: Stage, items: Sequence[Item], *, params, arch, cfg, progress=True,
                 skipped: dict | None = None, mesh=None) -> list[str]:
  """ViT features of every item not yet in `stage`; returns the ids that have features.

  Unreadable images are skipped with a warning naming the file (recorded in `skipped`).
  With a `mesh` of n devices the batch is rounded up to a multiple of n and split over them.
  """
  config = vit.get_config(arch)
  image_size = cfg.image_size or None
  fn = _parallel(features_lib.make_feature_fn(config, dtype=_dtype(cfg.dtype)), mesh, (1, 2))
  batch_size = _mesh_batch(cfg.batch_size, mesh)
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
      preprocessed(), batch_size=batch_size, bucket_multiple=cfg.bucket_multiple):
    pixels, mask = features_lib.pad_batch([g[1] for g in group], shape, config.patch_size,
                                          batch_size)
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
              temperature: float, progress=True, mesh=None,
              local_range: tuple[int, int] | None = None) -> None:
  """Multilevel consistent foreground masks and soft patch probabilities for the whole set.

  `cfg.chunk_images > 0` (default): `run_masks_streamed` (bounded memory, sharded over
  `mesh`, multi-host over `local_range`); 0: everything in memory at once, one call of
  `masks.multilevel_foreground` (the reference the streamed path reproduces).
  """
  chunk = int(cfg.get("chunk_images", 0) or 0)
  start, end = (0, len(ids)) if local_range is None else local_range
  missing = sum(not stage.has(i) for i in ids[start:end])
  if jax.process_count() > 1:
    from lightcluster_jax.blocks import sharding
    missing = int(sharding.host_sum(np.asarray(missing, np.int64)))
  if not missing:
    return
  if chunk > 0 or jax.process_count() > 1:
    run_masks_streamed(stage, feat_stage, ids, cfg=cfg, seed=seed, temperature=temperature,
                       progress=progress, mesh=mesh, local_range=local_range)
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


# ----------------------------------------------------------------------------- streamed masks


def _load_fields(stage: Stage, item_id: str, fields: Sequence[str]) -> dict:
  """Only `fields` of a cached item (an npz member is read only when asked for)."""
  if stage.dir is None:
    d = stage.load(item_id)
    return {k: d[k] for k in fields}
  try:
    with np.load(stage._path(item_id)) as f:
      return {k: f[k] for k in fields}
  except Exception as e:
    raise RuntimeError(f"corrupt cache file {stage._path(item_id)} ({e}); delete it to "
                       "recompute") from e


def _gather_rows(local: np.ndarray, start: int, n_total: int) -> np.ndarray:
  """Rows [n_local, ...] of this host (global rows start..) -> all rows [n_total, ...].

  Every host calls it (lock-step); the hosts' row ranges must partition [0, n_total).
  """
  if jax.process_count() == 1:
    return local
  from lightcluster_jax.blocks import sharding
  ranges = sharding.host_gather(np.asarray([start, len(local)], np.int64))
  cap = max(1, int(ranges[:, 1].max()))
  buf = np.zeros((cap,) + local.shape[1:], local.dtype)
  buf[:len(local)] = local
  got = sharding.host_gather(buf)
  out = np.zeros((n_total,) + local.shape[1:], local.dtype)
  for h, (s, n) in enumerate(ranges):
    out[s:s + n] = got[h][:n]
  return out


class _TopK:
  """Running top-`size` of (priority desc, global index asc) with the rows attached: the
  order `jax.lax.top_k` gives the in-memory sample (ties: lower index first)."""

  def __init__(self, size: int, dim: int, with_groups: bool = False):
    self.size, self.dim = size, dim
    self.prio = np.zeros((0,), np.float32)
    self.idx = np.zeros((0,), np.int64)
    self.x = np.zeros((0, dim), np.float32)
    self.gid = np.zeros((0,), np.int32)

  def add(self, prio, idx, x, gid=None):
    """Offers a chunk; its indices must all exceed the ones offered before (chunks come in
    global order), so once the set is full a newcomer must beat the smallest kept priority
    strictly, and memory stays at `size` rows plus the few newcomers of one chunk."""
    keep = prio >= 0          # invalid patches: priority -1, appended as zeros at the end
    if len(self.prio) >= self.size:
      keep &= prio > self.prio[-1]
    if not keep.any():
      return
    self.prio = np.concatenate([self.prio, prio[keep]])
    self.idx = np.concatenate([self.idx, idx[keep]])
    self.x = np.concatenate([self.x, x[keep]])
    if gid is not None:
      self.gid = np.concatenate([self.gid, gid[keep]])
    if len(self.prio) >= self.size:
      self._trim()

  def _trim(self):
    """Keeps the `size` best, sorted best first (so self.prio[-1] is the smallest kept)."""
    order = np.lexsort((self.idx, -self.prio))[:self.size]
    self.prio, self.idx, self.x = self.prio[order], self.idx[order], self.x[order]
    if len(self.gid):
      self.gid = self.gid[order]

  def merged(self):
    """Top over all hosts -> (x [size, D], mask [size], gid [size])."""
    self._trim()
    if jax.process_count() > 1:
      from lightcluster_jax.blocks import sharding
      n = len(self.prio)
      pad = self.size - n
      prio = np.concatenate([self.prio, np.full((pad,), -2.0, np.float32)])
      idx = np.concatenate([self.idx, np.full((pad,), -1, np.int64)])
      x = np.concatenate([self.x, np.zeros((pad, self.dim), np.float32)])
      gid = np.concatenate([self.gid, np.zeros((self.size - len(self.gid),), np.int32)])
      prio, idx = sharding.host_gather(prio).reshape(-1), sharding.host_gather(idx).reshape(-1)
      x = sharding.host_gather(x).reshape(-1, self.dim)
      gid = sharding.host_gather(gid).reshape(-1)
      keep = prio >= 0
      self.prio, self.idx, self.x, self.gid = prio[keep], idx[keep], x[keep], gid[keep]
      self._trim()
    n = len(self.prio)
    x = np.zeros((self.size, self.dim), np.float32)
    x[:n] = self.x
    gid = np.zeros((self.size,), np.int32)
    gid[:min(n, len(self.gid))] = self.gid[:n]
    return x, np.arange(self.size) < n, gid


@functools.partial(jax.jit, static_argnames=("k_image", "n_init_image", "max_iter"))
def _chunk_image_level(keys, valid, attn, image_ids, k_img, *, k_image, n_init_image,
                       max_iter):
  """Image-level fg of a chunk, exactly as `masks.multilevel_foreground` computes it."""
  x = kmeans_lib.l2_normalize(keys.astype(jnp.float32))
  prng = jax.vmap(lambda i: jax.random.fold_in(k_img, i))(image_ids)
  img = masks_lib.image_level_foreground(x, valid, attn, keys_prng=prng, k=k_image,
                                         n_init=n_init_image, max_iter=max_iter, cosine=False)
  return img["fg"]


@functools.lru_cache(maxsize=16)
def _image_level_fn(k_image, n_init_image, max_iter):
  """One callable per setting, so `sharding.data_parallel` reuses its compiled wrapper."""
  return functools.partial(_chunk_image_level, k_image=k_image, n_init_image=n_init_image,
                           max_iter=max_iter)


@jax.jit
def _normalize(keys):
  return kmeans_lib.l2_normalize(keys.astype(jnp.float32))


@jax.jit
def _group_assign(x, gid, centroids):
  """Nearest centroid of each point's own group (grouped_kmeans' final E-step)."""
  d = kmeans_lib._own_group_dists(x, jnp.sum(x * x, axis=-1), gid, centroids)
  return jnp.argmin(d, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("g", "rule", "dilate", "min_region_patches",
                                             "connectivity", "min_image_share"))
def _chunk_consistent(x, valid, i_fg, dat_assign, cat_assign, groups, dat_table, cat_table,
                      *, g, rule, dilate, min_region_patches, connectivity, min_image_share):
  """Steps 4-5 of `masks.multilevel_foreground` for a chunk (all per image)."""
  b, h, w = valid.shape
  gid = jnp.broadcast_to(groups[:, None, None], (b, h, w))
  c_fg = cat_table[jnp.clip(gid, 0, g - 1), jnp.clip(cat_assign, 0, None)]
  c_fg = c_fg & (cat_assign >= 0) & valid
  d_fg = dat_table[jnp.clip(dat_assign, 0, None)] & (dat_assign >= 0) & valid
  d_ok = masks_lib.trusted_level(d_fg, i_fg, min_image_share=min_image_share)
  c_ok = masks_lib.trusted_level(c_fg, i_fg, min_image_share=min_image_share)
  d_used = jnp.where(d_ok[:, None, None], d_fg, i_fg)
  c_used = jnp.where(c_ok[:, None, None], c_fg, i_fg)
  raw = masks_lib.consistency(d_used, c_used, i_fg, valid, rule=rule, dilate=dilate)
  clean = masks_lib.remove_small_components(raw, min_region_patches, connectivity=connectivity)
  empty = ~jnp.any(clean, axis=(1, 2))
  final = jnp.where(empty[:, None, None], i_fg, clean)
  p = h * w
  fgm = final.reshape(b, p)
  bgm = valid.reshape(b, p) & ~fgm
  fg_c, n_f = masks_lib._masked_mean(x, fgm)
  bg_c, n_b = masks_lib._masked_mean(x, bgm)
  return dict(category=c_fg, dataset=d_fg, consistent=final, fg_c=fg_c, n_f=n_f, bg_c=bg_c,
              n_b=n_b)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _chunk_prob(keys, final, valid, fg_c, bg_c, *, temperature):
  soft = masks_lib.soft_foreground(keys, fg_c, bg_c, valid, temperature=temperature)
  return decided_probability(final, soft)


def run_masks_streamed(stage: Stage, feat_stage: Stage, ids: Sequence[str], *, cfg, seed: int,
                       temperature: float, progress=True, mesh=None,
                       local_range: tuple[int, int] | None = None) -> dict:
  """`run_masks` streamed over chunks of `cfg.chunk_images` images from the features cache.

  Same results as the in-memory `multilevel_foreground` for the same seed (the per-image
  PRNG keys, the padded patch grid, the dataset sample and the k-means inputs are rebuilt
  exactly), with memory bounded by one chunk of Keys plus the fit samples, not by the
  dataset size:

  1. metadata: grid sizes (-> the global padded grid) and CLS tokens of every image (small);
     CLS groups (`category_groups`) as in memory.
  2. pass 1 per chunk: image-level fg (kept bit-packed, p/8 bytes per image); the dataset
     sample = the `dataset_fit_patches` valid patches with the largest priorities of the
     in-memory draw `uniform(k_s, (N*P,))` (drawn per chunk with `sharding.uniform_slice`),
     in `top_k` order; the category sample likewise (`category_fit_patches`). When the
     sample would hold every patch, the level is fitted on all patches in flat order,
     which is the in-memory computation.
  3. fits: dataset `kmeans` on its sample (then `dataset_refine_iters` exact streamed Lloyd
     passes over all patches, default 0 as in memory); category `grouped_kmeans` on its
     sample, then -- when the sample is not everything -- `category_refine_iters` exact
     streamed grouped Lloyd passes (`sharding.streamed_grouped_lloyd`, psum over the mesh).
  4. pass 2: assignments and per-cluster foreground counts (integers, summed over hosts)
     -> foreground tables (`masks._decide`, the in-memory rule).
  5. pass 3: consistency, cleanup, fallback, soft probability per chunk; saved per image.
     An image without any fg (or bg) patch needs the dataset mean of fg (bg) Keys: it is
     finished after the pass, when that mean is known.

  Multi-host: `ids` are the whole (global) list; this host processes `local_range`
  (start, end) of it (default all) and writes its own images; the samples, the Lloyd sums,
  the counts and the means are combined across hosts.

  Returns:
    dict of the fitted quantities (dataset_centroids, category_centroids, groups, ...).
  """
  from lightcluster_jax.blocks import sharding
  n_total = len(ids)
  start, end = (0, n_total) if local_range is None else local_range
  local_ids = list(ids[start:end])
  chunk = max(1, int(cfg.chunk_images))
  if mesh is not None and sharding.mesh_size(mesh) > 1:
    chunk = _round_up(chunk, sharding.mesh_size(mesh))
  key = jax.random.PRNGKey(seed)
  k_img, k_grp, k_cat, k_dat = jax.random.split(key, 4)

  # 1. Metadata.
  meta = [_load_fields(feat_stage, i, ("grid_hw", "orig_hw", "cls")) for i in
          _bar(local_ids, total=len(local_ids), desc="masks: index", enabled=progress)]
  grids = np.array([[int(v) for v in m["grid_hw"]] for m in meta], np.int64).reshape(-1, 2)
  hm, wm = (int(v) for v in sharding.host_max(grids.max(axis=0) if len(grids) else
                                             np.zeros(2, np.int64)))
  p = hm * wm
  d = int(sharding.host_max(np.asarray(meta[0]["cls"].shape[-1] if meta else 0, np.int64)))
  cls_all = _gather_rows(np.stack([m["cls"] for m in meta]).astype(np.float32)
                         if meta else np.zeros((0, d), np.float32), start, n_total)
  g = min(int(cfg.num_categories), n_total)
  groups = np.asarray(masks_lib.category_groups(
      jnp.asarray(cls_all), g, key=k_grp, image_mask=jnp.ones((n_total,), bool)))
  del cls_all
  n_flat = n_total * p

  def chunk_groups(g0, n):  # [chunk] group id per image of the chunk (padding -> 0)
    return np.pad(groups[g0:g0 + n], (0, chunk - n)).astype(np.int32)

  def chunks():
    """(global start, ids, keys [C, p, D], valid [C, hm, wm], attn [C, p]) of this host."""
    for s in range(0, len(local_ids), chunk):
      cids = local_ids[s:s + chunk]
      keys = np.zeros((chunk, hm, wm, d), np.float32)
      attn = np.zeros((chunk, hm, wm), np.float32)
      valid = np.zeros((chunk, hm, wm), bool)
      for b, i in enumerate(cids):
        f = _load_fields(feat_stage, i, ("keys", "cls_attn", "grid_hw"))
        h, w = (int(v) for v in f["grid_hw"])
        keys[b, :h, :w] = f["keys"].reshape(h, w, d)
        attn[b, :h, :w] = f["cls_attn"].reshape(h, w)
        valid[b, :h, :w] = True
      yield start + s, cids, keys.reshape(chunk, p, d), valid, attn.reshape(chunk, p)

  # 2. Pass 1: image level + fit samples.
  dat_fit = cfg.dataset_fit_patches
  dat_sampled = dat_fit is not None and dat_fit < n_flat
  cat_fit = cfg.category_fit_patches
  cat_sampled = cat_fit is not None and cat_fit < n_flat
  if dat_sampled:
    k_s, k_dat = jax.random.split(k_dat)
    dat_top = _TopK(int(dat_fit), d)
  if cat_sampled:
    k_cs = jax.random.fold_in(k_cat, 1)
    cat_top = _TopK(int(cat_fit), d, with_groups=True)
  all_x = [] if not (dat_sampled and cat_sampled) else None
  image_fg = {}
  image_fn = _image_level_fn(int(cfg.k_image), int(cfg.n_init), 100)
  if mesh is not None and sharding.mesh_size(mesh) > 1:
    image_fn = sharding.data_parallel(image_fn, mesh, batch_argnums=(0, 1, 2, 3))
  bar = _bar(None, total=len(local_ids), desc="masks: image level", enabled=progress)
  for g0, cids, keys, valid, attn in chunks():
    n = len(cids)
    gidx = np.arange(g0, g0 + chunk)
    fg = np.asarray(image_fn(keys, valid, attn, gidx.astype(np.int32), k_img))
    for b, i in enumerate(cids):
      image_fg[i] = np.packbits(fg[b].reshape(-1))
    vflat = valid[:n].reshape(-1)
    flat_idx = g0 * p + np.arange(n * p, dtype=np.int64)
    x = np.asarray(_normalize(keys))[:n].reshape(n * p, d)
    if dat_sampled:
      prio = np.where(vflat, sharding.uniform_slice(k_s, g0 * p, n * p), -1.0)
      dat_top.add(prio, flat_idx, x)
    if cat_sampled:
      prio = np.where(vflat, sharding.uniform_slice(k_cs, g0 * p, n * p), -1.0)
      cat_top.add(prio, flat_idx, x, np.repeat(groups[g0:g0 + n], p))
    if all_x is not None:
      all_x.append(x)
    bar.update(n)
  bar.close()
  if all_x is not None:
    all_x = _gather_rows(np.concatenate(all_x) if all_x else np.zeros((0, d), np.float32),
                         start * p, n_flat)
    all_valid = np.zeros((n_total, hm, wm), bool)
    for gi, gr in enumerate(_gather_rows(grids, start, n_total)):
      all_valid[gi, :gr[0], :gr[1]] = True
    all_valid = all_valid.reshape(-1)

  # 3. Fits.
  def flat_chunks(with_groups):
    def gen():
      for g0, cids, keys, valid, _ in chunks():
        n = len(cids)
        x = np.asarray(_normalize(keys)).reshape(chunk * p, d)
        m = valid.reshape(-1)
        if with_groups:
          yield x, np.repeat(chunk_groups(g0, n), p), m
        else:
          yield x, m
    return gen

  if dat_sampled:
    sx, sm, _ = dat_top.merged()
    fit = kmeans_lib.kmeans(jnp.asarray(sx), cfg.k_dataset, key=k_dat, mask=jnp.asarray(sm),
                            n_init=cfg.n_init, max_iter=100)
  else:
    fit = kmeans_lib.kmeans(jnp.asarray(all_x), cfg.k_dataset, key=k_dat,
                            mask=jnp.asarray(all_valid), n_init=cfg.n_init, max_iter=100)
  dat_centroids = np.asarray(fit.centroids)
  if cfg.dataset_refine_iters > 0:
    dat_centroids, _ = sharding.streamed_lloyd(flat_chunks(False), dat_centroids,
                                               max_iter=cfg.dataset_refine_iters, mesh=mesh)
  if cat_sampled:
    sx, sm, sg = cat_top.merged()
    cat = kmeans_lib.grouped_kmeans(jnp.asarray(sx), jnp.asarray(sg), g, cfg.k_category,
                                    key=k_cat, mask=jnp.asarray(sm), n_init=cfg.n_init,
                                    max_iter=100)
    cat_centroids = np.asarray(cat.centroids)
    if cfg.category_refine_iters > 0:
      cat_centroids, _ = sharding.streamed_grouped_lloyd(
          flat_chunks(True), cat_centroids, max_iter=cfg.category_refine_iters, mesh=mesh)
  else:
    gid_all = np.repeat(groups, p)
    cat = kmeans_lib.grouped_kmeans(jnp.asarray(all_x), jnp.asarray(gid_all), g,
                                    cfg.k_category, key=k_cat, mask=jnp.asarray(all_valid),
                                    n_init=cfg.n_init, max_iter=100)
    cat_centroids = np.asarray(cat.centroids)
  del all_x

  def assignments(x, valid, g0, n):
    m = valid.reshape(-1)
    da, _ = kmeans_lib.assign(jnp.asarray(x), jnp.asarray(dat_centroids), mask=jnp.asarray(m))
    ca = _group_assign(jnp.asarray(x), jnp.asarray(np.repeat(chunk_groups(g0, n), p)),
                       jnp.asarray(cat_centroids))
    ca = jnp.where(jnp.asarray(m), ca, -1)
    return np.asarray(da).reshape(chunk, hm, wm), np.asarray(ca).reshape(chunk, hm, wm)

  def unpacked(cids):
    fg = np.zeros((chunk, hm, wm), bool)
    for b, i in enumerate(cids):
      fg[b] = np.unpackbits(image_fg[i], count=p).astype(bool).reshape(hm, wm)
    return fg

  # 4. Pass 2: foreground counts of every cluster.
  kd, kc = cfg.k_dataset, cfg.k_category
  cnt = dict(d_all=np.zeros(kd, np.int64), d_in=np.zeros(kd, np.int64),
             c_all=np.zeros(g * kc, np.int64), c_in=np.zeros(g * kc, np.int64))
  for g0, cids, keys, valid, _ in chunks():
    n = len(cids)
    x = np.asarray(_normalize(keys)).reshape(chunk * p, d)
    da, ca = assignments(x, valid, g0, n)
    ifg = unpacked(cids)
    gid = np.broadcast_to(chunk_groups(g0, n)[:, None, None], da.shape)
    ok = valid & (da >= 0)
    cnt["d_all"] += np.bincount(da[ok], minlength=kd)
    cnt["d_in"] += np.bincount(da[ok & ifg], minlength=kd)
    ok = valid & (ca >= 0)
    comb = gid * kc + ca
    cnt["c_all"] += np.bincount(comb[ok], minlength=g * kc)
    cnt["c_in"] += np.bincount(comb[ok & ifg], minlength=g * kc)
  cnt = sharding.host_sum(cnt)

  def table(inside, counts, shape):
    c32 = jnp.asarray(counts, jnp.float32)
    share = jnp.where(c32 > 0, jnp.asarray(inside, jnp.float32) / jnp.maximum(c32, 1.0), 0.0)
    return masks_lib._decide(share.reshape(shape), c32.reshape(shape), 0.5, 0.25)

  dat_table = table(cnt["d_in"], cnt["d_all"], (1, kd))[0]
  cat_table = table(cnt["c_in"], cnt["c_all"], (g, kc))

  # 5. Pass 3: consistency, probability, save.
  sums = dict(f=np.zeros(d), nf=np.zeros(()), b=np.zeros(d), nb=np.zeros(()))
  deferred = {}
  bar = _bar(None, total=len(local_ids), desc="masks: consistency", enabled=progress)
  for g0, cids, keys, valid, _ in chunks():
    n = len(cids)
    x = np.asarray(_normalize(keys))
    da, ca = assignments(x.reshape(chunk * p, d), valid, g0, n)
    grp = chunk_groups(g0, n)
    ifg = unpacked(cids)
    out = _chunk_consistent(
        jnp.asarray(x), jnp.asarray(valid), jnp.asarray(ifg), jnp.asarray(da),
        jnp.asarray(ca), jnp.asarray(grp), dat_table, cat_table, g=g, rule=cfg.rule,
        dilate=cfg.dilate, min_region_patches=cfg.min_region_patches, connectivity=4,
        min_image_share=0.2)
    out = jax.device_get(out)
    prob = np.asarray(_chunk_prob(keys, out["consistent"], valid, out["fg_c"], out["bg_c"],
                                  temperature=temperature))
    for b, i in enumerate(cids):
      sums["f"] += out["fg_c"][b].astype(np.float64) * out["n_f"][b]
      sums["nf"] += out["n_f"][b]
      sums["b"] += out["bg_c"][b].astype(np.float64) * out["n_b"][b]
      sums["nb"] += out["n_b"][b]
      h, w = grids[g0 - start + b]
      arrays = {"image": ifg[b, :h, :w], "category": out["category"][b, :h, :w],
                "dataset": out["dataset"][b, :h, :w],
                "consistent": out["consistent"][b, :h, :w], "prob": prob[b, :h, :w],
                "group": groups[g0 + b], "orig_hw": meta[g0 - start + b]["orig_hw"]}
      if out["n_f"][b] > 0 and out["n_b"][b] > 0:
        stage.save(i, arrays)
      else:   # needs the dataset mean of fg / bg Keys, known after the pass
        deferred[i] = (arrays, out["fg_c"][b], out["n_f"][b], out["bg_c"][b], out["n_b"][b])
    bar.update(n)
  bar.close()
  sums = sharding.host_sum(sums)
  all_f = (sums["f"] / max(sums["nf"], 1.0)).astype(np.float32)
  all_b = (sums["b"] / max(sums["nb"], 1.0)).astype(np.float32)
  for i, (arrays, fg_c, n_f, bg_c, n_b) in deferred.items():
    f = _load_fields(feat_stage, i, ("keys",))["keys"]
    h, w = arrays["consistent"].shape
    keys = np.zeros((1, hm, wm, d), np.float32)
    keys[0, :h, :w] = f.reshape(h, w, d)
    valid = np.zeros((1, hm, wm), bool)
    valid[0, :h, :w] = True
    final = np.zeros((1, hm, wm), bool)
    final[0, :h, :w] = arrays["consistent"]
    fg_c = fg_c if n_f > 0 else all_f
    bg_c = bg_c if n_b > 0 else all_b
    prob = np.asarray(_chunk_prob(keys.reshape(1, p, d), final, valid, fg_c[None],
                                  bg_c[None], temperature=temperature))
    stage.save(i, dict(arrays, prob=prob[0, :h, :w]))
  return dict(dataset_centroids=dat_centroids, category_centroids=cat_centroids,
              groups=groups, dataset_table=np.asarray(dat_table),
              category_table=np.asarray(cat_table), grid=(hm, wm))


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
  """`refine_batch_fn` jitted with `crf.XLA_OPTIONS` (the refine stage on one device)."""
  return jax.jit(refine_batch_fn(crf_params, backend, enabled),
                 compiler_options=crf_lib.XLA_OPTIONS)


@functools.lru_cache(maxsize=16)
def refine_batch_fn(crf_params, backend, enabled: bool):
  """`(prob [B,h,w], grid_hw [B,2], image [B,H,W,3] uint8, orig_hw [B,2]) -> fg prob [B,H,W]`.

  Upsamples each image's patch probability bilinearly (PyTorch align_corners=False) onto its
  own valid pixel area of the padded batch, then runs the dense CRF there. The images run one
  after another (`lax.map`, as `crf.dense_crf_batch`). Not jitted: jit it at the top level
  with `compiler_options=crf.XLA_OPTIONS` (`make_refine_fn`, or `sharding.data_parallel`).
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
  return lambda *args: jax.lax.map(lambda a: one(*a), args)


def run_refine(stage: Stage, mask_stage: Stage, items: Sequence[Item], *, cfg, progress=True,
               mesh=None):
  """Upsampling + CRF of every image's soft mask; stores the refined boolean mask."""
  todo = [it for it in items if not stage.has(it.id)]
  if not todo:
    return
  params = crf_lib.get_params(cfg.preset)
  backend = None if cfg.backend == "default" else cfg.backend
  from lightcluster_jax.blocks import sharding
  if sharding.mesh_size(mesh) <= 1:
    fn = make_refine_fn(params, backend, cfg.enabled)
  else:
    fn = sharding.data_parallel(refine_batch_fn(params, backend, cfg.enabled), mesh,
                                compiler_options=crf_lib.XLA_OPTIONS)
  bar = _bar(None, total=len(todo), desc="refine (CRF)" if cfg.enabled else "upsample",
             enabled=progress)
  batch = _mesh_batch(2, mesh)

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
    cls = kmeans_lib.l2_normalize(cls)
    return regions.labels, cls, regions.valid
  return fn


def run_regions(stage: Stage, refine_stage: Stage, items: Sequence[Item], *, params, arch,
                cfg, bucket_pixels: int, dtype="float32", progress=True, mesh=None) -> None:
  """Object regions and crop CLS descriptors of every image not yet in `stage`."""
  todo = [it for it in items if not stage.has(it.id)]
  if not todo:
    return
  fn = make_regions_fn(arch, max_regions=cfg.max_regions,
                       min_region_pixels=cfg.min_region_pixels,
                       whole_foreground=cfg.whole_foreground, box_margin=cfg.box_margin,
                       crop_size=cfg.crop_size, dtype=_dtype(dtype))
  fn = _parallel(fn, mesh, (1, 2, 3))
  bar = _bar(None, total=len(todo), desc="regions", enabled=progress)
  batch = _mesh_batch(2, mesh)

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


def assign_classes(region_stage: Stage, ids: Sequence[str], *, cfg, seed: int,
                   local_range: tuple[int, int] | None = None):
  """k-means of all region descriptors of the set; returns {id: class id per region slot}.

  Multi-host: this host holds the regions of `ids[start:end]` (`local_range`); the
  descriptors (small: max_regions x D per image) are all-gathered, every host runs the same
  k-means and keeps the classes of its own images.
  """
  start, end = (0, len(ids)) if local_range is None else local_range
  loaded = [region_stage.load(i) for i in ids[start:end]]
  if jax.process_count() > 1:
    from lightcluster_jax.blocks import sharding
    r = int(sharding.host_max(np.asarray(len(loaded[0]["valid"]) if loaded else 0)))
    dd = int(sharding.host_max(np.asarray(loaded[0]["descriptors"].shape[-1] if loaded else 0)))
    desc = _gather_rows(np.stack([x["descriptors"] for x in loaded]).astype(np.float32)
                        if loaded else np.zeros((0, r, dd), np.float32), start, len(ids))
    valid = _gather_rows(np.stack([x["valid"] for x in loaded]) if loaded else
                         np.zeros((0, r), bool), start, len(ids))
    loaded = [dict(descriptors=a, valid=b) for a, b in zip(desc, valid)]
    ids = list(ids)
  else:
    ids = list(ids[start:end])
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
            progress: bool = True, mesh=None) -> dict:
  """Runs every stage over `items`; writes outputs under `out_dir` (None: in memory).

  Scale-out: the per-image stages run data-parallel over `mesh` (default: all local devices
  when there are several; `sharding.local_mesh()`), the masks stage is streamed
  (`config.clustering.chunk_images`). In a multi-host run (`sharding.initialize` called
  first) every process passes the *same* full `items` list; each processes and writes its
  own `sharding.host_shard(items)` (give each host its own `out_dir`, or a shared one), and
  the dataset-level statistics are combined across hosts. The returned labels are this
  host's images.

  Returns:
    dict with "labels" {id: [H, W] uint8 label map (0 = background, class + 1)}, "masks"
    {id: per-stage patch masks}, "skipped" {id: reason}, "timings" {stage: seconds},
    "stage_keys", "num_regions".
  """
  from lightcluster_jax.blocks import sharding
  arch = arch or config.arch
  if mesh is None and jax.local_device_count() > 1:
    mesh = sharding.local_mesh()
  root = None if out_dir is None else pathlib.Path(out_dir) / "cache"
  timings, skipped = {}, {}
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    raise ValueError("image ids must be unique")
  fp = {it.id: it.fingerprint for it in items}
  keys = stage_keys(config, weights_id, ids, [fp[i] for i in sorted(ids)])
  meta = {"config": config.to_dict(), "weights": weights_id}
  multi = jax.process_count() > 1
  my_items = sharding.host_shard(items) if multi else list(items)

  t = time.perf_counter()
  feat_stage = Stage(root, "features", keys["features"], meta)
  my_ok = run_features(feat_stage, my_items, params=params, arch=arch, cfg=config.features,
                       progress=progress, skipped=skipped, mesh=mesh)
  if multi:   # every host learns which images the others could read
    flags = np.isin(np.asarray(ids), np.asarray(my_ok, dtype=object)).astype(np.int64)
    ok_ids = [i for i, f in zip(ids, sharding.host_sum(flags)) if f > 0]
  else:
    ok_ids = my_ok
  timings["features"] = time.perf_counter() - t
  if not ok_ids:
    raise ValueError("no readable images to segment" +
                     (f" (skipped: {', '.join(skipped)})" if skipped else ""))
  if set(ok_ids) != set(ids):  # the set changed: dataset-level stages are keyed by it
    keys = stage_keys(config, weights_id, ok_ids, [fp[i] for i in sorted(ok_ids)])
  mine = set(my_ok)
  positions = [n for n, i in enumerate(ok_ids) if i in mine]
  local_range = (positions[0], positions[-1] + 1) if positions else (0, 0)
  if multi:
    # host_shard of the items is contiguous, so is its part of ok_ids; an empty host's
    # range is placed after the others' so the collectives see consistent ranges.
    if not positions:
      first = sharding.host_shard_bounds(len(items))[0]
      n_before = sum(1 for it in items[:first] if it.id in set(ok_ids))
      local_range = (n_before, n_before)
  ok_items = [it for it in my_items if it.id in mine]
  my_ids = list(ok_ids[local_range[0]:local_range[1]])

  t = time.perf_counter()
  mask_stage = Stage(root, "masks", keys["masks"], meta)
  run_masks(mask_stage, feat_stage, ok_ids, cfg=config.clustering, seed=config.seed,
            temperature=config.upsample.temperature, progress=progress, mesh=mesh,
            local_range=local_range)
  timings["masks"] = time.perf_counter() - t

  t = time.perf_counter()
  refine_stage = Stage(root, "refine", keys["refine"], meta)
  run_refine(refine_stage, mask_stage, ok_items, cfg=config.crf, progress=progress, mesh=mesh)
  timings["refine"] = time.perf_counter() - t

  t = time.perf_counter()
  region_stage = Stage(root, "regions", keys["regions"], meta)
  run_regions(region_stage, refine_stage, ok_items, params=params, arch=arch,
              cfg=config.assign, bucket_pixels=config.crf.bucket_pixels,
              dtype=config.features.dtype, progress=progress, mesh=mesh)
  timings["regions"] = time.perf_counter() - t

  t = time.perf_counter()
  classes = assign_classes(region_stage, ok_ids, cfg=config.assign, seed=config.seed,
                           local_range=local_range)
  labels = {}
  for item_id in my_ids:
    r = region_stage.load(item_id)
    labels[item_id] = np.asarray(assign_lib.paint_labels(
        jnp.asarray(r["regions"].astype(np.int32)), jnp.asarray(classes[item_id]))).astype(np.uint8)
  timings["labels"] = time.perf_counter() - t
  return {"labels": labels, "skipped": skipped, "timings": timings, "stage_keys": keys,
          "ids": my_ids, "stages": {"features": feat_stage, "masks": mask_stage,
                                    "refine": refine_stage, "regions": region_stage},
          "num_regions": int(sum(int(region_stage.load(i)["valid"].sum()) for i in my_ids))}


def write_outputs(result: dict, items: Sequence[Item], out_dir: os.PathLike, *,
                  config: ml_collections.ConfigDict, weights_id: str, overlays: bool = True,
                  progress: bool = True) -> dict:
  """Writes OUT/masks/<id>.png (VOC palette), OUT/overlays/<id>.jpg and OUT/summary.json."""
  from lightcluster_jax.apps import viz
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
