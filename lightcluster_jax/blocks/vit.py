"""DINO / DINOv2 Vision Transformers in Flax, exposing Queries, Keys, Values and attention.

The backbones LightCluster reads features from: DINO ViT-S/8, S/16, B/8, B/16 (Caron et al.
2021) and DINOv2 ViT-S/14, B/14 with LayerScale and optional register tokens (Oquab et al.
2023; Darcet et al. 2023). The parameter tree mirrors the official PyTorch module names
(`blocks_3/attn/qkv/kernel` <- `blocks.3.attn.qkv.weight`), so checkpoints convert by a
transpose and a rename (see `checkpoints_conversion/`).

Forward pass for an image x: [H, W, 3] with patch size p, grid (h, w) = (H/p, W/p):

  t_0 = [cls + pos_cls ; patch_embed(x) + resize(pos_patch, (h, w))]      (T = 1 + h*w)
  (DINOv2 with registers inserts R learned tokens after CLS, after the position embedding.)
  for each block:  t <- t + ls1 * Attn(LN1(t));   t <- t + ls2 * MLP(LN2(t))
  Attn(u) = concat_heads(softmax(q k^T / sqrt(d_head) + bias) v) W_o,  [q|k|v] = u W_qkv
  cls = LN(t)[0],  patch_tokens = LN(t)[1 + R:]

`bias` is 0 for valid keys and a large negative number for padded patches, so an image padded
into a larger bucket gives the same outputs on its valid patches as the image alone.

Position embeddings at other grids: the stored M x M grid is resampled per image to ITS valid
grid (h, w) by the rule in `ViTConfig.pos_interpolation`, each one reproducing a peer's code to
float32 rounding:
  "official"  the authors' `interpolate_pos_encoding` as their released models run it.
              DINO (facebookresearch/dino) and DINOv2 without registers
              (`interpolate_offset=0.1`, `interpolate_antialias=False`): bicubic a=-0.75 called
              with `scale_factor=((h + 0.1) / M, (w + 0.1) / M)`; PyTorch then samples output
              row i at (i + 0.5) * M / (h + 0.1) - 0.5, not at (i + 0.5) * M / h - 0.5: the
              samples are spaced M / (h + 0.1) apart instead of M / h and drift towards the
              top-left, by up to ~0.1 M / h stored cells at the far edge (0.23 for 37 -> 16),
              while the output size stays floor(h + 0.1) = h. DINOv2 register models
              (`interpolate_offset=0`, `interpolate_antialias=True`): explicit size, PyTorch's
              antialiased bicubic (a=-0.5, support widened when downsampling).
  "size"      Hugging Face `ViTModel` / `Dinov2Model`: explicit size, bicubic a=-0.75
              (`Dinov2WithRegistersModel`: antialiased, like the official register models).
  "timm"      timm `resample_abs_pos_embed`: explicit size, antialiased bicubic, every model.
All rules leave a square grid equal to the stored one untouched (the official, Hugging Face and
timm shortcut); "official" is the default of `ARCHS`, and converted files record the rule of
the code their checkpoint came from (`weights.load` returns it in the config).

Example (ViT-S/16 cut to one block, random weights; real ones come from `weights.load`):
  >>> cfg = get_config("dino_vits16", depth=1)
  >>> params = init_params(cfg, jax.random.PRNGKey(0))
  >>> out = make_apply_fn(cfg)(params, jnp.zeros((2, 224, 320, 3)))
  >>> out["keys"].shape, out["cls"].shape, cfg.pos_interpolation
  ((2, 280, 384), (2, 384), 'official')
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lightcluster_jax.blocks.resize import resize

__all__ = [
    "ARCHS", "OUTPUTS", "POS_INTERPOLATIONS", "ViTConfig", "VisionTransformer", "apply",
    "get_config", "init_params", "make_apply_fn", "param_shapes", "resample_pos_embed",
    "validate_params",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What `apply` can return. Top-level: "keys", "cls", "cls_attn", "patch_tokens";
# per requested block (under out["blocks"][i]): "qkv" (-> "q", "k", "v"), "attn", "tokens".
OUTPUTS = ("keys", "cls", "cls_attn", "patch_tokens", "qkv", "attn", "tokens")
_BLOCK_OUTPUTS = ("qkv", "attn", "tokens")

# Position-embedding resampling rules (`ViTConfig.pos_interpolation`), see the module docstring.
POS_INTERPOLATIONS = ("official", "size", "timm")
_OFFICIAL_OFFSET = 0.1  # DINO's `w0 + 0.1`, DINOv2's `interpolate_offset=0.1`


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static description of one backbone variant.

  Attributes:
    name: variant name, e.g. "dino_vits8".
    patch_size: side of the square patches in pixels.
    width: token dimension D.
    depth: number of transformer blocks.
    num_heads: attention heads (D must be divisible by it).
    mlp_ratio: MLP hidden width / D.
    layerscale: DINOv2's per-channel residual scales `ls1.gamma`, `ls2.gamma`.
    num_registers: register tokens inserted after CLS (DINOv2 "reg4" models: 4).
    ln_eps: LayerNorm epsilon (1e-6 in the official models; HF configs say 1e-12 for DINO).
    family: "dino" or "dinov2".
    pos_grid: side of the checkpoint's native position-embedding grid (224/p for DINO,
      518/14 = 37 for DINOv2).
    pos_antialias: the checkpoint family's own code resamples the position embedding with
      PyTorch's antialiased bicubic (DINOv2 register models: `interpolate_antialias=True`
      there and in Hugging Face `Dinov2WithRegistersModel`); otherwise plain bicubic a=-0.75.
    pos_interpolation: how position embeddings are resampled to other grids: "official",
      "size" or "timm" (see the module docstring and `POS_INTERPOLATIONS`).
  """
  name: str
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  layerscale: bool = False
  num_registers: int = 0
  ln_eps: float = 1e-6
  family: str = "dino"
  pos_grid: int = 14
  pos_antialias: bool = False
  pos_interpolation: str = "official"

  def __post_init__(self):
    if self.pos_interpolation not in POS_INTERPOLATIONS:
      raise ValueError(f"unknown pos_interpolation {self.pos_interpolation!r} ({self.name}); "
                       f"expected one of {', '.join(POS_INTERPOLATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    """CLS + registers, the tokens in front of the patches."""
    return 1 + self.num_registers


def _dino(name, p, width, heads):
  return ViTConfig(name=name, patch_size=p, width=width, depth=12, num_heads=heads,
                   family="dino", pos_grid=224 // p)


def _dinov2(name, width, heads, registers=0):
  return ViTConfig(name=name, patch_size=14, width=width, depth=12, num_heads=heads,
                   layerscale=True, num_registers=registers, family="dinov2", pos_grid=37,
                   pos_antialias=registers > 0)


ARCHS: dict[str, ViTConfig] = {c.name: c for c in (
    _dino("dino_vits8", 8, 384, 6),
    _dino("dino_vits16", 16, 384, 6),
    _dino("dino_vitb8", 8, 768, 12),
    _dino("dino_vitb16", 16, 768, 12),
    _dinov2("dinov2_vits14", 384, 6),
    _dinov2("dinov2_vitb14", 768, 12),
    _dinov2("dinov2_vits14_reg", 384, 6, registers=4),
    _dinov2("dinov2_vitb14_reg", 768, 12, registers=4),
)}


def get_config(arch: str | ViTConfig, **overrides) -> ViTConfig:
  """Returns the `ViTConfig` of a variant name (or a config), with fields overridden.

  Example: `get_config("dino_vits8", depth=2)` for a fast test model.
  """
  if isinstance(arch, ViTConfig):
    config = arch
  elif isinstance(arch, str) and arch in ARCHS:
    config = ARCHS[arch]
  else:
    raise ValueError(f"unknown ViT architecture {arch!r}; known: {', '.join(ARCHS)}")
  if overrides:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
      raise ValueError(f"unknown ViTConfig field(s) {sorted(unknown)}")
    config = dataclasses.replace(config, **overrides)
  if config.width % config.num_heads:
    raise ValueError(f"width {config.width} is not divisible by num_heads {config.num_heads}")
  return config


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling


def _aa_cubic(x, a=-0.5):
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _aa_bicubic_matrix(in_size, out_size, *, in_capacity: int, out_capacity: int):
  """[out_capacity, in_capacity] matrix of PyTorch `interpolate(bicubic, antialias=True)`.

  PyTorch's antialiased path (borrowed from Pillow) uses a=-0.5, widens the kernel support by
  the downscale factor s = in/out when s > 1, and normalises each row to sum to one:
    center_i = s (i + 0.5),  support = 2 max(s, 1),
    w_ij ∝ W((j - center_i + 0.5) / max(s, 1))  for j in [trunc(center_i - support + 0.5),
                                                        trunc(center_i + support + 0.5)).
  Sizes may be traced; rows >= out_size are zero.
  """
  in_f = jnp.asarray(in_size, jnp.float32)
  out_f = jnp.asarray(out_size, jnp.float32)
  scale = in_f / out_f
  support = 2.0 * jnp.maximum(scale, 1.0)
  invscale = 1.0 / jnp.maximum(scale, 1.0)
  center = scale * (jnp.arange(out_capacity, dtype=jnp.float32) + 0.5)
  j = jnp.arange(in_capacity, dtype=jnp.float32)[None, :]
  lo = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)[:, None]
  hi = jnp.minimum(jnp.trunc(center + support + 0.5), in_f)[:, None]
  w = _aa_cubic((j - center[:, None] + 0.5) * invscale)
  w = jnp.where((j >= lo) & (j < hi), w, 0.0)
  w = w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)
  valid_rows = (jnp.arange(out_capacity) < out_f)[:, None]
  return jnp.where(valid_rows, w, 0.0)


def _pos_sampling(cfg: ViTConfig, rule: str) -> tuple[bool, bool]:
  """(offset, antialias) of a rule: offset = sample through `scale_factor=(g + 0.1) / M`."""
  if rule == "official":
    # The official code ties the two: DINOv2's register models are built with
    # interpolate_offset=0 and interpolate_antialias=True, every other model with 0.1 / False.
    return (False, True) if cfg.pos_antialias else (True, False)
  if rule == "size":
    return False, cfg.pos_antialias
  if rule == "timm":
    return False, True
  raise ValueError(f"unknown pos_interpolation {rule!r}; expected one of "
                   f"{', '.join(POS_INTERPOLATIONS)}")


def resample_pos_embed(pos: jax.Array, out_hw, valid_hw=None, *, config: ViTConfig,
                       rule: str | None = None) -> jax.Array:
  """Resamples the stored patch position embeddings to a grid, as `rule`'s peer code does.

  Args:
    pos: [M, M, D] stored patch position embeddings (without the CLS entry).
    out_hw: static (h, w) of the output grid.
    valid_hw: optional (h_v, w_v) (ints or traced scalars): resample to this top-left part of
      the output grid and leave zeros elsewhere (padded images). Default: `out_hw`.
    config: the `ViTConfig` (its `pos_antialias`; its `pos_interpolation` unless `rule`).
    rule: "official", "size" or "timm" (see the module docstring); default the config's.

  Returns:
    [h, w, D] float32. A valid grid equal to (M, M) returns `pos` itself under every rule.

  The "official" rule, per axis with g valid cells: scale_factor s = (g + 0.1) / M, output
  size floor(M s) = g, output cell i sampled at (i + 0.5) / s - 0.5 by Keys' cubic (a=-0.75)
  with clamped borders. At the stored square grid the official code skips the call (s would
  not be 1 there), so both factors become 1 (the identity) when (h_v, w_v) = (M, M).
  """
  rule = config.pos_interpolation if rule is None else rule
  offset, antialias = _pos_sampling(config, rule)
  valid_hw = tuple(out_hw) if valid_hw is None else tuple(valid_hw)
  g0 = pos.shape[0]
  if offset:
    vh, vw = valid_hw
    if isinstance(vh, int) and isinstance(vw, int):
      native = (vh, vw) == (g0, g0)
      sy, sx = (1.0, 1.0) if native else ((vh + _OFFICIAL_OFFSET) / g0,
                                          (vw + _OFFICIAL_OFFSET) / g0)
    else:
      native = (jnp.asarray(vh) == g0) & (jnp.asarray(vw) == g0)
      sy = jnp.where(native, 1.0, (jnp.asarray(vh, jnp.float32) + _OFFICIAL_OFFSET) / g0)
      sx = jnp.where(native, 1.0, (jnp.asarray(vw, jnp.float32) + _OFFICIAL_OFFSET) / g0)
    return resize(pos.astype(jnp.float32), out_hw, method="bicubic", out_valid_hw=valid_hw,
                  scale_factor=(sy, sx))
  return _resample_pos(pos, out_hw, valid_hw, antialias=antialias)


def _resample_pos(pos: jax.Array, out_hw, valid_hw, *, antialias: bool) -> jax.Array:
  """Explicit-size resampling of a [g0, g0, D] grid to the valid top-left `valid_hw` of an
  `out_hw` grid (bicubic a=-0.75, or PyTorch's antialiased bicubic)."""
  if not antialias:
    return resize(pos.astype(jnp.float32), out_hw, method="bicubic", out_valid_hw=valid_hw)
  g0 = pos.shape[0]
  my = _aa_bicubic_matrix(g0, valid_hw[0], in_capacity=g0, out_capacity=out_hw[0])
  mx = _aa_bicubic_matrix(g0, valid_hw[1], in_capacity=g0, out_capacity=out_hw[1])
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,hwc->owc", my, pos.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,owc->opc", mx, y, precision=hp)


# ----------------------------------------------------------------------------------------------
# Attention


def _masked_logits(q, k, key_valid, precision):
  """[B, H, Tq, T] float32 logits with padded keys pushed to the float32 minimum."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32)
  if key_valid is not None:
    # float32 min (not -inf): exp underflows to exactly 0 and a row never becomes NaN; CLS is
    # always a valid key, so every row keeps at least one finite logit.
    logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return logits


def _attend_full(q, k, v, key_valid, precision):
  """Materialised softmax attention; returns (out [B, Tq, H, dh], probs [B, H, Tq, T])."""
  probs = jax.nn.softmax(_masked_logits(q, k, key_valid, precision), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype), probs


def _attend_map(q, k, v, key_valid, precision, chunk: int, need_probs: bool = False):
  """Attention as a sequential loop over (image, head) pairs, each a plain 2-D problem.

  Why (CPU): the batched einsums of `_attend_full` make XLA move [B, H, T, T] arrays through
  memory in several passes (the batch dims b, h are not the major dims of q/k/v, and every
  op sweeps the whole array before the next starts); with T ~ 3000 that is gigabytes per
  block. Here q, k, v are transposed once to [B*H, T, dh] (cheap: T*D per image) and
  `lax.map` runs logits -> softmax -> probs @ v on one [Tq, T] slab at a time (split into
  query chunks of `chunk` rows when Tq > 4 * chunk), which stays in cache. Measured on the
  2-core CPU of this project at B=8, H=6: 3-6x faster than the batched form for T = 197..3137.
  """
  b, tq, h, dh = q.shape
  t = k.shape[1]
  qh = q.transpose(0, 2, 1, 3).reshape(b * h, tq, dh)
  kh = k.transpose(0, 2, 1, 3).reshape(b * h, t, dh)
  vh = v.transpose(0, 2, 1, 3).reshape(b * h, t, dh)
  valid = None if key_valid is None else jnp.repeat(key_valid, h, axis=0)  # [B*H, T]
  n = 1
  if not need_probs and tq > 4 * chunk:
    n = -(-tq // chunk)
    qh = jnp.pad(qh, ((0, 0), (0, n * chunk - tq), (0, 0)))
  qh = qh.reshape(b * h, n, -1, dh)

  def slab(qc, kk, vv, ok):
    logits = jnp.matmul(qc, kk.T, precision=precision, preferred_element_type=jnp.float32)
    if ok is not None:
      logits = jnp.where(ok[None, :], logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    o = jnp.matmul(p.astype(vv.dtype), vv, precision=precision,
                   preferred_element_type=jnp.float32).astype(vv.dtype)
    return o, p

  def one(args):
    qi, kk, vv, ok = args
    if n == 1:
      o, p = slab(qi[0], kk, vv, ok)
      return (o[None], p) if need_probs else (o[None], None)
    o = jax.lax.map(lambda qc: slab(qc, kk, vv, ok)[0], qi)
    return o, None

  out, probs = jax.lax.map(one, (qh, kh, vh, valid))
  out = out.reshape(b, h, -1, dh)[:, :, :tq].transpose(0, 2, 1, 3)
  if need_probs:
    probs = probs.reshape(b, h, tq, t)
  return out, probs


def attention(q, k, v, key_valid=None, *, need_probs=False, impl="auto", precision=None,
              chunk: int = 256):
  """Scaled dot-product attention over heads, with padded keys masked out.

  Args:
    q: [B, Tq, H, dh] queries, ALREADY multiplied by dh**-0.5.
    k, v: [B, T, H, dh].
    key_valid: optional [B, T] bool; False keys get zero probability.
    need_probs: also return the [B, H, Tq, T] float32 probabilities ("map" or "full").
    impl: "map" (loop over (image, head) slabs, see `_attend_map`), "full" (batched
      einsums materialising [B, H, Tq, T]: the naive port), "dpa"
      (`jax.nn.dot_product_attention`: cuDNN flash attention on GPU where it applies, XLA
      elsewhere), or "auto": map on CPU; on accelerators full for short sequences or when
      probs are needed, else dpa.
    precision: matmul precision.
    chunk: query chunk length of "map" for long sequences.

  Returns:
    (out [B, Tq, H, dh] of v.dtype, probs or None).
  """
  tq, t = q.shape[1], k.shape[1]
  if impl == "auto":
    if jax.default_backend() == "cpu":
      impl = "full" if tq == 1 else "map"
    else:
      impl = "full" if need_probs or tq * t <= 512 * 512 else "dpa"
  if impl == "map":
    return _attend_map(q, k, v, key_valid, precision, chunk, need_probs=need_probs)
  if need_probs or impl == "full":
    return _attend_full(q, k, v, key_valid, precision)
  if impl == "dpa":
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0), None
  raise ValueError(f"unknown attention impl {impl!r}; expected auto, map, full or dpa")


# ----------------------------------------------------------------------------------------------
# Modules (names mirror the official PyTorch modules)


def _trunc_normal(std=0.02):
  return nn.initializers.truncated_normal(stddev=std)


class LayerScale(nn.Module):
  """DINOv2's per-channel residual scale `x * gamma`."""
  width: int

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (self.width,))
    return x * gamma.astype(x.dtype)


class PatchEmbed(nn.Module):
  """Stride-p patch convolution written as one matmul over flattened patches.

  kernel: [p, p, 3, D] (Flax Conv layout; torch weight [D, 3, p, p] transposed (2, 3, 1, 0)).
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, images):
    p, d = self.patch_size, self.width
    b, hh, ww, _ = images.shape
    kernel = self.param("kernel", _trunc_normal(), (p, p, 3, d))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    gh, gw = hh // p, ww // p
    patches = images.reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * 3)
    x = jnp.einsum("bnk,kd->bnd", patches.astype(self.dtype),
                   kernel.reshape(p * p * 3, d).astype(self.dtype), precision=self.precision,
                   preferred_element_type=jnp.float32)
    return x + bias.astype(jnp.float32)


class Mlp(nn.Module):
  hidden: int
  width: int
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision,
                              kernel_init=_trunc_normal())
    x = dense(self.hidden, name="fc1")(x)
    x = nn.gelu(x, approximate=False)  # DINO uses nn.GELU(): the exact erf form.
    return dense(self.width, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows q | k | v, head-major)."""
  num_heads: int
  dtype: Any = jnp.float32
  precision: Any = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, key_valid, *, need_probs: bool, cls_probs: bool, cls_only: bool):
    """Args: x [B, T, D]; key_valid [B, T] bool or None.

    Returns (out [B, Tq, D] with Tq = 1 if cls_only else T, aux dict with "q", "k", "v"
    [B, T, D], "probs" [B, H, T, T] if need_probs, "cls_probs" [B, H, T] if cls_probs).
    """
    b, t, d = x.shape
    h = self.num_heads
    dh = d // h
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision,
                              kernel_init=_trunc_normal())
    qkv = dense(3 * d, name="qkv")(x)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    # dh**-0.5 is a power of two for dh = 64, so scaling q first is exact.
    qh = (q * (dh ** -0.5)).astype(q.dtype).reshape(b, t, h, dh)
    kh, vh = k.reshape(b, t, h, dh), v.reshape(b, t, h, dh)
    aux = {"q": q, "k": k, "v": v}
    if cls_only:
      qh = qh[:, :1]
    out, probs = attention(qh, kh, vh, key_valid, need_probs=need_probs, impl=self.impl,
                           precision=self.precision)
    if need_probs:
      aux["probs"] = probs
    if cls_probs:
      if probs is None:
        probs_cls = jax.nn.softmax(
            _masked_logits(qh[:, :1], kh, key_valid, self.precision), axis=-1)
        aux["cls_probs"] = probs_cls[:, :, 0]
      else:
        aux["cls_probs"] = probs[:, :, 0]
    out = out.reshape(b, out.shape[1], d)
    return dense(d, name="proj")(out), aux


class Block(nn.Module):
  config: ViTConfig
  dtype: Any = jnp.float32
  precision: Any = None
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x, key_valid, *, need_probs=False, cls_probs=False, cls_only=False):
    cfg = self.config
    ln = functools.partial(nn.LayerNorm, epsilon=cfg.ln_eps, dtype=jnp.float32)
    a, aux = Attention(cfg.num_heads, dtype=self.dtype, precision=self.precision,
                       impl=self.attn_impl, name="attn")(
                           ln(name="norm1")(x), key_valid, need_probs=need_probs,
                           cls_probs=cls_probs, cls_only=cls_only)
    if cls_only:
      x = x[:, :1]
    if cfg.layerscale:
      a = LayerScale(cfg.width, name="ls1")(a)
    x = x + a.astype(x.dtype)
    m = Mlp(int(cfg.width * cfg.mlp_ratio), cfg.width, dtype=self.dtype,
            precision=self.precision, name="mlp")(ln(name="norm2")(x))
    if cfg.layerscale:
      m = LayerScale(cfg.width, name="ls2")(m)
    return x + m.astype(x.dtype), aux


def _normalise_blocks(blocks, depth: int) -> tuple[int, ...]:
  if isinstance(blocks, int):
    blocks = (blocks,)
  out = []
  for b in blocks:
    i = int(b)
    j = i + depth if i < 0 else i
    if not 0 <= j < depth:
      raise ValueError(f"block index {i} out of range for a {depth}-block ViT")
    out.append(j)
  if not out:
    raise ValueError("blocks must name at least one block")
  return tuple(sorted(set(out)))


def _normalise_outputs(outputs) -> tuple[str, ...]:
  if isinstance(outputs, str):
    outputs = (outputs,)
  outputs = tuple(dict.fromkeys(outputs))
  unknown = [o for o in outputs if o not in OUTPUTS]
  if unknown:
    raise ValueError(f"unknown output(s) {unknown}; choose from {OUTPUTS}")
  if not outputs:
    raise ValueError("outputs must name at least one output")
  return outputs


class VisionTransformer(nn.Module):
  """DINO / DINOv2 ViT returning the requested intermediate features (see `apply`)."""
  config: ViTConfig
  blocks: tuple[int, ...] = (-1,)
  outputs: tuple[str, ...] = ("keys", "cls")
  dtype: Any = jnp.float32
  precision: Any = None
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, images, mask=None):
    cfg = self.config
    p, d = cfg.patch_size, cfg.width
    b, hh, ww, c = images.shape
    if c != 3 or hh % p or ww % p:
      raise ValueError(
          f"images must be [B, H, W, 3] with H and W multiples of the patch size {p} "
          f"({cfg.name}); got shape {images.shape}")
    gh, gw = hh // p, ww // p
    n_patch = gh * gw
    blocks = _normalise_blocks(self.blocks, cfg.depth)
    outputs = _normalise_outputs(self.outputs)
    if mask is not None and mask.shape != (b, gh, gw):
      raise ValueError(f"mask must be [B, H/p, W/p] = {(b, gh, gw)} bool; got {mask.shape}")

    x = PatchEmbed(p, d, dtype=self.dtype, precision=self.precision,
                   name="patch_embed")(images)

    cls_token = self.param("cls_token", _trunc_normal(1e-6), (1, 1, d))
    n0 = cfg.pos_grid
    pos_embed = self.param("pos_embed", _trunc_normal(), (1, 1 + n0 * n0, d))
    pos_cls, pos_grid = pos_embed[0, 0], pos_embed[0, 1:].reshape(n0, n0, d)
    if mask is None:
      if (gh, gw) == (n0, n0):
        pos = pos_grid[None]
      else:
        pos = resample_pos_embed(pos_grid, (gh, gw), config=cfg)[None]
    else:
      # The valid region is a top-left rectangle: its size is the mask's first column / row.
      vh = jnp.maximum(jnp.sum(mask[:, :, 0], axis=1), 1)
      vw = jnp.maximum(jnp.sum(mask[:, 0, :], axis=1), 1)
      pos = jax.vmap(lambda a, bb: resample_pos_embed(
          pos_grid, (gh, gw), (a, bb), config=cfg))(vh, vw)
    x = x + pos.reshape(-1, n_patch, d).astype(jnp.float32)
    cls = jnp.broadcast_to((cls_token[0, 0] + pos_cls).astype(jnp.float32), (b, 1, d))
    tokens = [cls]
    if cfg.num_registers:
      reg = self.param("register_tokens", _trunc_normal(1e-6), (1, cfg.num_registers, d))
      tokens.append(jnp.broadcast_to(reg.astype(jnp.float32), (b, cfg.num_registers, d)))
    x = jnp.concatenate(tokens + [x], axis=1)
    npre = cfg.num_prefix_tokens
    key_valid = None
    if mask is not None:
      key_valid = jnp.concatenate(
          [jnp.ones((b, npre), bool), mask.reshape(b, n_patch).astype(bool)], axis=1)

    want_final = "cls" in outputs or "patch_tokens" in outputs
    last_feat = blocks[-1]  # the block whose Keys / CLS attention are returned
    per_block = [o for o in _BLOCK_OUTPUTS if o in outputs]
    n_run = cfg.depth if want_final else max(blocks) + 1
    result, block_out = {}, {}
    for i in range(n_run):
      is_last = i == cfg.depth - 1
      full_needed = "patch_tokens" in outputs or (i in blocks and "tokens" in per_block) or (
          i in blocks and "attn" in per_block)
      # Only CLS leaves the final block when no patch-level output of it is asked for:
      # its attention and MLP then run for one query instead of T.
      cls_only = is_last and not full_needed
      x, aux = Block(cfg, dtype=self.dtype, precision=self.precision,
                     attn_impl=self.attn_impl, name=f"blocks_{i}")(
                         x, key_valid,
                         need_probs=(i in blocks and "attn" in per_block),
                         cls_probs=(i == last_feat and "cls_attn" in outputs),
                         cls_only=cls_only)
      if i == last_feat:
        if "keys" in outputs:
          result["keys"] = aux["k"][:, npre:].astype(jnp.float32)
        if "cls_attn" in outputs:
          result["cls_attn"] = aux["cls_probs"][:, :, npre:]
      if i in blocks and per_block:
        entry = {}
        if "qkv" in per_block:
          entry.update({n: aux[n].astype(jnp.float32) for n in ("q", "k", "v")})
        if "attn" in per_block:
          entry["attn"] = aux["probs"]
        if "tokens" in per_block:
          entry["tokens"] = x.astype(jnp.float32)
        block_out[i] = entry
    if want_final:
      xn = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=jnp.float32, name="norm")(x)
      if "cls" in outputs:
        result["cls"] = xn[:, 0]
      if "patch_tokens" in outputs:
        result["patch_tokens"] = xn[:, npre:]
    if block_out:
      result["blocks"] = block_out
    return result


# ----------------------------------------------------------------------------------------------
# Pure-function API


def _resolve(arch) -> ViTConfig:
  return arch if isinstance(arch, ViTConfig) else get_config(arch)


def init_params(config_or_arch: str | ViTConfig, key: jax.Array) -> dict:
  """Random parameters (truncated-normal weights, as the official init) for tests.

  Returns the param tree `{"patch_embed": {"kernel": [p, p, 3, D], "bias": [D]},
  "cls_token": [1, 1, D], "pos_embed": [1, 1 + g0*g0, D], ("register_tokens": [1, R, D]),
  "blocks_i": {...}, "norm": {"scale", "bias"}}`.
  """
  cfg = _resolve(config_or_arch)
  p = cfg.patch_size
  model = VisionTransformer(cfg, outputs=("cls",))
  # Jitted: an eager init dispatches (and compiles) every op on its own, ~10x slower.
  variables = jax.jit(model.init)(key, jnp.zeros((1, p, p, 3), jnp.float32))
  return dict(variables["params"])


@functools.lru_cache(maxsize=None)
def _shapes_cached(cfg: ViTConfig):
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
  return {"/".join(_key_str(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def _key_str(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def param_shapes(config_or_arch) -> dict[str, tuple[int, ...]]:
  """{"blocks_0/attn/qkv/kernel": (D, 3D), ...}: the flat shapes a variant's params must have."""
  return dict(_shapes_cached(_resolve(config_or_arch)))


def flatten_params(params) -> dict[str, Any]:
  """Flat {"a/b/c": leaf} view of a nested param dict."""
  return {"/".join(_key_str(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def validate_params(params, arch, *, source: str = "params") -> None:
  """Raises ValueError listing missing / unexpected keys and shape mismatches vs `arch`."""
  cfg = _resolve(arch)
  expected = param_shapes(cfg)
  got = {k: tuple(np.shape(v)) for k, v in flatten_params(params).items()}
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  wrong = [f"{k}: expected {expected[k]}, got {got[k]}" for k in sorted(set(expected) & set(got))
           if expected[k] != got[k]]
  if missing or unexpected or wrong:
    lines = [f"{source} do not match architecture {cfg.name!r} "
             f"(patch {cfg.patch_size}, width {cfg.width}, depth {cfg.depth}, "
             f"registers {cfg.num_registers})"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}"
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                   + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
      lines.append(f"  shape mismatches ({len(wrong)}): " + "; ".join(wrong[:10]))
    raise ValueError("\n".join(lines))


def apply(params, images, mask=None, *, arch, blocks=(-1,), outputs=("keys", "cls"),
          dtype=jnp.float32, precision=None, attn_impl: str = "auto",
          pos_interpolation: str | None = None) -> dict:
  """Runs the ViT and returns only the requested features.

  Args:
    params: the param tree of `init_params` / `weights.load`.
    images: [B, H, W, 3] float32, ImageNet-normalised, H and W multiples of the patch size.
    mask: optional [B, H/p, W/p] bool patch validity; each image's valid region is a top-left
      rectangle (padding at the bottom / right). Padded patches are removed from attention
      and the position embedding is resampled to each image's own valid grid.
    arch: variant name or `ViTConfig` (static).
    blocks: block indices (negative from the end) whose features are returned; "keys" and
      "cls_attn" come from the last (highest) of them.
    outputs: any of `OUTPUTS`.
    dtype: compute dtype of the matmuls (jnp.bfloat16 on accelerators); LayerNorm, softmax,
      the residual stream and all returned arrays stay float32.
    precision: matmul precision (e.g. "highest" for parity checks on GPU/TPU).
    attn_impl: "auto" | "map" | "full" | "dpa" (see `attention`).
    pos_interpolation: "official" | "size" | "timm": overrides the config's rule for
      resampling the position embedding (see the module docstring); None keeps it.

  Returns:
    dict with, as requested, for P = (H/p) (W/p) patches in row-major order and
    T = 1 + R + P tokens ordered [CLS, registers, patches]:
      "keys": [B, P, D] Keys of the patch tokens (heads concatenated, not normalised);
      "cls": [B, D] final-norm CLS token;
      "cls_attn": [B, heads, P] attention probabilities of the CLS query on the patches;
      "patch_tokens": [B, P, D] final-norm patch tokens;
      "blocks": {i: {"q", "k", "v": [B, T, D], "attn": [B, heads, T, T], "tokens": [B, T, D]}}.
    Padded patches hold zeros or arbitrary finite values that never influence valid ones.
  """
  cfg = _resolve(arch)
  if pos_interpolation is not None and pos_interpolation != cfg.pos_interpolation:
    cfg = dataclasses.replace(cfg, pos_interpolation=pos_interpolation)
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, 3]; got shape {images.shape}")
  if mask is not None:
    mask = jnp.asarray(mask)
  validate_params(params, cfg)
  model = VisionTransformer(cfg, blocks=tuple(np.atleast_1d(blocks).tolist()),
                            outputs=_normalise_outputs(outputs), dtype=dtype,
                            precision=precision, attn_impl=attn_impl)
  return model.apply({"params": params}, images.astype(jnp.float32), mask)


@functools.lru_cache(maxsize=64)
def _make_apply_fn_cached(cfg, blocks, outputs, dtype, precision, attn_impl):
  fn = functools.partial(apply, arch=cfg, blocks=blocks, outputs=outputs, dtype=dtype,
                         precision=precision, attn_impl=attn_impl)
  return jax.jit(fn)


def make_apply_fn(arch, *, blocks: Iterable[int] = (-1,), outputs=("keys", "cls"),
                  dtype=jnp.float32, precision=None, attn_impl: str = "auto",
                  pos_interpolation: str | None = None):
  """A cached, jitted `fn(params, images, mask=None)` for fixed static arguments.

  `pos_interpolation` overrides the rule of `arch` (see `apply`).

  Example (a one-block ViT-S/16; the second image is 32 x 96 pixels padded to 64 x 96):
    >>> cfg = get_config("dino_vits16", depth=1)
    >>> params = init_params(cfg, jax.random.PRNGKey(0))
    >>> fwd = make_apply_fn(cfg)
    >>> mask = jnp.ones((2, 4, 6), bool).at[1, 2:].set(False)
    >>> fwd(params, jnp.zeros((2, 64, 96, 3)), mask)["keys"].shape  # one compile per shape
    (2, 24, 384)
  """
  cfg = _resolve(arch)
  if pos_interpolation is not None and pos_interpolation != cfg.pos_interpolation:
    cfg = dataclasses.replace(cfg, pos_interpolation=pos_interpolation)
  return _make_apply_fn_cached(cfg, tuple(int(b) for b in np.atleast_1d(blocks)),
                               _normalise_outputs(outputs), jnp.dtype(dtype), precision,
                               attn_impl)
