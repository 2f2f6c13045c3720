"""LightCluster on PASCAL VOC 2012 val with DINO ViT-S/8 (the paper's main backbone).

Command (needs dino_deitsmall8_pretrain.pth converted, or internet for the official file):
  lightcluster convert --arch dino_vits8 --out weights/dino_vits8.npz --verify
  lightcluster segment --config configs/voc12_dino_vits8.py --images VOCdevkit/VOC2012 \
      --weights weights/dino_vits8.npz --out runs/voc12_vits8
  lightcluster evaluate --pred runs/voc12_vits8/masks \
      --gt VOCdevkit/VOC2012/SegmentationClass --json

Expected: not measured here (no DINO v1 weights can be downloaded on the dev machines).
"""

from lightcluster_jax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.arch = "dino_vits8"
  if arg == "smoke":
    c.features.image_size = 64
    c.assign.crop_size = 64
    c.assign.n_init = 2
    c.clustering.n_init = 1
    c.assign.min_region_pixels = 64
  return c
