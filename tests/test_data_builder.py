import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCRIPT = REPO / "data" / "build_shards.py"
FINEWEB = SHARED_DATA / "corpus" / "fineweb_docs_sample200.jsonl"
SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"

sys.path.insert(0, str(REPO / "data"))
import build_shards as bs  # noqa: E402

N_DOCS = 60
VAL_DOCS = 10
SHARD_TOKENS = 5000


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reader written from the format spec alone, independent of build_shards."""
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=256 * 4)
    return header, tokens


def read_split(out_dir: Path, split: str) -> tuple[list[Path], list[np.ndarray]]:
    files = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    return files, [read_shard(f)[1] for f in files]


@pytest.fixture(scope="module")
def shared_data():
    if not (FINEWEB.is_file() and SP1024.is_file()):
        pytest.skip(f"shared data not found under {SHARED_DATA}")


@pytest.fixture(scope="module")
def docs(shared_data) -> list[str]:
    with open(FINEWEB, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(N_DOCS), f)]


@pytest.fixture(scope="module")
def expected(docs) -> list[np.ndarray]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    return [np.array([1] + sp.encode(d), dtype=np.int64) for d in docs]


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """Build the same dataset with 1 and 2 workers, once for the whole module."""
    results = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"shards_w{workers}")
        summary = bs.build_shards([FINEWEB], SP1024, out, VAL_DOCS, SHARD_TOKENS, workers, max_docs=N_DOCS)
        results[workers] = (out, summary)
    return results


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_write_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 42, 1023, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_val_000000.bin"
    bs.write_shard(path, tokens)

    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert not Path(f"{path}.tmp").exists()
    header, body = read_shard(path)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
    assert not header[3:].any()
    np.testing.assert_array_equal(body, tokens)


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    path = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match="uint16"):
        bs.write_shard(path, np.array([1, 65536], dtype=np.int64))
    assert not path.exists() and not Path(f"{path}.tmp").exists()


@pytest.mark.parametrize("split, lo, hi", [("val", 0, VAL_DOCS), ("train", VAL_DOCS, N_DOCS)])
def test_splits_match_direct_encoding(built, expected, split, lo, hi):
    out, summary = built[1]
    files, shards = read_split(out, split)
    want = np.concatenate(expected[lo:hi])

    assert len(files) > 1, "shard_tokens should be small enough to force several shards"
    assert [str(f) for f in files] == summary[f"{split}_files"]
    for f, tokens in zip(files, shards):
        header, _ = read_shard(f)
        assert header[2] == len(tokens)
        assert f.stat().st_size == 1024 + 2 * len(tokens)
    assert all(len(t) == SHARD_TOKENS for t in shards[:-1])
    assert 0 < len(shards[-1]) <= SHARD_TOKENS

    got = np.concatenate(shards)
    np.testing.assert_array_equal(got, want)
    assert int((got == 1).sum()) == hi - lo == summary[f"{split}_docs"]
    assert summary[f"{split}_tokens"] == len(want)


def test_summary_lists_val_before_train_and_fingerprint(built, expected):
    _, summary = built[1]
    assert summary["files"] == summary["val_files"] + summary["train_files"]
    val_bytes = np.concatenate(expected[:VAL_DOCS]).astype("<u2").tobytes()
    assert summary["val_fingerprint"] == hashlib.sha256(val_bytes).hexdigest()[:16]


def test_worker_count_does_not_change_output(built):
    (out1, s1), (out2, s2) = built[1], built[2]
    assert s1["val_fingerprint"] == s2["val_fingerprint"]
    names1 = sorted(p.name for p in out1.iterdir())
    assert names1 == sorted(p.name for p in out2.iterdir())
    for name in names1:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_encode_documents_prepends_bos(docs, expected):
    got = bs.encode_documents(docs[:3], SP1024, workers=2)
    assert len(got) == 3
    for g, e in zip(got, expected[:3]):
        np.testing.assert_array_equal(g, e)


def test_iter_documents_reads_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("plain text\nsecond line\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert list(bs.iter_documents([txt, jsonl])) == ["plain text\nsecond line\n", "one", "two"]


@pytest.mark.parametrize("line, reason", [("{not json", "malformed JSON"), ('{"body": "x"}', '"text"')])
def test_iter_documents_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        list(bs.iter_documents([path]))
    assert f"{path}:2" in str(err.value) and reason in str(err.value)


def test_cli_missing_input(shared_data, tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = run_cli("--input", str(missing), "--tokenizer", str(SP1024), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "out").exists()


def test_cli_missing_tokenizer(shared_data, tmp_path):
    missing = tmp_path / "nope.model"
    proc = run_cli("--input", str(FINEWEB), "--tokenizer", str(missing), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, str(missing), "--tokenizer")


def test_cli_too_few_docs_for_val_split(shared_data, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)), encoding="utf-8")
    out = tmp_path / "out"
    proc = run_cli("--input", str(small), "--tokenizer", str(SP1024), "--out", str(out), "--val-docs", "3")
    assert_one_line_error(proc, "--val-docs")
    assert not out.exists()


def test_cli_bad_json_late_removes_own_shards_only(shared_data, tmp_path):
    """A failure after shards were written must not leave a dataset that looks complete."""
    lines = [json.dumps({"text": f"some words to tokenize {i} " * 20}) for i in range(30)] + ["{broken"]
    src = tmp_path / "late_error.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("keep me", encoding="utf-8")

    proc = run_cli(
        "--input", str(src), "--tokenizer", str(SP1024), "--out", str(out), "--val-docs", "2", "--shard-tokens", "100"
    )
    assert_one_line_error(proc, f"{src}:31")
    assert "shard:" in proc.stdout, "the error should come after some shards were already written"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert keep.read_text(encoding="utf-8") == "keep me"


def test_cli_success_prints_summary_and_refuses_rerun(shared_data, tmp_path):
    out = tmp_path / "out"
    args = ("--input", str(FINEWEB), "--tokenizer", str(SP1024), "--out", str(out), "--val-docs", "2", "--max-docs", "5")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if not line.startswith("shard:"))
    assert fields["val_docs"] == "2" and fields["train_docs"] == "3"
    assert len(fields["val_fingerprint"]) == 16
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "tokenizer.json"]
    meta = json.loads(before["tokenizer.json"])
    assert meta == {"file": SP1024.name, "sha256": hashlib.sha256(SP1024.read_bytes()).hexdigest(), "vocab_size": 1024}
    assert fields["tokenizer_sha256"] == meta["sha256"]

    rerun = run_cli(*args)
    assert_one_line_error(rerun, "already holds")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_no_import_circle_between_the_data_scripts():
    """train_tokenizer.py takes what it shares with build_shards.py from documents.py, never from build_shards.py,
    and documents.py imports neither."""
    import ast

    def imports(name):
        tree = ast.parse((REPO / "data" / f"{name}.py").read_text())
        return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "documents" in imports("train_tokenizer") and "build_shards" not in imports("train_tokenizer")
    assert not imports("documents") & {"build_shards", "train_tokenizer"}
