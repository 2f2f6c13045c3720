"""TFDS builders for VOC2012 segmentation and COCO-81, from local files, without TensorFlow.

The stock TFDS `voc` builder has detection boxes only (no segmentation masks), so these
builders read a local copy instead (`manual_dir`; they never download anything):

  voc2012_segmentation   manual_dir holds VOCdevkit/VOC2012 (or VOC2012, or its content);
                         one split per ImageSets/Segmentation/<split>.txt (train, val, ...)
  coco81_semantic        manual_dir holds val2017/ (and/or train2017/) + annotations/
                         instances_<split>.json; labels rendered as in `data.coco`

Features (both builders), all readable without TensorFlow:
  id     Text                              image id (file stem); returned as bytes
  image  Tensor [H, W, 3] uint8, zlib      decoded RGB, exactly `data.images.load_image`
  label  Tensor [H, W] uint8, zlib         class indices, 255 = ignore

TensorFlow is not needed: the default file format is ArrayRecord and the features are plain
uint8 tensors (TFDS's `Image` feature and TFRecord files need TensorFlow to encode / read).
Read the result with `tfds.data_source` (random access, NumPy, what Grain consumes).
Requires `pip install tensorflow-datasets array_record importlib_resources` (the
`lightcluster_jax[tfds]` extra). Examples are stored decoded, so the VOC val split takes
roughly 0.6 GB on disk (vs ~0.1 GB of JPEGs); COCO val2017 several GB.

Example (VOC_ROOT: a folder holding VOCdevkit/VOC2012, e.g. "~/data"; the doctests use a
tiny fake one with 2 val images. OUT_DIR / "tfds" stands for e.g. "~/tensorflow_datasets"):
  >>> from lightcluster_jax.data import tfds_builders
  >>> builder = tfds_builders.prepare("voc2012_segmentation", manual_dir=VOC_ROOT,
  ...                                 data_dir=OUT_DIR / "tfds")  # doctest: +ELLIPSIS
  Downloading and preparing dataset ... to .../voc2012_segmentation/1.0.0...
  Dataset voc2012_segmentation downloaded and prepared to ... Subsequent calls will reuse this data.
  >>> val = tfds.data_source("voc2012_segmentation", data_dir=OUT_DIR / "tfds")["val"]
  >>> sorted(val[i]["id"] for i in range(len(val)))
  [b'2007_000033', b'2007_000042']
  >>> ex = val[0]; ex["image"].ndim, ex["image"].dtype, ex["label"].dtype  # [H, W, 3], [H, W]
  (3, dtype('uint8'), dtype('uint8'))
"""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np
import tensorflow_datasets as tfds

from lightcluster_jax.data import coco as _coco
from lightcluster_jax.data import voc as _voc
from lightcluster_jax.blocks.metrics import COCO81_CLASSES, VOC_CLASSES

_DEFAULT_FORMAT = "array_record"


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      # Two unknown dims need an explicit encoding; zlib keeps labels tiny.
      "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
  })


def _warn_missing(split: str, missing: list[str], where: pathlib.Path) -> None:
  if missing:
    warnings.warn(f"{split}: {len(missing)} listed images are missing under {where} and were "
                  f"left out (first: {missing[:3]})", stacklevel=3)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared pieces: ArrayRecord by default, manual_dir only."""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or _DEFAULT_FORMAT, **kwargs)


class Voc2012Segmentation(_LocalBuilder):
  """PASCAL VOC 2012 semantic segmentation (21 classes, 255 = void) from a local VOCdevkit."""

  name = "voc2012_segmentation"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Decoded uint8 image and label tensors, ArrayRecord."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Unpack VOCtrainval_11-May-2012.tar so that manual_dir contains VOCdevkit/VOC2012/
  (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/*.txt). One split is made per
  ImageSets/Segmentation/<name>.txt; listed ids without an image file are skipped with a
  warning."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"VOC2012 segmentation; label classes: {', '.join(VOC_CLASSES)}; 255 void.",
        features=_features(),
        supervised_keys=("image", "label"),
        homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
    )

  def _split_generators(self, dl_manager):
    root = _voc.VOCSegmentation._resolve_root(pathlib.Path(dl_manager.manual_dir))
    lists = sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
    if not lists:
      raise FileNotFoundError(f"no image-set lists in {root / 'ImageSets' / 'Segmentation'}")
    return {p.stem: self._generate_examples(root, p.stem) for p in lists}

  def _generate_examples(self, root, split):
    ds = _voc.VOCSegmentation(root, split=split)
    present = ds.ids_with_images()
    _warn_missing(split, [i for i in ds.ids if i not in set(present)], root / "JPEGImages")
    for image_id in present:
      ex = ds[image_id]
      yield image_id, ex


class Coco81Semantic(_LocalBuilder):
  """COCO 2017 things as 81-class semantic segmentation (80 things + background, 255 crowd)."""

  name = "coco81_semantic"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Decoded uint8 image and label tensors, ArrayRecord."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Unpack val2017.zip (and/or train2017.zip) and annotations_trainval2017.zip so that
  manual_dir contains val2017/*.jpg and annotations/instances_val2017.json. One split is
  made per <split>/ folder that has an instances_<split>.json."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("COCO-81: 80 COCO thing categories (ids mapped to 1..80 in id order) + "
                     "background 0; crowd regions 255. Classes: " + ", ".join(COCO81_CLASSES)),
        features=_features(),
        supervised_keys=("image", "label"),
        homepage="https://cocodataset.org/",
    )

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = [p.stem[len("instances_"):] for p in sorted((root / "annotations").glob(
        "instances_*.json")) if (root / p.stem[len("instances_"):]).is_dir()]
    if not splits:
      raise FileNotFoundError(f"no <split>/ folder with annotations/instances_<split>.json "
                              f"under {root}")
    return {s: self._generate_examples(root, s) for s in splits}

  def _generate_examples(self, root, split):
    ds = _coco.COCOSemantic(root, split=split)
    present = ds.ids_with_images()
    _warn_missing(split, [i for i in ds.ids if i not in set(present)], ds.image_dir)
    for image_id in present:
      yield image_id, ds[image_id]


BUILDERS = {b.name: b for b in (Voc2012Segmentation, Coco81Semantic)}


def prepare(name: str, *, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            file_format: str = _DEFAULT_FORMAT) -> tfds.core.DatasetBuilder:
  """Builds (once) a dataset from local files and returns its builder.

  Args:
    name: "voc2012_segmentation" or "coco81_semantic".
    manual_dir: folder with the unpacked dataset (see each builder's instructions).
    data_dir: where TFDS writes the prepared dataset.
    file_format: "array_record" (default; no TensorFlow needed) or "tfrecord" (needs TF).

  Returns:
    the prepared builder; `builder.as_data_source()[split][i]` is a dict of NumPy arrays.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  builder = BUILDERS[name](data_dir=os.fspath(pathlib.Path(data_dir).expanduser()),
                           file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(pathlib.Path(manual_dir).expanduser())))
  return builder
