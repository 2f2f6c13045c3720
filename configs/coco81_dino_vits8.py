"""LightCluster on MS COCO val2017, COCO-81 (80 thing classes + background), DINO ViT-S/8.

Data: COCO/ = a folder with val2017/ (5,000 images) and annotations/instances_val2017.json.
Ground truth: the COCO reader (lightcluster_jax/data/coco.py) renders the instance masks into
81-class maps in memory (0 background, 1..80 things in category-id order, 255 crowd =
ignored); it writes no files, so write the maps once as PNGs for `evaluate` (step 1).

Commands (from the repository root):
  # 1. ground-truth PNGs: COCO/labels81_val2017/<image id>.png
  python -c "from lightcluster_jax.data import coco, voc; ds = coco.COCOSemantic('COCO'); \
[voc.write_label_png(f'COCO/labels81_val2017/{i}.png', ds.load_label(i)) for i in ds.ids]"
  # 2. weights (online: leave out --checkpoint to download the official file)
  lightcluster convert --arch dino_vits8 --checkpoint dino_deitsmall8_pretrain.pth \
      --out weights/dino_vits8.npz --verify
  # 3. segment and score
  lightcluster segment --config configs/coco81_dino_vits8.py --images COCO/val2017 \
      --weights weights/dino_vits8.npz --out runs/coco81_vits8
  lightcluster evaluate --pred runs/coco81_vits8/masks --gt COCO/labels81_val2017 \
      --num-classes 81 --json

Expected: not measured. No DINO v1 weights (and no COCO images) exist on the development
machines, so this config has not been run with real weights.
Context only, not a result of this code: the paper claims to be ahead of the best prior
unsupervised figure that METHOD.md lists for COCO-81, COMUS 19.6 mIoU; the paper's own tables
are not available to us (docs/method.md, "Reference figures").

`--config configs/coco81_dino_vits8.py:smoke`: small images and few restarts, for a quick check
that the commands run (its scores mean nothing).
"""

from lightcluster_jax.config import check_arg, default_config, smoke

ARGS = (None, "smoke")


def get_config(arg=None):
  check_arg(arg, ARGS, "configs/coco81_dino_vits8.py")
  c = default_config()
  c.arch = "dino_vits8"
  c.clustering.num_categories = 12  # CLS superclasses (docs/method.md §3)
  c.assign.num_classes = 80         # COCO thing classes (docs/method.md §9)
  if arg == "smoke":
    smoke(c)
  return c
