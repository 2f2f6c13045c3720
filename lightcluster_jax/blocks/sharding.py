"""Scale-out: a 1-D data mesh over devices, data-parallel stage wrappers, sharded Lloyd, hosts.

Two kinds of work, two kinds of parallelism:

* **Per-image stages** (ViT features, image-level k-means, resize, CRF, crop descriptors) are
  embarrassingly parallel. `data_parallel` pads a batch to a multiple of the local device
  count (with a validity mask), places it with `NamedSharding(mesh, P("data"))` and runs the
  stage function under `jax.jit(jax.shard_map(...))`: each device its slice. Every host
  runs these on its own images (`host_shard`) and its own devices (`local_mesh`), so hosts
  never wait for each other here.
* **Dataset statistics** (dataset- and category-level Lloyd steps, foreground counts) are
  sums over every patch of every image. A chunk of patches is split over the local devices
  and `jax.shard_map` runs `kmeans.lloyd_statistics` / `grouped_lloyd_statistics` on every
  shard with a `psum` over "data"; chunk results are accumulated on the host in float64 and
  the hosts' totals are combined in process order (a fixed-order fold of an all-gather). So
  one Lloyd iteration over N patches is

  .. math:: S_j = \\sum_{h} \\sum_{c \\in h} \\mathrm{psum}_{d}\\, S_j^{(h, c, d)}, \\quad
            n_j = \\ldots, \\quad c_j \\leftarrow S_j / n_j,

  run by `kmeans.lloyd`, the driver of the in-memory paths (same empty-cluster rule: every
  chunk, device and host contributes its k farthest points, merged by one more top-k; same
  stopping rule): exactly Lloyd's algorithm on the concatenated data (up to float summation
  order), while no device ever holds more than one chunk of Keys.

Multi-host: call `initialize(coordinator, num_processes, process_id)` first in every process
(on CPU it switches the collectives to gloo), then every process runs the same program on
`host_shard(ids)`; everything that needs all hosts goes through `host_sum` / `host_gather`,
which every process must call the same number of times (lock-step).

Example:
  >>> mesh = local_mesh()
  >>> f = data_parallel(jax.jit(lambda x: 2 * x), mesh)
  >>> f(np.ones((3, 4), np.float32)).shape      # padded to len(mesh.devices) inside
  (3, 4)
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lightcluster_jax.blocks import kmeans as _km

__all__ = [
    "AXIS", "initialize", "process_index", "process_count", "data_mesh", "local_mesh",
    "mesh_size", "host_shard", "host_shard_bounds", "pad_to_multiple", "data_parallel",
    "host_sum", "host_gather", "host_max", "sharded_lloyd_statistics",
    "sharded_grouped_lloyd_statistics", "streamed_lloyd", "streamed_grouped_lloyd",
    "uniform_slice",
]

AXIS = "data"


# ----------------------------------------------------------------------------- processes


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, local_device_ids=None,
               cpu_collectives: str = "gloo", initialization_timeout: int = 300) -> None:
  """Joins a multi-host run: a thin wrapper around `jax.distributed.initialize`.

  Must run before any other JAX call in the process. On the CPU backend the cross-process
  collectives are switched to `cpu_collectives` (gloo), which `psum` / all-gather across
  processes need. On TPU pods / SLURM / Kubernetes all three arguments may be None (JAX
  detects them).

  Args:
    coordinator: "host:port" of process 0 (e.g. "10.0.0.1:1234"; "127.0.0.1:PORT" locally).
    num_processes: number of processes (hosts).
    process_id: this process's rank in [0, num_processes).
    local_device_ids: optional devices of this host to use.
    cpu_collectives: "gloo" (default) or "mpi".
    initialization_timeout: seconds to wait for every process to join.
  """
  if num_processes is not None and process_id is not None and not (
      0 <= int(process_id) < int(num_processes)):
    raise ValueError(f"initialize: process_id {process_id} is not in [0, {num_processes})")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def host_shard(ids: Sequence, *, index: Optional[int] = None,
               count: Optional[int] = None) -> list:
  """This process's contiguous slice of `ids` (balanced: sizes differ by at most one).

  Args:
    ids: the whole dataset's ids (same list, same order, on every host).
    index, count: process index / count (default: this process's).

  Returns:
    list: ids[start:end] of host `index`; the slices of all hosts partition `ids` in order.
  """
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  if not 0 <= index < count:
    raise ValueError(f"host_shard: index {index} is not in [0, {count})")
  bounds = np.linspace(0, len(ids), count + 1).round().astype(int)
  return list(ids[bounds[index]:bounds[index + 1]])


def host_shard_bounds(n: int, *, index: Optional[int] = None,
                      count: Optional[int] = None) -> tuple[int, int]:
  """(start, end) of `host_shard` over n items."""
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  bounds = np.linspace(0, n, count + 1).round().astype(int)
  return int(bounds[index]), int(bounds[index + 1])


def host_gather(x) -> np.ndarray:
  """All-gather of a host array over processes: [...] -> [num_processes, ...] (lock-step).

  Every process must pass the same shape and dtype. One process: `x[None]`.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def host_sum(tree):
  """Sum over processes of a pytree of host arrays, in process order (deterministic).

  float arrays are summed in float64. Every process gets the same result.
  """
  def one(x):
    x = np.asarray(x)
    acc = np.float64 if x.dtype.kind == "f" else x.dtype
    g = host_gather(x).astype(acc)
    out = g[0].copy()
    for i in range(1, g.shape[0]):
      out = out + g[i]
    return out
  return jax.tree_util.tree_map(one, tree)


def host_max(x):
  """Element-wise maximum over processes."""
  return np.max(host_gather(x), axis=0)


# ----------------------------------------------------------------------------- meshes


def data_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh named "data" over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh: no devices")
  return Mesh(np.asarray(devices), (AXIS,))


def local_mesh() -> Mesh:
  """A 1-D "data" mesh over this process's devices (per-image stages, per-host chunks)."""
  return data_mesh(jax.local_devices())


def mesh_size(mesh: Optional[Mesh]) -> int:
  return 1 if mesh is None else int(mesh.devices.size)


def pad_to_multiple(x, multiple: int, *, axis: int = 0):
  """Zero-pads `axis` of `x` up to a multiple of `multiple`.

  Args:
    x: array (NumPy or jax) with n = x.shape[axis].
    multiple: positive int (e.g. the device count).

  Returns:
    (padded array with ceil(n / multiple) * multiple entries on `axis`, valid [n_padded]
    bool: True for the original rows).

  Example:
    >>> x, v = pad_to_multiple(np.ones((3, 2)), 4)
    >>> x.shape, v.tolist()
    ((4, 2), [True, True, True, False])
  """
  if multiple < 1:
    raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {multiple}")
  n = x.shape[axis]
  total = -(-n // multiple) * multiple
  valid = np.arange(total) < n
  if total == n:
    return x, valid
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, total - n)
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.pad(x, widths), valid


def data_parallel(fn: Callable, mesh: Optional[Mesh] = None, *,
                  batch_argnums: Optional[Sequence[int]] = None,
                  compiler_options: Optional[dict] = None) -> Callable:
  """Runs a batched per-image function data-parallel over the "data" axis of `mesh`.

  The wrapper zero-pads the leading (batch) axis of the arguments in `batch_argnums` to a
  multiple of the mesh size, puts them on the mesh with `NamedSharding(mesh, P("data"))`
  (the other arguments, e.g. weights, replicated with `P()`), and runs `fn` under
  `jax.jit(jax.shard_map(...))`: every device runs `fn` on its own slice of the batch. (Plain
  GSPMD partitioning of `fn` would all-gather the batch in front of the `lax.map` / loop over
  images that several stage functions use on CPU.) Every output is cut back to the original
  batch size. Padded slots are zeros, which the stage functions treat as empty images
  (all-False mask, zero valid size); their results are dropped here. So `fn` must be
  per-image (no reduction over the batch), which all per-image stage functions are.

  Args:
    fn: `(*args) -> pytree` of arrays with the batch on axis 0 (jitted or not).
    mesh: 1-D "data" mesh (default: `local_mesh()`). A 1-device mesh calls `fn` directly.
    batch_argnums: positions of the batched arguments (default: all).
    compiler_options: XLA options of the wrapping `jax.jit` (e.g. `crf.XLA_OPTIONS`); with a
      1-device mesh `fn` itself must carry them.

  Returns:
    callable with the signature of `fn`.
  """
  mesh = local_mesh() if mesh is None else mesh
  n_dev = mesh_size(mesh)
  if n_dev == 1:
    return fn
  return _data_parallel(fn, mesh, None if batch_argnums is None else tuple(batch_argnums),
                        tuple(sorted((compiler_options or {}).items())))


@functools.lru_cache(maxsize=64)
def _data_parallel(fn, mesh, batch_argnums, compiler_options):
  """Cached per (fn, mesh, batch_argnums, compiler_options): repeated pipeline runs reuse the
  compiled code."""
  n_dev = mesh_size(mesh)
  cache = {}

  @functools.wraps(fn)
  def wrapped(*args):
    nums = tuple(range(len(args))) if batch_argnums is None else tuple(batch_argnums)
    b = None
    placed = []
    for i, a in enumerate(args):
      if i in nums:
        b = a.shape[0] if b is None else b
        if a.shape[0] != b:
          raise ValueError(f"data_parallel: batched argument {i} has {a.shape[0]} rows, "
                           f"expected {b}")
        padded, _ = pad_to_multiple(np.asarray(a), n_dev)
        placed.append(jax.device_put(padded, NamedSharding(mesh, P(AXIS))))
      else:
        placed.append(jax.device_put(a, NamedSharding(mesh, P())))
    if len(args) not in cache:
      specs = tuple(P(AXIS) if i in nums else P() for i in range(len(args)))
      cache[len(args)] = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs,
                                               out_specs=P(AXIS), check_vma=False),
                                 compiler_options=dict(compiler_options) or None)
    out = cache[len(args)](*placed)
    return jax.tree_util.tree_map(lambda y: y[:b], out)
  return wrapped


# ----------------------------------------------------------------------------- sharded Lloyd


@functools.lru_cache(maxsize=32)
def _stats_fn(mesh: Mesh, cosine: bool, farthest: int, chunk_size: Optional[int]):
  def local(x, m, c):
    return _km.lloyd_statistics(x, m, c, cosine=cosine, axis_name=AXIS, farthest=farthest,
                                chunk_size=chunk_size)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                               out_specs=P()))


@functools.lru_cache(maxsize=32)
def _grouped_stats_fn(mesh: Mesh, cosine: bool, farthest: int):
  def local(x, g, m, c):
    return _km.grouped_lloyd_statistics(x, g, m, c, cosine=cosine, axis_name=AXIS,
                                        farthest=farthest)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
                               out_specs=P()))


def _shard_rows(mesh, *arrays):
  """Pads the rows of every array to a multiple of the mesh size (the masks with False)."""
  n_dev = mesh_size(mesh)
  out = []
  for a in arrays:
    padded, _ = pad_to_multiple(np.asarray(a), n_dev)
    out.append(jax.device_put(padded, NamedSharding(mesh, P(AXIS))))
  return out


def sharded_lloyd_statistics(points, mask, centroids, *, mesh: Optional[Mesh] = None,
                             cosine: bool = False, farthest: int = 0,
                             chunk_size: Optional[int] = None):
  """`kmeans.lloyd_statistics` of one chunk, rows split over `mesh`, `psum` over "data".

  Args:
    points: [n, D] float chunk (host or device); rows padded to the mesh size here.
    mask: [n] bool validity.
    centroids: [k, D] float32 (replicated).
    mesh: 1-D "data" mesh (default `local_mesh()`).
    cosine: L2-normalise the points first.
    farthest: r > 0: also the chunk's r farthest valid points (the empty-cluster candidates,
      gathered over the devices).
    chunk_size: every device runs its rows in cache-sized blocks of this many rows (see
      `kmeans.lloyd_statistics`; 4096 makes a k=20 pass ~3x faster on CPU, with float sums in
      another order).

  Returns:
    (sums [k, D], counts [k], inertia scalar) — the statistics of the whole chunk; with
    `farthest`, a `kmeans.LloydStats`.
  """
  mesh = local_mesh() if mesh is None else mesh
  x, m = _shard_rows(mesh, points, np.asarray(mask, bool))
  fn = _stats_fn(mesh, bool(cosine), int(farthest), None if chunk_size is None else int(chunk_size))
  return fn(x, m, jnp.asarray(centroids, jnp.float32))


def sharded_grouped_lloyd_statistics(points, group_ids, mask, centroids, *,
                                     mesh: Optional[Mesh] = None, cosine: bool = False,
                                     farthest: int = 0):
  """`kmeans.grouped_lloyd_statistics` of one chunk over `mesh` (centroids [G, k, D]).

  Returns:
    (sums [G, k, D], counts [G, k], inertia [G]); with `farthest`, a `kmeans.LloydStats`.
  """
  mesh = local_mesh() if mesh is None else mesh
  x, g, m = _shard_rows(mesh, points, np.asarray(group_ids, np.int32),
                        np.asarray(mask, bool))
  return _grouped_stats_fn(mesh, bool(cosine), int(farthest))(
      x, g, m, jnp.asarray(centroids, jnp.float32))


def _to_host(tree):
  """Device statistics -> NumPy, floats in float64 (the host accumulators)."""
  def one(a):
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" else a
  return jax.tree_util.tree_map(one, tree)


def _combine_over_hosts(stats):
  """`kmeans.combine_statistics` over processes, in process order (lock-step)."""
  if jax.process_count() == 1:
    return stats
  gathered = jax.tree_util.tree_map(host_gather, stats)
  out = jax.tree_util.tree_map(lambda a: a[0], gathered)
  for h in range(1, jax.process_count()):
    out = _km.combine_statistics(out, jax.tree_util.tree_map(lambda a: a[h], gathered))
  return out


def _streamed(stats_of_chunk, make_chunks, centroids, *, max_iter: int, tol_abs):
  """`kmeans.lloyd` (Python loop) with statistics summed over chunks (f64) and hosts."""
  c0 = np.asarray(centroids, np.float32)
  info = dict(iterations=0, shifts=[], inertia=[], converged=False)

  def stats(c, aux):
    total = _km.zero_statistics(c)
    for chunk in make_chunks():
      total = _km.combine_statistics(total, _to_host(stats_of_chunk(chunk, c)))
    return _combine_over_hosts(total), aux

  def record(s):
    info["shifts"].append(s.shift.tolist())
    info["inertia"].append(s.inertia.tolist())

  s = _km.lloyd(stats, c0, tol_abs=np.asarray(tol_abs, np.float64), max_iter=int(max_iter),
                python_loop=True, callback=record)
  info.update(iterations=len(info["shifts"]), converged=bool(np.all(s.done)))
  return s.centroids, info


def streamed_lloyd(make_chunks: Callable[[], Iterable], centroids, *, max_iter: int = 20,
                   tol_abs: float = 0.0, mesh: Optional[Mesh] = None, cosine: bool = False,
                   chunk_size: Optional[int] = None):
  """Exact Lloyd iterations over a re-iterable stream of chunks, sharded and multi-host.

  The driver is `kmeans.lloyd` (the in-memory paths' update, empty-cluster rule and stopping
  rule), run as a Python loop whose pass sums `sharded_lloyd_statistics` of every chunk of
  this host (float64 on the host) and combines the hosts' sums in process order (lock-step:
  every host runs the same iterations, because all hosts see the same totals). An empty
  cluster takes the valid point farthest from its centroid over all chunks and hosts (each
  chunk contributes its k farthest). Stops when the total squared centroid shift <=
  `tol_abs` (0: when nothing moves, i.e. the labels no longer change) or after `max_iter`
  iterations. From the same initial centroids this is `kmeans.kmeans(..., init=centroids)`
  on the concatenated chunks, up to float summation order.

  Args:
    make_chunks: zero-argument callable returning an iterable of (points [n, D], mask [n]).
    centroids: [k, D] initial centroids.
    max_iter: maximum iterations.
    tol_abs: absolute shift tolerance (0: stop only when nothing moves).
    mesh: "data" mesh for the chunk statistics (default `local_mesh()`).
    cosine: L2-normalise the points first.
    chunk_size: cache-sized row blocks inside every device's pass (`sharded_lloyd_statistics`).

  Returns:
    (centroids [k, D] float32 NumPy, info dict(iterations, shifts, inertia, converged));
    inertia[i] is measured against the centroids before update i.
  """
  mesh = local_mesh() if mesh is None else mesh
  k = int(np.shape(centroids)[0])

  def stats(chunk, c):
    x, m = chunk
    return sharded_lloyd_statistics(x, m, c, mesh=mesh, cosine=cosine, farthest=k,
                                    chunk_size=chunk_size)
  return _streamed(stats, make_chunks, centroids, max_iter=max_iter, tol_abs=tol_abs)


def streamed_grouped_lloyd(make_chunks: Callable[[], Iterable], centroids, *,
                           max_iter: int = 20, tol_abs=0.0, mesh: Optional[Mesh] = None,
                           cosine: bool = False):
  """`streamed_lloyd` for grouped k-means: chunks are (points [n, D], group_ids [n], mask).

  Centroids [G, k, D]; each group stops when its own shift <= tol_abs[g] and is then frozen
  (as in `kmeans.grouped_kmeans`); iterations continue until every group has stopped.

  Returns:
    (centroids [G, k, D] float32 NumPy, info dict; shifts[i] / inertia[i] are per group).
  """
  mesh = local_mesh() if mesh is None else mesh
  k = int(np.shape(centroids)[1])

  def stats(chunk, c):
    x, g, m = chunk
    return sharded_grouped_lloyd_statistics(x, g, m, c, mesh=mesh, cosine=cosine, farthest=k)
  return _streamed(stats, make_chunks, centroids, max_iter=max_iter, tol_abs=tol_abs)


# ----------------------------------------------------------------------------- random streams


def uniform_slice(key, start: int, size: int) -> np.ndarray:
  """`jax.random.uniform(key, (N,))[start:start + size]` without drawing all N numbers.

  With JAX's partitionable threefry (the default since JAX 0.5; checked here), element i of
  a 1-D draw depends only on the key and i: its bits are `b1 ^ b2` of
  `threefry2x32(key, (hi(i), lo(i)))`. So a chunked pass can draw exactly the numbers the
  whole-array draw would give its rows (tested against the whole-array draw).

  Args:
    key: raw uint32 [2] or typed threefry PRNG key.
    start: first index (int, < 2**63).
    size: number of values.

  Returns:
    [size] float32 in [0, 1).
  """
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError("uniform_slice needs jax_threefry_partitionable=True")
  from jax.extend import random as jex_random
  data = jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype,
                                                   jax.dtypes.prng_key) else jnp.asarray(key)
  data = np.asarray(data, np.uint32).reshape(2)
  idx = np.arange(start, start + size, dtype=np.uint64)
  hi = (idx >> np.uint64(32)).astype(np.uint32)
  lo = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  b1, b2 = jex_random.threefry2x32_p.bind(
      jnp.uint32(data[0]), jnp.uint32(data[1]), jnp.asarray(hi), jnp.asarray(lo))
  bits = np.asarray(b1) ^ np.asarray(b2)
  # jax.random.uniform's float32 mapping: 23 random mantissa bits in [1, 2), minus 1.
  f = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
  return np.maximum(np.float32(0.0), f).astype(np.float32)
