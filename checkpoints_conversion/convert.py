"""`lightcluster convert`: DINO / DINOv2 checkpoints -> Flax `.npz` (+ parity check).

  lightcluster convert --arch dinov2_vits14 --checkpoint dinov2_vits14_pretrain.pth \
      --out dinov2_vits14.npz --verify
  lightcluster convert --arch dino_vits8 --out dino_vits8.npz     # downloads the official file

Inputs: official `.pth` (also teacher/student training checkpoints with `module.` /
`backbone.` prefixes; needs torch), Hugging Face `.safetensors` of DINO / DINOv2 (no torch),
timm DINOv2 register checkpoints, `.npz` in official key names (no torch). Output: a flat
`.npz` with the Flax params, the variant name and a sha256 manifest
(`lightcluster_jax.weights.save`), optionally an orbax checkpoint.

The converted file records how the checkpoint's own code resamples position embeddings
(`pos_interpolation` in its config): official names -> "official", Hugging Face names ->
"size", timm's register layout -> "timm" (`keymap.LAYOUT_POS_INTERPOLATION`). timm files of
models without registers carry the official names; name their rule with
`--pos-interpolation timm`.

`--verify` runs the PyTorch reference ViT of this package (`torch_reference.py`, written from
the official model code and loaded with the checkpoint's own tensors) and the Flax model on the
same random images at a square and a non-square size, and prints as its last line
  {"arch": ..., "max_abs_diff_keys": ..., "max_abs_diff_cls": ..., "ok": true|false, ...}
The exit status is 1 when a difference exceeds the tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def _parse_sizes(text: str):
  sizes = []
  for part in text.split(","):
    h, _, w = part.strip().lower().partition("x")
    try:
      sizes.append((int(h), int(w or h)))
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad size {part!r}; expected HxW[,HxW...]") from None
  return sizes


def build_parser() -> argparse.ArgumentParser:
  from lightcluster_jax import vit
  p = argparse.ArgumentParser(
      prog="lightcluster convert",
      description="Convert a DINO / DINOv2 checkpoint to a Flax .npz and optionally verify it "
                  "against the PyTorch reference implementation.")
  p.add_argument("--arch", choices=sorted(vit.ARCHS),
                 help="variant; inferred from the checkpoint when omitted (required without "
                      "--checkpoint, to pick the official download)")
  p.add_argument("--checkpoint", type=pathlib.Path,
                 help=".pth / .safetensors / .npz; omitted: download the official weights")
  p.add_argument("--out", type=pathlib.Path, required=True, help="output .npz")
  p.add_argument("--orbax", type=pathlib.Path, default=None,
                 help="also write an orbax checkpoint of the params to this directory")
  p.add_argument("--verify", action="store_true",
                 help="compare Keys / CLS with the PyTorch reference (needs torch)")
  p.add_argument("--verify-sizes", type=_parse_sizes, default=[(224, 224), (224, 336)],
                 help="image sizes HxW for --verify (default 224x224,224x336)")
  p.add_argument("--verify-batch", type=int, default=2)
  p.add_argument("--tolerance", type=float, default=1e-4,
                 help="max abs difference accepted by --verify (default 1e-4)")
  p.add_argument("--seed", type=int, default=0, help="seed of the --verify images")
  p.add_argument("--pos-interpolation", default="auto",
                 choices=("auto",) + tuple(vit.POS_INTERPOLATIONS),
                 help="position-embedding rule recorded in the output: auto (default) = the "
                      "rule of the checkpoint's code, read from its key layout (official -> "
                      "official, Hugging Face -> size, timm register layout -> timm); "
                      "--verify checks this rule against the PyTorch reference")
  p.add_argument("--checkpoint-key", default=None,
                 help="entry of a training checkpoint to convert (default: teacher)")
  p.add_argument("--trust-pickle", action="store_true",
                 help="allow full unpickling of .pth files (DINO training checkpoints)")
  p.add_argument("--cache-dir", type=pathlib.Path, default=None,
                 help="download cache (default $LIGHTCLUSTER_CACHE or ~/.cache/lightcluster)")
  p.add_argument("--base-url", default=None,
                 help="server replacing https://dl.fbaipublicfiles.com (mirrors, tests)")
  p.add_argument("--sha256", default=None, help="expected sha256 of the downloaded file")
  p.add_argument("--no-progress", action="store_true", help="no download progress bar")
  return p


def verify(cfg, params, torch_state_dict, *, sizes, batch: int = 2, seed: int = 0,
           tolerance: float = 1e-4) -> dict:
  """Max abs differences of last-block Keys and final CLS: Flax vs the PyTorch reference.

  Args:
    cfg: the ViTConfig; both models resample position embeddings by its `pos_interpolation`
      (the reference as that rule's peer code does).
    params: Flax params.
    torch_state_dict: official-name arrays loaded strictly into the reference.
    sizes: [(H, W), ...] image sizes (multiples of the patch size).
  """
  import jax
  import torch

  from checkpoints_conversion.torch_reference import VisionTransformer as TorchViT
  from lightcluster_jax import vit

  model = TorchViT.from_config(cfg).eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                         for k, v in torch_state_dict.items()}, strict=True)
  fwd = jax.jit(lambda p, x: vit.apply(p, x, arch=cfg, outputs=("keys", "cls"),
                                       precision="highest"))
  rng = np.random.default_rng(seed)
  dk = dc = 0.0
  per_size = []
  for h, w in sizes:
    x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    with torch.no_grad():
      tk, tc = model.forward_keys_cls(torch.from_numpy(x))
    out = fwd(params, x.transpose(0, 2, 3, 1))
    k_diff = float(np.max(np.abs(np.asarray(out["keys"]) - tk.numpy())))
    c_diff = float(np.max(np.abs(np.asarray(out["cls"]) - tc.numpy())))
    per_size.append({"size": [h, w], "keys": k_diff, "cls": c_diff,
                     "keys_absmax": float(np.max(np.abs(tk.numpy())))})
    dk, dc = max(dk, k_diff), max(dc, c_diff)
  return {"arch": cfg.name, "pos_interpolation": cfg.pos_interpolation,
          "max_abs_diff_keys": dk, "max_abs_diff_cls": dc,
          "ok": bool(dk <= tolerance and dc <= tolerance), "tolerance": tolerance,
          "sizes": per_size}


def main(argv=None) -> int:
  from lightcluster_jax.weights import keymap
  from lightcluster_jax import vit, weights

  args = build_parser().parse_args(argv)
  if args.checkpoint is None and args.arch is None:
    print("error: give --checkpoint, or --arch to download the official weights",
          file=sys.stderr)
    return 2
  for h, w in args.verify_sizes:
    if args.arch is not None:
      p = vit.ARCHS[args.arch].patch_size
      if h % p or w % p:
        print(f"error: --verify-sizes {h}x{w} is not a multiple of the patch size {p}",
              file=sys.stderr)
        return 2
  rule = None if args.pos_interpolation == "auto" else args.pos_interpolation
  try:
    if args.checkpoint is None:
      path = weights.fetch_official(args.arch, args.cache_dir, base_url=args.base_url,
                                    sha256=args.sha256, progress=not args.no_progress)
      print(f"using {path}", file=sys.stderr)
    else:
      path = args.checkpoint
    src_sha = weights.file_sha256(path) if pathlib.Path(path).is_file() else None
    raw = weights.read_checkpoint(path, trust_pickle=args.trust_pickle)
    torch_sd = None
    if isinstance(raw, dict) and "__meta__" in raw:  # already converted: re-save / verify
      arch, params = weights.load(path, pos_interpolation=rule)
      cfg = vit.get_config(arch)
      if args.arch is not None and vit.get_config(
          args.arch, pos_interpolation=cfg.pos_interpolation) != cfg:
        raise weights.WeightsError(f"{path}: converted for {cfg.name!r}, not {args.arch!r}")
      report = {"layout": "converted", "ignored_keys": []}
      torch_sd = keymap.flax_to_official(params, cfg)
    else:
      sd = keymap.unwrap(raw, checkpoint_key=args.checkpoint_key, source=str(path))
      canon, ignored, unknown = keymap.canonicalise(sd, source=str(path))
      cfg = vit.get_config(args.arch or keymap.infer_arch(canon, source=str(path)))
      keymap.check_shapes(canon, cfg, unknown=unknown, source=str(path))
      params = keymap.official_to_flax(canon, cfg)
      kind = keymap.layout(sd)
      cfg = vit.get_config(cfg, pos_interpolation=rule or keymap.pos_interpolation_of(kind))
      report = {"layout": kind, "ignored_keys": sorted(ignored)}
      torch_sd = canon
  except (weights.WeightsError, keymap.CheckpointError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for h, w in args.verify_sizes:
    if h % cfg.patch_size or w % cfg.patch_size:
      print(f"error: --verify-sizes {h}x{w} is not a multiple of the patch size "
            f"{cfg.patch_size}", file=sys.stderr)
      return 2
  if report["ignored_keys"]:
    print(f"ignored keys (not part of the backbone): {', '.join(report['ignored_keys'])}",
          file=sys.stderr)
  source = {"file": pathlib.Path(path).name, "sha256": src_sha, "layout": report["layout"],
            "pos_interpolation_from": "--pos-interpolation" if rule else (
                "file" if report["layout"] == "converted" else "layout")}
  out = weights.save(args.out, cfg, params, source=source, orbax_dir=args.orbax)
  print(f"wrote {out} ({cfg.name}, {len(vit.flatten_params(params))} arrays, layout "
        f"{report['layout']}, position embeddings resampled by the {cfg.pos_interpolation!r} "
        "rule)" + (f"; orbax checkpoint in {args.orbax}" if args.orbax else ""),
        file=sys.stderr)
  if not args.verify:
    print(json.dumps({"arch": cfg.name, "pos_interpolation": cfg.pos_interpolation,
                      "out": str(out), "input_sha256": src_sha}))
    return 0
  try:
    result = verify(cfg, params, torch_sd, sizes=args.verify_sizes, batch=args.verify_batch,
                    seed=args.seed, tolerance=args.tolerance)
  except ImportError as e:
    print(f"error: --verify needs torch (the [convert] extra): {e}", file=sys.stderr)
    return 2
  for s in result["sizes"]:
    print(f"verify {s['size'][0]}x{s['size'][1]}: max|dKeys| {s['keys']:.3g} (|Keys| up to "
          f"{s['keys_absmax']:.3g}), max|dCLS| {s['cls']:.3g}", file=sys.stderr)
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
