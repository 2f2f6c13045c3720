"""lightcluster_jax: LightCluster unsupervised semantic segmentation in JAX/Flax.

Every stage is a pure function that jits, vmaps over images and shards over devices; the
pipeline and the `lightcluster` CLI are thin layers over them. The stage modules are
importable on their own (`from lightcluster_jax import kmeans, crf`); the most used functions
are re-exported here (except where a function shares its module's name: use
`lightcluster_jax.kmeans.kmeans` and `lightcluster_jax.resize.resize`).
"""

__version__ = "0.1.0"

from lightcluster_jax import (assign, config, crf, evaluation, features, kmeans, masks,
                              metrics, pipeline, resize, sharding, viz, vit, weights)
from lightcluster_jax.assign import crop_and_resize, find_regions, paint_labels
from lightcluster_jax.config import apply_overrides, default_config, load_config
from lightcluster_jax.crf import dense_crf, get_params as crf_params, unary_from_labels, unary_from_probs
from lightcluster_jax.features import extract_features, preprocess
from lightcluster_jax.kmeans import (KMeansResult, batched_kmeans, fit_streaming,
                                     grouped_kmeans, kmeans_on_sample, lloyd_statistics)
from lightcluster_jax.masks import (connected_components, consistency, image_level_foreground,
                                    multilevel_foreground, remove_small_components,
                                    soft_foreground)
from lightcluster_jax.metrics import (ConfusionAccumulator, confusion_matrix, foreground_iou,
                                      hungarian_match, segmentation_scores)
from lightcluster_jax.pipeline import items_from_arrays, items_from_paths, segment
from lightcluster_jax.resize import interpolation_matrix
from lightcluster_jax.sharding import (data_mesh, data_parallel, host_shard, initialize,
                                       local_mesh, streamed_lloyd)
