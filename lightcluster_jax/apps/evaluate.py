"""Scoring predicted label maps against ground truth (`lightcluster evaluate`).

Predictions: a folder of `<id>.png` or a run's label shards (`outputs.open_labels`); ground
truth: a folder of `<id>.png` or a TFDS split's `label` feature (`tfds_labels`).

Predictions are unsupervised cluster ids (0 = background, 1.. = class clusters); they are
matched to GT classes by the Hungarian algorithm on the split's confusion matrix
(`metrics.segmentation_scores`), so the ids need not be in any particular order.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from lightcluster_jax.apps import outputs
from lightcluster_jax.blocks import metrics
from lightcluster_jax.data import files, sources, voc


def class_names(num_classes: int) -> list[str]:
  if num_classes == len(metrics.VOC_CLASSES):
    return list(metrics.VOC_CLASSES)
  if num_classes == len(metrics.COCO81_CLASSES):
    return list(metrics.COCO81_CLASSES)
  return [str(i) for i in range(num_classes)]


def evaluate_folders(pred_dir, gt_dir, *, num_classes: int = 21, classes: str = "all",
                     ignore_index: int = 255) -> dict:
  """Scores the predictions in `pred_dir` (`<id>.png`, or a run's label shards: see
  `outputs.open_labels`) against `gt_dir/<id>.png`; `evaluate_labels` for the scores.

  Raises:
    FileNotFoundError: naming the missing folder or the missing GT file.
    ValueError: naming an image whose prediction and GT sizes differ.
  """
  for d, what in ((pred_dir, "--pred"), (gt_dir, "--gt")):
    if not files.as_path(d).is_dir():
      raise FileNotFoundError(f"{what} folder not found: {d}")
  try:
    preds = outputs.open_labels(pred_dir)
  except FileNotFoundError:
    raise FileNotFoundError(f"no .png predictions (or label shards) in {pred_dir}") from None
  return evaluate_labels(preds, outputs.LabelFolder(gt_dir), num_classes=num_classes,
                         classes=classes, ignore_index=ignore_index)


def tfds_labels(spec: str, data_dir=None) -> Mapping:
  """{id: [H, W] uint8 GT} of a TFDS split with a `label` feature ('NAME:SPLIT', e.g. our
  `voc2012_segmentation:val`, `data.tfds_builders`), read on access."""
  source = sources.TfdsSource(*sources.parse_tfds_spec(spec), data_dir=data_dir)
  if not source.has_labels:
    raise ValueError(f"TFDS dataset {spec} has no 'label' feature to evaluate against")
  return _SourceLabels(source)


class _SourceLabels(Mapping):
  def __init__(self, source):
    self._source, self._index = source, {i: n for n, i in enumerate(source.ids)}

  def __getitem__(self, item_id):
    return self._source.label(self._index[item_id])

  def __iter__(self):
    return iter(self._source.ids)

  def __len__(self):
    return len(self._index)


def evaluate_labels(preds: Mapping, gts: Mapping, *, num_classes: int = 21,
                    classes: str = "all", ignore_index: int = 255) -> dict:
  """Scores every prediction in `preds` against the GT of the same id in `gts`.

  Args:
    preds: {id: [H, W] predicted cluster ids} (`outputs.open_labels`).
    gts: {id: [H, W] GT class ids, `ignore_index` = void} (`outputs.LabelFolder`,
      `tfds_labels`).

  Returns:
    dict: miou, pixel_acc, fg_iou (pooled: total intersection / total union), fg_iou_mean
    (per-image mean), per_class {name: IoU}, mapping {pred id: GT class}, num_images,
    num_classes_scored.

  Raises:
    FileNotFoundError: naming an id without GT (or no predictions at all).
    ValueError: naming an image whose prediction and GT sizes differ.
  """
  if not len(preds):
    raise FileNotFoundError("no predictions to evaluate")
  acc = np.zeros((num_classes, 256), np.int64)
  inters, unions = [], []
  for item_id in preds:
    try:
      gt = gts[item_id]
    except KeyError as e:
      raise FileNotFoundError(f"ground truth for {item_id!r} not found ({e.args[0]})") from None
    pred = preds[item_id]
    if pred.shape != gt.shape:
      raise ValueError(f"{item_id}: prediction {pred.shape} and ground truth {gt.shape} "
                       "differ in size")
    acc += np.asarray(metrics.confusion_matrix(pred, gt, num_pred=256, num_gt=num_classes,
                                               ignore_index=ignore_index))
    i, u = metrics.foreground_iou(pred > 0, gt, ignore_index=ignore_index)
    inters.append(int(i))
    unions.append(int(u))
  used = int(np.max(np.nonzero(acc.sum(0))[0], initial=0)) + 1
  names = class_names(num_classes)
  scores = metrics.segmentation_scores(acc[:, :used], class_names=names, classes=classes)
  fg = metrics.foreground_iou_scores(np.array(inters), np.array(unions))
  return {
      "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
      "fg_iou": fg["pooled"], "fg_iou_mean": fg["mean"],
      "per_class": {k: (None if np.isnan(v) else v) for k, v in scores["per_class_iou"].items()},
      "mapping": {int(k): int(v) for k, v in enumerate(scores["mapping"]) if v >= 0},
      "num_images": len(inters), "num_classes_scored": scores["num_classes"],
  }


def format_scores(scores: dict) -> str:
  """A human-readable table of `evaluate_folders` output."""
  lines = [f"images: {scores['num_images']}   mIoU: {100 * scores['miou']:.1f}   "
           f"pixel acc: {100 * scores['pixel_acc']:.1f}   fg IoU: {100 * scores['fg_iou']:.1f} "
           f"(per-image mean {100 * scores['fg_iou_mean']:.1f})"]
  for name, v in scores["per_class"].items():
    if v is not None:
      lines.append(f"  {name:>14s}  {100 * v:5.1f}")
  return "\n".join(lines)


PATCH_STAGES = ("image", "category", "dataset", "consistent")


def stage_foreground_ious(result, gt_dir, *, ignore_index: int = 255) -> dict:
  """Class-agnostic foreground IoU of the pseudo-masks at every stage of a pipeline run.

  Patch-level masks (image / category / dataset level, consistent) are upsampled to the GT
  size with nearest neighbour (the patch grid covers the whole image); "refined" is the
  CRF output (or the bilinear upsampling when the CRF is off); "final" is labels > 0.

  Args:
    result: the `SegmentResult` of `pipeline.segment`.
    gt_dir: folder with `<id>.png` GT label maps.

  Returns:
    {stage: {"mean": per-image mean, "pooled": total I / total U}}.
  """
  from lightcluster_jax.blocks.resize import resize
  gt_dir = pathlib.Path(gt_dir)
  counts = {s: ([], []) for s in PATCH_STAGES + ("refined", "final")}
  for item_id in result.ids:
    gt = voc.read_label_png(gt_dir / f"{item_id}.png")
    m = result.artefacts("masks", item_id)
    preds = {}
    for s in PATCH_STAGES:
      grid = np.asarray(m[s], np.float32)[..., None]
      preds[s] = np.asarray(resize(grid, gt.shape, method="nearest"))[..., 0] > 0.5
    preds["refined"] = result.artefacts("refine", item_id)["fg"]
    preds["final"] = result.labels[item_id] > 0
    for s, p in preds.items():
      i, u = metrics.foreground_iou(p, gt, ignore_index=ignore_index)
      counts[s][0].append(int(i))
      counts[s][1].append(int(u))
  out = {}
  for s, (i, u) in counts.items():
    sc = metrics.foreground_iou_scores(np.array(i), np.array(u))
    out[s] = {"mean": sc["mean"], "pooled": sc["pooled"]}
  return out
