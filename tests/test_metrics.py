"""Tests for lightcluster_jax.metrics against NumPy / SciPy oracles and hand-made cases."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy.optimize import linear_sum_assignment

from lightcluster_jax import metrics as M


def np_confusion(pred, gt, num_pred, num_gt, ignore=255, valid=None):
  """Independent oracle: explicit loop-free bincount in NumPy int64."""
  shape = np.shape(gt)
  pred, gt = np.ravel(pred).astype(np.int64), np.ravel(gt).astype(np.int64)
  keep = (gt != ignore) & (gt >= 0) & (gt < num_gt) & (pred >= 0) & (pred < num_pred)
  if valid is not None:
    keep &= np.ravel(np.broadcast_to(valid, shape))
  idx = gt[keep] * num_pred + pred[keep]
  return np.bincount(idx, minlength=num_gt * num_pred).reshape(num_gt, num_pred)


def np_iou(c):
  c = c.astype(np.float64)
  union = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
  return np.where(union > 0, c / np.maximum(union, 1), 0.0)


# ---------------------------------------------------------------------------- confusion


@pytest.mark.parametrize("xp", [np, jnp], ids=["host", "jax"])
@pytest.mark.parametrize("num_pred,num_gt", [(21, 21), (5, 21), (30, 7)])
def test_confusion_matrix_matches_numpy_bincount(num_pred, num_gt, xp):
  rng = np.random.default_rng(num_pred * 100 + num_gt)
  gt = rng.integers(0, num_gt, (3, 17, 23))
  gt[rng.random(gt.shape) < 0.1] = 255
  pred = rng.integers(-1, num_pred + 2, gt.shape)  # includes out-of-range ids, dropped
  valid = rng.random(gt.shape) < 0.9
  got = M.confusion_matrix(xp.asarray(pred), xp.asarray(gt), num_pred=num_pred, num_gt=num_gt,
                           valid=xp.asarray(valid))
  assert isinstance(got, jax.Array) == (xp is jnp)
  got = np.asarray(got)
  want = np_confusion(pred, gt, num_pred, num_gt, valid=valid)
  assert got.shape == (num_gt, num_pred)
  np.testing.assert_array_equal(got, want)
  assert got.sum() < gt.size  # something was actually dropped


def test_confusion_ignores_255_and_padding_invariant():
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 4, (9, 11))
  pred = rng.integers(0, 6, (9, 11))
  ref = np.asarray(M.confusion_matrix(pred, gt, num_pred=6, num_gt=4))
  # Pad to 16x16 three ways: valid mask, gt=255, pred sentinel -1; counts must not move.
  pad_pred = np.full((16, 16), 3)
  pad_gt = np.full((16, 16), 2)
  pad_pred[:9, :11], pad_gt[:9, :11] = pred, gt
  valid = np.zeros((16, 16), bool)
  valid[:9, :11] = True
  a = M.confusion_matrix(pad_pred, pad_gt, num_pred=6, num_gt=4, valid=valid)
  b = M.confusion_matrix(pad_pred, np.where(valid, pad_gt, 255), num_pred=6, num_gt=4)
  c = M.confusion_matrix(np.where(valid, pad_pred, -1), pad_gt, num_pred=6, num_gt=4)
  for x in (a, b, c):
    np.testing.assert_array_equal(np.asarray(x), ref)


def test_confusion_accumulator_sums_batches_and_rejects_bad_labels():
  rng = np.random.default_rng(1)
  sizes = [(2, 8, 8), (1, 13, 7), (3, 5, 9)]  # ragged: jax inputs are padded to buckets
  gts = [rng.integers(0, 3, s) for s in sizes]
  preds = [rng.integers(0, 4, s) for s in sizes]
  valids = [rng.random(s) < 0.8 for s in sizes]
  want = sum(np_confusion(p, g, 4, 3, valid=v) for p, g, v in zip(preds, gts, valids))
  for xp in (np, jnp):
    acc = M.ConfusionAccumulator(num_pred=4, num_gt=3)
    for p, g, v in zip(preds, gts, valids):
      acc.update(xp.asarray(p), xp.asarray(g), xp.asarray(v))
    np.testing.assert_array_equal(acc.total, want)
    assert acc.total.dtype == np.int64
  with pytest.raises(ValueError, match=r"img7.*\[7\]"):
    acc.update(np.zeros((2, 2), int), np.array([[0, 7], [1, 255]]), name="img7")


def test_confusion_matrix_shape_mismatch_message():
  with pytest.raises(ValueError, match="pred shape"):
    M.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), num_pred=2, num_gt=2)


# ---------------------------------------------------------------------------- Hungarian


@pytest.mark.parametrize("g,k", [(6, 6), (21, 21), (5, 9), (9, 5), (1, 4), (4, 1)])
def test_hungarian_total_iou_equals_scipy(g, k):
  rng = np.random.default_rng(g * 31 + k)
  for _ in range(3):
    conf = rng.integers(0, 1000, (g, k)) * (rng.random((g, k)) < 0.6)
    mapping = np.asarray(M.hungarian_match(jnp.asarray(conf)))
    assert mapping.shape == (k,)
    matched = mapping[mapping >= 0]
    assert len(matched) == min(g, k) and len(set(matched.tolist())) == len(matched)  # 1-to-1
    iou = np_iou(conf)
    ours = sum(iou[mapping[j], j] for j in range(k) if mapping[j] >= 0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    np.testing.assert_allclose(ours, iou[rows, cols].sum(), rtol=1e-5, atol=1e-6)


def test_hungarian_recovers_permutation_and_scores_are_permutation_invariant():
  rng = np.random.default_rng(2)
  gt = rng.integers(0, 5, (40, 40))
  perm = rng.permutation(5)
  pred = perm[gt]  # a perfect segmentation with relabelled ids
  conf = M.confusion_matrix(pred, gt, num_pred=5, num_gt=5)
  mapping = np.asarray(M.hungarian_match(conf))
  np.testing.assert_array_equal(mapping[perm], np.arange(5))
  s = M.segmentation_scores(conf)
  assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0 and s["num_classes"] == 5
  # A noisy prediction scores the same whatever the cluster numbering.
  noisy = np.where(rng.random(gt.shape) < 0.3, rng.integers(0, 7, gt.shape), gt)
  base = M.segmentation_scores(M.confusion_matrix(noisy, gt, num_pred=7, num_gt=5))
  perm7 = rng.permutation(7)
  shuffled = M.segmentation_scores(M.confusion_matrix(perm7[noisy], gt, num_pred=7, num_gt=5))
  assert shuffled["miou"] == pytest.approx(base["miou"], abs=1e-12)
  assert shuffled["pixel_acc"] == pytest.approx(base["pixel_acc"], abs=1e-12)


def test_hungarian_is_jittable_and_vmappable():
  conf = jnp.asarray(np.random.default_rng(3).integers(0, 50, (4, 3, 6)))
  batched = jax.vmap(M.hungarian_match)(conf)
  for i in range(4):
    np.testing.assert_array_equal(batched[i], M.hungarian_match(conf[i]))


# ---------------------------------------------------------------------------- scores


def test_scores_hand_computed_partial_overlap():
  gt = np.array([0, 0, 0, 1, 1, 1])
  pred = np.array([0, 0, 1, 1, 1, 0])
  conf = M.confusion_matrix(pred, gt, num_pred=2, num_gt=2)
  np.testing.assert_array_equal(conf, [[2, 1], [1, 2]])
  s = M.segmentation_scores(conf, match="identity", class_names=["bg", "cat"])
  # IoU_0 = 2 / (3 + 3 - 2) = 0.5, IoU_1 = 0.5; accuracy 4/6.
  assert s["per_class_iou"] == {"bg": 0.5, "cat": 0.5}
  assert s["miou"] == 0.5 and s["pixel_acc"] == pytest.approx(4 / 6)


def test_scores_extra_cluster_counts_as_wrong_pixels_of_no_class():
  gt = np.array([0, 0, 0, 0, 1, 1, 1, 1, 255, 255])
  pred = np.array([0, 0, 0, 2, 1, 1, 1, 1, 2, 0])  # the 255 pixels must not matter
  conf = M.confusion_matrix(pred, gt, num_pred=3, num_gt=2)
  s = M.segmentation_scores(conf)
  np.testing.assert_array_equal(s["mapping"], [0, 1, -1])
  # Class 0: TP 3, GT 4, predicted-as-0 3 -> 3 / 4; class 1: 4 / 4.
  np.testing.assert_allclose(s["iou"], [0.75, 1.0])
  assert s["miou"] == pytest.approx(0.875) and s["pixel_acc"] == pytest.approx(7 / 8)
  assert s["num_pixels"] == 8


def test_scores_classes_all_vs_present():
  # 4 classes, class 3 has no GT pixel; class 2 neither GT nor prediction after matching.
  gt = np.array([0] * 6 + [1] * 4)
  pred = np.array([0, 0, 0, 0, 3, 3, 1, 1, 1, 0])
  conf = M.confusion_matrix(pred, gt, num_pred=4, num_gt=4)
  s_all = M.segmentation_scores(conf, classes="all")
  s_present = M.segmentation_scores(conf, classes="present")
  # Hungarian: 0->0 (IoU 4/7), 1->1 (3/4); cluster 3 goes to an absent class in "all".
  iou0, iou1 = 4 / 7, 3 / 4
  # "all": class 3 (or 2) got cluster 3's 2 pixels -> IoU 0 and is averaged; the other
  # absent class has an empty union and is left out.
  assert s_all["num_classes"] == 3
  assert s_all["miou"] == pytest.approx((iou0 + iou1 + 0.0) / 3)
  # "present": only classes 0 and 1; cluster 3 is unmatched (its pixels are just wrong).
  assert s_present["num_classes"] == 2
  assert s_present["miou"] == pytest.approx((iou0 + iou1) / 2)
  assert s_present["mapping"][3] == -1
  assert np.isnan(s_present["per_class_iou"]["3"]) and np.isnan(s_present["per_class_iou"]["2"])
  assert s_all["pixel_acc"] == s_present["pixel_acc"] == pytest.approx(7 / 10)


def test_scores_match_an_independent_numpy_scipy_implementation():
  rng = np.random.default_rng(4)
  for g, k in [(21, 21), (7, 10), (10, 7)]:
    conf = rng.integers(0, 500, (g, k)) * (rng.random((g, k)) < 0.4)
    conf[rng.integers(g)] = 0  # one class absent from the GT
    s = M.segmentation_scores(conf, classes="present")
    iou = np_iou(conf)
    present = conf.sum(1) > 0
    rows, cols = linear_sum_assignment(np.where(present[:, None], iou, 0.0), maximize=True)
    per_class = np.zeros(g)
    per_class[rows] = iou[rows, cols]
    np.testing.assert_allclose(s["miou"], per_class[present].mean(), rtol=1e-6)
    tp = sum(conf[r, c] for r, c in zip(rows, cols) if present[r])
    np.testing.assert_allclose(s["pixel_acc"], tp / conf.sum(), rtol=1e-6)


def test_scores_bad_arguments():
  with pytest.raises(ValueError, match="class_names"):
    M.segmentation_scores(np.eye(3), class_names=["a", "b"])
  with pytest.raises(ValueError, match="match"):
    M.segmentation_scores(np.eye(3), match="greedy")
  with pytest.raises(ValueError, match="classes"):
    M.segmentation_scores(np.eye(3), classes="some")


def test_voc_palette_and_class_lists():
  assert M.VOC_PALETTE.shape == (256, 3) and M.VOC_PALETTE.dtype == np.uint8
  assert M.VOC_PALETTE[1].tolist() == [128, 0, 0] and M.VOC_PALETTE[15].tolist() == [192, 128, 128]
  assert M.VOC_PALETTE[255].tolist() == [224, 224, 192]
  assert len(set(map(tuple, M.VOC_PALETTE.tolist()))) == 256
  assert len(M.VOC_CLASSES) == 21 and M.VOC_CLASSES[15] == "person"
  assert len(M.COCO81_CLASSES) == 81 and M.COCO81_CLASSES[1] == "person"
  assert M.COCO81_CLASSES[-1] == "toothbrush" and len(set(M.COCO81_CLASSES)) == 81


# ---------------------------------------------------------------------------- fg IoU


def test_foreground_iou_matches_numpy_and_pooled_differs_from_mean():
  rng = np.random.default_rng(5)
  gt = rng.integers(0, 4, (3, 12, 10))
  gt[rng.random(gt.shape) < 0.1] = 255
  pred = rng.random(gt.shape) < 0.5
  valid = np.ones(gt.shape, bool)
  valid[:, 9:] = False
  keep = (gt != 255) & valid
  want_i = ((pred & (gt > 0) & keep).sum((1, 2)))
  want_u = (((pred | (gt > 0)) & keep).sum((1, 2)))
  for xp in (np, jnp):
    inter, union = M.foreground_iou(xp.asarray(pred), xp.asarray(gt), valid=xp.asarray(valid))
    np.testing.assert_array_equal(inter, want_i)
    np.testing.assert_array_equal(union, want_u)

  # Hand case: image A 1/2, image B 90/100: mean 0.7, pooled 91/102.
  s = M.foreground_iou_scores([np.array([1]), np.array([90])], [np.array([2]), np.array([100])])
  assert s["mean"] == pytest.approx(0.7) and s["pooled"] == pytest.approx(91 / 102)
  # An image with an empty union is left out of the mean.
  s = M.foreground_iou_scores(np.array([1, 0]), np.array([2, 0]))
  assert s["mean"] == 0.5 and np.isnan(s["per_image"][1]) and s["num_images"] == 2


# ---------------------------------------------------------------------------- seeds


def test_mean_std_and_summarize_seeds():
  m, s = M.mean_std([0.1, 0.2, 0.6])
  assert m == pytest.approx(0.3) and s == pytest.approx(np.std([0.1, 0.2, 0.6]))
  assert M.mean_std([0.1, 0.2, 0.6], ddof=1)[1] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
  runs = [dict(miou=0.40, pixel_acc=0.8, mapping=np.arange(3), per_class_iou={"cat": 0.5, "dog": np.nan}),
          dict(miou=0.44, pixel_acc=0.8, mapping=np.arange(3), per_class_iou={"cat": 0.7, "dog": np.nan})]
  out = M.summarize_seeds(runs, fmt="{:.1f}", scale=100)
  assert out == {"miou": "42.0 ± 2.0", "pixel_acc": "80.0 ± 0.0",
                 "per_class_iou/cat": "60.0 ± 10.0", "per_class_iou/dog": "nan"}
  with pytest.raises(ValueError):
    M.mean_std([])


def test_confusion_and_fg_work_inside_jit_and_vmap():
  rng = np.random.default_rng(6)
  gt = rng.integers(0, 3, (4, 6, 5))
  pred = rng.integers(0, 3, (4, 6, 5))

  @jax.jit
  def per_image(p, g):
    cm = jax.vmap(lambda a, b: M.confusion_matrix(a, b, num_pred=3, num_gt=3))(p, g)
    return cm, M.foreground_iou(p > 0, g)

  cms, (inter, union) = per_image(jnp.asarray(pred), jnp.asarray(gt))
  for i in range(4):
    np.testing.assert_array_equal(cms[i], np_confusion(pred[i], gt[i], 3, 3))
  np.testing.assert_array_equal(inter, ((pred > 0) & (gt > 0)).sum((1, 2)))
  np.testing.assert_array_equal(union, ((pred > 0) | (gt > 0)).sum((1, 2)))
