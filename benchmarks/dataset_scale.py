"""A dataset at scale: `lightcluster segment` over a TFDS (ArrayRecord) dataset and a folder.

What it does, in one run (WORKDIR default /tmp/lightcluster_dataset_scale):
  1. Generates N_max VOC-like images with their label maps (deterministic: crops / flips /
     resizes of the 9 VOC images, `end_to_end.voc_like_images(labels=True)`) as a VOCdevkit
     folder (JPEG images, PNG labels, ImageSets/Segmentation/val.txt), and prepares it with
     our TFDS builder (`voc2012_segmentation`, ArrayRecord) into WORKDIR/tfds. Once; reused.
  2. Host input pipeline alone (no device work): the images of the TFDS split read, decoded and
     preprocessed as the features stage does (`sources.prefetch`, read_threads 4, 2 and 0);
     images/s.
  3. Fresh `lightcluster segment` processes with the smoke config
     (`configs/voc12_dinov2_vits14.py:smoke`, real DINOv2-S/14 weights, label maps written as
     ArrayRecord shards, no overlays), one persistent compilation cache for all (warmed by a
     first run): `--tfds voc2012_segmentation:val --limit N` for each N of --sizes, and
     `--images <the folder> --split val --limit N` for the smallest N. Per run: wall seconds,
     device-stage images/s (N / the sum of the stage timings in summary.json), peak RSS of
     the process (ru_maxrss), files written per cache stage and for the labels.
  4. Identity: the masks (every level + the decided probability) and label maps of the TFDS
     run and the folder run of the smallest N, compared array by array.
  5. Ctrl-C and resume: a TFDS run of the smallest N in a fresh OUT is sent SIGINT in the
     middle of its features stage (start-up + half the features seconds of the uninterrupted
     run), then run again; reports how many images the interrupted run had
     finished (written to the cache), that the resumed run left those shard files untouched,
     that no image is stored twice (nothing finished was recomputed), and that its labels
     equal the uninterrupted run's.

Usage:
  python benchmarks/dataset_scale.py                      # sizes 250 1000 2000
  python benchmarks/dataset_scale.py --sizes 20 40        # a quick check
  python benchmarks/dataset_scale.py --extra clustering.dataset_fit_patches=20000 \
      clustering.category_fit_patches=20000   # fit samples full at 250 images (see README)

Memory: the masks stage fits the dataset and category k-means on samples of at most
`clustering.dataset_fit_patches` / `category_fit_patches` patches (200,000 each; ~300 MB of
Keys each for ViT-S); until a set has that many patches (2,500 images at the smoke config's
112 px, ~140 at 448 px) the samples hold every patch and peak RSS grows with N; beyond, it is
flat. `--extra` lowers the caps to show both regimes at small N.

The last line printed is one JSON object: {"runs": [...], "input_pipeline": {...},
"identical_tfds_vs_folder": bool, "resume": {...}, "peak_rss_mb_by_n": {...}, "meta": {...}}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import end_to_end as e2e  # noqa: E402  (VOC-like images, fresh-process runs with peak RSS)

CONFIG = e2e.REPO / "configs" / "voc12_dinov2_vits14.py"
WEIGHTS = e2e.ASSETS / "dinov2" / "dinov2_vits14_imgfocus_backbone.npz"
DATASET = "voc2012_segmentation"


def make_dataset(workdir: pathlib.Path, n: int) -> dict:
  """WORKDIR/voc (VOCdevkit-like) and WORKDIR/tfds (prepared), made once for n images."""
  from lightcluster_jax.data import tfds_builders, voc
  root = workdir / f"voc{n}" / "VOC2012"
  tfds_dir = workdir / f"tfds{n}"
  done = workdir / f".dataset{n}.done"
  if done.exists():
    return json.loads(done.read_text())
  shutil.rmtree(root.parent, ignore_errors=True)
  shutil.rmtree(tfds_dir, ignore_errors=True)
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (root / sub).mkdir(parents=True)
  t = time.perf_counter()
  ids = []
  for i, (image, label) in enumerate(e2e.voc_like_images(n, labels=True)):
    image_id = f"voclike_{i:05d}"
    image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    voc.write_label_png(root / "SegmentationClass" / f"{image_id}.png", label)
    ids.append(image_id)
  (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
  generate_s = time.perf_counter() - t
  t = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    tfds_builders.prepare(DATASET, manual_dir=root.parent, data_dir=tfds_dir)
  info = {"images": n, "generate_s": generate_s, "tfds_prepare_s": time.perf_counter() - t,
          "folder": str(root), "tfds_dir": str(tfds_dir),
          "tfds_mb": sum(p.stat().st_size for p in tfds_dir.rglob("*") if p.is_file()) / 2**20,
          "folder_mb": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20}
  done.write_text(json.dumps(info))
  return info


def input_pipeline(tfds_dir: str, n: int, image_size: int, patch_size: int = 14) -> dict:
  """Images/s of reading + decoding + preprocessing alone (what the features stage feeds)."""
  from lightcluster_jax.data import sources
  from lightcluster_jax.stages import features
  src = sources.TfdsSource(DATASET, "val", data_dir=tfds_dir)
  order = sorted(range(len(src)), key=lambda k: src.ids[k])[:n]

  def load(k):
    return features.preprocess(src.image(k), image_size=image_size, patch_size=patch_size)

  import grain  # noqa: F401  (imported once, outside the timing)
  out = {}
  for threads in (4, 2, 0):
    t = time.perf_counter()
    for _, _, err in sources.prefetch(load, order, threads=threads):
      assert err is None, err
    out[f"threads{threads}_images_per_s"] = n / (time.perf_counter() - t)
  return out


def segment_cmd(args, out: pathlib.Path, n: int, source: str, info: dict) -> list[str]:
  src = (["--tfds", f"{DATASET}:val", "--data-dir", info["tfds_dir"]] if source == "tfds"
         else ["--images", info["folder"], "--split", "val"])
  return [sys.executable, "-m", "lightcluster_jax.apps.cli", "segment", "--config",
          f"{CONFIG}:smoke", *src, "--limit", str(n), "--weights", str(args.weights),
          "--out", str(out), "--no-progress", "--no-overlays",
          "--config.output.format=array_record", *(f"--config.{x}" for x in args.extra)]


def files_per_stage(out: pathlib.Path) -> dict:
  counts = {d.name.split("-")[0]: sum(1 for _ in d.iterdir())
            for d in sorted((out / "cache").iterdir())}
  counts["labels"] = sum(1 for _ in (out / "labels").iterdir())
  return counts


def run_segment(args, out: pathlib.Path, n: int, source: str, info: dict) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  r = e2e.run_process(segment_cmd(args, out, n, source, info), out.with_suffix(".log"),
                      env=args.env)
  timings = json.loads((out / "summary.json").read_text())["timings_s"]
  device_s = sum(timings.values())
  return {"source": source, "images": n, "wall_s": round(r["wall_s"], 1),
          "peak_rss_mb": round(r["peak_rss_mb"]), "stages_s": {k: round(v, 1) for k, v in
                                                             timings.items()},
          "device_stages_images_per_s": round(n / device_s, 2),
          "files": files_per_stage(out)}


def stage_store(out: pathlib.Path, stage: str):
  from lightcluster_jax.runner.cache import Stage
  d = next((out / "cache").glob(f"{stage}-*"))
  return Stage(d.parent, stage, d.name[len(stage) + 1:])


def same_results(a: pathlib.Path, b: pathlib.Path) -> bool:
  from lightcluster_jax.apps import outputs
  ma, mb = stage_store(a, "masks"), stage_store(b, "masks")
  if sorted(ma.ids()) != sorted(mb.ids()):
    return False
  for i in ma.ids():
    x, y = ma.load(i), mb.load(i)
    if any(not np.array_equal(x[k], y[k]) for k in ("image", "category", "dataset",
                                                    "consistent", "prob")):
      return False
  la, lb = outputs.open_labels(a), outputs.open_labels(b)
  return sorted(la) == sorted(lb) and all(np.array_equal(la[i], lb[i]) for i in la)


def interrupt_and_resume(args, out: pathlib.Path, n: int, info: dict, ref: pathlib.Path,
                         after_s: float) -> dict:
  """SIGINT `after_s` seconds after the start (mid-features), then the same command again."""
  shutil.rmtree(out, ignore_errors=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  cmd = segment_cmd(args, out, n, "tfds", info)
  with open(out.with_suffix(".interrupted.log"), "wb") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=args.env)
    try:
      rc = proc.wait(timeout=after_s)   # finished before the signal: reported as such
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGINT)
      rc = proc.wait()
  interrupted_at = time.perf_counter() - t0
  feats = stage_store(out, "features")
  finished = len(feats)
  before = {p.name: p.stat().st_mtime_ns for p in feats.shard_files()}
  r = e2e.run_process(cmd, out.with_suffix(".resumed.log"), env=args.env)
  feats = stage_store(out, "features")
  untouched = all(p.stat().st_mtime_ns == before[p.name] for p in feats.shard_files()
                  if p.name in before) and set(before) <= {p.name for p in feats.shard_files()}
  index_ids = []
  for idx in sorted(feats.dir.glob("shard-*.index.json")):
    index_ids += json.loads(idx.read_text())["ids"]
  return {"images": n, "exit_code_on_sigint": rc, "sigint_after_s": round(interrupted_at, 1),
          "finished_before_sigint": finished, "shards_before": len(before),
          "shards_untouched": untouched,
          "images_stored_twice": len(index_ids) - len(set(index_ids)),
          "resumed_wall_s": round(r["wall_s"], 1),
          "labels_equal_uninterrupted": same_results(out, ref)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 2000])
  p.add_argument("--workdir", type=pathlib.Path,
                 default=pathlib.Path("/tmp/lightcluster_dataset_scale"))
  p.add_argument("--weights", type=pathlib.Path, default=WEIGHTS)
  p.add_argument("--extra", nargs="*", default=[],
                 help="config overrides a.b=v for every segment run")
  args = p.parse_args(argv)
  args.workdir.mkdir(parents=True, exist_ok=True)
  sizes = sorted(args.sizes)
  args.env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(args.workdir / "xla_cache"),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  load_before = os.getloadavg()[0]
  info = make_dataset(args.workdir, sizes[-1])
  print(f"dataset: {info['images']} images, folder {info['folder_mb']:.0f} MB, TFDS "
        f"{info['tfds_mb']:.0f} MB (generate {info['generate_s']:.0f} s, prepare "
        f"{info['tfds_prepare_s']:.0f} s)", flush=True)
  image_size = 112  # the smoke config's features.image_size
  pipe = input_pipeline(info["tfds_dir"], min(sizes[-1], 500), image_size)
  print(f"host input pipeline: {pipe}", flush=True)

  runs_dir = args.workdir / "runs"
  warm = run_segment(args, runs_dir / "warmup", sizes[0], "tfds", info)  # fills the XLA cache
  print(f"warm-up (compilation cache filled): {warm['wall_s']} s", flush=True)
  runs = []
  for n in sizes:
    runs.append(run_segment(args, runs_dir / f"tfds{n}", n, "tfds", info))
    print(json.dumps(runs[-1]), flush=True)
  runs.append(run_segment(args, runs_dir / f"folder{sizes[0]}", sizes[0], "folder", info))
  print(json.dumps(runs[-1]), flush=True)
  identical = same_results(runs_dir / f"tfds{sizes[0]}", runs_dir / f"folder{sizes[0]}")
  print(f"TFDS == folder ({sizes[0]} images): {identical}", flush=True)
  first = runs[0]   # start-up (wall - stages) + half the features stage of the same run
  after_s = first["wall_s"] - sum(first["stages_s"].values()) + first["stages_s"]["features"] / 2
  resume = interrupt_and_resume(args, runs_dir / f"resume{sizes[0]}", sizes[0], info,
                                runs_dir / f"tfds{sizes[0]}", after_s=max(1.0, after_s))
  print(f"Ctrl-C and resume: {resume}", flush=True)

  print("\n| source | images | wall s | device-stage img/s | peak RSS MB | files per stage "
        "(features / masks / refine / regions / labels) |")
  print("|---|---|---|---|---|---|")
  for r in runs:
    f = r["files"]
    print(f"| {r['source']} | {r['images']} | {r['wall_s']} | "
          f"{r['device_stages_images_per_s']} | {r['peak_rss_mb']} | "
          f"{f.get('features')} / {f.get('masks')} / {f.get('refine')} / {f.get('regions')} / "
          f"{f.get('labels')} |")
  result = {
      "runs": runs, "input_pipeline": pipe, "identical_tfds_vs_folder": identical,
      "resume": resume, "dataset": info,
      "peak_rss_mb_by_n": {r["images"]: r["peak_rss_mb"] for r in runs if r["source"] == "tfds"},
      "meta": {"extra": args.extra, "cores": os.cpu_count(), "load_before": load_before,
               "load_after": os.getloadavg()[0], "commit": e2e.git_commit()},
  }
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
