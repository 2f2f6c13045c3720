"""Refinement: decided patch probability -> pixels (bilinear) -> dense CRF (docs/method.md §7-8).

The consistency rule (stage masks) decides each patch's side; the soft centroid probability
only sets the confidence (`decided_probability`). The probability is upsampled bilinearly
(PyTorch `align_corners=False`) onto the image's own pixel area and refined by a mean-field
dense CRF (`blocks.crf`); the foreground is `q_fg > 0.5`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lightcluster_jax.blocks import crf as crf_lib
from lightcluster_jax.blocks.resize import resize

__all__ = ["UNARIES", "decided_probability", "crf_start", "refine_batch_fn", "make_refine_fn"]

UNARIES = ("mask", "soft")


def decided_probability(fg: jax.Array, soft: jax.Array) -> jax.Array:
  """Patch fg probability whose side is decided by the consistent mask `fg`.

  p = max(s, 1-s) on foreground patches, min(s, 1-s) on background ones, for the soft
  centroid probability s; so upsampling and the CRF start from exactly the consistent mask.

  Args:
    fg: [..., h, w] bool consistent mask.
    soft: [..., h, w] float soft probability (`masks.soft_foreground`).

  Returns:
    [..., h, w] float.

  Example:
    >>> p = decided_probability(jnp.array([True, False]), jnp.array([0.2, 0.9]))
    >>> np.round(np.asarray(p), 3)   # fg patch: max(s, 1 - s); bg patch: min(s, 1 - s)
    array([0.8, 0.1], dtype=float32)
  """
  conf = jnp.maximum(soft, 1.0 - soft)
  return jnp.where(fg, conf, 1.0 - conf)


def crf_start(consistent, prob, unary: str = "mask"):
  """The patch probability the CRF starts from (docs/method.md §8).

  * "mask" (default): the consistent mask's side at full confidence (1 / 0; the CRF clips it
    to 1e-5, a unary of 11.5 nats). After bilinear upsampling only the one-patch band at the
    mask boundary is uncertain, so the CRF moves boundaries to image edges but cannot overturn
    a patch that the three clustering levels agreed on because of colour alone.
  * "soft": the decided soft probability (`decided_probability`): low-confidence patches
    (p ~ 0.6-0.9) can be flipped by the CRF's colour term.

  Args:
    consistent: [..., h, w] bool consistent mask.
    prob: [..., h, w] float decided probability.
    unary: one of UNARIES.

  Returns:
    [..., h, w] float32.

  Example:
    >>> crf_start(np.array([True, False]), np.array([0.7, 0.4]))
    array([1., 0.], dtype=float32)
    >>> crf_start(np.array([True, False]), np.array([0.7, 0.4]), "soft")
    array([0.7, 0.4], dtype=float32)
  """
  if unary == "mask":
    return np.asarray(consistent, np.float32)
  if unary == "soft":
    return np.asarray(prob, np.float32)
  raise ValueError(f"unknown CRF unary {unary!r}; expected one of {UNARIES}")


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


@functools.lru_cache(maxsize=16)
def make_refine_fn(crf_params, backend, enabled: bool):
  """`refine_batch_fn` jitted with `crf.XLA_OPTIONS` (the refine stage on one device)."""
  return jax.jit(refine_batch_fn(crf_params, backend, enabled),
                 compiler_options=crf_lib.XLA_OPTIONS)
