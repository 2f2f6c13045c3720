"""The multi-host plan: which images each process handles, and gathering their rows.

Every process is given the same full list of items; process i processes the contiguous block
`sharding.host_shard(items)`. After the features stage some images may have been skipped
(unreadable), so the dataset-level stages work on the readable ids `ok_ids`, of which this
host holds the contiguous range `local_range = (start, end)`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from lightcluster_jax.blocks import sharding

__all__ = ["readable_ids", "local_range", "gather_rows"]


def readable_ids(ids: Sequence[str], my_ok: Sequence[str]) -> list[str]:
  """All hosts' readable ids, in the order of `ids` (every host calls it, lock-step)."""
  if jax.process_count() == 1:
    mine = set(my_ok)
    return [i for i in ids if i in mine]
  flags = np.isin(np.asarray(ids), np.asarray(my_ok, dtype=object)).astype(np.int64)
  return [i for i, f in zip(ids, sharding.host_sum(flags)) if f > 0]


def local_range(ids: Sequence[str], ok_ids: Sequence[str], my_ok: Sequence[str]
                ) -> tuple[int, int]:
  """This host's (start, end) in `ok_ids`.

  `host_shard` blocks are contiguous, so is this host's part of `ok_ids`. A host with no
  readable image gets the empty range placed after the images of the hosts before it, so
  the ranges of all hosts partition [0, len(ok_ids)) in host order.
  """
  mine = set(my_ok)
  positions = [n for n, i in enumerate(ok_ids) if i in mine]
  if positions:
    return positions[0], positions[-1] + 1
  if jax.process_count() == 1:
    return 0, 0
  first = sharding.host_shard_bounds(len(ids))[0]
  ok = set(ok_ids)
  n_before = sum(1 for i in ids[:first] if i in ok)
  return n_before, n_before


def gather_rows(local: np.ndarray, start: int, n_total: int) -> np.ndarray:
  """Rows [n_local, ...] of this host (global rows start..) -> all rows [n_total, ...].

  Every host calls it (lock-step); the hosts' row ranges must partition [0, n_total).
  """
  if jax.process_count() == 1:
    return local
  ranges = sharding.host_gather(np.asarray([start, len(local)], np.int64))
  cap = max(1, int(ranges[:, 1].max()))
  buf = np.zeros((cap,) + local.shape[1:], local.dtype)
  buf[:len(local)] = local
  got = sharding.host_gather(buf)
  out = np.zeros((n_total,) + local.shape[1:], local.dtype)
  for h, (s, n) in enumerate(ranges):
    out[s:s + n] = got[h][:n]
  return out
