"""Evaluation: confusion matrix, Hungarian matching, mIoU, foreground IoU, seed statistics.

The protocol of unsupervised semantic segmentation (docs/method.md §10):

1. Accumulate one confusion matrix `C[g, k]` (GT class g, predicted cluster k) over every
   valid pixel of the whole split; GT pixels equal to `ignore_index` (255, VOC's "void"
   boundary) are skipped. `confusion_matrix` is jittable and works on padded batches.
2. Match predicted clusters to GT classes one-to-one so that the total IoU is maximal
   (Hungarian algorithm, `optax.assignment.hungarian_algorithm` on the cost `-IoU`).
3. Score the matched prediction: per-class IoU, mIoU, pixel accuracy.

With `TP_g = C'[g, g]` in the matched matrix `C'`:

  IoU_g = TP_g / (sum_k C'[g, k] + sum_h C'[h, g] - TP_g),  pixel_acc = sum_g TP_g / sum C.

Unmatched clusters (more clusters than classes) are scored as "no class": their pixels are
wrong (they count as false negatives of their GT class and lower pixel accuracy) but they are
false positives of no class, so they lower no class's IoU through its prediction count.

Accumulating over a split (host-side int64 sums, so counts never overflow), here two batches
of one 4 x 6 image each: GT background and a "person" (class 15), predicted cluster ids 2 and 7:

  >>> gt = np.zeros((2, 4, 6), np.int64)
  >>> gt[:, 1:3, 1:4] = 15                 # a 2 x 3 "person" in each image
  >>> gt[1, 0, :] = 255                    # void / padded pixels: ignored
  >>> pred = np.where(gt == 15, 7, 2)      # clusters 7 and 2: no class names needed
  >>> pred[0, 1, 1] = 2                    # one person pixel missed
  >>> batches = [(pred[:1], gt[:1]), (pred[1:], gt[1:])]
  >>> acc = ConfusionAccumulator(num_pred=21, num_gt=21)
  >>> for pred_b, gt_b in batches:         # [B, H, W] int arrays, padded pixels gt=255
  ...   _ = acc.update(pred_b, gt_b)
  >>> scores = segmentation_scores(acc.total, class_names=VOC_CLASSES)
  >>> scores["mapping"][[2, 7]]            # Hungarian matching: 2 -> background, 7 -> person
  array([ 0, 15])
  >>> round(scores["miou"], 3), round(scores["per_class_iou"]["person"], 3)  # 11/12 for person
  (0.942, 0.917)

or equivalently `total = sum(np.asarray(confusion_matrix(p, g, num_pred=K, num_gt=G),
np.int64) for p, g in batches)`.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")

# Background + the 80 COCO "thing" categories in increasing category-id order, i.e. label
# l in 1..80 is the l-th entry of `data.coco.COCO_CATEGORY_IDS`.
COCO81_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def _voc_palette() -> np.ndarray:
  """The PASCAL VOC colour map: bits of the label index spread over the RGB high bits."""
  palette = np.zeros((256, 3), np.uint8)
  for label in range(256):
    c, r, g, b = label, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[label] = (r, g, b)
  return palette


VOC_PALETTE: np.ndarray = _voc_palette()  # [256, 3] uint8; 0 black, 1 (128,0,0), 255 (224,224,192)
VOC_PALETTE.setflags(write=False)


# ----------------------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------------------

def confusion_matrix(pred, gt, *, num_pred: int, num_gt: int, ignore_index: int = 255,
                     valid=None):
  """Confusion counts `C[g, k]` = #pixels with GT class g and predicted id k.

  A pixel is counted when `gt != ignore_index`, `0 <= gt < num_gt`, `0 <= pred < num_pred`
  and `valid` (if given) is true. So padding can be marked either with `valid=False`,
  with `gt = ignore_index`, or with a prediction sentinel outside `[0, num_pred)` (e.g. -1);
  a real prediction must use ids in `[0, num_pred)`, since out-of-range ids are dropped
  rather than counted as errors. GT values outside `[0, num_gt)` other than `ignore_index`
  are dropped too (`ConfusionAccumulator` rejects them on the host instead).

  Computed as `bincount(gt * num_pred + pred)` with one overflow bin for skipped pixels.
  JAX arrays (and tracers, so it works inside `jit` / `vmap` / `shard_map`) go through a
  jitted kernel compiled once per input shape (~0.1 s per new shape on CPU); when `pred` and
  `gt` are both NumPy arrays the same count is made on the host with `np.bincount`, so a
  loop over images of many sizes never compiles (~1.7 ms per 500x375 image).

  Args:
    pred: [...] int, predicted cluster / class ids (any shape, e.g. [B, H, W]).
    gt: [...] int, same shape, GT class ids; `ignore_index` marks void pixels.
    num_pred: number of predicted ids K (static).
    num_gt: number of GT classes G (static).
    ignore_index: GT value to skip (static), VOC uses 255.
    valid: optional [...] bool broadcastable to `pred.shape`; False pixels are skipped.

  Returns:
    [num_gt, num_pred] counts: a jax int32 array (int64 with x64 enabled; one call counts
    at most 2**31 - 1 pixels) or, for NumPy inputs, a NumPy int64 array. Sum per-batch
    matrices in NumPy int64 (`ConfusionAccumulator`) for a whole split.

  Example:
    >>> confusion_matrix(jnp.array([0, 1, 1]), jnp.array([0, 1, 255]), num_pred=2, num_gt=2)
    Array([[1, 0],
           [0, 1]], dtype=int32)
  """
  if np.shape(pred) != np.shape(gt):
    raise ValueError(f"confusion_matrix: pred shape {np.shape(pred)} != gt shape {np.shape(gt)}")
  if _all_numpy(pred, gt, valid):
    return _confusion_matrix_np(np.asarray(pred), np.asarray(gt), num_pred, num_gt,
                                ignore_index, valid)
  return _confusion_matrix_jax(pred, gt, num_pred=num_pred, num_gt=num_gt,
                               ignore_index=ignore_index, valid=valid)


def _all_numpy(*xs) -> bool:
  return all(x is None or isinstance(x, (np.ndarray, np.generic, list, tuple, int))
             for x in xs)


def _confusion_matrix_np(pred, gt, num_pred, num_gt, ignore_index, valid):
  shape = gt.shape
  pred = pred.reshape(-1).astype(np.int64)
  gt = gt.reshape(-1).astype(np.int64)
  keep = (gt != ignore_index) & (gt >= 0) & (gt < num_gt) & (pred >= 0) & (pred < num_pred)
  if valid is not None:
    keep &= np.broadcast_to(np.asarray(valid, bool), shape).reshape(-1)
  counts = np.bincount(gt[keep] * num_pred + pred[keep], minlength=num_gt * num_pred)
  return counts.reshape(num_gt, num_pred)


@functools.partial(jax.jit, static_argnames=("num_pred", "num_gt", "ignore_index"))
def _confusion_matrix_jax(pred, gt, *, num_pred, num_gt, ignore_index, valid):
  pred = jnp.asarray(pred)
  gt = jnp.asarray(gt)
  pred = pred.astype(jnp.int32).reshape(-1)
  gt_i = gt.astype(jnp.int32).reshape(-1)
  keep = (gt_i != ignore_index) & (gt_i >= 0) & (gt_i < num_gt) & (pred >= 0) & (pred < num_pred)
  if valid is not None:
    keep = keep & jnp.broadcast_to(jnp.asarray(valid, bool), gt.shape).reshape(-1)
  overflow = num_gt * num_pred
  index = jnp.where(keep, gt_i * num_pred + pred, overflow)
  counts = jnp.bincount(index, length=overflow + 1)
  return counts[:overflow].reshape(num_gt, num_pred)


class ConfusionAccumulator:
  """Sums `confusion_matrix` over images / batches into a host-side int64 matrix.

  NumPy inputs are counted on the host. JAX arrays (e.g. predictions still on the
  accelerator) are flattened and padded to a power-of-two length before the jitted count,
  so images of many different sizes compile only a handful of times and only the small
  [G, K] matrix leaves the device. The running total lives in NumPy int64 so a split of any
  size cannot overflow.

  Attributes:
    total: [num_gt, num_pred] int64 running counts.
  """

  def __init__(self, *, num_pred: int, num_gt: int, ignore_index: int = 255):
    self.num_pred, self.num_gt, self.ignore_index = int(num_pred), int(num_gt), int(ignore_index)
    self.total = np.zeros((self.num_gt, self.num_pred), np.int64)

  def update(self, pred, gt, valid=None, *, name: str | None = None) -> np.ndarray:
    """Adds one batch. `pred`, `gt`: [...] int (same shape); `valid`: optional [...] bool.

    Raises:
      ValueError: GT values outside `[0, num_gt)` other than `ignore_index` (a wrong class
        count or a label file in the wrong format); `name` (e.g. the image id) is quoted.
    """
    if np.shape(pred) != np.shape(gt):
      where = f" of {name}" if name else ""
      raise ValueError(f"prediction{where} has shape {np.shape(pred)} but GT {np.shape(gt)}")
    gt_np = np.asarray(gt)
    bad = (gt_np != self.ignore_index) & ((gt_np < 0) | (gt_np >= self.num_gt))
    if valid is not None:
      bad &= np.broadcast_to(np.asarray(valid, bool), gt_np.shape)
    if bad.any():
      values = np.unique(gt_np[bad])[:10].tolist()
      where = f" in {name}" if name else ""
      raise ValueError(f"GT labels{where} outside [0, {self.num_gt}) and != "
                       f"{self.ignore_index}: {values}")
    kw = dict(num_pred=self.num_pred, num_gt=self.num_gt, ignore_index=self.ignore_index)
    if _all_numpy(pred, valid):
      cm = confusion_matrix(np.asarray(pred), gt_np, valid=valid, **kw)
    else:
      n = int(np.prod(np.shape(pred)))
      size = max(4096, 1 << max(n - 1, 0).bit_length())  # power-of-two bucket
      pad = size - n
      p = jnp.pad(jnp.ravel(jnp.asarray(pred)), (0, pad), constant_values=-1)
      g = jnp.pad(jnp.ravel(jnp.asarray(gt_np)), (0, pad), constant_values=self.ignore_index)
      v = None if valid is None else jnp.pad(
          jnp.ravel(jnp.broadcast_to(jnp.asarray(valid, bool), np.shape(pred))), (0, pad))
      cm = confusion_matrix(p, g, valid=v, **kw)
    cm = np.asarray(cm, np.int64)
    self.total += cm
    return cm


# ----------------------------------------------------------------------------------------
# Matching and scores
# ----------------------------------------------------------------------------------------

def iou_matrix(confusion: jax.Array) -> jax.Array:
  """IoU of every (GT class, predicted id) pair as if that pair were matched.

  `IoU[g, k] = C[g, k] / (sum_j C[g, j] + sum_h C[h, k] - C[g, k])`, 0 where the union is 0.

  Args:
    confusion: [G, K] counts.

  Returns:
    [G, K] float32.
  """
  c = jnp.asarray(confusion).astype(jnp.float32)
  union = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
  return jnp.where(union > 0, c / jnp.maximum(union, 1.0), 0.0)


@jax.jit
def hungarian_match(confusion: jax.Array) -> jax.Array:
  """One-to-one matching of predicted ids to GT classes maximising the total IoU.

  Solves `max_{matching} sum_{(g, k) matched} IoU[g, k]` (see `iou_matrix`) with
  `optax.assignment.hungarian_algorithm` on the cost `-IoU`; exactly `min(G, K)` pairs are
  matched. Non-square problems are fine: with K > G the K - G left-over predicted ids are
  unmatched (scored as "no class", see the module docstring); with K < G some GT classes get
  no prediction and score IoU 0. Jittable; compiles once per (G, K).

  Args:
    confusion: [G, K] counts (rows GT classes, columns predicted ids).

  Returns:
    mapping: [K] int32, `mapping[k]` = GT class of predicted id k, or -1 if unmatched.

  Example:
    >>> hungarian_match(jnp.array([[0, 5], [7, 0]]))
    Array([1, 0], dtype=int32)
  """
  confusion = jnp.asarray(confusion)
  _, num_pred = confusion.shape
  rows, cols = optax.assignment.hungarian_algorithm(-iou_matrix(confusion))
  return jnp.full((num_pred,), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))


def apply_mapping(confusion, mapping) -> np.ndarray:
  """Merges predicted columns into GT-class columns.

  Args:
    confusion: [G, K] counts.
    mapping: [K] int, GT class of each predicted id, -1 = unmatched.

  Returns:
    [G, G + 1] int64: column g counts pixels predicted as class g; the last column collects
    the pixels of unmatched predicted ids ("no class").
  """
  c = np.asarray(confusion, np.int64)
  mapping = np.asarray(mapping, np.int64)
  num_gt, num_pred = c.shape
  if mapping.shape != (num_pred,):
    raise ValueError(f"mapping has shape {mapping.shape}, expected ({num_pred},)")
  if mapping.min(initial=0) < -1 or mapping.max(initial=-1) >= num_gt:
    raise ValueError(f"mapping values must be in [-1, {num_gt}), got {mapping.tolist()}")
  target = np.where(mapping < 0, num_gt, mapping)
  out = np.zeros((num_gt, num_gt + 1), np.int64)
  np.add.at(out.T, target, c.T)
  return out


def segmentation_scores(
    confusion, *, match: Literal["hungarian", "identity"] = "hungarian",
    class_names: Sequence[str] | None = None,
    classes: Literal["all", "present"] = "all") -> dict:
  """mIoU, per-class IoU and pixel accuracy from a split's confusion matrix.

  Which classes enter the mean:
    * `classes="all"` (default): every class whose union is non-empty after matching, i.e.
      classes with neither GT pixels nor predictions are left out (the usual `nanmean`
      convention; on full VOC12 val all 21 classes have GT, so this is the standard 21-class
      mIoU). A class absent from the GT that still receives a matched cluster scores 0.
    * `classes="present"`: only classes with GT pixels. Matching is restricted to those
      classes as well (a cluster matched to an absent class becomes unmatched); this is
      `--classes present` of docs/method.md §10 (subsets such as the 9 dev images, which
      miss most classes).
  Pixel accuracy counts all valid pixels in both cases.

  Args:
    confusion: [G, K] counts from `confusion_matrix` / `ConfusionAccumulator`.
    match: "hungarian" (unsupervised clusters, see `hungarian_match`) or "identity"
      (predicted id k is class k; ids >= G are unmatched).
    class_names: G names (defaults to "0".."G-1"); keys of `per_class_iou`.
    classes: "all" or "present", see above.

  Returns:
    dict with
      miou: float, mean IoU over the classes in the mean.
      per_class_iou: {name: float} for all G classes, NaN for classes left out of the mean.
      iou: [G] float64 array of the same values.
      pixel_acc: float, matched-correct pixels / valid pixels.
      mapping: [K] int64, GT class of each predicted id (-1 = unmatched).
      num_classes: int, number of classes averaged.
      num_pixels: int, valid pixels counted.

  Example:
    >>> s = segmentation_scores(np.array([[5, 0], [0, 3]]), match="hungarian")
    >>> s["miou"], s["pixel_acc"]
    (1.0, 1.0)
  """
  c = np.asarray(confusion, np.int64)
  if c.ndim != 2:
    raise ValueError(f"confusion must be [G, K], got shape {c.shape}")
  num_gt, num_pred = c.shape
  if class_names is None:
    class_names = [str(g) for g in range(num_gt)]
  if len(class_names) != num_gt:
    raise ValueError(f"{len(class_names)} class_names for a confusion matrix with {num_gt} rows")
  if classes not in ("all", "present"):
    raise ValueError(f"classes must be 'all' or 'present', got {classes!r}")
  gt_count = c.sum(1)
  present = gt_count > 0

  if match == "hungarian":
    mapping = np.asarray(hungarian_match(jnp.asarray(c, jnp.float32)), np.int64)
  elif match == "identity":
    mapping = np.where(np.arange(num_pred) < num_gt, np.arange(num_pred), -1)
  else:
    raise ValueError(f"match must be 'hungarian' or 'identity', got {match!r}")
  if classes == "present":
    mapping = np.where((mapping >= 0) & present[np.maximum(mapping, 0)], mapping, -1)

  matched = apply_mapping(c, mapping)
  tp = np.diagonal(matched[:, :num_gt]).astype(np.float64)
  pred_count = matched[:, :num_gt].sum(0)
  union = gt_count + pred_count - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
  in_mean = present if classes == "present" else union > 0
  iou = np.where(in_mean, iou, np.nan)
  num_classes = int(in_mean.sum())
  miou = float(np.nanmean(iou)) if num_classes else float("nan")
  total = int(c.sum())
  return dict(
      miou=miou,
      per_class_iou={name: float(v) for name, v in zip(class_names, iou)},
      iou=iou,
      pixel_acc=float(tp.sum() / total) if total else float("nan"),
      mapping=mapping,
      num_classes=num_classes,
      num_pixels=total,
  )


# ----------------------------------------------------------------------------------------
# Class-agnostic foreground IoU
# ----------------------------------------------------------------------------------------

def foreground_iou(pred_fg, gt, *, ignore_index: int = 255, background: int = 0, valid=None):
  """Per-image intersection and union of predicted vs GT foreground (any class != 0).

  GT foreground is `gt != background` and `gt != ignore_index`; pixels with
  `gt == ignore_index` or `valid == False` (padding) are skipped. Like `confusion_matrix`,
  NumPy inputs are counted on the host and JAX arrays / tracers by a jitted kernel.

  Args:
    pred_fg: [..., H, W] bool (or 0/1), the predicted foreground mask.
    gt: [..., H, W] int GT labels.
    ignore_index: GT value to skip (static).
    background: GT value of background (static).
    valid: optional [..., H, W] bool (broadcastable) mask of real pixels.

  Returns:
    (intersection, union): two [...] integer arrays of pixel counts, one per image.
    Pool them with `foreground_iou_scores`.

  Example:
    >>> foreground_iou(np.array([[1, 1, 0]]), np.array([[0, 3, 3]]))
    (np.int64(1), np.int64(3))
  """
  if np.shape(pred_fg) != np.shape(gt):
    raise ValueError(f"foreground_iou: pred_fg shape {np.shape(pred_fg)} != gt shape "
                     f"{np.shape(gt)}")
  xp = np if _all_numpy(pred_fg, gt, valid) else None
  if xp is None:
    return _foreground_iou_jax(pred_fg, gt, ignore_index=ignore_index, background=background,
                               valid=valid)
  pred_fg, gt = np.asarray(pred_fg).astype(bool), np.asarray(gt)
  keep = gt != ignore_index
  if valid is not None:
    keep = keep & np.broadcast_to(np.asarray(valid, bool), gt.shape)
  gt_fg = gt != background
  return ((pred_fg & gt_fg & keep).sum((-2, -1)), ((pred_fg | gt_fg) & keep).sum((-2, -1)))


@functools.partial(jax.jit, static_argnames=("ignore_index", "background"))
def _foreground_iou_jax(pred_fg, gt, *, ignore_index, background, valid):
  pred_fg = jnp.asarray(pred_fg).astype(bool)
  gt = jnp.asarray(gt)
  keep = gt != ignore_index
  if valid is not None:
    keep = keep & jnp.broadcast_to(jnp.asarray(valid, bool), gt.shape)
  gt_fg = gt != background
  inter = (pred_fg & gt_fg & keep).sum((-2, -1), dtype=jnp.int32)
  union = ((pred_fg | gt_fg) & keep).sum((-2, -1), dtype=jnp.int32)
  return inter, union


def foreground_iou_scores(intersections, unions) -> dict:
  """Pooled and per-image-mean foreground IoU from per-image counts.

  pooled = sum_i I_i / sum_i U_i (big images weigh more);
  mean = mean_i (I_i / U_i) over images with U_i > 0 (`fg_iou_mean` of docs/method.md §10,
  the figure the project's tables quote).

  Args:
    intersections: [N] counts (lists of per-batch arrays are concatenated).
    unions: [N] counts.

  Returns:
    dict(pooled=float, mean=float, per_image=[N] float64 (NaN where U_i = 0), num_images=int).
  """
  inter = np.concatenate([np.ravel(np.asarray(x)) for x in _as_list(intersections)]).astype(np.float64)
  union = np.concatenate([np.ravel(np.asarray(x)) for x in _as_list(unions)]).astype(np.float64)
  if inter.shape != union.shape:
    raise ValueError(f"{inter.shape[0]} intersections but {union.shape[0]} unions")
  with np.errstate(invalid="ignore", divide="ignore"):
    per_image = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
  scored = union > 0
  return dict(
      pooled=float(inter.sum() / union.sum()) if union.sum() > 0 else float("nan"),
      mean=float(per_image[scored].mean()) if scored.any() else float("nan"),
      per_image=per_image,
      num_images=int(inter.shape[0]),
  )


def _as_list(x):
  if isinstance(x, (list, tuple)):
    return list(x) if x else [np.zeros(0)]
  return [x]


# ----------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------

def mean_std(values: Iterable[float], *, ddof: int = 0) -> tuple[float, float]:
  """Mean and standard deviation (population, ddof=0, like `np.std`) of a list of scores."""
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    raise ValueError("mean_std of an empty list")
  std = float(v.std(ddof=ddof)) if v.size > ddof else float("nan")
  return float(v.mean()), std


def summarize_seeds(scores: Sequence[Mapping], *, fmt: str = "{:.4f}", scale: float = 1.0,
                    ddof: int = 0) -> dict[str, str]:
  """"mean ± std" over seeds of every scalar entry of a list of score dicts.

  Scalars (int/float) are summarised by their key; nested dicts of scalars (e.g.
  `per_class_iou`) as "outer/inner". Arrays and other entries are skipped. A key missing
  from some runs is summarised over the runs that have it. NaN values (e.g. a class left
  out of the mean) are dropped; a key that is NaN in every run gives "nan".

  Args:
    scores: one dict per seed, e.g. `segmentation_scores` outputs merged with fg IoUs.
    fmt: format of each number; `scale=100` prints percentages.
    ddof: 0 (population std, default) or 1 (sample std).

  Returns:
    {key: "mean ± std"} in first-seen key order.

  Example:
    >>> summarize_seeds([{"miou": 0.40}, {"miou": 0.44}], fmt="{:.1f}", scale=100)
    {'miou': '42.0 ± 2.0'}
  """
  collected: dict[str, list[float]] = {}
  for run in scores:
    for key, value in run.items():
      if isinstance(value, Mapping):
        for inner, v in value.items():
          if _is_scalar(v):
            collected.setdefault(f"{key}/{inner}", []).append(float(v))
      elif _is_scalar(value):
        collected.setdefault(key, []).append(float(value))
  out = {}
  for key, values in collected.items():
    values = [v for v in values if not math.isnan(v)]
    if not values:
      out[key] = "nan"
      continue
    m, s = mean_std([v * scale for v in values], ddof=ddof)
    out[key] = f"{fmt.format(m)} ± {fmt.format(s)}"
  return out


def _is_scalar(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
