"""The `lightcluster` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _convert(argv):
  from checkpoints_conversion import convert
  return convert.main(argv)


# name -> (help, function taking the remaining argv and returning an exit status)
SUBCOMMANDS = {
    "convert": ("convert a DINO / DINOv2 checkpoint to a Flax .npz (optionally verify parity)",
                _convert),
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
  return int(SUBCOMMANDS[args.command][1](argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
