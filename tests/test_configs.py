"""The experiment files in configs/: they load, and their headers give runnable commands.

Every config is big_vision style: `get_config(arg=None)` starts from `default_config()`, and
the module docstring gives the exact `lightcluster segment` and `lightcluster evaluate`
commands and the expected result. These tests read the docstrings without running the
commands (no weights or datasets needed) and check that

* every config loads with `config.load_config` (and `:smoke` where the header offers it),
  is self-contained (loads no other config file) and rejects an unknown argument;
* the header has a segment command for this file, an evaluate command for its output, and the
  word `Expected`; every option used exists in the CLI (`--help`);
* `--images` / `--split` / `--gt` / `--classes` / `--num-classes` are consistent: a VOCdevkit
  root needs `--split` (else images without GT are segmented and `evaluate` stops at the
  first), a JPEGImages folder takes none, the GT folder belongs to the images, the 9 dev
  images are scored with `--classes present`, COCO with `--num-classes 81`.
"""

import ast
import contextlib
import io
import pathlib
import re
import shlex

import pytest

from lightcluster_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))
NAMES = [p.stem for p in CONFIGS]
DEV_ASSETS = "../shared/assets"


def _header(path: pathlib.Path) -> str:
  return ast.get_docstring(ast.parse(path.read_text())) or ""


def _commands(header: str, program: str) -> list[list[str]]:
  """The `lightcluster <program> ...` commands of a header, as argument lists."""
  text = re.sub(r"\\\n\s*", " ", header)   # join continued lines
  out = []
  for line in text.splitlines():
    line = line.split(" #", 1)[0].strip()  # trailing comments
    if line.startswith(f"lightcluster {program} "):
      out.append(shlex.split(line)[2:])
  return out


def _options(args: list[str]) -> dict[str, str | None]:
  opts, i = {}, 0
  while i < len(args):
    a = args[i]
    assert a.startswith("--"), f"stray argument {a!r} in {args}"
    if "=" in a:
      k, v = a.split("=", 1)
      opts[k] = v
      i += 1
    elif i + 1 < len(args) and not args[i + 1].startswith("--"):
      opts[a] = args[i + 1]
      i += 2
    else:
      opts[a] = None
      i += 1
  return opts


def _cli_help(program: str) -> str:
  from lightcluster_jax.apps import cli
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
    cli.main([program, "--help"])
  return buf.getvalue()


def _pairs(path):
  """(segment options, evaluate options) pairs: the i-th evaluate scores the i-th segment."""
  header = _header(path)
  segs = [_options(a) for a in _commands(header, "segment")]
  evals = [_options(a) for a in _commands(header, "evaluate")]
  assert len(segs) == len(evals), (
      f"{path.name}: {len(segs)} segment but {len(evals)} evaluate commands")
  return list(zip(segs, evals))


def test_there_are_configs():
  assert {"voc12_dino_vits8", "voc12_dinov2_vits14"} <= set(NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_loads(path):
  from lightcluster_jax import vit
  c = config_lib.load_config(str(path))
  assert c.arch in vit.ARCHS
  assert c.assign.num_classes >= 1 and c.clustering.num_categories >= 1
  if f"{path.name}:smoke" in _header(path):
    s = config_lib.load_config(f"{path}:smoke")
    assert s.arch == c.arch
    assert 0 < s.features.image_size < (c.features.image_size or 10**9)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_is_self_contained(path):
  src = path.read_text()
  assert "default_config()" in src
  for other in ("load_config", "importlib", "__file__", "spec_from_file_location"):
    assert other not in src, f"{path.name} loads another file ({other}); start from default_config()"


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_rejects_unknown_argument(path):
  with pytest.raises(config_lib.ConfigError, match="unknown argument"):
    config_lib.load_config(f"{path}:no_such_variant")


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_header_has_commands_and_expected_result(path):
  header = _header(path)
  assert "lightcluster segment" in header
  assert "lightcluster evaluate" in header
  assert "Expected" in header
  pairs = _pairs(path)
  assert pairs, f"{path.name}: no segment command"
  seg_help, eval_help = _cli_help("segment"), _cli_help("evaluate")
  for seg, ev in pairs:
    assert seg.get("--config") in (f"configs/{path.name}", f"configs/{path.name}:smoke")
    for opt in ("--images", "--weights", "--out"):
      assert seg.get(opt), f"{path.name}: segment command without {opt}"
    assert ev.get("--pred") == f"{seg['--out']}/masks", (
        f"{path.name}: evaluate --pred {ev.get('--pred')} is not the segment output "
        f"{seg['--out']}/masks")
    assert ev.get("--gt"), f"{path.name}: evaluate command without --gt"
    for opt in seg:
      assert re.search(rf"(^|\s){re.escape(opt)}[\s,=]", seg_help), f"segment has no {opt}"
    for opt in ev:
      assert re.search(rf"(^|\s){re.escape(opt)}[\s,=]", eval_help), f"evaluate has no {opt}"


def _gt_for(images: str) -> str | None:
  """The GT folder that belongs to a VOC-style `--images` value (None: not VOC)."""
  p = images.rstrip("/")
  if p.endswith("/JPEGImages"):
    return p[:-len("JPEGImages")] + "SegmentationClass"
  if p.endswith("VOC2012") or "VOCdevkit" in p:
    return p + "/SegmentationClass"
  return None


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_header_split_images_gt_are_consistent(path):
  for seg, ev in _pairs(path):
    images = seg["--images"].rstrip("/")
    gt = _gt_for(images)
    if images.endswith("/JPEGImages"):
      assert "--split" not in seg, (
          f"{path.name}: --split is ignored with a JPEGImages folder ({images}); pass the "
          "VOC root instead, or drop --split")
    elif gt is not None:   # a VOCdevkit root
      assert seg.get("--split") == "val", (
          f"{path.name}: --images {images} is a VOCdevkit root: it needs --split val, else "
          "images without GT are segmented and `lightcluster evaluate` fails on the first")
    if gt is not None:
      assert ev["--gt"].rstrip("/") == gt, f"{path.name}: --gt {ev['--gt']} for --images {images}"
      assert ev.get("--num-classes", "21") == "21"
      dev = images.startswith(DEV_ASSETS)
      assert ev.get("--classes", "all") == ("present" if dev else "all"), (
          f"{path.name}: the 9 dev images are scored with --classes present, full VOC val "
          "with the default --classes all")
    if path.stem.startswith("coco"):
      assert ev.get("--num-classes") == "81", f"{path.name}: COCO-81 needs --num-classes 81"
      assert config_lib.load_config(str(path)).assign.num_classes == 80


def test_voc_root_with_split_lists_only_images_with_gt(tmp_path):
  """The CLI's reading of a VOC root: with the headers' --split, every image has GT."""
  from lightcluster_jax.apps import cli
  list_inputs = cli._list_inputs   # the function `lightcluster segment --images` uses
  import numpy as np
  from PIL import Image
  root = tmp_path / "VOCdevkit" / "VOC2012"
  (root / "JPEGImages").mkdir(parents=True)
  (root / "SegmentationClass").mkdir()
  (root / "ImageSets" / "Segmentation").mkdir(parents=True)
  for stem in ("a", "b", "c"):   # c: a training image without segmentation GT
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
  for stem in ("a", "b"):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "SegmentationClass" / f"{stem}.png")
  (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
  splits = {seg.get("--split") for p in CONFIGS for seg, _ in _pairs(p)
            if _gt_for(seg["--images"]) and not seg["--images"].rstrip("/").endswith("JPEGImages")}
  assert splits == {"val"}
  for split in splits:
    stems = {pathlib.Path(p).stem for p in list_inputs(root, split)}
    assert stems == {"a", "b"}
  assert {pathlib.Path(p).stem for p in list_inputs(root, None)} == {"a", "b", "c"}


def test_dinov2_expected_numbers_are_the_readme_figures():
  """The header's expected result is the measured one that the README's results table gives."""
  header = _header(REPO / "configs" / "voc12_dinov2_vits14.py")
  m = re.search(r"Expected \(9 dev images, seeds 0-4\): fg IoU (\d\.\d{4}) .*?mIoU (\d\.\d{4})",
                header, re.S)
  assert m, header
  readme = " ".join((REPO / "README.md").read_text().split())
  assert f"fg IoU **{m.group(1)}" in readme and f"mIoU **{m.group(2)}" in readme


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_dino_v1_configs_claim_no_measurement(path):
  c = config_lib.load_config(str(path))
  if not c.arch.startswith("dino_"):
    return
  header = " ".join(_header(path).split())
  assert "Expected: not measured" in header
  assert re.search(r"No DINO v1 weights [^.]*exist on the development machines", header)
