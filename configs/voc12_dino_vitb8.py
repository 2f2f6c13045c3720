"""LightCluster on PASCAL VOC 2012 val with DINO ViT-B/8.

Command:
  lightcluster convert --arch dino_vitb8 --out weights/dino_vitb8.npz --verify
  lightcluster segment --config configs/voc12_dino_vitb8.py --images VOCdevkit/VOC2012 \
      --weights weights/dino_vitb8.npz --out runs/voc12_vitb8

Expected: not measured here (no DINO v1 weights on the dev machines).
"""

import pathlib

from lightcluster_jax.config import load_config


def get_config(arg=None):
  parent = pathlib.Path(__file__).with_name("voc12_dino_vits8.py")
  c = load_config(f"{parent}:{arg}" if arg else str(parent))
  c.arch = "dino_vitb8"
  return c
