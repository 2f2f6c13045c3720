"""Downloads of official weights, against a local HTTP server on 127.0.0.1 (never the internet).

Checks: atomic download with progress bar, sha256 checks (given, and recorded at the first
download then re-checked), truncated responses and HTTP errors, the cache layout mirroring the
official URL, and `lightcluster convert --arch dino_vits8` without --checkpoint.
"""

import hashlib
import http.server
import json
import threading

import numpy as np
import pytest

from lightcluster_jax import cli, vit, weights


class _Server:
  """Serves `files` {url path: bytes}; `short` paths announce more bytes than they send."""

  def __init__(self):
    self.files, self.short, self.hits = {}, set(), []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        server.hits.append(self.path)
        data = server.files.get(self.path)
        if data is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) + (100 if self.path in server.short
                                                            else 0)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def test_download_with_sha256_and_progress(server, tmp_path, capsys):
  data = np.random.default_rng(0).bytes(3_000_000)
  server.files["/a/file.bin"] = data
  digest = hashlib.sha256(data).hexdigest()
  dest = weights.download(server.url + "/a/file.bin", tmp_path / "x" / "file.bin",
                          sha256=digest)
  assert dest.read_bytes() == data
  err = capsys.readouterr().err
  assert "file.bin" in err and "100%" in err  # tqdm progress bar on stderr
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == [dest]  # no temporary file left


def test_download_failures_leave_no_file(server, tmp_path):
  server.files["/f"] = b"hello world"
  with pytest.raises(weights.WeightsError, match="does not match the expected"):
    weights.download(server.url + "/f", tmp_path / "f", sha256="0" * 64, progress=False)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]
  server.files["/short"] = b"x" * 1000
  server.short.add("/short")
  with pytest.raises(weights.WeightsError, match="short|received|download failed|Incomplete"):
    weights.download(server.url + "/short", tmp_path / "s", progress=False, timeout=5)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]
  with pytest.raises(weights.WeightsError, match="404"):
    weights.download(server.url + "/missing", tmp_path / "m", progress=False)
  assert not (tmp_path / "m").exists()


def test_fetch_official_caches_records_and_rechecks_the_hash(server, tmp_path):
  rel = "/" + weights.OFFICIAL_FILES["dino_vits8"]
  assert rel == "/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
  assert weights.official_url("dino_vits8") == ("https://dl.fbaipublicfiles.com/dino/"
                                                "dino_deitsmall8_pretrain/"
                                                "dino_deitsmall8_pretrain.pth")
  server.files[rel] = b"fake checkpoint bytes"
  path = weights.fetch_official("dino_vits8", tmp_path, base_url=server.url, progress=False)
  assert path == tmp_path / rel.lstrip("/")
  assert path.read_bytes() == b"fake checkpoint bytes"
  record = path.with_name(path.name + ".sha256").read_text().split()[0]
  assert record == hashlib.sha256(b"fake checkpoint bytes").hexdigest()
  # Second call: served from the cache, no request.
  n = len(server.hits)
  assert weights.fetch_official("dino_vits8", tmp_path, base_url=server.url) == path
  assert len(server.hits) == n
  # A cached file that changed (truncated, replaced) is refused.
  path.write_bytes(b"fake checkpoint")
  with pytest.raises(weights.WeightsError, match="recorded .first download"):
    weights.fetch_official("dino_vits8", tmp_path, base_url=server.url)
  # A pinned hash is enforced on download.
  server.files["/" + weights.OFFICIAL_FILES["dino_vits16"]] = b"abc"
  with pytest.raises(weights.WeightsError, match="does not match"):
    weights.fetch_official("dino_vits16", tmp_path, base_url=server.url, sha256="1" * 64,
                           progress=False)
  with pytest.raises(ValueError, match="unknown ViT architecture"):
    weights.fetch_official("resnet50", tmp_path, base_url=server.url)


def test_cli_convert_downloads_official_dino_vits8(server, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from lightcluster_jax.weights import keymap

  cfg = vit.get_config("dino_vits8")
  rng = np.random.default_rng(0)
  sd = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.02)
        for k, s in keymap.official_shapes(cfg).items()}
  blob = tmp_path / "blob.pth"
  torch.save(sd, blob)
  server.files["/" + weights.OFFICIAL_FILES["dino_vits8"]] = blob.read_bytes()
  out = tmp_path / "dino_vits8.npz"
  rc = cli.main(["convert", "--arch", "dino_vits8", "--out", str(out), "--base-url",
                 server.url, "--cache-dir", str(tmp_path / "cache")])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  assert "dino_deitsmall8_pretrain.pth" in captured.err  # progress bar / cache path
  res = json.loads(captured.out.strip().splitlines()[-1])
  assert res["arch"] == "dino_vits8"
  assert res["input_sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
  arch, params = weights.load(out)
  assert arch == "dino_vits8"
  np.testing.assert_array_equal(params["cls_token"], sd["cls_token"].numpy())
