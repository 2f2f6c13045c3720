"""PASCAL VOC 2012 segmentation from a local VOCdevkit folder (no download).

Layout read (the official tarball's, any of the three roots may be given):

  VOCdevkit/VOC2012/
    JPEGImages/<id>.jpg          (a .png or .jpeg of the same id is accepted too)
    SegmentationClass/<id>.png   palette PNG: pixel value = class index 0..20, 255 = void
    ImageSets/Segmentation/<split>.txt   one id per line (train, val, trainval)

Labels are read as palette *indices* (`np.asarray` of the "P" image), never converted to
RGB; a label PNG saved as RGB colours is mapped back through `VOC_PALETTE`.

Example (VOC_ROOT: a folder holding VOCdevkit/VOC2012, e.g. "~/data"; the doctests use a
tiny fake one whose val split has 2 images of 24 x 32 and 32 x 24 pixels):
  >>> ds = VOCSegmentation(VOC_ROOT, split="val")
  >>> len(ds), ds.ids[0]
  (2, '2007_000033')
  >>> ex = ds[0]                    # or ds["2007_000033"]
  >>> ex["image"].shape, ex["image"].dtype, ex["label"].shape, ex["label"].dtype
  ((24, 32, 3), dtype('uint8'), (24, 32), dtype('uint8'))
  >>> [VOC_CLASSES[c] if c != 255 else "void" for c in np.unique(ex["label"])]
  ['background', 'person', 'void']
"""

from __future__ import annotations

import os
import pathlib
import io
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightcluster_jax.data import files
from lightcluster_jax.data import images as _images
from lightcluster_jax.blocks.metrics import VOC_CLASSES, VOC_PALETTE

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def read_label_png(path: PathLike) -> np.ndarray:
  """Reads a VOC label PNG as class indices.

  Args:
    path: palette ("P") or grayscale ("L") PNG; an RGB PNG is decoded through `VOC_PALETTE`.

  Returns:
    [H, W] uint8 indices (0..20 classes, 255 void for VOC).

  Raises:
    FileNotFoundError: naming the missing file.
    ValueError: the file is not a readable label image (mode, or RGB colours outside the
      VOC palette), naming the file.
  """
  path = files.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"label file not found: {path}")
  try:
    with path.open("rb") as fh, Image.open(fh) as img:
      img.load()
      if img.mode in ("P", "L"):
        return np.array(img, np.uint8)  # palette indices, not colours
      if img.mode in ("RGB", "RGBA"):
        return _rgb_to_index(np.asarray(img.convert("RGB")), path)
      raise ValueError(f"{path}: label image mode {img.mode!r} (expected palette 'P' or 'L')")
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot decode label PNG ({type(e).__name__}: {e})") from None


def _rgb_to_index(rgb: np.ndarray, path) -> np.ndarray:
  """Inverse palette lookup of an RGB-coloured label image."""
  code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  pal = VOC_PALETTE.astype(np.int32)
  pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
  # The VOC palette is injective, so one sorted lookup inverts it.
  order = np.argsort(pal_code)
  pos = np.clip(np.searchsorted(pal_code[order], code), 0, 255)
  index = order[pos]
  unknown = pal_code[index] != code
  if unknown.any():
    bad = rgb[unknown][0].tolist()
    raise ValueError(f"{path}: RGB label colour {bad} is not in the VOC palette "
                     f"({int(unknown.sum())} pixels)")
  return index.astype(np.uint8)


def write_label_png(path: PathLike, labels: np.ndarray, palette: np.ndarray = VOC_PALETTE
                    ) -> pathlib.Path:
  """Writes `[H, W]` class indices as a palette PNG, atomically (tmp file + os.replace).

  A reader never sees a half-written file, and an interrupted run leaves either the old
  file or none.

  Args:
    path: output .png path (parent folders are created).
    labels: [H, W] integer array with values in 0..255.
    palette: [N <= 256, 3] uint8 colours (default VOC).

  Returns:
    the path written.
  """
  path = files.as_path(path)
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"labels for {path} must be [H, W], got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(f"labels for {path} must be in 0..255, got [{labels.min()}, {labels.max()}]")
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  h, w = labels.shape
  img = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, np.uint8).tobytes())
  img.putpalette(palette.reshape(-1).tolist())
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  files.atomic_write_bytes(path, buf.getvalue())
  return path


class VOCSegmentation:
  """Image / label pairs of a VOC2012-like folder.

  Args:
    root: `VOCdevkit/VOC2012`, `VOCdevkit` or their parent.
    split: image-set name; ids are read from `ImageSets/Segmentation/<split>.txt`.
    image_set_file: explicit id list (overrides `split`).

  Attributes:
    root: the resolved VOC2012 folder.
    ids: list of image ids in file order.
    class_names: the 21 VOC class names.
  """

  class_names = VOC_CLASSES
  num_classes = 21
  ignore_index = 255

  def __init__(self, root: PathLike, split: str = "val", image_set_file: PathLike | None = None):
    self.root = self._resolve_root(pathlib.Path(root).expanduser())
    self.split = split
    if image_set_file is None:
      image_set_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
    image_set_file = pathlib.Path(image_set_file)
    if not image_set_file.is_file():
      raise FileNotFoundError(f"VOC image-set list not found: {image_set_file}")
    self.image_set_file = image_set_file
    self.ids: list[str] = [ln.split()[0] for ln in image_set_file.read_text().splitlines()
                           if ln.strip()]
    self._index = {image_id: i for i, image_id in enumerate(self.ids)}

  @staticmethod
  def _resolve_root(root: pathlib.Path) -> pathlib.Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
      if (cand / "SegmentationClass").is_dir() or (cand / "JPEGImages").is_dir():
        return cand
    raise FileNotFoundError(
        f"no VOC2012 folder (with JPEGImages/ and SegmentationClass/) at {root}, "
        f"{root / 'VOC2012'} or {root / 'VOCdevkit' / 'VOC2012'}")

  def __len__(self) -> int:
    return len(self.ids)

  def image_path(self, image_id: str) -> pathlib.Path | None:
    """Path of the image of `image_id` (.jpg, then .png / .jpeg), or None if absent."""
    for suffix in IMAGE_SUFFIXES:
      p = self.root / "JPEGImages" / f"{image_id}{suffix}"
      if p.is_file():
        return p
    return None

  def label_path(self, image_id: str) -> pathlib.Path:
    return self.root / "SegmentationClass" / f"{image_id}.png"

  def ids_with_images(self) -> list[str]:
    """The ids (in order) whose image file exists, e.g. a partial copy of the dataset."""
    return [i for i in self.ids if self.image_path(i) is not None]

  def load_image(self, image_id: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB. Raises FileNotFoundError naming the expected file."""
    p = self.image_path(image_id)
    if p is None:
      raise FileNotFoundError(
          f"image for VOC id {image_id!r} not found: {self.root / 'JPEGImages' / image_id}"
          f"{{{','.join(IMAGE_SUFFIXES[:3])}}}")
    return _images.load_image(p)

  def load_label(self, image_id: str) -> np.ndarray:
    """[H, W] uint8 class indices. Raises FileNotFoundError naming the missing GT file."""
    p = self.label_path(image_id)
    if not p.is_file():
      raise FileNotFoundError(f"GT label for VOC id {image_id!r} not found: {p}")
    return read_label_png(p)

  def _resolve_id(self, key: int | str) -> str:
    if isinstance(key, (int, np.integer)):
      return self.ids[key]
    if key not in self._index:
      raise KeyError(f"id {key!r} is not in {self.image_set_file}")
    return key

  def __getitem__(self, key: int | str) -> dict:
    """`dict(id=str, image=[H, W, 3] uint8, label=[H, W] uint8)` by index or id."""
    image_id = self._resolve_id(key)
    image, label = self.load_image(image_id), self.load_label(image_id)
    if image.shape[:2] != label.shape:
      raise ValueError(f"VOC id {image_id!r}: image {self.image_path(image_id)} is "
                       f"{image.shape[:2]} but label {self.label_path(image_id)} is {label.shape}")
    return dict(id=image_id, image=image, label=label)

  def __iter__(self) -> Iterator[dict]:
    for image_id in self.ids:
      yield self[image_id]

  def subset(self, ids: Sequence[str]) -> "VOCSegmentation":
    """A view restricted to `ids` (e.g. `ds.subset(ds.ids_with_images())`)."""
    unknown = [i for i in ids if i not in self._index]
    if unknown:
      raise KeyError(f"ids not in {self.image_set_file}: {unknown[:5]}")
    view = object.__new__(VOCSegmentation)
    view.__dict__.update(self.__dict__)
    view.ids = list(ids)
    view._index = {image_id: i for i, image_id in enumerate(view.ids)}
    return view
