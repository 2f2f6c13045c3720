"""LightCluster on MS COCO val2017, 81 classes (80 things + background), DINO ViT-S/8.

Protocol: COCO-81 (instance masks of val2017 turned into semantic maps; crowd = ignore).
Command:
  lightcluster segment --config configs/coco81_dino_vits8.py --images COCO/val2017 \
      --weights weights/dino_vits8.npz --out runs/coco81_vits8

Expected: not measured here (no COCO images or DINO v1 weights on the dev machines).
"""

import pathlib

from lightcluster_jax.config import load_config


def get_config(arg=None):
  parent = pathlib.Path(__file__).with_name("voc12_dino_vits8.py")
  c = load_config(f"{parent}:{arg}" if arg else str(parent))
  c.clustering.num_categories = 12
  c.assign.num_classes = 80
  return c
