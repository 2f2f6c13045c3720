"""Checkpoint key layouts -> the Flax param tree of `lightcluster_jax.vit` (NumPy only).

Four input layouts are understood:
  * official DINO / DINOv2 (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
    `blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}.*`, `norm.*`,
    DINOv2 `register_tokens`, `mask_token`), including training checkpoints wrapped in
    `teacher` / `student` / `model` / `state_dict` with `module.` / `backbone.` prefixes, and
    DINOv2's chunked `blocks.C.N.*` form;
  * Hugging Face `ViTModel` (DINO: `embeddings.*`, `encoder.layer.N.attention.attention.
    {query,key,value}`, `layernorm_before/after`, `intermediate.dense`, `output.dense`);
  * Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` (`norm1/2`, `layer_scale1.lambda1`,
    `mlp.fc1/fc2`, `embeddings.register_tokens`);
  * timm's DINOv2 register models (`vit_*_patch14_reg4_dinov2`: official block names, but
    `reg_token`, a `pos_embed` without the CLS entry and the CLS position folded into
    `cls_token`; timm's `_convert_dinov2`).
Everything is first brought to the official names ("canonical"), then mapped to Flax:
torch Linear weights [out, in] are transposed to Flax kernels [in, out], the patch conv
[D, 3, p, p] becomes [p, p, 3, D], LayerNorm weight -> scale.

The layout also says which code the checkpoint was made for, hence how that code resamples
position embeddings (`LAYOUT_POS_INTERPOLATION`: official -> "official", Hugging Face -> "size",
timm -> "timm"; see `vit.POS_INTERPOLATIONS`). timm's DINO and DINOv2-without-registers files
use exactly the official names and cannot be told apart from official ones: they are read as
"official" unless the caller names the rule (`to_flax(..., pos_interpolation="timm")`,
`lightcluster convert --pos-interpolation timm`).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from lightcluster_jax.blocks import vit

# Keys that exist in released checkpoints but play no part in feature extraction.
_IGNORED = (
    re.compile(r"^mask_token$"),               # DINOv2 iBOT masking token
    re.compile(r"^head\..*"),                  # DINO projection head in training checkpoints
    re.compile(r"^dino_head\..*|^ibot_head\..*"),
    re.compile(r"^pooler\..*"),                # HF ViTModel pooler
    re.compile(r"^classifier\..*"),            # HF classification heads
    re.compile(r"^embeddings\.mask_token$"),   # HF DINOv2
)
_WRAPPERS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "vit.", "dinov2.", "model.", "encoder_q.")


# The position-embedding rule of the code each layout comes from (vit.POS_INTERPOLATIONS).
LAYOUT_POS_INTERPOLATION = {"official": "official", "hf_dino": "size", "hf_dinov2": "size",
                            "timm": "timm"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be mapped onto the requested architecture."""


def unwrap(obj, *, checkpoint_key: str | None = None, source: str = "checkpoint") -> dict:
  """Finds the backbone state dict inside a loaded checkpoint and strips wrapper prefixes.

  Args:
    obj: mapping name -> array, possibly nested as {"teacher": {...}, "student": {...}, ...}.
    checkpoint_key: which nested entry to use; default: the first of teacher, student,
      model, state_dict, module that is present (DINO evaluates the teacher).
    source: file name for error messages.

  Returns:
    {name: np.ndarray} with `module.` / `backbone.` / `vit.` / `dinov2.` prefixes removed.
  """
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{source}: expected a mapping of tensors, got {type(obj).__name__}")
  if checkpoint_key is not None:
    if checkpoint_key not in obj:
      raise CheckpointError(f"{source}: no entry {checkpoint_key!r}; top-level keys: "
                            f"{sorted(map(str, obj))[:20]}")
    obj = obj[checkpoint_key]
  else:
    for k in _WRAPPERS:
      if k in obj and isinstance(obj[k], Mapping):
        obj = obj[k]
        break
  arrays = {}
  for k, v in obj.items():
    if isinstance(v, Mapping):
      continue  # e.g. optimizer state next to a flat dict; not weights
    if hasattr(v, "detach"):  # torch tensor, without importing torch
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    if not hasattr(v, "shape"):
      continue  # epoch counters, args, ...
    arrays[str(k)] = np.asarray(v)
  changed = True
  while changed and arrays:
    changed = False
    for pre in _PREFIXES:
      if all(k.startswith(pre) for k in arrays):
        arrays = {k[len(pre):]: v for k, v in arrays.items()}
        changed = True
    # Mixed prefixes ("backbone.*" next to "head.*", "vit.*" next to "classifier.*"): keep
    # the backbone part; the rest is recognised as ignorable or reported as unexpected.
    for pre in ("module.", "backbone.", "vit.", "dinov2."):
      if any(k.startswith(pre) for k in arrays):
        arrays = {(k[len(pre):] if k.startswith(pre) else k): v for k, v in arrays.items()}
  if not arrays:
    raise CheckpointError(f"{source}: no tensors found")
  return arrays


def _pos_without_cls(sd: Mapping[str, np.ndarray]) -> bool:
  """A `pos_embed` of g*g entries (no CLS slot: timm's `no_embed_class`); 1 + g*g never is a
  square for g >= 1, so an official one is never mistaken for it."""
  pe = sd.get("pos_embed")
  if pe is None or np.ndim(pe) != 3:
    return False
  n = int(np.shape(pe)[1])
  g = int(round(n ** 0.5))
  return n > 0 and g * g == n


def layout(sd: Mapping[str, np.ndarray]) -> str:
  """"official", "timm", "hf_dino" or "hf_dinov2" (raises CheckpointError otherwise)."""
  keys = set(sd)
  if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
    if "reg_token" in keys or _pos_without_cls(sd):
      return "timm"
    return "official"
  if any(k.startswith("encoder.layer.") for k in keys):
    if any(".layer_scale1." in k or ".norm1." in k for k in keys):
      return "hf_dinov2"
    return "hf_dino"
  raise CheckpointError(
      "unrecognised checkpoint layout (neither official DINO/DINOv2 names such as "
      "'cls_token', 'blocks.0.attn.qkv.weight' nor Hugging Face names such as "
      f"'encoder.layer.0.attention.attention.query.weight'); first keys: {sorted(keys)[:8]}")


_HF_COMMON = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_HF_DINO = [
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
]
_HF_DINOV2 = [
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def canonicalise(sd: Mapping[str, np.ndarray], *, source: str = "checkpoint"):
  """Brings any supported layout to official DINO/DINOv2 names.

  Returns (canonical {name: array}, ignored [names], unknown [names]).
  """
  kind = layout(sd)
  out, ignored, unknown = {}, [], []
  if kind in ("official", "timm"):
    for k, v in sd.items():
      m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.*)", k)  # DINOv2 block_chunks > 0
      if m:
        k = f"blocks.{m.group(2)}.{m.group(3)}"
      if k == "reg_token":
        k = "register_tokens"
      if any(p.match(k) for p in _IGNORED):
        ignored.append(k)
      else:
        out[k] = v
    if kind == "timm" and _pos_without_cls(out):
      # timm folded the CLS position into cls_token (cls + pos[0]) and dropped it from
      # pos_embed: a zero CLS position gives the same CLS input, cls_token + 0.
      pe = np.asarray(out["pos_embed"])
      out["pos_embed"] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    return out, ignored, unknown
  rules = [(re.compile(a), b) for a, b in _HF_COMMON + (_HF_DINO if kind == "hf_dino"
                                                          else _HF_DINOV2)]
  qkv: dict = {}
  for k, v in sd.items():
    if any(p.match(k) for p in _IGNORED):
      ignored.append(k)
      continue
    m = _HF_QKV.fullmatch(k)
    if m:
      qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = v
      continue
    for pat, rep in rules:
      if pat.fullmatch(k):
        out[pat.sub(rep, k)] = v
        break
    else:
      unknown.append(k)
  for (i, kind_), parts in sorted(qkv.items()):
    missing = [p for p in ("query", "key", "value") if p not in parts]
    if missing:
      raise CheckpointError(f"{source}: layer {i} lacks attention.attention."
                            f"{'/'.join(missing)}.{kind_}")
    out[f"blocks.{i}.attn.qkv.{kind_}"] = np.concatenate(
        [parts["query"], parts["key"], parts["value"]], axis=0)
  if kind == "hf_dino" and "pos_embed" in out:
    pass  # same (1, 1 + N, D) layout as the official pos_embed
  return out, ignored, unknown


def official_shapes(cfg: vit.ViTConfig) -> dict[str, tuple[int, ...]]:
  """The official state-dict names and shapes of a variant (without `mask_token`)."""
  d, p, h = cfg.width, cfg.patch_size, int(cfg.width * cfg.mlp_ratio)
  shapes = {
      "cls_token": (1, 1, d), "pos_embed": (1, 1 + cfg.pos_grid ** 2, d),
      "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
      "norm.weight": (d,), "norm.bias": (d,),
  }
  if cfg.num_registers:
    shapes["register_tokens"] = (1, cfg.num_registers, d)
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    shapes.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,),
        b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,),
    })
    if cfg.layerscale:
      shapes[b + "ls1.gamma"] = (d,)
      shapes[b + "ls2.gamma"] = (d,)
  return shapes


def describe(sd: Mapping[str, np.ndarray]) -> dict:
  """Architecture facts readable from official-name shapes (patch, width, depth, ...)."""
  facts = {}
  w = sd.get("patch_embed.proj.weight")
  if w is not None and w.ndim == 4:
    facts["patch_size"], facts["width"] = int(w.shape[-1]), int(w.shape[0])
  idx = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
  facts["depth"] = max(idx) + 1 if idx else 0
  facts["layerscale"] = any(k.endswith("ls1.gamma") for k in sd)
  r = sd.get("register_tokens")
  facts["num_registers"] = int(r.shape[1]) if r is not None and r.ndim == 3 else 0
  pe = sd.get("pos_embed")
  if pe is not None and pe.ndim == 3:
    n = pe.shape[1] - 1
    g = int(round(n ** 0.5))
    facts["pos_grid"] = g if g * g == n else None
  fc1 = sd.get("blocks.0.mlp.fc1.weight")
  if fc1 is not None and "width" in facts:
    facts["mlp_ratio"] = fc1.shape[0] / facts["width"]
  return facts


def infer_arch(sd: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> str:
  """The `vit.ARCHS` name whose official shapes match a canonical state dict."""
  facts = describe(sd)
  for name, cfg in vit.ARCHS.items():
    if (facts.get("patch_size"), facts.get("width"), facts.get("depth"),
        facts.get("layerscale"), facts.get("num_registers")) == (
            cfg.patch_size, cfg.width, cfg.depth, cfg.layerscale, cfg.num_registers):
      return name
  raise CheckpointError(
      f"{source}: unknown architecture (patch {facts.get('patch_size')}, width "
      f"{facts.get('width')}, depth {facts.get('depth')}, layerscale "
      f"{facts.get('layerscale')}, registers {facts.get('num_registers')}, mlp ratio "
      f"{facts.get('mlp_ratio')}); supported: {', '.join(vit.ARCHS)}")


def check_shapes(sd: Mapping[str, np.ndarray], cfg: vit.ViTConfig, *, unknown=(),
                 source: str = "checkpoint") -> None:
  """Raises CheckpointError listing missing / unexpected keys and shape mismatches."""
  expected = official_shapes(cfg)
  missing = sorted(set(expected) - set(sd), key=_natural)
  unexpected = sorted((set(sd) - set(expected)) | set(unknown), key=_natural)
  wrong = [f"{k}: checkpoint {tuple(sd[k].shape)}, {cfg.name} expects {expected[k]}"
           for k in sorted(set(expected) & set(sd), key=_natural)
           if tuple(sd[k].shape) != expected[k]]
  if not (missing or unexpected or wrong):
    return
  lines = [f"{source} does not match architecture {cfg.name!r} (patch {cfg.patch_size}, "
           f"width {cfg.width}, depth {cfg.depth}, layerscale {cfg.layerscale}, registers "
           f"{cfg.num_registers}, pos grid {cfg.pos_grid}x{cfg.pos_grid})"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:24])
                 + (" ..." if len(missing) > 24 else ""))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:24])
                 + (" ..." if len(unexpected) > 24 else ""))
  if wrong:
    lines.append(f"  shape mismatches ({len(wrong)}): " + "; ".join(wrong[:8])
                 + (" ..." if len(wrong) > 8 else ""))
  try:
    guess = infer_arch(sd)
    if guess != cfg.name:
      lines.append(f"  the checkpoint looks like {guess!r}")
  except CheckpointError:
    pass
  raise CheckpointError("\n".join(lines))


def _natural(k: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]


def official_to_flax(sd: Mapping[str, np.ndarray], cfg: vit.ViTConfig) -> dict:
  """Maps a canonical (official-name) state dict onto the nested Flax param tree."""
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  dense = lambda pre: {"kernel": f32(sd[pre + ".weight"].T), "bias": f32(sd[pre + ".bias"])}
  norm = lambda pre: {"scale": f32(sd[pre + ".weight"]), "bias": f32(sd[pre + ".bias"])}
  params = {
      "patch_embed": {"kernel": f32(sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)),
                      "bias": f32(sd["patch_embed.proj.bias"])},
      "cls_token": f32(sd["cls_token"]),
      "pos_embed": f32(sd["pos_embed"]),
      "norm": norm("norm"),
  }
  if cfg.num_registers:
    params["register_tokens"] = f32(sd["register_tokens"])
  for i in range(cfg.depth):
    b = f"blocks.{i}."
    blk = {
        "norm1": norm(b + "norm1"), "norm2": norm(b + "norm2"),
        "attn": {"qkv": dense(b + "attn.qkv"), "proj": dense(b + "attn.proj")},
        "mlp": {"fc1": dense(b + "mlp.fc1"), "fc2": dense(b + "mlp.fc2")},
    }
    if cfg.layerscale:
      blk["ls1"] = {"gamma": f32(sd[b + "ls1.gamma"])}
      blk["ls2"] = {"gamma": f32(sd[b + "ls2.gamma"])}
    params[f"blocks_{i}"] = blk
  return params


def flax_to_official(params: Mapping, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  """Inverse of `official_to_flax` (to load Flax params into the PyTorch reference)."""
  a = lambda x: np.asarray(x, np.float32)
  sd = {
      "patch_embed.proj.weight": a(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": a(params["patch_embed"]["bias"]),
      "cls_token": a(params["cls_token"]), "pos_embed": a(params["pos_embed"]),
      "norm.weight": a(params["norm"]["scale"]), "norm.bias": a(params["norm"]["bias"]),
  }
  if cfg.num_registers:
    sd["register_tokens"] = a(params["register_tokens"])
  for i in range(cfg.depth):
    p, b = params[f"blocks_{i}"], f"blocks.{i}."
    for n in ("norm1", "norm2"):
      sd[b + n + ".weight"], sd[b + n + ".bias"] = a(p[n]["scale"]), a(p[n]["bias"])
    for n, sub in (("attn.qkv", p["attn"]["qkv"]), ("attn.proj", p["attn"]["proj"]),
                   ("mlp.fc1", p["mlp"]["fc1"]), ("mlp.fc2", p["mlp"]["fc2"])):
      sd[b + n + ".weight"], sd[b + n + ".bias"] = a(sub["kernel"]).T, a(sub["bias"])
    if cfg.layerscale:
      sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = a(p["ls1"]["gamma"]), a(p["ls2"]["gamma"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def pos_interpolation_of(kind: str) -> str:
  """The position-embedding rule of the code a layout comes from (see the module docstring)."""
  return LAYOUT_POS_INTERPOLATION.get(kind, "official")


def to_flax(raw: Mapping, arch: str | vit.ViTConfig | None = None, *,
            checkpoint_key: str | None = None, source: str = "checkpoint",
            pos_interpolation: str | None = None):
  """Any supported loaded checkpoint -> (config, Flax params, report dict).

  Args:
    raw: the loaded mapping (torch.load / safetensors / np.load result).
    arch: expected variant (name or ViTConfig); inferred from the shapes when None.
    checkpoint_key: nested entry to use in training checkpoints (default teacher).
    source: file name for error messages.
    pos_interpolation: the position-embedding rule put in the returned config; None: the
      rule of the layout's code (`pos_interpolation_of`).

  Returns:
    (ViTConfig with `pos_interpolation` set, params, {"layout", "pos_interpolation",
    "ignored_keys", "num_tensors"}).
  """
  sd = unwrap(raw, checkpoint_key=checkpoint_key, source=source)
  kind = layout(sd)
  canon, ignored, unknown = canonicalise(sd, source=source)
  cfg = vit.get_config(arch) if arch is not None else vit.get_config(
      infer_arch(canon, source=source))
  check_shapes(canon, cfg, unknown=unknown, source=source)
  params = official_to_flax(canon, cfg)
  rule = pos_interpolation or pos_interpolation_of(kind)
  cfg = vit.get_config(cfg, pos_interpolation=rule)
  report = {"layout": kind, "pos_interpolation": rule, "ignored_keys": sorted(ignored),
            "num_tensors": len(canon)}
  return cfg, params, report
