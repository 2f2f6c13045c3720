"""PyTorch-compatible resizing in JAX, as separable interpolation matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` in three ways that matter
here: its cubic kernel uses a=-0.5 (PyTorch: a=-0.75), it antialiases when downsampling by
default (PyTorch does not), and it has no notion of a valid sub-region inside a padded array.
This module builds the 1-D interpolation matrix of PyTorch's `align_corners=False` modes
(`nearest`, `bilinear`, `bicubic`) and applies it along H and W with two matmuls. The sizes
may be traced values, so one compiled function serves a padded batch of images whose valid
sizes differ.

Example (jitted, as the pipeline runs it; the output size and the method are static):
  >>> x = jnp.arange(12.).reshape(1, 3, 4, 1)
  >>> resize_fn = jax.jit(resize, static_argnames=("out_hw", "method"))
  >>> y = resize_fn(x, (6, 8), method="bilinear")
  >>> y.shape
  (1, 6, 8, 1)
  >>> np.asarray(y[0, 0, :, 0])   # row [0, 1, 2, 3] doubled, PyTorch align_corners=False
  array([0.  , 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.  ], dtype=float32)
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Method = Literal["nearest", "bilinear", "bicubic"]

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys' a); jax.image uses -0.5.


def _cubic_weight(x: jax.Array, a: float = _CUBIC_A) -> jax.Array:
  """Keys' cubic convolution kernel W(x) with coefficient `a`."""
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x <= 1.0, near, jnp.where(x < 2.0, far, 0.0))


def interpolation_matrix(
    in_size, out_size, *, in_capacity: int, out_capacity: int,
    method: Method = "bilinear", scale_factor=None) -> jax.Array:
  """1-D interpolation matrix of PyTorch `interpolate(..., align_corners=False)`.

  Output sample i reads the input at the source coordinate
    src_i = (i + 0.5) * scale - 0.5   (bilinear, bicubic),   floor(i * scale)   (nearest),
  with scale = in_size / out_size for `interpolate(x, size=out_size)`, or
  scale = 1 / scale_factor for `interpolate(x, scale_factor=scale_factor)` (PyTorch then uses
  the factor itself, not the ratio of the sizes, unless `recompute_scale_factor=True`; its
  output size is floor(in_size * scale_factor), which the caller passes as `out_size`).

  Args:
    in_size: number of valid input samples (int or traced int scalar), 1 <= in_size.
    out_size: number of valid output samples (int or traced int scalar).
    in_capacity: static length of the (possibly padded) input axis.
    out_capacity: static length of the (possibly padded) output axis.
    method: "nearest", "bilinear" or "bicubic" (a=-0.75, no antialias).
    scale_factor: optional PyTorch `scale_factor` of this axis (float or traced scalar);
      None: the `size=` call. A Python float is inverted in float64 and rounded once, as
      PyTorch does; a traced one in float32 (within an ulp or two of it).

  Returns:
    m: [out_capacity, in_capacity] float32. Row i holds the weights of output sample i;
      rows >= out_size are zero and columns >= in_size are never used, so padding in the
      input never leaks into the output.

  Example (DINO's position-embedding call `scale_factor=(g + 0.1) / 14` for a 14-cell grid):
    >>> m = interpolation_matrix(14, 20, in_capacity=14, out_capacity=20, method="bicubic",
    ...                          scale_factor=20.1 / 14)
  """
  in_size_f = jnp.asarray(in_size, jnp.float32)
  out_size_f = jnp.asarray(out_size, jnp.float32)
  if scale_factor is None:
    scale = in_size_f / out_size_f
  elif isinstance(scale_factor, (int, float)):
    scale = jnp.float32(1.0 / scale_factor)
  else:
    scale = 1.0 / jnp.asarray(scale_factor, jnp.float32)
  dst = jnp.arange(out_capacity, dtype=jnp.float32)
  last = jnp.asarray(in_size, jnp.int32) - 1
  cols = jnp.arange(in_capacity)

  def onehot(idx):
    return (jnp.clip(idx, 0, last)[:, None] == cols[None, :]).astype(jnp.float32)

  if method == "nearest":
    m = onehot(jnp.floor(dst * scale).astype(jnp.int32))
  elif method == "bilinear":
    src = jnp.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = jnp.floor(src).astype(jnp.int32)
    frac = (src - i0)[:, None]
    m = (1.0 - frac) * onehot(i0) + frac * onehot(i0 + 1)
  elif method == "bicubic":
    src = (dst + 0.5) * scale - 0.5
    base = jnp.floor(src)
    m = jnp.zeros((out_capacity, in_capacity), jnp.float32)
    for offset in (-1, 0, 1, 2):
      w = _cubic_weight(src - (base + offset))[:, None]
      m = m + w * onehot(base.astype(jnp.int32) + offset)
  else:
    raise ValueError(f"unknown resize method {method!r}; expected nearest, bilinear or bicubic")
  valid_rows = (dst < out_size_f)[:, None]
  return jnp.where(valid_rows, m, 0.0)


def resize(
    x: jax.Array, out_hw: tuple[int, int], *, method: Method = "bilinear",
    in_valid_hw=None, out_valid_hw=None, scale_factor=None) -> jax.Array:
  """Resizes `[..., H, W, C]` to `[..., out_h, out_w, C]` like PyTorch `interpolate`.

  Args:
    x: [..., H, W, C] array (leading batch dims allowed; no batch-dependent sizes here).
    out_hw: static output (height, width).
    method: "nearest", "bilinear" or "bicubic" (a=-0.75, align_corners=False, no antialias).
    in_valid_hw: optional (h, w) of the valid top-left region of `x` (ints or traced); the
      rest is padding and is ignored. Defaults to the full (H, W).
    out_valid_hw: optional (h, w) of the valid output region; outside it the result is 0.
      Defaults to `out_hw`. The valid input region is mapped onto the valid output region.
    scale_factor: optional (sy, sx) of PyTorch's `interpolate(..., scale_factor=(sy, sx))`
      (floats or traced scalars): sample with the factors themselves instead of the size
      ratios (see `interpolation_matrix`); the output sizes are still `out_valid_hw`.

  Returns:
    [..., out_h, out_w, C] array of x's dtype (computed in float32).
  """
  h, w = x.shape[-3], x.shape[-2]
  out_h, out_w = out_hw
  in_h, in_w = in_valid_hw if in_valid_hw is not None else (h, w)
  o_h, o_w = out_valid_hw if out_valid_hw is not None else (out_h, out_w)
  sy, sx = scale_factor if scale_factor is not None else (None, None)
  my = interpolation_matrix(in_h, o_h, in_capacity=h, out_capacity=out_h, method=method,
                            scale_factor=sy)
  mx = interpolation_matrix(in_w, o_w, in_capacity=w, out_capacity=out_w, method=method,
                            scale_factor=sx)
  xf = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", my, xf, precision=hp)
  y = jnp.einsum("pw,...owc->...opc", mx, y, precision=hp)
  return y.astype(x.dtype)


def upsample_probs(x: jax.Array, out_hw: tuple[int, int], *, in_valid_hw=None,
                   out_valid_hw=None, method: Method = "bilinear") -> jax.Array:
  """Resizes a padded batch of patch-level maps to pixels, each image with its own valid size.

  Like `torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)` applied
  to every image's valid region `x[b, :h_b, :w_b]` with output size `out_valid_hw[b]`, placed in
  the top-left of an `out_hw` canvas (zeros elsewhere). One compiled function serves any mix of
  valid sizes (they may be traced). Works for probabilities and logits alike (linear).

  Args:
    x: [B, h, w, C] patch-level values (padded).
    out_hw: static (H, W) of the output canvas.
    in_valid_hw: [B, 2] int valid (h_b, w_b) of each input; default the full (h, w).
    out_valid_hw: [B, 2] int valid (H_b, W_b) of each output; default the full (H, W).
    method: "bilinear" (default), "bicubic" or "nearest".

  Returns:
    [B, H, W, C] float32 (x's dtype), zero outside each valid output region.

  Example (two patch grids padded to 4 x 4: a 4 x 3 one and a 3 x 4 one, brought to 32 x 24
  and 24 x 32 pixels on a 32 x 32 canvas):
    >>> probs = jnp.full((2, 4, 4, 1), 0.75)
    >>> up = jax.jit(upsample_probs, static_argnames="out_hw")   # valid sizes may vary
    >>> p = up(probs, (32, 32), in_valid_hw=jnp.array([[4, 3], [3, 4]]),
    ...        out_valid_hw=jnp.array([[32, 24], [24, 32]]))
    >>> p.shape
    (2, 32, 32, 1)
    >>> p = np.asarray(p)
    >>> float(p[0, :, :24].min()), float(p[0, :, 24:].max()), float(p[1, 24:].max())
    (0.75, 0.0, 0.0)
  """
  b, h, w = x.shape[:3]
  in_valid_hw = _per_image_hw(in_valid_hw, b, (h, w), "in_valid_hw")
  out_valid_hw = _per_image_hw(out_valid_hw, b, tuple(out_hw), "out_valid_hw")

  def one(xi, ivh, ovh):
    return resize(xi, out_hw, method=method, in_valid_hw=(ivh[0], ivh[1]),
                  out_valid_hw=(ovh[0], ovh[1]))

  return jax.vmap(one)(x, in_valid_hw, out_valid_hw)


def upsample_labels(labels: jax.Array, out_hw: tuple[int, int], *, in_valid_hw=None,
                    out_valid_hw=None, fill_value: int = 0) -> jax.Array:
  """Nearest-neighbour resize of a padded batch of integer label maps, per-image valid sizes.

  Matches `torch.nn.functional.interpolate(..., mode="nearest")` (source index
  floor(dst * in / out), OpenCV's INTER_NEAREST) on each image's valid region.

  Args:
    labels: [B, h, w] integer labels (padded).
    out_hw: static (H, W) of the output canvas.
    in_valid_hw: [B, 2] int valid input sizes; default the full (h, w).
    out_valid_hw: [B, 2] int valid output sizes; default the full (H, W).
    fill_value: label written outside each valid output region.

  Returns:
    [B, H, W] labels of the input dtype.
  """
  b, h, w = labels.shape
  in_valid_hw = _per_image_hw(in_valid_hw, b, (h, w), "in_valid_hw")
  out_valid_hw = _per_image_hw(out_valid_hw, b, tuple(out_hw), "out_valid_hw")
  out_h, out_w = out_hw

  def one(li, ivh, ovh):
    # Integer index maps (no float matmul), so labels of any size are carried exactly.
    ys = _nearest_index(ivh[0], ovh[0], out_h)
    xs = _nearest_index(ivh[1], ovh[1], out_w)
    out = li[ys[:, None], xs[None, :]]
    valid = (jnp.arange(out_h)[:, None] < ovh[0]) & (jnp.arange(out_w)[None, :] < ovh[1])
    return jnp.where(valid, out, jnp.asarray(fill_value, labels.dtype))

  return jax.vmap(one)(labels, in_valid_hw, out_valid_hw)


def _nearest_index(in_size, out_size, out_capacity: int) -> jax.Array:
  """PyTorch 'nearest' source index floor(dst * in / out), clipped to the valid input."""
  in_size = jnp.asarray(in_size, jnp.int32)
  out_size = jnp.asarray(out_size, jnp.int32)
  dst = jnp.arange(out_capacity, dtype=jnp.float32)
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  return jnp.clip(jnp.floor(dst * scale).astype(jnp.int32), 0, in_size - 1)


def _per_image_hw(hw, b: int, default: tuple[int, int], name: str) -> jax.Array:
  if hw is None:
    return jnp.tile(jnp.asarray([default], jnp.int32), (b, 1))
  hw = jnp.asarray(hw)
  if hw.shape != (b, 2):
    raise ValueError(f"{name} must have shape [{b}, 2] (one (h, w) per image), got {hw.shape}")
  return hw.astype(jnp.int32)
