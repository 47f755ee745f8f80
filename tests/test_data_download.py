"""The downloader against a fake Hub: a local HTTP server speaking the Hub's resolve protocol.

The real code path runs end to end (huggingface_hub URLs, metadata HEAD, ranged GETs); only the
endpoint differs. The fake repo is exported here from the shared FineWeb sample with the official
sp1024 tokenizer, laid out as the published repos are.
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import FINEWEB, REPO, SP1024

import build_shards as bs
import download_fineweb as dl

REPO_ID = "fake/parameter-golf"
NAME = "fineweb10B_sp1024"


class FakeHub:
    """Serves root/<path> at /datasets/<repo>/resolve/<rev>/<path>, with Range support and faults."""

    def __init__(self, root):
        self.root, self.requests, self.cut = root, [], {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                parts = self.path.split("?")[0].split("/")
                if len(parts) < 7 or parts[1] != "datasets" or "/".join(parts[2:4]) != REPO_ID or parts[4] != "resolve":
                    return None
                path = hub.root.joinpath(*parts[6:])
                return path if path.is_file() else None

            def _headers(self, path, status, start, size):
                data = path.read_bytes()
                self.send_response(status)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                return data

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                size = path.stat().st_size
                self._headers(path, 200, 0, size)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                cut = hub.cut.get(path.name)
                if cut == "down":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                data = self._headers(path, 206 if rng else 200, start, size)
                if isinstance(cut, int):  # send part of the body, drop the connection, then refuse service
                    self.wfile.write(data[start : start + cut])
                    self.wfile.flush()
                    hub.cut[path.name] = "down"
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name=None):
        return [r for r in self.requests if r[0] == "GET" and (name is None or r[1].endswith(name))]


@pytest.fixture(scope="module")
def published(shared_data, tmp_path_factory):
    """A fake published repo: manifest, 2 val + 4 train shards, tokenizer; plus the export summary."""
    root = tmp_path_factory.mktemp("hub")
    ds = root / "datasets" / "datasets" / NAME
    summary = bs.build_shards([FINEWEB], SP1024, ds, val_docs=20, shard_tokens=60_000, max_docs=80)
    (root / "datasets" / "tokenizers").mkdir()
    shutil.copy(SP1024, root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    n_val, n_train = len(summary["val_files"]), len(summary["train_files"])
    assert n_val == 2 and n_train >= 4
    manifest = {
        "datasets": [{"name": NAME, "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": n_val, "files_train": n_train, "docs_val": 20, "tokens_val": summary["val_tokens"]}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root, summary


@pytest.fixture
def hub(published):
    hub = FakeHub(published[0])
    yield hub
    hub.server.shutdown()


def run(hub, data_dir, train_shards=2, endpoint=None, lines=None):
    fetcher = dl.HubFetcher(REPO_ID, endpoint=endpoint or hub.endpoint)
    log = (lines.append if lines is not None else lambda _line: None)
    return dl.download("sp1024", train_shards, fetcher, data_dir=data_dir, log=log)


def cli(*args, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(REPO / "data" / "download_fineweb.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def local(data_dir, name):
    return data_dir / "datasets" / NAME / name


def remote(published, name):
    return published[0] / "datasets" / "datasets" / NAME / name


def test_download_layout_contents_and_val_check(published, hub, tmp_path):
    data = tmp_path / "data"
    summary = run(hub, data)
    names = sorted(p.name for p in (data / "datasets" / NAME).iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
                     "fineweb_val_000001.bin", "manifest.json"]
    for name in names[:-1]:
        assert local(data, name).read_bytes() == remote(published, name).read_bytes()
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == SP1024.read_bytes()
    assert summary["val_docs"] == 20 and summary["val_tokens"] == published[1]["val_tokens"]
    assert summary["val_fingerprint"] == published[1]["val_fingerprint"]


def test_complete_files_are_skipped_without_network(published, hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data)
    hub.requests.clear()
    lines = []
    again = run(hub, data, endpoint="http://127.0.0.1:9", lines=lines)  # nothing listens on port 9
    assert hub.requests == []
    assert any("complete:5 todo:0" in line for line in lines), lines
    assert [line for line in lines if line.startswith("note:")] == [  # the plain export: one knob away from the default
        "note: train_gpt.py reads the CaseOps export by default; run with CASEOPS=0 for this one"]
    assert again["val_fingerprint"] == published[1]["val_fingerprint"]

    run(hub, data, train_shards=3)  # one more shard: only that one is transferred
    assert [r[1].rsplit("/", 1)[1] for r in hub.gets()] == ["manifest.json", "fineweb_train_000002.bin"]


def test_resume_after_truncated_file(published, hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data)
    shard = local(data, "fineweb_train_000001.bin")
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2 + 7])  # a cut-off copy under the final name
    hub.requests.clear()
    lines = []
    run(hub, data, lines=lines)
    assert shard.read_bytes() == full
    assert [r[2] for r in hub.gets("fineweb_train_000001.bin")] == [f"bytes={len(full) // 2 + 7}-"]
    assert any(line.startswith("resume:") for line in lines)


def test_resume_after_dropped_connection(published, hub, tmp_path, monkeypatch):
    """The connection drops mid-file and the server then refuses: the run fails with one message and
    keeps the partial bytes; the next run asks only for the rest."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # write to disk in small pieces
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # huggingface_hub's retry pause
    data = tmp_path / "data"
    name = "fineweb_train_000000.bin"
    hub.cut[name] = 50_000
    with pytest.raises(dl.DownloadError, match="run again to resume"):
        run(hub, data)
    assert local(data, "fineweb_val_000000.bin").is_file()  # finished files are kept
    parts = list((data / "datasets" / NAME).glob(f"{name}.part-*"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size <= 50_000
    kept = parts[0].stat().st_size
    del hub.cut[name]
    hub.requests.clear()
    run(hub, data)
    assert local(data, name).read_bytes() == remote(published, name).read_bytes()
    assert [r[2] for r in hub.gets(name)] == [f"bytes={kept}-"]
    assert not list((data / "datasets" / NAME).glob("*.part-*"))


def test_corrupt_download_is_not_kept(published, hub, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(published[0], root)
    bad = root / "datasets" / "datasets" / NAME / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])  # size no longer matches the header
    hub.root = root
    data = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="fineweb_train_000001.bin is corrupt"):
        run(hub, data)
    assert local(data, "fineweb_train_000000.bin").is_file()
    assert not list((data / "datasets" / NAME).glob("fineweb_train_000001*"))


def test_smaller_validation_split_is_refused(published, hub, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(published[0], root)
    manifest = json.loads((root / "datasets" / "manifest.json").read_text())
    manifest["datasets"][0]["stats"]["docs_val"] = 50_000
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    hub.root = root
    with pytest.raises(dl.DownloadError, match="has 20 documents, expected 50000"):
        run(hub, tmp_path / "data")


def test_cli_errors_are_one_line(hub, tmp_path):
    data = tmp_path / "data"
    t = time.perf_counter()
    proc = cli("--variant", "sp1024", "--repo-id", REPO_ID, "--endpoint", "http://127.0.0.1:9", "--data-dir", data)
    assert time.perf_counter() - t < 30
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot reach http://127.0.0.1:9" in lines[0], proc.stderr
    assert "run.sh" in lines[0]
    assert not data.exists()

    proc = cli("--variant", "sp1024", "--repo-id", REPO_ID, "--data-dir", data, env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    proc = cli("--variant", "sp8192", "--repo-id", REPO_ID, "--endpoint", hub.endpoint, "--data-dir", data)
    assert proc.returncode == 2 and "sp8192 is not published in this repo (it has: sp1024)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    proc = cli("--variant", "sp1024", "--repo-id", "fake/other", "--endpoint", hub.endpoint, "--data-dir", data)
    assert proc.returncode == 2 and "HTTP 404" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_success(published, hub, tmp_path):
    data = tmp_path / "data"
    proc = cli("--variant", "sp1024", "--train-shards", 1, "--endpoint", hub.endpoint, "--data-dir", data,
               env_extra={"MATCHED_FINEWEB_REPO_ID": REPO_ID})
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if line.split(":", 1)[0] in
                  ("val_docs", "val_fingerprint", "train_shards"))
    assert fields == {"val_docs": "20", "val_fingerprint": published[1]["val_fingerprint"], "train_shards": "1"}
    assert "got 4/4" in proc.stdout


# --- The CaseOps export: validation byte sidecar alongside the shards ---------------------------

CASEOPS = "sp400_lossless_caps_caseops_v1_reserved"
CASEOPS_NAME = f"fineweb10B_{CASEOPS}"


@pytest.fixture(scope="module")
def published_caseops(shared_data, tmp_path_factory):
    """A fake CaseOps repo laid out like the published one: 2 val shards, their 2 sidecars, 2+ train shards."""
    import train_tokenizer as tt

    root = tmp_path_factory.mktemp("hub_caseops")
    tok = root / "datasets" / "tokenizers" / f"fineweb_400_bpe{CASEOPS[5:]}.model"  # the published naming
    tt.save_model(tt.train_tokenizer(bs.iter_documents([FINEWEB]), 400, max_docs=40, caseops_ops=True), tok)
    ds = root / "datasets" / "datasets" / CASEOPS_NAME
    summary = bs.build_shards([FINEWEB], tok, ds, val_docs=2, shard_tokens=20_000, max_docs=12, use_caseops=True)
    n_val, n_train = len(summary["val_files"]), len(summary["train_files"])
    assert n_val == 2 and len(summary["sidecar_files"]) == 2 and n_train >= 2
    manifest = {
        "datasets": [{"name": CASEOPS_NAME, "tokenizer_name": "caseops_400",
                      "stats": {"files_val": n_val, "files_train": n_train, "docs_val": 2, "tokens_val": summary["val_tokens"]}}],
        "tokenizers": [{"name": "caseops_400", "model_path": f"tokenizers/{tok.name}"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root, summary, tok


def test_caseops_download_brings_the_sidecar_with_resume_and_checks(published_caseops, hub, tmp_path):
    import torch

    import train_gpt as tg

    root, summary, tok = published_caseops
    hub.root = root
    data, lines = tmp_path / "data", []
    fetcher = dl.HubFetcher(REPO_ID, endpoint=hub.endpoint)
    got = dl.download(CASEOPS, 2, fetcher, data_dir=data, log=lines.append)
    out = data / "datasets" / CASEOPS_NAME
    names = sorted(p.name for p in out.glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
                     "fineweb_val_000001.bin", "fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
    for name in names:
        assert (out / name).read_bytes() == (root / "datasets" / "datasets" / CASEOPS_NAME / name).read_bytes()
    assert got["val_docs"] == 2 and got["val_fingerprint"] == summary["val_fingerprint"]
    assert not any(line.startswith("note:") for line in lines)  # train_gpt.py's default paths (CASEOPS=1) read it
    h = tg.Hyperparameters.from_env({"VOCAB_SIZE": "400", "DATA_DIR": str(data)})
    assert (h.dataset_dir, h.tokenizer_file) == (str(out), got["tokenizer"])
    # What train_gpt.py reads from it: the sidecar's bytes per target.
    val = tg.load_val_tokens(str(out), 64)
    side = tg.load_val_bytes(str(out), val, tg.build_byte_luts(got["tokenizer"], 400, sidecar=True))
    assert int(side.sum()) == int(torch.cat([torch.from_numpy(tg.read_shard(str(p)).astype("int64"))
                                             for p in sorted(out.glob("fineweb_val_bytes_*"))])[1 : val.numel()].sum())

    sidecar = out / "fineweb_val_bytes_000001.bin"
    full = sidecar.read_bytes()
    sidecar.write_bytes(full[: len(full) // 2 + 1])  # cut off under its final name: resumed
    hub.requests.clear()
    dl.download(CASEOPS, 2, fetcher, data_dir=data, log=lambda _l: None)
    assert sidecar.read_bytes() == full
    assert [r[2] for r in hub.gets(sidecar.name)] == [f"bytes={len(full) // 2 + 1}-"]


def test_caseops_sidecar_that_does_not_match_its_shard_is_refused(published_caseops, hub, tmp_path):
    root = tmp_path / "hub"
    shutil.copytree(published_caseops[0], root)
    side = root / "datasets" / "datasets" / CASEOPS_NAME / "fineweb_val_bytes_000000.bin"
    bs.write_shard(side, np.fromfile(side, dtype="<u2", offset=1024)[:-5])
    hub.root = root
    with pytest.raises(dl.DownloadError, match="byte sidecar fineweb_val_bytes_000000.bin does not match"):
        dl.download(CASEOPS, 1, dl.HubFetcher(REPO_ID, endpoint=hub.endpoint), data_dir=tmp_path / "data", log=lambda _l: None)


def test_a_caseops_variant_nobody_publishes_points_to_the_plain_one(capsys):
    """VOCAB_SIZE=1024 ./run.sh on GPUs asks for the CaseOps sp1024 export (CASEOPS=1 is the default)."""
    assert dl.main(["--variant", "sp1024_lossless_caps_caseops_v1_reserved"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no default repo publishes" in err and "CASEOPS=0 trains on the plain sp1024" in err


def test_caseops_alias_names_the_published_export():
    assert dl.ALIASES["caseops"] in dl.DEFAULT_REPOS and dl.vocab_of(dl.ALIASES["caseops"]) == 8192
    assert dl.has_sidecar(dl.ALIASES["caseops"]) and not dl.has_sidecar("sp8192")
