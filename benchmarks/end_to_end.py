"""End to end: `lightcluster segment` vs the PyTorch pipeline a user would write, fresh processes.

For each image set, each side runs as its own fresh process on the same folder and we time the
whole process (interpreter start, imports, weight loading, every stage, writing the PNGs):

  ours       `lightcluster segment --config configs/voc12_dinov2_vits14.py --images DIR
             --weights W --out OUT --no-progress --no-overlays [--set a.b=v ...]` (the
             overlay JPEGs are extra output the reference does not write), started as
             `python benchmarks/end_to_end.py --_lightcluster STATS.json segment ...`: that
             wrapper registers JAX monitoring listeners, then calls the installed `lightcluster`
             console-script entry point, then writes the compile statistics. Persistent
             compilation cache: env JAX_COMPILATION_CACHE_DIR=<a fresh dir per set> and
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 (every compiled program is written,
             not only those over the default 1 s). "cold" = empty cache dir and fresh OUT;
             "warm" = the same cache dir again, fresh OUT (so only compiled programs are reused,
             no stage output).
  reference  `python benchmarks/reference_pipeline.py --images DIR --weights W --out OUT`:
             PyTorch (fused SDPA attention) + scikit-learn k-means + pydensecrf2, the steps
             listed in that file's docstring. It has no compile step; in a "warm" row it is
             simply run again.

Image sets, generated once into WORKDIR/images/<set> (deterministic):
  voc9    the 9 VOC 2012 val images of assets/voc2012 (val_with_images.txt), copied as they are.
  voc24, voc120
          VOC-like images made from those 9 by numpy `default_rng(0)`: per image a random
          source, a random crop of 60-100% of each side, a random horizontal flip, resized (PIL
          bicubic) to a VOC size drawn from 500x375, 375x500, 500x333, 333x500, 500x400,
          500x366, 500x281, 480x360, 500x500 (WxH); saved as PNG (lossless),
          voclike_00000.png ... (voc24 is the first 24 images of voc120).

Numbers per run (one row per set and cache state):
  ours_s, reference_s   wall seconds of the whole process (one run each, not a median: a
                        cold start happens once); ratio = reference_s / ours_s (> 1: ours
                        faster); s/img = wall / images.
  ours_compile_s        seconds ours spent in JAX tracing, lowering and XLA compilation (or,
                        warm, loading from the persistent cache): the union of the time spans of
                        the events /jax/core/compile/jaxpr_trace_duration,
                        /jax/core/compile/jaxpr_to_mlir_module_duration and
                        /jax/core/compile/backend_compile_duration (nested traces counted
                        once); "compile_events_s" gives the plain per-event sums of the
                        duration listener for every event named *compile* (warm runs add
                        /jax/compilation_cache/compile_time_saved_sec, never summed),
                        "cache" the persistent-cache hits and misses.
  peak RSS (MB)         ru_maxrss of the waited child (`os.wait4`).
  stages                seconds per stage (features, masks, refine, regions, labels) as each
                        side's OUT/summary.json reports them, and "other" = wall - their sum
                        (interpreter start, imports, weight loading, output writing).
  scores (--score, voc9 only)
                        `lightcluster evaluate --classes present --json` on both outputs:
                        fg_iou = class-agnostic foreground IoU, mean over images; miou =
                        Hungarian-matched mIoU over the GT classes present.

Machine note: timings are of whatever machine this runs on, with whatever else runs there;
the JSON records the core count and the 1-minute load average before and after. Both sides
use every core (XLA's and PyTorch's default thread pools).

Usage:
  python benchmarks/end_to_end.py                               # voc24 (cold + warm), voc120
  python benchmarks/end_to_end.py --sets voc9 --warm-sets voc9 --score
  python benchmarks/end_to_end.py --sets voc24 --extra features.dtype=bfloat16

The last line printed is one JSON object: {"runs": [{"set", "images", "cache", "ours_s",
"reference_s", "ratio", "ours_s_per_image", "reference_s_per_image", "ours_compile_s",
"ours_peak_rss_mb", "reference_peak_rss_mb", "stages": {"ours": {...}, "reference": {...}},
...}], "min_cold_ratio", "meta": {...}}.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = pathlib.Path(os.environ.get("LIGHTCLUSTER_ASSETS", REPO.parent / "shared" / "assets"))
VOC = ASSETS / "voc2012"
STAGES = ("features", "masks", "refine", "regions", "labels")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_EVENTS = ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses")
VOC_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (500, 366), (500, 281),
             (480, 360), (500, 500))
SET_SIZES = {"voc9": 9, "voc24": 24, "voc120": 120}


# ----------------------------------------------------------------------------- child wrapper


def span_union(spans) -> float:
  """Total length of the union of (start, end) intervals."""
  total, end = 0.0, -float("inf")
  for a, b in sorted(spans):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def run_lightcluster_child(stats_path: str, cli_args: list[str]) -> int:
  """Runs the `lightcluster` entry point with JAX compile listeners; writes STATS.json."""
  from jax import monitoring  # pylint: disable=import-outside-toplevel
  sums, spans, counts = collections.defaultdict(float), [], collections.Counter()

  def on_duration(event, duration, **_):
    sums[event] += duration

  def on_span(event, start, end, **_):
    if event in COMPILE_EVENTS:
      spans.append((start, end))

  def on_event(event, **_):
    counts[event] += 1

  monitoring.register_event_duration_secs_listener(on_duration)
  monitoring.register_event_time_span_listener(on_span)
  monitoring.register_event_listener(on_event)
  cli_main = importlib.metadata.entry_points(group="console_scripts")["lightcluster"].load()
  rc = int(cli_main(cli_args) or 0)
  stats = {"compile_s": span_union(spans),
           "compile_events_s": {e: s for e, s in sums.items() if "compile" in e},
           "cache": {e.rsplit("/", 1)[1]: counts[e] for e in CACHE_EVENTS},
           "package": str(pathlib.Path(sys.modules["lightcluster_jax"].__file__).parent)}
  pathlib.Path(stats_path).write_text(json.dumps(stats))
  return rc


# ----------------------------------------------------------------------------- image sets


def voc9_paths() -> list[pathlib.Path]:
  ids = (VOC / "ImageSets" / "Segmentation" / "val_with_images.txt").read_text().split()
  return [next((VOC / "JPEGImages").glob(i + ".*")) for i in ids]


def voc_like_images(n: int, seed: int = 0, *, labels: bool = False):
  """Yields n VOC-like PIL images (crop, flip, resize of the 9 VOC images), deterministic.

  labels=True: yields (image, label) pairs, the label map ([H, W] uint8, VOC ids, 255 void)
  cropped, flipped and resized (nearest) like its image."""
  paths = voc9_paths()
  sources = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
  gts = [np.asarray(Image.open(VOC / "SegmentationClass" / f"{p.stem}.png")) for p in paths
         ] if labels else None
  rng = np.random.default_rng(seed)
  for _ in range(n):
    k = rng.integers(len(sources))
    src = sources[k]
    h, w = src.shape[:2]
    ch, cw = (rng.uniform(0.6, 1.0, 2) * (h, w)).astype(int)
    y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
    crop = src[y0:y0 + ch, x0:x0 + cw]
    flip = rng.random() < 0.5
    if flip:
      crop = crop[:, ::-1]
    size = VOC_SIZES[rng.integers(len(VOC_SIZES))]
    image = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC)
    if not labels:
      yield image
      continue
    lab = gts[k][y0:y0 + ch, x0:x0 + cw]
    lab = lab[:, ::-1] if flip else lab
    yield image, np.asarray(Image.fromarray(np.ascontiguousarray(lab)).resize(size,
                                                                               Image.NEAREST))


def image_set(name: str, workdir: pathlib.Path) -> pathlib.Path:
  """WORKDIR/images/<name>, generated (atomically) on first use."""
  folder = workdir / "images" / name
  if folder.is_dir():
    return folder
  tmp = folder.with_name(f".{name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  if name == "voc9":
    for p in voc9_paths():
      shutil.copy2(p, tmp / p.name)
  else:
    for i, image in enumerate(voc_like_images(SET_SIZES[name])):
      image.save(tmp / f"voclike_{i:05d}.png")
  tmp.rename(folder)
  return folder


# ----------------------------------------------------------------------------- runs


def run_process(cmd: list[str], log: pathlib.Path, env: dict | None = None) -> dict:
  """Runs `cmd` (output to `log`); wall seconds and the child's peak RSS in MB."""
  with open(log, "wb") as f:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{cmd[:3]}... exited with {proc.returncode}; {log}:\n{tail}")
  return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def lightcluster_cmd(stats: pathlib.Path, args: list[str]) -> list[str]:
  return [sys.executable, str(pathlib.Path(__file__).resolve()), "--_lightcluster", str(stats),
          *args]


def stage_seconds(out: pathlib.Path, wall: float) -> dict:
  """Per-stage seconds from OUT/summary.json, plus "other" = wall - their sum."""
  timings = json.loads((out / "summary.json").read_text())["timings_s"]
  stages = {s: timings[s] for s in STAGES}
  stages["other"] = wall - sum(stages.values())
  return stages


def run_ours(images: pathlib.Path, out: pathlib.Path, cache_dir: pathlib.Path, args) -> dict:
  """One fresh `lightcluster segment` process with the persistent compilation cache."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  stats = out.with_suffix(".compile.json")
  cli = ["segment", "--config", str(args.config), "--images", str(images), "--weights",
         str(args.weights), "--out", str(out), "--no-progress", "--no-overlays"]
  for item in args.extra:
    cli += ["--set", item]
  r = run_process(lightcluster_cmd(stats, cli), out.with_suffix(".log"), env)
  r["stages"] = stage_seconds(out, r["wall_s"])
  r.update(json.loads(stats.read_text()))
  return r


def run_reference(images: pathlib.Path, out: pathlib.Path, args) -> dict:
  """One fresh process of benchmarks/reference_pipeline.py."""
  cmd = [sys.executable, str(REPO / "benchmarks" / "reference_pipeline.py"), "--images",
         str(images), "--weights", str(args.weights), "--out", str(out)]
  r = run_process(cmd, out.with_suffix(".log"))
  r["stages"] = stage_seconds(out, r["wall_s"])
  return r


def score(out: pathlib.Path) -> dict:
  """fg IoU (mean over images) and Hungarian mIoU over the GT classes present."""
  log = out.with_suffix(".score.log")
  run_process(lightcluster_cmd(out.with_suffix(".score.json"),
                               ["evaluate", "--pred", str(out / "masks"), "--gt",
                                str(VOC / "SegmentationClass"), "--classes", "present",
                                "--json"]), log)
  s = json.loads(log.read_text().strip().splitlines()[-1])
  return {"fg_iou": s["fg_iou_mean"], "miou": s["miou"], "classes": s["num_classes_scored"]}


def benchmark_set(name: str, cache: str, images: pathlib.Path, run_dir: pathlib.Path,
                  args) -> dict:
  """One row: ours and the reference on `images`; `cache` is "cold" or "warm"."""
  n = len(list(images.iterdir()))
  row = {"set": name, "images": n, "cache": cache}
  sides = {}
  if not args.skip_ours:
    sides["ours"] = run_ours(images, run_dir / f"ours_{cache}", run_dir / "jax_cache", args)
  if not args.skip_reference:
    sides["reference"] = run_reference(images, run_dir / f"reference_{cache}", args)
  for side in ("ours", "reference"):
    r = sides.get(side, {})
    row[f"{side}_s"] = r.get("wall_s")
    row[f"{side}_s_per_image"] = r["wall_s"] / n if r else None
    row[f"{side}_peak_rss_mb"] = r.get("peak_rss_mb")
  both = len(sides) == 2
  row["ratio"] = row["reference_s"] / row["ours_s"] if both else None
  ours = sides.get("ours", {})
  row["ours_compile_s"] = ours.get("compile_s")
  row["ours_compile_events_s"] = ours.get("compile_events_s")
  row["ours_cache"] = ours.get("cache")
  row["ours_package"] = ours.get("package")
  row["stages"] = {side: r["stages"] for side, r in sides.items()}
  if args.score and name == "voc9":
    row["scores"] = {side: score(run_dir / f"{side}_{cache}") for side in sides}
  return row


# ----------------------------------------------------------------------------- report


def fmt(x, spec=".1f") -> str:
  return "-" if x is None else format(x, spec)


def print_row(row: dict) -> None:
  print(f"{row['set']:7s} {row['images']:4d} {row['cache']:5s} {fmt(row['ours_s']):>8s} "
        f"{fmt(row['reference_s']):>8s} {fmt(row['ratio'], '.2f'):>6s} "
        f"{fmt(row['ours_s_per_image'], '.2f'):>9s} {fmt(row['reference_s_per_image'], '.2f'):>9s} "
        f"{fmt(row['ours_compile_s']):>9s} {fmt(row['ours_peak_rss_mb'], '.0f'):>7s} "
        f"{fmt(row['reference_peak_rss_mb'], '.0f'):>7s}", flush=True)
  for side, stages in row["stages"].items():
    print(f"{'':18s}{side:10s}" + "  ".join(f"{k} {v:.1f}" for k, v in stages.items()))
  for side, s in row.get("scores", {}).items():
    print(f"{'':18s}{side:10s}fg IoU {s['fg_iou']:.3f}  mIoU {s['miou']:.3f} "
          f"({s['classes']} classes present)")


HEADER = (f"{'set':7s} {'imgs':>4s} {'cache':5s} {'ours_s':>8s} {'ref_s':>8s} {'ratio':>6s} "
          f"{'ours s/im':>9s} {'ref s/im':>9s} {'compile_s':>9s} {'ours MB':>7s} {'ref MB':>7s}")


def versions() -> dict:
  out = {}
  for pkg in ("jax", "jaxlib", "torch", "scikit-learn", "pydensecrf2", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def git_commit() -> str | None:
  r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                     text=True, check=False)
  return r.stdout.strip() or None


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--_lightcluster"]:
    return run_lightcluster_child(argv[1], argv[2:])
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sets", nargs="+", default=["voc24", "voc120"], choices=sorted(SET_SIZES))
  ap.add_argument("--warm-sets", nargs="*", default=["voc24"], choices=sorted(SET_SIZES),
                  help="sets (of --sets) that also get the warm-cache run")
  ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/lc_e2e"))
  ap.add_argument("--weights", type=pathlib.Path,
                  default=ASSETS / "dinov2" / "dinov2_vits14_imgfocus_backbone.npz")
  ap.add_argument("--config", type=pathlib.Path,
                  default=REPO / "configs" / "voc12_dinov2_vits14.py")
  ap.add_argument("--extra", nargs="*", default=[], help="a.b=v overrides for ours")
  ap.add_argument("--skip-reference", action="store_true")
  ap.add_argument("--skip-ours", action="store_true")
  ap.add_argument("--score", action="store_true",
                  help="score both outputs on voc9 against the VOC ground truth")
  args = ap.parse_args(argv)
  if args.score and "voc9" not in args.sets:
    ap.error("--score needs voc9 in --sets (the only set with ground truth)")
  if not args.weights.is_file():
    ap.error(f"weights not found: {args.weights}")

  load_before = os.getloadavg()[0]
  print(HEADER, flush=True)
  rows = []
  for name in args.sets:
    images = image_set(name, args.workdir)
    run_dir = args.workdir / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for cache in ("cold", "warm") if name in args.warm_sets else ("cold",):
      rows.append(benchmark_set(name, cache, images, run_dir, args))
      print_row(rows[-1])

  cold = [r["ratio"] for r in rows if r["cache"] == "cold" and r["ratio"] is not None]
  out = {
      "runs": rows,
      "min_cold_ratio": min(cold) if cold else None,
      "meta": {
          "config": str(args.config), "weights": str(args.weights), "extra": args.extra,
          "compile_events": list(COMPILE_EVENTS),
          "jax_persistent_cache_min_compile_time_secs": 0, "repo_commit": git_commit(),
          "cpu_count": os.cpu_count(), "load_avg_1m_before": round(load_before, 2),
          "load_avg_1m_after": round(os.getloadavg()[0], 2),
          "python": platform.python_version(), "versions": versions(),
      },
  }
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
