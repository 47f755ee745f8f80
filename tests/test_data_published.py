"""Which data a run trained and scored on: a published export is recognised by its folder name or by
the manifest.json the download keeps, and its counts are checked (the CaseOps export: at most 80
training shards, 47,851,520 validation targets as #2135 logs them); locally built folders are not.
The run says which in one `record_config` line, and ./run.sh on GPUs downloads the CaseOps export
unless CASEOPS=0."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO, SP1024, TINY

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
# #2135's log: train_shards:80 val_tokens:47851520 (targets cut to a multiple of EVAL_SEQ_LEN 2560)
CLEAN_SHARDS, CLEAN_TARGETS, CUT = 80, 47_851_520, 2560


# --- the pure check --------------------------------------------------------------------------------


@pytest.mark.parametrize("shards, targets", [(80, CLEAN_TARGETS), (10, CLEAN_TARGETS + 1823), (0, CLEAN_TARGETS + CUT - 1)])
def test_the_clean_caseops_export_is_published(tmp_path, shards, targets):
    """Fewer shards (TRAIN_SHARDS=10) are the same export; the full stream (#2014's EVAL_INCLUDE_TAIL
    kept 47,853,343 targets) cuts to the logged count."""
    assert tg.data_kind(str(tmp_path / CASEOPS), shards, targets) == ("sp8192_lossless_caps_caseops_v1_reserved", "published")
    assert tg.data_kind(str(tmp_path / CASEOPS) + "/", shards, targets)[1] == "published"  # DATA_PATH with a slash


@pytest.mark.parametrize("shards, targets, words", [
    (1499, CLEAN_TARGETS, ["1499 training shards", "at most 80"]),  # the overlapping prep (#2127)
    (81, CLEAN_TARGETS, ["81 training shards"]),
    (80, CLEAN_TARGETS - 1, [f"{CLEAN_TARGETS - CUT} validation targets"]),
    (80, CLEAN_TARGETS + CUT, [f"{CLEAN_TARGETS + CUT} validation targets"]),
    (80, 9_569_280, ["9569280 validation targets"]),  # 10,000 validation documents instead of 50,000
])
def test_an_export_with_other_counts_is_refused(tmp_path, shards, targets, words):
    with pytest.raises(tg.ConfigError) as e:
        tg.data_kind(str(tmp_path / CASEOPS), shards, targets)
    msg = str(e.value)
    assert all(w in msg for w in words) and "\n" not in msg
    assert "download_fineweb.py" in msg and "rename it" in msg  # the fix


def manifest(folder, name, files_train, tokens_val):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"datasets": [
        {"name": "fineweb10B_other", "stats": {"files_train": 1, "tokens_val": 5}},
        {"name": name, "stats": {"files_val": 1, "files_train": files_train, "tokens_val": tokens_val}}]}))


def test_a_downloaded_export_is_checked_against_its_manifest(tmp_path):
    folder = tmp_path / "fineweb10B_sp1024"
    manifest(folder, folder.name, 195, 1_000_001)
    assert tg.data_kind(str(folder), 195, 1_000_000) == ("sp1024", "published")
    assert tg.data_kind(str(folder), 3, 1_000_000) == ("sp1024", "published")
    for shards, targets in ((196, 1_000_000), (195, 999_999), (195, 1_000_001)):
        with pytest.raises(tg.ConfigError, match="published export"):
            tg.data_kind(str(folder), shards, targets)


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"datasets": [{"name": "fineweb10B_x", "stats": {}}]}),
                                     json.dumps({"datasets": "none"}), json.dumps([1, 2])])
def test_local_folders_are_not_checked(tmp_path, content):
    """Test and smoke corpora, and a manifest that does not list the folder, are local, whatever their counts."""
    folder = tmp_path / "smoke_sp1024"
    folder.mkdir()
    if content is not None:
        (folder / "manifest.json").write_text(content)
    assert tg.data_kind(str(folder), 1499, 123) == ("smoke_sp1024", "local")


# --- the log line of a run -------------------------------------------------------------------------


def run_tiny(data, tmp_path, run_id):
    h = tg.Hyperparameters(**{**TINY, "iterations": 2, "data_path": str(data), "tokenizer_path": str(SP1024),
                              "run_id": run_id, "log_dir": str(tmp_path), "gptq_calibration_batches": 1})
    rc = tg.train_and_eval(h, CPU)
    return rc, (tmp_path / f"{run_id}.txt").read_text()


def expected_line(data, kind):
    """The line's values from the files, read without train_gpt: sha256 of the tokenizer, shard files, and
    the validation targets cut to a multiple of EVAL_SEQ_LEN."""
    n = sum(np.fromfile(p, dtype="<i4", count=256)[2] for p in data.glob("fineweb_val_*.bin"))
    sha = hashlib.sha256(SP1024.read_bytes()).hexdigest()[:12]
    shards = len(list(data.glob("fineweb_train_*.bin")))
    name = data.name.removeprefix("fineweb10B_")
    return (f"record_config data:{name} kind:{kind} tokenizer_sha:{sha} train_shards:{shards} "
            f"val_tokens:{(n - 1) // TINY['eval_seq_len'] * TINY['eval_seq_len']} byte_count:tables")


def record_line(log):
    lines = [line for line in log.splitlines() if line.startswith("record_config ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_run_logs_what_it_ran_on(dataset, tmp_path):
    rc, log = run_tiny(dataset, tmp_path, "local")
    assert rc == 0 and record_line(log) == expected_line(dataset, "local")
    assert log.index("record_config ") < log.index("train_shards:")  # before any training


def test_a_published_folder_is_logged_as_such_and_refused_with_other_counts(dataset, tmp_path):
    data = tmp_path / "data" / "fineweb10B_sp1024"
    shutil.copytree(dataset, data)
    n_val = sum(len(tg.read_shard(str(p))) for p in data.glob("fineweb_val_*.bin"))
    manifest(data, data.name, 2, n_val)
    rc, log = run_tiny(data, tmp_path, "pub")
    assert rc == 0 and record_line(log) == expected_line(data, "published")
    manifest(data, data.name, 1, n_val)  # the export has 1 training shard, the folder 2
    with pytest.raises(tg.ConfigError, match="holds 2 training shards"):
        run_tiny(data, tmp_path, "over")
    assert not any(line.startswith(("train_shards:", "step:")) for line in (tmp_path / "over.txt").read_text().splitlines())


# --- ./run.sh on GPUs: which export it downloads ---------------------------------------------------


STUB = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  tools/setup_env.py) echo "$0" ;;
  -c) if [[ "$2" == *device_count* ]]; then echo 8; else exec "$STUB_REAL_PYTHON" "$@"; fi ;;
  data/download_fineweb.py) echo "dataset:somewhere"; echo "tokenizer:/dl/tok.model" ;;
  -m) echo "train CASEOPS=${CASEOPS-unset} DATA_PATH=${DATA_PATH-unset} TOKENIZER_PATH=${TOKENIZER_PATH-unset}" ;;
esac
"""


@pytest.fixture
def gpu_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("run.sh", "train_gpt.py"):
        shutil.copy(REPO / name, repo / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls"), "HOME": str(tmp_path),
           "STUB_REAL_PYTHON": sys.executable}

    def run(**extra):
        (tmp_path / "calls").write_text("")
        r = subprocess.run(["bash", str(repo / "run.sh")], env={**env, **extra}, capture_output=True, text=True,
                           timeout=120, cwd=repo)
        downloads = [c for c in (tmp_path / "calls").read_text().splitlines() if c.startswith("data/download_fineweb.py")]
        return r, downloads
    return run


def test_run_sh_on_gpus_downloads_the_caseops_export_and_plain_is_one_knob_away(gpu_repo):
    r, downloads = gpu_repo()
    assert r.returncode == 0, r.stderr
    assert downloads == ["data/download_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 80 --data-dir ./data"]
    assert "train CASEOPS=unset DATA_PATH=unset TOKENIZER_PATH=/dl/tok.model" in r.stdout  # train_gpt.py's default: CaseOps
    r, downloads = gpu_repo(CASEOPS="0")
    assert r.returncode == 0, r.stderr
    assert downloads == ["data/download_fineweb.py --variant sp8192 --train-shards 80 --data-dir ./data"]
    assert "train CASEOPS=0 " in r.stdout
    r, downloads = gpu_repo(DATA_PATH="/my/data")
    assert r.returncode == 0 and downloads == [] and "DATA_PATH=/my/data" in r.stdout
    r, downloads = gpu_repo(CASEOPS="2")
    assert r.returncode == 2 and downloads == [] and r.stderr.startswith("error: CASEOPS=2")
