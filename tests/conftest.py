"""Shared fixtures: the test assets (../shared/assets or $LIGHTCLUSTER_ASSETS)."""

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The CLI turns JAX's persistent compilation cache on (in ~/.cache): tests that call it
# in-process must not change this process's JAX configuration or write to the home folder.
os.environ.setdefault("LIGHTCLUSTER_COMPILATION_CACHE", "off")


def assets_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LIGHTCLUSTER_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> pathlib.Path:
  path = assets_dir()
  if not (path / "voc2012").is_dir():
    pytest.skip(f"test assets not found at {path} (set LIGHTCLUSTER_ASSETS)")
  return path


@pytest.fixture(scope="session")
def dinov2_s14_npz(assets) -> pathlib.Path:
  path = assets / "dinov2" / "dinov2_vits14_imgfocus_backbone.npz"
  if not path.is_file():
    pytest.skip(f"real DINOv2-S/14 weights not found at {path}")
  return path


@pytest.fixture(scope="session")
def voc_ids(assets) -> list[str]:
  lst = assets / "voc2012" / "ImageSets" / "Segmentation" / "val_with_images.txt"
  return lst.read_text().split()


@pytest.fixture
def fast_compile():
  """Tiny test problems are dominated by XLA compile time: skip most optimizations."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Frees XLA executables after each test module: the whole suite compiles hundreds of
  programs, and keeping all of them grows one pytest process by gigabytes."""
  yield
  jax.clear_caches()
