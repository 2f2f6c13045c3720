"""k-means in JAX: masked, batched, grouped and dataset-scale Lloyd with k-means++ seeding.

LightCluster clusters ViT Keys at three granularities, and each needs a different shape of
k-means (METHOD.md steps 2-4):

* **Image level**: many small problems of different sizes -> `batched_kmeans`, one compiled
  call over a padded batch `[B, N, D]` with a validity mask `[B, N]`.
* **Category level**: ragged groups of points -> `grouped_kmeans`, one compiled call that runs an
  independent k-means inside every group (no Python loop over groups, no recompiles).
* **Dataset level**: more points than fit in memory -> `fit_streaming` / `kmeans_on_sample` on
  the host, built from pure per-chunk kernels (`lloyd_statistics`, `assign`) that also run
  inside `jax.shard_map` with a `psum` over the data axis.

All variants minimise the weighted inertia over the valid points

.. math::

  J(c) = \\sum_{i:\\,m_i} w_i \\min_j \\lVert x_i - c_j \\rVert^2

with Lloyd's iteration (assign every point to its nearest centroid, then move every centroid to
the weighted mean of its points), seeded by greedy k-means++ (Arthur & Vassilvitskii 2007, with
`2 + floor(log k)` local trials per step as in scikit-learn). Squared distances are computed as
`||x||^2 - 2 x.c + ||c||^2` with matmuls at HIGHEST precision. Stopping follows scikit-learn:
stop when the labels no longer change ("strict convergence") or when the total squared centroid
shift is at most `tol * mean_d Var(x_d)`; then the points are re-assigned to the final centroids.
A cluster that becomes empty is re-seeded with the valid point farthest from its own centroid
(scikit-learn's rule). For k = 2 (the image level) `kmeans` / `batched_kmeans` run a
specialised Lloyd (`_two_means`: assignment by the sign of one matvec, cluster sums updated
from the points that changed cluster, lazy cosine normalisation) with the same result up to
float32 rounding and about a third of the passes over the points. Masked points (mask False, or weight <= 0) never influence anything:
not the seeding, not the centroids, not the tolerance, not the re-seeding; their assignment is -1.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (500, 8))
  >>> res = kmeans(x, 3, key=jax.random.key(1))
  >>> res.centroids.shape, res.assignment.shape
  ((3, 8), (500,))

References:
  Lloyd, "Least squares quantization in PCM", 1982.
  Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
  Sculley, "Web-scale k-means clustering", WWW 2010 (the mini-batch update).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KMeansResult", "kmeans", "batched_kmeans", "grouped_kmeans", "assign",
    "lloyd_statistics", "grouped_lloyd_statistics", "kmeans_on_sample", "fit_streaming",
    "sample_indices", "l2_normalize",
]

_HI = jax.lax.Precision.HIGHEST
# Up to this many clusters the centroid sums are a one-hot matmul (fastest for small k on
# CPU); above it a scatter-add (segment_sum), whose cost does not grow with k (measured on
# [4096, 384] blocks: k=2 one-hot 0.17 ms vs scatter 0.31 ms; k=20 0.49 ms vs 0.26 ms).
_ONEHOT_MAX_CLUSTERS = 8

Init = Union[str, jax.Array, np.ndarray]


class KMeansResult(NamedTuple):
  """Result of a k-means fit.

  Attributes:
    centroids: [k, D] float32 (`batched_kmeans`: [B, k, D]; `grouped_kmeans`: [G, k, D]).
    assignment: [N] int32 cluster index of every point, -1 for masked points
      (`grouped_kmeans`: the index within the point's own group).
    inertia: float32 scalar, sum over valid points of `w_i * ||x_i - c_{a_i}||^2` for the
      returned centroids (`batched`: [B]; `grouped`: [G], the inertia of each group).
    iterations: int32, Lloyd iterations run (`batched`: [B]; `grouped`: [G]).
    converged: bool, whether the stopping rule fired before `max_iter`.
  """
  centroids: jax.Array
  assignment: jax.Array
  inertia: jax.Array
  iterations: jax.Array
  converged: jax.Array


# ----------------------------------------------------------------------------------------------
# Small shared pieces.


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm: `x / max(||x||, eps)` (zero rows stay zero).

  The one L2 normalisation of the package (Keys, CLS descriptors, cosine k-means).

  Args:
    x: [..., D] float.
    eps: floor of the norm.

  Returns:
    [..., D], same dtype.

  Example:
    >>> l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    Array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
  """
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _sq_dists(x: jax.Array, x_sq: jax.Array, c: jax.Array) -> jax.Array:
  """Squared distances [n, m] between rows of x [n, D] and c [m, D] via one matmul."""
  xc = jnp.einsum("nd,md->nm", x, c, precision=_HI)
  c_sq = jnp.sum(c * c, axis=-1)
  return jnp.maximum(x_sq[:, None] - 2.0 * xc + c_sq[None, :], 0.0)


def _effective_weights(n: int, mask, weights) -> jax.Array:
  """Per-point weights [n] float32 with masked points (and weights <= 0) set to exactly 0."""
  w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if mask is not None:
    w = jnp.where(jnp.asarray(mask, bool), w, 0.0)
  return jnp.where(w > 0, w, 0.0)


def _masked_logits(w: jax.Array) -> jax.Array:
  """log(w) with -inf for zero weights: sampling proportional to w never picks a masked point."""
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def _tolerance(x: jax.Array, x_sq: jax.Array, valid: jax.Array, tol) -> jax.Array:
  """scikit-learn's absolute tolerance: `tol * mean_d Var(x_d)` over the valid points.

  Uses `mean_d Var(x_d) = (E||x||^2 - ||E x||^2) / D` (unweighted, as scikit-learn), so the same
  formula serves the grouped variant through segment sums.
  """
  v = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v), 1.0)
  mean = jnp.einsum("n,nd->d", v, x, precision=_HI) / n
  total_var = jnp.sum(v * x_sq) / n - jnp.sum(mean * mean)
  return tol * jnp.maximum(total_var, 0.0) / x.shape[-1]


def _cluster_sums(x: jax.Array, w: jax.Array, ids: jax.Array, num: int):
  """Weighted sums [num, D] and weights [num] of the points of every cluster id in [0, num)."""
  if num <= _ONEHOT_MAX_CLUSTERS:
    onehot = (ids[:, None] == jnp.arange(num)[None, :]).astype(jnp.float32) * w[:, None]
    sums = jnp.einsum("nk,nd->kd", onehot, x, precision=_HI)
    return sums, jnp.sum(onehot, axis=0)
  sums = jax.ops.segment_sum(x * w[:, None], ids, num_segments=num)
  return sums, jax.ops.segment_sum(w, ids, num_segments=num)


def _n_local_trials(k: int, n_local_trials: Optional[int]) -> int:
  return 2 + int(math.log(k)) if n_local_trials is None else int(n_local_trials)


# ----------------------------------------------------------------------------------------------
# One point set.


def _sample_proportional(key, p: jax.Array, num: int) -> jax.Array:
  """`num` indices drawn with replacement with probability ~ p >= 0 (inverse CDF) -> [num].

  One uniform number per draw (not one per point: cheaper than Gumbel-max, and independent
  of N, so appending zero-probability padding leaves the draws unchanged). An index with
  p = 0 is never drawn while some p > 0.
  """
  cdf = jnp.cumsum(p)
  u = jax.random.uniform(key, (num,)) * cdf[-1]
  # searchsorted(cdf, u, side="right") as a count: for a few draws one vectorised compare
  # is cheaper on CPU than the bisection while-loop (38 us -> ~3 us for N = 3136).
  idx = jnp.sum(cdf[None, :] <= u[:, None], axis=1, dtype=jnp.int32)
  # Materialised: fused into a gather consumer, the count would be redone per element.
  return jax.lax.optimization_barrier(jnp.clip(idx, 0, p.shape[0] - 1))


def _kmeans_plus_plus(key, x, x_sq, w, k: int, n_local_trials: int) -> jax.Array:
  """Greedy k-means++ seeding restricted to points with w > 0 -> centroids [k, D].

  First centre ~ w; then, k-1 times, `n_local_trials` candidates ~ w * D(x)^2 (D = distance to
  the closest chosen centre) and the candidate that lowers the potential most is kept.
  """
  key, sub = jax.random.split(key)
  first = _sample_proportional(sub, w, 1)[0]
  closest = _sq_dists(x, x_sq, x[first][None])[:, 0]
  centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])

  def body(i, carry):
    centroids, closest, key = carry
    key, sub = jax.random.split(key)
    pot = w * closest
    # All valid points already coincide with a centre: fall back to sampling ~ w.
    cand = _sample_proportional(sub, jnp.where(jnp.sum(pot) > 0, pot, w), n_local_trials)
    d = jnp.minimum(_sq_dists(x, x_sq, x[cand]), closest[:, None])
    best = jnp.argmin(jnp.einsum("n,nt->t", w, d, precision=_HI))
    return centroids.at[i].set(x[cand[best]]), d[:, best], key

  centroids, _, _ = jax.lax.fori_loop(1, k, body, (centroids, closest, key))
  return centroids


def _random_indices(key, w, k: int) -> jax.Array:
  """Indices [k] of k distinct valid points drawn ~ w without replacement (Gumbel top-k)."""
  scores = _masked_logits(w) + jax.random.gumbel(key, w.shape)
  top, idx = jax.lax.top_k(scores, k)
  # Fewer than k valid points: reuse the first pick instead of a masked point; the duplicate
  # then becomes an empty cluster and is re-seeded (or stays empty).
  return jnp.where(jnp.isfinite(top), idx, idx[0])


def _random_init(key, x, w, k: int) -> jax.Array:
  """k distinct valid points drawn ~ w without replacement (Gumbel top-k) -> [k, D]."""
  return x[_random_indices(key, w, k)]


def _estep(x, x_sq, centroids):
  """Nearest centroid [n] int32 and its squared distance [n]."""
  d = _sq_dists(x, x_sq, centroids)
  return jnp.argmin(d, axis=1).astype(jnp.int32), jnp.min(d, axis=1)


class _Pass(NamedTuple):
  sums: jax.Array     # [k, D]
  counts: jax.Array   # [k]
  inertia: jax.Array  # scalar, w.r.t. the centroids the pass was run with
  labels: jax.Array   # [N] int32
  dist: jax.Array     # [N] squared distance to the assigned centroid


def _chunk_stats(x, w, centroids, cosine: bool, stats: bool):
  x = x.astype(jnp.float32)
  if cosine:
    x = l2_normalize(x)
  labels, dist = _estep(x, jnp.sum(x * x, axis=-1), centroids)
  k = centroids.shape[0]
  if stats:
    sums, counts = _cluster_sums(x, w, labels, k)
  else:
    sums, counts = jnp.zeros_like(centroids), jnp.zeros((k,), jnp.float32)
  return _Pass(sums, counts, jnp.sum(w * dist), labels, dist)


def _pass(x, w, centroids, *, chunk: Optional[int], cosine: bool = False,
          stats: bool = True) -> _Pass:
  """One assignment (+ centroid statistics) pass over all points, optionally chunked.

  Chunked, it is a `fori_loop` over row blocks of `chunk` points: a block stays in cache for
  the distance matmul, the argmin and the centroid sums, and no [N, k] or normalised [N, D]
  temporary is ever materialised. The last block overlaps the previous one (no padded copy);
  its already-counted rows get weight 0.
  """
  n = x.shape[0]
  if chunk is None or n <= chunk:
    return _chunk_stats(x, w, centroids, cosine, stats)
  k = centroids.shape[0]

  def body(i, carry):
    start = jnp.minimum(i * chunk, n - chunk)
    xi = jax.lax.dynamic_slice_in_dim(x, start, chunk)
    wi = jax.lax.dynamic_slice_in_dim(w, start, chunk)
    wi = jnp.where(start + jnp.arange(chunk) >= i * chunk, wi, 0.0)
    p = _chunk_stats(xi, wi, centroids, cosine, stats)
    return _Pass(carry.sums + p.sums, carry.counts + p.counts, carry.inertia + p.inertia,
                 jax.lax.dynamic_update_slice_in_dim(carry.labels, p.labels, start, 0),
                 jax.lax.dynamic_update_slice_in_dim(carry.dist, p.dist, start, 0))

  # The carry starts from the first block's statistics and from buffers computed from the
  # data (not constants), so inside shard_map it has the data's device-varying type.
  p0 = _chunk_stats(x[:chunk], w[:chunk], centroids, cosine, stats)
  zeros = w * 0.0
  init = _Pass(p0.sums, p0.counts, p0.inertia,
               jax.lax.dynamic_update_slice_in_dim(zeros.astype(jnp.int32), p0.labels, 0, 0),
               jax.lax.dynamic_update_slice_in_dim(zeros, p0.dist, 0, 0))
  del k
  return jax.lax.fori_loop(1, -(-n // chunk), body, init)


def _relocate_empty(x, w, labels, dist, sums, counts, cosine: bool = False):
  """scikit-learn's empty-cluster rule: the j-th empty cluster takes the j-th farthest point.

  "Farthest" = largest squared distance to its own centroid among valid points; the point's
  weight and coordinates move out of its old cluster into the empty one.
  """
  k = counts.shape[0]
  n_far = min(k, x.shape[0])
  far_d, far_idx = jax.lax.top_k(jnp.where(w > 0, dist, -jnp.inf), n_far)
  empty = counts <= 0
  rank = jnp.cumsum(empty) - 1
  r = jnp.clip(rank, 0, n_far - 1)
  src = far_idx[r]
  ok = empty & (rank < n_far) & jnp.isfinite(far_d[r])
  ws = jnp.where(ok, w[src], 0.0)
  xs = x[src].astype(jnp.float32)
  if cosine:
    xs = l2_normalize(xs)
  moved = xs * ws[:, None]
  old = labels[src]
  sums = sums - jax.ops.segment_sum(moved, old, num_segments=k)
  counts = counts - jax.ops.segment_sum(ws, old, num_segments=k)
  return jnp.where(ok[:, None], moved, sums), jnp.where(ok, ws, counts)


class _LloydState(NamedTuple):
  it: jax.Array
  centroids: jax.Array
  labels: jax.Array
  inertia: jax.Array   # of the last pass, w.r.t. the centroids it was run with
  done: jax.Array
  final: jax.Array     # the last pass already is the final assignment (see _lloyd)


def _lloyd(x, w, centroids, tol_abs, max_iter: int, chunk: Optional[int], cosine: bool):
  """Lloyd iterations from `centroids` -> the final `_LloydState`.

  `x` is already normalised unless `chunk` is set and `cosine` (then every pass normalises
  its blocks on the fly). When the loop ended by strict convergence without re-seeding
  (`final`), the state's labels / inertia are already the final assignment and the caller
  can skip one pass; otherwise they belong to the previous centroids.
  """
  valid = w > 0
  pass_cosine = cosine and chunk is not None

  def cond(s):
    return (s.it < max_iter) & ~s.done

  def body(s):
    p = _pass(x, w, s.centroids, chunk=chunk, cosine=pass_cosine)
    reseed = jnp.any(p.counts <= 0)
    sums, counts = jax.lax.cond(
        reseed, functools.partial(_relocate_empty, cosine=pass_cosine),
        lambda *a: (a[-2], a[-1]), x, w, p.labels, p.dist, p.sums, p.counts)
    new = jnp.where(counts[:, None] > 0, sums / jnp.where(counts > 0, counts, 1.0)[:, None],
                    s.centroids)
    strict = jnp.all((p.labels == s.labels) | ~valid)
    shift = jnp.sum((new - s.centroids) ** 2)
    # Unchanged labels and no re-seeding: `new` is bitwise the previous centroids (same sums
    # of the same points), so this pass's labels and inertia are already the final ones.
    return _LloydState(s.it + 1, new, p.labels, p.inertia, strict | (shift <= tol_abs),
                       strict & ~reseed)

  init = _LloydState(jnp.int32(0), centroids, jnp.full(w.shape, -1, jnp.int32),
                     jnp.float32(0), jnp.asarray(False), jnp.asarray(False))
  return jax.lax.while_loop(cond, body, init)


def _kmeans_single(x, w, key, init_centroids, tol, *, k: int, init_mode: str, n_init: int,
                   max_iter: int, cosine: bool, n_local_trials: int,
                   chunk_size: Optional[int] = None, special_k2: bool = True) -> KMeansResult:
  """The whole fit for one point set (jit/vmap friendly; all configuration static).

  With k=2 and no chunking the fit runs `_two_means` (same result, fewer passes over the
  points); `special_k2=False` forces the general path (used by the tests to compare them).
  """
  chunked = chunk_size is not None and x.shape[0] > chunk_size
  x = x.astype(jnp.float32)
  if k == 2 and special_k2 and not chunked:
    def one_run(run_key):
      return _two_means(x, w, run_key, init_centroids, tol, init_mode=init_mode,
                        max_iter=max_iter, n_local_trials=n_local_trials, cosine=cosine)
    if n_init == 1:
      return one_run(key)
    runs = jax.vmap(one_run)(jax.random.split(key, n_init))
    return jax.tree_util.tree_map(lambda a: a[jnp.argmin(runs.inertia)], runs)
  if cosine and not chunked:
    x = l2_normalize(x)
  # Seeding and the tolerance see normalised points; chunked passes normalise on the fly.
  xs = l2_normalize(x) if (cosine and chunked) else x
  xs_sq = jnp.sum(xs * xs, axis=-1)
  valid = w > 0
  tol_abs = _tolerance(xs, xs_sq, valid, tol)

  def one_run(run_key):
    if init_mode == "k-means++":
      c0 = _kmeans_plus_plus(run_key, xs, xs_sq, w, k, n_local_trials)
    elif init_mode == "random":
      c0 = _random_init(run_key, xs, w, k)
    else:
      c0 = init_centroids.astype(jnp.float32)
    s = _lloyd(x, w, c0, tol_abs, max_iter, chunk_size if chunked else None, cosine)

    def final_pass(s):
      p = _pass(x, w, s.centroids, chunk=chunk_size if chunked else None,
                cosine=cosine and chunked, stats=False)
      return p.labels, p.inertia

    labels, inertia = jax.lax.cond(s.final, lambda s: (s.labels, s.inertia), final_pass, s)
    return KMeansResult(s.centroids, jnp.where(valid, labels, -1), inertia, s.it, s.done)

  if n_init == 1:
    return one_run(key)
  runs = jax.vmap(one_run)(jax.random.split(key, n_init))
  best = jnp.argmin(runs.inertia)
  return jax.tree_util.tree_map(lambda a: a[best], runs)


# ----------------------------------------------------------------------------------------------
# k = 2 (image level): a specialised Lloyd with one matvec per iteration.


# Sparse M-step: when few points changed cluster, the sums are updated from the changed rows
# only (top_k compaction + gather of a fixed number of rows) instead of a pass over all
# points. Measured on [3136, 384] sets (one core, idle machine): a full pass ~70-90 us;
# 64 rows ~10 us, 256 rows ~20 us, 512 rows ~50 us (no better than the pass).
_K2_SPARSE_ROWS = (64, 256)


class _TwoState(NamedTuple):
  it: jax.Array
  centroids: jax.Array   # [2, D]
  labels: jax.Array      # [N] int32, nearest centroid of `centroids` (always up to date)
  sum_labels: jax.Array  # [N] int32, the labels `sums` / `counts` belong to
  sums: jax.Array        # [2, D] weighted sums of the points of each cluster of sum_labels
  counts: jax.Array      # [2] weights of each cluster of sum_labels
  done: jax.Array
  final: jax.Array


def _two_means(x, w, key, init_centroids, tol, *, init_mode: str, max_iter: int,
               n_local_trials: int, cosine: bool = False) -> KMeansResult:
  """One k=2 run (seeding + Lloyd + final assignment) with the same result as the general path.

  For two centroids the assignment is the sign of a single matvec,

  .. math::

    a_i = [\\, \\lVert x_i - c_1 \\rVert^2 < \\lVert x_i - c_0 \\rVert^2 \\,]
        = [\\, 2 x_i \\cdot (c_0 - c_1) + \\lVert c_1 \\rVert^2 - \\lVert c_0 \\rVert^2 < 0 \\,],

  so an iteration reads the points once for the E-step (one matvec instead of an [N, 2]
  distance matrix and an argmin). The M-step updates the cluster sums from the rows whose
  label changed (top_k compaction + gather of a fixed number of rows; a full pass only when
  many changed): S_1 += sum_i delta_i x_i, S_0 -= the same, with delta_i = +-w_i. The
  k-means++ distances to both initial centroids are already known, so the first E-step is
  free, and the first M-step's pass also yields the unweighted sum of the valid points for
  the tolerance. The stopping rule, the empty-cluster rule and the final assignment are those
  of `_lloyd`; the returned inertia is evaluated from the sums of the final clusters,

  .. math::

    J = \\sum_i w_i \\lVert x_i \\rVert^2 - 2 \\sum_j c_j \\cdot S_j
        + \\sum_j n_j \\lVert c_j \\rVert^2,

  instead of per point (same float32 cancellation as the per-point `||x||^2 - 2 x.c +
  ||c||^2`, clamped at 0 only in total).

  With `cosine`, the points are never normalised in memory: every product with the points
  is scaled per row instead (`(x / s) . c = (x . c) / s`, `sum_i a_i x_i / s_i`), which saves
  a read and a write of the whole set.

  On CPU the cost per set is dominated by memory traffic: one pass brings the set into cache
  (the copy out of the batch), then every pass over the set streams it from L3, so the
  number of passes is what this function minimises (measured on [3136, 384] sets: seeding
  4 passes, then about 1.3 per Lloyd iteration, versus ~3 per iteration in `_lloyd`).

  Args:
    x: [N, D] float32 points (raw, also with `cosine`).
    w: [N] float32 effective weights (0 = masked).
    key: PRNG key of this run.
    init_centroids: [2, D] (init_mode "array") or None.
    tol: relative tolerance (scalar).
    init_mode, max_iter, n_local_trials: as in `_kmeans_single`.
    cosine: cluster the L2-normalised points (normalised lazily, see above).

  Returns:
    KMeansResult of the run (centroids [2, D], assignment [N] with -1 for masked points).
  """
  n, d = x.shape
  x = x.astype(jnp.float32)
  valid = w > 0
  v = valid.astype(jnp.float32)
  raw_sq = jnp.sum(x * x, axis=-1)
  if cosine:
    # The rows of the normalised points are x_i * rs_i (as `l2_normalize`).
    norm = jnp.sqrt(raw_sq)
    rs = 1.0 / jnp.maximum(norm, 1e-12)
    x_sq = jnp.square(norm * rs)

    def mv(c):                                   # [N, D] x [m, D] -> [N, m]
      return jnp.einsum("nd,md->nm", x, c, precision=_HI) * rs[:, None]

    def rows(idx):
      return x[idx] * rs[idx][..., None]

    def vecmat(cols):                            # [N, r] -> [r, D]
      return jnp.einsum("nr,nd->rd", cols * rs[:, None], x, precision=_HI)
  else:
    x_sq = raw_sq

    def mv(c):
      return jnp.einsum("nd,md->nm", x, c, precision=_HI)

    def rows(idx):
      return x[idx]

    def vecmat(cols):
      return jnp.einsum("nr,nd->rd", cols, x, precision=_HI)

  def sq_dists(c):                               # as `_sq_dists`
    c_sq = jnp.sum(c * c, axis=-1)
    return jnp.maximum(x_sq[:, None] - 2.0 * mv(c) + c_sq[None, :], 0.0)

  if init_mode == "k-means++":
    key, sub = jax.random.split(key)
    first = rows(_sample_proportional(sub, w, 1))                # [1, D]
    closest = sq_dists(first)[:, 0]
    key, sub = jax.random.split(key)
    pot = w * closest
    cand = _sample_proportional(sub, jnp.where(jnp.sum(pot) > 0, pot, w), n_local_trials)
    xc = rows(cand)                                              # [T, D]
    dc = sq_dists(xc)                                            # [N, T]
    best = jnp.argmin(jnp.einsum("n,nt->t", w, jnp.minimum(dc, closest[:, None]),
                                 precision=_HI))
    c0 = jnp.concatenate([first, xc[best][None]])
    # The distances to both initial centroids are known: the first E-step is free.
    labels = (dc[:, best] < closest).astype(jnp.int32)
  else:
    if init_mode == "random":
      c0 = rows(_random_indices(key, w, 2))
    else:
      c0 = init_centroids.astype(jnp.float32)
    dd = sq_dists(c0)
    labels = (dd[:, 1] < dd[:, 0]).astype(jnp.int32)

  # The first M-step's sums, with the unweighted sum of the valid points (tolerance).
  lf = labels.astype(jnp.float32)
  cols = jnp.stack([w * (1.0 - lf), w * lf, v], axis=1)                 # [N, 3]
  sums3 = vecmat(cols)
  sums0, counts0 = sums3[:2], jnp.sum(cols[:, :2], axis=0)
  n_v = jnp.maximum(jnp.sum(v), 1.0)
  mean_v = sums3[2] / n_v
  tol_abs = tol * jnp.maximum(jnp.sum(v * x_sq) / n_v - jnp.sum(mean_v * mean_v), 0.0) / d
  w_sq = jnp.sum(w * x_sq)
  sizes = sorted({min(r, n) for r in _K2_SPARSE_ROWS})

  def update_sums(new_labels, old_labels, sums, counts):
    """Sums / counts of `new_labels` from those of `old_labels`, and the number of valid
    points whose label differs."""
    delta = w * (new_labels - old_labels).astype(jnp.float32)    # +w: moved to cluster 1
    num = jnp.sum(delta != 0)

    def sparse(size):
      def f(_):
        # The changed rows have the largest |delta|; the other picks have delta = 0.
        idx = jax.lax.top_k(jnp.abs(delta), size)[1]
        moved = jnp.einsum("m,md->d", delta[idx], rows(idx), precision=_HI)
        dn = jnp.sum(delta[idx])
        return sums + jnp.stack([-moved, moved]), counts + jnp.stack([-dn, dn])
      return f

    def dense(_):
      lf = new_labels.astype(jnp.float32)
      cols = jnp.stack([w * (1.0 - lf), w * lf], axis=1)
      return vecmat(cols), jnp.sum(cols, axis=0)

    branch = jnp.sum(num > jnp.asarray(sizes)) + (num > 0)
    return jax.lax.switch(branch, [lambda _: (sums, counts)] + [sparse(r) for r in sizes]
                          + [dense], None) + (num,)

  def estep(c):
    u = mv((c[0] - c[1])[None])[:, 0]
    c_sq = jnp.sum(c * c, axis=-1)
    return (2.0 * u + (c_sq[1] - c_sq[0]) < 0).astype(jnp.int32)

  def relocate(labels, c, sums, counts):
    dist = jnp.min(sq_dists(c), axis=1)
    return _relocate_empty(x, w, labels, dist, sums, counts, cosine=cosine)

  def cond(s):
    return (s.it < max_iter) & ~s.done

  def body(s):
    sums, counts, num = update_sums(s.labels, s.sum_labels, s.sums, s.counts)
    reseed = jnp.any(counts <= 0)
    rs, rc = jax.lax.cond(reseed, relocate, lambda *a: (a[-2], a[-1]),
                          s.labels, s.centroids, sums, counts)
    new = jnp.where(rc[:, None] > 0, rs / jnp.where(rc > 0, rc, 1.0)[:, None], s.centroids)
    # Labels unchanged since the previous iteration (sum_labels; in the first iteration
    # nothing is "unchanged" unless there is no valid point, as in `_lloyd`).
    strict = jnp.where(s.it == 0, no_valid, num == 0)
    shift = jnp.sum((new - s.centroids) ** 2)
    final = strict & ~reseed
    # Unchanged labels without re-seeding: `new` equals the centroids the labels were
    # computed with, so the E-step for the next iteration / the final assignment is skipped.
    labels = jax.lax.cond(final, lambda c: s.labels, estep, new)
    return _TwoState(s.it + 1, new, labels, s.labels, sums, counts,
                     strict | (shift <= tol_abs), final)

  no_valid = ~jnp.any(valid)
  init = _TwoState(jnp.int32(0), c0, labels, labels, sums0, counts0, jnp.asarray(False),
                   jnp.asarray(False))
  s = jax.lax.while_loop(cond, body, init)
  sums, counts, _ = update_sums(s.labels, s.sum_labels, s.sums, s.counts)
  c = s.centroids
  inertia = w_sq - 2.0 * jnp.sum(c * sums) + jnp.sum(counts * jnp.sum(c * c, axis=-1))
  return KMeansResult(c, jnp.where(valid, s.labels, -1), jnp.maximum(inertia, 0.0), s.it,
                      s.done)


_STATIC = ("k", "init_mode", "n_init", "max_iter", "cosine", "n_local_trials", "chunk_size",
           "special_k2")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _kmeans_jit(x, w, key, init_centroids, tol, **cfg):
  return _kmeans_single(x, w, key, init_centroids, tol, **cfg)


@functools.partial(jax.jit, static_argnames=_STATIC + ("batch_size", "shared_init"))
def _batched_jit(x, w, keys, init_centroids, tol, *, batch_size, shared_init, **cfg):
  def one(args):
    xi, wi, ki, ci = args
    return _kmeans_single(xi, wi, ki, init_centroids if shared_init else ci, tol, **cfg)
  ci = jnp.zeros((x.shape[0],), jnp.float32) if shared_init else init_centroids
  if batch_size is None or batch_size >= x.shape[0]:
    return jax.vmap(one)((x, w, keys, ci))
  if batch_size == 1:
    return jax.lax.map(one, (x, w, keys, ci))       # a plain loop: no vmapped while_loop
  return jax.lax.map(one, (x, w, keys, ci), batch_size=batch_size)


def _check_points(points, name: str, ndim: int):
  shape = getattr(points, "shape", None)
  if shape is None or len(shape) != ndim:
    want = "[N, D]" if ndim == 2 else "[B, N, D]"
    raise ValueError(f"kmeans: `{name}` must be a {ndim}-d array {want}, got shape {shape}")


def _resolve_init(init, k: int, d: int, lead: tuple = ()):
  """-> (init_mode, init_array or None). Arrays must be [*lead?, k, D]."""
  if isinstance(init, str):
    if init not in ("k-means++", "random"):
      raise ValueError(f"kmeans: unknown init {init!r}; expected 'k-means++', 'random' or an "
                       f"array of shape [k, D] = [{k}, {d}]")
    return init, None
  arr = jnp.asarray(init, jnp.float32)
  if arr.shape != (k, d) and arr.shape != tuple(lead) + (k, d):
    raise ValueError(f"kmeans: `init` array has shape {arr.shape}, expected [k, D] = "
                     f"{(k, d)}" + (f" or {tuple(lead) + (k, d)}" if lead else ""))
  return "array", arr


def _check_k(k, n_points: int, where: str):
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{where}: `k` must be a positive int, got {k!r}")
  if k > n_points:
    raise ValueError(f"{where}: cannot make k={k} clusters from {n_points} points")


def kmeans(points, k: int, *, key, mask=None, weights=None, init: Init = "k-means++",
           n_init: int = 1, max_iter: int = 100, tol: float = 1e-4, cosine: bool = False,
           n_local_trials: Optional[int] = None,
           chunk_size: Optional[int] = None) -> KMeansResult:
  """Masked, weighted k-means (Lloyd + greedy k-means++) of one point set.

  Minimises :math:`\\sum_{i: m_i} w_i \\min_j \\lVert x_i - c_j \\rVert^2`. Jit-compiled; the
  configuration (`k`, `init` kind, `n_init`, `max_iter`, `cosine`) is static, so one compile
  serves every point set of the same shape. Also callable inside `jax.jit` / `jax.vmap`.

  Args:
    points: [N, D] float array.
    k: number of clusters (static), 1 <= k <= N.
    key: PRNG key (typed `jax.random.key` or raw uint32 [2]). The result is deterministic
      given the key, and appending masked rows (padding) does not change it (the random
      draws of point i do not depend on N).
    mask: optional [N] bool; False = padding, ignored everywhere (assignment -1).
    weights: optional [N] float sample weights (> 0; weight <= 0 acts like mask False).
    init: "k-means++" (default), "random" (k distinct valid points ~ w) or an array [k, D]
      of initial centroids (then `n_init` is ignored, as in scikit-learn).
    n_init: independent seedings (vmapped); the run with the lowest inertia is returned.
    max_iter: maximum Lloyd iterations per run.
    tol: relative tolerance: stop when the total squared centroid shift <= tol * mean_d Var(x_d)
      (scikit-learn's convention), or when no label changes.
    cosine: L2-normalise the points first (squared Euclidean on the sphere = 2 - 2 cos); the
      centroids are plain means of the normalised points (not re-projected).
    n_local_trials: k-means++ candidates per step; default 2 + floor(log k) (scikit-learn).
    chunk_size: for large N: every Lloyd pass runs over blocks of this many rows (a block
      stays in cache; no [N, k] temporary). ~4096 is a good value on CPU. With `cosine`, the
      blocks are normalised on the fly, but the seeding still builds one normalised copy;
      pass pre-normalised points with cosine=False for the smallest footprint.

  Returns:
    KMeansResult(centroids [k, D], assignment [N] int32 (-1 masked), inertia scalar,
    iterations int32, converged bool).

  Example:
    >>> x = jnp.concatenate([jnp.zeros((5, 2)), jnp.ones((5, 2))])
    >>> kmeans(x, 2, key=jax.random.key(0)).inertia
    Array(0., dtype=float32)
  """
  _check_points(points, "points", 2)
  n, d = points.shape
  _check_k(k, n, "kmeans")
  if mask is not None and jnp.shape(mask) != (n,):
    raise ValueError(f"kmeans: `mask` has shape {jnp.shape(mask)}, expected [N] = ({n},)")
  if weights is not None and jnp.shape(weights) != (n,):
    raise ValueError(f"kmeans: `weights` has shape {jnp.shape(weights)}, expected ({n},)")
  init_mode, init_arr = _resolve_init(init, k, d)
  if init_mode == "array":
    n_init = 1
  w = _effective_weights(n, mask, weights)
  return _kmeans_jit(
      points, w, key, init_arr, jnp.float32(tol), k=int(k), init_mode=init_mode,
      n_init=int(n_init), max_iter=int(max_iter), cosine=bool(cosine),
      n_local_trials=_n_local_trials(k, n_local_trials),
      chunk_size=None if chunk_size is None else int(chunk_size))


def batched_kmeans(points, k: int, *, keys, mask=None, weights=None, init: Init = "k-means++",
                   n_init: int = 1, max_iter: int = 100, tol: float = 1e-4,
                   cosine: bool = False, n_local_trials: Optional[int] = None,
                   batch_size: Union[int, None, str] = "auto") -> KMeansResult:
  """`kmeans` of B independent point sets of a padded batch in one compiled call.

  Set b is `points[b][mask[b]]`; padding rows never influence its result, so the result of a
  set does not depend on the batch it is in or on how much it was padded (given its key).

  Args:
    points: [B, N, D] float array (ragged sets padded to N).
    k: clusters per set (static).
    keys: [B] typed keys or [B, 2] raw keys, one per set; use
      `jax.random.fold_in(key, image_index)` so results do not depend on batch order.
    mask: optional [B, N] bool validity mask.
    weights: optional [B, N] float weights.
    init: "k-means++", "random", or an array [k, D] (shared) or [B, k, D] (per set).
    n_init, max_iter, tol, cosine, n_local_trials: as in `kmeans`.
    batch_size: sets per step. None vmaps all B sets at once: every Lloyd step then touches
      the whole batch until the slowest set stops (best on GPU / TPU). An int runs `lax.map`
      over chunks of that many sets: each set's data stays in cache and each chunk stops
      with its own slowest set (1 = one set at a time, ~4x faster on CPU for 3136 x 384
      sets). Default "auto": 1 on the CPU backend, None otherwise.
      With k=2 (and no chunking) every set runs the specialised `_two_means` Lloyd (same
      result as the general path up to float32 rounding; ~1.5x faster on CPU for
      3136 x 384 sets, see benchmarks/kmeans.py).

  Returns:
    KMeansResult with a leading B axis: centroids [B, k, D], assignment [B, N], inertia [B],
    iterations [B], converged [B].

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (4, 100, 8))
    >>> keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(4))
    >>> batched_kmeans(x, 2, keys=keys).centroids.shape
    (4, 2, 8)
  """
  _check_points(points, "points", 3)
  b, n, d = points.shape
  _check_k(k, n, "batched_kmeans")
  if mask is not None and jnp.shape(mask) != (b, n):
    raise ValueError(f"batched_kmeans: `mask` has shape {jnp.shape(mask)}, expected {(b, n)}")
  if weights is not None and jnp.shape(weights) != (b, n):
    raise ValueError(f"batched_kmeans: `weights` has shape {jnp.shape(weights)}, "
                     f"expected {(b, n)}")
  if jnp.shape(keys)[0] != b:
    raise ValueError(f"batched_kmeans: `keys` has {jnp.shape(keys)[0]} keys for {b} sets")
  init_mode, init_arr = _resolve_init(init, k, d, (b,))
  shared = init_arr is None or init_arr.ndim == 2
  if batch_size == "auto":
    batch_size = 1 if jax.default_backend() == "cpu" else None
  elif batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
    raise ValueError(f"batched_kmeans: `batch_size` must be None, 'auto' or a positive int, "
                     f"got {batch_size!r}")
  if init_mode == "array":
    n_init = 1
  w = _effective_weights(b * n, None if mask is None else jnp.reshape(mask, (-1,)),
                         None if weights is None else jnp.reshape(weights, (-1,)))
  return _batched_jit(
      points, w.reshape(b, n), keys, init_arr, jnp.float32(tol), batch_size=batch_size,
      shared_init=shared, k=int(k), init_mode=init_mode, n_init=int(n_init),
      max_iter=int(max_iter), cosine=bool(cosine),
      n_local_trials=_n_local_trials(k, n_local_trials), chunk_size=None)


# ----------------------------------------------------------------------------------------------
# Many groups at once.


def _segment_argmax(scores, gid, num_groups: int):
  """Per group: index of the largest score (lowest index on ties) and whether it is finite."""
  n = scores.shape[0]
  best = jax.ops.segment_max(scores, gid, num_segments=num_groups)
  cand = jnp.where(scores == best[gid], jnp.arange(n), n)
  idx = jax.ops.segment_min(cand, gid, num_segments=num_groups)
  return jnp.clip(idx, 0, n - 1), jnp.isfinite(best)


def _own_group_dists(x, x_sq, gid, c_groups):
  """Squared distances [n, m] from every point to the m centroids of its own group.

  c_groups: [G, m, D]. Computed as one matmul against all G*m centroids followed by a gather,
  cheaper than gathering [n, m, D] centroid copies when G*m is moderate.
  """
  g, m, d = c_groups.shape
  dd = _sq_dists(x, x_sq, c_groups.reshape(g * m, d)).reshape(-1, g, m)
  return jnp.take_along_axis(dd, gid[:, None, None], axis=1)[:, 0]


def _grouped_kpp(key, x, x_sq, w, gid, num_groups: int, k: int, n_local_trials: int):
  """k-means++ run independently inside every group -> centroids [G, k, D]."""
  logw = _masked_logits(w)
  key, sub = jax.random.split(key)
  first, _ = _segment_argmax(logw + jax.random.gumbel(sub, w.shape), gid, num_groups)
  c0 = x[first]                                                        # [G, D]
  closest = _own_group_dists(x, x_sq, gid, c0[:, None])[:, 0]
  centroids = jnp.zeros((num_groups, k, x.shape[1]), x.dtype).at[:, 0].set(c0)
  t = n_local_trials

  def body(i, carry):
    centroids, closest, key = carry
    key, sub = jax.random.split(key)
    pot = w * closest
    has_pot = jax.ops.segment_sum(pot, gid, num_segments=num_groups) > 0
    logits = jnp.where(has_pot[gid], _masked_logits(pot), logw)
    noise = jax.vmap(lambda kk: jax.random.gumbel(kk, w.shape))(jax.random.split(sub, t))
    scores = logits[None, :] + noise
    cand, _ = jax.vmap(lambda s: _segment_argmax(s, gid, num_groups))(scores)   # [T, G]
    xc = jnp.swapaxes(x[cand], 0, 1)                                   # [G, T, D]
    d = jnp.minimum(_own_group_dists(x, x_sq, gid, xc), closest[:, None])        # [N, T]
    cpot = jax.ops.segment_sum(w[:, None] * d, gid, num_segments=num_groups)     # [G, T]
    best = jnp.argmin(cpot, axis=1)                                    # [G]
    chosen = jnp.take_along_axis(xc, best[:, None, None], axis=1)[:, 0]
    closest = jnp.take_along_axis(d, best[gid][:, None], axis=1)[:, 0]
    return centroids.at[:, i].set(chosen), closest, key

  centroids, _, _ = jax.lax.fori_loop(1, k, body, (centroids, closest, key))
  return centroids


def _grouped_random_init(key, x, w, gid, num_groups: int, k: int):
  """k distinct valid points per group, drawn ~ w (k successive Gumbel argmaxes)."""
  scores = _masked_logits(w) + jax.random.gumbel(key, w.shape)
  picks = []
  for _ in range(k):
    idx, ok = _segment_argmax(scores, gid, num_groups)
    picks.append(jnp.where(ok, idx, -1))
    scores = scores.at[idx].set(jnp.where(ok, -jnp.inf, scores[idx]))
  picks = jnp.stack(picks, axis=1)                                     # [G, k]
  picks = jnp.where(picks >= 0, picks, picks[:, :1])
  return x[jnp.clip(picks, 0, x.shape[0] - 1)]


def _grouped_relocate(x, w, gid, labels, dist, sums, counts):
  """Per-group version of `_relocate_empty` (sums [G, k, D], counts [G, k])."""
  g, k, d = sums.shape
  scores = jnp.where(w > 0, dist, -jnp.inf)
  far, far_ok = [], []
  for _ in range(k):
    idx, ok = _segment_argmax(scores, gid, g)
    far.append(idx)
    far_ok.append(ok)
    scores = scores.at[idx].set(jnp.where(ok, -jnp.inf, scores[idx]))
  far, far_ok = jnp.stack(far, 1), jnp.stack(far_ok, 1)               # [G, k]
  empty = counts <= 0
  rank = jnp.cumsum(empty, axis=1) - 1
  r = jnp.clip(rank, 0, k - 1)
  src = jnp.take_along_axis(far, r, axis=1)
  ok = empty & jnp.take_along_axis(far_ok, r, axis=1)
  ws = jnp.where(ok, w[src], 0.0)                                      # [G, k]
  moved = x[src] * ws[..., None]                                       # [G, k, D]
  old = (gid[src] * k + labels[src]).reshape(-1)
  sums = sums - jax.ops.segment_sum(moved.reshape(-1, d), old, num_segments=g * k).reshape(g, k, d)
  counts = counts - jax.ops.segment_sum(ws.reshape(-1), old, num_segments=g * k).reshape(g, k)
  return jnp.where(ok[..., None], moved, sums), jnp.where(ok, ws, counts)


def _grouped_single(x, w, gid, key, init_centroids, tol, *, num_groups: int, k: int,
                    init_mode: str, max_iter: int, cosine: bool, n_local_trials: int):
  g = num_groups
  x = x.astype(jnp.float32)
  if cosine:
    x = l2_normalize(x)
  x_sq = jnp.sum(x * x, axis=-1)
  valid = w > 0
  vf = valid.astype(jnp.float32)
  n_g = jax.ops.segment_sum(vf, gid, num_segments=g)
  mean_g = jax.ops.segment_sum(x * vf[:, None], gid, num_segments=g) / jnp.maximum(n_g, 1)[:, None]
  ex2 = jax.ops.segment_sum(vf * x_sq, gid, num_segments=g) / jnp.maximum(n_g, 1)
  tol_abs = tol * jnp.maximum(ex2 - jnp.sum(mean_g * mean_g, -1), 0.0) / x.shape[-1]   # [G]

  if init_mode == "k-means++":
    c0 = _grouped_kpp(key, x, x_sq, w, gid, g, k, n_local_trials)
  elif init_mode == "random":
    c0 = _grouped_random_init(key, x, w, gid, g, k)
  else:
    c0 = init_centroids.astype(jnp.float32)
  c0 = jnp.where((n_g > 0)[:, None, None], c0, 0.0)

  def estep(c):
    d = _own_group_dists(x, x_sq, gid, c)
    return jnp.argmin(d, axis=1).astype(jnp.int32), jnp.min(d, axis=1)

  def cond(s):
    it, _, _, done = s
    return jnp.any(~done) & (jnp.max(it) < max_iter)

  def body(s):
    it, c, prev, done = s
    labels, dist = estep(c)
    sums, counts = _cluster_sums(x, w, gid * k + labels, g * k)
    sums, counts = sums.reshape(g, k, -1), counts.reshape(g, k)
    sums, counts = jax.lax.cond(
        jnp.any((counts <= 0) & ~done[:, None]), _grouped_relocate,
        lambda *a: (a[-2], a[-1]), x, w, gid, labels, dist, sums, counts)
    new = jnp.where(counts[..., None] > 0,
                    sums / jnp.where(counts > 0, counts, 1.0)[..., None], c)
    changed = jax.ops.segment_max(((labels != prev) & valid).astype(jnp.int32), gid,
                                  num_segments=g) > 0
    shift = jnp.sum((new - c) ** 2, axis=(1, 2))
    new = jnp.where(done[:, None, None], c, new)       # a stopped group stays frozen
    return (it + (~done).astype(jnp.int32), new, labels,
            done | ~changed | (shift <= tol_abs))

  done0 = n_g <= 0
  init = (jnp.zeros((g,), jnp.int32), c0, jnp.full(w.shape, -1, jnp.int32), done0)
  it, c, _, done = jax.lax.while_loop(cond, body, init)
  labels, dist = estep(c)
  inertia = jax.ops.segment_sum(w * dist, gid, num_segments=g)
  return KMeansResult(c, jnp.where(valid, labels, -1), inertia, it, done & (n_g > 0))


@functools.partial(jax.jit, static_argnames=(
    "num_groups", "k", "init_mode", "n_init", "max_iter", "cosine", "n_local_trials"))
def _grouped_jit(x, w, gid, key, init_centroids, tol, *, n_init, **cfg):
  if n_init == 1:
    return _grouped_single(x, w, gid, key, init_centroids, tol, **cfg)
  runs = jax.vmap(lambda kk: _grouped_single(x, w, gid, kk, init_centroids, tol, **cfg))(
      jax.random.split(key, n_init))
  best = jnp.argmin(runs.inertia, axis=0)                               # per group
  g = cfg["num_groups"]
  pick = lambda a: a[best, jnp.arange(g)]
  best_of_point = best[gid]
  assignment = jnp.take_along_axis(runs.assignment, best_of_point[None], axis=0)[0]
  return KMeansResult(pick(runs.centroids), assignment, pick(runs.inertia),
                      pick(runs.iterations), pick(runs.converged))


def grouped_kmeans(points, group_ids, num_groups: int, k: int, *, key, mask=None,
                   weights=None, init: Init = "k-means++", n_init: int = 1,
                   max_iter: int = 100, tol: float = 1e-4, cosine: bool = False,
                   n_local_trials: Optional[int] = None) -> KMeansResult:
  """Independent k-means inside each of `num_groups` groups of points, in one compiled call.

  Group g is `{i : group_ids[i] == g, mask[i]}`; its k centroids are fitted only to its own
  points. Implemented as one Lloyd loop over a centroid table [G, k, D]: every point is
  compared with the k centroids of its own group (one matmul against all G*k centroids plus a
  gather), the sums come from a segment sum over `group * k + cluster`, and each group stops by
  its own stopping rule (stopped groups stay frozen), so the result of a group equals `kmeans`
  on that group alone with the same initial centroids. Cost per iteration O(N * G * k * D).

  Args:
    points: [N, D] float array.
    group_ids: [N] int, values in [0, num_groups); ids outside the range act as masked.
    num_groups: G (static). Groups with no valid point get zero centroids, inertia 0 and
      converged False.
    k: clusters per group (static). A group with fewer than k valid points keeps duplicate
      or empty clusters.
    key: PRNG key. Seeding inside the groups is independent, but (unlike per-group `kmeans`
      calls) draws from one key, so it is not bitwise the same as a loop of `kmeans` calls.
    mask, weights, n_init, max_iter, tol, cosine, n_local_trials: as in `kmeans`; with
      `n_init > 1` the best run is chosen per group.
    init: "k-means++", "random" or an array [G, k, D].

  Returns:
    KMeansResult(centroids [G, k, D], assignment [N] int32 (cluster within the point's group,
    -1 masked), inertia [G], iterations [G], converged [G]).

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (300, 4))
    >>> gid = jnp.arange(300) % 3
    >>> grouped_kmeans(x, gid, 3, 2, key=jax.random.key(1)).centroids.shape
    (3, 2, 4)
  """
  _check_points(points, "points", 2)
  n, d = points.shape
  if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
    raise ValueError(f"grouped_kmeans: `num_groups` must be a positive int, got {num_groups!r}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"grouped_kmeans: `k` must be a positive int, got {k!r}")
  if jnp.shape(group_ids) != (n,):
    raise ValueError(f"grouped_kmeans: `group_ids` has shape {jnp.shape(group_ids)}, "
                     f"expected ({n},)")
  if isinstance(init, str):
    init_mode, init_arr = _resolve_init(init, k, d)
  else:
    init_arr = jnp.asarray(init, jnp.float32)
    if init_arr.shape != (num_groups, k, d):
      raise ValueError(f"grouped_kmeans: `init` array has shape {init_arr.shape}, expected "
                       f"[G, k, D] = {(num_groups, k, d)}")
    init_mode, n_init = "array", 1
  gid = jnp.asarray(group_ids, jnp.int32)
  in_range = (gid >= 0) & (gid < num_groups)
  m = in_range if mask is None else in_range & jnp.asarray(mask, bool)
  w = _effective_weights(n, m, weights)
  return _grouped_jit(
      points, w, jnp.clip(gid, 0, num_groups - 1), key, init_arr, jnp.float32(tol),
      num_groups=int(num_groups), k=int(k), init_mode=init_mode, n_init=int(n_init),
      max_iter=int(max_iter), cosine=bool(cosine),
      n_local_trials=_n_local_trials(k, n_local_trials))


# ----------------------------------------------------------------------------------------------
# Dataset scale: pure per-chunk kernels and host-side drivers.


def lloyd_statistics(points, mask, centroids, *, weights=None, cosine: bool = False,
                     axis_name=None, chunk_size: Optional[int] = None):
  """Sufficient statistics of one Lloyd step on a chunk of points.

  A full Lloyd pass over a dataset split into chunks is the sum of the chunks' statistics,
  followed by `centroids = sums / counts`:

  .. math::

    S_j = \\sum_{i: a_i = j} w_i x_i, \\quad n_j = \\sum_{i: a_i = j} w_i, \\quad
    J = \\sum_i w_i \\lVert x_i - c_{a_i} \\rVert^2, \\quad
    a_i = \\arg\\min_j \\lVert x_i - c_j \\rVert.

  Pure and free of host callbacks, so it runs inside `jax.jit`, `jax.vmap` and
  `jax.shard_map`; pass `axis_name` to `psum` the statistics over a mapped axis.

  Args:
    points: [n, D] float chunk.
    mask: [n] bool or None (all valid).
    centroids: [k, D] float32 current centroids.
    weights: optional [n] float weights.
    cosine: L2-normalise the points first.
    axis_name: optional mapped axis name (or tuple) to `psum` over (shard_map / pmap).
    chunk_size: process the rows in cache-sized blocks of this many rows (see `kmeans`).

  Returns:
    (sums [k, D] float32, counts [k] float32 (sums of weights), inertia float32 scalar) — the
    inertia is measured against the *given* centroids.

  Example (data-parallel Lloyd step over a 1-d mesh):
    >>> step = jax.shard_map(
    ...     lambda x, m, c: lloyd_statistics(x, m, c, axis_name="data"), mesh=mesh,
    ...     in_specs=(P("data"), P("data"), P()), out_specs=(P(), P(), P()))
    >>> sums, counts, _ = step(x, m, c); c = sums / counts[:, None]
  """
  w = _effective_weights(points.shape[0], mask, weights)
  p = _pass(points, w, jnp.asarray(centroids, jnp.float32), chunk=chunk_size, cosine=cosine)
  out = (p.sums, p.counts, p.inertia)
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


def grouped_lloyd_statistics(points, group_ids, mask, centroids, *, weights=None,
                             cosine: bool = False, axis_name=None):
  """`lloyd_statistics` for grouped k-means (centroids [G, k, D]).

  Returns:
    (sums [G, k, D], counts [G, k], inertia [G]), `psum`-ed over `axis_name` if given.
  """
  g, k, _ = centroids.shape
  gid = jnp.asarray(group_ids, jnp.int32)
  in_range = (gid >= 0) & (gid < g)
  m = in_range if mask is None else in_range & jnp.asarray(mask, bool)
  gid = jnp.clip(gid, 0, g - 1)
  w = _effective_weights(points.shape[0], m, weights)
  x = points.astype(jnp.float32)
  if cosine:
    x = l2_normalize(x)
  x_sq = jnp.sum(x * x, axis=-1)
  d = _own_group_dists(x, x_sq, gid, jnp.asarray(centroids, jnp.float32))
  labels = jnp.argmin(d, axis=1)
  sums, counts = _cluster_sums(x, w, gid * k + labels, g * k)
  inertia = jax.ops.segment_sum(w * jnp.min(d, axis=1), gid, num_segments=g)
  out = (sums.reshape(g, k, -1), counts.reshape(g, k), inertia)
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


@functools.partial(jax.jit, static_argnames=("cosine", "chunk"))
def _block_pass(x, w, centroids, prev_labels, *, cosine, chunk):
  """Jitted per-block Lloyd statistics + labels (host drivers call this once per block)."""
  p = _pass(x, w, centroids, chunk=chunk, cosine=cosine)
  valid = w > 0
  labels = jnp.where(valid, p.labels, -1)
  changed = jnp.sum((labels != prev_labels) & valid)
  return p.sums, p.counts, p.inertia, labels, jnp.where(valid, p.dist, 0.0), changed


@functools.partial(jax.jit, static_argnames=("cosine", "chunk"))
def _block_assign(x, w, centroids, *, cosine, chunk):
  p = _pass(x, w, centroids, chunk=chunk, cosine=cosine, stats=False)
  valid = w > 0
  return jnp.where(valid, p.labels, -1), jnp.where(valid, p.dist, 0.0)


def _host_blocks(points, mask, weights, block: int):
  """Yields (x [b, D], w [b], dup) blocks of an [N, D] array without copying it.

  Every block has `block` rows (one compiled shape) except when N < block. The last block is
  the final `block` rows, overlapping its predecessor: its first `dup` rows were already
  seen and get weight 0 (so no padded copy of the data is ever made). On CPU a 64-byte
  aligned C-contiguous NumPy array is then used by jax in place.
  """
  n = points.shape[0]
  block = min(block, n)
  for s in range(0, n, block):
    e = min(s + block, n)
    start = e - block
    x = points[start:e]
    if weights is None:
      w = np.ones((block,), np.float32)
    else:
      w = np.asarray(weights[start:e], np.float32).copy()
    if mask is not None:
      w = np.where(np.asarray(mask[start:e], bool), w, 0.0).astype(np.float32)
    w[:s - start] = 0.0
    yield x, w, s - start


def assign(points, centroids, *, mask=None, chunk_size: Optional[int] = None,
           cosine: bool = False, block_size: int = 1 << 18):
  """Nearest-centroid assignment of every point, optionally in chunks to bound memory.

  Args:
    points: [N, D] float array. A jax array (or a tracer inside jit) is processed in-graph
      over blocks of `chunk_size` rows; a host NumPy array larger than `block_size` rows is
      streamed block by block (never copied whole to the device).
    centroids: [k, D] float.
    mask: optional [N] bool; masked points get assignment -1 and distance 0.
    chunk_size: rows per in-graph block (None: all at once). Extra memory ~ chunk_size * k.
    cosine: L2-normalise the points first.
    block_size: rows per host block for NumPy input (the blocks are views, not copies).

  Returns:
    (assignment [N] int32, sq_dist [N] float32 squared distance to the assigned centroid).

  Example:
    >>> a, d = assign(jnp.eye(3), jnp.eye(3)[:2])
    >>> a
    Array([0, 1, 0], dtype=int32)
  """
  _check_points(points, "points", 2)
  n = points.shape[0]
  c = jnp.asarray(centroids, jnp.float32)
  if c.ndim != 2 or c.shape[1] != points.shape[1]:
    raise ValueError(f"assign: `centroids` has shape {c.shape}, expected [k, {points.shape[1]}]")
  if mask is not None and np.shape(mask) != (n,):
    raise ValueError(f"assign: `mask` has shape {np.shape(mask)}, expected ({n},)")
  if isinstance(points, np.ndarray) and n > block_size:
    labels, dists = [], []
    for x, w, dup in _host_blocks(points, mask, None, block_size):
      a, d = _block_assign(x, w, c, cosine=cosine, chunk=chunk_size)
      labels.append(a[dup:])
      dists.append(d[dup:])
    return jnp.concatenate(labels)[:n], jnp.concatenate(dists)[:n]
  return _block_assign(points, _effective_weights(n, mask, None), c, cosine=cosine,
                       chunk=chunk_size)


def sample_indices(n: int, sample_size: int, *, key, mask=None) -> np.ndarray:
  """Sorted indices of a uniform random subset (without replacement) of the valid points.

  Args:
    n: number of points.
    sample_size: subset size (clipped to the number of valid points).
    key: PRNG key; the subset is a deterministic function of key, n and mask.
    mask: optional [n] bool; only True points are drawn.

  Returns:
    [min(sample_size, n_valid)] int64 NumPy array, increasing.
  """
  prio = np.asarray(jax.random.uniform(key, (n,)))
  if mask is not None:
    prio = np.where(np.asarray(mask, bool), prio, np.inf)
  n_valid = int(np.isfinite(prio).sum())
  s = min(int(sample_size), n_valid)
  if s <= 0:
    raise ValueError("sample_indices: no valid point to sample from")
  idx = np.argpartition(prio, s - 1)[:s] if s < n else np.arange(n)
  return np.sort(idx[np.isfinite(prio[idx])])


def _reseed_from_sample(centroids, counts, sample, s_sq):
  """Empty clusters take the sample points farthest from their nearest centroid."""
  _, dist = _estep(sample, s_sq, centroids)
  empty = np.flatnonzero(np.asarray(counts) <= 0)
  far = np.argsort(-np.asarray(dist))[:len(empty)]
  return centroids.at[jnp.asarray(empty[:len(far)])].set(sample[jnp.asarray(far)])


def _stream_lloyd(make_blocks, centroids, *, epochs: int, tol_abs: float, cosine: bool,
                  chunk: Optional[int], sample, sample_sq, method: str = "lloyd"):
  """Lloyd (or mini-batch) epochs over a re-iterable stream of (x, w) blocks on the host.

  Returns (centroids, info) with info = dict(epochs, shifts, inertia, converged).
  """
  k = centroids.shape[0]
  prev = {}
  shifts, inertias = [], []
  running = jnp.zeros((k,), jnp.float32)
  converged = False
  epoch = 0
  for epoch in range(1, epochs + 1):
    sums = jnp.zeros_like(centroids)
    counts = jnp.zeros((k,), jnp.float32)
    inertia = jnp.float32(0)
    changed = 0
    new = centroids
    for b, (x, w, _) in enumerate(make_blocks()):
      p_lab = prev.get(b)
      if p_lab is None or p_lab.shape[0] != x.shape[0]:
        p_lab = jnp.full((x.shape[0],), -2, jnp.int32)
      cur = centroids if method == "lloyd" else new
      s, c, j, labels, _, ch = _block_pass(x, w, cur, p_lab, cosine=cosine, chunk=chunk)
      prev[b] = labels
      changed = changed + ch
      inertia = inertia + j
      if method == "lloyd":
        sums, counts = sums + s, counts + c
      else:
        # Sculley's update with per-centre learning rate 1 / (points seen so far).
        running = running + c
        step = jnp.where(running > 0, 1.0 / jnp.maximum(running, 1e-30), 0.0)
        new = new + step[:, None] * (s - c[:, None] * new)
    if method == "lloyd":
      new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1e-30)[:, None],
                      centroids)
      if bool(jnp.any(counts <= 0)) and sample is not None:
        new = _reseed_from_sample(new, counts, sample, sample_sq)
    shift = float(jnp.sum((new - centroids) ** 2))
    shifts.append(shift)
    inertias.append(float(inertia))
    centroids = new
    if method == "lloyd" and (int(changed) == 0 or shift <= tol_abs):
      converged = True
      break
  return centroids, dict(epochs=epoch, shifts=shifts, inertia=inertias, converged=converged)


def _array_blocks(points, mask, weights, block: int):
  """A zero-argument callable streaming an [N, D] array as (x, w, dup) blocks."""
  if isinstance(points, np.ndarray):
    return lambda: _host_blocks(points, mask, weights, block)
  n = points.shape[0]
  w_all = _effective_weights(n, mask, weights)
  block = min(block, n)

  def gen():
    for s in range(0, n, block):
      e = min(s + block, n)
      start = e - block
      w = w_all[start:e]
      yield points[start:e], jnp.where(jnp.arange(block) >= s - start, w, 0.0), s - start
  return gen


def kmeans_on_sample(points, k: int, *, key, sample_size: int = 100_000, mask=None,
                     weights=None, refine_iters: int = 0, chunk_size: int = 4096,
                     block_size: int = 1 << 18, return_info: bool = False,
                     **kmeans_kwargs) -> KMeansResult:
  """k-means fitted on a uniform random sample, then every point assigned (dataset level).

  METHOD.md step 4 with `dataset_fit_patches`: the centroids are those of `kmeans` on
  `sample_size` valid points drawn uniformly without replacement; optionally refined by
  `refine_iters` exact Lloyd passes over all points; then all N points are assigned. A host
  NumPy array is streamed in blocks of `block_size` rows (never copied whole to the device;
  on CPU an aligned array is not copied at all); memory beyond the data is O(block + N ints).

  Args:
    points: [N, D] float (NumPy or jax array).
    k: number of clusters.
    key: PRNG key (split into a sampling key and a fitting key).
    sample_size: number of points the centroids are fitted on (>= N means all points).
    mask: optional [N] bool validity.
    weights: optional [N] weights (used in the fit and in the reported inertia).
    refine_iters: full-data Lloyd iterations after the sample fit (stopping rule as `kmeans`,
      tolerance scaled by the variance of the sample).
    chunk_size: rows per cache-sized block inside a pass.
    block_size: rows per host block.
    return_info: also return dict(sample_iterations, refine_epochs, refine_shifts).
    **kmeans_kwargs: forwarded to `kmeans` on the sample (init, n_init, max_iter, tol,
      cosine, n_local_trials).

  Returns:
    KMeansResult: centroids [k, D], assignment [N] (every point), inertia over all N valid
    points w.r.t. the returned centroids, iterations (sample fit + refinement passes),
    converged (of the last stage run); or (result, info) with `return_info`.
  """
  _check_points(points, "points", 2)
  n = points.shape[0]
  cosine = bool(kmeans_kwargs.get("cosine", False))
  k_sample, k_fit = jax.random.split(key)
  idx = sample_indices(n, sample_size, key=k_sample, mask=mask)
  if isinstance(points, np.ndarray):
    sample = points[idx]
  else:
    sample = jnp.take(points, jnp.asarray(idx), axis=0)
  w_sample = None if weights is None else np.asarray(weights)[idx]
  fit = kmeans(sample, k, key=k_fit, weights=w_sample, chunk_size=chunk_size, **kmeans_kwargs)
  centroids, iterations, converged = fit.centroids, fit.iterations, fit.converged
  make_blocks = _array_blocks(points, mask, weights, block_size)
  info = dict(sample_iterations=int(fit.iterations), refine_epochs=0, refine_shifts=[])
  if refine_iters > 0:
    s = jnp.asarray(sample, jnp.float32)
    s = l2_normalize(s) if cosine else s
    s_sq = jnp.sum(s * s, -1)
    tol_abs = float(_tolerance(s, s_sq, jnp.ones(s_sq.shape, bool),
                               kmeans_kwargs.get("tol", 1e-4)))
    centroids, info = _stream_lloyd(make_blocks, centroids, epochs=int(refine_iters),
                                    tol_abs=tol_abs, cosine=cosine, chunk=chunk_size,
                                    sample=s, sample_sq=s_sq)
    iterations = iterations + info["epochs"]
    converged = jnp.asarray(info["converged"])
    info = dict(sample_iterations=int(fit.iterations), refine_epochs=info["epochs"],
                refine_shifts=info["shifts"])
  labels, inertia = [], jnp.float32(0)
  for x, w, dup in make_blocks():
    a, d = _block_assign(x, w, centroids, cosine=cosine, chunk=chunk_size)
    labels.append(a[dup:])
    inertia = inertia + jnp.sum(w * d)
  res = KMeansResult(centroids, jnp.concatenate(labels)[:n], inertia,
                     jnp.asarray(iterations, jnp.int32), jnp.asarray(converged))
  return (res, info) if return_info else res


def _as_batch(item):
  """A stream item -> (points [n, D], w [n] float32 with 0 for masked rows)."""
  if isinstance(item, (tuple, list)):
    if len(item) != 2:
      raise ValueError("fit_streaming: a batch must be `points` or `(points, mask)`, got a "
                       f"{len(item)}-tuple")
    x, m = item
    m = None if m is None else np.asarray(m, bool)
  else:
    x, m = item, None
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"fit_streaming: batch points must be [n, D], got shape "
                     f"{getattr(x, 'shape', None)}")
  n = x.shape[0]
  if m is not None and m.shape != (n,):
    raise ValueError(f"fit_streaming: batch mask has shape {m.shape}, expected ({n},)")
  w = np.ones((n,), np.float32) if m is None else m.astype(np.float32)
  return x, w


def _bucket(n: int, minimum: int = 1024) -> int:
  """Padded batch length: next power of two (bounded number of compiled shapes)."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _pad_batch(x, w, size: int):
  if x.shape[0] == size:
    return x, w
  pad = size - x.shape[0]
  xp = np if isinstance(x, np.ndarray) else jnp
  return (xp.concatenate([x, xp.zeros((pad, x.shape[1]), x.dtype)]),
          np.concatenate([np.asarray(w), np.zeros((pad,), np.float32)]))


def fit_streaming(batches, k: int, *, key, init: Init = "k-means++",
                  init_sample_size: int = 65_536, epochs: int = 10, tol: float = 1e-4,
                  cosine: bool = False, method: str = "lloyd", chunk_size: int = 4096,
                  block_size: int = 1 << 18, n_init: int = 1, sample_max_iter: int = 100,
                  return_info: bool = False, init_sample: Optional[int] = None,
                  max_iter: Optional[int] = None):
  """k-means over data that need not fit in memory at once (dataset level).

  1. Seeding: a uniform sample of `init_sample_size` valid points (reservoir sampling over one
     pass of the stream, or direct sampling for an array) is clustered with `kmeans`
     (k-means++ + Lloyd on the sample); or `init` is an array [k, D] (no sampling pass).
  2. `method="lloyd"` (default, exact): each epoch is one full Lloyd step over the stream,
     summing `lloyd_statistics` of every batch, then `c_j = S_j / n_j`. This is exactly
     Lloyd's algorithm on the concatenated data, whatever the batching. An empty cluster is
     re-seeded with the sample point farthest from its centroid. Stops after `epochs` passes,
     when no label changed, or when the squared centroid shift <= tol * mean_d Var(x_d)
     (variance of the sample). `method="minibatch"`: Sculley's per-batch update
     `c_j += (S_j - n_j c_j) / N_j` with running counts N_j, for `epochs` passes.

  Args:
    batches: the data: an [N, D] array (NumPy or jax; streamed in `block_size` blocks), a
      sequence of batches, or a zero-argument callable returning a fresh iterable of batches
      (needed for several passes over a generator). A batch is `points [n, D]` or
      `(points, mask [n])`; batches are zero-padded to power-of-two lengths (few compiles).
    k: number of clusters.
    key: PRNG key.
    init: "k-means++" / "random" (seeding on the sample) or an array [k, D].
    init_sample_size: size of the seeding sample.
    epochs: passes over the data (Lloyd steps, or mini-batch epochs).
    tol: relative tolerance of the stopping rule (Lloyd only).
    cosine: L2-normalise the points (per block, on the fly).
    method: "lloyd" or "minibatch".
    chunk_size: rows per cache-sized block inside a pass.
    block_size: rows per host block when `batches` is an array.
    n_init: seedings on the sample (best inertia on the sample kept).
    sample_max_iter: Lloyd iterations on the sample during seeding.
    return_info: also return dict(epochs, shifts, inertia, converged); inertia[e] is the
      inertia of the data w.r.t. the centroids *before* epoch e's update.
    init_sample: alias of `init_sample_size`; max_iter: alias of `epochs`.

  Returns:
    centroids [k, D] float32 (jax array), or (centroids, info) if `return_info`.

  Example:
    >>> x = np.random.default_rng(0).normal(size=(10_000, 16)).astype(np.float32)
    >>> c = fit_streaming(x, 4, key=jax.random.key(0), block_size=2048, epochs=5)
    >>> c.shape
    (4, 16)
  """
  if method not in ("lloyd", "minibatch"):
    raise ValueError(f"fit_streaming: unknown method {method!r}; expected 'lloyd' or "
                     "'minibatch'")
  if init_sample is not None:
    init_sample_size = int(init_sample)
  if max_iter is not None:
    epochs = int(max_iter)
  is_array = isinstance(batches, (np.ndarray, jax.Array))
  if is_array:
    if batches.ndim != 2:
      raise ValueError(f"fit_streaming: array input must be [N, D], got shape {batches.shape}")
    make_blocks = _array_blocks(batches, None, None, block_size)
  else:
    if callable(batches):
      make_iter = batches
    elif iter(batches) is batches:
      raise ValueError("fit_streaming: `batches` is a one-shot iterator; pass a list or a "
                       "zero-argument callable returning a fresh iterator (several passes "
                       "are needed)")
    else:
      make_iter = lambda: iter(batches)

    def make_blocks():
      for item in make_iter():
        x, w = _as_batch(item)
        yield _pad_batch(x, w, _bucket(x.shape[0])) + (0,)

  k_sample, k_fit = jax.random.split(key)
  sample = None
  if is_array:
    idx = sample_indices(batches.shape[0], init_sample_size, key=k_sample)
    sample = batches[idx] if isinstance(batches, np.ndarray) else batches[jnp.asarray(idx)]
  else:
    # Reservoir: keep the valid points with the smallest random priorities seen so far.
    keep_x, keep_p = None, None
    for b, item in enumerate(make_iter()):
      x, w = _as_batch(item)
      x = np.asarray(x)
      p = np.asarray(jax.random.uniform(jax.random.fold_in(k_sample, b), (x.shape[0],)))
      x, p = x[w > 0], p[w > 0]
      if keep_x is not None:
        x, p = np.concatenate([keep_x, x]), np.concatenate([keep_p, p])
      if x.shape[0] > init_sample_size:
        sel = np.argpartition(p, init_sample_size - 1)[:init_sample_size]
        x, p = x[sel], p[sel]
      keep_x, keep_p = x, p
    if keep_x is None:
      raise ValueError("fit_streaming: the stream is empty")
    sample = keep_x
  if sample.shape[0] < k:
    raise ValueError(f"fit_streaming: only {sample.shape[0]} valid points for k={k}")
  sample_j = jnp.asarray(sample, jnp.float32)
  if cosine:
    sample_j = l2_normalize(sample_j)
  if isinstance(init, str):
    centroids = kmeans(sample_j, k, key=k_fit, init=init, n_init=n_init,
                       max_iter=sample_max_iter, tol=tol, chunk_size=chunk_size).centroids
  else:
    centroids = _resolve_init(init, k, sample_j.shape[1])[1]
  s_sq = jnp.sum(sample_j * sample_j, -1)
  tol_abs = float(_tolerance(sample_j, s_sq, jnp.ones(s_sq.shape, bool), tol))
  centroids, info = _stream_lloyd(make_blocks, centroids, epochs=int(epochs), tol_abs=tol_abs,
                                  cosine=cosine, chunk=chunk_size, sample=sample_j,
                                  sample_sq=s_sq, method=method)
  return (centroids, info) if return_info else centroids
