#!/usr/bin/env python3
"""Train a SentencePiece BPE tokenizer with the settings of the published FineWeb tokenizers.

The settings (BPE, byte fallback, split digits, nmt_nfkc, no dummy prefix, ids pad/bos/eos/unk =
0/1/2/3) are the ones the published sp1024/sp4096/sp8192 models were trained with, so a vocab
sweep (sp8192 ... sp32768) differs from the published models only in size. Like the public
exporter, it trains on the first --max-docs documents and SentencePiece skips documents longer
than --max-sentence-length bytes. With --caseops the documents go through the CaseOps
transform (data/caseops.py) first and its four operators become user-defined pieces (ids 4..7).

Example:
    python3 data/train_tokenizer.py --input docs.jsonl --vocab-size 16384 --max-docs 5000000 \
        --out data/tokenizers/fineweb_16384_bpe.model
    python3 data/train_tokenizer.py --input docs.jsonl --vocab-size 8192 --caseops \
        --out data/tokenizers/fineweb_8192_bpe_caseops.model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

import caseops
from documents import PathLike, iter_documents, positive_int

# From the challenge's data/download_hf_docs_and_tokenize.py.
PUBLIC_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)
# SentencePiece's default, which the public exporter kept: longer documents are left out of training.
DEFAULT_MAX_SENTENCE_BYTES = 4192
# SentencePiece's default thread count; it is recorded in the .model file, so a fixed value keeps
# the file byte-identical across machines (the pieces do not depend on it).
TRAIN_THREADS = 16
MIN_VOCAB = 4 + 256 + 1  # specials, 256 byte-fallback pieces, "▁"
MAX_VOCAB = 1 << 16  # shards store uint16 ids



def training_text(text: str) -> str:
    """The text SentencePiece sees for one document: NULs become spaces, outer whitespace is cut."""
    return text.replace("\x00", " ").strip()


class _Counter:
    """Wraps the document stream to count what SentencePiece trains on and what it skips."""

    def __init__(self, texts: Iterable[str], max_sentence_length: int):
        self.texts, self.limit = texts, max_sentence_length
        self.docs = self.used = self.too_long = self.bytes = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self.texts:
            self.docs += 1
            text = training_text(raw)
            if not text:
                continue
            n = len(text.encode("utf-8"))
            if n > self.limit:
                self.too_long += 1
            else:
                self.used += 1
                self.bytes += n
            yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    max_docs: int | None = None,
    max_sentence_length: int = DEFAULT_MAX_SENTENCE_BYTES,
    log: Callable[[str], None] | None = None,
    caseops_ops: bool = False,
) -> bytes:
    """Train on the first max_docs texts and return the serialized model.

    caseops_ops: train on caseops.encode(text) with the operators as user-defined pieces.

    Raises ValueError when the result is unusable for training: fewer pieces than asked for
    (the text was too small for that vocab) or no standalone "▁" piece (val_bpb would count
    every space as 3 bytes).
    """
    min_vocab = MIN_VOCAB + (len(caseops.OPERATORS) if caseops_ops else 0)
    if not min_vocab <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"--vocab-size must be in [{min_vocab}, {MAX_VOCAB}] (got {vocab_size})")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs must be at least 1 (got {max_docs})")
    texts = itertools.islice(texts, max_docs)
    if caseops_ops:
        texts = map(caseops.encode, texts)
    counter = _Counter(texts, max_sentence_length)
    extra = dict(user_defined_symbols=list(caseops.OPERATORS)) if caseops_ops else {}
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(counter), model_writer=out, vocab_size=vocab_size,
            max_sentence_length=max_sentence_length, num_threads=TRAIN_THREADS, minloglevel=2, **PUBLIC_SETTINGS, **extra,
        )
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"SentencePiece training failed ({detail}); check the input text and --vocab-size") from None
    if log:
        log(f"tokenizer_train docs:{counter.docs} trained_on:{counter.used} bytes:{counter.bytes} "
            f"skipped_long:{counter.too_long} max_sentence_length:{max_sentence_length}")
    proto = out.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.vocab_size() != vocab_size:
        raise ValueError(
            f"the tokenizer came out with {sp.vocab_size()} pieces instead of {vocab_size}: "
            f"{counter.used} documents ({counter.bytes} bytes) are too little text; add documents, "
            "raise --max-docs or --max-sentence-length, or lower --vocab-size"
        )
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise ValueError("the tokenizer has no standalone '\u2581' piece; train on more (space-separated) text")
    return proto


def check_new_model_path(path: PathLike) -> None:
    """Refuse to replace an existing tokenizer: shards built with it would silently stop matching."""
    if Path(path).exists():
        raise ValueError(f"tokenizer {path} already exists; remove it, or pass it with --tokenizer to reuse it")


def save_model(proto: bytes, path: PathLike) -> None:
    """Write a model file atomically (never a half-written .model under the final name)."""
    path = Path(path)
    check_new_model_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(proto)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a SentencePiece BPE tokenizer with the public FineWeb settings.")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl (field \"text\") or .txt files, in order")
    parser.add_argument("--vocab-size", type=positive_int, required=True, help="pieces in the tokenizer")
    parser.add_argument("--out", required=True, metavar="MODEL", help="where to write the .model file")
    parser.add_argument("--max-docs", type=positive_int, default=None, help="train on the first N documents (default: all)")
    parser.add_argument("--max-sentence-length", type=positive_int, default=DEFAULT_MAX_SENTENCE_BYTES,
                        help="documents longer than this many bytes are skipped (SentencePiece default)")
    parser.add_argument("--caseops", action="store_true", help="train on CaseOps-transformed text, operators as pieces")
    args = parser.parse_args(argv)
    try:
        check_new_model_path(args.out)  # before the training time is spent
        proto = train_tokenizer(iter_documents(args.input), args.vocab_size, args.max_docs, args.max_sentence_length,
                                log=lambda line: print(line, flush=True), caseops_ops=args.caseops)
        save_model(proto, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"tokenizer:{args.out} vocab_size:{args.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
