"""Tests for lightcluster_jax.data: image decoding, VOC / COCO-81 readers, TFDS builders."""

import json
import os
import pathlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lightcluster_jax import data as D
from lightcluster_jax.data import coco as C
from lightcluster_jax.data import images as I
from lightcluster_jax.data import voc as V
from lightcluster_jax.blocks.metrics import COCO81_CLASSES, VOC_PALETTE


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_png16_rgb(path, a):
  """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
  h, w, _ = a.shape
  raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

  def chunk(tag, payload):
    return (struct.pack(">I", len(payload)) + tag + payload
            + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  pathlib.Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                 + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------ images


def test_load_image_modes(tmp_path):
  rgb = _rgb(6, 7)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(I.load_image(tmp_path / "rgb.png"), rgb)

  gray = rgb[..., 0]
  Image.fromarray(gray).save(tmp_path / "gray.png")
  out = I.load_image(tmp_path / "gray.png")
  assert out.shape == (6, 7, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

  # RGBA: composited over white, out = a * rgb + (1 - a) * 255.
  alpha = np.array([0, 128, 255, 0, 128, 255, 64], np.uint8)[None, :].repeat(6, 0)
  Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
  want = np.rint(rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0))
  np.testing.assert_array_equal(I.load_image(tmp_path / "rgba.png"), want.astype(np.uint8))

  # Palette image -> its colours.
  idx = np.random.default_rng(1).integers(0, 4, (5, 5)).astype(np.uint8)
  pal = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [1, 2, 3]], np.uint8)
  p = Image.frombytes("P", (5, 5), idx.tobytes())
  p.putpalette(pal.ravel().tolist())
  p.save(tmp_path / "pal.png")
  np.testing.assert_array_equal(I.load_image(tmp_path / "pal.png"), pal[idx])

  # 16-bit gray: scaled by 255/65535 (Pillow's convert("L") would clip to 255).
  g16 = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)
  Image.fromarray(g16).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  np.testing.assert_array_equal(I.load_image(tmp_path / "g16.png")[..., 0], [[0, 100, 255, 4]])

  # 16-bit RGB: the high byte.
  c16 = np.array([[[0, 257 * 100, 65535], [65535, 0, 300]]], np.uint16)
  _write_png16_rgb(tmp_path / "c16.png", c16)
  np.testing.assert_array_equal(I.load_image(tmp_path / "c16.png"), [[[0, 100, 255], [255, 0, 1]]])

  # Lossless webp and bmp round-trip exactly.
  Image.fromarray(rgb).save(tmp_path / "x.webp", lossless=True)
  np.testing.assert_array_equal(I.load_image(tmp_path / "x.webp"), rgb)
  Image.fromarray(rgb).save(tmp_path / "x.bmp")
  np.testing.assert_array_equal(I.load_image(tmp_path / "x.bmp"), rgb)


@pytest.mark.parametrize("orientation,rot_k", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_applied(tmp_path, orientation, rot_k):
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = (250, 0, 0)
  img[:5, 20:] = (0, 0, 250)
  im = Image.fromarray(img)
  exif = im.getexif()
  exif[0x0112] = orientation
  path = tmp_path / "phone.jpg"
  im.save(path, exif=exif.tobytes(), quality=95)
  raw = np.asarray(Image.open(path).convert("RGB"))  # stored pixels, orientation not applied
  # EXIF 6 = display rotated 90 deg clockwise, 8 = counter-clockwise, 3 = 180 deg.
  np.testing.assert_array_equal(I.load_image(path), np.rot90(raw, rot_k))


def test_corrupt_files_are_skipped_with_a_warning_naming_them(tmp_path):
  good = _rgb(32, 32)
  Image.fromarray(good).save(tmp_path / "a_good.png")
  Image.fromarray(good).save(tmp_path / "full.jpg", quality=90)
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
  (tmp_path / "full.jpg").unlink()
  (tmp_path / "c_garbage.png").write_bytes(b"this is not a png" * 10)
  (tmp_path / "d_empty.webp").write_bytes(b"")
  Image.fromarray(good).save(tmp_path / "e_good.JPG")
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "._e_good.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork

  paths = I.list_images(tmp_path)
  assert [p.name for p in paths] == ["a_good.png", "b_truncated.jpg", "c_garbage.png",
                                     "d_empty.webp", "e_good.JPG"]
  with pytest.warns(UserWarning) as record:
    out = list(I.iter_images(tmp_path))
  assert [i for i, _ in out] == ["a_good", "e_good"]
  messages = " ".join(str(w.message) for w in record)
  for name in ("b_truncated.jpg", "c_garbage.png", "d_empty.webp"):
    assert name in messages
  assert len(record) == 3

  with pytest.raises(I.ImageError, match="b_truncated.jpg") as err:
    list(I.iter_images(paths, on_error="raise"))
  assert err.value.path.endswith("b_truncated.jpg")
  with pytest.raises(I.ImageError, match="c_garbage.png.*not a recognised image"):
    I.load_image(tmp_path / "c_garbage.png")
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    I.load_image(tmp_path / "nope.jpg")
  with pytest.raises(FileNotFoundError, match="missing_folder"):
    I.list_images(tmp_path / "missing_folder")


def test_image_smaller_than_a_patch(tmp_path):
  Image.fromarray(_rgb(10, 40)).save(tmp_path / "thin.png")
  Image.fromarray(_rgb(14, 14)).save(tmp_path / "ok.png")
  with pytest.raises(I.ImageError, match=r"thin.png: image is 10x40 .*smaller than one 14x14 patch"):
    I.check_min_size(I.load_image(tmp_path / "thin.png"), 14, tmp_path / "thin.png")
  I.check_min_size(np.zeros((14, 14, 3)), 14)
  with pytest.warns(UserWarning, match="thin.png"):
    out = list(I.iter_images(tmp_path, min_hw=14))
  assert [i for i, _ in out] == ["ok"]


def test_duplicate_stems_are_rejected(tmp_path):
  Image.fromarray(_rgb(4, 4)).save(tmp_path / "x.png")
  Image.fromarray(_rgb(4, 4)).save(tmp_path / "x.jpg")
  with pytest.raises(ValueError, match="share the id 'x'"):
    list(I.iter_images(tmp_path))


def test_sample_images_shipped():
  paths = D.sample_images()
  assert [p.name for p in paths] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
  provenance = (paths[0].parent / "PROVENANCE.txt").read_text()
  assert sum(p.stat().st_size for p in paths) < 400_000
  for p in paths:
    img = I.load_image(p)
    assert img.dtype == np.uint8 and 300 <= min(img.shape[:2]) <= 480
    assert p.name in provenance
  assert "public domain" in provenance and "CC0" in provenance


# ------------------------------------------------------------------------------ VOC


def test_voc_shared_assets(assets, voc_ids):
  ds = V.VOCSegmentation(assets / "voc2012", split="val")
  assert len(ds) == 1449 and ds.ids_with_images() == voc_ids and len(voc_ids) == 9
  allowed = set(range(21)) | {255}
  for image_id in voc_ids:
    ex = ds[image_id]
    assert ex["id"] == image_id
    assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[2] == 3
    assert ex["label"].dtype == np.uint8 and ex["label"].shape == ex["image"].shape[:2]
    values = set(np.unique(ex["label"]).tolist())
    assert values <= allowed and len(values - {0, 255}) >= 1
    # Palette indices, not colours: mapping through the VOC palette gives Pillow's RGB.
    rgb = np.asarray(Image.open(ds.label_path(image_id)).convert("RGB"))
    np.testing.assert_array_equal(VOC_PALETTE[ex["label"]], rgb)
  sub = ds.subset(voc_ids)
  assert len(sub) == 9 and sub[0]["id"] == voc_ids[0]


def _make_voc(root, ids, missing_image=(), missing_label=(), sizes=None):
  """A tiny VOCdevkit/VOC2012 with random images and labels; returns {id: (image, label)}."""
  base = root / "VOCdevkit" / "VOC2012"
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (base / sub).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  made = {}
  for n, image_id in enumerate(ids):
    h, w = sizes[n] if sizes else (20 + 3 * n, 30 - 2 * n)
    img = _rgb(h, w, seed=n)
    lab = rng.choice(np.array([0, 3, 15, 255], np.uint8), size=(h, w))
    if image_id not in missing_image:
      Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.png")  # lossless
    if image_id not in missing_label:
      V.write_label_png(base / "SegmentationClass" / f"{image_id}.png", lab)
    made[image_id] = (img, lab)
  (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
  return base, made


def test_voc_synthetic_reader_and_errors(tmp_path):
  ids = ["2000_000001", "2000_000002", "2000_000003", "2000_000004"]
  base, made = _make_voc(tmp_path, ids, missing_image={"2000_000003"},
                         missing_label={"2000_000004"})
  for root in (tmp_path, tmp_path / "VOCdevkit", base):
    assert V.VOCSegmentation(root).root == base
  ds = V.VOCSegmentation(tmp_path)
  assert ds.ids == ids and ds.ids_with_images() == ["2000_000001", "2000_000002", "2000_000004"]
  ex = ds[1]
  np.testing.assert_array_equal(ex["image"], made["2000_000002"][0])
  np.testing.assert_array_equal(ex["label"], made["2000_000002"][1])
  with pytest.raises(FileNotFoundError, match=r"2000_000004.*SegmentationClass/2000_000004.png"):
    ds.load_label("2000_000004")
  with pytest.raises(FileNotFoundError, match="2000_000003"):
    ds["2000_000003"]
  with pytest.raises(KeyError, match="1999"):
    ds["1999_000001"]
  with pytest.raises(FileNotFoundError, match="train.txt"):
    V.VOCSegmentation(tmp_path, split="train")
  with pytest.raises(FileNotFoundError, match="no VOC2012 folder"):
    V.VOCSegmentation(tmp_path / "elsewhere")


def test_label_png_roundtrip_atomic_and_rgb_fallback(tmp_path):
  lab = np.random.default_rng(3).choice(np.array([0, 1, 7, 20, 255], np.uint8), (9, 13))
  path = V.write_label_png(tmp_path / "out" / "x.png", lab)
  assert os.listdir(tmp_path / "out") == ["x.png"]  # no temporary file left behind
  with Image.open(path) as im:
    assert im.mode == "P"
    assert np.array_equal(np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)[:256], VOC_PALETTE)
  np.testing.assert_array_equal(V.read_label_png(path), lab)
  # A label saved as RGB colours maps back through the palette.
  Image.fromarray(VOC_PALETTE[lab]).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(V.read_label_png(tmp_path / "rgb.png"), lab)
  bad = VOC_PALETTE[lab].copy()
  bad[0, 0] = (1, 2, 3)
  Image.fromarray(bad).save(tmp_path / "bad.png")
  with pytest.raises(ValueError, match=r"bad.png.*\[1, 2, 3\].*not in the VOC palette"):
    V.read_label_png(tmp_path / "bad.png")
  with pytest.raises(ValueError, match="must be in 0..255"):
    V.write_label_png(tmp_path / "y.png", np.array([[0, 300]]))
  with pytest.raises(FileNotFoundError, match="missing.png"):
    V.read_label_png(tmp_path / "missing.png")


# ------------------------------------------------------------------------------ COCO

# pycocotools.mask.encode of a 40x30 mask with [10:25, 5:20] and [30:38, 22:28] set.
_RLE_STRING = "b6?i0000000000000000000000000000T3ISM000000000b1"


def _rle_reference_mask():
  m = np.zeros((40, 30), bool)
  m[10:25, 5:20] = True
  m[30:38, 22:28] = True
  return m


def _uncompressed_rle(mask):
  flat = mask.T.ravel().astype(np.int8)  # column-major
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0] + runs
  return {"size": list(mask.shape), "counts": runs}


def _make_coco(root):
  (root / "val2017").mkdir(parents=True)
  (root / "annotations").mkdir()
  images = [dict(id=139, file_name="000000000139.jpg", height=40, width=30),
            dict(id=285, file_name="000000000285.jpg", height=24, width=32),
            dict(id=632, file_name="000000000632.jpg", height=16, width=16)]
  for n, im in enumerate(images):
    Image.fromarray(_rgb(im["height"], im["width"], seed=n)).save(root / "val2017" / im["file_name"])
  crowd = np.zeros((40, 30), bool)
  crowd[0:8, 0:30] = True
  anns = [
      # image 139: big "dining table" box, a "cup" polygon on top, a crowd strip of people,
      # and a compressed-RLE "dog".
      dict(id=1, image_id=139, category_id=67, iscrowd=0,
           segmentation=[[2, 2, 28, 2, 28, 36, 2, 36]]),
      dict(id=2, image_id=139, category_id=47, iscrowd=0, segmentation=[[10, 10, 16, 10, 16, 18, 10, 18]]),
      dict(id=3, image_id=139, category_id=1, iscrowd=1, segmentation=_uncompressed_rle(crowd)),
      dict(id=4, image_id=139, category_id=18, iscrowd=0,
           segmentation={"size": [40, 30], "counts": _RLE_STRING}),
      # image 285: a car made of two polygons.
      dict(id=5, image_id=285, category_id=3, iscrowd=0,
           segmentation=[[0, 0, 8, 0, 8, 8, 0, 8], [20, 10, 30, 10, 30, 20, 20, 20]]),
      # image 632: no annotations -> all background.
  ]
  cats = [dict(id=c, name=COCO81_CLASSES[C.CATEGORY_TO_LABEL[c]]) for c in (1, 3, 18, 47, 67)]
  (root / "annotations" / "instances_val2017.json").write_text(
      json.dumps(dict(images=images, annotations=anns, categories=cats)))
  return root


def test_coco_rle_decoding():
  ref = _rle_reference_mask()
  np.testing.assert_array_equal(C.rle_mask({"size": [40, 30], "counts": _RLE_STRING}), ref)
  np.testing.assert_array_equal(C.rle_mask(_uncompressed_rle(ref)), ref)
  with pytest.raises(ValueError, match="sum to"):
    C.rle_mask({"size": [4, 4], "counts": [3, 2]})


def test_coco_polygon_box_covers_its_area():
  m = C.polygon_mask([2, 3, 12, 3, 12, 9, 2, 9], 16, 16)
  want = np.zeros((16, 16), bool)
  want[3:9, 2:12] = True
  np.testing.assert_array_equal(m, want)
  # Half-pixel box: centres on the left/top edge out, right/bottom in (pycocotools' rule).
  m = C.polygon_mask([3.5, 3.5, 10.5, 3.5, 10.5, 10.5, 3.5, 10.5], 16, 16)
  want = np.zeros((16, 16), bool)
  want[4:11, 4:11] = True
  np.testing.assert_array_equal(m, want)


@pytest.mark.oracle
def test_coco_masks_against_pycocotools():
  mu = pytest.importorskip("pycocotools.mask")
  rng = np.random.default_rng(0)
  ious = []
  for _ in range(100):
    n = rng.integers(4, 12)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(8, 30) * rng.uniform(0.5, 1.0, n)
    poly = np.stack([50 + rad * np.cos(ang), 45 + rad * np.sin(ang)], 1).ravel().tolist()
    ref = mu.decode(mu.frPyObjects([poly], 90, 100))[..., 0].astype(bool)
    ours = C.polygon_mask(poly, 90, 100)
    ious.append((ref & ours).sum() / (ref | ours).sum())
  assert np.mean(ious) > 0.97 and np.min(ious) > 0.85
  m = np.random.default_rng(1).random((23, 31)) < 0.4
  rle = mu.encode(np.asfortranarray(m.astype(np.uint8)))
  np.testing.assert_array_equal(C.rle_mask({"size": rle["size"], "counts": rle["counts"].decode()}), m)


def test_coco_semantic_reader(tmp_path):
  root = _make_coco(tmp_path / "coco")
  ds = C.COCOSemantic(root)
  assert ds.ids == ["000000000139", "000000000285", "000000000632"]
  assert ds.ids_with_images() == ds.ids
  lab = ds.load_label("000000000139")
  table, cup, dog, person = (C.CATEGORY_TO_LABEL[c] for c in (67, 47, 18, 1))
  assert COCO81_CLASSES[dog] == "dog" and COCO81_CLASSES[cup] == "cup"
  assert (table, cup, dog, person) == (61, 42, 17, 1)
  # The cup (small) is painted over the table (large).
  assert (lab[10:18, 10:16] == cup).all()
  # The dog RLE [10:25, 5:20] is smaller than the table, so wins where they overlap.
  dog_mask = _rle_reference_mask()
  assert (lab[dog_mask & ~C.polygon_mask([10, 10, 16, 10, 16, 18, 10, 18], 40, 30)] == dog).all()
  # Crowd strip rows 0..7: ignored where nothing else was painted, kept under the table.
  assert (lab[0:2, :] == 255).all()
  assert (lab[2:8, 2:28] == table).all()
  assert person not in lab
  ex = ds[1]
  assert ex["image"].shape == (24, 32, 3)
  assert set(np.unique(ex["label"]).tolist()) == {0, C.CATEGORY_TO_LABEL[3]}
  assert (ex["label"][0:8, 0:8] == 3).all() and (ex["label"][10:20, 20:30] == 3).all()
  assert (ds["000000000632"]["label"] == 0).all()


def test_coco_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
    C.COCOSemantic(tmp_path)
  root = _make_coco(tmp_path / "coco")
  ann_file = root / "annotations" / "instances_val2017.json"
  data = json.loads(ann_file.read_text())
  data["annotations"].append(dict(id=9, image_id=285, category_id=12, iscrowd=0,
                                  segmentation=[[0, 0, 2, 0, 2, 2]]))
  ann_file.write_text(json.dumps(data))
  ds = C.COCOSemantic(root)
  with pytest.raises(ValueError, match="category id 12"):
    ds.load_label("000000000285")
  (root / "val2017" / "000000000632.jpg").unlink()
  assert ds.ids_with_images() == ["000000000139", "000000000285"]
  with pytest.raises(FileNotFoundError, match="000000000632.jpg"):
    ds["000000000632"]


# ------------------------------------------------------------------------------ TFDS


@pytest.fixture(scope="module")
def tfds():
  try:
    import tensorflow_datasets
  except Exception as e:  # ImportError, or a broken optional install
    pytest.skip(f"tensorflow_datasets not importable ({type(e).__name__}: {e}); "
                "install the [tfds] extra")
  return tensorflow_datasets


def test_tfds_voc_builder_roundtrip(tfds, tmp_path):
  from lightcluster_jax.data import tfds_builders

  ids = ["2000_000001", "2000_000002", "2000_000003"]
  _make_voc(tmp_path / "manual", ids, missing_image={"2000_000003"})
  with pytest.warns(UserWarning, match="1 listed images are missing"):
    builder = tfds_builders.prepare("voc2012_segmentation", manual_dir=tmp_path / "manual",
                                    data_dir=tmp_path / "tfds")
  assert builder.info.splits["val"].num_examples == 2
  source = tfds.data_source("voc2012_segmentation", data_dir=tmp_path / "tfds")["val"]
  direct = V.VOCSegmentation(tmp_path / "manual")
  got = {}
  for i in range(len(source)):
    ex = source[i]
    got[ex["id"].decode()] = ex
  assert sorted(got) == ids[:2]
  for image_id, ex in got.items():
    ref = direct[image_id]
    assert ex["image"].dtype == np.uint8 and ex["label"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["label"], ref["label"])


def test_tfds_coco_builder_roundtrip(tfds, tmp_path):
  from lightcluster_jax.data import tfds_builders

  root = _make_coco(tmp_path / "coco")
  builder = tfds_builders.prepare("coco81_semantic", manual_dir=root, data_dir=tmp_path / "tfds")
  source = builder.as_data_source()["val2017"]
  direct = C.COCOSemantic(root)
  assert len(source) == 3
  for i in range(3):
    ex = source[i]
    ref = direct[ex["id"].decode()]
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["label"], ref["label"])


def test_tfds_unknown_name_and_missing_manual_dir(tfds, tmp_path):
  from lightcluster_jax.data import tfds_builders

  with pytest.raises(ValueError, match="unknown dataset"):
    tfds_builders.prepare("voc", manual_dir=tmp_path, data_dir=tmp_path / "t")
  with pytest.raises(Exception, match="manual|Manual"):
    tfds_builders.prepare("voc2012_segmentation", manual_dir=tmp_path / "absent",
                          data_dir=tmp_path / "t")
