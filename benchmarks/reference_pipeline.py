"""LightCluster as a PyTorch user would write it: PyTorch + scikit-learn + pydensecrf2.

The reference side of `benchmarks/end_to_end.py` (which runs it in a fresh process); it uses
nothing from `lightcluster_jax`. One stage after the other over the whole folder, each timed
(stage names as `lightcluster segment`'s summary.json):

  features  PIL RGB -> bicubic resize so the short side is 448 and each side the nearest
            multiple of 14 (aspect changes by at most half a patch, nothing is cropped: the
            patch grid covers the whole image, as `lightcluster_jax`'s default) -> [0, 1] ->
            ImageNet mean/std -> DINOv2-S/14 (official architecture, fused attention
            `F.scaled_dot_product_attention`, pos-embed bicubic with the official
            `interpolate_offset=0.1` scale factor) one image per call: last-block Keys (heads
            concatenated, CLS dropped, L2-normalised) and the final-norm CLS token.
  masks     image level: `KMeans(2, n_init=3)` per image on its Keys, foreground = the cluster
            with the lower share of its patches on the grid border; dataset level: `KMeans(2)`
            over all Keys, foreground = the cluster with the larger share of its patches inside
            the image-level foreground; mask = dataset fg AND image fg dilated by one patch
            (3x3), an empty mask falls back to the image fg. Soft probability per patch:
            s = sigmoid((d_bg - d_fg) / 0.05), d = Euclidean distance to the image's fg / bg
            centroids (means of its Keys inside / outside the mask), its side decided by the
            mask: p = max(s, 1 - s) inside, min(s, 1 - s) outside.
  refine    p upsampled to the image size (`F.interpolate` bilinear, align_corners=False);
            pydensecrf2 `DenseCRF2D` at full resolution, maskcontrast preset (10 iterations;
            Gaussian sxy=1 compat=3; bilateral sxy=67 srgb=3 compat=4), unary -log p.
  regions   8-connected components (`scipy.ndimage.label`) of at least 1% of the image; each
            one's bounding box squashed to 224x224 (PIL bicubic), through the same ViT in
            batches of 32, CLS token L2-normalised.
  labels    `KMeans(min(20, regions))` over all region descriptors; label PNGs (0 background,
            class + 1; PIL, mode L) written to OUT/masks/<id>.png (the writing is timed here;
            `lightcluster segment` writes its PNGs after its timed stages).

Usage:
  python benchmarks/reference_pipeline.py --images DIR --out OUT \
      --weights ../shared/assets/dinov2/dinov2_vits14_imgfocus_backbone.npz

Writes OUT/masks/*.png and OUT/summary.json {"num_images", "num_regions", "timings_s":
{stage: seconds}, "torch_threads"}, and prints that summary as its last line. PyTorch uses its
default thread count (all cores), as a user's script would.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.cluster import KMeans
from torch import nn

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SHORT_SIDE = 448
PATCH = 14
TEMPERATURE = 0.05
CROP = 224
NUM_CLASSES = 20
MIN_REGION_FRACTION = 0.01


# ----------------------------------------------------------------------------- DINOv2-S/14


class Attention(nn.Module):
  """Multi-head self-attention with fused `scaled_dot_product_attention`; also returns Keys."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    return self.proj(out), k.transpose(1, 2).reshape(b, n, d)


class LayerScale(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale (ls1, ls2), as dinov2's `NestedTensorBlock`."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.ls1 = LayerScale(dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)
    self.ls2 = LayerScale(dim)

  def forward(self, x):
    a, keys = self.attn(self.norm1(x))
    x = x + self.ls1(a)
    return x + self.ls2(self.mlp(self.norm2(x))), keys


class PatchEmbed(nn.Module):
  def __init__(self, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
  """DINOv2 ViT-S/14 backbone, official state-dict names, no registers."""

  def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, pos_grid: int = 37):
    super().__init__()
    self.pos_grid = pos_grid
    self.patch_embed = PatchEmbed(dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def pos_embedding(self, gh: int, gw: int):
    """The official `interpolate_pos_encoding`: bicubic, scale factor (n + 0.1) / 37."""
    g = self.pos_grid
    if (gh, gw) == (g, g):
      return self.pos_embed
    grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic",
                         align_corners=False)
    return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1)

  def forward(self, x):
    """x [B, 3, H, W] normalised -> (L2-normalised last-block Keys [B, P, D], CLS [B, D])."""
    t = self.patch_embed(x)
    t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
    t = t + self.pos_embedding(x.shape[2] // PATCH, x.shape[3] // PATCH)
    for block in self.blocks:
      t, keys = block(t)
    return F.normalize(keys[:, 1:], dim=-1), self.norm(t)[:, 0]


def load_model(weights: pathlib.Path) -> DinoV2:
  """The backbone with the official-named .npz weights loaded strictly, in eval mode."""
  model = DinoV2()
  with np.load(weights) as z:
    model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})
  return model.eval()


def to_tensor(image: np.ndarray) -> torch.Tensor:
  """[H, W, 3] uint8 -> [3, H, W] float, [0, 1] then ImageNet mean/std."""
  x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return torch.from_numpy(x).permute(2, 0, 1)


def model_size(h: int, w: int) -> tuple[int, int]:
  """Short side 448, each side rounded to the nearest multiple of the patch."""
  s = SHORT_SIDE / min(h, w)
  return tuple(max(PATCH, round(n * s / PATCH) * PATCH) for n in (h, w))


# ----------------------------------------------------------------------------- stages


def extract_features(model: DinoV2, images: list[np.ndarray]) -> list[dict]:
  """Per image: Keys [P, D], grid (gh, gw)."""
  out = []
  for image in images:
    mh, mw = model_size(*image.shape[:2])
    resized = np.asarray(Image.fromarray(image).resize((mw, mh), Image.BICUBIC))
    keys, _ = model(to_tensor(resized)[None])
    out.append({"keys": keys[0].numpy(), "grid": (mh // PATCH, mw // PATCH)})
  return out


def image_foreground(keys: np.ndarray, grid: tuple[int, int], seed: int) -> np.ndarray:
  """[gh, gw] bool: the k=2 cluster with the lower share of its patches on the border."""
  labels = KMeans(2, n_init=3, random_state=seed).fit_predict(keys).reshape(grid)
  border = np.ones(grid, bool)
  border[1:-1, 1:-1] = False
  share = [border[labels == c].mean() if (labels == c).any() else np.inf for c in (0, 1)]
  return labels == int(np.argmin(share))


def dataset_foreground(feats: list[dict], image_fg: list[np.ndarray], seed: int):
  """[gh, gw] bool per image: the dataset-level k=2 cluster mostly inside image-level fg."""
  labels = KMeans(2, random_state=seed).fit_predict(np.concatenate([f["keys"] for f in feats]))
  inside = np.concatenate([m.ravel() for m in image_fg])
  share = [inside[labels == c].mean() if (labels == c).any() else -1.0 for c in (0, 1)]
  fg = labels == int(np.argmax(share))
  bounds = np.cumsum([0] + [f["keys"].shape[0] for f in feats])
  return [fg[a:b].reshape(f["grid"]) for a, b, f in zip(bounds[:-1], bounds[1:], feats)]


def decided_probability(keys: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """[gh, gw] fg probability: centroid-distance confidence, side decided by `mask`."""
  m = mask.ravel()
  fg_c = keys[m].mean(0) if m.any() else np.zeros(keys.shape[1], keys.dtype)
  bg_c = keys[~m].mean(0) if (~m).any() else np.zeros(keys.shape[1], keys.dtype)
  d_fg = np.linalg.norm(keys - fg_c, axis=1)
  d_bg = np.linalg.norm(keys - bg_c, axis=1)
  s = 1.0 / (1.0 + np.exp(-(d_bg - d_fg) / TEMPERATURE))
  conf = np.maximum(s, 1.0 - s)
  return np.where(m, conf, 1.0 - conf).reshape(mask.shape).astype(np.float32)


def patch_masks(feats: list[dict], seed: int) -> list[np.ndarray]:
  """Per image: [gh, gw] float32 foreground probability (image + dataset level)."""
  image_fg = [image_foreground(f["keys"], f["grid"], seed) for f in feats]
  dataset_fg = dataset_foreground(feats, image_fg, seed)
  probs = []
  for f, i_fg, d_fg in zip(feats, image_fg, dataset_fg):
    mask = d_fg & ndimage.binary_dilation(i_fg, structure=np.ones((3, 3), bool))
    probs.append(decided_probability(f["keys"], mask if mask.any() else i_fg))
  return probs


def dense_crf(image: np.ndarray, patch_prob: np.ndarray) -> np.ndarray:
  """[H, W] bool foreground: bilinear upsampling, then pydensecrf2 (maskcontrast preset)."""
  import pydensecrf.densecrf as dcrf  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  p = F.interpolate(torch.from_numpy(patch_prob)[None, None], size=(h, w), mode="bilinear",
                    align_corners=False)[0, 0].numpy()
  probs = np.stack([1.0 - p, p]).reshape(2, -1)
  d = dcrf.DenseCRF2D(w, h, 2)
  d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)), np.float32))
  d.addPairwiseGaussian(sxy=1, compat=3)
  d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
  return np.array(d.inference(10)).reshape(2, h, w).argmax(0).astype(bool)


def find_regions(fg: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
  """8-connected components of at least 1% of the image: (region ids [H, W], bounding boxes)."""
  comp, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
  sizes = np.bincount(comp.ravel(), minlength=n + 1)
  keep = np.flatnonzero(sizes >= MIN_REGION_FRACTION * fg.size)
  keep = keep[keep > 0]
  lut = np.zeros(n + 1, np.int32)
  lut[keep] = np.arange(1, len(keep) + 1)
  regions = lut[comp]
  return regions, ndimage.find_objects(regions)


def crop_descriptors(model: DinoV2, crops: list[np.ndarray], batch: int = 32) -> np.ndarray:
  """[N, D] L2-normalised CLS tokens of 224x224 crops."""
  out = []
  for i in range(0, len(crops), batch):
    x = torch.stack([to_tensor(c) for c in crops[i:i + batch]])
    out.append(F.normalize(model(x)[1], dim=-1).numpy())
  return np.concatenate(out) if out else np.zeros((0, model.norm.normalized_shape[0]), np.float32)


def region_stage(model: DinoV2, images: list[np.ndarray], fgs: list[np.ndarray]):
  """Region maps per image and the descriptors of all regions (in image order)."""
  regions, crops = [], []
  for image, fg in zip(images, fgs):
    reg, boxes = find_regions(fg)
    regions.append(reg)
    crops += [np.asarray(Image.fromarray(image[b]).resize((CROP, CROP), Image.BICUBIC))
              for b in boxes]
  return regions, crop_descriptors(model, crops)


def write_labels(out: pathlib.Path, names: list[str], regions: list[np.ndarray],
                 descriptors: np.ndarray, seed: int) -> None:
  """k-means of the region descriptors into classes; OUT/masks/<id>.png = class + 1."""
  k = min(NUM_CLASSES, len(descriptors))
  classes = KMeans(k, random_state=seed).fit_predict(descriptors) if k > 0 else np.zeros(0, int)
  first = 0
  (out / "masks").mkdir(parents=True, exist_ok=True)
  for name, reg in zip(names, regions):
    n = int(reg.max())
    lut = np.concatenate([[0], classes[first:first + n] + 1]).astype(np.uint8)
    first += n
    Image.fromarray(lut[reg]).save(out / "masks" / f"{name}.png")


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def run(images_dir: pathlib.Path, weights: pathlib.Path, out: pathlib.Path, seed: int) -> dict:
  """The whole pipeline; returns the summary (also written to OUT/summary.json)."""
  timings = {}
  model = load_model(weights)
  paths = list_images(images_dir)
  with torch.inference_mode():
    t = time.perf_counter()
    images = [np.array(Image.open(p).convert("RGB")) for p in paths]
    feats = extract_features(model, images)
    timings["features"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = patch_masks(feats, seed)
    timings["masks"] = time.perf_counter() - t
    t = time.perf_counter()
    fgs = [dense_crf(image, p) for image, p in zip(images, probs)]
    timings["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    regions, descriptors = region_stage(model, images, fgs)
    timings["regions"] = time.perf_counter() - t
  t = time.perf_counter()
  write_labels(out, [p.stem for p in paths], regions, descriptors, seed)
  timings["labels"] = time.perf_counter() - t
  summary = {"num_images": len(paths), "num_regions": len(descriptors), "timings_s": timings,
             "torch_threads": torch.get_num_threads()}
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", required=True, type=pathlib.Path)
  ap.add_argument("--weights", required=True, type=pathlib.Path)
  ap.add_argument("--out", required=True, type=pathlib.Path)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  print(json.dumps(run(args.images, args.weights, args.out, args.seed)))


if __name__ == "__main__":
  main()
