"""Reading user images: decode, convert to 8-bit RGB, apply EXIF orientation, skip bad files.

Every image that enters the pipeline goes through `load_image`, which returns `[H, W, 3]
uint8` RGB whatever the file holds:

  * grayscale (L, 1-bit) -> replicated to 3 channels;
  * palette (P) -> its RGB colours (through RGBA when the palette has transparency);
  * with alpha (RGBA, LA, PA, palette transparency) -> composited over a WHITE background.
    Pixels under alpha = 0 hold arbitrary colours (often black or leftovers from editing);
    white is what an image viewer shows and keeps cut-out objects separable from the
    background for the clustering;
  * 16-bit grayscale (I;16*, I) -> scaled by 255/65535 (Pillow's own `convert("L")` clips
    values > 255 to white instead of scaling); 16-bit RGB PNGs are already reduced to 8 bits
    by Pillow when opened;
  * CMYK / YCbCr / LAB / HSV -> Pillow's RGB conversion;
  * multi-frame files (GIF, TIFF) -> the first frame;
  * EXIF orientation (phone photos) applied, so the array is upright as a viewer shows it.

Corrupt, truncated, empty or non-image files raise `ImageError`, whose message starts with
the path. `iter_images` turns those into a warning naming the file and moves on, so one bad
file does not stop a long run.

Example (PHOTOS: a folder of photos; in the doctests two of the shipped sample photos):
  >>> for image_id, img in iter_images(list_images(PHOTOS), min_hw=14):
  ...   print(image_id, img.shape, img.dtype)
  chelsea (300, 451, 3) uint8
  coffee (400, 600, 3) uint8
"""

from __future__ import annotations

import io
import os
import pathlib
import warnings
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lightcluster_jax.data import files

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

PathLike = str | os.PathLike


class ImageError(ValueError):
  """A file that cannot be used as an image; `path` and `reason` are attributes."""

  def __init__(self, path: PathLike, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


def _to_rgb(img: Image.Image, path: PathLike) -> np.ndarray:
  """[H, W, 3] uint8 RGB from a decoded Pillow image of any mode (see module docstring)."""
  mode = img.mode
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    mode = img.mode
  elif mode in ("PA",):
    img = img.convert("RGBA")
    mode = "RGBA"
  elif mode == "L" and "transparency" in img.info:
    img = img.convert("LA")
    mode = "LA"
  elif mode == "RGB" and "transparency" in img.info:
    img = img.convert("RGBA")
    mode = "RGBA"

  if mode == "RGB":
    return np.asarray(img, np.uint8)
  if mode in ("RGBA", "LA", "RGBa", "La"):
    if mode in ("RGBa", "La"):  # premultiplied alpha
      img = img.convert("RGBA" if mode == "RGBa" else "LA")
    rgba = np.asarray(img.convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
  if mode in ("L", "1"):
    gray = np.asarray(img.convert("L"), np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode.startswith("I;16") or mode == "I":
    wide = np.asarray(img).astype(np.float64)
    gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
    return np.asarray(img.convert("RGB"), np.uint8)
  raise ImageError(path, f"unsupported image mode {mode!r} (expected 8-bit RGB, gray, palette, "
                   "alpha or 16-bit gray); convert the file to 8-bit RGB")


def load_image(path: PathLike) -> np.ndarray:
  """Decodes one image file to upright RGB.

  Args:
    path: image file (any format Pillow reads: jpg, png, webp, bmp, gif, tiff, ...).

  Returns:
    [H, W, 3] uint8 RGB with EXIF orientation applied.

  Raises:
    FileNotFoundError: the file does not exist (message names it).
    ImageError: the file is empty, truncated, corrupt, not an image, or of an unsupported
      mode (message starts with the path).
  """
  path = files.as_path(path)   # local, or gs:// etc. through etils.epath
  if not path.is_file():
    raise FileNotFoundError(f"image file not found: {path}")
  if files.is_remote(path):
    data = path.read_bytes()
    opened, size = io.BytesIO(data), len(data)
  else:
    opened, size = path, path.stat().st_size
  if size == 0:
    raise ImageError(path, "empty file")
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # A global Pillow flag some libraries set; it would silently return half-grey images.
    warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files will not be "
                  "detected", stacklevel=2)
  try:
    with Image.open(opened) as img:
      img.load()  # decodes now, so truncation/corruption raises here and not later
      img = ImageOps.exif_transpose(img)
      return _to_rgb(img, path)
  except ImageError:
    raise
  except UnidentifiedImageError:
    raise ImageError(path, "not a recognised image file (corrupt or wrong extension)") from None
  except Image.DecompressionBombError as e:
    raise ImageError(path, f"image too large ({e})") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise ImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def list_images(folder: PathLike, exts: Sequence[str] = IMAGE_EXTENSIONS, *,
                recursive: bool = False) -> list[pathlib.Path]:
  """Image files in a folder, sorted by path.

  Extensions are matched case-insensitively (`.JPG` counts). Hidden files (names starting
  with "." such as macOS `._x.jpg` resource forks) are skipped.

  Args:
    folder: directory to list.
    exts: accepted extensions, with the dot.
    recursive: also list sub-folders.

  Returns:
    sorted list of `pathlib.Path` (`etils.epath.Path` for a `gs://...` folder).

  Raises:
    FileNotFoundError / NotADirectoryError: naming `folder`.
  """
  folder = files.as_path(folder)
  if not folder.exists():
    raise FileNotFoundError(f"image folder not found: {folder}")
  if not folder.is_dir():
    raise NotADirectoryError(f"not a folder: {folder}")
  wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
  candidates = folder.rglob("*") if recursive else folder.iterdir()
  return sorted(p for p in candidates
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted)


def image_ids(paths: Iterable[PathLike]) -> list[str]:
  """File stems used as image ids; raises ValueError naming files whose stems collide."""
  seen: dict[str, pathlib.Path] = {}
  ids = []
  for p in map(pathlib.Path, paths):
    if p.stem in seen:
      raise ValueError(f"two images share the id {p.stem!r}: {seen[p.stem]} and {p} "
                       "(outputs are named by id; rename one)")
    seen[p.stem] = p
    ids.append(p.stem)
  return ids


def check_min_size(img: np.ndarray, min_hw: int | Sequence[int], path: PathLike = "<array>"
                   ) -> None:
  """Raises ImageError if `img` ([H, W, ...]) is smaller than `min_hw` (e.g. one ViT patch).

  Args:
    img: [H, W, ...] array.
    min_hw: int or (min_h, min_w), e.g. the patch size 14 or 16.
    path: name used in the message.
  """
  min_h, min_w = (min_hw, min_hw) if np.isscalar(min_hw) else tuple(min_hw)
  h, w = img.shape[:2]
  if h < min_h or w < min_w:
    raise ImageError(path, f"image is {h}x{w} pixels (HxW), smaller than one {min_h}x{min_w} "
                     "patch; it cannot be segmented")


def iter_images(paths: PathLike | Iterable[PathLike], *,
                on_error: Literal["warn", "raise"] = "warn",
                min_hw: int | Sequence[int] | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(image_id, [H, W, 3] uint8)` for each readable image, in order.

  Args:
    paths: a folder (listed with `list_images`) or a sequence of files.
    on_error: "warn": a corrupt / unreadable / too-small file is skipped with a
      `warnings.warn` naming it (category `UserWarning`) and the run goes on; "raise":
      the `ImageError` propagates.
    min_hw: optional minimum (H, W) (e.g. the ViT patch size), checked by `check_min_size`.

  Raises:
    ValueError: two files have the same stem (ids must be unique).
  """
  if on_error not in ("warn", "raise"):
    raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
  if isinstance(paths, (str, os.PathLike)) and pathlib.Path(paths).is_dir():
    paths = list_images(paths)
  paths = [pathlib.Path(p) for p in paths]
  ids = image_ids(paths)
  for image_id, path in zip(ids, paths):
    try:
      img = load_image(path)
      if min_hw is not None:
        check_min_size(img, min_hw, path)
    except (ImageError, FileNotFoundError) as e:
      if on_error == "raise":
        raise
      warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
      continue
    yield image_id, img
