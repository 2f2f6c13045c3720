"""End to end on the 9 real VOC images with the real DINOv2-S/14 weights: segment, evaluate.

Thresholds sit below the measured figures in the README (which were obtained with exactly
these commands) with a margin for k-means seeds; they fail if a stage breaks (e.g. the
foreground flips, the CRF destroys the masks, or classes collapse).
"""

import json
import pathlib
import shutil

import pytest

from lightcluster_jax.apps.cli import main as cli_main

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def voc9(assets, tmp_path_factory):
  """A folder with just the 9 images (the assets' JPEGImages has exactly those)."""
  return assets / "voc2012" / "JPEGImages"


@pytest.mark.slow
def test_segment_and_evaluate_voc9(voc9, assets, dinov2_s14_npz, tmp_path, capsys):
  out = tmp_path / "run"
  rc = cli_main(["segment", "--config", str(REPO / "configs" / "voc12_dinov2_vits14.py"),
                 "--images", str(voc9), "--weights", str(dinov2_s14_npz), "--out", str(out),
                 "--no-progress"])
  assert rc == 0
  capsys.readouterr()
  rc = cli_main(["evaluate", "--pred", str(out / "masks"), "--gt",
                 str(assets / "voc2012" / "SegmentationClass"), "--classes", "present", "--json"])
  assert rc == 0
  scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert scores["num_images"] == 9
  assert scores["fg_iou_mean"] > 0.65, scores
  assert scores["miou"] > 0.25, scores
