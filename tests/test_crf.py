"""Tests for lightcluster_jax.crf: NumPy mean-field oracle, pydensecrf2 parity, properties."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcluster_jax import crf

# Every call goes through one jitted function (params/backend static) so tests share compiles.
_run = jax.jit(crf.dense_crf, static_argnames=("params", "backend", "return_log"))
_lattice_filter_jit = jax.jit(crf.lattice_filter)

# Small parameters so a 12x10 image has a non-trivial kernel in both terms.
SMALL = crf.CRFParams(iterations=5, spatial_sxy=1.5, spatial_compat=3.0, bilateral_sxy=4.0,
                      bilateral_srgb=30.0, bilateral_compat=5.0)


def _problem(h=12, w=10, c=2, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
  image[: h // 2] //= 4  # some structure: a dark top half
  unary = (scale * rng.normal(size=(h, w, c))).astype(np.float32)
  return unary, image


def _numpy_mean_field(unary, image, p: crf.CRFParams):
  """Direct mean field with dense kernels, float64, pydensecrf conventions."""
  h, w, c = unary.shape
  ys, xs = np.mgrid[:h, :w]
  pos = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float64)
  rgb = image.reshape(-1, 3).astype(np.float64)

  def kt(f):
    k = np.exp(-0.5 * ((f[:, None] - f[None]) ** 2).sum(-1))
    d = k.sum(1)
    return k / np.sqrt(d[:, None] * d[None])

  ks = kt(pos / p.spatial_sxy)
  kb = kt(np.concatenate([pos / p.bilateral_sxy, rgb / p.bilateral_srgb], 1))
  u = unary.reshape(-1, c).astype(np.float64)

  def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  q = softmax(-u)
  for _ in range(p.iterations):
    q = softmax(-u + p.spatial_compat * ks @ q + p.bilateral_compat * kb @ q)
  return q.reshape(h, w, c)


# ---------------------------------------------------------------------------------------------
# Parameters and unaries
# ---------------------------------------------------------------------------------------------


def test_presets_and_overrides():
  m = crf.get_params()
  assert (m.iterations, m.spatial_sxy, m.spatial_compat) == (10, 1.0, 3.0)
  assert (m.bilateral_sxy, m.bilateral_srgb, m.bilateral_compat) == (67.0, 3.0, 4.0)
  k = crf.get_params("krahenbuhl", iterations=7)
  assert (k.iterations, k.spatial_sxy, k.bilateral_sxy, k.bilateral_srgb,
          k.bilateral_compat) == (7, 3.0, 80.0, 13.0, 10.0)
  assert crf.PRESETS["krahenbuhl"].iterations == 5  # presets are not mutated
  with pytest.raises(ValueError, match="bilateral_srbg"):
    crf.get_params(bilateral_srbg=3)
  with pytest.raises(ValueError, match="cutler"):
    crf.get_params("cutler")
  with pytest.raises(dataclasses.FrozenInstanceError):
    m.iterations = 3


def test_unaries_match_pydensecrf_formulas():
  p = np.array([[[0.2, 0.8], [1.0, 0.0]]], np.float32)
  np.testing.assert_allclose(crf.unary_from_probs(p), -np.log(np.clip(p, 1e-5, 1)), rtol=1e-6)
  lab = np.array([[0, 2, 1, -1]])
  u = np.asarray(crf.unary_from_labels(lab, 3, 0.7))
  pos, neg = -np.log(0.7), -np.log(0.3 / 2)
  np.testing.assert_allclose(u[0, 0], [pos, neg, neg], rtol=1e-6)
  np.testing.assert_allclose(u[0, 1], [neg, neg, pos], rtol=1e-6)
  np.testing.assert_allclose(u[0, 3], [np.log(3)] * 3, rtol=1e-6)  # negative = unsure
  # pydensecrf's zero_unsure convention: 0 = unsure, label l -> class l - 1.
  z = np.asarray(crf.unary_from_labels(lab, 3, 0.7, zero_unsure=True))
  np.testing.assert_allclose(z[0, 0], [np.log(3)] * 3, rtol=1e-6)
  np.testing.assert_allclose(z[0, 2], [pos, neg, neg], rtol=1e-6)
  with pytest.raises(ValueError, match="gt_prob"):
    crf.unary_from_labels(lab, 3, 1.0)


# ---------------------------------------------------------------------------------------------
# Exactness and backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", crf.BACKENDS)
def test_zero_pairwise_weights_give_softmax_of_minus_unary(backend):
  unary, image = _problem(c=3)
  ref = jax.nn.softmax(-unary, axis=-1)
  for p in (dataclasses.replace(SMALL, spatial_compat=0.0, bilateral_compat=0.0),
            dataclasses.replace(SMALL, iterations=0)):
    q = _run(unary, image, params=p, backend=backend)
    np.testing.assert_allclose(q, ref, atol=1e-7)


@pytest.mark.parametrize("c", [2, 3])
def test_exact_matches_numpy_mean_field(c):
  unary, image = _problem(c=c, seed=c)
  ref = _numpy_mean_field(unary, image, SMALL)
  q = _run(unary, image, params=SMALL, backend="exact")
  np.testing.assert_allclose(q, ref, atol=1e-5)
  logq = _run(unary, image, params=SMALL, backend="exact", return_log=True)
  np.testing.assert_allclose(np.exp(logq), ref, atol=1e-5)


def test_exact_matches_numpy_with_preset_widths():
  unary, image = _problem(seed=3)
  p = crf.get_params("krahenbuhl")
  np.testing.assert_allclose(_run(unary, image, params=p, backend="exact"),
                             _numpy_mean_field(unary, image, p), atol=1e-5)


def test_window_converges_to_exact():
  unary, image = _problem(h=14, w=12, seed=4)
  p = dataclasses.replace(SMALL, iterations=3, window_downsample=1)
  exact = np.asarray(_run(unary, image, params=p, backend="exact"))
  mean_err, max_err = [], []
  for r in (1, 2, 4, 6, 13):
    q = np.asarray(_run(unary, image, params=dataclasses.replace(p, window_radius=r),
                                 backend="window"))
    mean_err.append(float(np.abs(q - exact).mean()))
    max_err.append(float(np.abs(q - exact).max()))
  assert mean_err[0] > 1e-2, mean_err  # a 3x3 window really truncates
  assert all(a > b for a, b in zip(mean_err, mean_err[1:])), mean_err
  assert max_err[-1] < 1e-4, max_err  # the window covers the image: exact


def _disc_problem(seed=5, h=40, w=48):
  """A noisy disc on a colour ramp with a noisy, weak unary: the CRF has work to do."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[:h, :w]
  disc = (xs - 24) ** 2 + (ys - 20) ** 2 < 150
  image = np.stack([128 + 100 * disc, 3 * xs, np.full_like(xs, 80)], -1).astype(np.float64)
  image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
  p = np.clip(0.5 + 0.3 * (disc - 0.5) + rng.normal(0, 0.25, (h, w)), 0.05, 0.95)
  return np.asarray(crf.unary_from_probs(np.stack([1 - p, p], -1))), image


def test_lattice_close_to_exact():
  # The lattice approximates the Gaussian kernels (like pydensecrf's); against the exact dense
  # CRF it must give (nearly) the same marginals on a problem where the CRF changes labels.
  unary, image = _disc_problem()
  q_lat = np.asarray(_run(unary, image, params=SMALL, backend="lattice"))
  q_ex = np.asarray(_run(unary, image, params=SMALL, backend="exact"))
  assert np.mean((-unary).argmax(-1) != q_ex.argmax(-1)) > 0.1
  assert np.mean(q_lat.argmax(-1) == q_ex.argmax(-1)) > 0.995
  assert np.abs(q_lat - q_ex).mean() < 1e-3


def test_lattice_filter_approximates_gaussian_filter():
  rng = np.random.default_rng(13)
  f = rng.normal(size=(400, 5)) * 2
  v = rng.random((400, 1))
  ours = np.asarray(_lattice_filter_jit(jnp.asarray(f, jnp.float32), jnp.asarray(v, jnp.float32)))
  k = np.exp(-0.5 * ((f[:, None] - f[None]) ** 2).sum(-1))
  d = k.sum(1)
  ref = (k / np.sqrt(d[:, None] * d[None])) @ v
  assert np.corrcoef(ours[:, 0], ref[:, 0])[0, 1] > 0.9
  # Invalid points neither send nor receive.
  valid = np.arange(400) % 3 > 0
  part = np.asarray(_lattice_filter_jit(jnp.asarray(f, jnp.float32), jnp.asarray(v, jnp.float32),
                                       jnp.asarray(valid)))
  alone = np.asarray(_lattice_filter_jit(jnp.asarray(f[valid], jnp.float32),
                                        jnp.asarray(v[valid], jnp.float32)))
  np.testing.assert_allclose(part[valid], alone, atol=1e-5)
  assert np.all(part[~valid] == 0)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_spatial_filter_matches_truncated_dense_gaussian(sigma):
  # Oracle: the dense [HW, HW] Gaussian of pixel positions in float64, cut at 4 sigma per axis
  # (the separable filter's truncation), zero outside the array. Tolerance 1e-5 (float32).
  rng = np.random.default_rng(21)
  x = rng.random((2, 23, 31))
  r = int(np.ceil(4.0 * sigma))
  t = np.arange(-r, r + 1)
  taps = np.exp(-0.5 * (t / sigma) ** 2)
  ky = np.zeros((23, 23))
  kx = np.zeros((31, 31))
  for k, tap in zip(t, taps):
    ky += tap * np.eye(23, k=k)
    kx += tap * np.eye(31, k=k)
  ref = np.einsum("ij,cjk,lk->cil", ky, x, kx)
  ours = np.asarray(crf.spatial_filter(jnp.asarray(x, jnp.float32), sigma))
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["superpixel", "lattice", "window"])
def test_spatial_term_matches_numpy_mean_field_with_padding(backend):
  # Spatial kernel only: these backends share the separable filter and its normaliser (1-D
  # factors for the valid rectangle). Oracle: the dense NumPy mean field on the valid region;
  # 1e-4 covers the 4-sigma truncation.
  unary, image = _problem(seed=11, scale=2.0)
  p = dataclasses.replace(SMALL, bilateral_compat=0.0)
  ref = _numpy_mean_field(unary, image, p)
  big_u = np.zeros((16, 13, 2), np.float32)
  big_i = np.zeros((16, 13, 3), np.uint8)
  big_u[:12, :10], big_i[:12, :10] = unary, image
  q = np.asarray(_run(big_u, big_i, params=p, backend=backend, valid_hw=(12, 10)))
  np.testing.assert_allclose(q[:12, :10], ref, atol=1e-4)


def test_lattice_filter_vjp_is_the_transpose():
  rng = np.random.default_rng(6)
  f = jnp.asarray(rng.normal(size=(60, 5)) * 1.5, jnp.float32)
  g = jnp.asarray(rng.normal(size=(1, 60)), jnp.float32)

  @jax.jit
  def matrix_and_vjp(f, g):
    lat = crf._lattice_build(f.T, jnp.ones((60,), bool))
    cols = jax.vmap(lambda e: crf._lattice_filter(lat, e[None])[0])(jnp.eye(60))  # [i] = A e_i
    _, vjp = jax.vjp(lambda v: crf._lattice_filter(lat, v), jnp.zeros((1, 60)))
    return cols.T, vjp(g)[0][0]

  a, vjp_g = matrix_and_vjp(f, g)
  np.testing.assert_allclose(vjp_g, np.asarray(a).T @ np.asarray(g[0]), atol=1e-4)
  assert np.abs(np.asarray(a) - np.asarray(a).T).max() > 1e-4  # not trivially symmetric


# ---------------------------------------------------------------------------------------------
# Padding, batching, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,extra", [("lattice", {}), ("exact", {}),
                                           ("superpixel", {"superpixel_size": 3}),
                                           ("window", {"window_downsample": 1}),
                                           ("window", {"window_downsample": 2})])
def test_padding_invariance(backend, extra):
  unary, image = _problem(seed=7)
  p = dataclasses.replace(SMALL, window_radius=3, **extra)
  ref = np.asarray(_run(unary, image, params=p, backend=backend))
  rng = np.random.default_rng(8)
  big_u = rng.normal(size=(17, 15, 2)).astype(np.float32) * 5  # garbage padding
  big_i = rng.integers(0, 256, size=(17, 15, 3)).astype(np.uint8)
  big_u[:12, :10], big_i[:12, :10] = unary, image
  q = np.asarray(_run(big_u, big_i, params=p, backend=backend, valid_hw=(12, 10)))
  np.testing.assert_allclose(q[:12, :10], ref, atol=2e-5)
  # Padded pixels receive nothing: they keep softmax(-U).
  pad = np.ones((17, 15), bool)
  pad[:12, :10] = False
  np.testing.assert_allclose(q[pad], np.asarray(jax.nn.softmax(-big_u, -1))[pad], atol=1e-6)


@pytest.mark.parametrize("backend", ["lattice", "exact", "superpixel"])
def test_batch_equals_per_image(backend):
  u1, i1 = _problem(seed=9)
  u2, i2 = _problem(h=9, w=7, seed=10)
  unary = np.zeros((2, 12, 10, 2), np.float32)
  images = np.zeros((2, 12, 10, 3), np.uint8)
  unary[0], images[0] = u1, i1
  unary[1, :9, :7], images[1, :9, :7] = u2, i2
  valid = jnp.array([[12, 10], [9, 7]])
  fn = jax.jit(lambda u, im, v: crf.dense_crf_batch(u, im, v, params=SMALL, backend=backend))
  q = np.asarray(fn(unary, images, valid))
  np.testing.assert_allclose(q[0], _run(u1, i1, params=SMALL, backend=backend),
                             atol=2e-5)
  np.testing.assert_allclose(q[1, :9, :7], _run(u2, i2, params=SMALL, backend=backend),
                             atol=2e-5)
  # Plain jax.vmap of dense_crf works too (traced valid sizes).
  vm = jax.jit(jax.vmap(lambda u, im, v: crf.dense_crf(u, im, params=SMALL, backend=backend,
                                                       valid_hw=v)))(unary, images, valid)
  np.testing.assert_allclose(vm, q, atol=2e-5)


@pytest.mark.parametrize("backend", crf.BACKENDS)
def test_gradients_are_finite_and_correct(backend):
  unary, image = _problem(h=8, w=7, seed=11, scale=0.5)
  p = dataclasses.replace(SMALL, iterations=3, window_downsample=1, window_radius=2)
  target = jnp.asarray(np.random.default_rng(12).random((8, 7, 2)), jnp.float32)

  @jax.jit
  def loss(u, im):
    return jnp.sum(crf.dense_crf(u, im, params=p, backend=backend) * target)

  gu, gi = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(unary),
                                                   jnp.asarray(image, jnp.float32))
  assert np.all(np.isfinite(gu)) and np.all(np.isfinite(gi))
  assert float(jnp.abs(gu).max()) > 0
  # Central differences on a few unary entries (float32: eps 1e-2, loose tolerance).
  im = jnp.asarray(image, jnp.float32)
  for idx in [(0, 0, 0), (3, 4, 1), (7, 6, 0)]:
    e = np.zeros_like(unary)
    e[idx] = 1e-2
    fd = (loss(unary + e, im) - loss(unary - e, im)) / 2e-2
    np.testing.assert_allclose(float(gu[idx]), float(fd), rtol=1e-2, atol=1e-3)
  if backend not in ("lattice", "superpixel"):
    assert float(jnp.abs(gi).max()) > 0


def test_bad_inputs_are_reported():
  unary, image = _problem()
  with pytest.raises(ValueError, match="backend"):
    _run(unary, image, backend="permutohedral")
  with pytest.raises(ValueError, match="image"):
    _run(unary, image[:, :5])
  with pytest.raises(ValueError, match="unary"):
    _run(unary[..., 0], image)


# ---------------------------------------------------------------------------------------------
# Parity with pydensecrf2
# ---------------------------------------------------------------------------------------------


def _pydensecrf():
  try:
    import pydensecrf.densecrf as dcrf  # pylint: disable=import-outside-toplevel
  except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"pydensecrf2 is not importable ({err}); pip install pydensecrf2")
  return dcrf


def _voc_crop(assets, voc_ids):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  voc = assets / "voc2012"
  i = voc_ids[0]
  image = np.array(Image.open(next((voc / "JPEGImages").glob(i + ".*"))).convert("RGB"))
  gt = np.asarray(Image.open(voc / "SegmentationClass" / (i + ".png")))
  image, gt = image[60:180, 150:310], gt[60:180, 150:310]  # object boundary inside
  fg = np.where(gt == 255, 0.5, (gt > 0).astype(np.float32))
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  fg = np.clip(ndimage.gaussian_filter(fg, 4.0), 0.05, 0.95)
  return np.ascontiguousarray(image), np.stack([1 - fg, fg], -1).astype(np.float32)


def _pydensecrf_q(dcrf, image, probs, p):
  h, w, c = probs.shape
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(np.ascontiguousarray(
      -np.log(np.clip(np.moveaxis(probs, -1, 0).reshape(c, -1), 1e-5, 1)).astype(np.float32)))
  if p.spatial_compat:
    d.addPairwiseGaussian(sxy=p.spatial_sxy, compat=p.spatial_compat)
  if p.bilateral_compat:
    d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=image,
                           compat=p.bilateral_compat)
  return np.moveaxis(np.array(d.inference(p.iterations)).reshape(c, h, w), 0, -1)


@pytest.mark.oracle
@pytest.mark.parametrize("preset", ["maskcontrast", "krahenbuhl"])
def test_lattice_agrees_with_pydensecrf(assets, voc_ids, preset):
  dcrf = _pydensecrf()
  image, probs = _voc_crop(assets, voc_ids)
  p = crf.get_params(preset)
  ref = _pydensecrf_q(dcrf, image, probs, p)
  q = np.asarray(_run(crf.unary_from_probs(probs), image, params=p, backend="lattice"))
  agree = np.mean(q.argmax(-1) == ref.argmax(-1))
  assert agree >= 0.999, agree
  # The superpixel backend moves features by up to a 4 px cell: on this 120x160 crop, edges
  # are a larger share of the pixels than on full images (benchmarks/crf.py: >= 98%).
  q = np.asarray(_run(crf.unary_from_probs(probs), image, params=p, backend="superpixel"))
  assert np.mean(q.argmax(-1) == ref.argmax(-1)) >= 0.95
  # The pydensecrf run changes labels: the test is not the unary argmax in disguise.
  assert np.mean(probs.argmax(-1) != ref.argmax(-1)) > 0.003


@pytest.mark.oracle
def test_bilateral_message_reproduces_pydensecrf_lattice(assets, voc_ids):
  """One iteration with only the bilateral term exposes pydensecrf's filtered message."""
  dcrf = _pydensecrf()
  image, probs = _voc_crop(assets, voc_ids)
  p = crf.get_params("maskcontrast", iterations=1, spatial_compat=0.0, bilateral_compat=1.0)
  ref = _pydensecrf_q(dcrf, image, probs, p)
  u = np.asarray(crf.unary_from_probs(probs))
  msg_ref = np.log(ref[..., 1] / ref[..., 0]) + (u[..., 1] - u[..., 0])
  q = np.asarray(_run(u, image, params=p, backend="lattice"), np.float64)
  msg = np.log(q[..., 1] / q[..., 0]) + (u[..., 1] - u[..., 0])
  np.testing.assert_allclose(msg, msg_ref, atol=2e-3)
  assert np.abs(msg_ref).max() > 0.1


# ---------------------------------------------------------------------------------------------
# The superpixel backend
# ---------------------------------------------------------------------------------------------


def test_superpixel_with_one_pixel_cells_is_the_lattice():
  # Cells of one pixel and no colour split: every lattice point is a pixel, so the backend
  # must reproduce the pixel lattice exactly (same points, weights 1).
  unary, image = _disc_problem()
  p = dataclasses.replace(SMALL, superpixel_size=1, superpixel_split=False, superpixel_corners=6)
  q_sp = np.asarray(_run(unary, image, params=p, backend="superpixel"))
  q_lat = np.asarray(_run(unary, image, params=p, backend="lattice"))
  np.testing.assert_allclose(q_sp, q_lat, atol=1e-5)


def test_superpixel_split_keeps_an_edge_inside_a_cell():
  # A vertical colour edge through the middle of every 4x4 cell: without the split the
  # cells average both colours and the bilateral term leaks across the edge; with it each
  # side is its own lattice point and the result matches the pixel lattice.
  h, w = 24, 26
  image = np.zeros((h, w, 3), np.uint8)
  image[:, 14:] = 200                                        # edge at x = 14 (mid-cell)
  p_fg = np.where(np.arange(w)[None, :] >= 14, 0.7, 0.3) * np.ones((h, 1))
  p_fg[:, 10:18] = 0.5                                       # the unary is unsure near the edge
  unary = np.asarray(crf.unary_from_probs(np.stack([1 - p_fg, p_fg], -1).astype(np.float32)))
  p = crf.get_params("maskcontrast", superpixel_size=4)
  lat = np.asarray(_run(unary, image, params=p, backend="lattice")).argmax(-1)
  split = np.asarray(_run(unary, image, params=p, backend="superpixel")).argmax(-1)
  mixed = np.asarray(_run(unary, image, params=dataclasses.replace(p, superpixel_split=False),
                          backend="superpixel")).argmax(-1)
  assert np.array_equal(lat, (np.arange(w)[None, :] >= 14) * np.ones((h, 1), int))
  assert np.array_equal(split, lat)
  assert not np.array_equal(mixed, lat)


def test_superpixel_agrees_with_lattice_on_a_photo(assets, voc_ids):
  image, probs = _voc_crop(assets, voc_ids)
  unary = np.asarray(crf.unary_from_probs(probs))
  for preset in ("maskcontrast", "krahenbuhl"):
    p = crf.get_params(preset)
    lat = np.asarray(_run(unary, image, params=p, backend="lattice")).argmax(-1)
    sp = np.asarray(_run(unary, image, params=p, backend="superpixel")).argmax(-1)
    assert np.mean(lat != probs.argmax(-1)) > 0.003         # the CRF does change labels
    assert np.mean(sp == lat) >= 0.95, (preset, np.mean(sp == lat))  # see above


def test_superpixel_cell_padding_and_xla_options_change_nothing():
  """A 14 x 11 image (not whole 4 px cells) is padded to 16 x 12 inside `dense_crf`: it equals
  the result of padding by hand with valid_hw; and `XLA_OPTIONS` only changes the speed."""
  unary, image = _problem(h=14, w=11, seed=21)
  p = dataclasses.replace(SMALL, superpixel_size=4)
  q = np.asarray(_run(unary, image, params=p, backend="superpixel"))
  big_u = np.zeros((16, 12, 2), np.float32)
  big_i = np.zeros((16, 12, 3), np.uint8)
  big_u[:14, :11], big_i[:14, :11] = unary, image
  by_hand = np.asarray(jax.jit(lambda u, im: crf.dense_crf(
      u, im, params=p, backend="superpixel", valid_hw=(14, 11)))(big_u, big_i))[:14, :11]
  np.testing.assert_allclose(q, by_hand, atol=1e-6)
  opts = np.asarray(jax.jit(lambda u, im: crf.dense_crf(u, im, params=p, backend="superpixel"),
                            compiler_options=crf.XLA_OPTIONS)(unary, image))
  np.testing.assert_allclose(opts, q, atol=1e-5)
