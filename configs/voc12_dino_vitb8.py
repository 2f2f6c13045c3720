"""LightCluster on PASCAL VOC 2012 val with DINO ViT-B/8.

Data: VOCdevkit/ = the unpacked VOCtrainval_11-May-2012.tar; val = 1,449 images, 21 classes
(20 + background). `--split val` is required with a VOCdevkit root: without it every image
in JPEGImages/ is segmented, and `evaluate` stops at the first one without ground truth.

Commands (from the repository root):
  lightcluster convert --arch dino_vitb8 --checkpoint dino_vitbase8_pretrain.pth \
      --out weights/dino_vitb8.npz --verify        # online: leave out --checkpoint to download
  lightcluster segment --config configs/voc12_dino_vitb8.py \
      --images VOCdevkit/VOC2012 --split val \
      --weights weights/dino_vitb8.npz --out runs/voc12_vitb8
  lightcluster evaluate --pred runs/voc12_vitb8/masks \
      --gt VOCdevkit/VOC2012/SegmentationClass --json

Expected: not measured. No DINO v1 weights exist on the development machines (they cannot be
downloaded there), so this config has not been run with real weights.
Context only, not a result of this code: the paper claims to be ahead of the best prior
unsupervised figure that METHOD.md lists for VOC12 val, COMUS 50.0 mIoU (21 classes); the
paper's own tables are not available to us (docs/method.md, "Reference figures").

`--config configs/voc12_dino_vitb8.py:smoke`: small images and few restarts, for a quick check
that the commands run (its scores mean nothing).
"""

from lightcluster_jax.config import check_arg, default_config, smoke

ARGS = (None, "smoke")


def get_config(arg=None):
  check_arg(arg, ARGS, "configs/voc12_dino_vitb8.py")
  c = default_config()
  c.arch = "dino_vitb8"
  c.clustering.num_categories = 5   # CLS superclasses (docs/method.md §3)
  c.assign.num_classes = 20         # VOC object classes (docs/method.md §9)
  if arg == "smoke":
    smoke(c)
  return c
