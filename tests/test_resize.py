"""Tests for lightcluster_jax.resize against torch.nn.functional.interpolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcluster_jax.blocks.resize import resize, upsample_labels, upsample_probs

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_resize(x, size, method):
  """x [h, w, c] numpy -> [H, W, c] via PyTorch (align_corners=False where it applies)."""
  t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].double()
  kw = {} if method == "nearest" else {"align_corners": False}
  out = F.interpolate(t, size=tuple(int(s) for s in size), mode=method, **kw)
  return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("method", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (23, 31)), ((32, 24), (448, 336)),
                                         ((17, 13), (6, 9)), ((8, 8), (8, 8))])
def test_resize_matches_torch(method, in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=in_hw + (3,)).astype(np.float32)
  ours = np.asarray(resize(jnp.asarray(x), out_hw, method=method))
  np.testing.assert_allclose(ours, _torch_resize(x, out_hw, method), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("in_hw,factors", [((14, 14), (20.1 / 14, 9.1 / 14)),
                                           ((37, 37), (16.1 / 37, 50.1 / 37)),
                                           ((5, 7), (2.3, 0.75))])
def test_scale_factor_matches_torch(method, in_hw, factors):
  # interpolate(scale_factor=s) samples with 1/s, not with in/out (DINO's pos-embed call).
  rng = np.random.default_rng(3)
  x = rng.normal(size=in_hw + (2,)).astype(np.float32)
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  kw = {} if method == "nearest" else {"align_corners": False}
  ref = F.interpolate(t, scale_factor=factors, mode=method, **kw)[0].permute(1, 2, 0).numpy()
  out_hw = ref.shape[:2]
  assert out_hw == tuple(int(n * f) for n, f in zip(in_hw, factors))
  ours = resize(jnp.asarray(x), out_hw, method=method, scale_factor=factors)
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
  traced = jax.jit(lambda v, s: resize(v, out_hw, method=method, scale_factor=(s[0], s[1])))(
      jnp.asarray(x), jnp.asarray(factors, jnp.float32))
  np.testing.assert_allclose(traced, ref, atol=2e-5, rtol=0)
  if method != "nearest":  # the size= call samples elsewhere: the test can fail
    by_size = _torch_resize(x, out_hw, method)
    assert np.abs(by_size - ref).max() > 1e-2


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_upsample_probs_padded_batch_matches_torch_per_image(method):
  rng = np.random.default_rng(1)
  x = rng.random((3, 12, 10, 2)).astype(np.float32)
  in_hw = np.array([[12, 10], [7, 9], [4, 3]])
  out_hw = np.array([[96, 80], [49, 70], [30, 17]])
  # Garbage in the padding must not leak into the valid outputs.
  for b, (h, w) in enumerate(in_hw):
    x[b, h:] = 1e6
    x[b, :, w:] = -1e6
  y = np.asarray(upsample_probs(jnp.asarray(x), (100, 80), in_valid_hw=in_hw,
                                out_valid_hw=out_hw, method=method))
  assert y.shape == (3, 100, 80, 2)
  for b in range(3):
    (h, w), (oh, ow) = in_hw[b], out_hw[b]
    ref = _torch_resize(x[b, :h, :w], (oh, ow), method)
    np.testing.assert_allclose(y[b, :oh, :ow], ref, atol=2e-5, rtol=1e-5)
    assert np.all(y[b, oh:] == 0) and np.all(y[b, :, ow:] == 0)


def test_upsample_labels_padded_batch_matches_torch_nearest():
  rng = np.random.default_rng(2)
  lab = rng.integers(0, 100_000, size=(2, 9, 11)).astype(np.int32)  # large ids stay exact
  in_hw = np.array([[9, 11], [5, 6]])
  out_hw = np.array([[37, 50], [20, 13]])
  y = np.asarray(upsample_labels(jnp.asarray(lab), (40, 50), in_valid_hw=in_hw,
                                 out_valid_hw=out_hw, fill_value=255))
  assert y.dtype == np.int32
  for b in range(2):
    (h, w), (oh, ow) = in_hw[b], out_hw[b]
    ref = _torch_resize(lab[b, :h, :w, None].astype(np.float64), (oh, ow), "nearest")[..., 0]
    np.testing.assert_array_equal(y[b, :oh, :ow], ref.astype(np.int32))
    assert np.all(y[b, oh:] == 255) and np.all(y[b, :, ow:] == 255)


def test_one_compilation_serves_all_valid_sizes():
  traces = []

  @jax.jit
  def f(x, ivh, ovh):
    traces.append(1)
    return upsample_probs(x, (64, 64), in_valid_hw=ivh, out_valid_hw=ovh)

  x = jnp.ones((2, 8, 8, 1))
  a = f(x, jnp.array([[8, 8], [4, 6]]), jnp.array([[64, 64], [30, 50]]))
  b = f(x, jnp.array([[3, 8], [8, 2]]), jnp.array([[20, 64], [64, 9]]))
  assert len(traces) == 1
  # A constant input upsamples to the constant on the valid region, zero elsewhere.
  assert float(a[1, :30, :50].min()) == pytest.approx(1.0)
  assert float(a[1, 30:].max()) == 0.0 and float(b[1, :, 9:].max()) == 0.0


def test_bad_valid_shape_is_reported():
  with pytest.raises(ValueError, match="in_valid_hw"):
    upsample_probs(jnp.ones((2, 4, 4, 1)), (8, 8), in_valid_hw=jnp.array([4, 4]))
  with pytest.raises(ValueError, match="out_valid_hw"):
    upsample_labels(jnp.ones((2, 4, 4), jnp.int32), (8, 8), out_valid_hw=jnp.ones((3, 2)))
