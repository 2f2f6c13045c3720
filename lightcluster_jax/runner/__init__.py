"""The runner: runs the stages over a set of images with a cache, batching and outputs.

  cache         per-stage artefact store (atomic writes, resume) and inputs (`Item`)
  plan          which images each host of a multi-host run processes; gathering their rows
  masks_stream  the masks stage streamed over chunks of the features cache
  pipeline      `segment`: every stage in order, cached, sharded over devices and hosts
  progress      progress bars

Bucketing / padding is `data.batching`; writing label PNGs and overlays is `apps.outputs`.
"""
