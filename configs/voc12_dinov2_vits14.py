"""LightCluster on PASCAL VOC 2012 val with DINOv2 ViT-S/14.

The 9 dev images (VOC12 val images with GT, shipped in ../shared/assets with the DINOv2-S/14
weights; they cover only some of the 21 classes, so mIoU is averaged over the classes present
in their GT: `--classes present`). Commands, from the repository root:
  lightcluster segment --config configs/voc12_dinov2_vits14.py \
      --images ../shared/assets/voc2012/JPEGImages \
      --weights ../shared/assets/dinov2/dinov2_vits14_imgfocus_backbone.npz --out runs/voc9
  lightcluster evaluate --pred runs/voc9/masks \
      --gt ../shared/assets/voc2012/SegmentationClass --classes present --json

Expected (9 dev images, seeds 0-4): fg IoU 0.7205 +- 0.0000 (pooled `fg_iou` 0.719),
mIoU 0.4135 +- 0.0001 (classes present), pixel accuracy 0.772 (measured 2026-12-03).

fg IoU is `fg_iou_mean` in the JSON (per-image mean of the class-agnostic foreground IoU),
mIoU is `miou`. Stage by stage: the README results table.

Full VOC12 val (VOCdevkit/ = the unpacked VOCtrainval_11-May-2012.tar; 1,449 images, all 21
classes, so the default `--classes all`; `--split val` is required with a VOCdevkit root):
  lightcluster segment --config configs/voc12_dinov2_vits14.py \
      --images VOCdevkit/VOC2012 --split val \
      --weights ../shared/assets/dinov2/dinov2_vits14_imgfocus_backbone.npz --out runs/voc12_dinov2
  lightcluster evaluate --pred runs/voc12_dinov2/masks \
      --gt VOCdevkit/VOC2012/SegmentationClass --json
Expected (VOC12 val): not measured (no VOCdevkit on the development machines).

`--config configs/voc12_dinov2_vits14.py:smoke`: small images and few restarts, to check that
the commands work (9 dev images: about 4 minutes on 2 busy CPU cores, mostly compilation; its
scores mean nothing).
"""

from lightcluster_jax.config import check_arg, default_config, smoke

ARGS = (None, "smoke")


def get_config(arg=None):
  check_arg(arg, ARGS, "configs/voc12_dinov2_vits14.py")
  c = default_config()
  c.arch = "dinov2_vits14"
  c.clustering.num_categories = 5   # CLS superclasses (docs/method.md §3)
  c.assign.num_classes = 20         # VOC object classes (docs/method.md §9)
  if arg == "smoke":
    smoke(c, image_size=112, crop_size=56)
  return c
