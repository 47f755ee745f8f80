#!/usr/bin/env python3
"""Tokenize text documents into the binary shards read by train_gpt.py.

Each shard is a 1024-byte header of 256 little-endian int32 values
(magic, version, token count, zeros) followed by the tokens as little-endian
uint16. Every document becomes [BOS] + sp.encode(text); documents are
concatenated in input order, the first ``val_docs`` form the validation split
and the rest the training split. With --vocab-size instead of --tokenizer, a
new tokenizer is first trained on the same documents (data/train_tokenizer.py).
With --caseops every document goes through the CaseOps transform (data/caseops.py)
before tokenizing, and the validation split gets a byte sidecar
fineweb_val_bytes_NNNNNN.bin: same format, one entry per validation token giving the
UTF-8 bytes that token stands for in the original text (BOS and operators 0).

Examples:
    python3 data/build_shards.py --input docs.jsonl \
        --tokenizer data/tokenizers/fineweb_1024_bpe.model \
        --out data/datasets/fineweb10B_sp1024 --val-docs 50000
    python3 data/build_shards.py --input data/docs_selected.jsonl --vocab-size 16384 \
        --tokenizer-train-docs 5000000 --workers 16
    python3 data/build_shards.py --input docs.jsonl --vocab-size 8192 --caseops
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

import caseops
from documents import PathLike, check_input_path, iter_documents, positive_int  # noqa: F401 (build_shards.* API)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
BOS_ID = 1
MAX_VOCAB = 1 << 16
MAX_SHARD_TOKENS = (1 << 31) - 1  # the count is stored in an int32 header slot
SHARD_NAME_RE = re.compile(r"fineweb_(val|train|val_bytes)_\d{6}\.bin")
# The published exports (the challenge's data/download_hf_docs_and_tokenize.py) keep the first 50,000 documents as validation; a
# re-export with fewer put published validation documents into training (issue #2127 upstream).
PUBLISHED_VAL_DOCS = 50_000
DATA_DIR = Path(__file__).resolve().parent
PROGRESS_SECONDS = 10.0

# Documents per worker task: large enough to amortize pickling, small enough
# that a handful of in-flight tasks per worker keeps memory bounded.
DOCS_PER_TASK = 256
TASKS_PER_WORKER = 4



def write_shard(path: PathLike, tokens: np.ndarray) -> None:
    """Write one shard file.

    The data goes to ``path + ".tmp"`` first and is renamed into place, so an
    interrupted run never leaves a truncated file under a name the trainer
    would load.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"shard tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"shard has {len(tokens)} tokens; the header holds at most {MAX_SHARD_TOKENS}")
    # A plain astype would silently wrap out-of-range ids.
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
        raise ValueError("token ids must lie in [0, 65535] to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = len(tokens)
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _load_tokenizer(tokenizer_path: PathLike) -> spm.SentencePieceProcessor:
    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}; pass an existing SentencePiece .model file with --tokenizer")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"cannot load tokenizer {path} ({detail}); pass a SentencePiece .model file") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise ValueError(
            f"tokenizer {path} has vocab size {sp.vocab_size()}; shards store uint16 ids, so use a vocab of at most {MAX_VOCAB}"
        )
    return sp


def has_caseops_pieces(sp: spm.SentencePieceProcessor) -> bool:
    return all(sp.piece_to_id(op) != sp.unk_id() for op in caseops.OPERATORS)


def _check_caseops(sp: spm.SentencePieceProcessor, path: PathLike, use: bool) -> None:
    if use and not has_caseops_pieces(sp):
        raise ValueError(f"tokenizer {path} has no CaseOps operator pieces; train one with --vocab-size V --caseops "
                         "(or data/train_tokenizer.py --caseops)")
    if not use and has_caseops_pieces(sp):
        raise ValueError(f"tokenizer {path} is a CaseOps tokenizer; pass --caseops so the text is transformed to match it")


def _encode_one(sp: spm.SentencePieceProcessor, text: str, use_caseops: bool = False) -> np.ndarray:
    ids = sp.encode(caseops.encode(text) if use_caseops else text)
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[0] = BOS_ID
    out[1:] = ids
    return out


_worker_sp: spm.SentencePieceProcessor | None = None
_worker_caseops = False


def _init_worker(tokenizer_path: str, use_caseops: bool = False) -> None:
    global _worker_sp, _worker_caseops
    _worker_sp, _worker_caseops = _load_tokenizer(tokenizer_path), use_caseops


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    assert _worker_sp is not None, "worker used without _init_worker"
    return [_encode_one(_worker_sp, t, _worker_caseops) for t in texts]


def _iter_encoded(texts: Iterable[str], tokenizer_path: PathLike, workers: int,
                  use_caseops: bool = False) -> Iterator[np.ndarray]:
    """Lazily encode texts in input order.

    Work is fed to the pool in bounded groups because Pool.imap drains its
    input iterable eagerly, which would pull an entire corpus into memory.
    """
    if workers <= 1:
        sp = _load_tokenizer(tokenizer_path)
        for text in texts:
            yield _encode_one(sp, text, use_caseops)
        return
    _load_tokenizer(tokenizer_path)  # fail here, not inside every worker
    texts = iter(texts)
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(os.fspath(tokenizer_path), use_caseops)) as pool:
        while True:
            group = list(itertools.islice(texts, DOCS_PER_TASK * TASKS_PER_WORKER * workers))
            if not group:
                return
            tasks = [group[i : i + DOCS_PER_TASK] for i in range(0, len(group), DOCS_PER_TASK)]
            for encoded in pool.imap(_encode_batch, tasks):
                yield from encoded


def encode_documents(texts: Iterable[str], tokenizer_path: PathLike, workers: int = 1,
                     use_caseops: bool = False) -> list[np.ndarray]:
    """Return [BOS] + sp.encode(text) as a uint16 array per text, in input order for any worker count."""
    return list(_iter_encoded(texts, tokenizer_path, workers, use_caseops))


class _SidecarCounter:
    """Byte counts of one CaseOps document's tokens, checked against its decoded original text."""

    def __init__(self, tokenizer_path: PathLike):
        self.sp = _load_tokenizer(tokenizer_path)
        self.table = caseops.PieceBytes(self.sp)

    def __call__(self, doc: np.ndarray, index: int) -> np.ndarray:
        counts = np.zeros(len(doc), dtype=np.int64)
        counts[1:] = self.table.doc_counts(doc[1:])
        # The independent count: the text these tokens decode to, case restored, as UTF-8.
        text = caseops.decode(self.sp.decode(doc[1:].tolist()))
        if int(counts.sum()) != len(text.encode("utf-8")):
            raise ValueError(f"document {index}: sidecar counts {int(counts.sum())} bytes but its decoded text has "
                             f"{len(text.encode('utf-8'))}; the tokenizer does not fit the CaseOps byte rules")
        return counts


def token_fingerprint(chunks: Iterable[np.ndarray]) -> str:
    """First 16 hex digits of the sha256 of the tokens as little-endian uint16 (one split)."""
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(np.asarray(chunk).astype("<u2", copy=False).tobytes())
    return sha.hexdigest()[:16]


def text_fingerprint(texts: Iterable[str]) -> str:
    """First 16 hex digits of a sha256 over the documents' UTF-8 text, each length-prefixed.

    It does not depend on the tokenizer, so exports of the same documents at different vocab
    sizes must agree on it.
    """
    sha = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()[:16]


TOKENIZER_META = "tokenizer.json"  # train_gpt.py refuses a tokenizer whose sha256 differs from this record


def write_tokenizer_meta(out_dir: PathLike, tokenizer_path: PathLike) -> dict:
    """Record which tokenizer built the shards in out_dir: file name, sha256 of its bytes, piece count."""
    data = Path(tokenizer_path).read_bytes()
    meta = {"file": Path(tokenizer_path).name, "sha256": hashlib.sha256(data).hexdigest(),
            "vocab_size": spm.SentencePieceProcessor(model_proto=data).vocab_size()}
    path = Path(out_dir) / TOKENIZER_META
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return meta


class _ShardWriter:
    """Packs a token stream into fixed-size shards, ignoring document boundaries."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, written: list[Path], log: Callable[[str], None],
                 max_value: int = MAX_VOCAB - 1):
        self.out_dir = out_dir
        self.split = split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.docs = 0
        self.tokens = 0
        self.files: list[Path] = []
        self.sha = hashlib.sha256()
        self.written = written
        self.log = log
        self.max_value = max_value

    def add(self, doc: np.ndarray) -> None:
        if len(doc) and int(doc.max()) > self.max_value:
            raise ValueError(f"a {self.split} entry is {int(doc.max())}, above {self.max_value}")
        self.docs += 1
        self.tokens += len(doc)
        pos = 0
        while pos < len(doc):
            n = min(len(doc) - pos, len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = doc[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == len(self.buf):
                self._flush()

    def close(self) -> None:
        if self.fill:
            self._flush()

    def _flush(self) -> None:
        chunk = self.buf[: self.fill]
        path = self.out_dir / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        # Record before writing so a failure mid-write is still cleaned up.
        self.written.append(path)
        write_shard(path, chunk)
        self.sha.update(chunk.astype("<u2", copy=False).tobytes())
        self.files.append(path)
        self.log(f"shard:{path} tokens:{self.fill}")
        self.fill = 0


def check_val_split(input_paths: Sequence[PathLike], val_docs: int) -> None:
    """Refuse a validation size other than the published 50,000 for an input of more than 50,000 documents.

    The first 50,000 documents of the published selection are its validation split; with fewer,
    some of them land in training, with more, published training documents land in validation.
    """
    if val_docs == PUBLISHED_VAL_DOCS:
        return
    n = 0  # documents, counted as iter_documents yields them but without parsing (fast; bad lines fail later)
    for raw_path in input_paths:
        path = Path(raw_path)
        check_input_path(path)
        if path.suffix == ".txt":
            n += 1
        else:
            with open(path, "rb") as f:
                for line in f:
                    n += bool(line.strip())
                    if n > PUBLISHED_VAL_DOCS:
                        break
        if n > PUBLISHED_VAL_DOCS:
            break
    if n > PUBLISHED_VAL_DOCS:
        raise ValueError(
            f"--val-docs {val_docs} with an input of more than {PUBLISHED_VAL_DOCS} documents: validation is always the "
            f"first {PUBLISHED_VAL_DOCS}, another size would mix published validation and training documents; "
            f"use --val-docs {PUBLISHED_VAL_DOCS}")


def check_inputs(input_paths: Sequence[PathLike]) -> None:
    """Every input exists, is .jsonl/.txt, and is given once (twice, its documents would be in both splits)."""
    seen: dict[tuple[int, int], PathLike] = {}
    for p in input_paths:
        check_input_path(Path(p))
        st = os.stat(p)
        if (st.st_dev, st.st_ino) in seen:
            raise ValueError(f"input {p} is given twice (also as {seen[st.st_dev, st.st_ino]}); pass each --input once")
        seen[st.st_dev, st.st_ino] = p


def _not_in_val(texts: Iterable[str], val: Sequence[str]) -> Iterator[str]:
    """The training texts, refusing any that is also a validation document (it would be trained on, then scored)."""
    digest = lambda t: hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()  # noqa: E731
    val_at = {digest(t): i for i, t in enumerate(val)}
    for i, text in enumerate(texts):
        j = val_at.get(digest(text))
        if j is not None:
            raise ValueError(f"training document {i} of the input is also validation document {j} (an input given twice, "
                             "or a duplicated document?); remove the duplicates so no validation document is trained on")
        yield text


def check_out_dir(out_dir: PathLike) -> None:
    """Refuse an output directory that already holds shards: old and new shards would mix."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; choose another --out")
    existing = sorted(p.name for p in out.iterdir() if SHARD_NAME_RE.fullmatch(p.name)) if out.is_dir() else []
    if existing:
        raise ValueError(
            f"{out} already holds {len(existing)} shard files (e.g. {existing[0]}); remove them or choose an empty --out "
            "so old and new shards do not mix"
        )


class _Progress:
    """Emits a throughput line at most every PROGRESS_SECONDS."""

    def __init__(self, log: Callable[[str], None], seconds: float = PROGRESS_SECONDS):
        self.log, self.seconds = log, seconds
        self.t0 = self.last = time.perf_counter()
        self.docs = self.tokens = 0

    def add(self, n_tokens: int) -> None:
        self.docs += 1
        self.tokens += n_tokens
        if self.docs % 64 == 0 and time.perf_counter() - self.last >= self.seconds:
            self.last = time.perf_counter()
            self.log(f"progress {self.rates()}")

    def rates(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (f"docs:{self.docs} tokens:{self.tokens} seconds:{dt:.1f} docs/s:{self.docs / dt:.0f} "
                f"tokens/s:{self.tokens / dt:.0f}")


def build_shards(
    input_paths: Sequence[PathLike],
    tokenizer_path: PathLike,
    out_dir: PathLike,
    val_docs: int = 50_000,
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    max_docs: int | None = None,
    log: Callable[[str], None] | None = None,
    use_caseops: bool = False,
) -> dict:
    """Tokenize the inputs and write validation then training shards into out_dir.

    Refuses an out_dir that already holds shard files, because leftovers from
    an earlier, larger build would silently join the new dataset, and an input
    with no more than val_docs documents, because a validation split smaller
    than asked for would change the metric without notice. On failure the
    shards written by this call are removed, so a half-built dataset never
    looks complete. ``log`` receives one line per shard written and periodic
    ``progress`` lines. use_caseops transforms the text and writes the validation byte sidecar.
    An input of more than 50,000 documents must keep 50,000 for validation (check_val_split).
    """
    log = log or (lambda _line: None)
    if val_docs < 1:
        raise ValueError(f"--val-docs must be at least 1 (got {val_docs}); the trainer needs a validation split")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}] (got {shard_tokens})")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {workers})")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs must be at least 1 (got {max_docs})")
    if not input_paths:
        raise ValueError("no input files given; pass at least one .jsonl or .txt file with --input")
    check_inputs(input_paths)
    _check_caseops(_load_tokenizer(tokenizer_path), tokenizer_path, use_caseops)
    out = Path(out_dir)
    check_out_dir(out)
    check_val_split(input_paths, val_docs)

    docs = iter_documents(input_paths)
    if max_docs is not None:
        docs = itertools.islice(docs, max_docs)
    # Read one document past the validation split before writing anything, so
    # an input too small for a training split fails without touching out_dir.
    head = list(itertools.islice(docs, val_docs + 1))
    if len(head) <= val_docs:
        limit = f" (after --max-docs {max_docs})" if max_docs is not None else ""
        raise ValueError(
            f"input has only {len(head)} documents{limit} but --val-docs is {val_docs}, leaving none for training; "
            "lower --val-docs or add more input"
        )
    val_text = text_fingerprint(head[:val_docs])

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    val = _ShardWriter(out, "val", shard_tokens, written, log)
    train = _ShardWriter(out, "train", shard_tokens, written, log)
    # Same shard size as val, so fineweb_val_bytes_k.bin lines up 1:1 with fineweb_val_k.bin.
    sidecar = _ShardWriter(out, "val_bytes", shard_tokens, written, log) if use_caseops else None
    counter = _SidecarCounter(tokenizer_path) if use_caseops else None
    progress, val_bytes = _Progress(log), 0
    try:
        texts = itertools.chain(head[:val_docs], _not_in_val(itertools.chain(head[val_docs:], docs), head[:val_docs]))
        with contextlib.closing(_iter_encoded(texts, tokenizer_path, workers, use_caseops)) as encoded:
            for i, doc in enumerate(encoded):
                if i < val_docs:
                    val.add(doc)
                    if sidecar is not None:
                        counts = counter(doc, i)
                        val_bytes += int(counts.sum())
                        sidecar.add(counts)
                else:
                    if i == val_docs:
                        val.close()
                        if sidecar is not None:
                            sidecar.close()
                    train.add(doc)
                progress.add(len(doc))
        train.close()
        written.append(out / TOKENIZER_META)
        tok_meta = write_tokenizer_meta(out, tokenizer_path)
    except BaseException:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    log(f"done {progress.rates()} workers:{workers}")

    return {
        "val_bytes": val_bytes if sidecar else None,
        "sidecar_files": [str(p) for p in sidecar.files] if sidecar else [],
        "val_docs": val.docs,
        "val_tokens": val.tokens,
        "train_docs": train.docs,
        "train_tokens": train.tokens,
        "val_files": [str(p) for p in val.files],
        "train_files": [str(p) for p in train.files],
        "files": [str(p) for p in val.files + train.files],
        "val_fingerprint": val.sha.hexdigest()[:16],
        "val_text_fingerprint": val_text,
        "tokenizer_sha256": tok_meta["sha256"],
    }


def default_paths(vocab_size: int, use_caseops: bool = False) -> tuple[Path, Path]:
    """Where train_gpt.py looks for VOCAB_SIZE=vocab_size with the default DATA_DIR: (shards, tokenizer).

    A CaseOps export gets its own names (run it with DATA_PATH and TOKENIZER_PATH)."""
    tag = "_caseops" if use_caseops else ""
    return (DATA_DIR / "datasets" / f"fineweb10B_sp{vocab_size}{tag}",
            DATA_DIR / "tokenizers" / f"fineweb_{vocab_size}_bpe{tag}.model")


def main(argv: Sequence[str] | None = None) -> int:
    import train_tokenizer as tt

    parser = argparse.ArgumentParser(description="Tokenize documents into fineweb_{val,train}_NNNNNN.bin shards.")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl (field \"text\") or .txt files, in order")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="MODEL", help="existing SentencePiece .model file")
    tok.add_argument("--vocab-size", type=positive_int, metavar="V", help="train a new BPE tokenizer of V pieces on the input first")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: data/datasets/fineweb10B_sp<V>)")
    parser.add_argument("--tokenizer-out", metavar="MODEL", help="with --vocab-size: where to save it (default: data/tokenizers/fineweb_<V>_bpe.model)")
    parser.add_argument("--tokenizer-train-docs", type=positive_int, default=None, help="with --vocab-size: train on the first N documents (default: all)")
    parser.add_argument("--max-sentence-length", type=positive_int, default=tt.DEFAULT_MAX_SENTENCE_BYTES,
                        help="with --vocab-size: longer documents are not trained on (SentencePiece default)")
    parser.add_argument("--val-docs", type=positive_int, default=50_000, help="leading documents used for validation")
    parser.add_argument("--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    parser.add_argument("--max-docs", type=positive_int, default=None, help="stop after this many documents in total")
    parser.add_argument("--caseops", action="store_true",
                        help="CaseOps: transform the text before tokenizing and write the validation byte sidecar")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        if args.vocab_size:
            out, model = default_paths(args.vocab_size, args.caseops)
            out, model = Path(args.out or out), Path(args.tokenizer_out or model)
            # Every refusal build_shards would make comes before the training time is spent.
            tt.check_new_model_path(model)
            check_inputs(args.input)
            check_out_dir(out)
            check_val_split(args.input, args.val_docs)
            docs = lambda: itertools.islice(iter_documents(args.input), args.max_docs)  # noqa: E731
            n_head = sum(1 for _ in itertools.islice(docs(), args.val_docs + 1))
            if n_head <= args.val_docs:
                raise ValueError(f"input has only {n_head} documents but --val-docs is {args.val_docs}, leaving none for "
                                 "training; lower --val-docs or add more input")
            proto = tt.train_tokenizer(docs(), args.vocab_size, args.tokenizer_train_docs, args.max_sentence_length, log=log,
                                       caseops_ops=args.caseops)
            tt.save_model(proto, model)
            log(f"tokenizer:{model} vocab_size:{args.vocab_size}")
        else:
            model = Path(args.tokenizer)
            out = Path(args.out) if args.out else default_paths(_load_tokenizer(model).vocab_size(), args.caseops)[0]
        summary = build_shards(args.input, model, out, args.val_docs, args.shard_tokens, args.workers, args.max_docs, log=log,
                               use_caseops=args.caseops)
    except (OSError, ValueError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    for key in ("val_docs", "val_tokens", "train_docs", "train_tokens", "val_fingerprint", "val_text_fingerprint", "tokenizer_sha256"):
        print(f"{key}:{summary[key]}")
    if args.caseops:
        print(f"val_bytes:{summary['val_bytes']} sidecar_files:{len(summary['sidecar_files'])} transform:{caseops.NAME}")
    print(f"val_files:{len(summary['val_files'])}")
    print(f"train_files:{len(summary['train_files'])}")
    print(f"out:{out}")
    print(f"tokenizer:{model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
