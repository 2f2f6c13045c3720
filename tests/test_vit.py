"""Tests of lightcluster_jax.vit against the PyTorch reference and against its own properties.

Oracle: `checkpoints_conversion.torch_reference` (written from the official DINO / DINOv2 code)
with the same random weights in the official key layout, float32 on CPU; tolerance 1e-4
absolute on O(1)-scaled features (measured differences are ~1e-6 to 2e-5). The reference
resamples position embeddings as each rule's peer code calls PyTorch ("official":
`scale_factor=(g + 0.1) / M`; "size": `size=`; "timm": `size=`, `antialias=True`); the
resampled grids alone are compared to PyTorch at 2e-5. Properties: padding invariance,
finiteness of fully masked rows, attention implementations agree, jit caching.
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


def _grids(cfg):
  """Native, up-sampled, down-sampled and non-square (one side up, one down) patch grids."""
  g = cfg.pos_grid
  return [(g, g), (g + 6, g + 6), (g - 5, g - 5), (g - 3, g + 4)]


@pytest.mark.parametrize("arch,rule", [(a, r) for a in ("dino_vits16", "dinov2_vits14")
                                       for r in vit.POS_INTERPOLATIONS]
                         + [("dinov2_vits14_reg", "official")])
def test_pos_interpolation_rules_match_their_peer_code(arch, rule):
  # DINO v1 (random weights in the official layout) and DINOv2: each rule against the reference
  # running that rule's peer code, at the native grid (no resampling), up- and down-sampled
  # grids and a non-square one, alone and padded into one bucket (traced valid sizes).
  # (Register models: the three rules resample identically, see the next tests.)
  cfg = vit.get_config(arch, depth=1, pos_interpolation=rule)
  model = tref.randomize_(tref.VisionTransformer.from_config(cfg), 0).eval()
  assert model.interpolation == rule
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  params = keymap.official_to_flax(sd, cfg)
  p = cfg.patch_size
  fwd = vit.make_apply_fn(cfg)
  grids = _grids(cfg)
  imgs, refs = [], []
  for n, (gh, gw) in enumerate(grids):
    x = _images(1, gh * p, gw * p, seed=n)
    with torch.no_grad():
      tk, tc = model.forward_keys_cls(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    out = fwd(params, x)
    np.testing.assert_allclose(out["keys"], tk.numpy(), atol=ATOL, rtol=0,
                               err_msg=f"{rule} {gh}x{gw}")
    np.testing.assert_allclose(out["cls"], tc.numpy(), atol=ATOL, rtol=0,
                               err_msg=f"{rule} {gh}x{gw}")
    imgs.append(x[0])
    refs.append((tk.numpy()[0], tc.numpy()[0]))
  bh, bw = max(g[0] for g in grids) + 1, max(g[1] for g in grids)
  batch, mask = _pad_batch(imgs, (bh * p, bw * p), p)
  padded = fwd(params, batch, mask)
  for i, (tk, tc) in enumerate(refs):
    got = np.asarray(padded["keys"][i])[mask[i].reshape(-1)]
    np.testing.assert_allclose(got, tk, atol=ATOL, rtol=0, err_msg=f"padded {rule} {grids[i]}")
    np.testing.assert_allclose(padded["cls"][i], tc, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["dino_vits16", "dinov2_vits14", "dinov2_vits14_reg"])
def test_resampled_position_grids_match_pytorch_calls(arch):
  # The resampled grids themselves against the PyTorch call of each rule, written here
  # independently of the reference model; static and traced (vmapped) valid sizes.
  cfg = vit.get_config(arch)
  m = cfg.pos_grid
  pos = np.random.default_rng(0).standard_normal((m, m, 8)).astype(np.float32)
  t = torch.from_numpy(pos).permute(2, 0, 1)[None]

  def torch_call(rule, gh, gw):
    if (gh, gw) == (m, m):
      return pos
    if rule == "official" and not cfg.pos_antialias:
      y = F.interpolate(t, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic")
    else:
      aa = cfg.pos_antialias or rule == "timm"
      y = F.interpolate(t, size=(gh, gw), mode="bicubic", align_corners=False, antialias=aa)
    return y[0].permute(1, 2, 0).numpy()

  cap = (m + 7, m + 7)
  grids = _grids(cfg) + [(1, 3), (m, m + 1)]
  for rule in vit.POS_INTERPOLATIONS:
    # Traced sizes (as in a padded batch): one compilation serves every grid.
    traced = jax.jit(jax.vmap(lambda a, b: vit.resample_pos_embed(
        jnp.asarray(pos), cap, (a, b), config=cfg, rule=rule)))(
            jnp.array([g[0] for g in grids]), jnp.array([g[1] for g in grids]))
    for i, (gh, gw) in enumerate(grids):
      ref = torch_call(rule, gh, gw)
      np.testing.assert_allclose(np.asarray(traced[i])[:gh, :gw], ref, atol=2e-5, rtol=0,
                                 err_msg=f"traced {rule} {gh}x{gw}")
      assert np.all(np.asarray(traced[i])[gh:] == 0) and np.all(np.asarray(traced[i])[:, gw:] == 0)
      if i == 3:  # static sizes (Python ints): the non-square grid
        static = _resample_jit(jnp.asarray(pos), (gh, gw), config=cfg, rule=rule)
        np.testing.assert_allclose(static, ref, atol=2e-5, rtol=0, err_msg=f"{rule} {gh}x{gw}")


_resample_jit = jax.jit(vit.resample_pos_embed, static_argnames=("out_hw", "config", "rule"))


def test_rules_differ_only_where_their_peers_do():
  pos = jnp.asarray(np.random.default_rng(0).standard_normal((37, 37, 4)), jnp.float32)
  v2, reg = vit.get_config("dinov2_vits14"), vit.get_config("dinov2_vits14_reg")

  def diff(cfg, a, b, hw):
    return float(jnp.max(jnp.abs(_resample_jit(pos, hw, config=cfg, rule=a)
                                 - _resample_jit(pos, hw, config=cfg, rule=b))))

  for hw in [(16, 16), (32, 44)]:  # down; non-square (one side down, one up)
    assert diff(v2, "official", "size", hw) > 0.05  # the 0.1 offset moves the samples
    assert diff(v2, "timm", "size", hw) > 0.05      # antialias (and a=-0.5) changes weights
    # Register models: official code (interpolate_offset=0, antialias) = HF = timm.
    assert diff(reg, "official", "size", hw) == 0.0 and diff(reg, "timm", "size", hw) == 0.0
  for rule in vit.POS_INTERPOLATIONS:  # native grid: untouched by every rule
    np.testing.assert_array_equal(_resample_jit(pos, (37, 37), config=v2, rule=rule), pos)


def test_pos_interpolation_argument_overrides_the_config():
  cfg, _, params = _setup("dinov2_vits14", depth=1)
  assert cfg.pos_interpolation == "official"
  x = _images(1, 14 * 20, 14 * 12)
  size_cfg = vit.get_config(cfg, pos_interpolation="size")
  want = vit.make_apply_fn(size_cfg)(params, x)
  got = vit.make_apply_fn(cfg, pos_interpolation="size")(params, x)
  got2 = vit.apply(params, x, arch=cfg, pos_interpolation="size")
  official = vit.apply(params, x, arch=cfg)
  np.testing.assert_array_equal(got["keys"], want["keys"])
  np.testing.assert_allclose(got2["keys"], want["keys"], atol=1e-5, rtol=0)
  assert float(np.max(np.abs(official["keys"] - want["keys"]))) > 1e-2
  assert vit.make_apply_fn(cfg, pos_interpolation="size") is vit.make_apply_fn(size_cfg)


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
  assert all(c.pos_interpolation == "official" for c in vit.ARCHS.values())
  assert [c.name for c in vit.ARCHS.values() if c.pos_antialias] == [
      "dinov2_vits14_reg", "dinov2_vitb14_reg"]  # hub: interpolate_antialias=True
  assert vit.get_config("dino_vits8", pos_interpolation="timm").pos_interpolation == "timm"
  with pytest.raises(ValueError, match="unknown pos_interpolation 'bicubic'.*official, size"):
    vit.get_config("dino_vits8", pos_interpolation="bicubic")
  n = sum(np.prod(s) for s in vit.param_shapes("dino_vits16").values())
  assert n == 21_665_664  # the official ViT-S/16 backbone's parameter count
