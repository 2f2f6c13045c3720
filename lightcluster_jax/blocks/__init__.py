"""Building blocks: pure JAX functions with no file I/O, each usable on its own.

  vit         Flax ViT (DINO / DINOv2) returning named intermediates (Keys, CLS, attention)
  kmeans      masked, batched, grouped and streamed k-means (one Lloyd driver)
  crf         dense CRF, mean-field, several filtering backends
  resize      PyTorch-exact bilinear / bicubic / nearest resizing as matrices
  components  connected components, dilation, small-component removal on grids
  metrics     confusion matrices, Hungarian matching, mIoU / fg IoU
  sharding    meshes, data-parallel jit, host collectives, streamed sharded statistics
"""
