"""Pictures: palettes, overlays, PCA-RGB of features, cluster maps, mosaics, heat maps.

Everything here is host-side NumPy + PIL and returns `[H, W, 3] uint8` pictures, so the CLI
and the demo can use it without matplotlib. Only `confusion_heatmap` and `pca_scatter` build
matplotlib figures; they import matplotlib lazily (it is the optional `[notebooks]` extra) and
return a `matplotlib.figure.Figure` without touching pyplot's global state (Jupyter displays a
returned Figure; `fig.savefig(path)` writes it).

Conventions: a patch grid covers the whole image (see `features.preprocess`), so patch-level
arrays are brought to pixels with `upsample_nearest`, PyTorch's `nearest` rule
`src = floor(dst * in / out)`, the same rule as `resize(..., method="nearest")` used by the
evaluation. Pictures of patch-level data are never smoothed: one patch = one flat block.

Example (WEIGHTS: a weights file, in the doctests a tiny random ViT; OUT_DIR: a folder; the
mask and the labels are hand-made here, a run gives them as in `stage_panel`):
  >>> from lightcluster_jax import weights
  >>> from lightcluster_jax.data import synthetic_scene
  >>> from lightcluster_jax.stages import features
  >>> arch, params = weights.load_any(WEIGHTS)
  >>> img = synthetic_scene(40, 60)                                   # [H, W, 3] uint8
  >>> feats = features.extract_features(params, [img], arch=arch, image_size=32)[0]
  >>> rgb = pca_rgb(feats["keys"], grid_hw=feats["grid_hw"])          # [h, w, 3] uint8
  >>> rgb.shape
  (4, 6, 3)
  >>> mask = np.zeros(feats["grid_hw"], bool)                         # a patch-level mask
  >>> mask[1:3, 2:4] = True
  >>> labels = np.zeros(img.shape[:2], np.uint8)                      # a pixel label map
  >>> labels[10:30, 15:45] = 8                                        # class 8 ("cat")
  >>> pic = stage_panel(img, {"PCA of Keys": rgb, "mask": mask, "labels": labels})
  >>> save_image(OUT_DIR / "panel.png", pic)
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lightcluster_jax.blocks.metrics import VOC_PALETTE
from lightcluster_jax.data import files

__all__ = [
    "CLUSTER_PALETTE", "voc_palette", "colorize", "overlay", "mask_overlay", "save_image",
    "upsample_nearest", "patch_fraction", "pca", "pca_rgb", "cluster_colours", "heatmap_rgb",
    "matched_labels", "titled", "mask_grid", "side_by_side", "stage_panel",
    "confusion_heatmap", "pca_scatter",
]

# Distinct colours for cluster ids (matplotlib's "tab10" then the light "tab20" shades);
# cluster maps have no background class, so unlike the VOC palette id 0 is not black.
CLUSTER_PALETTE: np.ndarray = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], np.uint8)
CLUSTER_PALETTE.setflags(write=False)

# matplotlib's "viridis" sampled at 17 evenly spaced points, interpolated linearly in
# between (within 5 of 255 of matplotlib's own table everywhere).
_VIRIDIS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
    (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128),
    (63, 188, 115), (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25),
    (253, 231, 37)], np.float32)


# ----------------------------------------------------------------------------- colours


def voc_palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (`metrics.VOC_PALETTE`): [n, 3] uint8, n <= 256, writable copy."""
  if not 0 < n <= len(VOC_PALETTE):
    raise ValueError(f"voc_palette: n must be in [1, {len(VOC_PALETTE)}], got {n}")
  return np.array(VOC_PALETTE[:n])


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """Label ids -> colours: `palette[labels % len(palette)]`.

  Args:
    labels: [H, W] int labels (VOC: 0 background, 255 void).
    palette: [N, 3] uint8; the VOC palette by default.

  Returns:
    [H, W, 3] uint8.
  """
  palette = VOC_PALETTE if palette is None else np.asarray(palette, np.uint8)
  return palette[np.asarray(labels).astype(np.int64) % len(palette)]


def _check_image(image, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{where}: expected an [H, W, 3] image, got shape {image.shape}")
  return image.astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, *, alpha: float = 0.55,
            palette: np.ndarray | None = None) -> np.ndarray:
  """Blends label colours over an image where labels > 0.

  `out = (1 - alpha) * image + alpha * palette[labels]` on pixels with `labels > 0`,
  `out = image` elsewhere, rounded down to uint8.

  Args:
    image: [H, W, 3] uint8.
    labels: [H, W] int, 0 = background (left untouched).
    alpha: weight of the label colour.
    palette: [N, 3] uint8 (VOC by default).

  Returns:
    [H, W, 3] uint8.
  """
  image = _check_image(image, "overlay")
  labels = np.asarray(labels)
  if labels.shape != image.shape[:2]:
    raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
  colours = colorize(labels, palette).astype(np.float32)
  out = image.astype(np.float32)
  fg = labels > 0
  out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
  return np.clip(out, 0, 255).astype(np.uint8)


def _edge(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it (the image border counts as outside)."""
  p = np.pad(mask, 1, constant_values=False)
  inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


def mask_overlay(image: np.ndarray, mask: np.ndarray, *, colour=(255, 64, 32),
                 alpha: float = 0.35, dim: float = 0.5, outline: bool = True) -> np.ndarray:
  """A binary mask shown on its image: foreground tinted, background darkened, outlined.

  `out = (1 - alpha) * image + alpha * colour` inside, `(1 - dim) * image` outside, and the
  mask's boundary pixels painted `colour`. A patch-level mask is upsampled first
  (`upsample_nearest`).

  Args:
    image: [H, W, 3] uint8.
    mask: [H, W] or [h, w] bool (patch grid covering the image).

  Returns:
    [H, W, 3] uint8.
  """
  image = _check_image(image, "mask_overlay")
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"mask_overlay: mask must be [H, W] or [h, w], got shape {mask.shape}")
  if mask.shape != image.shape[:2]:
    mask = upsample_nearest(mask, image.shape[:2])
  c = np.asarray(colour, np.float32)
  out = image.astype(np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * c
  out[~mask] *= 1 - dim
  if outline:
    out[_edge(mask)] = c
  return np.clip(out, 0, 255).astype(np.uint8)


def heatmap_rgb(values: np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0,
                valid: np.ndarray | None = None) -> np.ndarray:
  """Scalar map -> viridis colours (dark blue = vmin, yellow = vmax), NumPy only.

  Args:
    values: [H, W] float (e.g. a foreground probability).
    vmin, vmax: the value range mapped onto the colour map (values are clipped).
    valid: optional [H, W] bool; invalid pixels are black.

  Returns:
    [H, W, 3] uint8.
  """
  v = np.asarray(values, np.float32)
  if v.ndim != 2:
    raise ValueError(f"heatmap_rgb: values must be [H, W], got shape {v.shape}")
  if not vmax > vmin:
    raise ValueError(f"heatmap_rgb: need vmax > vmin, got vmin={vmin}, vmax={vmax}")
  t = np.clip((np.nan_to_num(v, nan=vmin) - vmin) / (vmax - vmin), 0, 1) * (len(_VIRIDIS) - 1)
  i = np.minimum(np.floor(t).astype(np.int64), len(_VIRIDIS) - 2)
  f = (t - i)[..., None]
  out = np.round((1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1]).astype(np.uint8)
  if valid is not None:
    out[~np.asarray(valid, bool)] = 0
  return out


def cluster_colours(assignment: np.ndarray, k: int, *, valid: np.ndarray | None = None,
                    palette: np.ndarray | None = None) -> np.ndarray:
  """Cluster ids -> distinct colours (`CLUSTER_PALETTE`); invalid patches black.

  Args:
    assignment: [h, w] int cluster ids in [0, k).
    k: number of clusters (checks the ids, at most len(palette)).
    valid: optional [h, w] bool (padding of a padded grid).
    palette: [N >= k, 3] uint8 (default `CLUSTER_PALETTE`).

  Returns:
    [h, w, 3] uint8.
  """
  palette = CLUSTER_PALETTE if palette is None else np.asarray(palette, np.uint8)
  a = np.asarray(assignment).astype(np.int64)
  if k > len(palette):
    raise ValueError(f"cluster_colours: k={k} clusters but the palette has {len(palette)} "
                     "colours; pass a larger palette")
  valid = np.ones(a.shape, bool) if valid is None else np.asarray(valid, bool)
  if valid.shape != a.shape:
    raise ValueError(f"cluster_colours: valid {valid.shape} does not match assignment {a.shape}")
  bad = valid & ((a < 0) | (a >= k))
  if bad.any():
    raise ValueError(f"cluster_colours: cluster ids outside [0, {k}): "
                     f"{np.unique(a[bad])[:10].tolist()}")
  out = palette[np.clip(a, 0, k - 1)]
  out[~valid] = 0
  return out


def matched_labels(labels: np.ndarray, mapping, *, unmatched: int = 255) -> np.ndarray:
  """Renames predicted cluster ids to their Hungarian-matched GT classes for display.

  Args:
    labels: [H, W] int predicted ids.
    mapping: [K] int, GT class of predicted id k or -1 (`segmentation_scores()["mapping"]`).
    unmatched: the value given to unmatched ids and ids >= K (255 = VOC void colour).

  Returns:
    [H, W] uint8 GT-class ids, colourable with `colorize` like the GT.
  """
  mapping = np.asarray(mapping, np.int64)
  lab = np.asarray(labels).astype(np.int64)
  table = np.where(mapping >= 0, mapping, unmatched)
  out = np.where((lab >= 0) & (lab < len(mapping)), table[np.clip(lab, 0, len(mapping) - 1)],
                 unmatched)
  return out.astype(np.uint8)


# ----------------------------------------------------------------------------- grids


def upsample_nearest(grid: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """Nearest-neighbour upsampling of a patch grid to pixels (PyTorch `nearest` rule).

  Output pixel (i, j) takes grid cell (floor(i h / H), floor(j w / W)), computed in integer
  arithmetic (the same cells as `resize(..., method="nearest")`).

  Args:
    grid: [h, w, ...] array of any dtype.
    hw: (H, W) output size.

  Returns:
    [H, W, ...] array of grid's dtype.
  """
  grid = np.asarray(grid)
  if grid.ndim < 2:
    raise ValueError(f"upsample_nearest: grid must be [h, w, ...], got shape {grid.shape}")
  out_h, out_w = (int(v) for v in hw)
  h, w = grid.shape[:2]
  if out_h < 1 or out_w < 1:
    raise ValueError(f"upsample_nearest: bad output size {hw}")
  rows = np.arange(out_h) * h // out_h
  cols = np.arange(out_w) * w // out_w
  return grid[rows[:, None], cols[None, :]]


def patch_fraction(mask: np.ndarray, grid_hw: Sequence[int], *,
                   valid: np.ndarray | None = None) -> np.ndarray:
  """Share of each patch's pixel area covered by `mask` (area averaging onto a patch grid).

  Patch (i, j) covers the pixel rectangle [i H/h, (i+1) H/h) x [j W/w, (j+1) W/w) of the
  image; pixels cut by a patch boundary count with the share of their area inside it:
  `fraction = A_r mask A_c^T` with `A_r[i, y] = |[y, y+1) n [i H/h, (i+1) H/h)| h / H`. With
  `valid` (e.g. GT != 255, void excluded) the share is area(mask & valid) / area(valid), NaN
  for a patch without a valid pixel.

  Args:
    mask: [H, W] bool pixel mask (e.g. GT foreground).
    grid_hw: (h, w) patch grid.
    valid: optional [H, W] bool.

  Returns:
    [h, w] float32 in [0, 1] (NaN where no pixel is valid).
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"patch_fraction: mask must be [H, W], got shape {mask.shape}")
  gh, gw = (int(v) for v in grid_hw)
  ar, ac = _area_weights(gh, mask.shape[0]), _area_weights(gw, mask.shape[1])

  def box(a):
    return ar @ a.astype(np.float64) @ ac.T

  if valid is None:
    return np.clip(box(mask), 0, 1).astype(np.float32)
  valid = np.asarray(valid, bool)
  if valid.shape != mask.shape:
    raise ValueError(f"patch_fraction: valid {valid.shape} does not match mask {mask.shape}")
  num, den = box(mask & valid), box(valid)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 1e-9, np.clip(num / np.maximum(den, 1e-12), 0, 1), np.nan).astype(
        np.float32)


def _area_weights(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in]: share of output cell i's extent covered by input pixel y (rows sum to 1)."""
  if n_out < 1 or n_in < 1:
    raise ValueError(f"patch_fraction: bad sizes {n_out} cells for {n_in} pixels")
  edges = np.arange(n_out + 1) * (n_in / n_out)
  y = np.arange(n_in)
  overlap = np.minimum(edges[1:, None], y[None] + 1.0) - np.maximum(edges[:-1, None], y[None])
  return np.clip(overlap, 0, None) * (n_out / n_in)


# ----------------------------------------------------------------------------- PCA


def _grid_features(features, valid, grid_hw, where: str):
  x = np.asarray(features, np.float64)
  if x.ndim == 3:
    grid_hw = x.shape[:2]
    x = x.reshape(-1, x.shape[-1])
  elif x.ndim == 2:
    if grid_hw is None and valid is not None and np.ndim(valid) == 2:
      grid_hw = np.shape(valid)
    if grid_hw is None:
      grid_hw = (x.shape[0], 1)
  else:
    raise ValueError(f"{where}: features must be [P, D] or [h, w, D], got shape {x.shape}")
  h, w = (int(v) for v in grid_hw)
  if h * w != x.shape[0]:
    raise ValueError(f"{where}: {x.shape[0]} feature rows do not fill a {h}x{w} grid")
  v = np.ones(h * w, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  if v.shape[0] != h * w:
    raise ValueError(f"{where}: valid has {v.shape[0]} entries for {h * w} patches")
  return x, v, (h, w)


def pca(features: np.ndarray, valid: np.ndarray | None = None, *, n_components: int = 3):
  """Principal components fitted on the valid rows, applied to all rows.

  With the valid rows X_v (N x D) and their mean mu, the SVD X_v - mu = U S V^T gives the
  components V[:n] (rows, unit norm) and the explained-variance ratio S_i^2 / sum_j S_j^2.
  Signs are fixed like scikit-learn's PCA (`svd_flip(u_based_decision=False)`): the entry of
  largest magnitude of every component is positive, so the picture does not flip between runs.

  Args:
    features: [P, D] or [..., D] float.
    valid: optional [P] (or [...]) bool rows to fit on; default all.
    n_components: n <= min(N, D).

  Returns:
    (proj [P, n] float64 = (X - mu) V[:n]^T, components [n, D], explained_variance_ratio [n],
    mean [D]).
  """
  x = np.asarray(features, np.float64)
  x = x.reshape(-1, x.shape[-1])
  v = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  if v.shape[0] != x.shape[0]:
    raise ValueError(f"pca: valid has {v.shape[0]} entries for {x.shape[0]} feature rows")
  xv = x[v]
  if not 1 <= n_components <= min(xv.shape):
    raise ValueError(f"pca: n_components={n_components} must be in [1, {min(xv.shape)}] "
                     f"({xv.shape[0]} valid rows of dimension {xv.shape[1]})")
  mean = xv.mean(0)
  _, s, vt = np.linalg.svd(xv - mean, full_matrices=False)
  biggest = np.argmax(np.abs(vt), axis=1)
  vt = vt * np.sign(vt[np.arange(len(vt)), biggest])[:, None]
  var = s ** 2
  ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
  comps = vt[:n_components]
  return (x - mean) @ comps.T, comps, ratio[:n_components], mean


def pca_rgb(features: np.ndarray, valid: np.ndarray | None = None, *, n_components: int = 3,
            grid_hw: Sequence[int] | None = None, clip_quantile: float = 0.01) -> np.ndarray:
  """The first principal components of patch features as an RGB picture.

  Component c (fitted on the valid patches, see `pca`) is scaled to [0, 255] between its
  `clip_quantile` and `1 - clip_quantile` quantiles over the valid patches (outliers are
  clipped, so a few extreme patches do not wash the picture out):
  `channel_c = round(255 * clip((p_c - lo_c) / (hi_c - lo_c), 0, 1))`. One component gives a
  grey picture, two fill red and green. Invalid patches are black.

  Args:
    features: [P, D] (row-major grid; give `grid_hw` or a 2-D `valid`) or [h, w, D].
    valid: optional [h, w] or [P] bool: the patches the PCA is fitted on and shown (e.g.
      the non-padded ones, or only a foreground mask).
    n_components: 1, 2 or 3.
    grid_hw: (h, w) for [P, D] features.
    clip_quantile: in [0, 0.5); 0 = plain min-max scaling.

  Returns:
    [h, w, 3] uint8.
  """
  if n_components not in (1, 2, 3):
    raise ValueError(f"pca_rgb: n_components must be 1, 2 or 3, got {n_components}")
  if not 0 <= clip_quantile < 0.5:
    raise ValueError(f"pca_rgb: clip_quantile must be in [0, 0.5), got {clip_quantile}")
  x, v, (h, w) = _grid_features(features, valid, grid_hw, "pca_rgb")
  proj, *_ = pca(x, v, n_components=n_components)
  lo = np.quantile(proj[v], clip_quantile, axis=0)
  hi = np.quantile(proj[v], 1 - clip_quantile, axis=0)
  scaled = np.clip((proj - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
  rgb = np.zeros((h * w, 3), np.float64)
  if n_components == 1:
    rgb[:] = scaled
  else:
    rgb[:, :n_components] = scaled
  rgb = np.round(rgb * 255).astype(np.uint8)
  rgb[~v] = 0
  return rgb.reshape(h, w, 3)


# ----------------------------------------------------------------------------- mosaics


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    return ImageFont.load_default()


def _as_rgb(x, where: str) -> np.ndarray:
  """A tile as [H, W, 3] uint8.

  uint8 [H, W, 3] as is; float [H, W, 3] read as [0, 1]; bool [H, W] white on black;
  float [H, W] viridis in [0, 1]; integer [H, W] VOC colours.
  """
  a = np.asarray(x)
  if a.ndim == 3 and a.shape[-1] == 3:
    if a.dtype == np.uint8:
      return a
    return np.round(np.clip(a.astype(np.float32), 0, 1) * 255).astype(np.uint8)
  if a.ndim == 2:
    if a.dtype == bool:
      return np.repeat((a.astype(np.uint8) * 255)[..., None], 3, -1)
    if np.issubdtype(a.dtype, np.floating):
      return heatmap_rgb(a)
    if np.issubdtype(a.dtype, np.integer):
      return colorize(a)
  raise ValueError(f"{where}: cannot draw an array of shape {a.shape} and dtype {a.dtype} "
                   "(expected [H, W, 3] RGB, or [H, W] bool / float / int)")


def _fit(tile: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Resizes to `hw`: enlarged by nearest neighbour (patch grids stay blocky), shrunk by
  area averaging (photos stay smooth)."""
  if tile.shape[:2] == tuple(hw):
    return tile
  if tile.shape[0] <= hw[0] and tile.shape[1] <= hw[1]:
    return upsample_nearest(tile, hw)
  return np.asarray(Image.fromarray(tile).resize((hw[1], hw[0]), Image.BOX))


def titled(tile: np.ndarray, title: str | None, *, font_size: int = 14,
           background: int = 255) -> np.ndarray:
  """Adds a title bar (black text on `background`) above an [H, W, 3] uint8 picture."""
  tile = _check_image(tile, "titled")
  if not title:
    return tile
  font = _font(font_size)
  bar_h = font_size + 8
  bar = Image.new("RGB", (tile.shape[1], bar_h), (background,) * 3)
  draw = ImageDraw.Draw(bar)
  text = str(title)
  # Shorten titles that do not fit rather than letting them spill over the next tile.
  while text and draw.textlength(text, font=font) > tile.shape[1] - 6:
    text = text[:-2] + "…" if len(text) > 2 else ""
  draw.text((3, 3), text, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(bar), tile], axis=0)


def mask_grid(tiles: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
              *, tile_hw: Sequence[int] | None = None, pad: int = 4, background: int = 255,
              font_size: int = 14) -> np.ndarray:
  """Lays pictures, masks, label maps and heat maps out on a grid, with titles.

  Each tile is converted to RGB (`uint8 [H, W, 3]` as is, float `[H, W, 3]` in [0, 1],
  bool `[H, W]` white = True, float `[H, W]` viridis over [0, 1], int `[H, W]` VOC colours)
  and resized to `tile_hw` (enlarged by nearest neighbour so patch grids stay blocky,
  shrunk with area averaging).

  Args:
    tiles: list of arrays as above.
    titles: optional list of the same length (None / "" for no title).
    ncols: tiles per row.
    tile_hw: (height, width) of every tile; default the first tile's size.
    pad: pixels between tiles (and around the mosaic).
    background: grey level of the padding.

  Returns:
    [rows * (th + title + pad) + pad, ncols * (tw + pad) + pad, 3] uint8 mosaic.
  """
  if len(tiles) == 0:
    raise ValueError("mask_grid: no tiles")
  if titles is not None and len(titles) != len(tiles):
    raise ValueError(f"mask_grid: {len(titles)} titles for {len(tiles)} tiles")
  if ncols < 1:
    raise ValueError(f"mask_grid: ncols must be >= 1, got {ncols}")
  rgb = [_as_rgb(t, f"mask_grid tile {i}") for i, t in enumerate(tiles)]
  th, tw = (int(v) for v in (tile_hw if tile_hw is not None else rgb[0].shape[:2]))
  any_title = titles is not None and any(titles)
  cells = []
  for i, tile in enumerate(rgb):
    cell = _fit(tile, (th, tw))
    if any_title:  # every cell gets a bar so the rows stay aligned
      cell = titled(cell, (titles[i] or " "), font_size=font_size, background=background)
    cells.append(cell)
  ncols = min(ncols, len(cells))
  nrows = -(-len(cells) // ncols)
  ch, cw = cells[0].shape[:2]
  out = np.full((nrows * (ch + pad) + pad, ncols * (cw + pad) + pad, 3), background, np.uint8)
  for i, cell in enumerate(cells):
    r, c = divmod(i, ncols)
    y, x = pad + r * (ch + pad), pad + c * (cw + pad)
    out[y:y + ch, x:x + cw] = cell
  return out


def side_by_side(tiles: Sequence[np.ndarray], titles: Sequence[str] | None = None, *,
                 height: int | None = None, pad: int = 4, background: int = 255) -> np.ndarray:
  """One row of pictures at a common height (each keeps its own aspect ratio).

  Args:
    tiles: arrays as in `mask_grid`.
    titles: optional, one per tile.
    height: common height (default: the first tile's).

  Returns:
    [height (+ title bar) + 2 pad, sum of widths + pads, 3] uint8.
  """
  if len(tiles) == 0:
    raise ValueError("side_by_side: no tiles")
  rgb = [_as_rgb(t, f"side_by_side tile {i}") for i, t in enumerate(tiles)]
  height = int(height or rgb[0].shape[0])
  cols = [mask_grid([t], None if titles is None else [titles[i]], 1,
                    tile_hw=(height, max(1, round(t.shape[1] * height / t.shape[0]))),
                    pad=0, background=background)
          for i, t in enumerate(rgb)]
  h = max(c.shape[0] for c in cols)
  gap = np.full((h, pad, 3), background, np.uint8)
  parts = [gap]
  for c in cols:
    parts += [np.pad(c, ((0, h - c.shape[0]), (0, 0), (0, 0)), constant_values=background), gap]
  row = np.concatenate(parts, axis=1)
  edge = np.full((pad, row.shape[1], 3), background, np.uint8)
  return np.concatenate([edge, row, edge], axis=0)


def stage_panel(image: np.ndarray, stages: Mapping[str, np.ndarray | None], *,
                ncols: int | None = None, tile_height: int | None = 240,
                include_image: bool = True, pad: int = 4) -> np.ndarray:
  """The picture of one image through the pipeline: one titled tile per stage.

  Each stage value is drawn according to its type, on the image where that helps:
    * uint8 [h, w, 3]: an RGB picture (e.g. `pca_rgb`, `cluster_colours`), enlarged blocky;
    * bool [h, w] or [H, W]: a mask, `mask_overlay` on the image;
    * float [h, w] or [H, W]: a probability in [0, 1], viridis (`heatmap_rgb`);
    * integer [H, W]: labels (0 = background), `overlay` in VOC colours on the image;
    * None: skipped.

  Args:
    image: [H, W, 3] uint8.
    stages: {title: array} in display order.
    ncols: tiles per row (default: all in one row).
    tile_height: height of every tile (None: the image's); width follows the aspect ratio.
    include_image: put the image itself first, titled "image".

  Returns:
    [rows * (tile + title bar + pad) + pad, ..., 3] uint8 mosaic.

  Example (hand-made stages of a 40 x 60 image with a 4 x 6 patch grid; after a run,
  `res = runner.segment(...)`, they are `m = res.artefacts("masks", image_id)`, `m["image"]`,
  `m["consistent"]` (patch masks), `m["prob"]` (float) and `res.labels[image_id]`):
    >>> from lightcluster_jax.data import synthetic_scene
    >>> img = synthetic_scene(40, 60)
    >>> consistent = np.zeros((4, 6), bool)
    >>> consistent[1:3, 2:4] = True
    >>> labels = np.zeros((40, 60), np.uint8)
    >>> labels[10:30, 15:45] = 8
    >>> pic = stage_panel(img, {"consistent": consistent, "labels": labels}, tile_height=60)
    >>> pic.shape, pic.dtype       # image + 2 tiles of 60 x 90 pixels, with title bars
    ((90, 286, 3), dtype('uint8'))
  """
  image = _check_image(image, "stage_panel")
  hh, ww = image.shape[:2]
  tiles, titles = ([image], ["image"]) if include_image else ([], [])
  for name, value in stages.items():
    if value is None:
      continue
    a = np.asarray(value)
    if a.ndim == 2 and a.dtype == bool:
      tile = mask_overlay(image, a)
    elif a.ndim == 2 and np.issubdtype(a.dtype, np.floating):
      tile = heatmap_rgb(a)  # a patch grid is enlarged blocky by mask_grid
    elif a.ndim == 2 and np.issubdtype(a.dtype, np.integer):
      if a.shape != (hh, ww):
        raise ValueError(f"stage_panel: label map {name!r} has shape {a.shape}, the image "
                         f"{(hh, ww)}; colour patch-level cluster ids with cluster_colours")
      tile = overlay(image, a)
    else:
      tile = _as_rgb(a, f"stage_panel stage {name!r}")
    tiles.append(tile)
    titles.append(name)
  if not tiles:
    raise ValueError("stage_panel: nothing to draw")
  th = int(tile_height or hh)
  tw = max(1, round(ww * th / hh))
  return mask_grid(tiles, titles, ncols or len(tiles), tile_hw=(th, tw), pad=pad)


# ----------------------------------------------------------------------------- figures


def confusion_heatmap(confusion: np.ndarray, class_names: Sequence[str], *,
                      col_names: Sequence[str] | None = None, normalize: str | None = "row",
                      title: str | None = None, annotate: bool | None = None,
                      figsize: tuple[float, float] | None = None):
  """A confusion matrix as a matplotlib heat map (rows GT, columns prediction).

  For unsupervised predictions pass the Hungarian-matched matrix
  (`metrics.apply_mapping(confusion, scores["mapping"])`, [G, G + 1], whose last column is
  "no class"); its diagonal then holds each class's correctly labelled pixels.

  Args:
    confusion: [G, K] counts.
    class_names: G row names.
    col_names: K column names (default: `class_names`, plus "no class" when K = G + 1).
    normalize: "row" (share of each GT class's pixels; recall on the diagonal), "all", or
      None (raw counts, log-free colour scale).
    title: figure title.
    annotate: write the values in the cells (default: when G <= 25).
    figsize: matplotlib figure size in inches.

  Returns:
    matplotlib.figure.Figure (not registered with pyplot; Jupyter displays it when returned).
  """
  from matplotlib.figure import Figure  # optional [notebooks] dependency

  c = np.asarray(confusion, np.float64)
  if c.ndim != 2:
    raise ValueError(f"confusion_heatmap: confusion must be [G, K], got shape {c.shape}")
  g, k = c.shape
  if len(class_names) != g:
    raise ValueError(f"confusion_heatmap: {len(class_names)} class names for {g} rows")
  if col_names is None:
    col_names = list(class_names) + (["no class"] if k == g + 1 else [])
  if len(col_names) != k:
    raise ValueError(f"confusion_heatmap: {len(col_names)} column names for {k} columns")
  if normalize == "row":
    with np.errstate(invalid="ignore", divide="ignore"):
      m = c / c.sum(1, keepdims=True)
    label = "share of the GT class's pixels"
  elif normalize == "all":
    m = c / max(c.sum(), 1.0)
    label = "share of all pixels"
  elif normalize is None:
    m, label = c, "pixels"
  else:
    raise ValueError(f"confusion_heatmap: normalize must be 'row', 'all' or None, got "
                     f"{normalize!r}")
  fig = Figure(figsize=figsize or (1.2 + 0.42 * k, 1.0 + 0.4 * g), layout="constrained")
  ax = fig.add_subplot()
  im = ax.imshow(np.nan_to_num(m), cmap="viridis", aspect="auto",
                 vmin=0, vmax=1 if normalize else None)
  ax.set_xticks(range(k), labels=col_names, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(g), labels=class_names, fontsize=8)
  ax.set_xlabel("prediction (matched)")
  ax.set_ylabel("ground truth")
  if title:
    ax.set_title(title)
  fig.colorbar(im, ax=ax, label=label, shrink=0.8)
  if annotate if annotate is not None else g <= 25:
    top = np.nanmax(m) if np.isfinite(m).any() else 1.0
    for i in range(g):
      for j in range(k):
        if np.isfinite(m[i, j]) and m[i, j] > 0:
          txt = f"{m[i, j]:.2f}".lstrip("0") if normalize else f"{int(m[i, j])}"
          ax.text(j, i, txt, ha="center", va="center", fontsize=6,
                  color="black" if m[i, j] > 0.6 * top else "white")
  return fig


def pca_scatter(points: np.ndarray, labels: np.ndarray, names: Sequence[str], *,
                colours: Sequence | None = None, title: str | None = None, ax=None,
                max_points: int = 20_000, seed: int = 0, point_size: float = 2.0):
  """Scatter of 2-D projections coloured by a label (e.g. GT foreground vs background).

  Args:
    points: [N, 2] (e.g. the first two columns of `pca(...)[0]`).
    labels: [N] int in [0, len(names)); negative = not drawn (e.g. void patches).
    names: legend entry of each label.
    colours: one matplotlib colour per label (default background grey-blue, foreground red,
      then `CLUSTER_PALETTE`).
    title: axes title.
    ax: draw into these axes; default a new Figure.
    max_points: random subsample drawn (seeded) to keep the figure light.

  Returns:
    the matplotlib Figure.
  """
  points = np.asarray(points, np.float64)
  labels = np.asarray(labels).reshape(-1)
  if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
    raise ValueError(f"pca_scatter: points must be [N, 2] with N = len(labels) "
                     f"({len(labels)}), got {points.shape}")
  if ax is None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  if colours is None:
    base = ["#6b8fb3", "#e8412c"] + [tuple(c / 255) for c in CLUSTER_PALETTE]
    colours = base[:len(names)]
  keep = np.nonzero(labels >= 0)[0]
  if len(keep) > max_points:
    keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
  for lab, (name, col) in enumerate(zip(names, colours)):
    sel = keep[labels[keep] == lab]
    ax.scatter(points[sel, 0], points[sel, 1], s=point_size, color=col, alpha=0.5,
               label=f"{name} ({int((labels == lab).sum())})", rasterized=True,
               linewidths=0)
  ax.set_xlabel("PC 1")
  ax.set_ylabel("PC 2")
  if title:
    ax.set_title(title, fontsize=10)
  ax.legend(markerscale=4, fontsize=8, loc="best")
  return fig


# ----------------------------------------------------------------------------- files


def save_image(path: os.PathLike, image: np.ndarray, *, quality: int = 90) -> None:
  """Saves an [H, W, 3] uint8 image atomically (format from the suffix: .png / .jpg)."""
  path = files.as_path(path)
  buf = io.BytesIO()
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt, **(
      {"quality": quality} if fmt == "JPEG" else {"optimize": True}))
  files.atomic_write_bytes(path, buf.getvalue())
