#!/usr/bin/env python3
"""How many bytes per token does a tokenizer give, and do train_gpt.py's byte tables count them right? `python3 tools/tokenizer_check.py --tokenizer SP.model --input docs.jsonl`

Bytes per token of a SentencePiece tokenizer, and the check of train_gpt.py's byte tables.

val_bpb divides the summed loss by the byte count of train_gpt.build_byte_luts + target_bytes.
Whenever the tokenizer changes, those bytes must equal the UTF-8 bytes of the decoded text. This
checks it document by document: tokens = [BOS] + ids, table bytes = the sum of target_bytes over
the document's targets, decoded bytes = len(sp.decode(ids).encode("utf-8")). Any difference is
listed and the exit status is 1.

    python3 tools/tokenizer_check.py --tokenizer data/tokenizers/fineweb_16384_bpe.model --input docs.jsonl
    python3 tools/tokenizer_check.py --tokenizer data/tokenizers/fineweb_8192_bpe.model \
        --shards data/datasets/fineweb10B_sp8192            # the validation split as stored

Output: `key:value` lines. bytes_per_token counts the document's own tokens; bytes_per_token_with_bos
also counts one BOS per document, as the shards and the eval do; raw_bytes_per_token (--input only)
uses the text before normalization.

A CaseOps tokenizer (one with the operator pieces of data/caseops.py) is checked the same way on
CaseOps text: documents are transformed before encoding, the counted bytes are those the byte
sidecar of an export would hold (caseops.PieceBytes), the decoded bytes those of
caseops.decode(sp.decode(ids)), and the result line is sidecar_counts:ok. bytes_per_token then
counts the operator tokens too.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import train_gpt as tg  # noqa: E402

ENCODE_BATCH = 1024


def table_bytes(docs: Sequence[np.ndarray], luts) -> np.ndarray:
    """Bytes per document by the eval's tables, for documents laid out as [BOS] + ids each.

    Each target is scored given its previous token, as in eval; a document's bytes are those of its
    own ids (its BOS, the target ending the previous document, counts 0 bytes).
    """
    stream = np.concatenate([np.concatenate([[tg.BOS_ID], d]) for d in docs]).astype(np.int64)
    t = torch.from_numpy(stream)
    per_target = tg.target_bytes(t[:-1], t[1:], luts).numpy()
    per_target = np.concatenate([[0], per_target])  # position 0 (the first BOS) is never a target
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    return np.add.reduceat(per_target, starts)


def decoded_bytes(sp, docs: Sequence[np.ndarray], inverse=None) -> np.ndarray:
    texts = sp.decode([d.tolist() for d in docs])
    return np.array([len((inverse(t) if inverse else t).encode("utf-8")) for t in texts], dtype=np.int64)


def split_at_bos(tokens: np.ndarray) -> list[np.ndarray]:
    """The ids of each document in a [BOS] + ids stream; tokens before the first BOS are dropped."""
    starts = np.flatnonzero(tokens == tg.BOS_ID)
    ends = np.append(starts[1:], len(tokens))
    return [tokens[s + 1 : e] for s, e in zip(starts, ends)]


def check(sp, luts, docs: Sequence[np.ndarray], caseops_counts=None) -> dict:
    """Per-document comparison of table bytes and decoded bytes, plus totals.

    caseops_counts (a caseops.PieceBytes) replaces the tables for a CaseOps tokenizer."""
    if caseops_counts is None:
        table, decoded = table_bytes(docs, luts), decoded_bytes(sp, docs)
    else:
        import caseops

        table = np.array([int(caseops_counts.doc_counts(d).sum()) for d in docs], dtype=np.int64)
        decoded = decoded_bytes(sp, docs, caseops.decode)
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero(table != decoded)
    return {
        "docs": len(docs),
        "tokens": int(ids.size),
        "table_bytes": int(table.sum()),
        "decoded_bytes": int(decoded.sum()),
        "unk_tokens": int(np.count_nonzero(ids == sp.unk_id())),
        "byte_fallback_tokens": _byte_tokens(sp, ids),
        "mismatches": [(int(i), int(table[i]), int(decoded[i])) for i in bad],
    }


def _byte_tokens(sp, ids: np.ndarray) -> int:
    is_byte = np.array([sp.is_byte(i) for i in range(sp.vocab_size())])
    return int(is_byte[ids].sum()) if ids.size else 0


def encode_texts(sp, texts: Iterable[str], threads: int) -> Iterable[np.ndarray]:
    texts = iter(texts)
    while batch := list(itertools.islice(texts, ENCODE_BATCH)):
        for ids in sp.encode(batch, num_threads=threads):
            yield np.asarray(ids, dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    from build_shards import has_caseops_pieces, iter_documents

    import caseops

    parser = argparse.ArgumentParser(description="Bytes per token of a tokenizer and the byte-table check of val_bpb.")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help=".jsonl (field \"text\") or .txt documents")
    src.add_argument("--shards", metavar="DIR", help="dataset directory; its tokens are split into documents at BOS")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="with --shards (default: val)")
    parser.add_argument("--max-docs", type=int, default=None, help="check only the first N documents")
    parser.add_argument("--show", type=int, default=5, help="mismatching documents to print")
    args = parser.parse_args(argv)

    try:
        if not Path(args.tokenizer).is_file():
            raise ValueError(f"--tokenizer {args.tokenizer} not found (or not a file); give a SentencePiece .model file")
        sp = tg.load_tokenizer(args.tokenizer)  # a garbage file is one line, not a traceback
        counts = caseops.PieceBytes(sp) if has_caseops_pieces(sp) else None
        luts = tg.build_byte_luts(args.tokenizer, sp.vocab_size(), sidecar=counts is not None)
        raw = None
        if args.input:
            texts = list(itertools.islice(iter_documents(args.input), args.max_docs))
            raw = sum(len(t.encode("utf-8")) for t in texts)
            docs = list(encode_texts(sp, map(caseops.encode, texts) if counts else texts, os.cpu_count() or 1))
        else:
            tokens = np.concatenate([np.asarray(tg.read_shard(p)) for p in tg.shard_paths(args.shards, args.split)])
            if int(tokens.max(initial=0)) >= sp.vocab_size():
                raise tg.ConfigError(f"{args.shards} holds token id {int(tokens.max())} >= the tokenizer's {sp.vocab_size()} pieces; wrong tokenizer")
            docs = split_at_bos(tokens)[: args.max_docs]
        if not docs:
            raise tg.ConfigError("no documents to check")
        r = check(sp, luts, docs, counts)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    n_tok = max(r["tokens"], 1)
    print(f"tokenizer:{args.tokenizer} vocab_size:{sp.vocab_size()}" + (f" transform:{caseops.NAME}" if counts else ""))
    print(f"docs:{r['docs']} tokens:{r['tokens']} table_bytes:{r['table_bytes']} decoded_bytes:{r['decoded_bytes']}")
    line = f"bytes_per_token:{r['table_bytes'] / n_tok:.4f} bytes_per_token_with_bos:{r['table_bytes'] / (n_tok + r['docs']):.4f}"
    if raw is not None:
        line += f" raw_bytes_per_token:{raw / n_tok:.4f}"
    print(line)
    print(f"unk_tokens:{r['unk_tokens']} byte_fallback_tokens:{r['byte_fallback_tokens']}")
    for i, t, d in r["mismatches"][: args.show]:
        print(f"mismatch doc:{i} table_bytes:{t} decoded_bytes:{d}")
    ok = not r["mismatches"]
    what = "sidecar_counts" if counts else "byte_tables"
    print(f"{what}:{'ok' if ok else 'MISMATCH'} mismatched_docs:{len(r['mismatches'])}/{r['docs']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
