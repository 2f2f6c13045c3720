"""Tests of lightcluster_jax.masks: components vs SciPy, rules on hand-made grids, synthetic
images with a known object for the border rule and the multilevel procedure.

Oracles: `scipy.ndimage.label` / `binary_dilation` (exact equality), NumPy formulas written
here (soft probability: 1e-5), hand-computed grids (exact).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcluster_jax.blocks import components as C
from lightcluster_jax.stages import masks as M

ndi = pytest.importorskip("scipy.ndimage")


pytestmark = pytest.mark.usefixtures("fast_compile")


def structure(connectivity):
  return ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)


# ----------------------------------------------------------------------------------------------
# Connected components.


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_equal_scipy_label(connectivity):
  rng = np.random.default_rng(connectivity)
  masks = np.concatenate([rng.random((4, 23, 31)) < p for p in (0.2, 0.45, 0.6, 0.8)])
  ours = np.asarray(jax.jit(lambda m: C.connected_components(m, connectivity=connectivity))(
      masks))
  for m, o in zip(masks, ours):
    ref, _ = ndi.label(m, structure(connectivity))
    # SciPy numbers components in raster order of their first pixel, as we do: labels equal.
    np.testing.assert_array_equal(o, ref)


def test_connected_components_long_snake_and_large_grid():
  snake = np.zeros((64, 64), bool)
  snake[::2] = True
  snake[1::4, -1] = True
  snake[3::4, 0] = True                        # one 2000-pixel path winding through the grid
  ref, n = ndi.label(snake)
  assert n == 1
  np.testing.assert_array_equal(np.asarray(C.connected_components(snake)), ref)
  big = np.random.default_rng(0).random((256, 256)) < 0.55
  np.testing.assert_array_equal(np.asarray(C.connected_components(big)), ndi.label(big)[0])


@pytest.mark.parametrize("connectivity", [4, 8])
def test_component_sizes_and_small_component_removal(connectivity):
  rng = np.random.default_rng(3)
  masks = rng.random((3, 17, 19)) < 0.5
  labels = C.connected_components(masks, connectivity=connectivity)
  sizes = np.asarray(C.component_sizes(labels))
  cleaned = np.asarray(C.remove_small_components(masks, 4, connectivity=connectivity))
  for m, s, c in zip(masks, sizes, cleaned):
    ref, n = ndi.label(m, structure(connectivity))
    np.testing.assert_array_equal(s[:n + 1], np.bincount(ref.ravel(), minlength=n + 1))
    big = np.bincount(ref.ravel())[ref] >= 4
    np.testing.assert_array_equal(c, m & big)
  np.testing.assert_array_equal(np.asarray(C.remove_small_components(masks, 1)), masks)


# ----------------------------------------------------------------------------------------------
# Border, dilation, rules.


def test_valid_border_and_border_fraction_on_padded_grid():
  valid = np.zeros((5, 6), bool)
  valid[:4, :5] = True                         # a padded image: valid 4x5 top-left rectangle
  border = np.asarray(C.valid_border(valid))
  expected = valid.copy()
  expected[1:3, 1:4] = False
  np.testing.assert_array_equal(border, expected)
  a = np.full((5, 6), 1)
  a[1:3, 1:3] = 0                              # cluster 0: 4 interior patches
  a[0, 0] = 0                                  # ... plus one border patch
  a[4, :] = 0                                  # padding row: must be ignored
  bf = np.asarray(M.border_fraction(jnp.asarray(a), valid, 3))
  # cluster 0: 1 of its 5 valid patches on the border; cluster 1: 13 of 15; cluster 2 empty.
  np.testing.assert_allclose(bf, [1 / 5, 13 / 15, 1.0], rtol=1e-6)


def test_dilate_within_valid_equals_scipy():
  rng = np.random.default_rng(0)
  m = rng.random((2, 9, 11)) < 0.15
  valid = np.zeros((2, 9, 11), bool)
  valid[0, :7, :9] = True
  valid[1] = True
  for it in (1, 2):
    ours = np.asarray(C.dilate(m, valid, iterations=it))
    for b in range(2):
      ref = m[b] & valid[b]
      for _ in range(it):
        ref = ndi.binary_dilation(ref, structure(8)) & valid[b]
      np.testing.assert_array_equal(ours[b], ref)


def test_consistency_rules_on_hand_made_grids():
  valid = np.ones((1, 4, 5), bool)
  valid[0, :, 4] = False
  d = np.array([[[1, 1, 1, 0, 1],
                 [1, 1, 1, 0, 0],
                 [0, 1, 1, 1, 0],
                 [0, 0, 0, 1, 0]]], bool)
  c = np.array([[[0, 1, 1, 1, 1],
                 [0, 1, 1, 1, 0],
                 [0, 1, 1, 1, 0],
                 [1, 1, 0, 0, 0]]], bool)
  i = np.array([[[0, 0, 0, 0, 0],
                 [0, 0, 1, 0, 0],
                 [0, 0, 1, 0, 0],
                 [0, 0, 0, 0, 1]]], bool)
  dc_and_i = np.array([[[0, 1, 1, 0, 0],
                        [0, 1, 1, 0, 0],
                        [0, 1, 1, 1, 0],
                        [0, 0, 0, 0, 0]]], bool)
  all_ = np.array([[[0, 0, 0, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 0, 0, 0]]], bool)
  majority = np.array([[[0, 1, 1, 0, 0],
                        [0, 1, 1, 0, 0],
                        [0, 1, 1, 1, 0],
                        [0, 0, 0, 0, 0]]], bool)
  d_and_i = np.array([[[0, 1, 1, 0, 0],
                       [0, 1, 1, 0, 0],
                       [0, 1, 1, 1, 0],
                       [0, 0, 0, 1, 0]]], bool)
  image_only = i & valid
  for rule, want in [("dc_and_i", dc_and_i), ("d_and_i", d_and_i), ("all", all_),
                     ("majority", majority), ("image_only", image_only)]:
    got = np.asarray(M.consistency(d, c, i, valid, rule=rule))
    np.testing.assert_array_equal(got, want, err_msg=rule)
  # dilate=0 makes dc_and_i equal to `all`; a missing level does not constrain.
  np.testing.assert_array_equal(np.asarray(M.consistency(d, c, i, valid, dilate=0)), all_)
  np.testing.assert_array_equal(np.asarray(M.consistency(None, c, i, valid, rule="all")),
                                c & i & valid)
  with pytest.raises(ValueError, match="rule"):
    M.consistency(d, c, i, valid, rule="any")


def test_foreground_clusters_majority_fallback_and_guard():
  # 10 patches per cluster; image-level fg covers: cluster 0: 8, cluster 1: 3, cluster 2: 0.
  a = np.repeat(np.arange(3), 10).reshape(1, 5, 6)
  fg = np.zeros(30, bool)
  fg[:8] = True
  fg[10:13] = True
  fg = fg.reshape(1, 5, 6)
  valid = np.ones((1, 5, 6), bool)
  np.testing.assert_array_equal(np.asarray(M.foreground_clusters(a, fg, valid, 3)),
                                [True, False, False])
  share, counts = M.cluster_foreground_share(a, fg, valid, 3)
  np.testing.assert_allclose(np.asarray(share), [0.8, 0.3, 0.0])
  # No majority anywhere: the best cluster (share 0.3 >= 0.25) is taken ...
  fg2 = fg.copy().reshape(-1)
  fg2[5:8] = False                              # cluster 0 now 0.5 (not > 0.5)
  fg2 = fg2.reshape(1, 5, 6)
  np.testing.assert_array_equal(np.asarray(M.foreground_clusters(a, fg2, valid, 3)),
                                [True, False, False])
  # ... but a cluster with almost no image-level fg (METHOD.md's 0.001) is never taken.
  a_big = np.zeros((1, 40, 50), np.int32)
  a_big[0, :, 25:] = 1
  fg_tiny = np.zeros((1, 40, 50), bool)
  fg_tiny[0, 0, 0] = True                       # 1 of 1000 patches of cluster 0
  np.testing.assert_array_equal(
      np.asarray(M.foreground_clusters(a_big, fg_tiny, np.ones_like(fg_tiny), 2)),
      [False, False])
  # Grouped scope: decisions per group.
  groups = np.zeros((1, 5, 6), np.int32)
  groups[0, 3:] = 1
  table = np.asarray(M.foreground_clusters(a, fg, valid, 3, group_ids=groups, num_groups=2))
  assert table.shape == (2, 3)
  np.testing.assert_array_equal(table[0], [True, False, False])


# ----------------------------------------------------------------------------------------------
# Synthetic images: a central object with its own Key direction on a background.


def synthetic(b=6, h=12, w=16, d=16, noise=0.6, seed=0, pad_garbage=True):
  """Keys [B, h*w, D], valid [B, h, w], gt [B, h, w], cls [B, D] with 2 object categories."""
  rng = np.random.default_rng(seed)
  # Object (background) Keys of both categories share a common direction, so object vs
  # background is the dominant 2-way split at every level.
  obj = rng.normal(size=(1, d)) + 0.5 * rng.normal(size=(2, d))
  back = rng.normal(size=(1, d)) + 0.5 * rng.normal(size=(2, d))
  keys = np.zeros((b, h, w, d), np.float32)
  valid = np.zeros((b, h, w), bool)
  gt = np.zeros((b, h, w), bool)
  cls = np.zeros((b, d), np.float32)
  for i in range(b):
    hv, wv = h - 2 * (i % 3), w - 3 * (i % 2)
    valid[i, :hv, :wv] = True
    yy, xx = np.mgrid[:h, :w]
    gt[i] = (((yy - (hv - 1) / 2) / (hv / 3.2)) ** 2
             + ((xx - (wv - 1) / 2) / (wv / 3.2)) ** 2 < 1) & valid[i]
    cat = i % 2
    keys[i] = np.where(gt[i][..., None], obj[cat], back[i % 2]) + noise * rng.normal(
        size=(h, w, d))
    if pad_garbage:
      keys[i][~valid[i]] = rng.normal(0, 30, size=(int((~valid[i]).sum()), d))
    cls[i] = obj[cat] + 0.1 * rng.normal(size=d)
  return keys.reshape(b, h * w, d), valid, gt, cls


def iou(a, b):
  return (a & b).sum() / max((a | b).sum(), 1)


def test_image_level_border_rule_and_padding_invariance():
  keys, valid, gt, _ = synthetic()
  b = keys.shape[0]
  prng = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(b))
  out = M.image_level_foreground(keys, valid, None, keys_prng=prng)
  fg = np.asarray(out["fg"])
  for i in range(b):
    assert iou(fg[i], gt[i]) > 0.95, i
  assert not fg[~valid].any()
  assert np.asarray(out["fg_clusters"]).sum(1).tolist() == [1] * b
  # Image 1 alone (cropped to its valid rectangle, no padding) gives the same mask.
  hv, wv = valid[1].sum(0).max(), valid[1].sum(1).max()
  k1 = keys[1].reshape(12, 16, -1)[:hv, :wv].reshape(1, hv * wv, -1)
  alone = M.image_level_foreground(k1, valid[1:2, :hv, :wv], None, keys_prng=prng[1:2])
  np.testing.assert_array_equal(np.asarray(alone["fg"])[0], fg[1, :hv, :wv])


def test_image_level_tie_broken_by_cls_attention():
  # Left half vs right half: equal border fractions, so CLS attention decides.
  h, w, d = 8, 8, 4
  rng = np.random.default_rng(0)
  left = np.zeros((h, w), bool)
  left[:, :4] = True
  keys = np.where(left[..., None], 1.0, -1.0) * np.ones(d) + 0.01 * rng.normal(size=(h, w, d))
  keys = np.stack([keys, keys]).reshape(2, h * w, d).astype(np.float32)
  valid = np.ones((2, h, w), bool)
  attn = np.stack([left.ravel() * 1.0, (~left).ravel() * 1.0]).astype(np.float32)
  prng = jax.random.split(jax.random.key(0), 2)
  out = M.image_level_foreground(keys, valid, attn, keys_prng=prng)
  bf = np.asarray(out["border_fraction"])
  np.testing.assert_allclose(bf[:, 0], bf[:, 1])
  np.testing.assert_array_equal(np.asarray(out["fg"])[0], left)
  np.testing.assert_array_equal(np.asarray(out["fg"])[1], ~left)


def test_category_groups_recover_superclasses():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 8))
  truth = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1])
  cls = centers[truth] * rng.uniform(0.5, 3, (9, 1)) + 0.05 * rng.normal(size=(9, 8))
  cls = np.concatenate([cls, 100 * rng.normal(size=(1, 8))]).astype(np.float32)  # padding
  g = np.asarray(M.category_groups(cls, 3, key=jax.random.key(0),
                                   image_mask=np.arange(10) < 9))
  assert g[9] == -1
  assert len(set(zip(g[:9].tolist(), truth.tolist()))) == 3


def test_soft_foreground_matches_numpy():
  keys, valid, _, _ = synthetic(b=2, noise=0.3)
  rng = np.random.default_rng(1)
  fc, bc = rng.normal(size=(2, 16)), rng.normal(size=(16,))
  p = np.asarray(M.soft_foreground(keys, fc, bc, valid, temperature=0.2))
  x = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  df = ((x - fc[:, None]) ** 2).sum(-1)
  db = ((x - bc) ** 2).sum(-1)
  ref = np.exp(-df / 0.2) / (np.exp(-df / 0.2) + np.exp(-db / 0.2))
  ref = np.where(valid.reshape(2, -1), ref, 0).reshape(valid.shape)
  np.testing.assert_allclose(p, ref, atol=1e-5)


def test_multilevel_foreground_on_synthetic_dataset():
  keys, valid, gt, cls = synthetic()
  out = M.multilevel_foreground(keys, valid, cls, None, key=jax.random.key(0),
                                num_categories=2, flip_image_level=True)
  assert not np.asarray(out["image_flipped"]).any()
  for name in ("image", "category", "dataset", "consistent"):
    m = np.asarray(out[name])
    assert m.shape == valid.shape and not m[~valid].any(), name
    assert min(iou(m[i], gt[i]) for i in range(len(m))) > 0.9, name
  assert sorted(set(np.asarray(out["groups"]).tolist())) == [0, 1]
  g = np.asarray(out["groups"])
  assert np.all(g[0::2] == g[0]) and np.all(g[1::2] == g[1]) and g[0] != g[1]
  assert not np.asarray(out["fallback"]).any()
  assert np.asarray(out["dataset_trusted"]).all() and np.asarray(out["category_trusted"]).all()
  # The fg / bg centroids separate the classes in the soft map.
  p = np.asarray(M.soft_foreground(keys, out["fg_centroid"], out["bg_centroid"], valid))
  assert p[gt].mean() > 0.9 and p[valid & ~gt].mean() < 0.1


def test_trusted_level_on_hand_made_grids():
  image = np.zeros((3, 4, 4), bool)
  image[:, 1:3, 1:3] = True                      # 4 image-level fg patches per image
  level = np.zeros((3, 4, 4), bool)
  level[0, 1:3, 1:4] = True                      # 6 patches, 4 inside: share 0.67
  level[1, 0, :] = True                          # 4 patches, none inside: share 0
  level[1, 1, 1] = True                          # ... 1 of 5 inside: share 0.2
  # image 2: empty level mask
  np.testing.assert_array_equal(np.asarray(M.trusted_level(level, image)), [True, True, False])
  np.testing.assert_array_equal(
      np.asarray(M.trusted_level(level, image, min_image_share=0.5)), [True, False, False])


def test_multilevel_fallback_to_image_level():
  # Every component is smaller than min_region_patches: each image falls back to its
  # image-level mask. Also covers the CLS-attention and dataset_fit_patches paths.
  keys, valid, gt, cls = synthetic(noise=0.3, seed=1)
  attn = gt.reshape(gt.shape[0], -1).astype(np.float32)
  out = M.multilevel_foreground(keys, valid, cls, attn, key=jax.random.key(0),
                                num_categories=2, min_region_patches=1000,
                                dataset_fit_patches=500)
  assert np.asarray(out["fallback"]).all()
  np.testing.assert_array_equal(np.asarray(out["consistent"]), np.asarray(out["image"]))
  assert np.asarray(out["consistent_raw"]).any()
  assert min(iou(np.asarray(out["image"])[i], gt[i]) for i in range(len(gt))) > 0.9


def test_multilevel_flips_a_close_up_when_asked():
  # Image 0 is a close-up: the object fills the frame except a small central patch of
  # background, so the border rule picks the background. Dataset and category levels
  # (decided over all images) know the object Key; with flip_image_level the image-level
  # mask of image 0 is complemented, and only that image's.
  keys, valid, gt, cls = close_up()
  b = keys.shape[0]
  out = M.multilevel_foreground(keys, valid, cls, None, key=jax.random.key(0),
                                num_categories=2, flip_image_level=True)
  raw = np.asarray(M._lookup(out["image_fg_clusters"], out["image_assignment"]))
  assert iou(raw[0], gt[0]) < 0.1                 # the border rule alone is wrong here
  np.testing.assert_array_equal(np.asarray(out["image_flipped"]), [True] + [False] * (b - 1))
  for name in ("image", "consistent"):
    m = np.asarray(out[name])
    assert min(iou(m[i], gt[i]) for i in range(b)) > 0.9, name


# ----------------------------------------------------------------------------------------------
# Levels that disagree: CLS attention decides which side is the object (combine_levels step 1).


def test_attention_contrast_matches_numpy():
  rng = np.random.default_rng(0)
  valid = np.zeros((3, 5, 6), bool)
  valid[:, :4, :5] = True
  valid[2] = True
  mask = rng.random((3, 5, 6)) < 0.4
  mask[1] = valid[1]                             # covers the image: no evidence, 0
  attn = rng.random((3, 30)).astype(np.float32)
  got = np.asarray(M.attention_contrast(mask, attn, valid))
  a = attn.reshape(3, 5, 6)
  for b in (0, 2):
    m, v = mask[b] & valid[b], valid[b]
    want = np.log(a[b][m].mean()) - np.log(a[b][v & ~m].mean())
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  assert got[1] == 0.0
  # The complement has the opposite contrast.
  np.testing.assert_allclose(np.asarray(M.attention_contrast(valid & ~mask, attn, valid))[[0, 2]],
                             -got[[0, 2]], rtol=1e-5)


def rocket_levels():
  """The demo's rocket on an 8 x 10 patch grid: the image level took the sky (I), dataset and
  category levels agree on the rocket (A), a column touching the bottom border, disjoint
  from I."""
  valid = np.ones((1, 8, 10), bool)
  rocket = np.zeros((1, 8, 10), bool)
  rocket[0, 2:, 4:6] = True
  sky = np.zeros((1, 8, 10), bool)
  sky[0, :6, 1:9] = True
  sky &= ~rocket
  return sky, rocket, rocket.copy(), valid


def test_attention_picks_the_object_when_the_levels_disagree():
  sky, d, c, valid = rocket_levels()
  old = M.combine_levels(sky, d, c, valid, min_region_patches=2, arbitrate=False)
  # Without the rule: D and C are not trusted (no patch inside I), I is the answer.
  np.testing.assert_array_equal(np.asarray(old["consistent"]), sky)
  # Attention 3x higher on the rocket: s(A) = log 3 = 1.10 >= 0.5, s(I) = -log 1.6 (the rest
  # of the image holds the rocket), s(A) - s(I) = 1.57 >= 1.
  attn = np.where(d, 3.0, 1.0).reshape(1, -1).astype(np.float32)
  new = M.combine_levels(sky, d, c, valid, attn, min_region_patches=2)
  assert bool(new["arbitrated"][0]) and bool(new["image_flipped"][0])
  np.testing.assert_array_equal(np.asarray(new["image"]), valid & ~sky)
  np.testing.assert_array_equal(np.asarray(new["consistent"]), d)
  s_i, s_a = np.asarray(new["attention_contrast"][0])
  assert s_a >= 0.5 and s_a - s_i >= 1.0
  # The same attention through the streamed runner's call (a chunk with a padding image).
  attn2 = np.concatenate([attn, np.zeros_like(attn)])
  pad = lambda m: np.concatenate([m, np.zeros_like(m)])
  two = M.combine_levels(pad(sky), pad(d), pad(c), pad(valid), attn2, min_region_patches=2)
  np.testing.assert_array_equal(np.asarray(two["consistent"])[0], d[0])


@pytest.mark.parametrize("case", ["weak", "on_image_level", "none", "off", "high_margin",
                                  "agree"])
def test_old_behaviour_kept_when_the_attention_is_not_decisive(case):
  sky, d, c, valid = rocket_levels()
  ratio, kw = 3.0, {}
  if case == "weak":              # 1.2x: s(A) = 0.16 < 0.5 and s(A) - s(I) < 1
    ratio = 1.2
  elif case == "on_image_level":  # attention on the sky: the levels are the ones that are wrong
    ratio = 1 / 3
  elif case == "off":
    kw = dict(arbitrate=False)
  elif case == "high_margin":
    kw = dict(arbitrate_margin=5.0)
  elif case == "agree":           # D and C inside I: nothing to arbitrate
    d, c = sky.copy(), sky.copy()
  attn = np.where(rocket_levels()[1], ratio, 1.0).reshape(1, -1).astype(np.float32)
  attn = None if case == "none" else attn
  ref = M.combine_levels(sky, d, c, valid, min_region_patches=2, arbitrate=False)
  got = M.combine_levels(sky, d, c, valid, attn, min_region_patches=2, **kw)
  assert not bool(got["arbitrated"][0]) and not bool(got["image_flipped"][0])
  for k in ("image", "consistent_raw", "consistent", "dataset_trusted", "category_trusted",
            "fallback"):
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)


def close_up(seed=2):
  """synthetic() with image 0 a close-up: the object fills the frame except a central 4 x 4
  patch of background, so the border rule picks that patch of background."""
  keys, valid, gt, cls = synthetic(noise=0.3, seed=seed)
  b, p, d = keys.shape
  g = keys.reshape(b, 12, 16, d)
  inner = np.zeros((12, 16), bool)
  inner[4:8, 6:10] = True
  obj_key, bg_key = g[0][gt[0]].mean(0), g[0][valid[0] & ~gt[0]].mean(0)
  rng = np.random.default_rng(0)
  g[0] = np.where(inner[..., None], bg_key, obj_key) + 0.3 * rng.normal(size=(12, 16, d))
  gt[0] = ~inner
  valid[0] = True
  return g.reshape(b, p, d), valid, gt, cls


def test_multilevel_attention_repairs_a_close_up():
  # The close-up of test_multilevel_flips_a_close_up_when_asked, with the default rule (no
  # unconditional flip): CLS attention 3x higher on the object than on the background
  # complements image 0's image-level mask, and only that image's; weak attention (1.2x)
  # or attention on the background keeps the old answer (the background).
  keys, valid, gt, cls = close_up()
  b = len(gt)
  runs = {}
  for name, ratio in (("strong", 3.0), ("weak", 1.2), ("wrong", 1 / 3)):
    attn = np.where(gt, ratio, 1.0).reshape(b, -1).astype(np.float32)
    runs[name] = M.multilevel_foreground(keys, valid, cls, attn, key=jax.random.key(0),
                                         num_categories=2)
  out = runs["strong"]
  raw = np.asarray(M._lookup(out["image_fg_clusters"], out["image_assignment"]))
  assert iou(raw[0], gt[0]) < 0.1                 # the border rule alone is wrong here
  np.testing.assert_array_equal(np.asarray(out["arbitrated"]), [True] + [False] * (b - 1))
  for name in ("image", "consistent"):
    m = np.asarray(out[name])
    assert min(iou(m[i], gt[i]) for i in range(b)) > 0.9, name
  for name in ("weak", "wrong"):
    o = runs[name]
    assert not np.asarray(o["image_flipped"]).any(), name
    c = np.asarray(o["consistent"])
    np.testing.assert_array_equal(c[0], raw[0] & valid[0])   # the old fallback: I
    np.testing.assert_array_equal(c[1:], np.asarray(out["consistent"])[1:])


def test_streamed_masks_equal_in_memory_with_arbitration():
  """The runner's two paths on the close-up scene, with the rule firing on image 0: the
  streamed chunks pass the cached CLS attention to `combine_levels` as memory does."""
  from lightcluster_jax import config as config_lib
  from lightcluster_jax.runner import pipeline
  keys, valid, gt, cls = close_up()
  b, _, d = keys.shape
  attn = np.where(gt, 3.0, 1.0).reshape(b, -1).astype(np.float32) / gt[0].size
  feats = pipeline.Stage(None, "features", "t")
  ids = [f"im{i}" for i in range(b)]
  for i, item in enumerate(ids):
    hv, wv = int(valid[i].any(1).sum()), int(valid[i].any(0).sum())
    crop = lambda a: a.reshape(12, 16, -1)[:hv, :wv].reshape(hv * wv, -1)
    feats.save(item, dict(keys=crop(keys[i]), cls=cls[i], cls_attn=crop(attn[i])[:, 0],
                          grid_hw=np.array([hv, wv]), orig_hw=np.array([hv * 8, wv * 8])))
  cfg = config_lib.default_config().clustering
  cfg.num_categories, cfg.n_init = 2, 1
  out = {}
  for chunk in (0, 2):
    cfg.chunk_images = chunk
    stage = pipeline.Stage(None, "masks", f"c{chunk}")
    pipeline.run_masks(stage, feats, ids, cfg=cfg, seed=0, temperature=0.1, progress=False)
    out[chunk] = {i: stage.load(i) for i in ids}
  assert iou(out[0]["im0"]["consistent"], gt[0]) > 0.9      # the rule fired
  assert out[0]["im0"]["image"].sum() > valid[0].sum() // 2
  for i in ids:
    for lvl in ("image", "category", "dataset", "consistent", "group"):
      np.testing.assert_array_equal(out[0][i][lvl], out[2][i][lvl], err_msg=f"{i} {lvl}")
    np.testing.assert_allclose(out[0][i]["prob"], out[2][i]["prob"], rtol=0, atol=1e-6)


def test_multilevel_bad_inputs():
  keys, valid, _, cls = synthetic(b=2)
  with pytest.raises(ValueError, match="valid"):
    M.multilevel_foreground(keys, valid[:, :-1], cls, None, key=jax.random.key(0))
  with pytest.raises(ValueError, match="rule"):
    M.multilevel_foreground(keys, valid, cls, None, key=jax.random.key(0), rule="x")
  with pytest.raises(ValueError, match="cls"):
    M.multilevel_foreground(keys, valid, cls[:1], None, key=jax.random.key(0))
  with pytest.raises(ValueError, match="connectivity"):
    C.connected_components(np.ones((3, 3), bool), connectivity=6)
