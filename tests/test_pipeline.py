"""The staged pipeline and the CLI on a tiny random ViT and synthetic images.

These check plumbing (shapes, caching, resume, bad input), not segmentation quality; the
real-weights end-to-end quality checks are in test_end_to_end.py.
"""

import json
import pathlib
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from lightcluster_jax import config as config_lib
from lightcluster_jax import pipeline, vit, weights
from lightcluster_jax.apps.cli import main as cli_main
from lightcluster_jax.data import synthetic_scene

ARCH = vit.get_config("dino_vits16", depth=2)


@pytest.fixture(scope="module")
def params():
  return vit.init_params(ARCH, jax.random.PRNGKey(0))


_synthetic = synthetic_scene  # a textured background with a bright ellipse


@pytest.fixture(scope="module")
def images():
  return [_synthetic(*hw, seed=i) for i, hw in enumerate([(96, 128), (96, 128), (112, 80),
                                                          (80, 96)])]


def tiny_config():
  c = config_lib.default_config()
  c.arch = "dino_vits16"
  c.features.image_size = 64
  c.features.batch_size = 2
  c.clustering.num_categories = 2
  c.clustering.n_init = 1
  c.assign.num_classes = 2
  c.assign.crop_size = 32
  c.assign.min_region_pixels = 16
  c.assign.n_init = 2
  c.crf.bucket_pixels = 32
  # The CRF compiles slowly on CPU (a minute per shape); it is exercised once below and
  # tested on its own in test_crf.py.
  c.crf.enabled = False
  return c


def _run(config, images, params, out_dir=None, ids=None):
  items = pipeline.items_from_arrays(images, ids)
  return pipeline.segment(config, items, params=params, arch=ARCH, out_dir=out_dir,
                          weights_id="test", progress=False)


def test_segment_in_memory_shapes_and_labels(images, params):
  config = tiny_config()
  res = _run(config, images, params)
  assert sorted(res.labels) == sorted(res.ids) and len(res.ids) == len(images)
  for item_id, img in zip(res.ids, images):
    lab = res.labels[item_id]
    assert lab.shape == img.shape[:2] and lab.dtype == np.uint8
    assert lab.max() <= config.assign.num_classes
  # Deterministic for a fixed seed.
  again = _run(config, images, params)
  for item_id in res.ids:
    np.testing.assert_array_equal(res.labels[item_id], again.labels[item_id])


def test_one_canvas_for_the_set_gives_the_same_result(images, params):
  """Refine + regions padded to one canvas (default) == per-image pixel buckets."""
  config = tiny_config()
  masks = pipeline.Stage(None, "masks", "t")
  for i, img in enumerate(images):
    masks.save(f"{i}", {"orig_hw": np.asarray(img.shape[:2]), "prob": np.zeros((4, 5))})
  assert pipeline.pixel_canvases(masks, [f"{i}" for i in range(len(images))], config.crf) == (
      (128, 128), (8, 8))   # bucket_pixels 32: sides up to 112 / 128 -> one 128 x 128 canvas
  shared = _run(config, images, params)
  config.crf.canvas_overhead = 0.0
  own = _run(config, images, params)
  for item_id in shared.ids:
    np.testing.assert_array_equal(shared.artefacts("refine", item_id)["fg"],
                                  own.artefacts("refine", item_id)["fg"])
    np.testing.assert_array_equal(shared.labels[item_id], own.labels[item_id])


def test_resume_after_interrupt_loses_nothing(images, params, tmp_path):
  config = tiny_config()
  config.input.read_threads = 0   # Ctrl-C arrives in the main thread, as a real one does
  reference = _run(config, images, params, out_dir=tmp_path / "ref")

  calls = {"n": 0}

  def make_items(interrupt_at):
    items = []
    for i, img in enumerate(images):
      def load(img=img, i=i):
        calls["n"] += 1
        if interrupt_at is not None and i == interrupt_at:
          raise KeyboardInterrupt
        return img
      items.append(pipeline.Item(f"{i:05d}", load))
    return items

  out = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    pipeline.segment(config, make_items(3), params=params, arch=ARCH, out_dir=out,
                     weights_id="test", progress=False)
  feat_dirs = list((out / "cache").glob("features-*"))
  assert len(feat_dirs) == 1
  stage = pipeline.Stage(out / "cache", "features", feat_dirs[0].name.split("-", 1)[1])
  done = [i for i in (f"{n:05d}" for n in range(len(images))) if stage.has(i)]
  assert done == ["00000", "00001"], done  # the first full batch was saved before Ctrl-C
  shards = {p.name: p.stat().st_mtime_ns for p in stage.shard_files()}
  assert len(shards) == 1   # one shard file, not one file per image
  assert not list(feat_dirs[0].glob(".*.tmp"))  # no half-written files

  calls["n"] = 0
  resumed = pipeline.segment(config, make_items(None), params=params, arch=ARCH, out_dir=out,
                             weights_id="test", progress=False)
  stage = pipeline.Stage(out / "cache", "features", feat_dirs[0].name.split("-", 1)[1])
  for name, mtime in shards.items():
    assert (feat_dirs[0] / name).stat().st_mtime_ns == mtime  # not rewritten
  assert len(stage.shard_files()) == 2 and len(stage) == len(images)
  for item_id in reference.ids:
    np.testing.assert_array_equal(resumed.labels[item_id], reference.labels[item_id])


def test_changed_crf_setting_reuses_features_and_masks(images, params, tmp_path):
  config = tiny_config()
  first = _run(config, images, params, out_dir=tmp_path)
  config.crf.enabled = True
  config.crf.backend = "window"
  second = _run(config, images, params, out_dir=tmp_path)
  for stage in ("features", "masks"):
    assert first.stage_keys[stage] == second.stage_keys[stage]
  for stage in ("refine", "regions"):
    assert first.stage_keys[stage] != second.stage_keys[stage]
  assert len(list((tmp_path / "cache").glob("features-*"))) == 1
  assert len(list((tmp_path / "cache").glob("refine-*"))) == 2


def _write_folder(folder: pathlib.Path, images):
  folder.mkdir(parents=True, exist_ok=True)
  for i, img in enumerate(images):
    Image.fromarray(img).save(folder / f"img{i}.png")


def test_corrupt_and_tiny_images_are_skipped_with_a_warning(images, params, tmp_path):
  folder = tmp_path / "imgs"
  _write_folder(folder, images[:2])
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")
  from lightcluster_jax.data import images as images_lib
  items = pipeline.items_from_paths(images_lib.list_images(folder))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = pipeline.segment(tiny_config(), items, params=params, arch=ARCH, out_dir=None,
                           weights_id="test", progress=False)
  messages = " ".join(str(w.message) for w in caught)
  assert "broken" in messages and "tiny" in messages
  assert sorted(res.skipped) == ["broken", "tiny"]
  assert sorted(res.labels) == ["img0", "img1"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, params):
  path = tmp_path_factory.mktemp("w") / "tiny.npz"
  weights.save(path, ARCH, params)
  return path


def test_cli_segment_then_evaluate(images, tiny_weights, tmp_path, capsys):
  folder = tmp_path / "imgs"
  _write_folder(folder, images)
  gt = tmp_path / "gt"
  gt.mkdir()
  from lightcluster_jax.data import voc
  for i, img in enumerate(images):  # GT: the bright ellipse is class 1
    voc.write_label_png(gt / f"img{i}.png", (img.mean(-1) > 150).astype(np.uint8))
  out = tmp_path / "out"
  rc = cli_main(["segment", "--images", str(folder), "--weights", str(tiny_weights),
                 "--out", str(out), "--no-progress", "--config.features.image_size=64",
                 "--config.assign.num_classes=2", "--config.clustering.num_categories=2",
                 "--config.assign.crop_size=32", "--config.assign.min_region_pixels=16"])
  assert rc == 0
  assert sorted(p.stem for p in (out / "masks").glob("*.png")) == [f"img{i}" for i in range(4)]
  assert len(list((out / "overlays").glob("*.jpg"))) == 4
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_images"] == 4 and summary["weights_sha256"]
  for i, img in enumerate(images):
    assert voc.read_label_png(out / "masks" / f"img{i}.png").shape == img.shape[:2]
  capsys.readouterr()
  rc = cli_main(["evaluate", "--pred", str(out / "masks"), "--gt", str(gt), "--num-classes",
                 "2", "--json"])
  assert rc == 0
  scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(scores) >= {"miou", "pixel_acc", "fg_iou", "per_class"}
  assert 0.0 <= scores["miou"] <= 1.0


def test_cli_errors_name_the_culprit(images, tiny_weights, tmp_path, capsys):
  folder = tmp_path / "imgs"
  _write_folder(folder, images[:1])
  common = ["segment", "--images", str(folder), "--out", str(tmp_path / "o"), "--no-progress"]
  assert cli_main(common + ["--weights", str(tiny_weights), "--config.crf.presett=x"]) == 2
  assert "crf.presett" in capsys.readouterr().err
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"PK\x03\x04 truncated")
  assert cli_main(common + ["--weights", str(bad)]) == 2
  assert "bad.npz" in capsys.readouterr().err
  # evaluate: a prediction without ground truth
  pred = tmp_path / "pred"
  pred.mkdir()
  from lightcluster_jax.data import voc
  voc.write_label_png(pred / "lonely.png", np.zeros((4, 4), np.uint8))
  (tmp_path / "gt").mkdir()
  assert cli_main(["evaluate", "--pred", str(pred), "--gt", str(tmp_path / "gt")]) == 2
  assert "lonely" in capsys.readouterr().err


def test_changed_image_under_the_same_id_is_recomputed(images, params, tmp_path):
  config = tiny_config()
  first = _run(config, images[:2], params, out_dir=tmp_path, ids=["a", "b"])
  changed = [images[0], images[2]]  # "b" now holds another image of another size
  second = _run(config, changed, params, out_dir=tmp_path, ids=["a", "b"])
  assert second.labels["b"].shape == images[2].shape[:2]
  assert first.stage_keys["masks"] != second.stage_keys["masks"]


@pytest.mark.parametrize("crop_batch", [1, 3])
def test_packed_region_crops_equal_per_image_descriptors(params, crop_batch):
  """The regions stage packs the valid crops of many images into fixed ViT batches: each
  image's descriptors equal the ViT on that image's own crops (1e-5), whatever the packing,
  and images without regions are stored too."""
  from lightcluster_jax.runner.cache import Stage
  from lightcluster_jax.stages import regions
  cfg = tiny_config().assign
  cfg.crop_batch = crop_batch
  rng = np.random.RandomState(0)
  hw = [(64, 64), (64, 64), (48, 80), (64, 64)]
  fgs = [np.zeros(s, bool) for s in hw]
  fgs[0][5:30, 5:30] = True                      # one region
  fgs[1][2:20, 2:20] = fgs[1][40:60, 30:60] = True  # two
  fgs[2][10:40, 10:70] = True                    # one (another pixel bucket)
  imgs = [rng.randint(0, 255, s + (3,)).astype(np.uint8) for s in hw]   # fgs[3]: none
  items = [pipeline.Item(f"i{k}", (lambda k=k: imgs[k])) for k in range(4)]
  refine_stage = Stage(None, "refine", "t")
  for it, fg in zip(items, fgs):
    refine_stage.save(it.id, {"fg": fg})
  out = Stage(None, "regions", "t")
  pipeline.run_regions(out, refine_stage, items, params=params, arch=ARCH, cfg=cfg,
                       bucket_pixels=32, progress=False)
  crops_fn = regions.make_crops_fn(
      max_regions=cfg.max_regions, min_region_pixels=cfg.min_region_pixels,
      whole_foreground=False, box_margin=cfg.box_margin, crop_size=cfg.crop_size)
  describe = regions.make_describe_fn(ARCH)
  for it, fg, img in zip(items, fgs, imgs):
    got = out.load(it.id)
    labels, crops, valid = crops_fn(fg[None], img[None], np.array([fg.shape], np.int32))
    np.testing.assert_array_equal(got["valid"], np.asarray(valid[0]))
    np.testing.assert_array_equal(got["regions"], np.asarray(labels[0]))
    want = np.asarray(describe(params, crops[0]))
    np.testing.assert_allclose(got["descriptors"][got["valid"]], want[np.asarray(valid[0])],
                               atol=1e-5)
    assert not got["descriptors"][~got["valid"]].any()
  assert [int(out.load(f"i{k}")["valid"].sum()) for k in range(4)] == [1, 2, 1, 0]
