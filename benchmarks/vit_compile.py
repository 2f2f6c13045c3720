"""XLA compile time and forward time of the ViT with its blocks scanned vs unrolled.

  python benchmarks/vit_compile.py                      # DINOv2-S/14, the pipeline's shapes
  python benchmarks/vit_compile.py --repeats 3 --forward-runs 5

What is timed, per image shape and per variant of `vit.make_apply_fn(..., scan_blocks=...)`:
  trace_s:    `fn.lower(params, images, mask)` (Python tracing + StableHLO lowering);
  compile_s:  `lowered.compile()` (the XLA compile; `jax.clear_caches()` before each lowering,
              no persistent compilation cache), median over --repeats;
  forward_s:  one call of the compiled executable on random images, median of --forward-runs.
The request is the pipeline's: features stage "keys", "cls", "cls_attn" of the last block with
a padding mask (one image per bucket, batch 1 on CPU); region crops "cls" only, no mask. The
two variants alternate (and swap order every repeat) so a shared machine's noise hits both.
Params are random (`vit.init_params`): timings do not depend on the values.
Last line: one JSON object {"arch", "results": [{"shape", "compile_s": {"unrolled", "scan"},
"forward_s": {...}, "compile_ratio", "forward_ratio"}], "total_compile_s", ...}; ratios are
scan / unrolled (compile_ratio < 1: faster compiles; forward_ratio ~ 1: same runtime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

# (name, batch, H, W, outputs, masked): the features stage's buckets and the region crops.
SHAPES = (
    ("448x602", 1, 448, 602, ("keys", "cls", "cls_attn"), True),
    ("602x448", 1, 602, 448, ("keys", "cls", "cls_attn"), True),
    ("448x448", 1, 448, 448, ("keys", "cls", "cls_attn"), True),
    ("crops16x224", 16, 224, 224, ("cls",), False),
)
VARIANTS = (("unrolled", False), ("scan", True))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--arch", default="dinov2_vits14")
  ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                  help="comma-separated subset of " + ", ".join(s[0] for s in SHAPES))
  ap.add_argument("--repeats", type=int, default=2, help="compiles per shape and variant")
  ap.add_argument("--forward-runs", type=int, default=5)
  args = ap.parse_args(argv)

  import jax

  from lightcluster_jax import vit

  cfg = vit.get_config(args.arch)
  params = vit.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  wanted = args.shapes.split(",")
  results = []
  for name, b, h, w, outputs, masked in SHAPES:
    if name not in wanted:
      continue
    p = cfg.patch_size
    images = rng.standard_normal((b, h, w, 3)).astype(np.float32)
    call = (params, images)
    if masked:
      mask = np.zeros((b, h // p, w // p), bool)
      mask[:, : h // p - 2, : w // p - 3] = True  # an image padded into its bucket
      call += (mask,)
    trace, comp, compiled = {}, {}, {}
    for r in range(args.repeats):
      for label, scan in VARIANTS[::-1] if r % 2 else VARIANTS:
        fn = vit.make_apply_fn(cfg, outputs=outputs, scan_blocks=scan)
        jax.clear_caches()
        t0 = time.perf_counter()
        lowered = fn.lower(*call)
        t1 = time.perf_counter()
        compiled[label] = lowered.compile()
        t2 = time.perf_counter()
        trace.setdefault(label, []).append(t1 - t0)
        comp.setdefault(label, []).append(t2 - t1)
        print(f"{name} {label:8s} repeat {r}: trace {t1 - t0:.2f} s, compile {t2 - t1:.2f} s",
              flush=True)
    outs = {label: compiled[label](*call) for label, _ in VARIANTS}  # warm-up
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
               for a, c in zip(jax.tree.leaves(outs["unrolled"]), jax.tree.leaves(outs["scan"])))
    fwd = {}
    for r in range(args.forward_runs):
      for label, _ in VARIANTS[::-1] if r % 2 else VARIANTS:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[label](*call))
        fwd.setdefault(label, []).append(time.perf_counter() - t0)
    med = lambda d: {k: round(statistics.median(v), 3) for k, v in d.items()}  # noqa: E731
    row = {"shape": name, "batch": b, "outputs": list(outputs), "masked": masked,
           "trace_s": med(trace), "compile_s": med(comp), "forward_s": med(fwd),
           "max_abs_diff": diff}
    row["compile_ratio"] = round(row["compile_s"]["scan"] / row["compile_s"]["unrolled"], 3)
    row["forward_ratio"] = round(row["forward_s"]["scan"] / row["forward_s"]["unrolled"], 3)
    print(f"{name}: compile {row['compile_s']} (x{row['compile_ratio']}), "
          f"trace {row['trace_s']}, forward {row['forward_s']} (x{row['forward_ratio']}), "
          f"max |diff| {diff:.2e}", flush=True)
    results.append(row)

  total = {label: round(sum(r["compile_s"][label] + r["trace_s"][label] for r in results), 2)
           for label, _ in VARIANTS}
  print(json.dumps({
      "arch": cfg.name, "backend": jax.default_backend(), "cpus": jax.device_count(),
      "results": results, "total_trace_plus_compile_s": total,
      "total_ratio": round(total["scan"] / total["unrolled"], 3),
      "max_compile_ratio": max(r["compile_ratio"] for r in results),
      "max_forward_ratio": max(r["forward_ratio"] for r in results)}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
