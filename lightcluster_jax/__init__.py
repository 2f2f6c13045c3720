"""lightcluster_jax: LightCluster unsupervised semantic segmentation in JAX/Flax.

The folders follow the data flow:

  blocks/   pure JAX building blocks: vit, kmeans, crf, resize, components, metrics, sharding
  stages/   the method, in order: features -> masks -> refine -> regions -> labels
  runner/   cache, multi-host plan, streamed masks, `pipeline.segment`
  apps/     the `lightcluster` CLI, the demo, evaluation, outputs (PNGs / shards), pictures
  weights/  checkpoint formats, conversion key maps, downloads
  data/     image decoding, sources (folder / TFDS, Grain loader), batching / padding,
            epath files, ArrayRecord shards, VOC / COCO readers, TFDS builders

Every stage is a pure function that jits, vmaps over images and shards over devices; the
runner and the CLI are thin layers over them. Modules are importable by their full path
(`from lightcluster_jax.blocks import kmeans`) and, for brevity, as attributes of the package
(`from lightcluster_jax import kmeans, crf, masks, pipeline`); the most used functions are
re-exported here (except where a function shares its module's name: use
`lightcluster_jax.kmeans.kmeans` and `lightcluster_jax.resize.resize`).
"""

__version__ = "0.1.0"

from lightcluster_jax import config, data, weights
from lightcluster_jax.data import shards, sources
from lightcluster_jax.apps import cli, demo, evaluate, outputs, viz
from lightcluster_jax.blocks import components, crf, kmeans, metrics, resize, sharding, vit
from lightcluster_jax.runner import pipeline
from lightcluster_jax.stages import features, labels, masks, refine, regions

from lightcluster_jax.blocks.components import (connected_components, dilate,
                                                remove_small_components)
from lightcluster_jax.blocks.crf import (dense_crf, get_params as crf_params, unary_from_labels,
                                         unary_from_probs)
from lightcluster_jax.blocks.kmeans import (KMeansResult, batched_kmeans, grouped_assign,
                                            grouped_kmeans, lloyd_statistics)
from lightcluster_jax.blocks.metrics import (ConfusionAccumulator, confusion_matrix,
                                             foreground_iou, hungarian_match,
                                             segmentation_scores)
from lightcluster_jax.blocks.resize import interpolation_matrix
from lightcluster_jax.blocks.sharding import (data_mesh, data_parallel, host_shard, initialize,
                                              local_mesh, streamed_lloyd)
from lightcluster_jax.config import apply_overrides, default_config, load_config
from lightcluster_jax.runner.pipeline import (SegmentResult, items_from_arrays, items_from_paths,
                                             items_from_source, segment)
from lightcluster_jax.data.sources import FolderSource, TfdsSource
from lightcluster_jax.stages.features import extract_features, preprocess
from lightcluster_jax.stages.masks import (consistency, image_level_foreground,
                                           multilevel_foreground, soft_foreground)
from lightcluster_jax.stages.labels import cluster_descriptors, paint_labels
from lightcluster_jax.stages.regions import crop_and_resize, find_regions
