"""Flax ViT forward vs the PyTorch reference with the same weights: images/s, side by side.

  python benchmarks/vit_forward.py                       # ViT-S/16 and S/8, batch 8, 224 and 448
  python benchmarks/vit_forward.py --ablations           # + torch SDPA and JAX full-attention rows

What is timed: the request LightCluster makes (last-block Keys of the patches + final CLS) on
a batch of random ImageNet-normalised images, float32, compile / warm-up excluded.
  jax:   `lightcluster_jax.vit.make_apply_fn(arch)` (jitted; default attention "auto").
  torch: `checkpoints_conversion.torch_reference` (the official DINO model code: attention as
         softmax(q k^T) v with the [B, H, T, T] matrix materialised) in `torch.inference_mode`,
         Keys taken with a forward hook on the last `attn.qkv` as a PyTorch user would.
Ablations (--ablations): torch with `F.scaled_dot_product_attention` (fused flash kernel, not
the official code), torch with 1 thread (its best setting when the CPU is oversubscribed),
and JAX with attention as batched einsums ("full", the naive port); `ratio_vs_best_torch`
compares JAX with the fastest torch row.
The machine may be shared: the variants are interleaved in every repeat and medians reported.
Last line: one JSON object {"results": [{"arch", "size", "jax_img_s", "torch_img_s",
"ratio", ...}], "min_ratio": ...}, ratio = jax / torch images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--archs", default="dino_vits16,dino_vits8")
  ap.add_argument("--sizes", default="224,448")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--ablations", action="store_true",
                  help="also time torch SDPA and JAX with materialised attention")
  ap.add_argument("--no-torch", action="store_true", help="JAX only (e.g. on a GPU machine)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                  help="JAX compute dtype (bfloat16 for accelerators)")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from lightcluster_jax.weights import keymap
  from lightcluster_jax import vit

  torch = None
  if not args.no_torch:
    import torch
    from checkpoints_conversion import torch_reference as tref

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  results = []
  for arch in args.archs.split(","):
    cfg = vit.get_config(arch)
    if torch is not None:
      model = tref.randomize_(tref.VisionTransformer.from_config(cfg), 0).eval()
      sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
      sdpa = None
      if args.ablations:
        sdpa = tref.VisionTransformer.from_config(cfg, attn_impl="sdpa").eval()
        sdpa.load_state_dict(model.state_dict())
    else:
      sd = {k: np.random.default_rng(0).standard_normal(s).astype(np.float32) * 0.02
            for k, s in keymap.official_shapes(cfg).items()}
    params = jax.device_put(keymap.official_to_flax(sd, cfg))
    for size in (int(s) for s in args.sizes.split(",")):
      x = np.random.default_rng(1).standard_normal((args.batch, size, size, 3)).astype(
          np.float32)
      xj = jax.device_put(x)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) if torch is not None else None
      runners = {"jax": lambda: jax.block_until_ready(
          vit.make_apply_fn(cfg, dtype=dtype)(params, xj))}
      if args.ablations:
        runners["jax_full_attn"] = lambda: jax.block_until_ready(
            vit.make_apply_fn(cfg, dtype=dtype, attn_impl="full")(params, xj))
      if torch is not None:
        def run_torch(m=model):
          with torch.inference_mode():
            return m.forward_keys_cls(xt)
        runners["torch"] = run_torch
        if args.ablations:
          runners["torch_sdpa"] = lambda: run_torch(sdpa)

          def run_torch_1thread():
            # On a shared (oversubscribed) CPU, OpenMP barriers across 2 threads can cost
            # more than they gain; 1 thread is then torch's best setting.
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
              return run_torch()
            finally:
              torch.set_num_threads(n)
          runners["torch_1thread"] = run_torch_1thread
      # Warm-up (compiles JAX) and a correctness check of the pair being compared.
      outs = {name: fn() for name, fn in runners.items()}
      diff = None
      if torch is not None:
        diff = float(np.max(np.abs(np.asarray(outs["jax"]["keys"]) - outs["torch"][0].numpy())))
      times = {name: [] for name in runners}
      for _ in range(args.repeats):
        for name, fn in runners.items():
          t0 = time.perf_counter()
          fn()
          times[name].append(time.perf_counter() - t0)
      med = {name: float(np.median(ts)) for name, ts in times.items()}
      row = {"arch": arch, "size": size, "batch": args.batch,
             "jax_img_s": args.batch / med["jax"]}
      if torch is not None:
        row["torch_img_s"] = args.batch / med["torch"]
        row["ratio"] = row["jax_img_s"] / row["torch_img_s"]
        row["max_abs_diff_keys"] = diff
      for name in runners:
        if name not in ("jax", "torch"):
          row[f"{name}_img_s"] = args.batch / med[name]
      torch_rows = [k for k in row if k.startswith("torch") and k.endswith("img_s")]
      if args.ablations and torch_rows:
        row["ratio_vs_best_torch"] = row["jax_img_s"] / max(row[k] for k in torch_rows)
      row["tokens"] = 1 + (size // cfg.patch_size) ** 2
      results.append(row)
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()), flush=True)
  summary = {
      "benchmark": "vit_forward", "device": _cpu_name(), "jax_backend": jax.default_backend(),
      "jax_devices": [d.device_kind for d in jax.devices()], "cpu_count": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0], "dtype": args.dtype, "repeats": args.repeats,
      "torch_threads": torch.get_num_threads() if torch is not None else None,
      "results": results}
  if torch is not None:
    summary["min_ratio"] = min(r["ratio"] for r in results)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
