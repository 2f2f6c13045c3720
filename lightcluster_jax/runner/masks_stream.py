"""The masks stage over a dataset that does not fit in memory: streamed from the cache.

The algorithm is `stages.masks` (the same public functions); this module only streams it:
chunks of `clustering.chunk_images` images are read from the features cache, the k-means fit
samples and the cluster statistics are accumulated across chunks (and summed across hosts),
and each image's masks are written as soon as they are final. With the same seed the result
equals `masks.multilevel_foreground` on the whole set in memory (tested), with memory bounded
by one chunk plus the fit samples.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lightcluster_jax.blocks import kmeans as kmeans_lib
from lightcluster_jax.blocks import sharding
from lightcluster_jax.data import batching
from lightcluster_jax.runner import cache, plan
from lightcluster_jax.runner.progress import progress_bar
from lightcluster_jax.stages import masks as masks_lib
from lightcluster_jax.stages import refine as refine_lib

__all__ = ["TopK", "run_masks_streamed"]


class TopK:
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
  """Image-level fg of a chunk, with the per-image PRNG keys of `multilevel_foreground`."""
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


_normalize = jax.jit(lambda keys: kmeans_lib.l2_normalize(keys.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("rule", "dilate", "min_region_patches",
                                             "connectivity", "min_image_share",
                                             "flip_image_level", "flip_share", "arbitrate",
                                             "arbitrate_margin", "arbitrate_min_contrast"))
def _chunk_consistent(x, valid, i_fg, dat_assign, cat_assign, groups, dat_table, cat_table,
                      attn, **kw):
  """Steps 4-5 of `masks.multilevel_foreground` for a chunk (the same public functions)."""
  d_fg, c_fg = masks_lib.level_masks(valid, dat_assign, cat_assign, groups, dat_table,
                                     cat_table)
  comb = masks_lib.combine_levels(i_fg, d_fg, c_fg, valid, attn, **kw)
  fg_c, n_f, bg_c, n_b = masks_lib.centroid_sums(x, comb["consistent"], valid)
  return dict(comb, category=c_fg, dataset=d_fg, fg_c=fg_c, n_f=n_f, bg_c=bg_c, n_b=n_b)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _chunk_prob(keys, final, valid, fg_c, bg_c, *, temperature):
  soft = masks_lib.soft_foreground(keys, fg_c, bg_c, valid, temperature=temperature)
  return refine_lib.decided_probability(final, soft)


def run_masks_streamed(stage: cache.Stage, feat_stage: cache.Stage, ids: Sequence[str], *, cfg,
                       seed: int,
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
  n_total = len(ids)
  start, end = (0, n_total) if local_range is None else local_range
  local_ids = list(ids[start:end])
  chunk = max(1, int(cfg.chunk_images))
  if mesh is not None and sharding.mesh_size(mesh) > 1:
    chunk = batching.round_up(chunk, sharding.mesh_size(mesh))
  key = jax.random.PRNGKey(seed)
  k_img, k_grp, k_cat, k_dat = jax.random.split(key, 4)

  # 1. Metadata.
  meta = [feat_stage.load_fields(i, ("grid_hw", "orig_hw", "cls")) for i in
          progress_bar(local_ids, total=len(local_ids), desc="masks: index", enabled=progress)]
  grids = np.array([[int(v) for v in m["grid_hw"]] for m in meta], np.int64).reshape(-1, 2)
  hm, wm = (int(v) for v in sharding.host_max(grids.max(axis=0) if len(grids) else
                                             np.zeros(2, np.int64)))
  p = hm * wm
  d = int(sharding.host_max(np.asarray(meta[0]["cls"].shape[-1] if meta else 0, np.int64)))
  cls_all = plan.gather_rows(np.stack([m["cls"] for m in meta]).astype(np.float32)
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
        f = feat_stage.load_fields(i, ("keys", "cls_attn", "grid_hw"))
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
    dat_top = TopK(int(dat_fit), d)
  if cat_sampled:
    k_cs = jax.random.fold_in(k_cat, 1)
    cat_top = TopK(int(cat_fit), d, with_groups=True)
  all_x = [] if not (dat_sampled and cat_sampled) else None
  image_fg = {}
  image_fn = _image_level_fn(int(cfg.k_image), int(cfg.n_init), int(cfg.max_iter))
  if mesh is not None and sharding.mesh_size(mesh) > 1:
    image_fn = sharding.data_parallel(image_fn, mesh, batch_argnums=(0, 1, 2, 3))
  bar = progress_bar(None, total=len(local_ids), desc="masks: image level", enabled=progress)
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
    all_x = plan.gather_rows(np.concatenate(all_x) if all_x else np.zeros((0, d), np.float32),
                         start * p, n_flat)
    all_valid = np.zeros((n_total, hm, wm), bool)
    for gi, gr in enumerate(plan.gather_rows(grids, start, n_total)):
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
                            n_init=cfg.n_init, max_iter=cfg.max_iter)
  else:
    fit = kmeans_lib.kmeans(jnp.asarray(all_x), cfg.k_dataset, key=k_dat,
                            mask=jnp.asarray(all_valid), n_init=cfg.n_init, max_iter=cfg.max_iter)
  dat_centroids = np.asarray(fit.centroids)
  if cfg.dataset_refine_iters > 0:
    dat_centroids, _ = sharding.streamed_lloyd(flat_chunks(False), dat_centroids,
                                               max_iter=cfg.dataset_refine_iters, mesh=mesh)
  if cat_sampled:
    sx, sm, sg = cat_top.merged()
    cat = kmeans_lib.grouped_kmeans(jnp.asarray(sx), jnp.asarray(sg), g, cfg.k_category,
                                    key=k_cat, mask=jnp.asarray(sm), n_init=cfg.n_init,
                                    max_iter=cfg.max_iter)
    cat_centroids = np.asarray(cat.centroids)
    if cfg.category_refine_iters > 0:
      cat_centroids, _ = sharding.streamed_grouped_lloyd(
          flat_chunks(True), cat_centroids, max_iter=cfg.category_refine_iters, mesh=mesh)
  else:
    gid_all = np.repeat(groups, p)
    cat = kmeans_lib.grouped_kmeans(jnp.asarray(all_x), jnp.asarray(gid_all), g,
                                    cfg.k_category, key=k_cat, mask=jnp.asarray(all_valid),
                                    n_init=cfg.n_init, max_iter=cfg.max_iter)
    cat_centroids = np.asarray(cat.centroids)
  del all_x

  def assignments(x, valid, g0, n):
    m = valid.reshape(-1)
    da, _ = kmeans_lib.assign(jnp.asarray(x), jnp.asarray(dat_centroids), mask=jnp.asarray(m))
    ca = kmeans_lib.grouped_assign(jnp.asarray(x),
                                   jnp.asarray(np.repeat(chunk_groups(g0, n), p)),
                                   jnp.asarray(cat_centroids), mask=jnp.asarray(m))
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
    share = masks_lib.shares_from_counts(inside, counts).reshape(shape)
    return masks_lib.decide_foreground(share, jnp.asarray(counts, jnp.float32).reshape(shape),
                                       min_share=cfg.fg_min_share,
                                       fallback_share=cfg.fallback_share)

  dat_table = table(cnt["d_in"], cnt["d_all"], (1, kd))[0]
  cat_table = table(cnt["c_in"], cnt["c_all"], (g, kc))

  # 5. Pass 3: consistency, probability, save.
  sums = dict(f=np.zeros(d), nf=np.zeros(()), b=np.zeros(d), nb=np.zeros(()))
  deferred = {}
  bar = progress_bar(None, total=len(local_ids), desc="masks: consistency", enabled=progress)
  for g0, cids, keys, valid, attn in chunks():
    n = len(cids)
    x = np.asarray(_normalize(keys))
    da, ca = assignments(x.reshape(chunk * p, d), valid, g0, n)
    grp = chunk_groups(g0, n)
    ifg = unpacked(cids)
    out = _chunk_consistent(
        jnp.asarray(x), jnp.asarray(valid), jnp.asarray(ifg), jnp.asarray(da),
        jnp.asarray(ca), jnp.asarray(grp), dat_table, cat_table, jnp.asarray(attn),
        rule=cfg.rule, dilate=int(cfg.dilate), min_region_patches=int(cfg.min_region_patches),
        connectivity=int(cfg.connectivity), min_image_share=float(cfg.min_image_share),
        flip_image_level=bool(cfg.flip_image_level), flip_share=float(cfg.flip_share),
        arbitrate=bool(cfg.arbitrate), arbitrate_margin=float(cfg.arbitrate_margin),
        arbitrate_min_contrast=float(cfg.arbitrate_min_contrast))
    out = jax.device_get(out)
    prob = np.asarray(_chunk_prob(keys, out["consistent"], valid, out["fg_c"], out["bg_c"],
                                  temperature=temperature))
    for b, i in enumerate(cids):
      sums["f"] += out["fg_c"][b].astype(np.float64) * out["n_f"][b]
      sums["nf"] += out["n_f"][b]
      sums["b"] += out["bg_c"][b].astype(np.float64) * out["n_b"][b]
      sums["nb"] += out["n_b"][b]
      h, w = grids[g0 - start + b]
      arrays = {"image": out["image"][b, :h, :w], "category": out["category"][b, :h, :w],
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
    f = feat_stage.load_fields(i, ("keys",))["keys"]
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


