"""k-means benchmark: lightcluster_jax vs scikit-learn / faiss-cpu, side by side in one run.

(a) Image level: k=2 on 64 point sets of 3136 x 384 (ViT-S/8 Keys at 448 px), synthetic
    L2-normalised keys (two groups of 6 sub-clusters each, plus noise). Ours: one
    `batched_kmeans` call; reference: a loop of `sklearn.cluster.KMeans(algorithm="lloyd")`.
    Same budget: k-means++, n_init=1, max_iter=100, tol=1e-4 (same stopping rule).
(b) Dataset level: 2,000,000 x 384 (L2-normalised mixture of 50 Gaussians), k=2 and k=20.
    Every method returns centroids and labels of all points, with the same budget of
    `--epochs` (10) passes over the full data:
      ours      the pipeline's dataset level: `kmeans` (k-means++ + Lloyd) on a
                65,536-point `sample_indices` sample, then `epochs` exact Lloyd passes
                over all points in host blocks (`sharding.streamed_lloyd` with 4096-row
                cache blocks, tol 0, so all of them unless the labels stop changing), then
                `assign`;
      faiss     `faiss.Kmeans(niter=epochs)` trained on all points, then `index.search`;
      minibatch `sklearn.cluster.MiniBatchKMeans(max_iter=epochs, batch_size=4096,
                n_init=1, max_no_improvement=None, tol=0)` (its fit ends with the labels).
    Each method runs in its own subprocess (clean peak-RSS numbers); the inertia of every
    method is recomputed on all points with the same NumPy evaluator.

Timings are medians over `--repeats` runs after a warm-up (our compile time is reported
separately); part (a) interleaves `--img-repeats` runs of ours and of the scikit-learn loop so
that both see the same machine load. Every part runs in its own subprocess with the same thread budget
(`--threads`, default 1: OMP/BLAS threads for scikit-learn and faiss, XLA's Eigen pool off for
ours). On a machine shared with other jobs, OpenMP spin-waiting made the multi-threaded
baselines 5-10x slower than single-threaded ones, so the default compares one thread each;
`--threads 0` keeps every library's default threading. With one thread, part (a)'s process is
also pinned to one core (XLA:CPU ran parts of ours on a second thread despite the flags). The
last line printed is one JSON object.

Usage:
  python benchmarks/kmeans.py                    # full run (~15 min on this 2-core machine)
  python benchmarks/kmeans.py --quick            # small sizes, a smoke test (~3 min)
  python benchmarks/kmeans.py --only image       # part (a) only (~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _median(xs):
  return float(np.median(np.asarray(xs)))


def _peak_rss_gb() -> float:
  """Peak resident set of this process (VmHWM; unlike ru_maxrss it restarts at exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1e6                       # kB -> GB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def image_keys(b: int, n: int, d: int, seed: int = 0) -> np.ndarray:
  """[b, n, d] synthetic unit-norm 'Keys': fg / bg groups of 6 sub-clusters each + noise."""
  rng = np.random.default_rng(seed)
  out = np.empty((b, n, d), np.float32)
  for i in range(b):
    sup = rng.normal(size=(2, d)).astype(np.float32)
    parts = rng.normal(size=(2, 6, d)).astype(np.float32)
    c = (rng.random(n) < rng.uniform(0.15, 0.6)).astype(int)
    j = rng.integers(0, 6, n)
    x = 0.6 * sup[c] + 0.6 * parts[c, j] + rng.standard_normal((n, d), dtype=np.float32)
    out[i] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def aligned_empty(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
  """An uninitialised array whose data pointer is `align`-byte aligned (jax CPU zero-copy)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + align, np.uint8)
  off = (-buf.ctypes.data) % align
  return buf[off:off + nbytes].view(dtype).reshape(shape)


def write_dataset(path: str, n: int, d: int, seed: int = 0, block: int = 1 << 18):
  """Mixture of 50 Gaussians, L2-normalised rows, raw float32 to `path` (streamed)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(50, d)).astype(np.float32)
  with open(path, "wb") as f:
    for s in range(0, n, block):
      m = min(block, n - s)
      x = centers[rng.integers(0, 50, m)] + 1.5 * rng.standard_normal((m, d), dtype=np.float32)
      x /= np.linalg.norm(x, axis=1, keepdims=True)
      f.write(x.tobytes())


def read_dataset(path: str, n: int, d: int) -> np.ndarray:
  x = aligned_empty((n, d))
  with open(path, "rb") as f:
    view = memoryview(x.reshape(-1).view(np.uint8))
    got = f.readinto(view)
  assert got == x.nbytes, (got, x.nbytes)
  return x


def exact_inertia(x: np.ndarray, c: np.ndarray, block: int = 1 << 16) -> float:
  """Sum over all points of the squared distance to the nearest centroid (float64 sum)."""
  c = np.asarray(c, np.float32)
  c_sq = (c.astype(np.float64) ** 2).sum(1)
  total = 0.0
  for s in range(0, x.shape[0], block):
    xb = x[s:s + block]
    d = (xb.astype(np.float64) ** 2).sum(1)[:, None] - 2.0 * (xb @ c.T).astype(np.float64) + c_sq
    total += float(np.maximum(d.min(1), 0).sum())
  return total


# ----------------------------------------------------------------------------------------------
# (a) image level


def _thread_env(threads: int) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if threads > 0:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
      env[var] = str(threads)
    if threads == 1:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
  return env


def _run_worker(args, extra: list) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats),
         "--img-repeats", str(args.img_repeats), "--threads", str(args.threads)] + extra
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(args.threads))
  if proc.returncode != 0:
    raise RuntimeError(f"worker {extra} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_image_level(args) -> dict:
  import jax
  import jax.numpy as jnp
  from sklearn.cluster import KMeans
  from lightcluster_jax import kmeans as km

  b, n, d = args.img_sets, args.img_points, 384
  x = image_keys(b, n, d)
  xj = jnp.asarray(x)
  base = jax.random.key(0)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b))
  run = lambda: km.batched_kmeans(xj, 2, keys=keys, max_iter=100, tol=1e-4)
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t0

  def sklearn_loop():
    inertia, iters = 0.0, []
    for i in range(b):
      m = KMeans(2, init="k-means++", n_init=1, max_iter=100, tol=1e-4, algorithm="lloyd",
                 random_state=i).fit(x[i])
      inertia += m.inertia_
      iters.append(m.n_iter_)
    return inertia, iters

  sklearn_loop()                                                 # warm-up (imports, caches)
  # Interleaved repeats: on a shared machine both sides see the same load.
  # CPU time (this process, all threads) is reported too: it is less sensitive than wall
  # time to other jobs taking the cores away.
  times, sk_times, cpu, sk_cpu = [], [], [], []
  for _ in range(args.img_repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    t0, c0 = time.perf_counter(), time.process_time()
    sk_inertia, sk_iters = sklearn_loop()
    sk_times.append(time.perf_counter() - t0)
    sk_cpu.append(time.process_time() - c0)
  ours_t, sk_t = _median(times), _median(sk_times)
  ours_inertia = float(np.sum(np.asarray(res.inertia, np.float64)))
  return dict(
      sets=b, points=n, dim=d, k=2, repeats=args.img_repeats,
      ours_s=ours_t, sklearn_s=sk_t, ours_compile_s=compile_s,
      ours_ms_per_set=1e3 * ours_t / b, sklearn_ms_per_set=1e3 * sk_t / b,
      speedup_vs_sklearn=sk_t / ours_t,
      speedup_per_repeat=[s / o for s, o in zip(sk_times, times)],
      ours_cpu_ms_per_set=1e3 * _median(cpu) / b, sklearn_cpu_ms_per_set=1e3 * _median(sk_cpu) / b,
      speedup_vs_sklearn_cpu_time=_median(sk_cpu) / _median(cpu),
      cores_used=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      ours_inertia=ours_inertia, sklearn_inertia=sk_inertia,
      inertia_rel_diff=ours_inertia / sk_inertia - 1.0,
      ours_mean_iterations=float(np.mean(np.asarray(res.iterations))),
      sklearn_mean_iterations=float(np.mean(sk_iters)),
      load_avg=os.getloadavg()[0])


# ----------------------------------------------------------------------------------------------
# (b) dataset level: one method per subprocess


def worker(args) -> dict:
  if args.method == "image":
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
      # One core for both sides (before JAX starts, so XLA sizes its thread pools to it):
      # with XLA_FLAGS alone XLA:CPU still ran parts of ours on a second thread.
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    return bench_image_level(args)
  x = read_dataset(args.data, args.n, args.dim)
  data_gb = x.nbytes / 1e9
  k, epochs = args.k, args.epochs
  times, iters = [], None
  if args.method == "ours":
    import jax
    from lightcluster_jax import kmeans as km, sharding
    block = 1 << 18

    def run(xx):
      n = xx.shape[0]
      idx = km.sample_indices(n, args.sample, key=jax.random.key(1))
      fit = km.kmeans(xx[idx], k, key=jax.random.key(0), tol=0.0, chunk_size=4096)
      chunks = lambda: ((xx[s:s + block], np.ones(min(block, n - s), bool))
                        for s in range(0, n, block))
      # tol_abs=0: the full-data phase stops only on unchanged labels, so it makes the same
      # `epochs` passes as faiss (the equal budget).
      c, info = sharding.streamed_lloyd(chunks, fit.centroids, max_iter=epochs, tol_abs=0.0,
                                        chunk_size=4096)
      labels, _ = km.assign(xx, c, chunk_size=4096, block_size=block)
      return c, labels, int(fit.iterations), info
    t0 = time.perf_counter()
    # Compile every shape once: a full block, the tail block, the sample draw over all N.
    jax.block_until_ready(run(x[:min(args.n, block + args.n % block)])[1])
    km.sample_indices(args.n, args.sample, key=jax.random.key(1))
    compile_s = time.perf_counter() - t0
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      c, labels, sample_iterations, info = run(x)
      jax.block_until_ready(labels)
      times.append(time.perf_counter() - t0)
    centroids, iters = np.asarray(c), info["iterations"]
    extra = dict(compile_s=compile_s, sample_iterations=sample_iterations)
  elif args.method == "faiss":
    import faiss
    if args.threads > 0:
      faiss.omp_set_num_threads(args.threads)
    for r in range(args.repeats):
      t0 = time.perf_counter()
      kmf = faiss.Kmeans(args.dim, k, niter=epochs, seed=1 + r, verbose=False,
                         max_points_per_centroid=args.n // k + 1)
      kmf.train(x)
      _, labels = kmf.index.search(x, 1)
      times.append(time.perf_counter() - t0)
    centroids, iters = kmf.centroids, epochs
    extra = dict(threads=faiss.omp_get_max_threads())
  elif args.method == "minibatch":
    from sklearn.cluster import MiniBatchKMeans
    for r in range(args.repeats):
      t0 = time.perf_counter()
      mb = MiniBatchKMeans(k, batch_size=4096, max_iter=epochs, n_init=1, tol=0.0,
                           max_no_improvement=None, random_state=r).fit(x)
      times.append(time.perf_counter() - t0)
    centroids, iters = mb.cluster_centers_, int(mb.n_steps_)
    extra = dict(batch_size=4096, steps=int(mb.n_steps_))
  else:
    raise ValueError(args.method)
  peak = _peak_rss_gb()
  return dict(method=args.method, k=k, time_s=_median(times), times_s=times,
              peak_rss_gb=peak, data_gb=data_gb, iterations=iters,
              inertia=exact_inertia(x, centroids), **extra)


def bench_dataset_level(args) -> dict:
  out = {}
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    path = os.path.join(tmp, "x.f32")
    t0 = time.perf_counter()
    write_dataset(path, args.n, args.dim)
    out["data_gen_s"] = time.perf_counter() - t0
    for k in args.ks:
      row = {}
      for method in ("ours", "faiss", "minibatch"):
        row[method] = _run_worker(args, [
            "--method", method, "--k", str(k), "--data", path, "--n", str(args.n),
            "--dim", str(args.dim), "--epochs", str(args.epochs), "--sample", str(args.sample)])
        print(f"[dataset k={k}] {method}: {row[method]['time_s']:.2f} s, inertia "
              f"{row[method]['inertia']:.1f}, peak RSS {row[method]['peak_rss_gb']:.2f} GB",
              file=sys.stderr)
      o, f, m = row["ours"], row["faiss"], row["minibatch"]
      row["speedup_vs_faiss"] = f["time_s"] / o["time_s"]
      row["speedup_vs_minibatch"] = m["time_s"] / o["time_s"]
      row["inertia_rel_diff_vs_sklearn"] = o["inertia"] / m["inertia"] - 1.0
      row["inertia_rel_diff_vs_faiss"] = o["inertia"] / f["inertia"] - 1.0
      out[f"k{k}"] = row
  return out


def bench_sharded(args) -> dict:
  """(b) rerun sharded: streamed Lloyd (`sharding.streamed_lloyd`, psum over the mesh) on the
  same data with 1 and with 8 simulated CPU devices; the inertias must agree."""
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "throughput.py")
  out = {}
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    path = os.path.join(tmp, "x.f32")
    write_dataset(path, args.n, args.dim)
    for devices in (1, 8):
      env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
      proc = subprocess.run([sys.executable, worker, "--worker", "kmeans", "--data", path,
                             "--n", str(args.n), "--epochs", str(args.epochs)],
                            capture_output=True, text=True, env=env)
      if proc.returncode != 0:
        raise RuntimeError(f"sharded worker ({devices} devices) failed:\n{proc.stderr[-3000:]}")
      out[f"devices_{devices}"] = json.loads(proc.stdout.strip().splitlines()[-1])
  for k in ("k2", "k20"):
    a, b = out["devices_1"][k]["inertia"], out["devices_8"][k]["inertia"]
    out[f"{k}_relative_inertia_diff_8_vs_1"] = abs(a - b) / abs(a)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
  p.add_argument("--skip-image", action="store_true")
  p.add_argument("--skip-dataset", action="store_true")
  p.add_argument("--only", choices=("image", "dataset", "sharded"),
                 help="run only part (a) 'image', part (b) 'dataset', or (b) sharded")
  p.add_argument("--sharded", action="store_true",
                 help="also rerun (b) as streamed Lloyd on 1 and 8 simulated devices")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--img-repeats", type=int, default=9,
                 help="interleaved repeats of part (a) (ours, then the scikit-learn loop)")
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--sample", type=int, default=65_536)
  p.add_argument("--tmp", default=None, help="folder for the temporary data file")
  p.add_argument("--threads", type=int, default=1,
                 help="threads per method (0 = each library's default)")
  # worker mode
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--method", help=argparse.SUPPRESS)
  p.add_argument("--k", type=int, help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, default=2_000_000, help=argparse.SUPPRESS)
  p.add_argument("--dim", type=int, default=384, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.only == "image":
    args.skip_dataset = True
  elif args.only == "dataset":
    args.skip_image = True
  elif args.only == "sharded":
    args.skip_image = args.skip_dataset = args.sharded = True
  args.img_sets, args.img_points = (64, 3136) if not args.quick else (8, 3136)
  if args.worker:
    print(json.dumps(worker(args)))
    return
  if args.quick:
    args.n, args.sample, args.repeats = 200_000, 16_384, min(args.repeats, 2)
  args.ks = (2, 20)
  result = dict(machine=dict(cpus=os.cpu_count(), python=sys.version.split()[0],
                             threads_per_method=args.threads,
                             load_avg_at_start=os.getloadavg()[0]))
  try:
    import jax, sklearn
    result["machine"].update(jax=jax.__version__, sklearn=sklearn.__version__)
    import faiss
    result["machine"]["faiss"] = faiss.__version__
  except ImportError as e:
    print(f"note: {e}", file=sys.stderr)
  if not args.skip_image:
    extra = ["--method", "image"] + (["--quick"] if args.quick else [])
    result["image_level"] = _run_worker(args, extra)
    print(f"[image] {json.dumps(result['image_level'])}", file=sys.stderr)
  if not args.skip_dataset:
    ds = bench_dataset_level(args)
    # Headline numbers: the harder k=20 case, with k=2 alongside.
    result["dataset_level"] = dict(
        n=args.n, dim=args.dim, epochs=args.epochs, sample=args.sample,
        speedup_vs_faiss=min(ds[f"k{k}"]["speedup_vs_faiss"] for k in args.ks),
        speedup_vs_minibatch=min(ds[f"k{k}"]["speedup_vs_minibatch"] for k in args.ks),
        inertia_rel_diff_vs_sklearn=max(ds[f"k{k}"]["inertia_rel_diff_vs_sklearn"]
                                        for k in args.ks),
        **ds)
  if args.sharded:
    result["dataset_level_sharded"] = bench_sharded(args)
  result["machine"]["load_avg_at_end"] = os.getloadavg()[0]
  print(json.dumps(result))


if __name__ == "__main__":
  main()
