"""Dense CRF: lightcluster_jax.crf vs pydensecrf2, side by side, on the VOC dev images.

For each image (the 9 VOC val images in $LIGHTCLUSTER_ASSETS or ../shared/assets) and each
preset (maskcontrast, krahenbuhl) both implementations get the same two-label soft unary and the
same parameters; we report ms/image (median over images of the per-image median over
`--repeats` runs, compile time excluded and reported separately; the reference and our
backends alternate in every repeat), the speed ratio (median over images of the per-image
ratio), and the
agreement of the MAP labels with pydensecrf2 (fraction of pixels), plus the agreement on the
pixels whose label pydensecrf2's CRF changed (relative to the unary argmax) — a stricter view,
since the CRF changes only a few percent of the pixels.

Soft unaries ("--unary"):
  blur   (default) foreground = GT classes 1..20 (void 255 -> 0.5), Gaussian-blurred with sigma
         8 px and clipped to [0.05, 0.95];
  patch  the same foreground averaged over the ViT patch grid (short side 448, patch 14) and
         upsampled bilinearly to pixels, clipped to [0.05, 0.95] — the pipeline's situation.

Both sides run on one core (the process pins itself before JAX starts; pydensecrf is
single-threaded); `--all-cores` lets XLA use all of them. Ours is jitted with
`crf.XLA_OPTIONS`.

Usage:
  python benchmarks/crf.py                       # default backend, both presets
  python benchmarks/crf.py --backends superpixel superpixel:cell=8 lattice window --repeats 5

The last line printed is one JSON object: {"presets": {...default backend...}, "backends":
{name: {preset: {...}}}, "meta": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image
from scipy import ndimage

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if __name__ == "__main__" and "--all-cores" not in sys.argv and hasattr(os, "sched_setaffinity"):
  # pydensecrf is single-threaded: by default both sides get one core (before jax starts, so
  # XLA sizes its thread pools to it). --all-cores leaves XLA every core.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lightcluster_jax import crf  # noqa: E402
from lightcluster_jax.blocks.resize import resize as _resize  # noqa: E402


def assets_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LIGHTCLUSTER_ASSETS", REPO.parent / "shared" / "assets"))


def load_images(root: pathlib.Path, limit: int | None):
  voc = root / "voc2012"
  ids = (voc / "ImageSets" / "Segmentation" / "val_with_images.txt").read_text().split()
  out = []
  for i in ids[:limit]:
    path = next((voc / "JPEGImages").glob(i + ".*"))
    image = np.array(Image.open(path).convert("RGB"), dtype=np.uint8)
    gt = np.asarray(Image.open(voc / "SegmentationClass" / (i + ".png")))
    out.append((i, image, gt))
  return out


def soft_foreground(gt: np.ndarray, kind: str) -> np.ndarray:
  """[H, W] float32 foreground probability in [0.05, 0.95] derived from a VOC label map."""
  fg = np.where(gt == 255, 0.5, (gt > 0).astype(np.float32)).astype(np.float32)
  if kind == "blur":
    p = ndimage.gaussian_filter(fg, 8.0)
  elif kind == "patch":
    h, w = fg.shape
    s = 448.0 / min(h, w)
    gh, gw = round(h * s) // 14, round(w * s) // 14
    # Area-average onto the patch grid, then PyTorch-style bilinear upsampling (our resize).
    ys = np.minimum((np.arange(h) * gh) // h, gh - 1)
    xs = np.minimum((np.arange(w) * gw) // w, gw - 1)
    grid = np.zeros((gh, gw), np.float64)
    cnt = np.zeros((gh, gw), np.float64)
    np.add.at(grid, (ys[:, None], xs[None, :]), fg)
    np.add.at(cnt, (ys[:, None], xs[None, :]), 1.0)
    small = (grid / np.maximum(cnt, 1)).astype(np.float32)
    p = np.asarray(_resize(jnp.asarray(small)[..., None], (h, w),
                                     method="bilinear"))[..., 0]
  else:
    raise ValueError(f"unknown --unary {kind!r}")
  return np.clip(p, 0.05, 0.95).astype(np.float32)


def pydensecrf_map(image: np.ndarray, probs: np.ndarray, params: crf.CRFParams):
  """MAP labels [H, W] and Q [C, H, W] from pydensecrf2 with `params`."""
  import pydensecrf.densecrf as dcrf  # pylint: disable=import-outside-toplevel
  h, w, c = probs.shape
  d = dcrf.DenseCRF2D(w, h, c)
  u = -np.log(np.clip(np.moveaxis(probs, -1, 0).reshape(c, -1), 1e-5, 1.0)).astype(np.float32)
  d.setUnaryEnergy(np.ascontiguousarray(u))
  d.addPairwiseGaussian(sxy=params.spatial_sxy, compat=params.spatial_compat)
  d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                         rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
  q = np.array(d.inference(params.iterations)).reshape(c, h, w)
  return q.argmax(0), q


def parse_backend(spec: str):
  """'window:r=8,s=2' -> ('window', {'window_radius': 8, 'window_downsample': 2})."""
  name, _, opts = spec.partition(":")
  keys = {"r": "window_radius", "s": "window_downsample", "cell": "superpixel_size",
          "split": "superpixel_split",
          "corners": "superpixel_corners" if name == "superpixel" else "lattice_corners"}
  over = {}
  for kv in filter(None, opts.split(",")):
    k, v = kv.split("=")
    k = keys.get(k, k)
    over[k] = bool(int(v)) if k == "superpixel_split" else int(v)
  return name, over


def timed(fn, repeats: int) -> float:
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--backends", nargs="+", default=[crf.DEFAULT_BACKEND],
                  help="backends to time; the first is the default reported under 'presets'")
  ap.add_argument("--presets", nargs="+", default=["maskcontrast", "krahenbuhl"])
  ap.add_argument("--unary", default="blur", choices=["blur", "patch"])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
  ap.add_argument("--all-cores", action="store_true",
                  help="let XLA use every core (default: the process is pinned to one core, "
                       "as single-threaded pydensecrf)")
  args = ap.parse_args(argv)

  root = assets_dir()
  if not (root / "voc2012").is_dir():
    raise SystemExit(f"assets not found at {root} (set LIGHTCLUSTER_ASSETS)")
  images = load_images(root, args.limit)
  data = []
  for name, image, gt in images:
    fg = soft_foreground(gt, args.unary)
    data.append((name, image, np.stack([1.0 - fg, fg], axis=-1).astype(np.float32)))

  results: dict = {}
  for preset in args.presets:
    params = crf.get_params(preset)
    fns = {}
    for spec in args.backends:
      backend, over = parse_backend(spec)
      p = crf.get_params(preset, **over)
      fns[spec] = jax.jit(lambda u, im, p=p, b=backend: crf.dense_crf(u, im, params=p, backend=b),
                          compiler_options=crf.XLA_OPTIONS)
    # Per image: compile every backend once, then interleave the reference and our backends in
    # every repeat, so load changes on a shared machine hit both sides alike.
    ref_t, ours_t = [], {spec: [] for spec in args.backends}
    stats = {spec: {"agree": 0, "changed_ok": 0, "changed_n": 0, "valid_n": 0, "compile": [],
                    "per_image": {}} for spec in args.backends}
    for name, image, probs in data:
      lab_ref, _ = pydensecrf_map(image, probs, params)
      u = crf.unary_from_probs(jnp.asarray(probs))
      im = jnp.asarray(image)
      labs = {}
      for spec, fn in fns.items():
        t0 = time.perf_counter()
        labs[spec] = np.asarray(jax.block_until_ready(fn(u, im))).argmax(-1)
        stats[spec]["compile"].append(time.perf_counter() - t0)
      rt, ot = [], {spec: [] for spec in fns}
      for _ in range(args.repeats):
        rt.append(timed(lambda: pydensecrf_map(image, probs, params), 1))
        for spec, fn in fns.items():
          ot[spec].append(timed(lambda: jax.block_until_ready(fn(u, im)), 1))
      ref_t.append(statistics.median(rt))
      changed = probs.argmax(-1) != lab_ref
      for spec in fns:
        t = statistics.median(ot[spec])
        ours_t[spec].append(t)
        same = labs[spec] == lab_ref
        st = stats[spec]
        st["agree"] += int(same.sum())
        st["valid_n"] += same.size
        st["changed_ok"] += int(same[changed].sum())
        st["changed_n"] += int(changed.sum())
        st["per_image"][name] = {"ms": round(1e3 * t, 2), "reference_ms": round(1e3 * ref_t[-1], 2),
                                 "agreement": round(float(same.mean()), 5)}
    ref_ms = 1e3 * statistics.median(ref_t)
    for spec in fns:
      st = stats[spec]
      ours_ms = 1e3 * statistics.median(ours_t[spec])
      # The speedup is the median of the per-image ratios (each measured side by side).
      ratio = statistics.median(r / o for r, o in zip(ref_t, ours_t[spec]))
      results.setdefault(spec, {})[preset] = {
          "ms_per_image": round(ours_ms, 2),
          "reference_ms_per_image": round(ref_ms, 2),
          "speedup": round(ratio, 2),
          "agreement": round(st["agree"] / st["valid_n"], 5),
          "agreement_on_crf_changed": round(st["changed_ok"] / max(st["changed_n"], 1), 4),
          "unary_argmax_agreement": round(1.0 - st["changed_n"] / st["valid_n"], 5),
          "compile_s_median": round(statistics.median(st["compile"]), 2),
          "per_image": st["per_image"],
      }
      print(f"{preset:13s} {spec:30s} ours {ours_ms:8.1f} ms  pydensecrf {ref_ms:8.1f} ms  "
            f"x{ratio:5.2f}  agreement {st['agree'] / st['valid_n']:.5f}  "
            f"on CRF-changed px {st['changed_ok'] / max(st['changed_n'], 1):.4f}", flush=True)

  default = args.backends[0]
  out = {
      "presets": {k: {kk: vv for kk, vv in v.items() if kk != "per_image"}
                  for k, v in results[default].items()},
      "default_backend": default,
      "backends": results,
      "meta": {
          "images": [n for n, _, _ in data], "unary": args.unary, "repeats": args.repeats,
          "jax": jax.__version__, "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      },
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
