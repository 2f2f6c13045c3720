"""The CLI's persistent compilation cache: where it goes, how to turn it off, and that a
second process reuses what the first compiled (a fresh process, as a user runs it)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from lightcluster_jax.apps import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  for var in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "LIGHTCLUSTER_CACHE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.cache_dir() == tmp_path / "xdg" / "lightcluster" / "xla"
  monkeypatch.setenv("LIGHTCLUSTER_CACHE", str(tmp_path / "lc"))
  assert compile_cache.cache_dir() == tmp_path / "lc" / "xla"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.cache_dir() == tmp_path / "jax"
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.cache_dir() == tmp_path / "mine"
  for off in ("off", "0", "", "OFF"):
    monkeypatch.setenv(compile_cache.ENV, off)
    assert compile_cache.cache_dir() is None


_PROBE = """
import jax, jax.numpy as jnp
from lightcluster_jax.apps import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print(compile_cache.enable(min_compile_secs=0))
jax.jit(lambda x: jnp.linalg.svd(x @ x.T + jnp.sin(x).sum())[0].sum())(jnp.ones((64, 64)))
print(sum("cache_hits" in e for e in events), sum("cache_misses" in e for e in events))
"""


@pytest.mark.parametrize("setting", ["folder", "off"])
def test_second_process_reads_the_cache(tmp_path, setting):
  folder = tmp_path / "xla"
  env = dict(os.environ, **{compile_cache.ENV: str(folder) if setting == "folder" else "off"})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  runs = [subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, cwd=REPO) for _ in range(2)]
  first_line = runs[0].stdout.splitlines()[0]
  if setting == "off":
    assert first_line == "None" and not folder.exists()
    return
  assert first_line == str(folder)
  hits, misses = zip(*(map(int, r.stdout.splitlines()[1].split()) for r in runs))
  assert hits[0] == 0 and misses[0] >= 1, runs[0].stdout   # the first process compiles
  assert hits[1] >= 1 and misses[1] == 0, runs[1].stdout   # the second only reads
  assert any(p.is_file() for p in folder.rglob("*"))
