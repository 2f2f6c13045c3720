"""Progress bars of the runner (tqdm; off with `progress=False`)."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable, *, total, desc, enabled):
  """A tqdm bar over `iterable` (or a manual one with `iterable=None`) counting images."""
  return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit="img",
              dynamic_ncols=True, leave=True)
