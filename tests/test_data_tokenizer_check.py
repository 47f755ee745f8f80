"""tools/tokenizer_check.py: bytes per token and the byte-table check against decoded UTF-8."""
import itertools
import json
import subprocess
import sys

import numpy as np
import sentencepiece as spm

from conftest import FINEWEB, REPO, SP1024, SP8192

import build_shards as bs
import train_gpt as tg

sys.path.insert(0, str(REPO / "tools"))
import tokenizer_check as tc  # noqa: E402

N_DOCS = 40


def run_tool(*args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "tokenizer_check.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    fields = {}
    for line in proc.stdout.splitlines():
        for item in line.split():
            if ":" in item:
                k, v = item.split(":", 1)
                fields.setdefault(k, v)
    return proc, fields


def test_reports_bytes_per_token_of_the_corpus(shared_data):
    proc, f = run_tool("--tokenizer", SP8192, "--input", FINEWEB, "--max-docs", N_DOCS)
    assert proc.returncode == 0, proc.stderr
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    with open(FINEWEB, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in itertools.islice(fh, N_DOCS)]
    ids = [sp.encode(t) for t in texts]
    tokens = sum(map(len, ids))
    decoded = sum(len(sp.decode(i).encode("utf-8")) for i in ids)
    raw = sum(len(t.encode("utf-8")) for t in texts)
    assert int(f["docs"]) == N_DOCS and int(f["tokens"]) == tokens
    assert int(f["table_bytes"]) == int(f["decoded_bytes"]) == decoded
    assert float(f["bytes_per_token"]) == round(decoded / tokens, 4)
    assert float(f["bytes_per_token_with_bos"]) == round(decoded / (tokens + N_DOCS), 4)
    assert float(f["raw_bytes_per_token"]) == round(raw / tokens, 4)
    assert f["byte_tables"] == "ok" and f["mismatched_docs"] == f"0/{N_DOCS}"


def test_checks_stored_shards(shared_data, tmp_path):
    summary = bs.build_shards([FINEWEB], SP1024, tmp_path, val_docs=15, max_docs=30)
    proc, f = run_tool("--tokenizer", SP1024, "--shards", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert int(f["docs"]) == 15 and int(f["tokens"]) == summary["val_tokens"] - 15
    assert f["byte_tables"] == "ok"


def test_detects_wrong_byte_tables(shared_data):
    """A table that miscounts one piece must be caught on exactly the documents that use it."""
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    base, lead, boundary = tg.build_byte_luts(str(SP1024), 1024)
    with open(FINEWEB, encoding="utf-8") as fh:
        docs = [np.array(sp.encode(json.loads(line)["text"])) for line in itertools.islice(fh, 10)]
    assert not tc.check(sp, (base, lead, boundary), docs)["mismatches"]
    piece = sp.piece_to_id("\u2581the")
    wrong = base.clone()
    wrong[piece] += 1
    got = tc.check(sp, (wrong, lead, boundary), docs)["mismatches"]
    want = [(i, int((d == piece).sum())) for i, d in enumerate(docs) if (d == piece).any()]
    assert want and [(i, t - d) for i, t, d in got] == want


def test_split_at_bos():
    docs = tc.split_at_bos(np.array([5, 1, 7, 8, 1, 1, 9]))
    assert [d.tolist() for d in docs] == [[7, 8], [], [9]]


def test_wrong_tokenizer_for_shards_is_an_error(shared_data, tmp_path):
    bs.build_shards([FINEWEB], SP8192, tmp_path, val_docs=5, max_docs=10)
    proc, _ = run_tool("--tokenizer", SP1024, "--shards", tmp_path)
    assert proc.returncode == 2 and "wrong tokenizer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
