"""LightCluster on PASCAL VOC 2012 val with DINOv2 ViT-S/14.

Command (the 9 dev images shipped in ../shared/assets; a full VOCdevkit works the same):
  lightcluster segment --config configs/voc12_dinov2_vits14.py \
      --images ../shared/assets/voc2012/JPEGImages \
      --weights ../shared/assets/dinov2/dinov2_vits14_imgfocus_backbone.npz --out runs/voc9
  lightcluster evaluate --pred runs/voc9/masks --gt ../shared/assets/voc2012/SegmentationClass --json

Expected on the 9 dev images (CPU, 2 cores): see the README results table.
`--config configs/voc12_dinov2_vits14.py:smoke` is a seconds-long smoke run (small images).
"""

from lightcluster_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.arch = "dinov2_vits14"
  c.clustering.num_categories = 5
  c.assign.num_classes = 20
  if arg == "smoke":
    c.features.image_size = 112
    c.assign.crop_size = 56
    c.assign.n_init = 2
    c.clustering.n_init = 1
    c.assign.min_region_pixels = 64
  return c
