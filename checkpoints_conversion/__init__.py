"""Checkpoint conversion: official DINO / DINOv2 and Hugging Face weights -> Flax params.

Modules: `keymap` (NumPy-only key layouts and mapping), `convert` (the `lightcluster convert`
subcommand, `main(argv) -> int`), `torch_reference` (a PyTorch reference ViT written from the
official model code; needs torch).
"""
