"""Experiment configuration: the defaults, loading config files, command-line overrides.

A config file is a Python file with `get_config(arg=None) -> ConfigDict` (big_vision style:
one file = one experiment, its docstring gives the command and the expected result); it
usually starts from `default_config()` and overrides what differs. `FILE.py:ARG` passes ARG
(e.g. `smoke`). Overrides `a.b=value` are parsed with the type of the existing field; an
unknown field is an error that names it and lists the fields that do exist.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import pathlib

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The defaults of docs/method.md ("Ours" in §1-10); every field documented inline."""
  c = ml_collections.ConfigDict()
  c.arch = "dino_vits8"          # ViT variant (lightcluster_jax.vit.ARCHS)
  c.seed = 0                     # one seed drives every k-means (folded per image / stage)

  c.features = ml_collections.ConfigDict()
  c.features.image_size = 448    # short side in pixels; 0 = native size
  c.features.batch_size = 1      # images per ViT call. 1 on CPU: a bucket's last batch of 4
  #                                computed filler images (2.3x the real patches on the 9 VOC
  #                                images, features 46 -> 21 s warm); raise it on accelerators
  c.features.bucket_multiple = 4  # padded grid sides are multiples of this many patches
  c.features.dtype = "float32"   # "bfloat16" on accelerators
  c.features.pos_interpolation = "checkpoint"  # position-embedding resampling to other grids:
  #                                  checkpoint (the rule recorded with the weights: official
  #                                  for official DINO / DINOv2 files, size for Hugging Face,
  #                                  timm for timm) | official | size | timm (lightcluster_jax.vit)

  c.clustering = ml_collections.ConfigDict()
  c.clustering.k_image = 2
  c.clustering.k_category = 2
  c.clustering.k_dataset = 2
  c.clustering.num_categories = 5          # CLS-token superclasses (VOC 5, COCO 12)
  c.clustering.rule = "dc_and_i"           # dc_and_i | d_and_i | all | majority | image_only
  c.clustering.dilate = 1                  # image-level mask dilation (patches) in *_and_i
  c.clustering.min_region_patches = 2      # smaller components are removed
  c.clustering.dataset_fit_patches = 200_000  # dataset-level centroids fitted on a sample
  c.clustering.n_init = 3                  # k-means restarts per problem
  c.clustering.chunk_images = 64           # masks stage streamed over chunks of this many
  #                                          images (bounded memory); 0 = all in memory at once
  c.clustering.category_fit_patches = 200_000  # category centroids fitted on a sample this big
  #                                          when the set has more patches (then refined below)
  c.clustering.category_refine_iters = 10  # exact streamed Lloyd passes after a sampled fit
  c.clustering.dataset_refine_iters = 0    # same for the dataset level (0 = as in memory)
  c.clustering.max_iter = 100              # Lloyd iterations per k-means
  c.clustering.fg_min_share = 0.5          # a cluster is fg if more than this share of its
  #                                          patches lies in the image-level fg (method §5)
  c.clustering.fallback_share = 0.25       # ... else its best cluster, if at least this share
  c.clustering.min_image_share = 0.2       # a level is used in an image only if this share of
  #                                          its fg there lies in the image-level fg
  c.clustering.connectivity = 4            # components of the cleanup (4 or 8)
  c.clustering.flip_image_level = False    # opt-in: flip an image-level mask that D and C
  c.clustering.flip_share = 0.8            # contradict on this share of their fg (method §6)
  c.clustering.arbitrate = True            # where D and C agree on patches the image-level fg
  #                                          leaves out (flip_share of them), complement that
  #                                          fg if CLS attention favours D and C (method §6)
  c.clustering.arbitrate_margin = 1.0      # ... by this much: s(D and C) - s(I) >= margin, with
  #                                          s(M) = log(mean attention in M / in the rest)
  c.clustering.arbitrate_min_contrast = 0.5  # ... and s(D and C) >= this (attention is on it)

  c.upsample = ml_collections.ConfigDict()
  c.upsample.temperature = 0.1   # softmax temperature of the fg/bg centroid distances

  c.crf = ml_collections.ConfigDict()
  c.crf.enabled = True
  c.crf.preset = "maskcontrast"  # maskcontrast | krahenbuhl
  c.crf.backend = "default"      # see lightcluster_jax.crf; "default" = the measured best
  c.crf.unary = "mask"           # CRF start: "mask" = consistent mask at full confidence (the
  #                                CRF refines boundaries only); "soft" = decided soft probability
  c.crf.bucket_pixels = 64       # padded image sides are multiples of this many pixels
  c.crf.canvas_overhead = 2.0    # refine + regions pad every image to one canvas (one compile)
  #                                when that computes at most this many times the pixels of
  #                                per-image buckets; 0 = per-image buckets (speed only)

  c.assign = ml_collections.ConfigDict()
  c.assign.num_classes = 20          # VOC 20, COCO 80
  c.assign.min_region_pixels = 900   # ~ 30x30 px
  c.assign.max_regions = 8           # per image, largest first
  c.assign.whole_foreground = False  # True: one region = the whole foreground
  c.assign.box_margin = 0.1          # box grown by this fraction of its size per side
  c.assign.crop_size = 224
  c.assign.crop_batch = 16           # crops of many images packed per ViT call (speed only)
  c.assign.n_init = 10

  c.input = ml_collections.ConfigDict()   # how images are read (speed only, not cached)
  c.input.read_threads = 4       # decode / resize threads ahead of the device (0 = inline)
  c.input.prefetch = 16          # images decoded ahead at most

  c.output = ml_collections.ConfigDict()
  c.output.overlays = True
  c.output.format = "png"        # png: OUT/masks/<id>.png | array_record: OUT/labels/ shards
  return c


class ConfigError(ValueError):
  """A bad config file, field or value."""


def smoke(c: ml_collections.ConfigDict, *, image_size: int = 64,
          crop_size: int = 64) -> ml_collections.ConfigDict:
  """The `:smoke` variant of an experiment: small images and few restarts, to check in
  seconds to minutes that the commands run (its scores mean nothing)."""
  c.features.image_size = image_size
  c.assign.crop_size = crop_size
  c.assign.n_init = 2
  c.clustering.n_init = 1
  c.assign.min_region_pixels = 64
  return c


def check_arg(arg, allowed, config_file: str) -> None:
  """Raises ConfigError naming `config_file` when `arg` (FILE.py:ARG) is not in `allowed`."""
  if arg not in allowed:
    names = ", ".join("(none)" if a is None else a for a in allowed)
    raise ConfigError(f"{config_file}: unknown argument {arg!r}; expected one of: {names}")


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:arg]`; None gives `default_config()`."""
  if spec is None:
    return default_config()
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"lightcluster_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a syntax error etc. in the user's file
    raise ConfigError(f"could not load config file {path}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(arg=None)")
  config = module.get_config(arg or None)
  check_fields(config)
  return config


def _all_fields(config, prefix=""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _all_fields(value, name + ".")
    else:
      yield name


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming any field that the defaults do not have (typos)."""
  known = set(_all_fields(default_config()))
  for name in _all_fields(config):
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config field {name!r}{hint}")


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies `a.b=value` strings; values parsed as Python literals, typed by the field."""
  config = ml_collections.ConfigDict(config.to_dict())
  known = sorted(_all_fields(config))
  for item in overrides:
    name, sep, raw = item.partition("=")
    name = name.strip().removeprefix("config.")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form field=value")
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config field {name!r}{hint}")
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(old, bool):
      if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
      if not isinstance(value, bool):
        raise ConfigError(f"config field {name!r} expects true/false, got {raw!r}")
    elif isinstance(old, (int, float)) and not isinstance(old, bool):
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config field {name!r} expects a number, got {raw!r}")
      value = type(old)(value) if isinstance(old, float) or float(value).is_integer() else value
    elif isinstance(old, str) and not isinstance(value, str):
      value = raw
    node[leaf] = value
  return config


def config_hash(*parts) -> str:
  """Short stable hash of JSON-able parts (config sections, weight hashes, id lists)."""
  blob = json.dumps([p.to_dict() if isinstance(p, ml_collections.ConfigDict) else p
                     for p in parts], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
