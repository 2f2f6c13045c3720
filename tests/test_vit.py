"""Tests of lightcluster_jax.vit against the PyTorch reference and against its own properties.

Oracle: `checkpoints_conversion.torch_reference` (written from the official DINO / DINOv2 code)
with the same random weights in the official key layout, float32 on CPU; tolerance 1e-4
absolute on O(1)-scaled features (measured differences are ~1e-6). Properties: padding
invariance, finiteness of fully masked rows, attention implementations agree, jit caching.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcluster_jax import vit

torch = pytest.importorskip("torch")
F = torch.nn.functional

from lightcluster_jax.weights import keymap  # noqa: E402
from checkpoints_conversion import torch_reference as tref  # noqa: E402

ATOL = 1e-4
ALL_ARCHS = list(vit.ARCHS)


def _setup(arch, depth=2, seed=0):
  cfg = vit.get_config(arch, depth=depth)
  model = tref.randomize_(tref.VisionTransformer.from_config(cfg), seed).eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return cfg, model, keymap.official_to_flax(sd, cfg)


def _images(b, h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


def _torch_out(model, x_nhwc, blocks=(-1,)):
  with torch.no_grad():
    out = model.forward_features(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()),
                                 blocks=blocks)
  return out


def _sizes(cfg):
  p = cfg.patch_size
  # Square below the native grid (downsampled position embedding) and non-square straddling it.
  return [(4 * p, 4 * p), (3 * p, 7 * p)] if cfg.pos_grid > 8 else [(4 * p, 4 * p)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parity_with_torch_reference(arch):
  cfg, model, params = _setup(arch)
  fwd = vit.make_apply_fn(cfg, blocks=(0, -1),
                          outputs=("keys", "cls", "cls_attn", "patch_tokens", "qkv", "attn",
                                   "tokens"))
  fast = vit.make_apply_fn(cfg)  # default request: last-block Keys + CLS (CLS-only last block)
  npre = cfg.num_prefix_tokens
  for h, w in _sizes(cfg):
    x = _images(2, h, w)
    ref = _torch_out(model, x, blocks=(0, -1))
    out = fwd(params, x)
    np.testing.assert_allclose(out["keys"], ref["keys"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["cls"], ref["cls"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["cls_attn"], ref["cls_attn"].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["patch_tokens"], ref["patch_tokens"].numpy(), atol=ATOL,
                               rtol=0)
    assert sorted(out["blocks"]) == [0, cfg.depth - 1]
    for i in (0, cfg.depth - 1):
      for name in ("q", "k", "v", "attn", "tokens"):
        np.testing.assert_allclose(out["blocks"][i][name], ref["blocks"][i][name].numpy(),
                                   atol=ATOL, rtol=0, err_msg=f"block {i} {name}")
    assert out["keys"].shape == (2, (h // cfg.patch_size) * (w // cfg.patch_size), cfg.width)
    assert out["blocks"][0]["k"].shape[1] == npre + out["keys"].shape[1]
    if (h, w) == _sizes(cfg)[-1]:
      o2 = fast(params, x)
      assert set(o2) == {"keys", "cls"}
      np.testing.assert_allclose(o2["keys"], ref["keys"].numpy(), atol=ATOL, rtol=0)
      np.testing.assert_allclose(o2["cls"], ref["cls"].numpy(), atol=ATOL, rtol=0)
    # Features are not trivially small: the test could fail.
    assert np.abs(ref["keys"].numpy()).max() > 0.5
    assert ref["cls_attn"].numpy().max() > 5.0 / ref["cls_attn"].shape[-1]


@pytest.mark.parametrize("arch,hw", [("dino_vits16", (224, 224)),    # native grid: no resampling
                                     ("dino_vits16", (256, 320)),    # upsampled grid
                                     ("dinov2_vits14_reg", (14 * 40, 14 * 9))])  # aa up+down
def test_parity_native_and_upsampled_grids(arch, hw):
  cfg, model, params = _setup(arch, depth=1)
  x = _images(1, *hw, seed=1)
  ref = _torch_out(model, x)
  out = vit.make_apply_fn(cfg)(params, x)
  np.testing.assert_allclose(out["keys"], ref["keys"].numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["cls"], ref["cls"].numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_in,n_out", [(37, 16), (37, 24), (37, 37), (37, 50), (14, 5),
                                        (28, 64), (5, 3)])
def test_antialiased_bicubic_matches_torch(n_in, n_out):
  grid = np.random.default_rng(0).standard_normal((1, 2, n_in, n_in)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(grid), size=(n_out, n_in), mode="bicubic",
                      antialias=True, align_corners=False).numpy()[0, :, :, 0]
  m = vit._aa_bicubic_matrix(n_in, n_out, in_capacity=n_in, out_capacity=n_out + 3)
  got = np.asarray(m) @ grid[0, :, :, 0].T  # [out+3, 2]
  np.testing.assert_allclose(got[:n_out].T, ref, atol=1e-5)
  assert np.all(np.asarray(m)[n_out:] == 0)


def _pad_batch(images, bucket_hw, p):
  b = len(images)
  hb, wb = bucket_hw
  out = np.full((b, hb, wb, 3), 7.0, np.float32)  # loud padding: must not leak
  mask = np.zeros((b, hb // p, wb // p), bool)
  for i, im in enumerate(images):
    h, w = im.shape[:2]
    out[i, :h, :w] = im
    mask[i, :h // p, :w // p] = True
  return out, mask


@pytest.mark.parametrize("arch", ["dino_vits8", "dinov2_vits14_reg"])
def test_padding_invariance(arch):
  cfg, _, params = _setup(arch)
  p = cfg.patch_size
  sizes = [(3 * p, 5 * p), (6 * p, 2 * p), (6 * p, 6 * p)]
  imgs = [_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
  batch, mask = _pad_batch(imgs, (6 * p, 7 * p), p)
  outs = ("keys", "cls", "cls_attn", "patch_tokens")
  fwd = vit.make_apply_fn(cfg, outputs=outs)
  padded = fwd(params, batch, mask)
  for i, im in enumerate(imgs):
    alone = fwd(params, im[None])
    gh, gw = im.shape[0] // p, im.shape[1] // p
    sel = mask[i].reshape(-1)
    for name in ("keys", "patch_tokens"):
      np.testing.assert_allclose(np.asarray(padded[name][i])[sel],
                                 np.asarray(alone[name][0]), atol=ATOL, rtol=0, err_msg=name)
    np.testing.assert_allclose(padded["cls"][i], alone["cls"][0], atol=ATOL, rtol=0)
    ca = np.asarray(padded["cls_attn"][i])
    np.testing.assert_allclose(ca[:, sel], np.asarray(alone["cls_attn"][0]), atol=ATOL, rtol=0)
    assert np.all(ca[:, ~sel] == 0)
    assert gh * gw == sel.sum()
  for v in jax.tree.leaves(padded):
    assert np.all(np.isfinite(v))


def test_fully_masked_image_is_finite_and_does_not_affect_others():
  cfg, _, params = _setup("dino_vits16", depth=1)
  x = _images(2, 64, 64)
  mask = np.ones((2, 4, 4), bool)
  mask[1] = False
  out = vit.make_apply_fn(cfg, outputs=("keys", "cls", "cls_attn"))(params, x, mask)
  alone = vit.make_apply_fn(cfg)(params, x[:1])
  for v in jax.tree.leaves(out):
    assert np.all(np.isfinite(v))
  np.testing.assert_allclose(out["cls"][0], alone["cls"][0], atol=ATOL, rtol=0)


def test_attention_implementations_agree():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 300, 3, 8)), jnp.float32) for _ in range(3))
  valid = jnp.asarray(rng.random((2, 300)) > 0.3).at[:, 0].set(True)
  ref, probs = vit.attention(q, k, v, valid, need_probs=True, impl="full")
  assert np.allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(probs)[np.broadcast_to(~np.asarray(valid)[:, None, None, :],
                                                  probs.shape)] == 0)
  # Independent NumPy oracle.
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.asarray(k))
  logits = np.where(np.asarray(valid)[:, None, None, :], logits, -np.inf)
  pr = np.exp(logits - logits.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  np.testing.assert_allclose(ref, np.einsum("bhqk,bkhd->bqhd", pr, np.asarray(v)), atol=1e-5)
  for impl in ("map", "dpa"):
    for chunk in (32, 128):  # 300 > 4 * 32: map also splits the queries into chunks
      out, _ = vit.attention(q, k, v, valid, impl=impl, chunk=chunk)
      np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=impl)
  out, p = vit.attention(q, k, v, valid, impl="map", need_probs=True)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(p, probs, atol=1e-6)


def test_bf16_compute_is_finite_and_close():
  cfg, _, params = _setup("dinov2_vits14", depth=2)
  x = _images(2, 56, 70)
  mask = np.ones((2, 4, 5), bool)
  mask[1, 3:] = False
  f32 = vit.make_apply_fn(cfg)(params, x, mask)
  bf = vit.make_apply_fn(cfg, dtype=jnp.bfloat16)(params, x, mask)
  assert bf["keys"].dtype == jnp.float32
  for v in jax.tree.leaves(bf):
    assert np.all(np.isfinite(v))
  a, b = np.asarray(f32["keys"]).reshape(-1, cfg.width), np.asarray(bf["keys"]).reshape(
      -1, cfg.width)
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cos.min() > 0.99


def test_only_requested_outputs_and_early_exit_values():
  cfg, _, params = _setup("dino_vits16", depth=3)
  x = _images(1, 32, 48)
  full = vit.make_apply_fn(cfg, blocks=(1,), outputs=("qkv", "tokens", "cls"))(params, x)
  early = vit.make_apply_fn(cfg, blocks=(-2,), outputs=("qkv",))(params, x)  # stops after block 1
  assert set(early) == {"blocks"} and set(early["blocks"]) == {1}
  assert set(early["blocks"][1]) == {"q", "k", "v"}
  np.testing.assert_allclose(early["blocks"][1]["k"], full["blocks"][1]["k"], atol=1e-6)
  assert set(full) == {"blocks", "cls"}


def test_make_apply_fn_is_cached_and_does_not_recompile_per_mask():
  cfg, _, params = _setup("dino_vits16", depth=1)
  f1 = vit.make_apply_fn(cfg, blocks=[-1])
  assert vit.make_apply_fn(cfg, blocks=(-1,)) is f1
  x = _images(2, 80, 80)  # a shape no other test uses with this cached function
  before = f1._cache_size()
  for n in (2, 3, 5):
    m = np.zeros((2, 5, 5), bool)
    m[:, :n, :n] = True
    f1(params, x, m)
  assert f1._cache_size() == before + 1


def test_bad_inputs_raise_clear_errors():
  cfg, _, params = _setup("dino_vits16", depth=1)
  with pytest.raises(ValueError, match="multiples of the patch size 16"):
    vit.apply(params, np.zeros((1, 40, 48, 3), np.float32), arch=cfg)
  with pytest.raises(ValueError, match="dino_vits8.*dinov2_vits14"):
    vit.get_config("vit_huge")
  with pytest.raises(ValueError, match=r"mask must be \[B, H/p, W/p\]"):
    vit.apply(params, np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 3, 2), bool), arch=cfg)
  with pytest.raises(ValueError, match="missing keys.*blocks_1"):
    vit.apply(params, np.zeros((1, 32, 32, 3), np.float32), arch=dataclasses.replace(cfg,
                                                                                       depth=2))
  with pytest.raises(ValueError, match="unknown output"):
    vit.apply(params, np.zeros((1, 32, 32, 3), np.float32), arch=cfg, outputs=("values",))
  with pytest.raises(ValueError, match="out of range"):
    vit.apply(params, np.zeros((1, 32, 32, 3), np.float32), arch=cfg, blocks=(5,))


def test_configs():
  assert set(vit.ARCHS) >= {"dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16",
                            "dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg",
                            "dinov2_vitb14_reg"}
  assert vit.ARCHS["dino_vits8"].pos_grid == 28 and vit.ARCHS["dinov2_vitb14"].pos_grid == 37
  assert vit.get_config("dino_vitb8", depth=2).depth == 2
  n = sum(np.prod(s) for s in vit.param_shapes("dino_vits16").values())
  assert n == 21_665_664  # the official ViT-S/16 backbone's parameter count
