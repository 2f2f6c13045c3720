"""Class labels: k-means of the set's region descriptors -> class ids -> painted label maps.

docs/method.md §9 (second half). All region descriptors of the dataset (`stages.regions`) are
clustered into `num_classes` with cosine k-means; each region's pixels are painted
`class + 1`, background 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lightcluster_jax.blocks import kmeans as kmeans_lib

__all__ = ["cluster_descriptors", "paint_labels"]


def cluster_descriptors(descriptors: jax.Array, valid: jax.Array, num_classes: int, *,
                        key: jax.Array, n_init: int = 10, max_iter: int = 300):
  """k-means of region descriptors into `num_classes` (cosine: L2-normalised CLS).

  Args:
    descriptors: [R, D] CLS descriptors of all regions of the dataset (padded).
    valid: [R] bool.
    num_classes: number of classes (20 for VOC). If fewer regions than classes exist,
      k is reduced to the number of regions.

  Returns:
    classes: [R] int32 in 0..k-1 (-1 for invalid slots).
  """
  n_valid = int(jnp.sum(valid))
  k = max(1, min(num_classes, n_valid))
  if n_valid == 0:
    return jnp.full(valid.shape, -1, jnp.int32)
  res = kmeans_lib.kmeans(descriptors, k, key=key, mask=valid, n_init=n_init,
                          max_iter=max_iter, cosine=True)
  return jnp.where(valid, res.assignment, -1).astype(jnp.int32)


def paint_labels(region_labels: jax.Array, region_classes: jax.Array) -> jax.Array:
  """Label map [H, W]: `class + 1` on each region's pixels, 0 elsewhere.

  Args:
    region_labels: [H, W] int32 region index + 1 (0 = background), from `find_regions`.
    region_classes: [R] int32 class of each region slot (-1 = none).

  Example:
    >>> paint_labels(jnp.array([[0, 1], [2, 2]]), jnp.array([4, -1]))
    Array([[0, 5],
           [0, 0]], dtype=int32)
  """
  table = jnp.concatenate([jnp.zeros((1,), jnp.int32), region_classes.astype(jnp.int32) + 1])
  table = jnp.maximum(table, 0)
  return table[region_labels]
