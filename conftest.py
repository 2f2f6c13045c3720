"""Names the package's docstring examples use (`python -m pytest --doctest-modules`).

Examples that read external data are written against these names instead of paths on the
author's disk; here they are tiny fakes built once per session in a temporary folder:

  VOC_ROOT   a folder holding VOCdevkit/VOC2012 (2 val images, 24x32 and 32x24, labels 0 / 15
             "person" / 255 void), the layout of the official VOC2012 tarball
  COCO_ROOT  a COCO folder: val2017/*.jpg + annotations/instances_val2017.json (2 images of
             24x32; the first holds a "dining table" box with a "cup" polygon on it)
  PHOTOS     a folder of user photos (copies of two of the shipped `data.sample_images()`)
  WEIGHTS    a converted weights file (`weights.save`) of a tiny random ViT (patch 8, width 32,
             one block), standing in for e.g. dinov2_vits14.npz
  OUT_DIR    an empty folder for files an example writes
  np, jnp, jax

They are built only when a doctest runs, so the ordinary test run does not pay for them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

try:
  from _pytest.doctest import DoctestItem
except ImportError:  # pragma: no cover - pytest internals moved
  DoctestItem = ()


def _fake_voc(root: pathlib.Path) -> pathlib.Path:
  from PIL import Image
  from lightcluster_jax.data import voc

  base = root / "VOCdevkit" / "VOC2012"
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (base / sub).mkdir(parents=True, exist_ok=True)
  ids = ["2007_000033", "2007_000042"]
  for n, (image_id, (h, w)) in enumerate(zip(ids, [(24, 32), (32, 24)])):
    rng = np.random.default_rng(n)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    label[4:h - 4, 4:w - 4] = 255  # void boundary around a "person"
    label[5:h - 5, 5:w - 5] = 15
    Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.jpg")
    voc.write_label_png(base / "SegmentationClass" / f"{image_id}.png", label)
  (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
  return root


def _fake_coco(root: pathlib.Path) -> pathlib.Path:
  from PIL import Image

  (root / "val2017").mkdir(parents=True)
  (root / "annotations").mkdir()
  images = [dict(id=139, file_name="000000000139.jpg", height=24, width=32),
            dict(id=285, file_name="000000000285.jpg", height=24, width=32)]
  for n, im in enumerate(images):
    img = np.random.default_rng(n).integers(0, 256, (im["height"], im["width"], 3), np.uint8)
    Image.fromarray(img).save(root / "val2017" / im["file_name"])
  anns = [dict(id=1, image_id=139, category_id=67, iscrowd=0, area=480.0,  # dining table
               segmentation=[[2, 4, 30, 4, 30, 22, 2, 22]]),
          dict(id=2, image_id=139, category_id=47, iscrowd=0, area=48.0,  # cup
               segmentation=[[10, 8, 18, 8, 18, 14, 10, 14]])]
  cats = [dict(id=47, name="cup"), dict(id=67, name="dining table")]
  (root / "annotations" / "instances_val2017.json").write_text(
      json.dumps(dict(images=images, annotations=anns, categories=cats)))
  return root


def _photos(root: pathlib.Path) -> pathlib.Path:
  from lightcluster_jax.data import sample_images

  root.mkdir(parents=True)
  for p in sample_images():
    if p.stem in ("chelsea", "coffee"):
      shutil.copy(p, root / p.name)
  return root


def _tiny_weights(path: pathlib.Path) -> pathlib.Path:
  """Random weights of the tiny ViT, drawn with NumPy (Flax's eager init costs seconds)."""
  from lightcluster_jax import weights
  from lightcluster_jax.blocks import vit

  cfg = vit.ViTConfig("tiny", patch_size=8, width=32, depth=1, num_heads=2)
  rng = np.random.default_rng(0)
  params: dict = {}
  for name, shape in vit.param_shapes(cfg).items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "scale":
      value = np.ones(shape, np.float32)
    elif leaf == "bias":
      value = np.zeros(shape, np.float32)
    else:
      value = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    node = params
    for part in name.split("/")[:-1]:
      node = node.setdefault(part, {})
    node[leaf] = value
  return weights.save(path, cfg, params)


def _tfds_dir(data_dir, voc_root):
  """The fake VOC prepared as the TFDS dataset voc2012_segmentation (ArrayRecord)."""
  import contextlib
  import io
  from lightcluster_jax.data import tfds_builders
  with contextlib.redirect_stdout(io.StringIO()):
    tfds_builders.prepare("voc2012_segmentation", manual_dir=voc_root, data_dir=data_dir)
  return data_dir


@pytest.fixture(scope="session")
def _doctest_names(tmp_path_factory) -> dict:
  import jax
  import jax.numpy as jnp

  tmp = tmp_path_factory.mktemp("doctest_data")
  out_dir = tmp / "out"
  out_dir.mkdir()
  return dict(
      np=np, jnp=jnp, jax=jax,
      VOC_ROOT=_fake_voc(tmp / "voc"),
      COCO_ROOT=_fake_coco(tmp / "coco"),
      PHOTOS=_photos(tmp / "photos"),
      WEIGHTS=_tiny_weights(tmp / "weights" / "tiny_vit.npz"),
      OUT_DIR=out_dir,
      TFDS_DIR=_tfds_dir(tmp / "tfds", tmp / "voc"),
  )


@pytest.fixture(autouse=True)
def _doctest_data(request):
  """Fills `doctest_namespace` for doctests only (ordinary tests never build the fakes)."""
  if DoctestItem and isinstance(request.node, DoctestItem):
    request.getfixturevalue("doctest_namespace").update(
        request.getfixturevalue("_doctest_names"))
