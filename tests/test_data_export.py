"""Export with a newly trained tokenizer: public settings, determinism, byte tables vs decoded text."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import REPO, SHARED_DATA

import train_gpt as tg

ENWIKI = SHARED_DATA / "corpus" / "enwiki_2015_wikiextractor_sample.jsonl"
FINEWEB = SHARED_DATA / "corpus" / "fineweb_docs_sample200.jsonl"
VAL_DOCS = 25


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """A small slice of both shared corpora, mixed so validation holds both kinds of text."""
    if not ENWIKI.is_file():
        pytest.skip(f"{ENWIKI} not found")
    with open(FINEWEB, encoding="utf-8") as f, open(ENWIKI, encoding="utf-8") as g:
        fw = [json.loads(line)["text"] for line in itertools.islice(f, 90)]
        wiki = [json.loads(line)["text"] for line in itertools.islice(g, 30)]
    docs = [d for pair in itertools.zip_longest(fw[::3], fw[1::3], fw[2::3], wiki) for d in pair if d is not None]
    path = tmp_path_factory.mktemp("corpus") / "slice.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path, docs


@pytest.fixture(scope="module", params=[1024, 4096])
def exported(request, corpus, tmp_path_factory):
    """The same export twice (1 and 2 workers, separate directories)."""
    vocab = request.param
    path, docs = corpus
    runs = []
    for workers in (1, 2):
        root = tmp_path_factory.mktemp(f"export{vocab}_w{workers}")
        proc = export("--input", path, "--vocab-size", vocab, "--out", root / "ds", "--tokenizer-out", root / "tok.model",
                      "--val-docs", VAL_DOCS, "--shard-tokens", 150_000, "--workers", workers, "--max-sentence-length", 1 << 20)
        assert proc.returncode == 0, proc.stderr
        runs.append((root, proc.stdout))
    return vocab, docs, runs


def test_export_is_deterministic(exported):
    _, _, [(a, out_a), (b, out_b)] = exported
    assert (a / "tok.model").read_bytes() == (b / "tok.model").read_bytes()
    names = sorted(p.name for p in (a / "ds").iterdir())
    assert names == sorted(p.name for p in (b / "ds").iterdir())
    assert "fineweb_val_000000.bin" in names and "fineweb_train_000001.bin" in names
    for name in names:
        assert (a / "ds" / name).read_bytes() == (b / "ds" / name).read_bytes(), name
    fp = [line for line in out_a.splitlines() if line.startswith("val_")]
    assert fp == [line for line in out_b.splitlines() if line.startswith("val_")]
    assert f"val_docs:{VAL_DOCS}" in fp


def assert_public_settings(model: str, vocab: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.vocab_size() == vocab
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(vocab)) == 256  # byte fallback
    pieces = [sp.id_to_piece(i) for i in range(vocab) if not sp.is_byte(i)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # split digits
    assert not sp.encode("hello world", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("\ufb01ne  2\u00bd")) == "fine 21\u20442"  # nmt_nfkc: ligature, fraction, spaces
    ids = sp.encode("\u4e2d")
    assert ids and all(sp.is_byte(i) for i in ids)  # an unseen character becomes its UTF-8 bytes


def test_official_tokenizer_passes_the_settings_checks(shared_data):
    assert_public_settings(str(SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"), 1024)


def test_tokenizer_has_public_settings(exported):
    vocab, _, [(root, _), _] = exported
    assert_public_settings(str(root / "tok.model"), vocab)


def test_shards_hold_the_documents_and_tables_match_decoded_utf8(exported):
    """Every validation document decodes to its normalized source text, and the eval's byte tables
    count exactly the UTF-8 bytes of that decoded text."""
    vocab, docs, [(root, _), _] = exported
    model = str(root / "tok.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    luts = tg.build_byte_luts(model, vocab)
    val = np.concatenate([np.asarray(tg.read_shard(str(p))) for p in sorted((root / "ds").glob("fineweb_val_*.bin"))])
    starts = np.flatnonzero(val == 1)
    assert val[0] == 1 and len(starts) == VAL_DOCS
    stream = torch.from_numpy(val.astype(np.int64))
    per_target = tg.target_bytes(stream[:-1], stream[1:], luts)
    ends = list(starts[1:]) + [len(val)]
    for k, (s, e) in enumerate(zip(starts, ends)):
        ids = val[s + 1 : e].tolist()
        text = sp.decode(ids)
        assert text == sp.normalize(docs[k]).replace("\u2581", " "), k
        table = int(per_target[s : e - 1].sum())  # targets s+1 .. e-1 are this document's ids
        assert table == len(text.encode("utf-8")), (k, table)


def test_refuses_vocab_larger_than_the_text_supports(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"tiny document number {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    proc = export("--input", small, "--vocab-size", 4096, "--out", tmp_path / "ds", "--tokenizer-out", tmp_path / "t.model",
                  "--val-docs", 1)
    one_line_error(proc, "instead of 4096")
    assert not (tmp_path / "t.model").exists() and not (tmp_path / "ds").exists()


def test_refusals_come_before_training(corpus, tmp_path):
    path, docs = corpus
    existing = tmp_path / "t.model"
    existing.write_bytes(b"keep")
    proc = export("--input", path, "--vocab-size", 1024, "--out", tmp_path / "ds", "--tokenizer-out", existing)
    one_line_error(proc, "already exists")
    assert existing.read_bytes() == b"keep"

    proc = export("--input", path, "--vocab-size", 1024, "--out", tmp_path / "ds", "--tokenizer-out", tmp_path / "new.model",
                  "--val-docs", len(docs))
    one_line_error(proc, f"only {len(docs)} documents", "--val-docs")
    assert "tokenizer_train" not in proc.stdout
    assert not (tmp_path / "new.model").exists() and not (tmp_path / "ds").exists()
