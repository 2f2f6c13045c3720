"""k-means in JAX: masked, batched, grouped and dataset-scale Lloyd with k-means++ seeding.

LightCluster clusters ViT Keys at three granularities, and each needs a different shape of
k-means (METHOD.md steps 2-4):

* **Image level**: many small problems of different sizes -> `batched_kmeans`, one compiled
  call over a padded batch `[B, N, D]` with a validity mask `[B, N]`.
* **Category level**: ragged groups of points -> `grouped_kmeans`, one compiled call that runs an
  independent k-means inside every group (no Python loop over groups, no recompiles).
* **Dataset level**: `kmeans` on a sample (`sample_indices`), then, when the data do not fit in
  memory, exact Lloyd passes over chunks on the host (`sharding.streamed_lloyd`), built from
  the pure per-chunk kernel `lloyd_statistics` that also runs inside `jax.shard_map` with a
  `psum` over the data axis; `assign` labels every point.

All variants minimise the weighted inertia over the valid points

.. math::

  J(c) = \\sum_{i:\\,m_i} w_i \\min_j \\lVert x_i - c_j \\rVert^2

with Lloyd's iteration, seeded by greedy k-means++ (Arthur & Vassilvitskii 2007, with
`2 + floor(log k)` local trials per step as in scikit-learn). Squared distances are computed as
`||x||^2 - 2 x.c + ||c||^2` with matmuls at HIGHEST precision.

**One Lloyd driver.** Every path runs the same iteration, `lloyd`, over a `LloydState`; the
paths differ only in the *statistics function* that makes one pass over their points with the
current centroids:

.. math::

  a_i = \\arg\\min_j \\lVert x_i - c_j \\rVert^2, \\quad
  S_j = \\sum_{i: a_i = j} w_i x_i, \\quad n_j = \\sum_{i: a_i = j} w_i, \\quad
  J = \\sum_i w_i \\lVert x_i - c_{a_i} \\rVert^2,

plus the `r = k` valid points farthest from their own centroid (`Farthest`, the empty-cluster
candidates). In memory the pass is one (optionally row-chunked) sweep over the points; k = 2
keeps its sums up to date from the points that changed cluster (`_two_means`); grouped
k-means computes per-group statistics `[G, k, ...]`; the streamed and sharded paths add the
statistics of host chunks (`combine_statistics`) and `psum` them over a device mesh. The
driver then applies, identically for all:

1. **Empty clusters** (scikit-learn's rule). Let `e_1 < e_2 < ...` be the empty clusters
   (`n_j = 0`) and `p_1, p_2, ...` the valid points sorted by decreasing distance to their
   own centroid (ties: lower index first). Cluster `e_r` takes point `p_r`, which leaves its
   old cluster `a = a_{p_r}`:

   .. math::

     S_{e_r} = w_p x_p, \\quad n_{e_r} = w_p, \\quad S_a \\mathrel{-}= w_p x_p, \\quad
     n_a \\mathrel{-}= w_p.

   A cluster still empty (fewer valid points than clusters) keeps its centroid. Only the
   first `k` farthest points can be needed, so a chunk keeps its own `k` farthest and the
   chunks', devices' and hosts' candidates merge by one more top-`k` (`combine_statistics`):
   the result is the rule applied to the concatenated data, at a cost of k rows per chunk.
2. **Update** `c_j <- S_j / n_j`.
3. **Stop** when the squared centroid shift `sum_j ||c_j' - c_j||^2 <= tol_abs`, with
   scikit-learn's `tol_abs = tol * mean_d Var(x_d)` (valid points), or after `max_iter`
   updates. Unchanged labels give bitwise-unchanged sums, hence shift 0: scikit-learn's
   "strict convergence" test is implied. When the shift is exactly 0 (and nothing was
   re-seeded) the last pass's labels already belong to the final centroids and the final
   assignment pass is skipped (`LloydState.exact`). Grouped k-means stops per group and
   freezes a stopped group.

The in-memory paths run `lloyd` as a `lax.while_loop` (jit / vmap friendly); the streamed
path runs the same iteration function in a Python loop (`python_loop=True`) on float64 NumPy
statistics. Masked points (mask False, or weight <= 0) never influence anything: not the
seeding, not the centroids, not the tolerance, not the re-seeding; their assignment is -1.

Example:
  >>> x = jax.random.normal(jax.random.key(0), (500, 8))
  >>> res = kmeans(x, 3, key=jax.random.key(1))
  >>> res.centroids.shape, res.assignment.shape
  ((3, 8), (500,))

References:
  Lloyd, "Least squares quantization in PCM", 1982.
  Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
  Pedregosa et al., scikit-learn `KMeans` (stopping rule, empty-cluster relocation).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KMeansResult", "kmeans", "batched_kmeans", "grouped_kmeans", "assign", "grouped_assign",
    "lloyd", "LloydState", "LloydStats", "Farthest", "combine_statistics", "zero_statistics",
    "lloyd_statistics", "grouped_lloyd_statistics", "sample_indices", "l2_normalize",
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
# The Lloyd driver: one update, one empty-cluster rule, one stopping rule for every path.


class Farthest(NamedTuple):
  """The valid points farthest from their own centroid: the empty-cluster candidates.

  `...` is the group axis [G] of grouped k-means (absent otherwise); r candidates, sorted by
  decreasing distance (ties: lower point index first).

  Attributes:
    dist: [..., r] float, squared distance of each candidate to its centroid; -inf where there
      is no candidate (fewer than r valid points).
    points: [..., r, D] float, the candidates (L2-normalised with `cosine`).
    weights: [..., r] float, their weights.
    labels: [..., r] int32, the clusters they are assigned to.
  """
  dist: Any
  points: Any
  weights: Any
  labels: Any


class LloydStats(NamedTuple):
  """Sufficient statistics of one Lloyd pass with centroids `c` ([..., k, D]).

  Attributes:
    sums: [..., k, D] `S_j = sum_{i: a_i = j} w_i x_i`.
    counts: [..., k] `n_j = sum_{i: a_i = j} w_i`.
    inertia: [...] `sum_i w_i ||x_i - c_{a_i}||^2`, w.r.t. the centroids of the pass.
    farthest: a `Farthest` with r >= k candidates, or a zero-argument function returning one
      (the in-memory paths: then it is computed only when some cluster is empty).
  """
  sums: Any
  counts: Any
  inertia: Any
  farthest: Any


class LloydState(NamedTuple):
  """State of `lloyd` (leading `...` = the group axis of grouped k-means).

  Attributes:
    iterations: [...] int32, Lloyd updates applied (a stopped group stops counting).
    centroids: [..., k, D] float32.
    aux: what the statistics function carries from pass to pass (in memory: the labels of the
      last pass).
    inertia: [...] inertia of the last pass, w.r.t. the centroids it ran with.
    shift: [...] squared centroid shift of the last update.
    done: [...] bool, the stopping rule fired (or the group was frozen from the start).
    exact: [...] bool, the last update left the centroids bitwise unchanged and re-seeded
      nothing, so the last pass (`aux`, `inertia`) is already the final assignment.
  """
  iterations: Any
  centroids: Any
  aux: Any
  inertia: Any
  shift: Any
  done: Any
  exact: Any


StatsFn = Callable[[Any, Any], "tuple[LloydStats, Any]"]


def _xp(*arrays):
  """NumPy for host arrays (the streamed path, float64), jax.numpy otherwise."""
  return np if all(isinstance(a, (np.ndarray, np.generic)) for a in arrays) else jnp


def _when(pred, true_fn, false_fn, xp):
  """`lax.cond` in JAX; a plain `if` on the host (only the taken branch runs in both)."""
  if xp is np:
    return true_fn() if bool(pred) else false_fn()
  return jax.lax.cond(pred, true_fn, false_fn)


def _top_farthest(far: Farthest, r: int) -> Farthest:
  """The first r candidates of `far` by decreasing distance (stable: ties keep their order)."""
  xp = _xp(far.dist, far.points)
  order = xp.argsort(-far.dist, axis=-1, stable=True)[..., :r]
  pick = lambda a: xp.take_along_axis(a, order, axis=-1)
  return Farthest(pick(far.dist), xp.take_along_axis(far.points, order[..., None], axis=-2),
                  pick(far.weights), pick(far.labels))


def combine_statistics(a: LloydStats, b: LloydStats) -> LloydStats:
  """Statistics of the concatenation of two disjoint point sets, `a`'s points first.

  Sums, counts and inertia add; the farthest candidates are the top-r of both lists (ties:
  `a`'s first), so folding the chunks of a dataset in order gives exactly the statistics of
  the whole dataset (up to float summation order). Works on NumPy (host, float64
  accumulators) and on JAX arrays; `farthest` must be concrete `Farthest` values.

  Args:
    a, b: `LloydStats` with equal shapes.

  Returns:
    LloydStats.
  """
  fa, fb = a.farthest, b.farthest
  xp = _xp(fa.dist, fb.dist)
  both = Farthest(xp.concatenate([fa.dist, fb.dist], axis=-1),
                  xp.concatenate([fa.points, fb.points], axis=-2),
                  xp.concatenate([fa.weights, fb.weights], axis=-1),
                  xp.concatenate([fa.labels, fb.labels], axis=-1))
  return LloydStats(a.sums + b.sums, a.counts + b.counts, a.inertia + b.inertia,
                    _top_farthest(both, fa.dist.shape[-1]))


def zero_statistics(centroids, num_farthest: Optional[int] = None) -> LloydStats:
  """The statistics of no point (the identity of `combine_statistics`), float64 NumPy.

  Args:
    centroids: [..., k, D] (only the shape is used).
    num_farthest: candidates r (default k).

  Returns:
    LloydStats of zeros, with `farthest.dist` = -inf.
  """
  shape = np.shape(centroids)
  lead, k, d = shape[:-2], shape[-2], shape[-1]
  r = k if num_farthest is None else int(num_farthest)
  far = Farthest(np.full(lead + (r,), -np.inf), np.zeros(lead + (r, d)), np.zeros(lead + (r,)),
                 np.zeros(lead + (r,), np.int32))
  return LloydStats(np.zeros(lead + (k, d)), np.zeros(lead + (k,)), np.zeros(lead), far)


def _reseed_empty(sums, counts, far: Farthest, empty, xp):
  """The empty-cluster rule (module docstring): the r-th empty cluster takes the r-th
  farthest valid point, which leaves its old cluster.

  Args:
    sums, counts: [..., k, D], [..., k] statistics of the pass.
    far: `Farthest` with R candidates.
    empty: [..., k] bool, the clusters to re-seed.

  Returns:
    (sums, counts, moved [..., k] bool: the clusters that received a point).
  """
  k = counts.shape[-1]
  n_far = far.dist.shape[-1]
  rank = xp.cumsum(empty, axis=-1) - 1                          # r-th empty cluster: rank r
  r = xp.clip(rank, 0, n_far - 1)
  take = lambda a: xp.take_along_axis(a, r, axis=-1)
  ok = empty & (rank < n_far) & xp.isfinite(take(far.dist))
  ws = xp.where(ok, take(far.weights), 0.0)                     # [..., k]
  moved = xp.take_along_axis(far.points, r[..., None], axis=-2) * ws[..., None]   # [..., k, D]
  # Remove every moved point from its old cluster (a one-hot sum: at most k points move).
  old = (take(far.labels)[..., :, None] == xp.arange(k)) & ok[..., None]         # [..., k, k]
  old = old.astype(moved.dtype)
  sums = sums - xp.sum(old[..., None] * moved[..., :, None, :], axis=-3)
  counts = counts - xp.sum(old * ws[..., None], axis=-2)
  return xp.where(ok[..., None], moved, sums), xp.where(ok, ws, counts), ok


def _lloyd_iteration(state: LloydState, stats_fn: StatsFn, tol_abs, xp) -> LloydState:
  """One Lloyd iteration: pass -> empty-cluster rule -> update -> stopping rule."""
  c = state.centroids
  stats, aux = stats_fn(c, state.aux)
  active = ~state.done
  empty = (stats.counts <= 0) & active[..., None]

  def reseed():
    far = stats.farthest() if callable(stats.farthest) else stats.farthest
    return _reseed_empty(stats.sums, stats.counts, far, empty, xp)

  def keep():
    return stats.sums, stats.counts, xp.zeros(empty.shape, bool)

  sums, counts, moved = _when(xp.any(empty), reseed, keep, xp)
  mean = sums / xp.where(counts > 0, counts, 1.0)[..., None]
  new = xp.where(((counts > 0) & active[..., None])[..., None], mean, c).astype(c.dtype)
  diff = new.astype(sums.dtype) - c.astype(sums.dtype)
  shift = xp.sum(diff * diff, axis=(-2, -1))
  return LloydState(state.iterations + active.astype(state.iterations.dtype), new, aux,
                    stats.inertia, shift, state.done | (shift <= tol_abs),
                    (shift == 0) & ~xp.any(moved, axis=-1))


def lloyd(stats_fn: StatsFn, centroids, *, tol_abs, max_iter: int, aux=None, done=None,
          python_loop: bool = False,
          callback: Optional[Callable[[LloydState], None]] = None) -> LloydState:
  """Lloyd's algorithm from `centroids`, for any statistics function (the one driver).

  Every iteration calls `stats_fn(centroids, aux) -> (LloydStats, aux)` (one pass over the
  points) and then applies the empty-cluster rule, the update `c_j = S_j / n_j` and the
  stopping rule `||c' - c||^2 <= tol_abs` of the module docstring. Groups (a leading axis of
  `centroids`) stop independently; a stopped group is frozen; the loop ends when every group
  has stopped or after `max_iter` iterations.

  Args:
    stats_fn: `(centroids [..., k, D], aux) -> (LloydStats, aux)`.
    centroids: [..., k, D] float32 initial centroids.
    tol_abs: [...] or scalar absolute tolerance on the squared shift.
    max_iter: maximum iterations.
    aux: initial carry of `stats_fn` (a pytree with fixed shapes under `lax.while_loop`).
    done: optional [...] bool: groups frozen from the start (e.g. groups with no point).
    python_loop: run the iterations in Python on NumPy values (host statistics, e.g.
      streamed chunks); default a `lax.while_loop` (jit / vmap friendly).
    callback: `python_loop` only: called with the state after every iteration.

  Returns:
    The final `LloydState`. Its `aux` / `inertia` belong to the centroids of the last pass;
    they are the final assignment where `exact` is True.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (100, 2))
    >>> stats = lambda c, aux: (lloyd_statistics(x, None, c, farthest=3), aux)
    >>> lloyd(stats, x[:3], tol_abs=0.0, max_iter=50).centroids.shape
    (3, 2)
  """
  xp = np if python_loop else jnp
  c = xp.asarray(centroids, xp.float32)
  lead = c.shape[:-2]
  done = xp.zeros(lead, bool) if done is None else xp.asarray(done, bool)
  inertia_dtype = np.float64 if python_loop else jnp.float32
  state = LloydState(xp.zeros(lead, xp.int32), c, aux, xp.zeros(lead, inertia_dtype),
                     xp.zeros(lead, inertia_dtype), done, xp.zeros(lead, bool))

  def cond(s):
    return xp.any(~s.done) & (xp.max(s.iterations, initial=0) < max_iter)

  def body(s):
    return _lloyd_iteration(s, stats_fn, tol_abs, xp)

  if not python_loop:
    return jax.lax.while_loop(cond, body, state)
  while bool(cond(state)):
    state = body(state)
    if callback is not None:
      callback(state)
  return state


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


def _farthest_points(dist, w, labels, r: int, rows: Callable) -> Farthest:
  """The r valid points with the largest `dist` (ties: lower index), padded with -inf.

  Args:
    dist: [N] squared distance of every point to its centroid.
    w: [N] effective weights (0 = masked: never a candidate).
    labels: [N] int32 clusters.
    r: number of candidates.
    rows: `idx [m] -> [m, D]` float32 points (normalised where the pass normalises).
  """
  m = min(r, dist.shape[0])
  d, idx = jax.lax.top_k(jnp.where(w > 0, dist, -jnp.inf), m)
  far = Farthest(d, rows(idx).astype(jnp.float32), w[idx], labels[idx].astype(jnp.int32))
  if m == r:
    return far
  pad = lambda a, v: jnp.concatenate([a, jnp.full((r - m,) + a.shape[1:], v, a.dtype)])
  return Farthest(pad(far.dist, -jnp.inf), pad(far.points, 0), pad(far.weights, 0),
                  pad(far.labels, 0))


def _point_rows(x, cosine: bool) -> Callable:
  """`idx -> x[idx]` as float32, L2-normalised with `cosine` (as the pass sees them)."""
  def rows(idx):
    xs = x[idx].astype(jnp.float32)
    return l2_normalize(xs) if cosine else xs
  return rows


def _pass_statistics(x, w, centroids, *, chunk: Optional[int], cosine: bool,
                     num_farthest: int):
  """One in-memory Lloyd pass -> (LloydStats with a lazy `farthest`, labels [N])."""
  p = _pass(x, w, centroids, chunk=chunk, cosine=cosine)
  far = functools.partial(_farthest_points, p.dist, w, p.labels, num_farthest,
                          _point_rows(x, cosine))
  return LloydStats(p.sums, p.counts, p.inertia, far), p.labels


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
  chunk = chunk_size if chunked else None
  pass_cosine = cosine and chunked

  def stats(c, _):
    return _pass_statistics(x, w, c, chunk=chunk, cosine=pass_cosine, num_farthest=k)

  def one_run(run_key):
    if init_mode == "k-means++":
      c0 = _kmeans_plus_plus(run_key, xs, xs_sq, w, k, n_local_trials)
    elif init_mode == "random":
      c0 = _random_init(run_key, xs, w, k)
    else:
      c0 = init_centroids.astype(jnp.float32)
    s = lloyd(stats, c0, tol_abs=tol_abs, max_iter=max_iter,
              aux=jnp.full(w.shape, -1, jnp.int32))

    def final_pass():
      p = _pass(x, w, s.centroids, chunk=chunk, cosine=pass_cosine, stats=False)
      return p.labels, p.inertia

    labels, inertia = jax.lax.cond(s.exact, lambda: (s.aux, s.inertia), final_pass)
    return KMeansResult(s.centroids, jnp.where(valid, labels, -1), inertia, s.iterations,
                        s.done)

  if n_init == 1:
    return one_run(key)
  runs = jax.vmap(one_run)(jax.random.split(key, n_init))
  best = jnp.argmin(runs.inertia)
  return jax.tree_util.tree_map(lambda a: a[best], runs)


# ----------------------------------------------------------------------------------------------
# k = 2 (image level): the driver with an incremental statistics function.


# Sparse M-step: when few points changed cluster, the sums are updated from the changed rows
# only (top_k compaction + gather of a fixed number of rows) instead of a pass over all
# points. Measured on [3136, 384] sets (one core, idle machine): a full pass ~70-90 us;
# 64 rows ~10 us, 256 rows ~20 us, 512 rows ~50 us (no better than the pass).
_K2_SPARSE_ROWS = (64, 256)


class _TwoAux(NamedTuple):
  """The carry of the k=2 statistics function."""
  labels: jax.Array   # [N] int32, the labels `sums` / `counts` belong to
  sums: jax.Array     # [2, D] weighted sums of the points of each cluster
  counts: jax.Array   # [2] weights of each cluster
  fresh: jax.Array    # bool: `labels` already are the labels of the next centroids


def _two_means(x, w, key, init_centroids, tol, *, init_mode: str, max_iter: int,
               n_local_trials: int, cosine: bool = False) -> KMeansResult:
  """One k=2 run (seeding + `lloyd` + final assignment) with the general path's result.

  Same driver (`lloyd`: empty-cluster rule, update, stopping rule), with a statistics
  function specialised to two centroids. The assignment is the sign of a single matvec,

  .. math::

    a_i = [\\, \\lVert x_i - c_1 \\rVert^2 < \\lVert x_i - c_0 \\rVert^2 \\,]
        = [\\, 2 x_i \\cdot (c_0 - c_1) + \\lVert c_1 \\rVert^2 - \\lVert c_0 \\rVert^2 < 0 \\,],

  so a pass reads the points once for the E-step (one matvec instead of an [N, 2] distance
  matrix and an argmin). The sums are updated from the rows whose label changed since the
  previous pass (top_k compaction + gather of a fixed number of rows; a full pass only when
  many changed): S_1 += sum_i delta_i x_i, S_0 -= the same, with delta_i = +-w_i. The k-means++
  distances to both initial centroids are already known, so the first E-step is free (the
  carry's `fresh` flag), and the first sums' pass also yields the unweighted sum of the valid
  points for the tolerance. The inertia comes from the sums of the clusters,

  .. math::

    J = \\sum_i w_i \\lVert x_i \\rVert^2 - 2 \\sum_j c_j \\cdot S_j
        + \\sum_j n_j \\lVert c_j \\rVert^2,

  instead of per point (same float32 cancellation as the per-point `||x||^2 - 2 x.c +
  ||c||^2`, clamped at 0 only in total), and the farthest points are computed (one distance
  pass) only when a cluster is empty.

  With `cosine`, the points are never normalised in memory: every product with the points
  is scaled per row instead (`(x / s) . c = (x . c) / s`, `sum_i a_i x_i / s_i`), which saves
  a read and a write of the whole set.

  On CPU the cost per set is dominated by memory traffic: one pass brings the set into cache
  (the copy out of the batch), then every pass over the set streams it from L3, so the
  number of passes is what this function minimises (measured on [3136, 384] sets: seeding
  4 passes, then about 1.3 per Lloyd iteration, versus ~3 per iteration in the general
  statistics function).

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

  # The first sums, with the unweighted sum of the valid points (tolerance).
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
    """Sums / counts of `new_labels` from those of `old_labels`."""
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
                          + [dense], None)

  def estep(c):
    u = mv((c[0] - c[1])[None])[:, 0]
    c_sq = jnp.sum(c * c, axis=-1)
    return (2.0 * u + (c_sq[1] - c_sq[0]) < 0).astype(jnp.int32)

  def inertia_of(c, sums, counts):
    return jnp.maximum(
        w_sq - 2.0 * jnp.sum(c * sums) + jnp.sum(counts * jnp.sum(c * c, axis=-1)), 0.0)

  def stats(c, aux: _TwoAux):
    labels = jax.lax.cond(aux.fresh, lambda: aux.labels, lambda: estep(c))
    sums, counts = update_sums(labels, aux.labels, aux.sums, aux.counts)
    far = lambda: _farthest_points(jnp.min(sq_dists(c), axis=1), w, labels, 2, rows)
    return (LloydStats(sums, counts, inertia_of(c, sums, counts), far),
            _TwoAux(labels, sums, counts, jnp.asarray(False)))

  s = lloyd(stats, c0, tol_abs=tol_abs, max_iter=max_iter,
            aux=_TwoAux(labels, sums0, counts0, jnp.asarray(True)))
  # The final assignment: the last pass's when the centroids did not move, else one more.
  # The inertia is evaluated here, outside the loop (where XLA fuses it the same way for
  # every variant, so n_init runs compare on equal terms).
  aux = jax.lax.cond(s.exact, lambda: s.aux, lambda: stats(s.centroids, s.aux)[1])
  return KMeansResult(s.centroids, jnp.where(valid, aux.labels, -1),
                      inertia_of(s.centroids, aux.sums, aux.counts), s.iterations, s.done)


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
      With k=2 (and no chunking) every set runs the Lloyd driver with the k=2 statistics
      function (`_two_means`: same result as the general one up to float32 rounding;
      ~1.5x faster on CPU for 3136 x 384 sets, see benchmarks/kmeans.py).

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


def _group_weights(points, group_ids, mask, weights, num_groups: int):
  """(gid clipped to [0, G), effective weights with out-of-range ids masked)."""
  gid = jnp.asarray(group_ids, jnp.int32)
  in_range = (gid >= 0) & (gid < num_groups)
  m = in_range if mask is None else in_range & jnp.asarray(mask, bool)
  return jnp.clip(gid, 0, num_groups - 1), _effective_weights(points.shape[0], m, weights)


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


def _grouped_farthest(x, w, gid, labels, dist, num_groups: int, r: int) -> Farthest:
  """Per group, the r valid points farthest from their centroid -> Farthest [G, r, ...].

  r successive segment argmaxes (ties: lower index first, as `lax.top_k`).
  """
  scores = jnp.where(w > 0, dist, -jnp.inf)
  idx, ok = [], []
  for _ in range(r):
    i, o = _segment_argmax(scores, gid, num_groups)
    idx.append(i)
    ok.append(o)
    scores = scores.at[i].set(jnp.where(o, -jnp.inf, scores[i]))
  idx, ok = jnp.stack(idx, 1), jnp.stack(ok, 1)                        # [G, r]
  return Farthest(jnp.where(ok, dist[idx], -jnp.inf), x[idx], jnp.where(ok, w[idx], 0.0),
                  labels[idx].astype(jnp.int32))


def _grouped_pass(x, x_sq, w, gid, centroids, num_farthest: int):
  """One grouped Lloyd pass -> (LloydStats [G, ...] with a lazy `farthest`, labels [N]).

  `x` already normalised; `gid` in [0, G).
  """
  g, k, _ = centroids.shape
  dd = _own_group_dists(x, x_sq, gid, centroids)
  labels, dist = jnp.argmin(dd, axis=1).astype(jnp.int32), jnp.min(dd, axis=1)
  sums, counts = _cluster_sums(x, w, gid * k + labels, g * k)
  inertia = jax.ops.segment_sum(w * dist, gid, num_segments=g)
  far = functools.partial(_grouped_farthest, x, w, gid, labels, dist, g, num_farthest)
  return LloydStats(sums.reshape(g, k, -1), counts.reshape(g, k), inertia, far), labels


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

  def stats(c, _):
    return _grouped_pass(x, x_sq, w, gid, c, k)

  s = lloyd(stats, c0, tol_abs=tol_abs, max_iter=max_iter,
            aux=jnp.full(w.shape, -1, jnp.int32), done=n_g <= 0)

  # The final E-step (always: groups stop at different iterations, and the inertia of the
  # pass is then computed alike for every group and every n_init run).
  st, labels = stats(s.centroids, None)
  return KMeansResult(s.centroids, jnp.where(valid, labels, -1), st.inertia, s.iterations,
                      s.done & (n_g > 0))


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
  gid, w = _group_weights(points, group_ids, mask, weights, num_groups)
  return _grouped_jit(
      points, w, gid, key, init_arr, jnp.float32(tol),
      num_groups=int(num_groups), k=int(k), init_mode=init_mode, n_init=int(n_init),
      max_iter=int(max_iter), cosine=bool(cosine),
      n_local_trials=_n_local_trials(k, n_local_trials))


# ----------------------------------------------------------------------------------------------
# Dataset scale: pure per-chunk kernels (the streamed / sharded statistics functions).


def _gather_candidates(far: Farthest, axis_name) -> Farthest:
  """All devices' candidates along `axis_name`, in device order, then the top r of them.

  An all-gather written as a `psum` of one-slot buffers (adding zeros is exact), so the result
  is replicated (invariant) like the psum-ed sums, and `shard_map` can return it with P().
  """
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)

  def gather(a, axis):
    buf = jnp.zeros((n,) + a.shape, a.dtype).at[me].set(a)
    g = jnp.moveaxis(jax.lax.psum(buf, axis_name), 0, a.ndim + axis)
    shape = list(a.shape)
    shape[axis] *= n
    return g.reshape(shape)

  both = Farthest(gather(far.dist, -1), gather(far.points, -2), gather(far.weights, -1),
                  gather(far.labels, -1))
  return _top_farthest(both, far.dist.shape[-1])


def _finish_statistics(stats: LloydStats, farthest: int, axis_name):
  """psum over `axis_name`; the 3-tuple without `farthest`, else a concrete LloydStats."""
  if not farthest:
    out = (stats.sums, stats.counts, stats.inertia)
    return out if axis_name is None else jax.lax.psum(out, axis_name)
  stats = stats._replace(farthest=stats.farthest())
  if axis_name is None:
    return stats
  sums, counts, inertia = jax.lax.psum((stats.sums, stats.counts, stats.inertia), axis_name)
  return LloydStats(sums, counts, inertia, _gather_candidates(stats.farthest, axis_name))


def lloyd_statistics(points, mask, centroids, *, weights=None, cosine: bool = False,
                     axis_name=None, chunk_size: Optional[int] = None, farthest: int = 0):
  """Sufficient statistics of one Lloyd step on a chunk of points.

  A full Lloyd pass over a dataset split into chunks is the sum of the chunks' statistics
  (`combine_statistics`), followed by the driver's update (`lloyd`):

  .. math::

    S_j = \\sum_{i: a_i = j} w_i x_i, \\quad n_j = \\sum_{i: a_i = j} w_i, \\quad
    J = \\sum_i w_i \\lVert x_i - c_{a_i} \\rVert^2, \\quad
    a_i = \\arg\\min_j \\lVert x_i - c_j \\rVert.

  Pure and free of host callbacks, so it runs inside `jax.jit`, `jax.vmap` and
  `jax.shard_map`; pass `axis_name` to `psum` the statistics over a mapped axis (the farthest
  candidates are gathered over it and reduced to the top `farthest`).

  Args:
    points: [n, D] float chunk.
    mask: [n] bool or None (all valid).
    centroids: [k, D] float32 current centroids.
    weights: optional [n] float weights.
    cosine: L2-normalise the points first.
    axis_name: optional mapped axis name (or tuple) to `psum` over (shard_map / pmap).
    chunk_size: process the rows in cache-sized blocks of this many rows (see `kmeans`).
    farthest: r > 0: also return the r valid points farthest from their centroid (the
      empty-cluster candidates; the driver needs r = k).

  Returns:
    (sums [k, D] float32, counts [k] float32 (sums of weights), inertia float32 scalar) — the
    inertia is measured against the *given* centroids; with `farthest`, a
    `LloydStats(sums, counts, inertia, Farthest)`.

  Example (data-parallel Lloyd step over a 1-d mesh):
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()), ("data",))
    >>> x = jax.random.normal(jax.random.key(0), (64 * len(jax.devices()), 4))
    >>> m, c = jnp.ones(x.shape[0], bool), x[:3]
    >>> step = jax.shard_map(
    ...     lambda x, m, c: lloyd_statistics(x, m, c, axis_name="data"), mesh=mesh,
    ...     in_specs=(P("data"), P("data"), P()), out_specs=(P(), P(), P()))
    >>> sums, counts, _ = step(x, m, c); c = sums / counts[:, None]
    >>> int(counts.sum()) == x.shape[0]
    True
  """
  w = _effective_weights(points.shape[0], mask, weights)
  stats, _ = _pass_statistics(points, w, jnp.asarray(centroids, jnp.float32),
                              chunk=chunk_size, cosine=cosine, num_farthest=farthest)
  return _finish_statistics(stats, farthest, axis_name)


def grouped_lloyd_statistics(points, group_ids, mask, centroids, *, weights=None,
                             cosine: bool = False, axis_name=None, farthest: int = 0):
  """`lloyd_statistics` for grouped k-means (centroids [G, k, D]).

  Returns:
    (sums [G, k, D], counts [G, k], inertia [G]), `psum`-ed over `axis_name` if given; with
    `farthest` = r > 0 a `LloydStats` whose `Farthest` holds r candidates per group.
  """
  g = centroids.shape[0]
  gid, w = _group_weights(points, group_ids, mask, weights, g)
  x = points.astype(jnp.float32)
  if cosine:
    x = l2_normalize(x)
  stats, _ = _grouped_pass(x, jnp.sum(x * x, axis=-1), w, gid,
                           jnp.asarray(centroids, jnp.float32), farthest)
  return _finish_statistics(stats, farthest, axis_name)


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



@jax.jit
def _grouped_assign(x, gid, w, centroids):
  x = x.astype(jnp.float32)
  d = _own_group_dists(x, jnp.sum(x * x, axis=-1), gid, centroids.astype(jnp.float32))
  return jnp.where(w > 0, jnp.argmin(d, axis=1).astype(jnp.int32), -1)


def grouped_assign(points, group_ids, centroids, *, mask=None) -> jax.Array:
  """Nearest centroid of each point among the centroids of its own group.

  The final E-step of `grouped_kmeans`: :math:`a_i = \\arg\\min_j \\lVert x_i - c_{g_i j}
  \\rVert^2`, computed as one matmul against all G*k centroids plus a gather.

  Args:
    points: [N, D] float (already L2-normalised for cosine k-means).
    group_ids: [N] int in [0, G); ids outside the range act as masked.
    centroids: [G, k, D] float.
    mask: optional [N] bool; masked points get -1.

  Returns:
    [N] int32 cluster index within the point's group, -1 where masked.

  Example:
    >>> c = jnp.array([[[0.0], [1.0]], [[5.0], [9.0]]])          # G=2, k=2, D=1
    >>> grouped_assign(jnp.array([[0.9], [0.9]]), jnp.array([0, 1]), c)
    Array([1, 0], dtype=int32)
  """
  _check_points(points, "points", 2)
  n, d = points.shape
  c = jnp.asarray(centroids)
  if c.ndim != 3 or c.shape[2] != d:
    raise ValueError(f"grouped_assign: `centroids` has shape {c.shape}, expected [G, k, {d}]")
  if jnp.shape(group_ids) != (n,):
    raise ValueError(f"grouped_assign: `group_ids` has shape {jnp.shape(group_ids)}, "
                     f"expected ({n},)")
  if mask is not None and jnp.shape(mask) != (n,):
    raise ValueError(f"grouped_assign: `mask` has shape {jnp.shape(mask)}, expected ({n},)")
  gid, w = _group_weights(points, group_ids, mask, None, c.shape[0])
  return _grouped_assign(points, gid, w, c)


def sample_indices(n: int, sample_size: int, *, key, mask=None) -> np.ndarray:
  """A uniform random sample without replacement of the valid points (dataset-level fits).

  The `s = min(sample_size, n_valid)` valid points with the largest priorities
  `jax.random.uniform(key, (n,))`, in decreasing priority (the `jax.lax.top_k` order; ties:
  lower index first). This is the draw of the masks stage (`dataset_fit_patches`), whose
  streamed version draws the same priorities chunk by chunk with `sharding.uniform_slice`.

  Args:
    n: number of points.
    sample_size: sample size (clipped to the number of valid points).
    key: PRNG key; the sample is a deterministic function of key, n and mask.
    mask: optional [n] bool; only True points are drawn.

  Returns:
    [s] int32 NumPy array of distinct indices.

  Example:
    >>> sample_indices(10, 3, key=jax.random.key(0)).shape
    (3,)
  """
  prio = jax.random.uniform(key, (n,))
  if mask is not None:
    if np.shape(mask) != (n,):
      raise ValueError(f"sample_indices: `mask` has shape {np.shape(mask)}, expected ({n},)")
    prio = jnp.where(jnp.asarray(mask, bool), prio, -1.0)
  s = min(int(sample_size), n if mask is None else int(np.sum(np.asarray(mask, bool))))
  if s <= 0:
    raise ValueError("sample_indices: no valid point to sample from")
  return np.asarray(jax.lax.top_k(prio, s)[1])
