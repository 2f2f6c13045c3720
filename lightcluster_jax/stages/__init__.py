"""The method's stages in data-flow order; each composes building blocks into pure functions.

  features  image -> ViT Keys / CLS / CLS attention per patch grid
  masks     Keys of the set -> image / category / dataset-level masks -> consistent patch mask
  refine    patch probability -> pixels (bilinear) -> dense CRF -> pixel mask
  regions   pixel mask -> connected regions -> crops -> crop CLS descriptors
  labels    descriptors of the set -> class ids -> painted label maps

See docs/method.md for the method and the defaults.
"""
