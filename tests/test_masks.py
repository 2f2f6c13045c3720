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
  keys, valid, gt, cls = synthetic(noise=0.3, seed=2)
  b, p, d = keys.shape
  g = keys.reshape(b, 12, 16, d)
  inner = np.zeros((12, 16), bool)
  inner[4:8, 6:10] = True
  obj_key, bg_key = g[0][gt[0]].mean(0), g[0][valid[0] & ~gt[0]].mean(0)
  rng = np.random.default_rng(0)
  g[0] = np.where(inner[..., None], bg_key, obj_key) + 0.3 * rng.normal(size=(12, 16, d))
  gt[0] = ~inner
  valid[0] = True
  out = M.multilevel_foreground(g.reshape(b, p, d), valid, cls, None, key=jax.random.key(0),
                                num_categories=2, flip_image_level=True)
  raw = np.asarray(M._lookup(out["image_fg_clusters"], out["image_assignment"]))
  assert iou(raw[0], gt[0]) < 0.1                 # the border rule alone is wrong here
  np.testing.assert_array_equal(np.asarray(out["image_flipped"]), [True] + [False] * (b - 1))
  for name in ("image", "consistent"):
    m = np.asarray(out[name])
    assert min(iou(m[i], gt[i]) for i in range(b)) > 0.9, name


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
