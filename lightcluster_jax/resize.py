"""PyTorch-compatible resizing in JAX, as separable interpolation matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` in three ways that matter
here: its cubic kernel uses a=-0.5 (PyTorch: a=-0.75), it antialiases when downsampling by
default (PyTorch does not), and it has no notion of a valid sub-region inside a padded array.
This module builds the 1-D interpolation matrix of PyTorch's `align_corners=False` modes
(`nearest`, `bilinear`, `bicubic`) and applies it along H and W with two matmuls. The sizes
may be traced values, so one compiled function serves a padded batch of images whose valid
sizes differ.

Example:
  >>> x = jnp.arange(12.).reshape(1, 3, 4, 1)
  >>> resize(x, (6, 8), method="bilinear").shape
  (1, 6, 8, 1)
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
    method: Method = "bilinear") -> jax.Array:
  """1-D interpolation matrix of PyTorch `interpolate(..., align_corners=False)`.

  Args:
    in_size: number of valid input samples (int or traced int scalar), 1 <= in_size.
    out_size: number of valid output samples (int or traced int scalar).
    in_capacity: static length of the (possibly padded) input axis.
    out_capacity: static length of the (possibly padded) output axis.
    method: "nearest", "bilinear" or "bicubic" (a=-0.75, no antialias).

  Returns:
    m: [out_capacity, in_capacity] float32. Row i holds the weights of output sample i;
      rows >= out_size are zero and columns >= in_size are never used, so padding in the
      input never leaks into the output.
  """
  in_size_f = jnp.asarray(in_size, jnp.float32)
  out_size_f = jnp.asarray(out_size, jnp.float32)
  scale = in_size_f / out_size_f
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
    in_valid_hw=None, out_valid_hw=None) -> jax.Array:
  """Resizes `[..., H, W, C]` to `[..., out_h, out_w, C]` like PyTorch `interpolate`.

  Args:
    x: [..., H, W, C] array (leading batch dims allowed; no batch-dependent sizes here).
    out_hw: static output (height, width).
    method: "nearest", "bilinear" or "bicubic" (a=-0.75, align_corners=False, no antialias).
    in_valid_hw: optional (h, w) of the valid top-left region of `x` (ints or traced); the
      rest is padding and is ignored. Defaults to the full (H, W).
    out_valid_hw: optional (h, w) of the valid output region; outside it the result is 0.
      Defaults to `out_hw`. The valid input region is mapped onto the valid output region.

  Returns:
    [..., out_h, out_w, C] array of x's dtype (computed in float32).
  """
  h, w = x.shape[-3], x.shape[-2]
  out_h, out_w = out_hw
  in_h, in_w = in_valid_hw if in_valid_hw is not None else (h, w)
  o_h, o_w = out_valid_hw if out_valid_hw is not None else (out_h, out_w)
  my = interpolation_matrix(in_h, o_h, in_capacity=h, out_capacity=out_h, method=method)
  mx = interpolation_matrix(in_w, o_w, in_capacity=w, out_capacity=out_w, method=method)
  xf = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", my, xf, precision=hp)
  y = jnp.einsum("pw,...owc->...opc", mx, y, precision=hp)
  return y.astype(x.dtype)
