"""Where images come from: random-access sources (a folder, a TFDS dataset) and the loader.

A source is a sequence of images with unique string ids, read by index:

  FolderSource(paths)            image files, local or any `etils.epath` filesystem (gs://...);
                                 id = file stem
  TfdsSource(name, split)        a TFDS dataset with an image feature, through
                                 `tfds.data_source` (ArrayRecord, random access, no TensorFlow);
                                 id = its `id` feature (ours: `data.tfds_builders`), or
                                 `<split>-<index>` when it has none

Every host sees the same list of ids; each reads only its own contiguous share
(`blocks.sharding.host_shard`). `prefetch(fn, xs)` maps a loader over them in a
Grain pipeline (`grain.MapDataset` + read threads + prefetch buffer): decoding and resizing
run in threads while the device computes, results come back in order, and a failure comes
back as a value naming the culprit instead of ending the run.

Example (a folder; a TFDS dataset works the same, see `TfdsSource`):
  >>> from lightcluster_jax.data import images as images_lib
  >>> src = FolderSource(images_lib.list_images(PHOTOS))
  >>> len(src), src.ids
  (2, ['chelsea', 'coffee'])
  >>> [(n, img.shape) for n, img, err in prefetch(src.image, range(len(src)), threads=2)]
  [(0, (300, 451, 3)), (1, (400, 600, 3))]
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from lightcluster_jax.data import files
from lightcluster_jax.data import images as images_lib

__all__ = ["ImageSource", "FolderSource", "TfdsSource", "parse_tfds_spec", "prefetch"]


class ImageSource:
  """Base of the sources: `ids`, `len`, `image(i)`, `fingerprint(i)`, `label(i)`."""

  ids: list

  def __len__(self) -> int:
    return len(self.ids)

  def image(self, i: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB of image i."""
    raise NotImplementedError

  def fingerprint(self, i: int) -> str:
    """A string that changes when image i's content changes (cache invalidation)."""
    raise NotImplementedError

  def label(self, i: int) -> np.ndarray:
    """[H, W] uint8 ground-truth class ids of image i (255 = ignore)."""
    raise ValueError(f"{type(self).__name__} has no labels")


class FolderSource(ImageSource):
  """Image files; the id is the file stem (two files with one stem are an error).

  Args:
    paths: image files (`pathlib.Path`, `etils.epath.Path` or `gs://...` strings).
  """

  def __init__(self, paths: Sequence[os.PathLike | str]):
    self.paths = [files.as_path(p) for p in paths]
    seen = {}
    for p in self.paths:
      if p.stem in seen:
        raise ValueError(f"two images share the id {p.stem!r}: {seen[p.stem]} and {p}")
      seen[p.stem] = p
    self.ids = [p.stem for p in self.paths]

  def image(self, i: int) -> np.ndarray:
    return images_lib.load_image(self.paths[i])

  def fingerprint(self, i: int) -> str:
    st = self.paths[i].stat()
    mtime = getattr(st, "st_mtime_ns", None) or getattr(st, "mtime", "")
    size = getattr(st, "st_size", None) or getattr(st, "length", "")
    return f"{size}-{mtime}"


def parse_tfds_spec(spec: str) -> tuple[str, str]:
  """'NAME:SPLIT' (NAME may be 'name/config:version') -> (name, split)."""
  name, sep, split = spec.rpartition(":")
  if not sep or not name or not split:
    raise ValueError(f"TFDS dataset {spec!r}: expected NAME:SPLIT, e.g. "
                     "voc2012_segmentation:val")
  return name, split


class TfdsSource(ImageSource):
  """Images (and labels) of one split of a prepared TFDS dataset, read by index.

  Args:
    name: the dataset's name (e.g. "voc2012_segmentation", see `data.tfds_builders`).
    split: the split ("val", "train[:1000]", ...).
    data_dir: where it was prepared (default: TFDS's own, ~/tensorflow_datasets).
    image_key, id_key, label_key: feature names. Without an `id_key` feature the id is
      `<split>-<index:06d>`.

  Raises:
    ValueError: naming the dataset when it is not prepared there or has no `image_key`.

  Example:
    >>> val = TfdsSource("voc2012_segmentation", "val", data_dir=TFDS_DIR)
    >>> sorted(val.ids), val.image(0).dtype, val.label(0).ndim
    (['2007_000033', '2007_000042'], dtype('uint8'), 2)
  """

  def __init__(self, name: str, split: str, data_dir: os.PathLike | str | None = None, *,
               image_key: str = "image", id_key: str = "id", label_key: str = "label"):
    import tensorflow_datasets as tfds
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    kw = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
    try:
      self._source = tfds.data_source(name, split=split, **kw)
    except Exception as e:  # not prepared / unknown name / bad split
      raise ValueError(f"TFDS dataset {name}:{split} not readable under "
                       f"{data_dir or 'the TFDS data dir'}: {e}") from e
    info = self._source.dataset_info
    keys = set(info.features.keys())
    if image_key not in keys:
      raise ValueError(f"TFDS dataset {name}: no {image_key!r} feature (has {sorted(keys)})")
    self.has_labels = label_key in keys
    self._tag = f"{info.full_name}:{split}:{info.splits[split].num_bytes}"
    if id_key in keys:  # the ids only: skip decoding the big features
      skip = {k: tfds.decode.SkipDecoding() for k in keys if k != id_key}
      ids_source = tfds.data_source(name, split=split, decoders=skip, **kw)
      self.ids = [_text(ids_source[i][id_key]) for i in range(len(ids_source))]
    else:
      self.ids = [f"{split}-{i:06d}" for i in range(len(self._source))]
    if len(set(self.ids)) != len(self.ids):
      raise ValueError(f"TFDS dataset {name}:{split}: the {id_key!r} feature is not unique")

  def image(self, i: int) -> np.ndarray:
    img = np.asarray(self._source[i][self.image_key])
    if img.ndim == 3 and img.shape[-1] == 1:
      img = img[..., 0]
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
      raise images_lib.ImageError(f"{self.name}:{self.split}[{i}] ({self.ids[i]})",
                                  f"expected an [H, W, 3] uint8 image, got {img.dtype} "
                                  f"{img.shape}")
    return img

  def fingerprint(self, i: int) -> str:
    return f"{self._tag}:{i}"

  def label(self, i: int) -> np.ndarray:
    if not self.has_labels:
      return super().label(i)
    lab = np.asarray(self._source[i][self.label_key])
    return lab[..., 0] if lab.ndim == 3 else lab


def _text(x: Any) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


class _Catch:
  """fn(x) -> (x, fn(x), None), or (x, None, the exception) (picklable for Grain)."""

  def __init__(self, fn: Callable):
    self.fn = fn

  def __call__(self, x):
    try:
      return x, self.fn(x), None
    except Exception as e:  # handed to the caller, who names the culprit
      return x, None, e


def prefetch(fn: Callable, xs: Iterable, *, threads: int = 4, buffer: int = 16
             ) -> Iterator[tuple[Any, Any, Exception | None]]:
  """Yields (x, fn(x), None) or (x, None, exception) for each x, in order.

  With `threads > 0` a Grain pipeline computes up to `buffer` results ahead in `threads`
  threads (image decoding releases the GIL); `threads=0` maps in the calling thread.
  """
  xs, safe = list(xs), _Catch(fn)
  if threads <= 0 or len(xs) <= 1:
    yield from map(safe, xs)
    return
  import grain
  ds = grain.MapDataset.source(xs).map(safe).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
  yield from ds
