"""Model weights: the converted `.npz` format, on-the-fly conversion of official / Hugging Face /
timm checkpoints (`keymap`, NumPy only), and verified downloads.

`checkpoints_conversion/` (the `lightcluster convert` command with its PyTorch parity check)
builds on this package; this package never imports it.
"""

from lightcluster_jax.weights import keymap
from lightcluster_jax.weights.resolve import load_for_run
from lightcluster_jax.weights.store import (FORMAT, OFFICIAL_BASE_URL, OFFICIAL_FILES,
                                            WeightsError, default_cache_dir, download,
                                            fetch_official, file_sha256, load, load_any,
                                            official_url, read_checkpoint, save, save_orbax)
