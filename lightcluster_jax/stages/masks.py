"""Foreground patch masks: clustering at three levels, made consistent (docs/method.md §2-7).

Grids: a batch of patch grids is padded to a common `[B, h, w]`; `valid [B, h, w]` bool marks
the real patches (for a padded image, its valid top-left rectangle). Features come as
`keys [B, P, D]` with `P = h * w` in row-major order, so `keys.reshape(B, h, w, D)` is the grid.

Pipeline of `multilevel_foreground` (each step is also a public function):

1. Image level (`image_level_foreground`): k-means (k=2) of each image's L2-normalised Keys;
   the foreground cluster is the one with the lower *border fraction* (share of its patches
   on the border of the valid region); ties -> higher mean CLS attention.
2. Category level: `category_groups` clusters the CLS tokens into `num_categories` groups;
   `grouped_kmeans` clusters all Keys of each group.
3. Dataset level: k-means of all Keys (optionally fitted on a random subset of patches).
4. `foreground_clusters`: a category/dataset cluster is foreground if most of its patches lie
   inside the image-level foreground (with a documented fallback), then per image a level
   whose mask barely overlaps the image-level mask is replaced by it (docs/method.md "Failure
   modes", 3: a "foreground" cluster with 0.001 of its patches in the image-level foreground).
5. `combine_levels`: where Dataset and Category agree on an object that the image-level mask
   leaves out, CLS attention decides which side is the object (`attention_contrast`); then
   `consistency`: `dc_and_i` (default) = Dataset and Category and dilate(Image, 1 patch);
   `d_and_i`, `all`, `majority`, `image_only`. Then `remove_small_components`, and an image left
   empty falls back to its image-level mask.
6. `soft_foreground`: softmax of negative squared distances to fg / bg centroids
   (docs/method.md §7).

`multilevel_foreground(keys [B, P, D], valid [B, h, w], cls [B, D], key=...)` runs steps 1-5
in one compiled call and returns the final `[B, h, w]` mask as `out["consistent"]` (see
tests/test_masks.py; its compilation takes too long for an example here).

Example (step 5 on hand-made level masks of one 4 x 6 patch grid):
  >>> valid = jnp.ones((1, 4, 6), bool)
  >>> image_fg = jnp.zeros((1, 4, 6), bool).at[0, 1:3, 1:3].set(True)     # I: 2 x 2 patches
  >>> dataset_fg = jnp.zeros((1, 4, 6), bool).at[0, 1:3, 1:5].set(True)   # D: 2 x 4
  >>> category_fg = jnp.zeros((1, 4, 6), bool).at[0, :, 1:5].set(True)    # C: 4 x 4
  >>> np.asarray(consistency(dataset_fg, category_fg, image_fg, valid)[0], int)  # D & C & dil(I)
  array([[0, 0, 0, 0, 0, 0],
         [0, 1, 1, 1, 0, 0],
         [0, 1, 1, 1, 0, 0],
         [0, 0, 0, 0, 0, 0]])
  >>> np.asarray(consistency(dataset_fg, category_fg, image_fg, valid, rule="all")[0], int)
  array([[0, 0, 0, 0, 0, 0],
         [0, 1, 1, 0, 0, 0],
         [0, 1, 1, 0, 0, 0],
         [0, 0, 0, 0, 0, 0]])
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from lightcluster_jax.blocks import components
from lightcluster_jax.blocks import kmeans as _km

__all__ = [
    "border_fraction", "image_level_foreground",
    "cluster_foreground_share", "foreground_clusters", "trusted_level", "category_groups",
    "consistency", "decide_foreground", "shares_from_counts", "level_masks", "combine_levels",
    "attention_contrast",
    "masked_mean", "centroid_sums", "fill_empty_centroids",
    "soft_foreground", "multilevel_foreground", "RULES",
]

RULES = ("dc_and_i", "d_and_i", "all", "majority", "image_only")


def border_fraction(assignment: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """Share of each cluster's patches that lie on the border of the valid region.

  .. math:: b_c = |\\{p \\in \\text{border}: a_p = c\\}| \\,/\\, |\\{p \\text{ valid}: a_p = c\\}|

  Args:
    assignment: [h, w] int cluster ids (values outside [0, k) are ignored).
    valid: [h, w] bool.
    k: number of clusters (static).

  Returns:
    [k] float32; an empty cluster gets 1.0 (never preferred as foreground).
  """
  valid = jnp.asarray(valid, bool)
  onehot = (assignment[..., None] == jnp.arange(k)) & valid[..., None]
  border = components.valid_border(valid)
  n = jnp.sum(onehot, axis=(-3, -2)).astype(jnp.float32)
  nb = jnp.sum(onehot & border[..., None], axis=(-3, -2)).astype(jnp.float32)
  return jnp.where(n > 0, nb / jnp.maximum(n, 1.0), 1.0)


def _pick_image_fg(bf, counts, attn, b0, tie_tol: float):
  """Foreground clusters [k] bool of one image from border fractions (see image_level_...)."""
  nonempty = counts > 0
  bf_e = jnp.where(nonempty, bf, jnp.inf)
  cand = nonempty & (bf_e <= jnp.min(bf_e) + tie_tol)
  if attn is None:
    best = jnp.argmin(jnp.where(cand, counts, jnp.inf))   # ties: the smaller cluster
  else:
    best = jnp.argmax(jnp.where(cand, attn, -jnp.inf))    # ties: higher CLS attention
  below = nonempty & (bf_e < b0 - tie_tol)
  return below | (jnp.arange(bf.shape[0]) == best)


def image_level_foreground(keys, valid, cls_attn=None, *, keys_prng, k: int = 2,
                           n_init: int = 1, max_iter: int = 100, tol: float = 1e-4,
                           tie_tol: float = 1e-6, cosine: bool = True,
                           batch_size="auto") -> dict:
  """Image-level foreground: per-image k-means of Keys and the border-fraction rule.

  With border fractions b_c (`border_fraction`) and b0 = (border patches) / (valid patches),
  the share a cluster would have if it were spread uniformly, cluster c is foreground if

    * it has the lowest b_c (ties within `tie_tol`: the higher mean CLS attention, or without
      attention the smaller cluster), or
    * b_c < b0, i.e. it touches the border less than a uniformly spread cluster would.

  For k=2 exactly one cluster is foreground (b0 is the size-weighted mean of b_0 and b_1, so
  only the lower one is below it): this is docs/method.md §2. For k>2 every cluster that
  avoids the border is foreground and the cluster with the highest b_c is always background.

  Args:
    keys: [B, P, D] Keys (raw or normalised; `cosine` normalises them).
    valid: [B, h, w] bool with h * w = P.
    cls_attn: optional [B, P] last-layer CLS attention to the patches (tie-break).
    keys_prng: [B] typed or [B, 2] raw PRNG keys, one per image (fold_in(key, image_index)).
    k: clusters per image (static).
    n_init, max_iter, tol: k-means settings (see `kmeans`).
    tie_tol: border fractions closer than this count as tied.
    cosine: L2-normalise the Keys before k-means.
    batch_size: forwarded to `batched_kmeans`.

  Returns:
    dict(fg [B, h, w] bool, assignment [B, h, w] int32 (-1 invalid), centroids [B, k, D],
    fg_clusters [B, k] bool, border_fraction [B, k] float32).
  """
  b, p, d = _check_keys(keys, valid, "image_level_foreground")
  h, w = valid.shape[-2:]
  valid = jnp.asarray(valid, bool)
  res = _km.batched_kmeans(keys, k, keys=keys_prng, mask=valid.reshape(b, p), n_init=n_init,
                           max_iter=max_iter, tol=tol, cosine=cosine, batch_size=batch_size)
  assignment = res.assignment.reshape(b, h, w)
  bf = jax.vmap(lambda a, v: border_fraction(a, v, k))(assignment, valid)
  onehot = (assignment[..., None] == jnp.arange(k)) & valid[..., None]
  counts = jnp.sum(onehot, axis=(1, 2)).astype(jnp.float32)
  border = components.valid_border(valid)
  b0 = jnp.sum(border, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)
  if cls_attn is None:
    fg_clusters = jax.vmap(lambda f, c, z: _pick_image_fg(f, c, None, z, tie_tol))(
        bf, counts, b0)
  else:
    if jnp.shape(cls_attn) != (b, p):
      raise ValueError(f"image_level_foreground: `cls_attn` has shape {jnp.shape(cls_attn)}, "
                       f"expected [B, P] = {(b, p)}")
    attn = jnp.einsum("bhwk,bhw->bk", onehot.astype(jnp.float32),
                      jnp.asarray(cls_attn, jnp.float32).reshape(b, h, w))
    attn = attn / jnp.maximum(counts, 1.0)
    fg_clusters = jax.vmap(lambda f, c, a, z: _pick_image_fg(f, c, a, z, tie_tol))(
        bf, counts, attn, b0)
  fg = _lookup(fg_clusters, assignment) & valid
  return dict(fg=fg, assignment=assignment, centroids=res.centroids, fg_clusters=fg_clusters,
              border_fraction=bf)


def _lookup(table: jax.Array, assignment: jax.Array) -> jax.Array:
  """table [B, k] bool, assignment [B, h, w] int (-1 = none) -> [B, h, w] bool."""
  b = table.shape[0]
  flat = assignment.reshape(b, -1)
  got = jnp.take_along_axis(table, jnp.clip(flat, 0, table.shape[1] - 1), axis=1)
  return (got & (flat >= 0)).reshape(assignment.shape)


def _check_keys(keys, valid, where: str):
  ks, vs = jnp.shape(keys), jnp.shape(valid)
  if len(ks) != 3:
    raise ValueError(f"{where}: `keys` must be [B, P, D], got shape {ks}")
  if len(vs) != 3 or vs[0] != ks[0] or vs[1] * vs[2] != ks[1]:
    raise ValueError(f"{where}: `valid` must be [B, h, w] with h * w = P; got valid {vs} for "
                     f"keys {ks}")
  return ks


def cluster_foreground_share(assignment, image_fg, valid, k: int):
  """Per cluster: number of valid patches and the share of them inside the image-level fg.

  Args:
    assignment: int array of cluster ids in [0, k) (any shape; -1 / out of range ignored).
    image_fg: bool array, same shape.
    valid: bool array, same shape.
    k: number of clusters (static).

  Returns:
    (share [k] float32 in [0, 1] (0 for empty clusters), counts [k] float32).
  """
  a = jnp.reshape(assignment, (-1,))
  v = jnp.reshape(jnp.asarray(valid, bool), (-1,)) & (a >= 0) & (a < k)
  f = jnp.reshape(jnp.asarray(image_fg, bool), (-1,)) & v
  ids = jnp.clip(a, 0, k - 1)
  counts = jax.ops.segment_sum(v.astype(jnp.float32), ids, num_segments=k)
  inside = jax.ops.segment_sum(f.astype(jnp.float32), ids, num_segments=k)
  return shares_from_counts(inside, counts), counts


def foreground_clusters(assignment, image_fg, valid, k: int, *, group_ids=None,
                        num_groups: Optional[int] = None, min_share: float = 0.5,
                        fallback_share: float = 0.25) -> jax.Array:
  """Which clusters of a level are foreground, judged by the image-level foreground.

  A cluster is foreground if more than `min_share` of its valid patches lie inside the
  image-level foreground (docs/method.md §5). The scope is whatever is passed: one image,
  a group, or the dataset. Fallback (per scope, i.e. per group when `group_ids` is given):
  if no cluster passes, the cluster with the highest share is foreground *only if* that
  share is at least `fallback_share`; otherwise the scope has no foreground cluster (its
  level mask is empty, and `multilevel_foreground` then uses the image-level mask for those
  images). This guards the failure mode (docs/method.md "Failure modes", 3) where the cluster
  called "foreground" held only 0.001 of image-level foreground.

  Args:
    assignment: int cluster ids in [0, k), any shape (e.g. [B, h, w]); -1 = none.
    image_fg: bool image-level foreground, same shape.
    valid: bool, same shape.
    k: clusters per scope (static).
    group_ids: optional int array, same shape: the group of every patch (category level);
      clusters are then (group, cluster) pairs.
    num_groups: G (static), required with `group_ids`.
    min_share: majority threshold (strictly more than this share).
    fallback_share: minimum share of the fallback cluster.

  Returns:
    [k] bool, or [G, k] bool with `group_ids`.
  """
  a = jnp.asarray(assignment)
  if group_ids is None:
    share, counts = cluster_foreground_share(a, image_fg, valid, k)
    return decide_foreground(share[None], counts[None], min_share=min_share,
                           fallback_share=fallback_share)[0]
  if num_groups is None:
    raise ValueError("foreground_clusters: `num_groups` is required with `group_ids`")
  g = jnp.asarray(group_ids)
  inside = (g >= 0) & (g < num_groups)
  combined = jnp.where((a >= 0) & inside, jnp.clip(g, 0, num_groups - 1) * k + a, -1)
  share, counts = cluster_foreground_share(combined, image_fg, valid, num_groups * k)
  return decide_foreground(share.reshape(num_groups, k), counts.reshape(num_groups, k),
                           min_share=min_share, fallback_share=fallback_share)


def decide_foreground(share, counts, *, min_share: float = 0.5,
                      fallback_share: float = 0.25) -> jax.Array:
  """Foreground table of S scopes x k clusters from their shares (the rule of
  `foreground_clusters`, on statistics that may have been summed over chunks and hosts).

  fg[s, c] = (share[s, c] > min_share and counts[s, c] > 0), and, in a scope where no cluster
  passes, its highest-share non-empty cluster if that share is at least `fallback_share`.

  Args:
    share: [S, k] float share of each cluster's valid patches inside the image-level fg.
    counts: [S, k] number of valid patches of each cluster.
    min_share, fallback_share: see `foreground_clusters`.

  Returns:
    [S, k] bool.

  Example:
    >>> decide_foreground(jnp.array([[0.9, 0.1], [0.3, 0.1], [0.2, 0.1]]),
    ...                   jnp.array([[5., 5.], [5., 5.], [5., 5.]]))
    Array([[ True, False],
           [ True, False],
           [False, False]], dtype=bool)
  """
  fg = (share > min_share) & (counts > 0)
  best = jnp.argmax(jnp.where(counts > 0, share, -1.0), axis=1)
  best_share = jnp.take_along_axis(share, best[:, None], axis=1)[:, 0]
  fallback = (~jnp.any(fg, axis=1)) & (best_share >= fallback_share)
  pick = jax.nn.one_hot(best, share.shape[1], dtype=bool) & fallback[:, None]
  return fg | pick


def shares_from_counts(inside, counts) -> jax.Array:
  """share = inside / counts where counts > 0, else 0 (any shape, integer or float counts)."""
  c = jnp.asarray(counts, jnp.float32)
  return jnp.where(c > 0, jnp.asarray(inside, jnp.float32) / jnp.maximum(c, 1.0), 0.0)


def level_masks(valid, dataset_assignment, category_assignment, groups, dataset_table,
                category_table):
  """Per-patch dataset- and category-level foreground from the cluster tables.

  Args:
    valid: [B, h, w] bool.
    dataset_assignment: [B, h, w] int dataset cluster per patch (-1 = none).
    category_assignment: [B, h, w] int cluster within the image's group (-1 = none).
    groups: [B] int category group of each image.
    dataset_table: [k_dataset] bool foreground clusters.
    category_table: [G, k_category] bool foreground clusters per group.

  Returns:
    (dataset_fg, category_fg), each [B, h, w] bool.
  """
  g = category_table.shape[0]
  gid = jnp.broadcast_to(jnp.clip(groups, 0, g - 1)[:, None, None], valid.shape)
  c_fg = category_table[gid, jnp.clip(category_assignment, 0, None)]
  c_fg = c_fg & (category_assignment >= 0) & valid
  d_fg = dataset_table[jnp.clip(dataset_assignment, 0, None)] & (dataset_assignment >= 0)
  return d_fg & valid, c_fg


def attention_contrast(mask, cls_attn, valid, *, eps: float = 1e-12) -> jax.Array:
  """Per image: how much more CLS attention a mask draws per patch than the rest of the image.

  .. math:: s(M) = \\log(\\bar a_M + \\epsilon) - \\log(\\bar a_{V \\setminus M} + \\epsilon),
            \\quad \\bar a_S = \\tfrac{1}{|S|} \\sum_{p \\in S} a_p

  (V = the valid patches, a_p = CLS->patch attention). s > 0: attention is concentrated on M,
  as it is on objects (DINO's CLS attention highlights them); s(V \\ M) = -s(M). An empty M or
  an M that covers V gets 0 (no evidence either way), as does an image without attention.

  Args:
    mask: [B, h, w] bool.
    cls_attn: [B, h * w] or [B, h, w] float, >= 0.
    valid: [B, h, w] bool.
    eps: keeps the logarithm finite for all-zero attention.

  Returns:
    [B] float32.

  Example:
    >>> m = jnp.zeros((1, 2, 2), bool).at[0, 0, 0].set(True)
    >>> a = jnp.array([[0.4, 0.2, 0.2, 0.2]])
    >>> round(float(attention_contrast(m, a, jnp.ones((1, 2, 2), bool))[0]), 4)   # log 2
    0.6931
  """
  valid = jnp.asarray(valid, bool)
  m = jnp.asarray(mask, bool) & valid
  rest = valid & ~m
  a = jnp.asarray(cls_attn, jnp.float32).reshape(valid.shape)
  a = jnp.where(valid, a, 0.0)
  n_in = jnp.sum(m, axis=(-2, -1)).astype(jnp.float32)
  n_out = jnp.sum(rest, axis=(-2, -1)).astype(jnp.float32)
  mean_in = jnp.sum(jnp.where(m, a, 0.0), axis=(-2, -1)) / jnp.maximum(n_in, 1.0)
  mean_out = jnp.sum(jnp.where(rest, a, 0.0), axis=(-2, -1)) / jnp.maximum(n_out, 1.0)
  s = jnp.log(mean_in + eps) - jnp.log(mean_out + eps)
  return jnp.where((n_in > 0) & (n_out > 0), s, 0.0)


def combine_levels(image_fg, dataset_fg, category_fg, valid, cls_attn=None, *,
                   rule: str = "dc_and_i", dilate: int = 1, min_region_patches: int = 4,
                   connectivity: int = 4, min_image_share: float = 0.2,
                   flip_image_level: bool = False, flip_share: float = 0.8,
                   arbitrate: bool = True, arbitrate_margin: float = 1.0,
                   arbitrate_min_contrast: float = 0.5) -> dict:
  """Per image: side check, trust checks, consistency, cleanup, empty fallback (method §6).

  Every step is per image, so a chunk of images gives the same masks as the whole set.

  1. Which side is the object (docs/method.md §6, "Failure modes", 1). Let A be the agreement
     of the cross-image levels in the image: A = D and C (A = D for rule `d_and_i`). The
     levels *disagree* with the image level when A has at least `min_region_patches`
     patches and at most 1 - `flip_share` of them lie inside I:

       |A and I| <= (1 - flip_share) |A|.

     Then the output would be I (D and C fail the trust check of step 2, or the
     intersection is empty and step 4 falls back to I) or, with I complemented, about A.
     The border rule that chose I cannot settle this, so the CLS attention does
     (`attention_contrast`: s(M) = log(mean attention in M / mean attention in the rest)).
     With `arbitrate` and `cls_attn`, I is replaced by its complement V \\ I (valid, not I) when

       s(A) - s(I) >= arbitrate_margin   and   s(A) >= arbitrate_min_contrast,

     i.e. the levels' object draws clearly more attention than the image level's, and
     clearly more than the rest of the image. Otherwise (weak evidence, attention on I or on
     neither) I is kept: the behaviour without the rule. Two independent cues must agree
     against I, the other levels and the attention, so a wrong D / C (the reason the
     unconditional flip is off) is not followed when the attention sides with I.
     `flip_image_level` flips on disagreement alone, without the attention (opt-in).
  2. A level whose mask is empty in the image, or has less than `min_image_share` of its
     patches inside I, is replaced by I there (`trusted_level`).
  3. `consistency(rule, dilate)`, then components smaller than `min_region_patches` removed.
  4. An image left empty falls back to I.

  Args:
    image_fg, dataset_fg, category_fg, valid: [B, h, w] bool.
    cls_attn: optional [B, h * w] (or [B, h, w]) float CLS->patch attention of the last
      block, averaged over heads; without it step 1 uses no attention (no arbitration).
    rule, dilate: see `consistency`.
    min_region_patches, connectivity: the cleanup (and the least |A| that can disagree).
    min_image_share: see `trusted_level`.
    flip_image_level, flip_share: unconditional flip on disagreement; the disagreement
      threshold.
    arbitrate, arbitrate_margin, arbitrate_min_contrast: the attention rule of step 1
      (contrasts in natural-log units: 1.0 = e times the attention per patch).

  Returns:
    dict of [B, h, w] bool "image" (after step 1), "consistent_raw", "consistent"; [B] bool
    "image_flipped" (I complemented, either way), "arbitrated" (by the attention rule),
    "dataset_trusted", "category_trusted", "fallback"; [B, 2] float32 "attention_contrast"
    (s(I), s(A); zeros without attention).

  Example (the image level took the "sky" I; D and C agree on a column A outside it, which
  draws 3x the attention of the other patches):
    >>> valid = jnp.ones((1, 4, 5), bool)
    >>> obj = jnp.zeros((1, 4, 5), bool).at[0, 1:, 2].set(True)
    >>> sky = jnp.zeros((1, 4, 5), bool).at[0, :3, 1:4].set(True) & ~obj
    >>> attn = jnp.where(obj, 3.0, 1.0).reshape(1, -1)
    >>> out = combine_levels(sky, obj, obj, valid, attn, min_region_patches=2)
    >>> bool(out["arbitrated"][0]), bool(jnp.all(out["consistent"] == obj))
    (True, True)
    >>> old = combine_levels(sky, obj, obj, valid, attn, min_region_patches=2, arbitrate=False)
    >>> bool(jnp.all(old["consistent"] == sky))          # without the check: the sky
    True
  """
  valid = jnp.asarray(valid, bool)
  i_fg = jnp.asarray(image_fg, bool) & valid
  dataset_fg = jnp.asarray(dataset_fg, bool)
  category_fg = jnp.asarray(category_fg, bool)
  b = i_fg.shape[0]
  agree = dataset_fg & valid if rule == "d_and_i" else dataset_fg & category_fg & valid
  n_agree = jnp.sum(agree, axis=(1, 2))
  n_inside = jnp.sum(agree & i_fg, axis=(1, 2))
  disagree = (rule != "image_only") & (n_agree >= min_region_patches) & (
      n_inside <= (1.0 - flip_share) * n_agree)
  contrast = jnp.zeros((b, 2), jnp.float32)
  arbitrated = jnp.zeros((b,), bool)
  if cls_attn is not None:
    s_i = attention_contrast(i_fg, cls_attn, valid)
    s_a = attention_contrast(agree, cls_attn, valid)
    contrast = jnp.stack([s_i, s_a], axis=1)
    if arbitrate:
      arbitrated = disagree & (s_a - s_i >= arbitrate_margin) & (
          s_a >= arbitrate_min_contrast)
  # The unconditional flip keeps its historical test: D and C (whatever the rule).
  dc = dataset_fg & category_fg
  n_dc = jnp.sum(dc, axis=(1, 2))
  forced = (flip_image_level & (n_dc >= min_region_patches)
            & (jnp.sum(dc & i_fg, axis=(1, 2)) <= (1.0 - flip_share) * n_dc))
  flipped = forced | arbitrated
  i_fg = jnp.where(flipped[:, None, None], valid & ~i_fg, i_fg)
  d_ok = trusted_level(dataset_fg, i_fg, min_image_share=min_image_share)
  c_ok = trusted_level(category_fg, i_fg, min_image_share=min_image_share)
  d_used = jnp.where(d_ok[:, None, None], dataset_fg, i_fg)
  c_used = jnp.where(c_ok[:, None, None], category_fg, i_fg)
  raw = consistency(d_used, c_used, i_fg, valid, rule=rule, dilate=dilate)
  clean = components.remove_small_components(raw, min_region_patches,
                                             connectivity=connectivity)
  empty = ~jnp.any(clean, axis=(1, 2))
  final = jnp.where(empty[:, None, None], i_fg, clean)
  return dict(image=i_fg, consistent_raw=raw, consistent=final, image_flipped=flipped,
              arbitrated=arbitrated, attention_contrast=contrast,
              dataset_trusted=d_ok, category_trusted=c_ok, fallback=empty)


def centroid_sums(x, fg, valid):
  """Per image: mean normalised Key inside / outside the final mask, with the counts.

  Args:
    x: [B, P, D] L2-normalised Keys.
    fg: [B, h, w] bool final mask.
    valid: [B, h, w] bool.

  Returns:
    (fg_mean [B, D], n_fg [B], bg_mean [B, D], n_bg [B]); a mean over no patch is 0.
  """
  b = x.shape[0]
  fgm = fg.reshape(b, -1)
  bgm = valid.reshape(b, -1) & ~fgm
  fg_c, n_f = masked_mean(x, fgm)
  bg_c, n_b = masked_mean(x, bgm)
  return fg_c, n_f, bg_c, n_b


def fill_empty_centroids(mean, count, overall):
  """Rows of `mean` [B, D] with `count` [B] == 0 replaced by `overall` [D] (the set's mean)."""
  return jnp.where((count > 0)[:, None], mean, overall)


def trusted_level(level_fg, image_fg, *, min_image_share: float = 0.2) -> jax.Array:
  """Per image: is a level's mask usable, judged by the image-level mask?

  A level (dataset / category) mask is trusted in image b if it is non-empty there and at
  least `min_image_share` of its patches lie inside the image-level foreground. An untrusted
  level is replaced by the image-level mask for that image in `multilevel_foreground`.

  Args:
    level_fg: [B, h, w] bool level mask.
    image_fg: [B, h, w] bool image-level mask.
    min_image_share: threshold in [0, 1].

  Returns:
    [B] bool.
  """
  level_fg = jnp.asarray(level_fg, bool)
  n = jnp.sum(level_fg, axis=(-2, -1))
  inside = jnp.sum(level_fg & jnp.asarray(image_fg, bool), axis=(-2, -1))
  return (n > 0) & (inside >= min_image_share * jnp.maximum(n, 1))


def category_groups(cls, num_categories: int, *, key, image_mask=None, n_init: int = 10,
                    max_iter: int = 100) -> jax.Array:
  """'Superclasses' without labels: k-means of the L2-normalised CLS tokens (docs/method.md §3).

  Args:
    cls: [B, D] CLS tokens.
    num_categories: number of groups (static); clipped to the number of images B.
    key: PRNG key.
    image_mask: optional [B] bool (False = padding image, group -1).
    n_init: k-means restarts (cheap: one point per image).
    max_iter: k-means iterations.

  Returns:
    group_ids [B] int32 in [0, min(num_categories, B)), -1 for masked images.
  """
  if len(jnp.shape(cls)) != 2:
    raise ValueError(f"category_groups: `cls` must be [B, D], got shape {jnp.shape(cls)}")
  g = min(int(num_categories), cls.shape[0])
  if g < 1:
    raise ValueError(f"category_groups: num_categories must be >= 1, got {num_categories}")
  res = _km.kmeans(cls, g, key=key, mask=image_mask, n_init=n_init, max_iter=max_iter,
                   cosine=True)
  return res.assignment


def consistency(dataset_fg, category_fg, image_fg, valid, *, rule: str = "dc_and_i",
                dilate: int = 1) -> jax.Array:
  """Combines the three level masks (docs/method.md §6).

  Rules (D, C, I = dataset, category, image-level masks; dil = 3x3 dilation within `valid`):

    * `dc_and_i` (default): (D and C) and dil^n(I), n = `dilate` (1 patch).
    * `d_and_i`: D and dil^n(I), the category level left out (the best simple baseline of
      docs/method.md "Reference figures").
    * `all`: D and C and I.
    * `majority`: at least 2 of D, C, I.
    * `image_only`: I.

  `dataset_fg` or `category_fg` may be None (that level left out: it does not constrain the
  `and` rules; `majority` needs both).

  Args:
    dataset_fg, category_fg, image_fg: [B, h, w] bool (or any [..., h, w]).
    valid: [..., h, w] bool.
    rule: one of RULES.
    dilate: dilation steps (patches) of I for `dc_and_i` / `d_and_i`.

  Returns:
    [..., h, w] bool, False outside `valid`.
  """
  if rule not in RULES:
    raise ValueError(f"consistency: unknown rule {rule!r}; expected one of {RULES}")
  valid = jnp.asarray(valid, bool)
  i = jnp.asarray(image_fg, bool) & valid
  if rule == "image_only":
    return i
  if rule == "majority":
    if dataset_fg is None or category_fg is None:
      raise ValueError("consistency: rule 'majority' needs dataset_fg and category_fg")
    votes = (jnp.asarray(dataset_fg, bool).astype(jnp.int32)
             + jnp.asarray(category_fg, bool).astype(jnp.int32) + i.astype(jnp.int32))
    return (votes >= 2) & valid
  dc = valid
  if dataset_fg is not None:
    dc = dc & jnp.asarray(dataset_fg, bool)
  if category_fg is not None and rule != "d_and_i":
    dc = dc & jnp.asarray(category_fg, bool)
  if rule == "all":
    return dc & i
  return dc & components.dilate(i, valid, iterations=int(dilate))


# ----------------------------------------------------------------------------------------------
# Soft probability and the whole multilevel procedure.


def soft_foreground(keys, fg_centroid, bg_centroid, mask, *, temperature: float = 0.1,
                    normalize: bool = True) -> jax.Array:
  """Soft foreground probability per patch (docs/method.md §7).

  .. math:: p = \\frac{e^{-d_f / T}}{e^{-d_f / T} + e^{-d_b / T}}
            = \\sigma\\big((d_b - d_f) / T\\big),\\quad d = \\lVert x - c \\rVert^2

  Args:
    keys: [B, P, D] Keys (L2-normalised first if `normalize`).
    fg_centroid: [D] or [B, D].
    bg_centroid: [D] or [B, D].
    mask: [B, h, w] bool; the probability is 0 outside it (pass the consistent mask to get
      the "masked by the consistent mask" variant, or `valid` for the plain soft map).
    temperature: T > 0 (squared distances of unit vectors lie in [0, 4]).
    normalize: L2-normalise the keys.

  Returns:
    [B, h, w] float32 in [0, 1].
  """
  b, p, d = _check_keys(keys, mask, "soft_foreground")
  x = jnp.asarray(keys, jnp.float32)
  if normalize:
    x = _km.l2_normalize(x)
  fc = jnp.broadcast_to(jnp.asarray(fg_centroid, jnp.float32), (b, d))
  bc = jnp.broadcast_to(jnp.asarray(bg_centroid, jnp.float32), (b, d))
  d_f = jnp.sum((x - fc[:, None]) ** 2, -1)
  d_b = jnp.sum((x - bc[:, None]) ** 2, -1)
  prob = jax.nn.sigmoid((d_b - d_f) / temperature).reshape(mask.shape)
  return jnp.where(jnp.asarray(mask, bool), prob, 0.0)


def masked_mean(x, m):
  """x [B, P, D], m [B, P] bool -> per-image mean [B, D] over the True rows, and count [B]."""
  mf = m.astype(jnp.float32)
  s = jnp.einsum("bp,bpd->bd", mf, x, precision=jax.lax.Precision.HIGHEST)
  n = jnp.sum(mf, axis=1)
  return s / jnp.maximum(n, 1.0)[:, None], n


@functools.partial(jax.jit, static_argnames=(
    "k_image", "k_category", "k_dataset", "num_categories", "rule", "dilate",
    "min_region_patches", "dataset_fit_patches", "n_init_image", "n_init", "max_iter",
    "connectivity", "fg_min_share", "fallback_share", "min_image_share", "has_attn",
    "flip_image_level", "flip_share", "arbitrate", "arbitrate_margin",
    "arbitrate_min_contrast"))
def _multilevel(keys, valid, cls, cls_attn, key, image_ids, *, k_image, k_category,
                k_dataset, num_categories, rule, dilate, min_region_patches,
                dataset_fit_patches, n_init_image, n_init, max_iter, connectivity,
                fg_min_share, fallback_share, min_image_share, has_attn, flip_image_level,
                flip_share, arbitrate, arbitrate_margin, arbitrate_min_contrast):
  b, p, d = keys.shape
  h, w = valid.shape[1:]
  x = _km.l2_normalize(keys.astype(jnp.float32))
  vflat = valid.reshape(b, p)
  k_img, k_grp, k_cat, k_dat = jax.random.split(key, 4)

  # 1. Image level.
  prng = jax.vmap(lambda i: jax.random.fold_in(k_img, i))(image_ids)
  img = image_level_foreground(x, valid, cls_attn if has_attn else None, keys_prng=prng,
                               k=k_image, n_init=n_init_image, max_iter=max_iter,
                               cosine=False)
  i_fg = img["fg"]

  # 2. Category level.
  image_valid = jnp.any(vflat, axis=1)
  groups = category_groups(cls, num_categories, key=k_grp, image_mask=image_valid)
  g = min(num_categories, b)
  gid = jnp.broadcast_to(groups[:, None], (b, p))
  cat = _km.grouped_kmeans(x.reshape(b * p, d), gid.reshape(-1), g, k_category, key=k_cat,
                           mask=vflat.reshape(-1), n_init=n_init, max_iter=max_iter)
  cat_assign = cat.assignment.reshape(b, h, w)
  cat_table = foreground_clusters(cat_assign, i_fg, valid, k_category,
                                  group_ids=gid.reshape(b, h, w), num_groups=g,
                                  min_share=fg_min_share, fallback_share=fallback_share)

  # 3. Dataset level (optionally fitted on a uniform subset of the valid patches).
  flat_x, flat_v = x.reshape(b * p, d), vflat.reshape(-1)
  if dataset_fit_patches is not None and dataset_fit_patches < b * p:
    k_s, k_dat = jax.random.split(k_dat)
    prio = jnp.where(flat_v, jax.random.uniform(k_s, (b * p,)), -1.0)
    top, idx = jax.lax.top_k(prio, dataset_fit_patches)
    fit = _km.kmeans(flat_x[idx], k_dataset, key=k_dat, mask=top >= 0, n_init=n_init,
                     max_iter=max_iter)
    dat_centroids = fit.centroids
    dat_assign, _ = _km.assign(flat_x, dat_centroids, mask=flat_v)
  else:
    fit = _km.kmeans(flat_x, k_dataset, key=k_dat, mask=flat_v, n_init=n_init,
                     max_iter=max_iter)
    dat_centroids, dat_assign = fit.centroids, fit.assignment
  dat_assign = dat_assign.reshape(b, h, w)
  dat_table = foreground_clusters(dat_assign, i_fg, valid, k_dataset,
                                  min_share=fg_min_share, fallback_share=fallback_share)
  d_fg, c_fg = level_masks(valid, dat_assign, cat_assign, groups, dat_table, cat_table)

  # 4-5. Side check, trust, consistency, cleanup, empty fallback (per image).
  comb = combine_levels(i_fg, d_fg, c_fg, valid, cls_attn if has_attn else None, rule=rule,
                        dilate=dilate, min_region_patches=min_region_patches,
                        connectivity=connectivity, min_image_share=min_image_share,
                        flip_image_level=flip_image_level, flip_share=flip_share,
                        arbitrate=arbitrate, arbitrate_margin=arbitrate_margin,
                        arbitrate_min_contrast=arbitrate_min_contrast)

  # Centroids for the soft probability: mean normalised Key inside / outside the final mask;
  # an image without any fg (bg) patch uses the mean over all images.
  fg_c, n_f, bg_c, n_b = centroid_sums(x, comb["consistent"], valid)
  all_f = jnp.sum(fg_c * n_f[:, None], 0) / jnp.maximum(jnp.sum(n_f), 1.0)
  all_b = jnp.sum(bg_c * n_b[:, None], 0) / jnp.maximum(jnp.sum(n_b), 1.0)
  fg_c = fill_empty_centroids(fg_c, n_f, all_f)
  bg_c = fill_empty_centroids(bg_c, n_b, all_b)

  return dict(
      comb, category=c_fg, dataset=d_fg, groups=groups,
      image_assignment=img["assignment"], image_centroids=img["centroids"],
      image_fg_clusters=img["fg_clusters"], border_fraction=img["border_fraction"],
      category_assignment=cat_assign, category_centroids=cat.centroids,
      category_fg_clusters=cat_table, dataset_assignment=dat_assign,
      dataset_centroids=dat_centroids, dataset_fg_clusters=dat_table,
      fg_centroid=fg_c, bg_centroid=bg_c)


def multilevel_foreground(keys, valid, cls, cls_attn=None, *, key, k_image: int = 2,
                          k_category: int = 2, k_dataset: int = 2, num_categories: int = 5,
                          rule: str = "dc_and_i", dilate: int = 1,
                          min_region_patches: int = 4,
                          dataset_fit_patches: Optional[int] = None, image_ids=None,
                          n_init_image: int = 1, n_init: int = 1, max_iter: int = 100,
                          connectivity: int = 4, fg_min_share: float = 0.5,
                          fallback_share: float = 0.25,
                          min_image_share: float = 0.2, flip_image_level: bool = False,
                          flip_share: float = 0.8, arbitrate: bool = True,
                          arbitrate_margin: float = 1.0,
                          arbitrate_min_contrast: float = 0.5) -> dict:
  """Binary patch pseudo-masks from consistent Dataset / Category / Image-level clustering.

  The in-memory version of docs/method.md §2-6 for a batch that is the whole (small) dataset;
  the dataset-scale path reuses the same per-level functions with streamed k-means. One
  compiled call; all configuration is static.

  Steps: L2-normalise the Keys; image level (`image_level_foreground`, PRNG key of image i =
  fold_in(key_image, image_ids[i])); category level (`category_groups` + `grouped_kmeans`);
  dataset level (`kmeans`, or fitted on `dataset_fit_patches` random valid patches then every
  patch assigned); `foreground_clusters` for the category (per group) and dataset levels; a
  level whose mask in an image has less than `min_image_share` of its patches inside that
  image's image-level mask (or is empty there) is replaced by the image-level mask for that
  image, unless the CLS attention shows that the image level took the wrong side (then that
  mask is complemented first: `combine_levels`, step 1); `consistency(rule)`;
  `remove_small_components(min_region_patches)`; an image left empty falls back to its
  image-level mask.

  Args:
    keys: [B, P, D] raw last-block Keys (normalised here).
    valid: [B, h, w] bool patch validity (h * w = P).
    cls: [B, D] CLS tokens (for the category groups).
    cls_attn: optional [B, P] CLS attention (image-level tie-break; the side check of
      `combine_levels`, skipped without it).
    key: PRNG key.
    k_image, k_category, k_dataset: clusters per level.
    num_categories: CLS groups (clipped to B).
    rule: consistency rule, one of RULES.
    dilate: dilation (patches) of the image-level mask in `dc_and_i`.
    min_region_patches: components smaller than this (in patches) are removed.
    dataset_fit_patches: fit the dataset-level centroids on this many random patches.
    image_ids: optional [B] int ids for the per-image PRNG keys (default arange(B)).
    n_init_image: k-means restarts per image; n_init: restarts of the other levels.
    max_iter: k-means iterations.
    connectivity: 4 or 8 for the component cleanup.
    fg_min_share, fallback_share: see `foreground_clusters`.
    min_image_share: per-image trust threshold of the dataset / category masks.
    flip_image_level: opt-in repair of docs/method.md "Failure modes", 1 (a close-up whose
      object touches most of the border, so the border rule picks the background): if at least
      `flip_share` of the patches where Dataset and Category agree on foreground lie outside
      an image's image-level mask, that mask is replaced by its complement (within valid).
      Off by default: it also fires when D and C are the ones that are wrong.
    flip_share: threshold of `flip_image_level`, and the disagreement threshold of
      `arbitrate`.
    arbitrate, arbitrate_margin, arbitrate_min_contrast: when D and C agree on patches that
      are (almost) all outside the image-level mask, complement that mask if CLS attention
      favours D and C (`combine_levels`, step 1; docs/method.md §6).

  Returns:
    dict with [B, h, w] bool masks "image" (after a flip), "category", "dataset",
    "consistent_raw" (before cleanup), "consistent" (final); [B] bool "fallback" (used the
    image mask), "image_flipped", "arbitrated" (flipped by the attention rule),
    "dataset_trusted", "category_trusted"; [B, 2] "attention_contrast" (s(I), s(A) of
    `combine_levels`); "groups" [B]; per level the assignments, centroids and
    foreground-cluster tables; "fg_centroid", "bg_centroid" [B, D]: mean normalised Key
    inside / outside the final mask (for `soft_foreground`).
  """
  b, p, d = _check_keys(keys, valid, "multilevel_foreground")
  if rule not in RULES:
    raise ValueError(f"multilevel_foreground: unknown rule {rule!r}; expected one of {RULES}")
  if len(jnp.shape(cls)) != 2 or jnp.shape(cls)[0] != b:
    raise ValueError(f"multilevel_foreground: `cls` must be [B, D] with B={b}, got "
                     f"{jnp.shape(cls)}")
  if cls_attn is not None and jnp.shape(cls_attn) != (b, p):
    raise ValueError(f"multilevel_foreground: `cls_attn` has shape {jnp.shape(cls_attn)}, "
                     f"expected {(b, p)}")
  components.neighbours(connectivity)
  ids = jnp.arange(b) if image_ids is None else jnp.asarray(image_ids)
  attn = jnp.zeros((b, p), jnp.float32) if cls_attn is None else jnp.asarray(cls_attn)
  return _multilevel(
      jnp.asarray(keys), jnp.asarray(valid, bool), jnp.asarray(cls), attn, key, ids,
      k_image=int(k_image), k_category=int(k_category), k_dataset=int(k_dataset),
      num_categories=int(num_categories), rule=rule, dilate=int(dilate),
      min_region_patches=int(min_region_patches),
      dataset_fit_patches=None if dataset_fit_patches is None else int(dataset_fit_patches),
      n_init_image=int(n_init_image), n_init=int(n_init), max_iter=int(max_iter),
      connectivity=int(connectivity), fg_min_share=float(fg_min_share),
      fallback_share=float(fallback_share), min_image_share=float(min_image_share),
      has_attn=cls_attn is not None, flip_image_level=bool(flip_image_level),
      flip_share=float(flip_share), arbitrate=bool(arbitrate),
      arbitrate_margin=float(arbitrate_margin),
      arbitrate_min_contrast=float(arbitrate_min_contrast))
