"""A PyTorch reference DINO / DINOv2 ViT, written from the official model definitions.

Follows facebookresearch/dino `vision_transformer.py` (PatchEmbed conv, fused `attn.qkv`
reshaped (B, N, 3, heads, dh), softmax(q k^T * dh^-0.5) v, exact GELU, LayerNorm eps 1e-6, CLS
concatenated before the position embedding is added) and facebookresearch/dinov2
`dinov2/models/vision_transformer.py` (LayerScale `ls1`/`ls2` gamma, register tokens inserted
after CLS after the position embedding, `mask_token` kept only so official state dicts load
strictly). Its state-dict keys are the official ones, so `load_state_dict(strict=True)`
accepts the released `.pth` files.

Used as the oracle of `lightcluster convert --verify`, of the parity tests and of the
benchmark. Needs torch (the `[convert]` extra), never timm / torchvision.

Position-embedding interpolation (`interpolation=`, default the config's `pos_interpolation`),
each written as the respective peer code calls PyTorch:
  "official"  facebookresearch/dino `interpolate_pos_encoding` and facebookresearch/dinov2's
              (main since PR #378): skip when the token count equals the stored one and the
              image is square; else `interpolate(mode="bicubic", scale_factor=((h0 + 0.1) / M,
              (w0 + 0.1) / M))` (DINOv2: `interpolate_offset=0.1`, `antialias=False`); DINOv2
              register models (`interpolate_offset=0.0`, `interpolate_antialias=True`):
              `size=(h0, w0)`, `antialias=True`.
  "size"      Hugging Face `ViTModel` / `Dinov2Model` / `Dinov2WithRegistersModel`: the same
              skip, `size=(h0, w0)`, `align_corners=False`, `antialias` False / False / True.
  "timm"      timm `resample_abs_pos_embed`: skip when the token count matches and the new grid
              is square, else `size=new_size`, `antialias=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, embed_dim: int):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int, impl: str = "official"):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)
    self.impl = impl
    self.record = False
    self.recorded = {}

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, dh]
    if self.impl == "sdpa" and not self.record:
      x = F.scaled_dot_product_attention(q, k, v)
    else:
      attn = (q @ k.transpose(-2, -1)) * self.scale
      attn = attn.softmax(dim=-1)
      x = attn @ v
      if self.record:
        self.recorded = {
            "q": q.transpose(1, 2).reshape(b, n, c), "k": k.transpose(1, 2).reshape(b, n, c),
            "v": v.transpose(1, 2).reshape(b, n, c), "attn": attn}
    x = x.transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()  # exact (erf) GELU, as the official models
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
  def __init__(self, dim: int, init_values: float = 1.0):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, layerscale=False, eps=1e-6,
               attn_impl="official"):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, num_heads, impl=attn_impl)
    self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
  """The official DINO / DINOv2 ViT backbone (no classification head)."""

  def __init__(self, *, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
               layerscale=False, num_register_tokens=0, pos_grid=14, eps=1e-6,
               mask_token=False, antialias=False, interpolation="official",
               attn_impl="official"):
    super().__init__()
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.pos_grid = pos_grid
    if interpolation not in ("official", "size", "timm"):
      raise ValueError(f"unknown interpolation {interpolation!r}")
    self.antialias = antialias
    self.interpolation = interpolation
    self.family = "dinov2" if layerscale else "dino"
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
    if num_register_tokens:
      self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
    if mask_token:
      self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, mlp_ratio, layerscale, eps, attn_impl) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=eps)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.normal_(self.cls_token, std=1e-6)

  @classmethod
  def from_config(cls, config, **kwargs):
    """Builds the reference for a `lightcluster_jax.vit.ViTConfig` (its resampling rule
    unless `interpolation=` is given)."""
    kwargs.setdefault("interpolation", config.pos_interpolation)
    return cls(patch_size=config.patch_size, embed_dim=config.width, depth=config.depth,
               num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
               layerscale=config.layerscale, num_register_tokens=config.num_registers,
               pos_grid=config.pos_grid, eps=config.ln_eps,
               antialias=config.pos_antialias, **kwargs)

  def interpolate_pos_encoding(self, x, h: int, w: int):
    """Position embeddings for tokens `x` [B, 1 + N, D] of an image of h x w pixels."""
    if self.interpolation == "timm":
      return self._timm_resample(h // self.patch_size, w // self.patch_size)
    npatch = x.shape[1] - 1
    n = self.pos_embed.shape[1] - 1
    if npatch == n and h == w:  # the official and Hugging Face shortcut
      return self.pos_embed
    pos = self.pos_embed.float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    h0, w0 = h // self.patch_size, w // self.patch_size
    m = int(math.sqrt(n))
    grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if self.interpolation == "official" and not self.antialias:
      # DINO: `w0, h0 = w0 + 0.1, h0 + 0.1` then scale_factor=(w0 / sqrt(N), h0 / sqrt(N))
      # (its "w" is dim 2, the height); DINOv2: float(h0 + interpolate_offset) / M.
      grid = F.interpolate(grid, scale_factor=(float(h0 + 0.1) / m, float(w0 + 0.1) / m),
                           mode="bicubic", antialias=False)
    else:
      # "official" of the register models (interpolate_offset=0.0 -> size=) and HF.
      grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", align_corners=False,
                           antialias=self.antialias)
    assert grid.shape[-2:] == (h0, w0), grid.shape
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat((cls_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

  def _timm_resample(self, h0: int, w0: int):
    """timm `resample_abs_pos_embed(pos_embed, new_size=(h0, w0), num_prefix_tokens=1)`."""
    num_pos_tokens = self.pos_embed.shape[1]
    if h0 * w0 + 1 == num_pos_tokens and h0 == w0:
      return self.pos_embed
    hw = int(math.sqrt(num_pos_tokens - 1))
    prefix, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    dim = pos.shape[-1]
    pos = pos.float().reshape(1, hw, hw, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h0, w0), mode="bicubic", antialias=True)
    pos = pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(self.pos_embed.dtype)
    return torch.cat([prefix, pos], dim=1)

  def prepare_tokens(self, x):
    _, _, h, w = x.shape
    t = self.patch_embed(x)
    t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
    t = t + self.interpolate_pos_encoding(t, h, w)
    if self.num_register_tokens:
      t = torch.cat((t[:, :1], self.register_tokens.expand(t.shape[0], -1, -1), t[:, 1:]), dim=1)
    return t

  def forward_features(self, x, *, blocks=(-1,)):
    """x: [B, 3, H, W] normalised images (H, W multiples of the patch size).

    Returns {"keys": [B, P, D] (last requested block), "cls": [B, D], "patch_tokens":
    [B, P, D], "cls_attn": [B, heads, P], "blocks": {i: {"q","k","v","attn","tokens"}}}.
    """
    depth = len(self.blocks)
    wanted = sorted({b % depth for b in blocks})
    npre = 1 + self.num_register_tokens
    t = self.prepare_tokens(x)
    per_block = {}
    for i, blk in enumerate(self.blocks):
      blk.attn.record = i in wanted
      t = blk(t)
      if i in wanted:
        per_block[i] = dict(blk.attn.recorded, tokens=t)
        blk.attn.record, blk.attn.recorded = False, {}
    tn = self.norm(t)
    last = per_block[wanted[-1]]
    return {"keys": last["k"][:, npre:], "cls": tn[:, 0], "patch_tokens": tn[:, npre:],
            "cls_attn": last["attn"][:, :, 0, npre:], "blocks": per_block}

  def forward_keys_cls(self, x):
    """Last-block Keys (patch tokens) and the final-norm CLS, the way a PyTorch user gets them:
    a forward hook on the last block's `attn.qkv`, and a full forward pass."""
    store = {}
    handle = self.blocks[-1].attn.qkv.register_forward_hook(
        lambda _m, _i, out: store.__setitem__("qkv", out))
    try:
      t = self.prepare_tokens(x)
      for blk in self.blocks:
        t = blk(t)
      cls = self.norm(t)[:, 0]
    finally:
      handle.remove()
    d = cls.shape[-1]
    keys = store["qkv"][:, 1 + self.num_register_tokens:, d:2 * d]
    return keys, cls


def randomize_(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
  """Fills every parameter with non-trivial random values, in place (for parity tests).

  Linear / conv weights ~ N(0, 1/fan_in) (qkv 1.5x, so attention is peaked, not uniform);
  LayerNorm scales 1 + N(0, 0.1²), biases N(0, 0.1²), LayerScale gammas U(0.5, 1.5),
  CLS / register / position embeddings N(0, 0.5²): every term of the forward pass matters.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if name.endswith("gamma"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * r)
      elif name.endswith("bias"):
        p.copy_(0.1 * r)
      elif name.endswith("weight"):
        fan_in = p[0].numel()
        p.copy_(r * (1.5 if ".qkv." in name else 1.0) / math.sqrt(fan_in))
      else:  # cls_token, pos_embed, register_tokens, mask_token
        p.copy_(0.5 * r)
  return model


def random_state_dict(config, seed: int = 0, **kwargs) -> dict:
  """{official name: float32 NumPy array} of a randomised reference model for `config`."""
  model = randomize_(VisionTransformer.from_config(config, **kwargs), seed)
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
