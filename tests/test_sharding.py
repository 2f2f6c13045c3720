"""Scale-out: device / host count independence, streamed == in-memory masks, padding.

The multi-device and multi-host runs happen in subprocesses (XLA_FLAGS must be set before jax
is imported; `jax.distributed` can be initialised once per process). They run the tiny
pipeline of test_pipeline.py (2-block random ViT, synthetic images, CRF off) and write
their masks and labels to an npz that is compared here with a 1-device in-process run.
"""

import inspect
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcluster_jax import kmeans as km
from lightcluster_jax import pipeline, sharding, vit
from lightcluster_jax.runner import masks_stream

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from test_pipeline import ARCH, _synthetic, tiny_config  # noqa: E402

LEVELS = ("image", "category", "dataset", "consistent", "group", "orig_hw")
SIZES = [(96, 128), (96, 128), (112, 80), (80, 96), (64, 64)]

# Runs the tiny pipeline in a fresh process: 8 simulated devices or one of 2 hosts.
WORKER = textwrap.dedent("""
  import os, sys, json
  args = json.loads(sys.argv[1])
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d" % args["devices"]
  sys.path.insert(0, args["tests"])
  from lightcluster_jax import sharding
  if args.get("num_processes", 1) > 1:
    sharding.initialize(args["coordinator"], args["num_processes"], args["process_id"],
                        initialization_timeout=60)
  import jax, numpy as np
  jax.config.update("jax_disable_most_optimizations", True)   # as the reference fixture
  from lightcluster_jax import pipeline, vit, kmeans as km
  from test_pipeline import ARCH, _synthetic, tiny_config
  images = [_synthetic(*hw, seed=i) for i, hw in enumerate(args["sizes"])]
  config = tiny_config()
  for k, v in args.get("clustering", {}).items():
    config.clustering[k] = v
  params = vit.init_params(ARCH, jax.random.PRNGKey(0))
  reads = set()   # the ids whose pixels this process read

  def recorded(it):
    return pipeline.Item(it.id, lambda: (reads.add(it.id), it.load())[1], it.fingerprint)
  items = [recorded(it) for it in pipeline.items_from_arrays(images)]
  res = pipeline.segment(config, items, params=params, arch=ARCH,
                         out_dir=args["out_dir"], weights_id="test", progress=False)
  out = {"devices": np.asarray(jax.device_count()), "ids": np.asarray(res.ids),
         "reads": np.asarray(sorted(reads))}
  for i in res.ids:
    out["labels/" + i] = res.labels[i]
    m = res.artefacts("masks", i)
    for k in ("image", "category", "dataset", "consistent", "prob"):
      out[k + "/" + i] = m[k]
  if args.get("lloyd"):
    rng = np.random.RandomState(0)
    x = rng.randn(3001, 16).astype(np.float32)
    m = rng.rand(3001) > 0.1
    c0 = x[:4]
    mesh = sharding.data_mesh()
    s, n, j = sharding.sharded_lloyd_statistics(x, m, c0, mesh=mesh)
    out["lloyd_sums"], out["lloyd_counts"], out["lloyd_inertia"] = map(np.asarray, (s, n, j))
    c, info = sharding.streamed_lloyd(
        lambda: [(x[a:a + 1000], m[a:a + 1000]) for a in range(0, 3001, 1000)], c0,
        max_iter=200, mesh=mesh)
    out["lloyd_centroids"] = c
    out["lloyd_final_inertia"] = np.asarray(info["inertia"][-1])
  np.savez(args["result"], **out)
""")


def _worker(tmp_path, name, **args):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  args = {"tests": str(TESTS), "sizes": SIZES, "devices": 1,
          "out_dir": str(tmp_path / name), "result": str(tmp_path / f"{name}.npz"), **args}
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return [sys.executable, str(script), json.dumps(args)], env, args["result"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def params():
  return vit.init_params(ARCH, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def images():
  return [_synthetic(*hw, seed=i) for i, hw in enumerate(SIZES)]


@pytest.fixture(scope="module")
def reference(images, params):
  """1 device, 1 process, masks streamed (the default chunk size).

  Tiny problems are dominated by compile time, so this and the workers compile with most
  XLA optimizations off (the same setting on both sides of each comparison).
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    res = pipeline.segment(tiny_config(), pipeline.items_from_arrays(images), params=params,
                           arch=ARCH, weights_id="test", progress=False)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  masks = {i: res.artefacts("masks", i) for i in res.ids}
  return res, masks


@pytest.fixture(scope="module")
def features(images, params):
  stage = pipeline.Stage(None, "features", "t")
  ids = pipeline.run_features(stage, pipeline.items_from_arrays(images), params=params,
                              arch=ARCH, cfg=tiny_config().features, progress=False)
  return stage, ids


def _masks(features, **clustering):
  stage, ids = features
  cfg = tiny_config().clustering
  for k, v in clustering.items():
    cfg[k] = v
  out = pipeline.Stage(None, "masks", "t")
  pipeline.run_masks(out, stage, ids, cfg=cfg, seed=0, temperature=0.1, progress=False)
  return {i: out.load(i) for i in ids}


def _assert_same_masks(a, b, ids, prob_atol=0.0):
  for i in ids:
    for lvl in LEVELS:
      np.testing.assert_array_equal(a[i][lvl], b[i][lvl], err_msg=f"{i} {lvl}")
    np.testing.assert_allclose(a[i]["prob"], b[i]["prob"], rtol=0, atol=prob_atol,
                               err_msg=f"{i} prob")


# ----------------------------------------------------------------------------- small pieces


def test_uniform_slice_is_a_slice_of_the_whole_draw():
  for key in (jax.random.PRNGKey(3), jax.random.split(jax.random.PRNGKey(5))[1],
              jax.random.key(7)):
    full = np.asarray(jax.random.uniform(key, (5003,)))
    for start, size in ((0, 10), (517, 2000), (4000, 1003)):
      np.testing.assert_array_equal(sharding.uniform_slice(key, start, size),
                                    full[start:start + size])


def test_host_shard_partitions_in_order():
  ids = [f"{i:03d}" for i in range(11)]
  for count in (1, 2, 3, 4, 11, 13):
    parts = [sharding.host_shard(ids, index=h, count=count) for h in range(count)]
    assert sum(parts, []) == ids
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
  with pytest.raises(ValueError, match="index 2"):
    sharding.host_shard(ids, index=2, count=2)


def test_pad_to_multiple():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  p, v = sharding.pad_to_multiple(x, 4)
  assert p.shape == (4, 2) and v.tolist() == [True, True, True, False]
  np.testing.assert_array_equal(p[:3], x)
  np.testing.assert_array_equal(p[3], 0)
  p, v = sharding.pad_to_multiple(x, 3)
  assert p is x and v.all()
  with pytest.raises(ValueError, match="multiple"):
    sharding.pad_to_multiple(x, 0)


def test_running_top_k_matches_lax_top_k_with_ties():
  """The streamed fit sample: same rows, same order as jax.lax.top_k over everything."""
  rng = np.random.RandomState(4)
  n, size = 3000, 257
  prio = (rng.randint(0, 400, n) / 400).astype(np.float32)      # many ties
  prio[rng.rand(n) < 0.3] = -1.0                                  # invalid patches
  x = rng.randn(n, 3).astype(np.float32)
  top = masks_stream.TopK(size, 3)
  for s in range(0, n, 100):
    top.add(prio[s:s + 100], np.arange(s, min(s + 100, n)), x[s:s + 100])
  got_x, got_m, _ = top.merged()
  vals, idx = jax.lax.top_k(jnp.asarray(prio), size)
  idx = np.asarray(idx)
  np.testing.assert_array_equal(got_m, np.asarray(vals) >= 0)
  np.testing.assert_array_equal(got_x[got_m], x[idx[got_m]])


def test_streamed_lloyd_equals_in_memory_lloyd():
  """Exact Lloyd over chunks (NumPy oracle: the same iteration on the whole array)."""
  rng = np.random.RandomState(1)
  x = np.concatenate([rng.randn(300, 5) + 4, rng.randn(300, 5) - 4,
                      rng.randn(301, 5)]).astype(np.float32)
  m = rng.rand(len(x)) > 0.2
  c = x[[0, 1, 2]].copy()
  got, info = sharding.streamed_lloyd(
      lambda: [(x[a:a + 256], m[a:a + 256]) for a in range(0, len(x), 256)], c, max_iter=100)
  ref = c.astype(np.float64)
  xv = x[m].astype(np.float64)
  for _ in range(100):
    lab = np.argmin(((xv[:, None] - ref[None]) ** 2).sum(-1), 1)
    new = np.stack([xv[lab == j].mean(0) for j in range(3)])
    if np.allclose(new, ref, atol=0, rtol=0):
      break
    ref = new
  assert info["converged"]
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_streamed_grouped_lloyd_equals_grouped_kmeans_from_same_init():
  rng = np.random.RandomState(2)
  x = rng.randn(1200, 6).astype(np.float32)
  x[:600] += 3
  gid = (np.arange(1200) % 3).astype(np.int32)
  m = rng.rand(1200) > 0.1
  init = np.stack([x[[g, g + 3]] for g in range(3)])          # [G=3, k=2, D]
  got, info = sharding.streamed_grouped_lloyd(
      lambda: [(x[a:a + 500], gid[a:a + 500], m[a:a + 500]) for a in range(0, 1200, 500)],
      init, max_iter=200)
  ref = km.grouped_kmeans(jnp.asarray(x), jnp.asarray(gid), 3, 2, key=jax.random.PRNGKey(0),
                          mask=jnp.asarray(m), init=init, max_iter=200, tol=0.0)
  assert info["converged"]
  np.testing.assert_allclose(got, np.asarray(ref.centroids), rtol=0, atol=1e-5)


def _lloyd_case(cosine=False, empty=True):
  """Blobs with a mask, chunks with a ragged tail, and an initial centroid no point is near
  (empty after the first pass: re-seeded with the farthest point over all chunks)."""
  rng = np.random.RandomState(3)
  x = np.concatenate([rng.randn(400, 6) + 3, rng.randn(400, 6) - 3,
                      rng.randn(403, 6)]).astype(np.float32)
  m = rng.rand(len(x)) > 0.15
  c0 = x[[0, 500, 900, 1000]].copy()
  if empty:
    c0[2] = c0[0] if cosine else 1e3              # a duplicate loses every tie: empty too
  chunks = lambda: [(x[a:a + 333], m[a:a + 333]) for a in range(0, len(x), 333)]
  return x, m, c0, chunks


@pytest.mark.parametrize("cosine,empty,chunk_size", [(False, False, None), (False, True, None),
                                                     (True, True, None), (True, True, 64)])
def test_streamed_lloyd_equals_in_memory_kmeans_driver(cosine, empty, chunk_size):
  """Same driver, same init: streamed chunks (float64 host sums) == `kmeans` in memory, up
  to float summation order (centroids 1e-5, identical iterations and labels)."""
  x, m, c0, chunks = _lloyd_case(cosine, empty)
  ref = km.kmeans(x, 4, key=jax.random.PRNGKey(0), init=c0, mask=m, tol=0.0, cosine=cosine)
  got, info = sharding.streamed_lloyd(chunks, c0, max_iter=100, cosine=cosine,
                                      chunk_size=chunk_size)
  assert info["converged"] and info["iterations"] == int(ref.iterations)
  np.testing.assert_allclose(got, np.asarray(ref.centroids), rtol=0, atol=1e-5)
  a, _ = km.assign(x, got, mask=m, cosine=cosine)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(ref.assignment))
  if empty:
    assert np.abs(got).max() < 50


def _grouped_case():
  """3 groups of 4-d points; init: 2 points of each group + a far centroid that stays empty."""
  rng = np.random.RandomState(5)
  x = rng.randn(1500, 4).astype(np.float32)
  x[:700] += 2.5
  gid = rng.randint(0, 3, 1500).astype(np.int32)
  m = rng.rand(1500) > 0.1
  init = np.stack([np.concatenate([x[(gid == g) & m][:2], [[1e3] * 4]]) for g in range(3)])
  return x, gid, m, init.astype(np.float32)


def test_streamed_grouped_lloyd_with_empty_clusters_equals_grouped_kmeans():
  x, gid, m, init = _grouped_case()
  ref = km.grouped_kmeans(x, gid, 3, 3, key=jax.random.PRNGKey(0), mask=m, init=init,
                          tol=0.0)
  got, info = sharding.streamed_grouped_lloyd(
      lambda: [(x[a:a + 400], gid[a:a + 400], m[a:a + 400]) for a in range(0, 1500, 400)],
      init, max_iter=100)
  assert info["converged"] and info["iterations"] == int(np.max(ref.iterations))
  np.testing.assert_allclose(got, np.asarray(ref.centroids), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(km.grouped_assign(x, gid, got, mask=m)),
                                np.asarray(ref.assignment))


SHARDED_LLOYD_WORKER = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, numpy as np
  from lightcluster_jax import kmeans as km, sharding
  # LLOYD_CASE
  mesh = sharding.data_mesh()
  assert sharding.mesh_size(mesh) == 8
  for cosine, empty in ((False, True), (True, True), (False, False)):
    x, m, c0, chunks = _lloyd_case(cosine, empty)
    # 333-row chunks and a 2-row tail: padded to multiples of 8, fewer rows than k on some
    # devices (their candidate lists are padded with -inf).
    tail = lambda: chunks() + [(x[:2], np.zeros(2, bool))]
    ref = km.kmeans(x, 4, key=jax.random.PRNGKey(0), init=c0, mask=m, tol=0.0, cosine=cosine)
    got, info = sharding.streamed_lloyd(tail, c0, max_iter=100, mesh=mesh, cosine=cosine)
    assert info["converged"] and info["iterations"] == int(ref.iterations), (info, ref)
    np.testing.assert_allclose(got, np.asarray(ref.centroids), rtol=0, atol=1e-5)
    a, _ = km.assign(x, got, mask=m, cosine=cosine)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ref.assignment))
  x, gid, m, init = _grouped_case()
  ref = km.grouped_kmeans(x, gid, 3, 3, key=jax.random.PRNGKey(0), mask=m, init=init, tol=0.0)
  got, info = sharding.streamed_grouped_lloyd(
      lambda: [(x[a:a + 400], gid[a:a + 400], m[a:a + 400]) for a in range(0, 1500, 400)],
      init, max_iter=100, mesh=mesh)
  assert info["converged"]
  np.testing.assert_allclose(got, np.asarray(ref.centroids), rtol=0, atol=1e-5)
  print("OK")
""")


def test_sharded_lloyd_on_eight_devices_equals_in_memory_kmeans(tmp_path):
  """The streamed driver with statistics psum-ed (and candidates gathered) over 8 simulated
  devices == in-memory `kmeans` / `grouped_kmeans` from the same init, with empty clusters
  (centroids 1e-5, identical iterations and labels)."""
  script = tmp_path / "sharded_lloyd_worker.py"
  script.write_text(SHARDED_LLOYD_WORKER.replace(
      "# LLOYD_CASE", inspect.getsource(_lloyd_case) + inspect.getsource(_grouped_case)))
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_data_parallel_on_one_device_is_the_function(params):
  f = jax.jit(lambda a, b: a * b)
  g = sharding.data_parallel(f, sharding.local_mesh())
  assert g is f or np.array_equal(g(np.ones(3), np.ones(3)), f(np.ones(3), np.ones(3)))


# ----------------------------------------------------------------------------- streamed masks


def test_streamed_masks_equal_in_memory(features, fast_compile):
  """Masks exact: same image-level keys, padded grid, samples and k-means inputs. The soft
  probability may differ by float32 ulps (XLA fuses the sigmoid differently inside the one
  big in-memory jit than per chunk; 1.2e-7 seen on the real VOC images), hence 1e-6."""
  _, ids = features
  ref = _masks(features, chunk_images=0)
  _assert_same_masks(ref, _masks(features, chunk_images=2), ids, prob_atol=1e-6)
  # The dataset level fitted on a random sample: the streamed draw is the in-memory draw.
  ref = _masks(features, chunk_images=0, dataset_fit_patches=40)
  _assert_same_masks(ref, _masks(features, chunk_images=3, dataset_fit_patches=40), ids,
                     prob_atol=1e-6)


def test_streamed_masks_with_sampled_category_fit_stay_close(features):
  """Category centroids from a sample + exact streamed Lloyd: a different (bounded-memory)
  algorithm than k-means++ on every patch, so only near-equality is expected."""
  _, ids = features
  ref = _masks(features, chunk_images=0)
  got = _masks(features, chunk_images=2, category_fit_patches=50, category_refine_iters=20)
  agree = np.mean(np.concatenate([(ref[i]["consistent"] == got[i]["consistent"]).ravel()
                                  for i in ids]))
  assert agree >= 0.9, agree
  for i in ids:   # levels that do not involve the category fit stay exact
    for lvl in ("image", "dataset", "group"):
      np.testing.assert_array_equal(ref[i][lvl], got[i][lvl])


def test_streamed_masks_resume_after_partial_stage(features):
  stage, ids = features
  cfg = tiny_config().clustering
  cfg.chunk_images = 2
  out = pipeline.Stage(None, "masks", "t")
  pipeline.run_masks(out, stage, ids, cfg=cfg, seed=0, temperature=0.1, progress=False)
  full = {i: out.load(i) for i in ids}
  partial = pipeline.Stage(None, "masks", "t2")
  for i in ids[:2]:
    partial.save(i, full[i])
  pipeline.run_masks(partial, stage, ids, cfg=cfg, seed=0, temperature=0.1, progress=False)
  _assert_same_masks(full, {i: partial.load(i) for i in ids}, ids)


# ----------------------------------------------------------------------------- devices / hosts


def _compare_with_reference(result_npz, reference, prob_atol=1e-6):
  res, masks = reference
  got = np.load(result_npz)
  for i in [str(s) for s in got["ids"]]:
    np.testing.assert_array_equal(got[f"labels/{i}"], res.labels[i], err_msg=i)
    for lvl in ("image", "category", "dataset", "consistent"):
      np.testing.assert_array_equal(got[f"{lvl}/{i}"], masks[i][lvl], err_msg=f"{i} {lvl}")
    np.testing.assert_allclose(got[f"prob/{i}"], masks[i]["prob"], rtol=0, atol=prob_atol)
  return got


def test_eight_devices_give_the_same_masks_and_labels(tmp_path, reference):
  """8 simulated devices: batches padded to multiples of 8 and split over the mesh."""
  cmd, env, result = _worker(tmp_path, "dev8", devices=8, lloyd=True)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = _compare_with_reference(result, reference)
  assert int(got["devices"]) == 8
  assert sorted(str(s) for s in got["ids"]) == sorted(reference[0].ids)
  # Sharded Lloyd statistics (psum over 8 devices) vs one device.
  rng = np.random.RandomState(0)
  x = rng.randn(3001, 16).astype(np.float32)
  m = rng.rand(3001) > 0.1
  s, n, j = km.lloyd_statistics(x, m, x[:4])
  np.testing.assert_array_equal(got["lloyd_counts"], np.asarray(n))
  np.testing.assert_allclose(got["lloyd_sums"], np.asarray(s), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got["lloyd_inertia"], np.asarray(j), rtol=1e-5)
  c1, info1 = sharding.streamed_lloyd(
      lambda: [(x[a:a + 1000], m[a:a + 1000]) for a in range(0, 3001, 1000)], x[:4],
      max_iter=200)
  np.testing.assert_allclose(got["lloyd_centroids"], c1, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["lloyd_final_inertia"], info1["inertia"][-1], rtol=1e-5)


def test_two_processes_give_the_same_masks_and_labels(tmp_path, reference):
  """2 hosts on 127.0.0.1 (gloo): each segments and writes its half; stats combined."""
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd, env, _ = _worker(tmp_path, f"host{pid}", num_processes=2, process_id=pid,
                          coordinator=f"127.0.0.1:{port}")
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  seen = []
  for pid in range(2):
    got = _compare_with_reference(tmp_path / f"host{pid}.npz", reference)
    ids = [str(s) for s in got["ids"]]
    assert ids == sharding.host_shard(sorted(reference[0].ids), index=pid, count=2)
    # Each host read the pixels of its own share only, and wrote only its own images.
    assert [str(s) for s in got["reads"]] == ids
    mask_dir = next((tmp_path / f"host{pid}" / "cache").glob("masks-*"))
    assert sorted(pipeline.Stage(mask_dir.parent, "masks", mask_dir.name[6:]).ids()) == ids
    seen += ids
  assert sorted(seen) == sorted(reference[0].ids)


REFINE_WORKER = textwrap.dedent("""
  import os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, sys.argv[1])
  import jax, numpy as np
  from lightcluster_jax import crf, refine, sharding
  from test_pipeline import _synthetic
  rng = np.random.RandomState(0)
  b, hh, ww, gh, gw = 3, 64, 80, 8, 10
  images = np.stack([_synthetic(hh, ww, seed=i) for i in range(b)])
  prob = rng.rand(b, gh, gw).astype(np.float32)
  grid_hw = np.array([[8, 10], [6, 9], [8, 7]], np.int32)
  orig_hw = np.array([[64, 80], [48, 72], [60, 56]], np.int32)
  fn = refine.make_refine_fn(crf.get_params("maskcontrast"), None, True)
  one = np.asarray(fn(prob, grid_hw, images, orig_hw))
  mesh = sharding.data_mesh()
  assert sharding.mesh_size(mesh) == 8
  raw = refine.refine_batch_fn(crf.get_params("maskcontrast"), None, True)
  eight = np.asarray(sharding.data_parallel(raw, mesh, compiler_options=crf.XLA_OPTIONS)(
      prob, grid_hw, images, orig_hw))
  off = np.asarray(refine.make_refine_fn(None, None, False)(prob, grid_hw, images, orig_hw))
  np.savez(sys.argv[2], one=one, eight=eight, off=off)
""")


def test_crf_refine_stage_on_eight_devices_equals_one(tmp_path):
  """The refine stage (bilinear upsampling + the default superpixel CRF) under data_parallel
  on 8 simulated devices (3 images padded to 8) gives the 1-device result."""
  script = tmp_path / "refine_worker.py"
  script.write_text(REFINE_WORKER)
  out = tmp_path / "refine.npz"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script), str(TESTS), str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  assert got["eight"].shape == got["one"].shape == (3, 64, 80)
  assert np.all((got["one"] >= 0) & (got["one"] <= 1))
  assert np.abs(got["one"] - got["off"]).max() > 0.05   # the CRF really ran
  np.testing.assert_allclose(got["eight"], got["one"], atol=1e-5)
