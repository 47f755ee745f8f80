"""The offline default end to end: ./run.sh on a CPU machine with no network and no ../shared/data
builds a corpus from the Python installation's documentation, trains a tokenizer, then trains and
evaluates it (here the tests' tiny config for a few steps, on a few documents)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, clean_environ, tiny_env

import local_corpus
import train_gpt as tg

DOCS = 20


def repo_copy(dest: Path) -> Path:
    """The repository's files (tracked or not ignored) in a directory with no ../shared beside it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy the repository")
    repo = repo_copy(tmp_path_factory.mktemp("machine") / "repo")
    assert not (repo.parent / "shared").exists()
    env = clean_environ()
    env.update(
        # No network: any attempt to reach the Hub or a package index fails at once.
        HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
        CUDA_VISIBLE_DEVICES="", LOCAL_CORPUS_DOCS=str(DOCS), RUN_ID="offline",
        OMP_NUM_THREADS="1",  # tiny matrices: one thread is fastest, and immune to a busy machine
        **tiny_env(iterations=3, train_log_every=1, gptq_calibration_batches=2),
    )
    env.pop("DATA_PATH", None)
    env.pop("TOKENIZER_PATH", None)
    first = subprocess.run(["bash", "run.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    # The second run only has to get as far as the trainer, which stops at once on a malformed knob.
    env["ITERATIONS"] = "three"
    second = subprocess.run(["bash", "run.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    return repo, (first, second)


def test_first_run_builds_corpus_and_trains(offline_runs):
    repo, (first, _) = offline_runs
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert f"corpus source:python-{sys.version.split()[0]} stdlib docs" in out
    assert f"docs:{DOCS} " in out and "tokenizer_train docs:" in out
    assert "final_pre_quant val_loss:" in out and "final_quantized val_loss:" in out
    ds = repo / "data" / "datasets" / f"pydocs_sp1024_docs{DOCS}"
    model = repo / "data" / "tokenizers" / f"pydocs_1024_bpe_docs{DOCS}.model"
    assert f"data_path:{ds.relative_to(repo)}" in out
    info = json.loads((ds / "source.json").read_text())
    assert info["docs"] == DOCS and info["val_docs"] == DOCS // 10
    val = np.asarray(tg.read_shard(str(ds / "fineweb_val_000000.bin")))
    assert int((val == 1).sum()) == DOCS // 10 and len(val) == info["val_tokens"]
    assert tg.build_byte_luts(str(model), 1024)[0].shape == (1024,)


def test_second_run_reuses_the_corpus(offline_runs):
    _, (_, second) = offline_runs
    assert "corpus reuse:" in second.stdout and "tokenizer_train" not in second.stdout, second.stdout
    assert second.returncode == 2 and "ITERATIONS='three'" in second.stderr  # it went on to the trainer


def test_corpus_is_deterministic_and_from_the_installation(tmp_path):
    a = local_corpus.collect_documents(local_corpus.stdlib_root(), max_docs=25)
    b = local_corpus.collect_documents(local_corpus.stdlib_root(), max_docs=25)
    assert a == b and len(a) == 25
    names = [n for n, _ in a]
    assert len(set(names)) == 25 and not [n for n in names if "site-packages" in n or "/test/" in f"/{n}"]
    from pydoc_data import topics

    for name, text in a:
        if name.startswith("pydoc_data/topics.py:"):
            assert text == topics.topics[name.split(":", 1)[1]].strip()


def test_docstrings_in_source_order():
    src = b'"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\ndef g():\n    """Function doc."""\n'
    assert local_corpus.docstrings(src) == "Module doc.\n\nClass doc.\n\nMethod doc.\n\nFunction doc."
    assert local_corpus.docstrings(b"def broken(:\n") == ""
