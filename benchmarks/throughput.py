"""Scale-out benchmark: pipeline throughput on 1 vs 8 devices, masks-stage memory vs N, sharded k-means.

Three parts, each measured in fresh subprocesses, side by side in one run:

(1) Throughput: images/s of the whole pipeline (`pipeline.segment`, in memory) and of every
    stage, on 1 device and on 8 simulated CPU devices
    (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, the per-image stages split over
    the mesh with `sharding.data_parallel`). `--images` synthetic images (textured
    background + a bright ellipse, 120x160 .. 160x120) at `image_size=--image-size`,
    a ViT-S/16 of `--depth` blocks with *random* weights (the cost of a real checkpoint of
    the same depth; quality is not measured here), CRF off (its compile dominates on CPU;
    see benchmarks/crf.py), crops of 64 px. Median over `--repeats` runs after a warm-up run
    that compiles everything. On a CPU the 8 "devices" share the same cores, so this shows
    the overhead of the sharded path, not a speed-up; on an accelerator pod the per-image
    stages scale with the device count.
(2) Memory: peak RSS (VmHWM) of a process that runs only the masks stage over N images of a
    features cache on disk, N doubling (`--sizes`, default 16 32 64 128), for the streamed
    stage (ours, `clustering.chunk_images=8`) and the in-memory stage (`chunk_images=0`,
    what the pipeline did before: all Keys padded into one array). The cache holds
    synthetic Keys (a 28x28 patch grid of D=384, i.e. ViT-S/16 at 448 px; two clustered
    groups per image) so that N can grow without running the ViT; the other stages are
    per-batch and do not grow with N. `baseline` = VmHWM after importing jax and loading the
    metadata, before the stage. Both use dataset/category fit samples of `--fit-patches`
    (4096) patches, so the streamed stage is in its large-dataset regime; its peak is then
    one chunk of Keys + the samples + XLA's compile memory, whatever N.
(3) Sharded dataset-level k-means: the benchmarks/kmeans.py (b) data (L2-normalised mixture
    of 50 Gaussians, D=384) scaled down to `--kmeans-points` (default 200,000 of its
    2,000,000), k=2 and k=20: centroids seeded by `kmeans` on a 65,536-point sample, then
    `--epochs` exact Lloyd passes (`sharding.streamed_lloyd`: per-chunk `lloyd_statistics`
    under `shard_map` with a `psum` over "data") on 1 and on 8 simulated devices; the final
    inertia of both is recomputed with the same NumPy evaluator.

Usage:
  python benchmarks/throughput.py            # ~5 min on this 2-core machine
  python benchmarks/throughput.py --quick    # smaller sizes (~4 min, mostly compiles)
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lightcluster_jax.data import synthetic_scene as _synthetic  # noqa: E402


def _peak_rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1e6
  return float("nan")


# ----------------------------------------------------------------------------- workers


def work_throughput(args) -> dict:
  import jax
  from lightcluster_jax import config as config_lib, pipeline, vit
  arch = vit.get_config("dino_vits16", depth=args.depth)
  params = vit.init_params(arch, jax.random.PRNGKey(0))
  shapes = [(120, 160), (160, 120), (128, 128)]
  images = [_synthetic(*shapes[i % 3], seed=i) for i in range(args.images)]
  c = config_lib.default_config()
  c.arch = "dino_vits16"
  c.features.image_size = args.image_size
  c.features.batch_size = 4
  c.clustering.num_categories = 2
  c.clustering.n_init = 1
  c.clustering.chunk_images = 8
  c.assign.num_classes = 4
  c.assign.crop_size = 64
  c.assign.min_region_pixels = 64
  c.assign.n_init = 2
  c.crf.enabled = False
  c.crf.bucket_pixels = 32
  items = pipeline.items_from_arrays(images)

  def run():
    t0 = time.perf_counter()
    res = pipeline.segment(c, items, params=params, arch=arch, weights_id="bench",
                           progress=False)
    return time.perf_counter() - t0, res

  warm_s, res = run()
  totals, stages = [], {k: [] for k in res.timings}
  for _ in range(args.repeats):
    total, res = run()
    totals.append(total)
    for k, v in res.timings.items():
      stages[k].append(v)
  n = len(images)
  return dict(devices=jax.device_count(), images=n, warmup_s=warm_s,
              total_s=float(np.median(totals)), images_per_s=n / float(np.median(totals)),
              stage_images_per_s={k: n / max(float(np.median(v)), 1e-9)
                                  for k, v in stages.items()},
              labels_crc=int(sum(int(np.asarray(l, np.int64).sum() * (i + 1)) for i, l in
                                 enumerate(res.labels[j] for j in sorted(res.labels)))))


def write_features(root: str, n: int, *, grid: int = 28, dim: int = 384, seed: int = 0):
  """A features cache of n images with synthetic clustered Keys (see part (2))."""
  from lightcluster_jax import pipeline
  stage = pipeline.Stage(root, "features", "bench")
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(6, dim)).astype(np.float32)
  for i in range(n):
    h, w = grid - (i % 3), grid - (i % 2)       # a few different grids: padding happens
    yy, xx = np.mgrid[:h, :w]
    fg = ((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1
    which = np.where(fg, i % 3, 3 + i % 3).reshape(-1)
    keys = protos[which] + 0.8 * rng.standard_normal((h * w, dim), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    stage.save(f"{i:06d}", dict(keys=keys, cls=protos[i % 3] + 0.1 * rng.normal(size=dim),
                                cls_attn=fg.reshape(-1).astype(np.float32) / fg.sum(),
                                grid_hw=np.array([h, w]), orig_hw=np.array([h * 16, w * 16]),
                                fingerprint=""))
  return stage


def work_rss(args) -> dict:
  import jax
  from lightcluster_jax import config as config_lib, pipeline
  feat = pipeline.Stage(args.cache, "features", "bench")
  ids = [f"{i:06d}" for i in range(args.n)]
  c = config_lib.default_config().clustering
  c.chunk_images = args.chunk
  c.num_categories = 4
  c.n_init = 1
  # Fit samples smaller than the data even at the smallest N, so the streamed stage is in its
  # large-dataset regime (at the defaults, 200,000 patches, sets below ~255 images of 784
  # patches are simply fitted on all their patches, which is the in-memory computation).
  c.dataset_fit_patches = args.fit_patches
  c.category_fit_patches = args.fit_patches
  jax.numpy.zeros(1).block_until_ready()
  baseline = _peak_rss_gb()
  out = pipeline.Stage(tempfile.mkdtemp(dir=args.cache), "masks", "bench")
  t0 = time.perf_counter()
  pipeline.run_masks(out, feat, ids, cfg=c, seed=0, temperature=0.1, progress=False)
  secs = time.perf_counter() - t0
  cons = np.concatenate([out.load(i)["consistent"].ravel() for i in ids])
  return dict(n=args.n, chunk=args.chunk, baseline_gb=baseline, peak_gb=_peak_rss_gb(),
              seconds=secs, fg_share=float(cons.mean()))


def work_kmeans(args) -> dict:
  import jax
  from lightcluster_jax import kmeans as km, sharding
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import kmeans as kb
  x = kb.read_dataset(args.data, args.n, 384)
  mesh = sharding.data_mesh()
  out = {}
  for k in (2, 20):
    idx = km.sample_indices(args.n, 65_536, key=jax.random.PRNGKey(1))
    c0 = km.kmeans(x[idx], k, key=jax.random.PRNGKey(2), max_iter=100).centroids
    block = 1 << 16
    chunks = lambda: ((x[s:s + block], np.ones(min(block, args.n - s), bool))
                      for s in range(0, args.n, block))
    t0 = time.perf_counter()
    c, info = sharding.streamed_lloyd(chunks, c0, max_iter=args.epochs, tol_abs=0.0,
                                      mesh=mesh)
    secs = time.perf_counter() - t0
    out[f"k{k}"] = dict(inertia=kb.exact_inertia(x, np.asarray(c)), seconds=secs,
                        epochs=info["iterations"])
  return dict(devices=jax.device_count(), **out)


# ----------------------------------------------------------------------------- driver


def _sub(args_list, devices: int = 1, timeout: int = 1200) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args_list], env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {args_list} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--worker", choices=["throughput", "rss", "kmeans"])
  ap.add_argument("--images", type=int, default=16)
  ap.add_argument("--image-size", type=int, default=112)
  ap.add_argument("--depth", type=int, default=12)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
  ap.add_argument("--fit-patches", type=int, default=4096)
  ap.add_argument("--chunk", type=int, default=8)
  ap.add_argument("--kmeans-points", type=int, default=200_000)
  ap.add_argument("--epochs", type=int, default=10)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--n", type=int)
  ap.add_argument("--cache")
  ap.add_argument("--data")
  args = ap.parse_args(argv)
  if args.worker:
    fn = dict(throughput=work_throughput, rss=work_rss, kmeans=work_kmeans)[args.worker]
    print(json.dumps(fn(args)))
    return
  if args.quick:
    args.images, args.depth, args.repeats = 8, 4, 2
    args.sizes, args.kmeans_points, args.epochs = [8, 16, 32, 64], 50_000, 5
  t_start = time.perf_counter()
  common = ["--images", str(args.images), "--image-size", str(args.image_size),
            "--depth", str(args.depth), "--repeats", str(args.repeats)]
  result = {"throughput": {}, "masks_memory": [], "sharded_kmeans": {}}

  # (1)
  for devices in (1, 8):
    r = _sub(["--worker", "throughput", *common], devices)
    result["throughput"][f"devices_{devices}"] = r
    print(f"(1) {devices} device(s): {r['images_per_s']:.2f} img/s whole pipeline; "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_images_per_s"].items())
          + f" img/s (warm-up {r['warmup_s']:.0f} s)", flush=True)
  t1 = result["throughput"]
  result["throughput"]["same_labels_1_vs_8"] = (t1["devices_1"]["labels_crc"]
                                                == t1["devices_8"]["labels_crc"])

  # (2)
  with tempfile.TemporaryDirectory() as tmp:
    write_features(tmp, max(args.sizes))
    for n in args.sizes:
      row = {"n": n}
      for name, chunk in (("streamed", args.chunk), ("in_memory", 0)):
        r = _sub(["--worker", "rss", "--n", str(n), "--chunk", str(chunk), "--cache", tmp,
                  "--fit-patches", str(args.fit_patches)])
        row[name] = dict(peak_gb=r["peak_gb"], above_baseline_gb=r["peak_gb"] - r["baseline_gb"],
                         seconds=r["seconds"], fg_share=r["fg_share"])
      result["masks_memory"].append(row)
      print(f"(2) N={n:4d}: peak RSS above baseline streamed "
            f"{row['streamed']['above_baseline_gb'] * 1e3:7.1f} MB, in-memory "
            f"{row['in_memory']['above_baseline_gb'] * 1e3:7.1f} MB "
            f"(masks stage {row['streamed']['seconds']:.1f} s vs "
            f"{row['in_memory']['seconds']:.1f} s)", flush=True)

  # (3)
  with tempfile.TemporaryDirectory() as tmp:
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import kmeans as kb
    data = os.path.join(tmp, "x.f32")
    kb.write_dataset(data, args.kmeans_points, 384)
    for devices in (1, 8):
      r = _sub(["--worker", "kmeans", "--data", data, "--n", str(args.kmeans_points),
                "--epochs", str(args.epochs)], devices)
      result["sharded_kmeans"][f"devices_{devices}"] = r
    for k in ("k2", "k20"):
      a = result["sharded_kmeans"]["devices_1"][k]["inertia"]
      b = result["sharded_kmeans"]["devices_8"][k]["inertia"]
      result["sharded_kmeans"][f"{k}_relative_inertia_diff"] = abs(a - b) / abs(a)
      print(f"(3) {k}: inertia 1 device {a:.6g}, 8 devices {b:.6g} "
            f"(rel. diff {abs(a - b) / abs(a):.1e})", flush=True)

  result["config"] = dict(images=args.images, image_size=args.image_size, depth=args.depth,
                          repeats=args.repeats, sizes=args.sizes, chunk=args.chunk,
                          fit_patches=args.fit_patches,
                          kmeans_points=args.kmeans_points, epochs=args.epochs,
                          weights="random ViT-S/16", cpu_count=os.cpu_count())
  result["wall_s"] = time.perf_counter() - t_start
  print(json.dumps(result))


if __name__ == "__main__":
  main()
