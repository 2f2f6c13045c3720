"""The Colab notebooks in colab/: they run top to bottom headless, and are stored clean.

Each notebook reads `LIGHTCLUSTER_NOTEBOOK_SMOKE=1` in its first cell and then uses small
images, few of them and few k-means restarts; the inputs are the sample photos shipped in the
package and the shared test assets (`LIGHTCLUSTER_ASSETS`, default ../shared/assets: 9 VOC
images with GT, DINOv2-S/14 weights), so nothing is downloaded. A notebook whose inputs are
absent is skipped with the reason. The kernel is `python3`, i.e. this interpreter (jupyter_client
replaces a kernelspec's "python" by sys.executable). Outputs go to a temporary folder
(`LIGHTCLUSTER_NOTEBOOK_OUT`). Compiled XLA programs are kept in a persistent JAX
compilation cache in pytest's cache folder (.pytest_cache/d/lightcluster_jax_xla), shared by
the notebooks and by later runs (the dense CRF alone compiles for ~50 s on 2 busy cores).

Notebooks are committed without outputs; after editing one in Jupyter, strip it with
  python tests/test_notebooks.py --strip
"""

import json
import os
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("quickstart", "evaluate_voc", "convert_checkpoint", "dino_vs_dinov2")


# ----------------------------------------------------------------------------- stripping


def strip_notebook(nb) -> bool:
  """Removes outputs, execution counts and volatile metadata in place; True if it changed."""
  changed = False
  for cell in nb.cells:
    if cell.cell_type == "code":
      if cell.get("outputs") or cell.get("execution_count") is not None:
        changed = True
      cell["outputs"], cell["execution_count"] = [], None
    for key in ("execution", "collapsed", "scrolled", "ExecuteTime"):
      if key in cell.metadata:
        del cell.metadata[key]
        changed = True
  for key in ("widgets", "papermill"):
    if key in nb.metadata:
      del nb.metadata[key]
      changed = True
  return changed


def _strip_files(paths) -> int:
  import nbformat
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    if strip_notebook(nb):
      nbformat.write(nb, path)
      print(f"stripped {path}")
  return 0


# ----------------------------------------------------------------------------- checks


def _load(name):
  nbformat = pytest.importorskip("nbformat")
  return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_listed():
  assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_and_valid(name):
  nbformat = pytest.importorskip("nbformat")
  nb = _load(name)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and
           (c.outputs or c.execution_count is not None)]
  assert not dirty, (f"{name}.ipynb has stored outputs in cells {dirty}; run "
                     "`python tests/test_notebooks.py --strip`")
  assert "widgets" not in nb.metadata


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_on_colab_and_reads_smoke_flag(name):
  nb = _load(name)
  first_code = next(c.source for c in nb.cells if c.cell_type == "code")
  assert 'IN_COLAB = "google.colab" in sys.modules' in first_code
  assert "lightcluster_jax[notebooks] @ git+{REPO_URL}" in first_code
  assert "jax.devices()" in first_code
  assert 'os.environ.get("LIGHTCLUSTER_NOTEBOOK_SMOKE") == "1"' in first_code
  # The Colab link in the notebook and the install URL name the same repository.
  repo = re.search(r'REPO_URL = "https://github.com/([^"]+)"', first_code).group(1)
  assert f"colab.research.google.com/github/{repo}/blob/main/colab/{name}.ipynb" in \
      nb.cells[0].source
  assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


# ----------------------------------------------------------------------------- execution


@pytest.fixture(scope="session")
def jax_cache(pytestconfig):
  return pytestconfig.cache.mkdir("lightcluster_jax_xla")


def _execute(name, tmp_path, env, *, timeout=600):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")
  nb = _load(name)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update({k: str(v) for k, v in env.items()})
  try:
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(COLAB)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _env(tmp_path, jax_cache, assets, **extra):
  return {"LIGHTCLUSTER_NOTEBOOK_SMOKE": "1", "LIGHTCLUSTER_ASSETS": str(assets),
          "LIGHTCLUSTER_NOTEBOOK_OUT": str(tmp_path / "out"), "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
          "LIGHTCLUSTER_CACHE": str(tmp_path / "weights_cache"), **extra}


def _text(nb) -> str:
  """All stream / text outputs of an executed notebook."""
  parts = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      if o.get("output_type") == "stream":
        parts.append(o.get("text", ""))
      elif "data" in o and "text/plain" in o["data"]:
        parts.append(o["data"]["text/plain"])
  return "".join(parts)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_runs(tmp_path, jax_cache, assets, dinov2_s14_npz):
  nb = _execute("quickstart", tmp_path, _env(
      tmp_path, jax_cache, assets, LIGHTCLUSTER_WEIGHTS=dinov2_s14_npz,
      LIGHTCLUSTER_QUICKSTART_PANEL=tmp_path / "panel.png"))
  text = _text(nb)
  assert "the same masks as the pipeline's masks stage: True" in text
  assert (tmp_path / "panel.png").is_file()
  assert len(list((tmp_path / "out").glob("max_side_*/masks/*.png"))) == 4
  assert _images(nb) >= 6


def test_evaluate_voc_runs(tmp_path, jax_cache, assets, dinov2_s14_npz):
  nb = _execute("evaluate_voc", tmp_path, _env(
      tmp_path, jax_cache, assets, LIGHTCLUSTER_WEIGHTS=dinov2_s14_npz))
  text = _text(nb)
  assert "mIoU" in text and "matches evaluate_folders: True" in text
  summary = json.loads((tmp_path / "out" / "scores.json").read_text())
  assert summary["num_images"] == 4 and 0.0 <= summary["miou"] <= 1.0
  assert _images(nb) >= 3


def test_convert_checkpoint_runs(tmp_path, jax_cache, assets, dinov2_s14_npz):
  pytest.importorskip("torch")
  nb = _execute("convert_checkpoint", tmp_path, _env(
      tmp_path, jax_cache, assets, LIGHTCLUSTER_CHECKPOINT=dinov2_s14_npz))
  text = _text(nb)
  assert '"ok": true' in text
  assert (tmp_path / "out" / "dinov2_vits14.npz").is_file()


def test_dino_vs_dinov2_runs(tmp_path, jax_cache, assets, dinov2_s14_npz):
  nb = _execute("dino_vs_dinov2", tmp_path, _env(tmp_path, jax_cache, assets))
  text = _text(nb)
  assert "dinov2_vits14" in text
  assert "missing" in text and "dino_vits8" in text  # v1 weights are not available offline
  assert _images(nb) >= 3


if __name__ == "__main__":
  if sys.argv[1:2] == ["--strip"]:
    sys.exit(_strip_files(sys.argv[2:] or sorted(COLAB.glob("*.ipynb"))))
  print(__doc__)
