"""The `lightcluster` console script: one subcommand per job.

  lightcluster convert   checkpoint -> Flax .npz (+ parity check against a PyTorch reference)
  lightcluster segment   a folder / TFDS split -> label maps, overlays, summary.json (resumable)
  lightcluster evaluate  predicted label maps vs ground truth (PNGs / TFDS) -> Hungarian mIoU
  lightcluster demo      the whole pipeline on the sample images shipped in the package
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import pathlib
import sys
import warnings

from lightcluster_jax.weights import WeightsError


class CLIError(Exception):
  """A user error: printed as one line, exit status 2."""


def _plugin(name: str):
  """The `main(argv)` registered for subcommand `name` under the entry-point group
  `lightcluster.commands` (the `convert` command lives in `checkpoints_conversion`, which
  depends on this library, not the other way round)."""
  for ep in importlib.metadata.entry_points(group="lightcluster.commands"):
    if ep.name == name:
      return ep.load()
  raise CLIError(f"`lightcluster {name}` is provided by the checkpoints_conversion package, "
                 "which is not installed: install the project with `pip install -e .[convert]`")


def _convert(argv):
  return _plugin("convert")(argv)


def _split_overrides(argv):
  """Separates `--config.a.b=v` / `--set a.b=v` overrides from the other arguments."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config.") and "=" in arg:
      overrides.append(arg[len("--config."):])
    elif arg == "--set":
      overrides.append(next(it, ""))
    elif arg.startswith("--set="):
      overrides.append(arg[len("--set="):])
    else:
      rest.append(arg)
  return rest, overrides


def _list_inputs(images: str, split: str | None):
  from lightcluster_jax.data import files
  from lightcluster_jax.data import images as images_lib
  images = files.as_path(images)
  if not images.exists():
    raise CLIError(f"--images path not found: {images}")
  if (images / "JPEGImages").is_dir():  # a VOCdevkit-style root
    if split:
      lst = images / "ImageSets" / "Segmentation" / f"{split}.txt"
      if not lst.is_file():
        raise CLIError(f"image-set list not found: {lst}")
      wanted = set(lst.read_text().split())
      paths = [p for p in images_lib.list_images(images / "JPEGImages") if p.stem in wanted]
    else:
      paths = images_lib.list_images(images / "JPEGImages")
  elif images.is_dir():
    paths = images_lib.list_images(images)
  else:
    paths = [images]
  if not paths:
    raise CLIError(f"no images found under {images}")
  return paths


def _source(args):
  """The input source of `segment`: --tfds NAME:SPLIT, or --images (folder / file / VOC)."""
  from lightcluster_jax.data import sources
  if (args.images is None) == (args.tfds is None):
    raise CLIError("give exactly one of --images and --tfds")
  if args.tfds is not None:
    try:
      return sources.TfdsSource(*sources.parse_tfds_spec(args.tfds), data_dir=args.data_dir)
    except ImportError as e:
      raise CLIError(f"--tfds needs tensorflow-datasets: pip install -e .[tfds] ({e})") from e
    except ValueError as e:
      raise CLIError(str(e)) from e
  return sources.FolderSource(_list_inputs(args.images, args.split))


def _segment(argv) -> int:
  from lightcluster_jax import config as config_lib
  from lightcluster_jax.apps import outputs
  from lightcluster_jax.runner import pipeline
  from lightcluster_jax import weights
  argv, overrides = _split_overrides(argv)
  p = argparse.ArgumentParser(prog="lightcluster segment",
                              description="Segment a folder of images or a TFDS split "
                                          "(resumable).",
                              epilog="Override any config field with --config.a.b=VALUE "
                                     "(e.g. --config.output.format=array_record).")
  p.add_argument("--config", help="experiment file, e.g. configs/voc12_dino_vits8.py[:smoke]")
  p.add_argument("--images", help="folder of images, a single image, or a VOCdevkit root "
                                  "(JPEGImages/); local or gs://...")
  p.add_argument("--split", help="with a VOCdevkit root: ImageSets/Segmentation/<split>.txt")
  p.add_argument("--tfds", metavar="NAME:SPLIT",
                 help="a prepared TFDS dataset instead of --images, e.g. "
                      "voc2012_segmentation:val (see lightcluster_jax.data.tfds_builders)")
  p.add_argument("--data-dir", help="with --tfds: the TFDS data dir (default: TFDS's)")
  p.add_argument("--weights", required=True, type=pathlib.Path, help="converted .npz or checkpoint")
  p.add_argument("--out", required=True, help="output folder, local or gs://...")
  p.add_argument("--limit", type=int, help="only the first N images (by name / TFDS order)")
  p.add_argument("--no-overlays", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  multi = p.add_argument_group(
      "multi-host", "run one process per host; each segments and writes its share of the images")
  multi.add_argument("--distributed", action="store_true",
                     help="join a multi-host run whose coordinator JAX detects itself (TPU VM "
                          "pod slices, SLURM, Kubernetes); or give the three flags below")
  multi.add_argument("--coordinator", help="HOST:PORT of process 0 (jax.distributed)")
  multi.add_argument("--num-processes", type=int, help="number of processes (hosts)")
  multi.add_argument("--process-id", type=int, help="this process's index, 0..num-processes-1")
  args = p.parse_args(argv)
  given = [a is not None for a in (args.coordinator, args.num_processes, args.process_id)]
  if any(given) and not all(given):
    raise CLIError("multi-host runs need all of --coordinator, --num-processes and --process-id")
  if args.distributed and not any(given):
    from lightcluster_jax.blocks import sharding  # before any other JAX call
    sharding.initialize()
  elif all(given):
    if not 0 <= args.process_id < args.num_processes:
      raise CLIError(f"--process-id {args.process_id} is outside 0..{args.num_processes - 1}")
    from lightcluster_jax.blocks import sharding  # before any other JAX call
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
  try:
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  except config_lib.ConfigError as e:
    raise CLIError(str(e)) from e
  source = _source(args)
  if config.output.format not in outputs.FORMATS:
    raise CLIError(f"config.output.format={config.output.format!r}; expected one of "
                   f"{outputs.FORMATS}")
  arch, params, sha = weights.load_for_run(args.weights)
  rule = config.features.get("pos_interpolation", "checkpoint")
  if rule != "checkpoint":  # replaces the position-embedding rule recorded with the weights
    from lightcluster_jax.blocks import vit
    try:
      arch = dataclasses.replace(vit.get_config(arch), pos_interpolation=rule)
    except ValueError as e:
      raise CLIError(f"config.features.pos_interpolation: {e}; or checkpoint") from e
  arch_name = arch if isinstance(arch, str) else arch.name
  if arch_name != config.arch:
    warnings.warn(f"the weights are {arch_name}; config.arch={config.arch!r} is replaced by it")
    config.arch = arch_name
  items = pipeline.items_from_source(source)[:args.limit]
  result = pipeline.segment(config, items, params=params, arch=arch, out_dir=args.out,
                            weights_id=sha, progress=not args.no_progress)
  summary = outputs.write_outputs(result, items, args.out, config=config, weights_id=sha,
                                   overlays=config.output.overlays and not args.no_overlays,
                                   progress=not args.no_progress, format=config.output.format)
  print(json.dumps({k: summary[k] for k in ("num_images", "num_regions", "seconds_per_image")}
                   | {"skipped": sorted(summary["skipped"]), "out": str(args.out)}))
  return 0


def _evaluate(argv) -> int:
  from lightcluster_jax.apps import evaluate as evaluation
  p = argparse.ArgumentParser(prog="lightcluster evaluate",
                              description="Hungarian-matched mIoU of predicted label maps.")
  p.add_argument("--pred", required=True,
                 help="folder of <id>.png predictions, or a segment run's OUT (PNGs or label "
                      "shards)")
  p.add_argument("--gt", help="folder of <id>.png ground truth")
  p.add_argument("--gt-tfds", metavar="NAME:SPLIT",
                 help="ground truth from a TFDS split's label feature instead of --gt")
  p.add_argument("--data-dir", help="with --gt-tfds: the TFDS data dir")
  p.add_argument("--num-classes", type=int, default=21, help="GT classes incl. background")
  p.add_argument("--classes", choices=("all", "present"), default="all",
                 help="average IoU over all classes or only those present in the GT")
  p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  args = p.parse_args(argv)
  if (args.gt is None) == (args.gt_tfds is None):
    raise CLIError("give exactly one of --gt and --gt-tfds")
  try:
    if args.gt is not None:
      scores = evaluation.evaluate_folders(args.pred, args.gt, num_classes=args.num_classes,
                                           classes=args.classes)
    else:
      from lightcluster_jax.apps import outputs
      scores = evaluation.evaluate_labels(
          outputs.open_labels(args.pred), evaluation.tfds_labels(args.gt_tfds, args.data_dir),
          num_classes=args.num_classes, classes=args.classes)
  except (FileNotFoundError, ValueError) as e:
    raise CLIError(str(e)) from e
  if args.json:
    print(json.dumps(scores))
  else:
    print(evaluation.format_scores(scores))
  return 0


def _demo(argv) -> int:
  from lightcluster_jax.apps import demo
  p = argparse.ArgumentParser(prog="lightcluster demo",
                              description="Run the whole pipeline on the shipped sample images.")
  p.add_argument("--weights", type=pathlib.Path,
                 help="local checkpoint (.npz/.pth/.safetensors); default: fetch DINO ViT-S/8")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("lightcluster_demo"))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  paths = demo.run(weights=args.weights, out=args.out, image_size=args.image_size,
                   progress=not args.no_progress)
  print(json.dumps({"out": str(args.out), "pictures": [str(x) for x in paths]}))
  return 0


# name -> (help, function taking the remaining argv and returning an exit status)
SUBCOMMANDS = {
    "convert": ("convert a DINO / DINOv2 checkpoint to a Flax .npz (optionally verify parity)",
                _convert),
    "segment": ("segment a folder of images; resumable, cached per stage", _segment),
    "evaluate": ("Hungarian-matched mIoU / pixel accuracy / fg IoU of predicted masks", _evaluate),
    "demo": ("the whole pipeline on the shipped sample images, pictures out", _demo),
}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="lightcluster",
      description="LightCluster unsupervised semantic segmentation in JAX.")
  parser.add_argument("command", choices=sorted(SUBCOMMANDS),
                      help="; ".join(f"{k}: {v[0]}" for k, v in SUBCOMMANDS.items()))
  if not argv or argv[0] in ("-h", "--help"):
    parser.print_help()
    return 0 if argv else 2
  args = parser.parse_args(argv[:1])
  if args.command in ("segment", "demo"):
    from lightcluster_jax.apps import compile_cache
    compile_cache.enable()   # before anything compiles; $LIGHTCLUSTER_COMPILATION_CACHE=off
  try:
    return int(SUBCOMMANDS[args.command][1](argv[1:]) or 0)
  except (CLIError, WeightsError) as e:
    print(f"lightcluster {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"lightcluster {args.command}: interrupted; finished work is cached, run the same "
          "command again to resume", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
