"""CaseOps: the transform's round trip, tokenizer training with operator pieces, the export's byte
sidecar against decoded text, train/val disjointness, the fixed validation size, and val_bpb scored on
the sidecar (every stage, the NLL dump, one-line errors for a sidecar that does not fit)."""
import hashlib
import json
import math
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import build_shards as bs
import caseops
import train_gpt as tg
import train_tokenizer as tt
from conftest import FINEWEB, REPO, SHARED_DATA, SP1024, TINY, tiny_env
from test_eval import CPU, random_model, stream, tiny
from test_train_gpt import run_script

WIKI = SHARED_DATA / "corpus" / "enwiki_2015_wikiextractor_sample.jsonl"
T, E, C, X = caseops.OPERATORS  # TITLE, ALLCAPS, CAPNEXT, ESC
VAL_DOCS, N_DOCS = 4, 40


def read_docs(path, every: int = 1) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for i, line in enumerate(f) if i % every == 0]


def read_body(path) -> np.ndarray:
    """Shard reader written from the format alone: 1024-byte header, then uint16 entries."""
    header = np.fromfile(path, dtype="<i4", count=256)
    body = np.fromfile(path, dtype="<u2", offset=1024)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == body.size
    return body.astype(np.int64)


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    assert starts[0] == 0
    return [tokens[a:b] for a, b in zip(starts[:-1], starts[1:])]


# --- The transform ------------------------------------------------------------------------------


def test_round_trip_on_the_shared_corpus(shared_data):
    """Every FineWeb sample document and every 16th Wikipedia document (the whole 48 MB file takes
    ~20 s here; it round-trips too)."""
    docs = read_docs(FINEWEB) + (read_docs(WIKI, every=16) if WIKI.is_file() else [])
    assert len(docs) >= 200
    for d in docs:
        enc = caseops.encode(d)
        assert caseops.decode(enc) == d
        assert not re.search("[A-Z]", enc)  # every ASCII capital became an operator


ADVERSARIAL = [
    "", "a", "A", "I", "Hello", "HELLO", "hELLO", "iPhone", "McDonald", "ABCdef", "aBC", "ABC123DEF abc1D",
    "NASA IS HERE. The END", "E\u0301cole \u00c9COLE A\u030a", "\u00dcnic\u00f6de \u0391\u0392\u0393 \u041f\u0440\u0438\u0432\u0435\u0442 \u4e2d\u6587 Mixed\u0416Word",
    T, E + C + X, X + X, "A" + T + "b", T + "hello", "x" + X, X, "\ue000\ue005\uf8ff", "\x00\n\t  \r\n",
    "\ud800 lone surrogate", "Stra\u00dfe STRASSE \ufb01ne \uff21\uff22", "a" * 1000 + "B" * 1000,
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_on_adversarial_strings(text):
    enc = caseops.encode(text)
    assert caseops.decode(enc) == text
    assert not re.search("[A-Z]", enc)


def test_round_trip_on_random_strings():
    rng = random.Random(0)
    alphabet = ["a", "b", "A", "B", "z", "Z", " ", "1", "\u00e9", "\u00c9", "\u0301", "_", *caseops.OPERATORS]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert caseops.decode(caseops.encode(s)) == s


def test_encoding_follows_the_scheme():
    assert caseops.encode("Hello NASA iPhone the I") == f"{T}hello {E}nasa i{C}phone the {T}i"
    assert caseops.encode("McDX") == f"{C}mc{C}d{C}x"
    assert caseops.encode(f"a{T}{X}") == f"a{X}{T}{X}{X}"


def test_decode_is_total_and_drops_dangling_operators():
    assert caseops.decode(T) == "" and caseops.decode(X) == ""
    assert caseops.decode(f"{T} x{C}1{E}\u00e9") == " x1\u00e9"
    assert caseops.decode(f"{C}A{X}") == "A"
    assert caseops.decode(f"{E}ab{T}cd") == "ABCd"


# --- Tokenizer and export -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory) -> list:
    """The shortest FineWeb sample documents in file order (short evals), the first one with literal
    operator characters, capitals and a combining mark that NFKC folds into a letter after TITLE."""
    docs = read_docs(FINEWEB)
    keep = sorted(sorted(range(len(docs)), key=lambda i: len(docs[i]))[: N_DOCS - 1])
    special = f"Literal {T}operators{X} in THE text: E\u0301cole, {E}{C}{X}{X} and McDonald's iPhone."
    path = tmp_path_factory.mktemp("corpus") / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [special] + [docs[i] for i in keep]))
    return path


@pytest.fixture(scope="module")
def caseops_model(corpus, tmp_path_factory):
    proto = tt.train_tokenizer(bs.iter_documents([corpus]), 400, caseops_ops=True)
    path = tmp_path_factory.mktemp("tok") / "caseops_400.model"
    tt.save_model(proto, path)
    return path


@pytest.fixture(scope="module")
def caseops_data(corpus, caseops_model, tmp_path_factory):
    """4 validation documents over several shards (sidecar shards must line up), 36 training ones."""
    out = tmp_path_factory.mktemp("caseops_ds")
    summary = bs.build_shards([corpus], caseops_model, out, VAL_DOCS, 1000, use_caseops=True)
    return out, summary


def test_tokenizer_has_the_operators_as_user_defined_pieces(caseops_model):
    sp = spm.SentencePieceProcessor(model_file=str(caseops_model))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    assert sp.encode(f"{T}the{X}{E}", out_type=str)[:1] == [T]
    assert sp.encode(f"a{X}{E}b", out_type=str).count(E) == 1  # never merged into other pieces


def test_sidecar_counts_the_decoded_original_bytes_per_document(caseops_model, caseops_data):
    out, summary = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(caseops_model))
    val_files = sorted(out.glob("fineweb_val_[0-9]*.bin"))
    side_files = sorted(out.glob("fineweb_val_bytes_*.bin"))
    assert len(val_files) >= 2 and len(side_files) == len(val_files)
    for v, b in zip(val_files, side_files):
        assert read_body(v).size == read_body(b).size
    tokens = np.concatenate([read_body(p) for p in val_files])
    side = np.concatenate([read_body(p) for p in side_files])
    docs = split_docs(tokens)
    assert len(docs) == VAL_DOCS
    first = 0
    for doc in docs:
        original = caseops.decode(sp.decode(doc[1:].tolist()))
        counts = side[first : first + len(doc)]
        assert counts[0] == 0 and int(counts.sum()) == len(original.encode("utf-8"))
        # Operator pieces carry no bytes, except the literal operator characters of the original text.
        on_ops = counts[1:][np.isin(doc[1:], [4, 5, 6, 7])]
        assert set(on_ops.tolist()) <= {0, 3}
        assert (on_ops == 3).sum() == sum(original.count(op) for op in caseops.OPERATORS)
        first += len(doc)
    assert summary["val_bytes"] == int(side.sum())


def test_sidecar_matches_plain_byte_tables_on_the_same_documents(corpus, caseops_data, tmp_path):
    """The plain sp1024 export's byte tables count the same text: equal byte totals per document."""
    out, _ = caseops_data
    dataset = tmp_path / "plain"
    bs.build_shards([corpus], SP1024, dataset, VAL_DOCS)
    luts = tg.build_byte_luts(str(SP1024), 1024)
    plain = np.concatenate([read_body(p) for p in sorted(dataset.glob("fineweb_val_*.bin"))])
    side = np.concatenate([read_body(p) for p in sorted(out.glob("fineweb_val_bytes_*.bin"))])
    tok = torch.from_numpy(plain)
    plain_bytes = np.concatenate([[0], tg.target_bytes(tok[:-1], tok[1:], luts).numpy()])
    plain_docs = [plain_bytes[d] for d in np.split(np.arange(len(plain)), np.flatnonzero(plain == 1)[1:])]
    ours = np.split(side, np.flatnonzero(np.concatenate(
        [read_body(p) for p in sorted(out.glob("fineweb_val_[0-9]*.bin"))]) == 1)[1:])
    assert [int(d.sum()) for d in ours] == [int(d.sum()) for d in plain_docs[:VAL_DOCS]]


def test_train_and_val_are_disjoint_by_document_fingerprints(corpus, caseops_model, caseops_data):
    out, summary = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(caseops_model))

    def prints(split):
        tokens = np.concatenate([read_body(p) for p in sorted(out.glob(f"fineweb_{split}_[0-9]*.bin"))])
        texts = [caseops.decode(sp.decode(d[1:].tolist())) for d in split_docs(tokens)]
        return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]

    val, train = prints("val"), prints("train")
    assert len(val) == VAL_DOCS and len(train) == N_DOCS - VAL_DOCS
    assert not set(val) & set(train)
    # The validation documents are the first ones of the input, in order.
    docs = read_docs(corpus)[:VAL_DOCS]
    norm = [caseops.decode(sp.decode(sp.encode(caseops.encode(d)))) for d in docs]
    assert val == [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in norm]


def test_export_refuses_a_validation_size_that_mixes_published_splits(tmp_path, shared_data):
    big = tmp_path / "big.jsonl"
    # Blank lines are not documents: 50,001 documents behind 50,001 blank lines.
    big.write_text("".join("\n" + json.dumps({"text": f"doc {i}"}) + "\n" for i in range(bs.PUBLISHED_VAL_DOCS + 1)))
    with pytest.raises(ValueError, match="--val-docs 50000"):
        bs.build_shards([big], SP1024, tmp_path / "out", val_docs=10_000)
    assert not (tmp_path / "out").exists()
    bs.check_val_split([big], bs.PUBLISHED_VAL_DOCS)  # the published size passes
    bs.check_val_split([FINEWEB], 20)  # a small corpus may keep any size
    small = tmp_path / "small.jsonl"
    small.write_text("\n\n".join(json.dumps({"text": f"doc {i}"}) for i in range(bs.PUBLISHED_VAL_DOCS)))
    bs.check_val_split([small], 10)
    proc = subprocess.run([sys.executable, str(REPO / "data" / "build_shards.py"), "--input", str(big), "--vocab-size",
                           "300", "--caseops", "--val-docs", "60000", "--out", str(tmp_path / "o2"),
                           "--tokenizer-out", str(tmp_path / "t.model")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--val-docs 50000" in proc.stderr
    assert not (tmp_path / "t.model").exists()


def test_export_refuses_a_tokenizer_that_does_not_fit_the_switch(caseops_model, tmp_path, shared_data):
    with pytest.raises(ValueError, match="pass --caseops"):
        bs.build_shards([FINEWEB], caseops_model, tmp_path / "a", val_docs=4, max_docs=10)
    with pytest.raises(ValueError, match="no CaseOps operator pieces"):
        bs.build_shards([FINEWEB], SP1024, tmp_path / "b", val_docs=4, max_docs=10, use_caseops=True)


# --- Scoring on the sidecar ---------------------------------------------------------------------


@pytest.mark.parametrize("stride", [64, 16])
def test_sidecar_bytes_belong_to_the_targets_each_rank_scores(stride):
    """A rank's byte sum is the sidecar at exactly the targets it scored (its nonzero NLLs)."""
    h = tiny()
    model, tokens = random_model(h), stream(64 * 9 + 5)
    side = torch.randint(0, 10, (tokens.numel() - 1,), generator=torch.Generator().manual_seed(1))
    d = tg.Dist(1, 3, 0, torch.device("cpu"))
    r, nll = tg.eval_windows(h, model.token_nll, d, tokens, (side,), stride, collect=True)
    scored = nll != 0
    assert 0 < int(scored.sum()) < nll.numel() and r.tokens == int(scored.sum())
    assert r.bytes == int(side[scored].sum())


def test_sidecar_equal_to_the_tables_gives_the_same_results_in_every_stage():
    h = tiny(ttt_enabled=True, eval_stride=32, ttt_chunk_tokens=128, ttt_epochs=1, ttt_lr=0.05, ttt_batch_seqs=2)
    tokens = stream(400)
    luts = (torch.arange(1024) % 5 + 1, torch.arange(1024) % 3 == 0, torch.arange(1024) % 7 == 0)
    side = (tg.target_bytes(tokens[:-1], tokens[1:], luts),)
    model = random_model(h)
    for stride in (64, 32):
        assert (tg.eval_windows(h, model.token_nll, CPU, tokens, side, stride)[0]
                == tg.eval_windows(h, model.token_nll, CPU, tokens, luts, stride)[0])
    tokens[::97] = 1  # documents for the document-masked stages
    side = (tg.target_bytes(tokens[:-1], tokens[1:], luts),)
    for stride in (64, 32):
        assert (tg.eval_doc_windows(h, model.token_nll, CPU, tokens, side, stride)[0]
                == tg.eval_doc_windows(h, model.token_nll, CPU, tokens, luts, stride)[0])
    results = []
    for b in (side, luts):
        m = random_model(h)
        tg.prepare_ttt(m, h)
        results.append(tg.eval_ttt(h, m, m.token_nll, m, CPU, tokens, b)[0])
    assert results[0] == results[1]


def test_sidecar_that_does_not_fit_its_shards_is_refused(caseops_model, caseops_data, tmp_path):
    out, _ = caseops_data
    val = tg.load_val_tokens(str(out), 64)
    luts = tg.build_byte_luts(str(caseops_model), 400, sidecar=True)
    side = tg.load_val_bytes(str(out), val, luts)
    assert side.shape == (val.numel() - 1,)
    with pytest.raises(tg.ConfigError, match="CaseOps tokenizer"):
        tg.build_byte_luts(str(caseops_model), 400)
    for name in ("short", "shifted", "extra"):
        bad = tmp_path / name
        bad.mkdir()
        for p in out.glob("fineweb_val*.bin"):
            (bad / p.name).write_bytes(p.read_bytes())
        first = bad / "fineweb_val_bytes_000000.bin"
        body = read_body(first)
        if name == "short":
            bs.write_shard(first, body[:-1])
        elif name == "shifted":
            for p in bad.glob("fineweb_val_bytes_*.bin"):
                bs.write_shard(p, np.roll(read_body(p), 1))
        else:
            bs.write_shard(bad / "fineweb_val_bytes_000099.bin", body)
        with pytest.raises(tg.ConfigError, match="sidecar") as e:
            tg.load_val_bytes(str(bad), val, luts)
        assert "\n" not in str(e.value)


def test_run_scores_every_stage_on_the_sidecar(caseops_model, caseops_data, tmp_path):
    out, _ = caseops_data
    env = tiny_env(iterations=2, data_path=str(out), tokenizer_path=str(caseops_model), vocab_size=400, run_id="co",
                   eval_nll_dir=str(tmp_path / "nll"), gptq_enabled=0)
    res = run_script(env, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    val = np.concatenate([read_body(p) for p in sorted(out.glob("fineweb_val_[0-9]*.bin"))])
    side = np.concatenate([read_body(p) for p in sorted(out.glob("fineweb_val_bytes_*.bin"))])
    U = (len(val) - 1) // TINY["eval_seq_len"] * TINY["eval_seq_len"]
    nbytes = np.load(tmp_path / "nll" / "bytes.npy")
    assert np.array_equal(nbytes, side[1 : U + 1])
    line = next(l for l in res.stdout.splitlines() if l.startswith("val_tokens:"))
    assert f"val_tokens:{U} val_bytes:{int(side[1 : U + 1].sum())} " in line and line.endswith(" byte_count:sidecar")
    sha, shards = hashlib.sha256(caseops_model.read_bytes()).hexdigest()[:12], len(list(out.glob("fineweb_train_*.bin")))
    assert (f"record_config data:{out.name} kind:local tokenizer_sha:{sha} train_shards:{shards} val_tokens:{U} "
            f"byte_count:sidecar") in res.stdout.splitlines()
    for stage in ("pre_quant", "quantized"):
        nll = np.load(tmp_path / "nll" / f"{stage}.npy").astype(np.float64)
        line = next(l for l in res.stdout.splitlines() if l.startswith(f"final_{stage} "))
        assert nll.sum() / (math.log(2) * nbytes.sum()) == pytest.approx(float(line.split("val_bpb:")[1].split()[0]), abs=6e-9)
    # A sidecar that does not fit: one line, exit status 2, before any training.
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.glob("fineweb_*.bin"):
        (bad / p.name).write_bytes(p.read_bytes())
    bs.write_shard(bad / "fineweb_val_bytes_000000.bin", read_body(bad / "fineweb_val_bytes_000000.bin")[:-1])
    res = run_script({**env, "DATA_PATH": str(bad), "RUN_ID": "bad"}, tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: byte sidecar") and res.stderr.count("\n") == 1


def test_tokenizer_check_counts_caseops_bytes_against_decoded_text(corpus, caseops_model, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import tokenizer_check

    assert tokenizer_check.main(["--tokenizer", str(caseops_model), "--input", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "transform:caseops_v1" in out and "sidecar_counts:ok mismatched_docs:0/" in out
    docs = read_docs(corpus)
    sp = spm.SentencePieceProcessor(model_file=str(caseops_model))
    want = sum(len(caseops.decode(sp.decode(sp.encode(caseops.encode(d)))).encode("utf-8")) for d in docs)
    assert f"decoded_bytes:{want}" in out


def test_sidecar_that_counts_operators_as_text_is_refused(caseops_model, caseops_data, tmp_path):
    """A sidecar equal to the plain byte tables (operators 3 bytes each) agrees with them everywhere, so
    only the operators' entries tell it from a real one."""
    out, _ = caseops_data
    val = tg.load_val_tokens(str(out), 64)
    luts = tg.build_byte_luts(str(caseops_model), 400, sidecar=True)
    assert tg.load_val_bytes(str(out), val, luts, str(caseops_model)) is not None
    bad = tmp_path / "tables"
    bad.mkdir()
    for p in out.glob("fineweb_val_*.bin"):
        if "_bytes_" not in p.name:
            ids = torch.from_numpy(read_body(p))
            (bad / p.name).write_bytes(p.read_bytes())
            plain = torch.cat([torch.zeros(1, dtype=torch.int64), tg.target_bytes(ids[:-1], ids[1:], luts)])
            bs.write_shard(bad / p.name.replace("_val_", "_val_bytes_"), plain.numpy().astype(np.uint16))
    tg.load_val_bytes(str(bad), val, luts)  # the alignment check alone passes it
    with pytest.raises(tg.ConfigError, match="counts the CaseOps operators as text.*--caseops") as e:
        tg.load_val_bytes(str(bad), val, luts, str(caseops_model))
    assert "\n" not in str(e.value)
