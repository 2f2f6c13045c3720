"""Datasets at scale: TFDS input, sharded caches and label outputs, a remote (gs://) path.

The tiny pipeline of test_pipeline.py (2-block random ViT, synthetic scenes, CRF off) runs on
5 images stored three ways: a folder of PNGs, the same folder prepared as the TFDS dataset
`voc2012_segmentation` by our builder (ArrayRecord), and a fake `gs://` bucket (an in-memory
fsspec filesystem registered under the gs scheme: no network). Every source must give the
same masks and labels, and every cache stage must be a few shard files, not one per image.
(That two hosts each read only their share is checked by the 2-process run in
test_sharding.py.)
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from lightcluster_jax import pipeline, vit
from lightcluster_jax.apps import evaluate, outputs
from lightcluster_jax.apps.cli import main as cli_main
from lightcluster_jax.data import images as images_lib
from lightcluster_jax.data import shards, sources, voc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_pipeline import ARCH, _synthetic, tiny_config, tiny_weights  # noqa: E402,F401

tfds_builders = pytest.importorskip("lightcluster_jax.data.tfds_builders")

SIZES = [(96, 128), (96, 128), (112, 80), (80, 96), (64, 64)]
IDS = [f"2008_{n:06d}" for n in range(len(SIZES))]


@pytest.fixture(scope="module")
def params():
  return vit.init_params(ARCH, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
  """A VOC-like folder: PNG scenes in JPEGImages/, the bright ellipse as class 15."""
  base = tmp_path_factory.mktemp("voc") / "VOC2012"
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (base / sub).mkdir(parents=True)
  for n, (image_id, hw) in enumerate(zip(IDS, SIZES)):
    img = _synthetic(*hw, seed=n)
    Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.png")
    voc.write_label_png(base / "SegmentationClass" / f"{image_id}.png",
                        np.where(img.mean(-1) > 150, 15, 0).astype(np.uint8))
  (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(IDS) + "\n")
  return base


@pytest.fixture(scope="module")
def tfds_dir(voc_root, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_builders.prepare("voc2012_segmentation", manual_dir=voc_root, data_dir=data_dir)
  return data_dir


@pytest.fixture(scope="module")
def folder_run(voc_root, params, tmp_path_factory):
  """The folder run, cached on disk (the reference of the other sources)."""
  out = tmp_path_factory.mktemp("folder_run")
  items = pipeline.items_from_paths(images_lib.list_images(voc_root / "JPEGImages"))
  res = pipeline.segment(tiny_config(), items, params=params, arch=ARCH, out_dir=out,
                         weights_id="test", progress=False)
  return res, out


@pytest.fixture
def fake_gcs():
  """gs:// served from memory (fsspec MemoryFileSystem under the gs scheme)."""
  import fsspec
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      for scheme in ("gs://", "gcs://"):
        if path.startswith(scheme):
          path = path[len(scheme):]
      return "/" + path.strip("/")   # no trailing "/" (else glob finds nothing)

  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  for scheme in FakeGCS.protocol:
    fsspec.register_implementation(scheme, FakeGCS, clobber=True)
  return FakeGCS


def _assert_same_run(a, b):
  assert sorted(a.ids) == sorted(b.ids)
  for i in a.ids:
    for field in ("image", "dataset", "consistent", "prob"):
      np.testing.assert_array_equal(a.artefacts("masks", i)[field],
                                    b.artefacts("masks", i)[field], err_msg=f"{i} {field}")
    np.testing.assert_array_equal(a.labels[i], b.labels[i], err_msg=i)


def test_tfds_source_reads_the_builders_dataset(tfds_dir, voc_root):
  src = sources.TfdsSource("voc2012_segmentation", "val", data_dir=tfds_dir)
  assert sorted(src.ids) == IDS and src.has_labels
  folder = sources.FolderSource(images_lib.list_images(voc_root / "JPEGImages"))
  for n, image_id in enumerate(src.ids):
    np.testing.assert_array_equal(src.image(n), folder.image(folder.ids.index(image_id)))
    assert src.label(n).shape == src.image(n).shape[:2]
  with pytest.raises(ValueError, match="no_such_dataset"):
    sources.TfdsSource("no_such_dataset", "val", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="NAME:SPLIT"):
    sources.parse_tfds_spec("voc2012_segmentation")


def test_tfds_input_gives_the_same_masks_and_labels_as_the_folder(folder_run, tfds_dir, params):
  ref, _ = folder_run
  items = pipeline.items_from_source(
      sources.TfdsSource("voc2012_segmentation", "val", data_dir=tfds_dir))
  assert [it.id for it in items] == IDS   # id order, not TFDS's shuffled storage order
  got = pipeline.segment(tiny_config(), items, params=params, arch=ARCH, out_dir=None,
                         weights_id="test", progress=False)
  _assert_same_run(got, ref)


def test_cache_stages_are_a_few_shards_not_a_file_per_image(folder_run):
  _, out = folder_run
  for stage_dir in sorted((out / "cache").iterdir()):
    names = sorted(p.name for p in stage_dir.iterdir())
    assert not any(n.endswith(".npz") for n in names), names
    shard_files = [n for n in names if n.endswith(".array_record")]
    assert len(shard_files) == 1, (stage_dir.name, names)  # 5 images: one shard per stage
    assert sum(n.endswith(".index.json") for n in names) == 1


def test_shard_store_round_trip_resume_and_limits(tmp_path):
  store = shards.ShardStore(tmp_path / "s", shard_records=3)
  arrays = {f"x{n}": {"a": np.arange(n + 1), "fingerprint": np.str_(f"fp{n}")}
            for n in range(7)}
  for k, v in arrays.items():
    store.save(k, v)
  assert len(store.shard_files()) == 2            # 3 + 3 written, 1 buffered
  assert store.has("x6") and store.load("x6")["a"].tolist() == list(range(7))
  fresh = shards.ShardStore(tmp_path / "s")      # a new process: only finished shards count
  assert len(fresh) == 6 and not fresh.has("x6")
  store.flush()
  fresh = shards.ShardStore(tmp_path / "s")
  assert len(fresh) == 7 and fresh.has("x2", "fp2") and not fresh.has("x2", "other")
  for k, v in arrays.items():
    np.testing.assert_array_equal(fresh.load_fields(k, ("a",))["a"], v["a"])
  # A shard without its index (killed between the two writes) is ignored.
  (tmp_path / "s" / "shard-p000-0-9999.array_record").write_bytes(b"half")
  assert len(shards.ShardStore(tmp_path / "s")) == 7
  # Byte limit: a big record flushes at once.
  big = shards.ShardStore(tmp_path / "b", shard_bytes=1000)
  big.save("big", {"a": np.zeros(1000)})
  assert len(big.shard_files()) == 1
  with pytest.raises(KeyError, match="nope"):
    fresh.load("nope")


def test_remote_paths_run_resume_and_write_label_shards(fake_gcs, folder_run, voc_root,
                                                        params):
  from etils import epath
  ref, _ = folder_run
  bucket = epath.Path("gs://bucket")
  (bucket / "images").mkdir(parents=True, exist_ok=True)
  for p in images_lib.list_images(voc_root / "JPEGImages"):
    (bucket / "images" / p.name).write_bytes(p.read_bytes())
  paths = images_lib.list_images("gs://bucket/images")
  assert [p.stem for p in paths] == IDS
  items = pipeline.items_from_paths(paths)
  config = tiny_config()
  res = pipeline.segment(config, items, params=params, arch=ARCH, out_dir="gs://bucket/run",
                         weights_id="test", progress=False)
  _assert_same_run(res, ref)
  stage_dirs = sorted((bucket / "run" / "cache").iterdir())
  assert [d.name.split("-")[0] for d in stage_dirs] == ["features", "masks", "refine",
                                                         "regions"]
  shard_files = {d.name: sorted(x.name for x in d.glob("shard-*.array_record"))
                 for d in stage_dirs}
  assert all(len(v) == 1 for v in shard_files.values()), shard_files
  # Resume: everything cached, nothing rewritten.
  again = pipeline.segment(config, items, params=params, arch=ARCH,
                           out_dir="gs://bucket/run", weights_id="test", progress=False)
  assert {d.name: sorted(x.name for x in d.glob("shard-*.array_record"))
          for d in stage_dirs} == shard_files
  _assert_same_run(again, ref)
  # Label maps as ArrayRecord shards on gs://, read back by id (ours and Grain).
  outputs.write_outputs(again, items, "gs://bucket/run", config=config, weights_id="test",
                        overlays=False, progress=False, format="array_record")
  labels = outputs.open_labels("gs://bucket/run")
  assert sorted(labels) == IDS
  for i in IDS:
    np.testing.assert_array_equal(labels[i], ref.labels[i])
  summary = json.loads((bucket / "run" / "summary.json").read_text())
  assert summary["num_images"] == len(IDS)


def test_cli_segments_a_tfds_split_and_evaluates_against_it(tfds_dir, voc_root, tiny_weights,
                                                            tmp_path, capsys):
  out = tmp_path / "out"
  common = ["--weights", str(tiny_weights), "--no-progress",
            "--config.features.image_size=64", "--config.assign.num_classes=2",
            "--config.clustering.num_categories=2", "--config.assign.crop_size=32",
            "--config.assign.min_region_pixels=16", "--config.crf.enabled=False"]
  rc = cli_main(["segment", "--tfds", "voc2012_segmentation:val", "--data-dir", str(tfds_dir),
                 "--out", str(out), "--config.output.format=array_record", *common])
  assert rc == 0, capsys.readouterr().err
  assert not (out / "masks").exists() and len(list((out / "labels").glob("*.array_record"))) == 1
  capsys.readouterr()
  rc = cli_main(["evaluate", "--pred", str(out), "--gt-tfds", "voc2012_segmentation:val",
                 "--data-dir", str(tfds_dir), "--json"])
  assert rc == 0
  from_tfds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert from_tfds["num_images"] == len(IDS)
  # The same scores against the GT PNG folder.
  from_folder = evaluate.evaluate_folders(out, voc_root / "SegmentationClass")
  assert from_folder["miou"] == pytest.approx(from_tfds["miou"])
  assert from_folder["fg_iou"] == pytest.approx(from_tfds["fg_iou"])
  # Bad input names the culprit.
  assert cli_main(["segment", "--tfds", "voc2012_segmentation", "--out", str(out), *common]) == 2
  assert "NAME:SPLIT" in capsys.readouterr().err
  assert cli_main(["segment", "--tfds", "voc2012_segmentation:val", "--images", str(voc_root),
                   "--out", str(out), *common]) == 2
  assert "exactly one of --images and --tfds" in capsys.readouterr().err
  assert cli_main(["segment", "--tfds", "nope:val", "--data-dir", str(tfds_dir), "--out",
                   str(out), *common]) == 2
  assert "nope" in capsys.readouterr().err
