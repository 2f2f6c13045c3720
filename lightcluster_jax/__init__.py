"""lightcluster_jax: LightCluster unsupervised semantic segmentation in JAX/Flax.

Every stage is a pure function that jits, vmaps over images and shards over devices; the
pipeline and the `lightcluster` CLI are thin layers over them.
"""

__version__ = "0.1.0"

from lightcluster_jax.resize import interpolation_matrix, resize
