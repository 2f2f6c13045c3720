"""The runner: runs the stages over a set of images with a cache, batching and outputs.

  cache     per-stage artefact store (atomic writes, resume), inputs (`Item`)
  batching  bucket shapes, padding into fixed-shape batches
  plan      which images each host of a multi-host run processes
  pipeline  `segment`: every stage in order, cached, sharded over devices and hosts
  outputs   label PNGs, overlays, summary.json
"""
