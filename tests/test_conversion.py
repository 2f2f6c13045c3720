"""Checkpoint conversion: layouts, errors, the converted-.npz format, `lightcluster convert`.

Oracles: the official-name state dict of the PyTorch reference (random weights) mapped
directly; Hugging Face and timm layouts are produced here by independent inverse mappings
written in this file; parity of the converted model is checked by `convert.verify` (PyTorch
reference running the recorded position-embedding rule, tolerance 1e-4). The position-embedding
rule recorded for each layout (official -> "official", Hugging Face -> "size", timm ->
"timm") and its round trip through the file format, including files of format /1 that
recorded none, are checked here. The real DINOv2-S/14 weights in ../shared/assets are
converted, verified, and their Keys are checked to separate foreground from background on the
9 VOC images.
"""

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

from lightcluster_jax import cli, vit, weights
from lightcluster_jax.weights import keymap

torch = pytest.importorskip("torch")

from checkpoints_conversion import convert  # noqa: E402
from checkpoints_conversion import torch_reference as tref  # noqa: E402


def _sd(arch, depth=2, seed=0, **kw):
  cfg = vit.get_config(arch, depth=depth)
  return cfg, tref.random_state_dict(cfg, seed, **kw)


def _assert_same_params(a, b):
  fa, fb = vit.flatten_params(a), vit.flatten_params(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _to_hf(sd, cfg):
  """Official names -> Hugging Face ViTModel (DINO) / Dinov2Model names (test-side inverse)."""
  d = cfg.width
  hf = {"embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
  if cfg.num_registers:
    hf["embeddings.register_tokens"] = sd["register_tokens"]
  v2 = cfg.family == "dinov2"
  if v2:
    hf["embeddings.mask_token"] = np.zeros((1, d), np.float32)
  else:
    hf["pooler.dense.weight"] = np.zeros((d, d), np.float32)
    hf["pooler.dense.bias"] = np.zeros((d,), np.float32)
  for i in range(cfg.depth):
    o, h = f"blocks.{i}.", f"encoder.layer.{i}."
    for t in ("weight", "bias"):
      qkv = sd[o + "attn.qkv." + t]
      for j, name in enumerate(("query", "key", "value")):
        hf[h + f"attention.attention.{name}.{t}"] = qkv[j * d:(j + 1) * d]
      hf[h + "attention.output.dense." + t] = sd[o + "attn.proj." + t]
      if v2:
        hf[h + "norm1." + t] = sd[o + "norm1." + t]
        hf[h + "norm2." + t] = sd[o + "norm2." + t]
        hf[h + "mlp.fc1." + t] = sd[o + "mlp.fc1." + t]
        hf[h + "mlp.fc2." + t] = sd[o + "mlp.fc2." + t]
      else:
        hf[h + "layernorm_before." + t] = sd[o + "norm1." + t]
        hf[h + "layernorm_after." + t] = sd[o + "norm2." + t]
        hf[h + "intermediate.dense." + t] = sd[o + "mlp.fc1." + t]
        hf[h + "output.dense." + t] = sd[o + "mlp.fc2." + t]
    if v2:
      hf[h + "layer_scale1.lambda1"] = sd[o + "ls1.gamma"]
      hf[h + "layer_scale2.lambda1"] = sd[o + "ls2.gamma"]
  return {k: np.ascontiguousarray(v) for k, v in hf.items()}


def _to_timm(sd):
  """Official DINOv2 register-model names -> timm's layout (as timm's `_convert_dinov2`: no
  mask_token, `reg_token`, CLS position folded into `cls_token`, pos_embed without it)."""
  out = {k: v for k, v in sd.items()
         if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
  out["reg_token"] = sd["register_tokens"]
  out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
  out["pos_embed"] = sd["pos_embed"][:, 1:]
  return out


def test_each_layout_records_the_rule_of_its_code():
  x = np.random.default_rng(0).standard_normal((1, 14 * 9, 14 * 41, 3)).astype(np.float32)
  for arch in ("dino_vits16", "dinov2_vits14_reg"):
    cfg, sd = _sd(arch, depth=1)
    got = {}
    layouts = [("official", sd), ("hf", _to_hf(sd, cfg))]
    if cfg.num_registers:  # timm's DINO / DINOv2 files carry the official names
      layouts.append(("timm", _to_timm(sd)))
    for name, raw in layouts:
      c, params, report = keymap.to_flax(raw, cfg)
      got[name] = (c, params)
      assert report["pos_interpolation"] == c.pos_interpolation
      assert dataclasses.replace(c, pos_interpolation=cfg.pos_interpolation) == cfg
    assert got["official"][0].pos_interpolation == "official"
    assert got["hf"][0].pos_interpolation == "size"
    _assert_same_params(got["hf"][1], got["official"][1])
    # An explicit rule wins over the layout's.
    assert keymap.to_flax(_to_hf(sd, cfg), cfg, pos_interpolation="timm")[0].pos_interpolation \
        == "timm"
    if "timm" in got:
      c, params = got["timm"]
      assert c.pos_interpolation == "timm"
      assert keymap.layout(_to_timm(sd)) == "timm" and keymap.layout(sd) == "official"
      np.testing.assert_array_equal(params["register_tokens"], sd["register_tokens"])
      assert np.all(params["pos_embed"][:, 0] == 0)  # CLS position lives in cls_token
      # Same features as the official-layout weights run by the same rule.
      a = vit.apply(params, x, arch=c)
      b = vit.apply(got["official"][1], x, arch=got["official"][0], pos_interpolation="timm")
      for k in ("keys", "cls"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(vit.ARCHS))
def test_mapping_roundtrip_every_variant(arch):
  cfg, sd = _sd(arch)
  cfg2, params, report = keymap.to_flax(sd, cfg)
  assert cfg2 == cfg and report["layout"] == "official"
  vit.validate_params(params, cfg)
  assert params["patch_embed"]["kernel"].shape == (cfg.patch_size, cfg.patch_size, 3, cfg.width)
  back = keymap.flax_to_official(params, cfg)
  assert set(back) == set(sd) - {"mask_token"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


@pytest.mark.parametrize("arch", ["dino_vitb8", "dinov2_vits14_reg"])
def test_converted_model_matches_torch_reference(arch):
  # (test_vit.py checks parity of every variant and every output; this checks the
  # conversion entry point and `convert.verify` itself.)
  cfg, sd = _sd(arch)
  _, params, _ = keymap.to_flax(sd, cfg)
  p = cfg.patch_size
  res = convert.verify(cfg, params, sd, sizes=[(4 * p, 4 * p), (3 * p, 5 * p)], batch=1)
  assert res["ok"], res
  assert res["max_abs_diff_keys"] < 1e-4 and res["max_abs_diff_cls"] < 1e-4


def test_verify_detects_a_wrong_mapping():
  cfg, sd = _sd("dino_vits16", depth=1)
  _, params, _ = keymap.to_flax(sd, cfg)
  kernel = params["blocks_0"]["attn"]["qkv"]["kernel"]
  d = cfg.width
  # Swap the q and k thirds: a classic porting bug the check must catch.
  params["blocks_0"]["attn"]["qkv"]["kernel"] = np.concatenate(
      [kernel[:, d:2 * d], kernel[:, :d], kernel[:, 2 * d:]], axis=1)
  res = convert.verify(cfg, params, sd, sizes=[(32, 32)], batch=1)
  assert not res["ok"] and res["max_abs_diff_keys"] > 1e-2


@pytest.mark.parametrize("arch", ["dino_vits8", "dinov2_vits14_reg"])
def test_huggingface_safetensors_layouts(arch, tmp_path):
  from safetensors.numpy import save_file
  cfg, sd = _sd(arch)
  _, ref, _ = keymap.to_flax(sd, cfg)
  path = tmp_path / "model.safetensors"
  save_file(_to_hf(sd, cfg), str(path))
  got_cfg, params, report = keymap.to_flax(weights.read_checkpoint(path), cfg, source=str(path))
  assert report["layout"] == ("hf_dinov2" if cfg.family == "dinov2" else "hf_dino")
  assert report["ignored_keys"]  # pooler / mask_token are recognised and skipped
  _assert_same_params(params, ref)
  # HF classification checkpoints prefix the backbone with "vit." / "dinov2.".
  pre = "dinov2." if cfg.family == "dinov2" else "vit."
  wrapped = {pre + k: v for k, v in _to_hf(sd, cfg).items()}
  wrapped["classifier.weight"] = np.zeros((10, cfg.width), np.float32)
  _, params2, _ = keymap.to_flax(wrapped, cfg)
  _assert_same_params(params2, ref)


def test_training_checkpoint_wrappers_and_chunked_blocks(tmp_path):
  cfg, sd = _sd("dino_vits16")
  _, ref, _ = keymap.to_flax(sd, cfg)
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  head = {"head.mlp.0.weight": torch.zeros(8, cfg.width), "head.last_layer.weight_g":
          torch.ones(1, 8)}
  full = {"student": {**{"module.backbone." + k: v + 1 for k, v in t.items()},
                      **{"module." + k: v for k, v in head.items()}},
          "teacher": {**{"backbone." + k: v for k, v in t.items()}, **head},
          "epoch": 100}
  path = tmp_path / "full_checkpoint.pth"
  torch.save(full, path)
  arch, params = weights.load_any(path, cfg)
  _assert_same_params(params, ref)  # the teacher is converted by default
  _, student = weights.load_any(path, cfg, checkpoint_key="student")
  np.testing.assert_allclose(student["cls_token"], ref["cls_token"] + 1)
  # DINOv2 training code stores blocks in chunks: blocks.<chunk>.<global index>.
  cfg2, sd2 = _sd("dinov2_vits14", depth=4)
  _, ref2, _ = keymap.to_flax(sd2, cfg2)
  chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}."
                    f"{m.group(1)}.", k): v for k, v in sd2.items()}
  chunked["mask_token"] = np.zeros((1, cfg2.width), np.float32)
  _, params2, rep = keymap.to_flax({"model": chunked}, cfg2)
  _assert_same_params(params2, ref2)
  assert rep["ignored_keys"] == ["mask_token"]


def test_npz_in_official_names_and_roundtrip(tmp_path):
  cfg, sd = _sd("dinov2_vits14")
  src = tmp_path / "official.npz"
  np.savez(src, **sd)
  arch, params = weights.load_any(src, cfg)
  assert arch == cfg  # non-standard depth comes back as the config itself
  out = weights.save(tmp_path / "conv.npz", arch, params, source={"file": "official.npz"})
  assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind
  arch2, params2 = weights.load(out)
  assert arch2 == cfg
  _assert_same_params(params2, params)
  arch3, params3 = weights.load_any(out)
  _assert_same_params(params3, params)
  with np.load(out) as z:
    meta = json.loads(str(z["__meta__"]))
  assert meta["arch"] == "dinov2_vits14" and meta["config"]["depth"] == 2
  key = "params/blocks_0/attn/qkv/kernel"
  assert len(meta["manifest"][key]["sha256"]) == 64


def test_standard_arch_name_is_returned_and_inferred(tmp_path):
  cfg = vit.get_config("dino_vits16")
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32)
        for k, s in keymap.official_shapes(cfg).items()}
  path = tmp_path / "dino.npz"
  np.savez(path, **sd)
  arch, params = weights.load_any(path)  # inferred from shapes
  assert arch == "dino_vits16"
  weights.save(tmp_path / "c.npz", arch, params)
  assert weights.load(tmp_path / "c.npz")[0] == "dino_vits16"


def test_clear_errors(tmp_path):
  cfg, sd = _sd("dino_vits16")
  # Missing and unexpected keys are listed.
  bad = dict(sd)
  del bad["blocks.1.mlp.fc2.bias"]
  bad["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  with pytest.raises(keymap.CheckpointError) as e:
    keymap.to_flax(bad, cfg)
  assert "missing keys (1): blocks.1.mlp.fc2.bias" in str(e.value)
  assert "unexpected keys (1): blocks.0.attn.extra" in str(e.value)
  # Shape mismatch names the expected variant and what the checkpoint looks like.
  sd_b = {k: np.zeros(s, np.float32)
          for k, s in keymap.official_shapes(vit.get_config("dino_vitb16")).items()}
  with pytest.raises(keymap.CheckpointError) as e:
    keymap.to_flax(sd_b, "dino_vits16")
  msg = str(e.value)
  assert "dino_vits16 expects (1152, 384)" in msg and "looks like 'dino_vitb16'" in msg
  # Unknown architecture (a ViT-L/14-like shape set).
  cfg_l = vit.get_config("dinov2_vitb14", width=1024, num_heads=16, depth=24)
  shapes = keymap.official_shapes(cfg_l)
  with pytest.raises(keymap.CheckpointError, match="unknown architecture.*width 1024.*depth 24"):
    keymap.to_flax({k: np.zeros(s, np.float32) for k, s in shapes.items()})
  # Not a ViT checkpoint at all.
  with pytest.raises(keymap.CheckpointError, match="unrecognised checkpoint layout"):
    keymap.to_flax({"conv1.weight": np.zeros((3, 3), np.float32)})


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth", "converted.npz"])
def test_truncated_files_are_reported_with_their_name(tmp_path, suffix):
  cfg, sd = _sd("dino_vits16", depth=1)
  path = tmp_path / ("model" + suffix if suffix.startswith(".") else suffix)
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(sd, str(path))
  elif suffix == ".pth":
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  elif suffix == ".npz":
    np.savez(path, **sd)
  else:
    weights.save(path, cfg, keymap.to_flax(sd, cfg)[1])
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(weights.WeightsError, match=re.escape(str(path))):
    weights.load_any(path, cfg)


def test_corrupted_converted_file_fails_the_manifest_check(tmp_path):
  cfg, sd = _sd("dino_vits16", depth=1)
  params = keymap.to_flax(sd, cfg)[1]
  path = weights.save(tmp_path / "c.npz", cfg, params)
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["params/norm/scale"] = arrays["params/norm/scale"] + 1
  np.savez(path, **arrays)
  with pytest.raises(weights.WeightsError, match="sha256 of params/norm/scale"):
    weights.load(path)
  with pytest.raises(weights.WeightsError, match="no __meta__"):
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    weights.load(tmp_path / "plain.npz")


def test_cli_convert_verify_json_and_exit_status(tmp_path, capsys):
  cfg = vit.get_config("dino_vits16")
  sd = tref.random_state_dict(cfg, 0)
  src = tmp_path / "dino_deitsmall16_pretrain.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)
  out = tmp_path / "out.npz"
  rc = cli.main(["convert", "--arch", "dino_vits16", "--checkpoint", str(src), "--out",
                 str(out), "--verify", "--verify-sizes", "64x64,48x80", "--verify-batch", "1",
                 "--orbax", str(tmp_path / "orbax")])
  lines = capsys.readouterr().out.strip().splitlines()
  res = json.loads(lines[-1])
  assert rc == 0 and res["ok"] and res["arch"] == "dino_vits16"
  assert res["max_abs_diff_keys"] < 1e-4 and res["max_abs_diff_cls"] < 1e-4
  assert weights.load(out)[0] == "dino_vits16"
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore((tmp_path / "orbax").absolute())
  np.testing.assert_array_equal(restored["norm"]["scale"], sd["norm.weight"])
  # An impossible tolerance makes --verify fail with exit status 1.
  rc = cli.main(["convert", "--checkpoint", str(src), "--out", str(out), "--verify",
                 "--verify-sizes", "32x32", "--verify-batch", "1", "--tolerance", "0"])
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 1 and res["ok"] is False
  # Wrong architecture: a clear error and status 2, no output written.
  rc = cli.main(["convert", "--arch", "dino_vitb16", "--checkpoint", str(src), "--out",
                 str(tmp_path / "wrong.npz")])
  err = capsys.readouterr().err
  assert rc == 2 and "dino_vitb16 expects" in err and not (tmp_path / "wrong.npz").exists()


def test_converter_records_the_rule_and_files_round_trip_it(tmp_path, capsys):
  from safetensors.numpy import save_file
  # Official .pth (DINO v1 names) -> "official", a standard config: the name comes back.
  cfg = vit.get_config("dino_vits16")
  sd = tref.random_state_dict(cfg, 0)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "dino.pth")
  assert convert.main(["--checkpoint", str(tmp_path / "dino.pth"),
                       "--out", str(tmp_path / "dino.npz")]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["pos_interpolation"] == "official"
  assert weights.load(tmp_path / "dino.npz")[0] == "dino_vits16"
  # Hugging Face Dinov2Model names -> "size": the config (not the bare name) comes back.
  cfg2 = vit.get_config("dinov2_vits14")
  sd2 = tref.random_state_dict(cfg2, 1)
  save_file(_to_hf(sd2, cfg2), str(tmp_path / "hf.safetensors"))
  assert convert.main(["--checkpoint", str(tmp_path / "hf.safetensors"),
                       "--out", str(tmp_path / "hf.npz")]) == 0
  arch, params = weights.load(tmp_path / "hf.npz")
  assert arch == vit.get_config("dinov2_vits14", pos_interpolation="size")
  assert weights.load_any(tmp_path / "hf.npz", "dinov2_vits14")[0] == arch  # rule from the file
  assert weights.load_any(tmp_path / "hf.safetensors")[0] == arch  # converted on the fly
  assert weights.load(tmp_path / "hf.npz", pos_interpolation="official")[0] == "dinov2_vits14"
  with np.load(tmp_path / "hf.npz") as z:
    meta = json.loads(str(z["__meta__"]))
  assert meta["format"] == weights.FORMAT and meta["config"]["pos_interpolation"] == "size"
  assert meta["source"]["layout"] == "hf_dinov2"
  # timm's register layout -> "timm", verified against the reference running timm's call.
  cfg3 = vit.get_config("dinov2_vits14_reg")
  sd3 = tref.random_state_dict(cfg3, 2)
  save_file(_to_timm(sd3), str(tmp_path / "timm.safetensors"))
  rc = convert.main(["--checkpoint", str(tmp_path / "timm.safetensors"), "--out",
                     str(tmp_path / "timm.npz"), "--verify", "--verify-sizes", "56x70,42x42",
                     "--verify-batch", "1"])
  res = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert rc == 0 and res["ok"] and res["pos_interpolation"] == "timm", res
  assert vit.get_config(weights.load(tmp_path / "timm.npz")[0]).pos_interpolation == "timm"
  # --pos-interpolation names the rule (timm files without registers look official).
  assert convert.main(["--checkpoint", str(tmp_path / "dino.pth"), "--out",
                       str(tmp_path / "dino_timm.npz"), "--pos-interpolation", "timm"]) == 0
  arch, _ = weights.load(tmp_path / "dino_timm.npz")
  assert arch == vit.get_config("dino_vits16", pos_interpolation="timm")


def _rewrite_meta(path, edit):
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(str(arrays["__meta__"]))
  edit(meta)
  arrays["__meta__"] = np.asarray(json.dumps(meta))
  np.savez(path, **arrays)


@pytest.mark.parametrize("layout,rule", [("official", "official"), ("hf_dinov2", "size"),
                                         ("hf_dino", "size"), (None, "official")])
def test_files_of_format_1_without_a_rule_still_load(tmp_path, layout, rule):
  # Format /1 (before the rule was recorded): the rule of the recorded source layout's code;
  # "official" when none is recorded (what the official code of official-name weights does).
  cfg, sd = _sd("dinov2_vits14", depth=1)
  _, params, _ = keymap.to_flax(sd, cfg)
  path = weights.save(tmp_path / "old.npz", cfg, params,
                      source={"layout": layout} if layout else None)

  def to_v1(meta):
    meta["format"] = "lightcluster_jax.vit/1"
    del meta["config"]["pos_interpolation"]
    if layout is None:
      meta["source"] = {}

  _rewrite_meta(path, to_v1)
  arch, loaded = weights.load(path)
  assert arch == dataclasses.replace(cfg, pos_interpolation=rule)
  _assert_same_params(loaded, params)
  assert weights.load_any(path)[0] == arch
  _rewrite_meta(path, lambda m: m.update(format="lightcluster_jax.vit/0"))
  with pytest.raises(weights.WeightsError, match="format 'lightcluster_jax.vit/0'"):
    weights.load(path)


def test_segment_rejects_an_unknown_rule(tmp_path, capsys):
  from PIL import Image
  cfg, sd = _sd("dino_vits16", depth=1)
  path = weights.save(tmp_path / "w.npz", cfg, keymap.to_flax(sd, cfg)[1])
  (tmp_path / "img").mkdir()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "a.png")
  rc = cli.main(["segment", "--images", str(tmp_path / "img"), "--weights", str(path),
                 "--out", str(tmp_path / "out"), "--config.features.pos_interpolation=bicubic"])
  err = capsys.readouterr().err
  assert rc == 2 and "pos_interpolation" in err and "bicubic" in err


# ----------------------------------------------------------------------------------------------
# Real DINOv2-S/14 weights (../shared/assets)


def test_real_dinov2_converts_and_verifies(dinov2_s14_npz, tmp_path, capsys):
  out = tmp_path / "dinov2_vits14.npz"
  rc = convert.main(["--arch", "dinov2_vits14", "--checkpoint", str(dinov2_s14_npz), "--out",
                     str(out), "--verify", "--verify-batch", "1"])
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 0 and res["ok"], res
  assert res["max_abs_diff_keys"] < 1e-4 and res["max_abs_diff_cls"] < 1e-4
  arch, params = weights.load_any(dinov2_s14_npz)
  assert arch == "dinov2_vits14"
  _assert_same_params(weights.load(out)[1], params)


def _voc_fg_iou(assets, ids, arch, params, short_side=448):
  """Image-level k=2 on L2-normalised last-block Keys, border rule, nearest upsampling."""
  from PIL import Image
  from sklearn.cluster import KMeans

  cfg = vit.get_config(arch)
  p = cfg.patch_size
  mean, std = np.array(vit.IMAGENET_MEAN), np.array(vit.IMAGENET_STD)
  fwd = vit.make_apply_fn(cfg, outputs=("keys",))
  imgs, metas = [], []
  for i in ids:
    f = next((assets / "voc2012" / "JPEGImages").glob(i + ".*"))
    im = Image.open(f).convert("RGB")
    w, h = im.size
    s = short_side / min(w, h)
    rw, rh = round(w * s), round(h * s)
    arr = np.asarray(im.resize((rw, rh), Image.BICUBIC), np.float32) / 255.0
    ch, cw = rh // p * p, rw // p * p
    top, left = (rh - ch) // 2, (rw - cw) // 2
    imgs.append(((arr[top:top + ch, left:left + cw] - mean) / std).astype(np.float32))
    metas.append((i, (h, w), (rh, rw), (top, left)))
  # Two buckets (landscape / portrait), padded with a patch mask: one compile each.
  ious = []
  for group in (
      [j for j, a in enumerate(imgs) if a.shape[1] >= a.shape[0]],
      [j for j, a in enumerate(imgs) if a.shape[1] < a.shape[0]]):
    if not group:
      continue
    hb = max(imgs[j].shape[0] for j in group)
    wb = max(imgs[j].shape[1] for j in group)
    batch = np.zeros((len(group), hb, wb, 3), np.float32)
    mask = np.zeros((len(group), hb // p, wb // p), bool)
    for n, j in enumerate(group):
      a = imgs[j]
      batch[n, :a.shape[0], :a.shape[1]] = a
      mask[n, :a.shape[0] // p, :a.shape[1] // p] = True
    keys = np.asarray(fwd(params, batch, mask)["keys"])
    for n, j in enumerate(group):
      i, (h, w), (rh, rw), (top, left) = metas[j]
      gh, gw = imgs[j].shape[0] // p, imgs[j].shape[1] // p
      k = keys[n].reshape(hb // p, wb // p, -1)[:gh, :gw].reshape(gh * gw, -1)
      k = k / np.linalg.norm(k, axis=1, keepdims=True)
      lab = KMeans(2, n_init=10, random_state=0).fit_predict(k).reshape(gh, gw)
      border = np.zeros((gh, gw), bool)
      border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
      frac = [np.mean(border[lab == c]) if np.any(lab == c) else 1.0 for c in (0, 1)]
      fg = (lab == int(np.argmin(frac)))
      # Patch grid -> resized-image pixels (edge-replicated crop margin) -> GT size, nearest.
      up = np.repeat(np.repeat(fg, p, 0), p, 1)
      full = np.pad(up, ((top, rh - top - up.shape[0]), (left, rw - left - up.shape[1])),
                    mode="edge")
      yy = (np.arange(h) * rh / h).astype(int)
      xx = (np.arange(w) * rw / w).astype(int)
      pred = full[yy][:, xx]
      gt = np.asarray(Image.open(assets / "voc2012" / "SegmentationClass" / f"{i}.png"))
      valid = gt != 255
      g = (gt >= 1) & (gt <= 20)
      inter = np.sum(pred & g & valid)
      union = np.sum((pred | g) & valid)
      ious.append(inter / union)
  return float(np.mean(ious)), ious


@pytest.mark.slow
def test_real_dinov2_keys_separate_foreground(assets, dinov2_s14_npz, voc_ids):
  arch, params = weights.load_any(dinov2_s14_npz)
  miou, ious = _voc_fg_iou(assets, voc_ids, arch, params)
  print(f"DINOv2-S/14 Keys, image-level k=2, border rule: mean fg IoU {miou:.3f} over "
        f"{len(ious)} images: {np.round(ious, 3).tolist()}")
  assert len(ious) == 9
  # METHOD.md: a plain PyTorch version of exactly this gave 0.681.
  assert miou > 0.6


def test_safetensors_and_npz_need_no_torch(tmp_path):
  import subprocess
  import sys
  from safetensors.numpy import save_file
  cfg, sd = _sd("dinov2_vits14_reg", depth=1)
  save_file(_to_hf(sd, cfg), str(tmp_path / "m.safetensors"))
  np.savez(tmp_path / "m.npz", **sd)
  code = (
      "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
      "from lightcluster_jax import vit, weights\n"
      "cfg = vit.get_config('dinov2_vits14_reg', depth=1)\n"
      f"a, p = weights.load_any({str(tmp_path / 'm.safetensors')!r}, cfg)\n"
      f"b, q = weights.load_any({str(tmp_path / 'm.npz')!r}, cfg)\n"
      f"weights.save({str(tmp_path / 'c.npz')!r}, a, p)\n"
      "print('ok', a == vit.get_config(cfg, pos_interpolation='size'), b == cfg)\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "ok True True"  # HF names -> "size"; official names -> official
