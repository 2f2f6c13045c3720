"""Tests of lightcluster_jax.viz against independent oracles.

Oracles: scikit-learn PCA (components, signs, explained variance, projections), the
PyTorch-rule nearest resize of `lightcluster_jax.resize` and `np.repeat`, an explicit
overlap-weighted area average, matplotlib's viridis table, and hand-computed blends.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lightcluster_jax import metrics, viz


def _image(h, w, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


# ----------------------------------------------------------------------------- colours


def test_import_does_not_load_matplotlib():
  code = "import sys, lightcluster_jax.apps.viz; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_voc_palette_is_the_metrics_palette():
  pal = viz.voc_palette()
  np.testing.assert_array_equal(pal, metrics.VOC_PALETTE)
  # Published VOC colours: aeroplane, person, void.
  assert tuple(pal[1]) == (128, 0, 0)
  assert tuple(pal[15]) == (192, 128, 128)
  assert tuple(pal[255]) == (224, 224, 192)
  assert viz.voc_palette(21).shape == (21, 3)
  pal[0] = 7  # a copy: the shared palette is untouched
  assert metrics.VOC_PALETTE[0].tolist() == [0, 0, 0]
  with pytest.raises(ValueError, match="n must be"):
    viz.voc_palette(300)


def test_colorize_matches_palette_lookup():
  labels = np.array([[0, 1, 15], [20, 255, 3]])
  out = viz.colorize(labels)
  for idx in np.ndindex(labels.shape):
    np.testing.assert_array_equal(out[idx], metrics.VOC_PALETTE[labels[idx]])
  pal = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
  np.testing.assert_array_equal(viz.colorize(np.array([[0, 1, 2]]), pal)[0], pal[[0, 1, 0]])


def test_overlay_arithmetic():
  image = np.array([[[100, 100, 100], [100, 100, 100], [10, 20, 30]]], np.uint8)
  labels = np.array([[0, 1, 15]])
  out = viz.overlay(image, labels, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # background untouched
  np.testing.assert_array_equal(out[0, 1], [114, 50, 50])  # (100 + 128) / 2, 100 / 2, 100 / 2
  np.testing.assert_array_equal(out[0, 2], [101, 74, 79])  # (10+192)/2, (20+128)/2, (30+128)/2
  np.testing.assert_array_equal(viz.overlay(image, labels, alpha=0.0), image)
  with pytest.raises(ValueError, match="do not match"):
    viz.overlay(image, np.zeros((2, 3), int))


def test_mask_overlay_arithmetic():
  image = np.full((4, 4, 3), 200, np.uint8)
  mask = np.zeros((4, 4), bool)
  mask[1:3, 1:3] = True
  mask[2, 2] = True
  out = viz.mask_overlay(image, mask, colour=(0, 0, 0), alpha=0.25, dim=0.5, outline=False)
  np.testing.assert_array_equal(out[1, 1], [150, 150, 150])  # 0.75 * 200
  np.testing.assert_array_equal(out[0, 0], [100, 100, 100])  # 0.5 * 200
  big = np.zeros((5, 5), bool)
  big[1:4, 1:4] = True
  img5 = np.full((5, 5, 3), 200, np.uint8)
  out = viz.mask_overlay(img5, big, colour=(10, 20, 30), alpha=0.0, dim=0.0)
  np.testing.assert_array_equal(out[1, 1], [10, 20, 30])  # boundary painted
  np.testing.assert_array_equal(out[2, 2], [200, 200, 200])  # interior: alpha 0
  # A patch-level mask is upsampled to the image.
  small = viz.mask_overlay(_image(8, 12), np.eye(2, 3, dtype=bool))
  assert small.shape == (8, 12, 3)


def test_heatmap_matches_matplotlib_viridis():
  mpl = pytest.importorskip("matplotlib")
  t = np.linspace(0, 1, 256, dtype=np.float32)
  ours = viz.heatmap_rgb(t[None])[0].astype(int)
  ref = np.round(mpl.colormaps["viridis"](t)[:, :3] * 255).astype(int)
  assert np.abs(ours - ref).max() <= 5
  # vmin/vmax rescale and clip; invalid pixels are black.
  x = np.array([[-1.0, 2.0, 3.0]])
  out = viz.heatmap_rgb(x, vmin=2.0, vmax=3.0, valid=np.array([[True, True, False]]))
  np.testing.assert_array_equal(out[0, 0], ours[0])
  np.testing.assert_array_equal(out[0, 1], ours[0])
  np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_cluster_colours():
  a = np.array([[0, 1], [2, 1]])
  out = viz.cluster_colours(a, 3, valid=np.array([[True, True], [True, False]]))
  np.testing.assert_array_equal(out[0, 0], viz.CLUSTER_PALETTE[0])
  np.testing.assert_array_equal(out[0, 1], viz.CLUSTER_PALETTE[1])
  np.testing.assert_array_equal(out[1, 0], viz.CLUSTER_PALETTE[2])
  np.testing.assert_array_equal(out[1, 1], [0, 0, 0])
  assert len({tuple(c) for c in viz.CLUSTER_PALETTE}) == len(viz.CLUSTER_PALETTE)
  with pytest.raises(ValueError, match="outside"):
    viz.cluster_colours(a, 2)
  with pytest.raises(ValueError, match="palette"):
    viz.cluster_colours(a, 50)


def test_matched_labels():
  labels = np.array([[0, 1, 2, 5]])
  out = viz.matched_labels(labels, np.array([0, -1, 7]))
  np.testing.assert_array_equal(out, [[0, 255, 7, 255]])


# ----------------------------------------------------------------------------- grids


def test_upsample_nearest_integer_factor_is_repeat():
  grid = np.arange(12).reshape(3, 4)
  np.testing.assert_array_equal(viz.upsample_nearest(grid, (6, 12)),
                                np.repeat(np.repeat(grid, 2, 0), 3, 1))
  rgb = np.arange(3 * 4 * 3).reshape(3, 4, 3).astype(np.uint8)
  np.testing.assert_array_equal(viz.upsample_nearest(rgb, (9, 8)),
                                np.repeat(np.repeat(rgb, 3, 0), 2, 1))


@pytest.mark.parametrize("grid_hw, out_hw", [((23, 31), (333, 500)), ((32, 24), (375, 281))])
def test_upsample_nearest_matches_resize(grid_hw, out_hw):
  from lightcluster_jax.blocks.resize import resize
  grid = np.random.RandomState(0).randint(0, 50, grid_hw)
  ref = np.asarray(resize(grid.astype(np.float32)[..., None], out_hw, method="nearest"))[..., 0]
  np.testing.assert_array_equal(viz.upsample_nearest(grid, out_hw), ref.astype(grid.dtype))


def _area_oracle(mask, gh, gw):
  """Exact area shares by supersampling: repeating rows gh times and columns gw times puts
  every patch boundary on a pixel boundary, so each patch is a plain H x W block."""
  big = np.repeat(np.repeat(mask.astype(float), gh, 0), gw, 1)
  h, w = mask.shape
  return big.reshape(gh, h, gw, w).mean(axis=(1, 3))


def test_patch_fraction_matches_area_oracle():
  rng = np.random.RandomState(1)
  mask = rng.rand(50, 37) > 0.6
  for gh, gw in [(5, 37), (7, 5), (3, 4)]:
    np.testing.assert_allclose(viz.patch_fraction(mask, (gh, gw)), _area_oracle(mask, gh, gw),
                               atol=1e-5)
  # With a void region: share among valid pixels; a fully void patch is NaN.
  mask = np.zeros((4, 4), bool)
  mask[:2, :1] = True
  valid = np.ones((4, 4), bool)
  valid[:2, 1] = False
  valid[2:, 2:] = False
  out = viz.patch_fraction(mask, (2, 2), valid=valid)
  np.testing.assert_allclose(out[0], [1.0, 0.0])
  assert out[1, 0] == 0.0 and np.isnan(out[1, 1])


# ----------------------------------------------------------------------------- PCA


def _features(n=300, d=24, seed=0):
  rng = np.random.RandomState(seed)
  scales = np.linspace(3.0, 0.2, d)
  return rng.randn(n, d) * scales + rng.randn(d)


def test_pca_matches_sklearn():
  skd = pytest.importorskip("sklearn.decomposition")
  x = _features()
  valid = np.random.RandomState(2).rand(len(x)) > 0.3
  proj, comps, ratio, mean = viz.pca(x, valid, n_components=3)
  ref = skd.PCA(n_components=3, svd_solver="full").fit(x[valid])
  # Same components *including the sign*: both use svd_flip(u_based_decision=False).
  np.testing.assert_allclose(comps, ref.components_, atol=1e-10)
  np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-10)
  np.testing.assert_allclose(mean, ref.mean_, atol=1e-12)
  np.testing.assert_allclose(proj, ref.transform(x), atol=1e-9)  # invalid rows projected too
  assert np.all(np.diff(ratio) <= 0)
  with pytest.raises(ValueError, match="n_components"):
    viz.pca(x[:2], n_components=3)


def _rgb_oracle(x, valid, q):
  from sklearn.decomposition import PCA
  p = PCA(n_components=3, svd_solver="full").fit(x[valid]).transform(x)
  lo = np.quantile(p[valid], q, axis=0)
  hi = np.quantile(p[valid], 1 - q, axis=0)
  out = np.round(np.clip((p - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  out[~valid] = 0
  return out


@pytest.mark.parametrize("q", [0.0, 0.02])
def test_pca_rgb_matches_sklearn_scaling(q):
  pytest.importorskip("sklearn")
  x = _features(n=12 * 10)
  valid = np.ones((12, 10), bool)
  valid[9:] = False
  rgb = viz.pca_rgb(x, valid, clip_quantile=q)
  assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8
  ref = _rgb_oracle(x, valid.reshape(-1), q).reshape(12, 10, 3)
  # Rounding of values within 1e-9 of a .5 boundary may differ by one level.
  assert np.abs(rgb.astype(int) - ref).max() <= 1
  assert (rgb[9:] == 0).all()
  if q == 0.0:  # min-max: every channel reaches both ends over the valid patches
    assert (rgb[:9].reshape(-1, 3).min(0) == 0).all()
    assert (rgb[:9].reshape(-1, 3).max(0) == 255).all()


def test_pca_rgb_properties():
  x = _features(n=8 * 9, d=16, seed=3).reshape(8, 9, 16)
  rgb = viz.pca_rgb(x)
  np.testing.assert_array_equal(viz.pca_rgb(x), rgb)  # deterministic
  np.testing.assert_array_equal(viz.pca_rgb(x.reshape(-1, 16), grid_hw=(8, 9)), rgb)
  # Shift invariance (the PCA is centred).
  np.testing.assert_array_equal(viz.pca_rgb(x + 5.0), rgb)
  # Padding invariance: the same grid inside a larger padded grid with a validity mask.
  padded = np.random.RandomState(9).randn(11, 13, 16) * 100
  padded[:8, :9] = x
  valid = np.zeros((11, 13), bool)
  valid[:8, :9] = True
  out = viz.pca_rgb(padded, valid)
  assert np.abs(out[:8, :9].astype(int) - rgb).max() <= 1
  assert (out[~valid] == 0).all()
  # One component is grey.
  grey = viz.pca_rgb(x, n_components=1)
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  with pytest.raises(ValueError, match="fill"):
    viz.pca_rgb(x.reshape(-1, 16), grid_hw=(7, 9))
  with pytest.raises(ValueError, match="n_components"):
    viz.pca_rgb(x, n_components=4)


# ----------------------------------------------------------------------------- mosaics


def test_mask_grid_layout_and_content():
  a, b, c = _image(10, 20, 0), _image(10, 20, 1), np.zeros((10, 20), bool)
  out = viz.mask_grid([a, b, c], ncols=2, pad=3, background=255)
  assert out.shape == (2 * (10 + 3) + 3, 2 * (20 + 3) + 3, 3)
  np.testing.assert_array_equal(out[3:13, 3:23], a)
  np.testing.assert_array_equal(out[3:13, 26:46], b)
  np.testing.assert_array_equal(out[16:26, 3:23], 0)  # False = black
  np.testing.assert_array_equal(out[16:26, 26:46], 255)  # empty cell = background
  # A patch grid is enlarged blocky (nearest); titles add a bar above every tile.
  grid = np.array([[0, 1], [2, 3]])
  out = viz.mask_grid([viz.cluster_colours(grid, 4)], tile_hw=(4, 4), pad=0)
  np.testing.assert_array_equal(out, viz.upsample_nearest(viz.cluster_colours(grid, 4), (4, 4)))
  titled = viz.mask_grid([a, b], ["first", ""], ncols=2, pad=0)
  assert titled.shape[0] > 10 and titled.shape[1] == 40
  np.testing.assert_array_equal(titled[-10:, :20], a)
  with pytest.raises(ValueError, match="titles"):
    viz.mask_grid([a, b], ["x"])
  with pytest.raises(ValueError, match="cannot draw"):
    viz.mask_grid([np.zeros((2, 2, 2))])


def test_side_by_side_common_height():
  out = viz.side_by_side([_image(20, 40), _image(10, 10), np.ones((5, 10), bool)], height=20,
                         pad=2)
  assert out.shape == (20 + 4, 2 + 40 + 2 + 20 + 2 + 40 + 2, 3)
  np.testing.assert_array_equal(out[2:22, 2:42], _image(20, 40))


def test_stage_panel_tiles():
  img = _image(30, 45)
  mask = np.zeros((2, 3), bool)
  mask[0, 1] = True
  labels = np.zeros((30, 45), np.int32)
  labels[10:20, 10:20] = 3
  prob = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
  rgb = viz.cluster_colours(np.array([[0, 1, 1], [1, 0, 0]]), 2)
  out = viz.stage_panel(img, {"mask": mask, "skipped": None, "prob": prob, "labels": labels,
                              "clusters": rgb}, tile_height=None, pad=2)
  bar = out.shape[0] - 30 - 4
  assert out.shape[1] == 5 * (45 + 2) + 2
  tile = lambda k: out[2 + bar:2 + bar + 30, 2 + k * 47:2 + k * 47 + 45]
  np.testing.assert_array_equal(tile(0), img)
  np.testing.assert_array_equal(tile(1), viz.mask_overlay(img, mask))
  np.testing.assert_array_equal(tile(2), viz.heatmap_rgb(viz.upsample_nearest(prob, (30, 45))))
  np.testing.assert_array_equal(tile(3), viz.overlay(img, labels))
  np.testing.assert_array_equal(tile(4), viz.upsample_nearest(rgb, (30, 45)))
  # Resized tiles, several rows.
  small = viz.stage_panel(img, {"mask": mask, "labels": labels}, tile_height=60, ncols=2)
  assert small.shape[1] == 2 * (90 + 4) + 4
  with pytest.raises(ValueError, match="cluster_colours"):
    viz.stage_panel(img, {"clusters": np.zeros((2, 3), int)})


def test_save_image_round_trip(tmp_path):
  img = _image(17, 23)
  viz.save_image(tmp_path / "a.png", img)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), img)
  smooth = np.tile(np.linspace(0, 255, 23, dtype=np.uint8)[None, :, None], (17, 1, 3))
  viz.save_image(tmp_path / "b.jpg", smooth, quality=95)
  back = np.asarray(Image.open(tmp_path / "b.jpg")).astype(int)
  assert np.abs(back - smooth).mean() < 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.jpg"]  # no temp files


# ----------------------------------------------------------------------------- figures


def test_confusion_heatmap_shows_the_normalised_matrix(tmp_path):
  pytest.importorskip("matplotlib")
  from matplotlib.figure import Figure
  c = np.array([[8, 2, 0, 0], [1, 3, 0, 4], [0, 0, 0, 0]])
  fig = viz.confusion_heatmap(c, ["bg", "cat", "dog"], title="t")
  assert isinstance(fig, Figure)
  data = fig.axes[0].images[0].get_array()
  np.testing.assert_allclose(data[:2], c[:2] / c[:2].sum(1, keepdims=True))
  np.testing.assert_allclose(data[2], 0)  # empty GT row drawn as 0, not NaN
  labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert labels == ["bg", "cat", "dog", "no class"]
  fig.savefig(tmp_path / "cm.png")
  assert Image.open(tmp_path / "cm.png").size[0] > 100
  raw = viz.confusion_heatmap(c, ["bg", "cat", "dog"], normalize=None)
  np.testing.assert_array_equal(raw.axes[0].images[0].get_array(), c)
  with pytest.raises(ValueError, match="class names"):
    viz.confusion_heatmap(c, ["bg"])
  with pytest.raises(ValueError, match="normalize"):
    viz.confusion_heatmap(c, ["bg", "cat", "dog"], normalize="col")


def test_pca_scatter_draws_each_label():
  pytest.importorskip("matplotlib")
  rng = np.random.RandomState(0)
  pts = rng.randn(500, 2)
  lab = (pts[:, 0] > 0).astype(int)
  lab[:10] = -1
  fig = viz.pca_scatter(pts, lab, ["background", "foreground"], max_points=200)
  cols = fig.axes[0].collections
  assert len(cols) == 2
  assert sum(len(c.get_offsets()) for c in cols) == 200
  texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert texts == [f"background ({(lab == 0).sum()})", f"foreground ({(lab == 1).sum()})"]


def test_demo_panel_layout():
  from lightcluster_jax import demo
  img = _image(300, 400)
  rng = np.random.RandomState(0)
  masks = {k: rng.rand(21, 28) > 0.5 for k in ("image", "dataset", "consistent")}
  refined = rng.rand(300, 400) > 0.5
  labels = rng.randint(0, 3, (300, 400)).astype(np.uint8)
  out = demo.panel(img, masks, refined, labels)
  tw = round(400 * 240 / 300)
  assert out.shape[1] == 3 * (tw + 4) + 4
  rows = (out.shape[0] - 4) / 2
  assert rows == int(rows) and rows > 240  # two rows of titled 240-pixel tiles
  # Without the per-level masks: 4 tiles, still 3 per row.
  out4 = demo.panel(img, {"consistent": masks["consistent"]}, refined, labels)
  assert out4.shape == out.shape
