"""Converted ViT weights on disk: a flat `.npz` with a sha256 manifest, and official downloads.

File format (`save` / `load`): one `.npz` (no pickles) holding every leaf of the Flax param
tree under `params/<path>` (e.g. `params/blocks_3/attn/qkv/kernel`) and `__meta__`, a JSON
string with the format version, the variant name, its full `ViTConfig` (including
`pos_interpolation`, the position-embedding rule of the code the checkpoint came from), where
the weights came from, and a manifest `{key: {"shape", "dtype", "sha256"}}`. `load` re-hashes
every array, so a corrupted or hand-edited file is refused with the name of the bad key.

Format versions: "lightcluster_jax.vit/2" records `pos_interpolation`; "/1" files (written
before the rule existed) are still read, their rule taken from the recorded source layout:
"size" for Hugging Face sources (what `ViTModel` / `Dinov2Model` do), otherwise "official"
(what the official code of an official-layout checkpoint does; "/1" never read timm files).
Such a file therefore gives official-rule features where the version that wrote it used the
explicit size; pass `pos_interpolation="size"` to get those back.

`load_any` also reads checkpoints that were never converted (official `.pth`, Hugging Face
`.safetensors`, `.npz` in official key names) and converts them in memory.

Downloads (`download`, `fetch_official`) stream to `<dest>.part` with a tqdm progress bar,
hash while writing and rename atomically. The DINO authors publish no checksums for their
`.pth` files and we know of none, so `fetch_official` records the sha256 of the first
download next to the file (`<file>.sha256`) and re-checks it on every later use (a truncated
or replaced file is caught); pass `sha256=` to pin a hash you trust.

Example (the download needs the network, so that part is shown, not run):
  >>> path = fetch_official("dino_vits8")  # doctest: +SKIP
  >>> arch, params = load_any(path)         # doctest: +SKIP
  >>> arch, params = load(WEIGHTS)          # a converted file: (name or ViTConfig, params)
  >>> arch.pos_interpolation                # how its position embeddings are resampled
  'official'
  >>> out = save(OUT_DIR / "copy.npz", arch, params)
  >>> load(out)[0] == arch
  True
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Mapping

import numpy as np

from lightcluster_jax.blocks import vit
from lightcluster_jax.data import files

FORMAT = "lightcluster_jax.vit/2"
_READABLE_FORMATS = ("lightcluster_jax.vit/1", FORMAT)
_META = "__meta__"
_PREFIX = "params/"

# Official checkpoints, relative to the DINO authors' server.
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com"
OFFICIAL_FILES = {
    "dino_vits8": "dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vits16": "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vitb8": "dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_vitb16": "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dinov2_vits14": "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2_vitb14": "dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vits14_reg": "dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14_reg": "dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
}
# Published sha256 of the official files: none are published by the authors and we could not
# find any, so this stays empty rather than holding unverified values. Entries added here are
# enforced by `fetch_official`.
OFFICIAL_SHA256: dict[str, str] = {}


class WeightsError(ValueError):
  """A weights file that is missing, truncated, corrupted or of the wrong architecture."""


# ----------------------------------------------------------------------------------------------
# Converted .npz


def _sha256_array(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _config_dict(cfg: vit.ViTConfig) -> dict:
  return dataclasses.asdict(cfg)


def save(path, arch: str | vit.ViTConfig, params, *, source: Mapping[str, Any] | None = None,
         orbax_dir=None) -> pathlib.Path:
  """Writes params to a flat `.npz` atomically (temp file + rename), with a sha256 manifest.

  Args:
    path: output file (".npz" is appended by NumPy if missing, so pass it).
    arch: variant name or ViTConfig; the params are validated against it.
    params: Flax param tree (NumPy or JAX arrays).
    source: optional provenance recorded in the metadata (input file, its sha256, layout).
    orbax_dir: optionally also write an orbax checkpoint of the params there.

  Returns:
    The written path.
  """
  cfg = vit.get_config(arch)
  vit.validate_params(params, cfg)
  path = pathlib.Path(path)
  flat = {_PREFIX + k: np.asarray(v, np.float32) for k, v in vit.flatten_params(params).items()}
  manifest = {k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256_array(a)}
              for k, a in flat.items()}
  meta = {"format": FORMAT, "arch": cfg.name, "config": _config_dict(cfg),
          "standard_arch": cfg == vit.ARCHS.get(cfg.name), "source": dict(source or {}),
          "manifest": manifest}
  with files.atomic_open(path, fsync=True) as f:
    np.savez(f, **{_META: np.asarray(json.dumps(meta))}, **flat)
  if orbax_dir is not None:
    save_orbax(orbax_dir, params)
  return path


def save_orbax(directory, params) -> pathlib.Path:
  """Writes the params as an orbax StandardCheckpoint (needs `orbax-checkpoint`)."""
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("writing an orbax checkpoint needs `pip install orbax-checkpoint` "
                      "(the [orbax] extra)") from e
  directory = pathlib.Path(directory).absolute()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, params, force=True)
  ckptr.wait_until_finished()
  return directory


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise WeightsError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise WeightsError(f"{path}: not a readable .npz (truncated or corrupted?): {e}") from e


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for k, v in flat.items():
    node = tree
    parts = k.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def _config_from_meta(meta: Mapping[str, Any]) -> vit.ViTConfig:
  """The stored ViTConfig; "/1" files get the rule of their recorded source layout."""
  fields = dict(meta["config"])
  if "pos_interpolation" not in fields:
    layout = (meta.get("source") or {}).get("layout")
    fields["pos_interpolation"] = "size" if layout in ("hf_dino", "hf_dinov2") else "official"
  return vit.ViTConfig(**fields)


def load(path, *, verify_hashes: bool = True, pos_interpolation: str | None = None):
  """Reads a converted `.npz` (see `save`).

  Args:
    path: the file.
    verify_hashes: re-hash every array against the manifest.
    pos_interpolation: replaces the recorded position-embedding rule ("official", "size",
      "timm"); None keeps the file's.

  Returns:
    (arch, params): the variant name when the stored config is a standard one (`vit.ARCHS`,
    rule "official"), else the stored `ViTConfig` (a depth-2 test model, or a checkpoint
    converted from Hugging Face / timm, whose rule is "size" / "timm"), and the nested param
    tree of NumPy float32 arrays.

  Raises:
    WeightsError naming the file: missing / truncated file, no metadata (use `load_any` for
    unconverted checkpoints), hash or shape mismatch, missing / unexpected keys.
  """
  path = pathlib.Path(path)
  arrays = _read_npz(path)
  if _META not in arrays:
    raise WeightsError(f"{path}: no {_META} entry, so not a converted lightcluster_jax file "
                       "(official-name .npz files are read by weights.load_any)")
  try:
    meta = json.loads(str(arrays.pop(_META)))
  except json.JSONDecodeError as e:
    raise WeightsError(f"{path}: unreadable {_META}: {e}") from e
  if meta.get("format") not in _READABLE_FORMATS:
    raise WeightsError(f"{path}: format {meta.get('format')!r}, expected one of "
                       f"{', '.join(_READABLE_FORMATS)}")
  try:
    cfg = _config_from_meta(meta)
    if pos_interpolation is not None:
      cfg = dataclasses.replace(cfg, pos_interpolation=pos_interpolation)
  except (KeyError, TypeError, ValueError) as e:
    raise WeightsError(f"{path}: unreadable config in {_META}: {e}") from e
  manifest = meta["manifest"]
  missing = sorted(set(manifest) - set(arrays))
  extra = sorted(set(arrays) - set(manifest))
  if missing or extra:
    raise WeightsError(f"{path}: manifest and contents differ; missing {missing[:10]}, "
                       f"unexpected {extra[:10]}")
  for k, info in manifest.items():
    a = arrays[k]
    if list(a.shape) != info["shape"] or str(a.dtype) != info["dtype"]:
      raise WeightsError(f"{path}: {k} has shape {a.shape} {a.dtype}, manifest says "
                         f"{tuple(info['shape'])} {info['dtype']}")
    if verify_hashes and _sha256_array(a) != info["sha256"]:
      raise WeightsError(f"{path}: sha256 of {k} does not match the manifest (corrupted)")
  params = _unflatten({k[len(_PREFIX):]: v for k, v in arrays.items()})
  try:
    vit.validate_params(params, cfg, source=str(path))
  except ValueError as e:
    raise WeightsError(str(e)) from e
  standard = vit.ARCHS.get(cfg.name)
  return (cfg.name if standard == cfg else cfg), params


def read_checkpoint(path, *, trust_pickle: bool = False) -> Mapping[str, Any]:
  """Loads any supported checkpoint file into a mapping (no conversion).

  `.safetensors` and `.npz` need no torch; `.pth` / `.pt` / `.bin` need torch (the
  `[convert]` extra) and are read with `weights_only=True` unless `trust_pickle` (DINO
  training checkpoints pickle an argparse Namespace, which weights_only refuses).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such file")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    return _read_npz(path)
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
      raise ImportError("reading .safetensors needs `pip install safetensors`") from e
    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
      raise WeightsError(f"{path}: not a readable .safetensors file (truncated or "
                         f"corrupted?): {e}") from e
  if suffix in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{path}: reading PyTorch checkpoints needs torch; install the "
                        "[convert] extra (pip install 'lightcluster_jax[convert]') or use the "
                        ".safetensors / .npz version") from e
    try:
      return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
      msg = str(e)
      if "weights_only" in msg.lower() or "unpickl" in msg.lower():
        raise WeightsError(f"{path}: the file pickles non-tensor objects, which are not loaded "
                           "by default; if you trust its origin pass --trust-pickle "
                           f"(trust_pickle=True). torch said: {msg.splitlines()[0]}") from e
      raise WeightsError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                         f"corrupted?): {msg.splitlines()[0] if msg else type(e).__name__}") from e
  raise WeightsError(f"{path}: unsupported checkpoint type {suffix!r} (expected .pth, .pt, "
                     ".bin, .safetensors or .npz)")


def load_any(path, arch: str | vit.ViTConfig | None = None, *,
             checkpoint_key: str | None = None, trust_pickle: bool = False,
             pos_interpolation: str | None = None):
  """Reads a converted `.npz` or converts an official / Hugging Face / timm checkpoint on the fly.

  Args:
    path: `.npz` (converted, or official / timm key names), `.safetensors` (official, HF or
      timm names), `.pth` (official DINO / DINOv2, including teacher/student training
      checkpoints).
    arch: expected architecture; inferred from the tensor shapes when None. A mismatch raises
      (the position-embedding rule is not part of the check: it comes from the file).
    checkpoint_key: nested entry of a training checkpoint (default: teacher).
    trust_pickle: allow full unpickling of `.pth` files (see `read_checkpoint`).
    pos_interpolation: position-embedding rule to use instead of the file's (converted
      files: the recorded one; others: the rule of their layout's code, see `keymap`).

  Returns:
    (arch, params) as `load`; the rule travels in the config (`vit.get_config(arch)
    .pos_interpolation`).
  """
  from lightcluster_jax.weights import keymap  # NumPy-only key mapping

  path = pathlib.Path(path)
  if path.suffix.lower() == ".npz":
    arrays = _read_npz(path)
    if _META in arrays:
      got_arch, params = load(path, pos_interpolation=pos_interpolation)
      if arch is not None:
        got = vit.get_config(got_arch)
        want = dataclasses.replace(vit.get_config(arch),
                                   pos_interpolation=got.pos_interpolation)
        if want != got:
          raise WeightsError(f"{path}: converted for {got.name!r} ({got}), not {want.name!r}")
      return got_arch, params
    raw = arrays
  else:
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
  try:
    cfg, params, _ = keymap.to_flax(raw, arch, checkpoint_key=checkpoint_key, source=str(path),
                                    pos_interpolation=pos_interpolation)
  except keymap.CheckpointError as e:
    raise WeightsError(str(e)) from e
  standard = vit.ARCHS.get(cfg.name)
  return (cfg.name if standard == cfg else cfg), params


# ----------------------------------------------------------------------------------------------
# Downloads


def file_sha256(path, *, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        return h.hexdigest()
      h.update(b)


def download(url: str, dest, sha256: str | None = None, progress: bool = True, *,
             timeout: float = 60.0) -> pathlib.Path:
  """Downloads `url` to `dest` atomically, with a progress bar and an optional sha256 check.

  The data goes to a temporary file next to `dest` (`data.files.atomic_open`) and is renamed
  only when complete (and matching `sha256`), so an interrupted download never leaves a file
  that looks finished.

  Raises:
    WeightsError on HTTP errors, a short read, or a sha256 mismatch (the partial file is
    removed).
  """
  dest = pathlib.Path(dest)
  h = hashlib.sha256()
  try:
    req = urllib.request.Request(url, headers={"User-Agent": "lightcluster_jax"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, \
        files.atomic_open(dest, fsync=True) as f:
      total = resp.headers.get("Content-Length")
      total = int(total) if total and total.isdigit() else None
      bar = None
      if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=dest.name)
      n = 0
      try:
        while True:
          chunk = resp.read(1 << 20)
          if not chunk:
            break
          f.write(chunk)
          h.update(chunk)
          n += len(chunk)
          if bar is not None:
            bar.update(len(chunk))
      finally:
        if bar is not None:
          bar.close()
      # Checked inside the `with`: a failure removes the partial file.
      if total is not None and n != total:
        raise WeightsError(f"{url}: received {n} of {total} bytes (connection dropped?)")
      digest = h.hexdigest()
      if sha256 is not None and digest != sha256.lower():
        raise WeightsError(f"{url}: sha256 {digest} does not match the expected {sha256}")
  except (OSError, http.client.HTTPException) as e:
    raise WeightsError(f"{url}: download failed: {e}") from e
  return dest


def default_cache_dir() -> pathlib.Path:
  """$LIGHTCLUSTER_CACHE, else $XDG_CACHE_HOME/lightcluster, else ~/.cache/lightcluster."""
  env = os.environ.get("LIGHTCLUSTER_CACHE")
  if env:
    return pathlib.Path(env)
  xdg = os.environ.get("XDG_CACHE_HOME")
  return pathlib.Path(xdg or pathlib.Path.home() / ".cache") / "lightcluster"


def official_url(arch: str, base_url: str | None = None) -> str:
  """The official download URL of `arch` (base overridable, e.g. a mirror or a test server)."""
  cfg = vit.get_config(arch)
  if cfg.name not in OFFICIAL_FILES:
    raise ValueError(f"no official checkpoint for {cfg.name!r}")
  base = base_url or os.environ.get("LIGHTCLUSTER_WEIGHTS_BASE_URL") or OFFICIAL_BASE_URL
  return base.rstrip("/") + "/" + OFFICIAL_FILES[cfg.name]


def fetch_official(arch: str, cache_dir=None, *, base_url: str | None = None,
                   sha256: str | None = None, progress: bool = True) -> pathlib.Path:
  """Returns the local path of the official checkpoint of `arch`, downloading it once.

  Integrity: the expected hash is `sha256`, else `OFFICIAL_SHA256[arch]` (empty: none are
  published), else the hash recorded at the first download (`<file>.sha256`). A cached file
  whose hash does not match is reported, never silently used.

  Args:
    arch: a `vit.ARCHS` name.
    cache_dir: where to keep the files (default `default_cache_dir()`).
    base_url: server root replacing https://dl.fbaipublicfiles.com (also
      $LIGHTCLUSTER_WEIGHTS_BASE_URL).
    sha256: expected sha256 of the file.
    progress: show a tqdm progress bar while downloading.
  """
  url = official_url(arch, base_url)
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  rel = urllib.parse.urlparse(url).path.lstrip("/")
  dest = cache / rel
  record = dest.with_name(dest.name + ".sha256")
  expected = sha256 or OFFICIAL_SHA256.get(vit.get_config(arch).name)
  if dest.is_file():
    digest = file_sha256(dest)
    recorded = record.read_text().split()[0] if record.is_file() else None
    want = expected or recorded
    if want is not None and digest != want.lower():
      raise WeightsError(
          f"{dest}: sha256 {digest} differs from the "
          f"{'expected' if expected else 'recorded (first download)'} {want}; the cached file "
          "is corrupted or was replaced; delete it to download again")
    if recorded is None:
      record.write_text(f"{digest}  {dest.name}\n")
    return dest
  download(url, dest, sha256=expected, progress=progress)
  record.write_text(f"{file_sha256(dest)}  {dest.name}\n")
  return dest
