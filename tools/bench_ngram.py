#!/usr/bin/env python3
"""How long does the n-gram tilt's hint precompute take on a validation-sized stream? `python3 tools/bench_ngram.py`

Times train_gpt.ngram_hints on a stream of the validation set's size.

Stream: the Wikipedia sample tokenized with the sp8192 tokenizer, each document as [BOS] + ids as
the shards hold it (~13.2M tokens), then tokens drawn from its unigram frequencies up to --tokens
targets (47,851,520 = the CaseOps validation set), so that, as in the real stream, most 15-token
contexts are new. The precompute runs single-threaded (numpy sorts are; OMP_NUM_THREADS=1 for the
rest). --check N compares the first N targets' hints with the left-to-right dict-of-counters
reference of the same rule (seconds per 1M targets), token for token.

    OMP_NUM_THREADS=1 python3 tools/bench_ngram.py [--tokens 47851520] [--check 1000000] [--repeat 1]

Output: `key:value` lines; the last is `ngram_bench ... precompute:<s>s`. Exit status 1 when the
check finds a difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def reference_hints(tokens, order: int, threshold: float) -> np.ndarray:
    """The rule read literally, one target at a time: look up the context's counts, then add the target."""
    k, t = order - 1, [int(x) for x in tokens]
    out, table = np.full(len(t) - 1, -1, dtype=np.int32), {}
    for i in range(k - 1, len(t) - 1):
        ctx = tuple(t[i - k + 1 : i + 1])
        s = table.get(ctx)
        if s is None:
            s = table[ctx] = [0, 0, -1, {}]  # total, top count, top token, counts
        elif s[1] / s[0] >= threshold:
            out[i] = s[2]
        y = t[i + 1]
        c = s[3][y] = s[3].get(y, 0) + 1
        s[0] += 1
        if c > s[1]:  # strictly more: a tie keeps the top
            s[1], s[2] = c, y
    return out


def wiki_tokens(corpus: Path, tokenizer: Path, cache: Path | None) -> np.ndarray:
    if cache and cache.exists():
        return np.load(cache)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    out = np.concatenate([np.array([tg.BOS_ID] + ids, dtype=np.uint16) for ids in sp.encode(texts)])
    if cache:
        np.save(cache, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=47_851_520, help="targets of the stream")
    ap.add_argument("--corpus", default=str(SHARED / "corpus" / "enwiki_2015_wikiextractor_sample.jsonl"))
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "fineweb_8192_bpe.model"))
    ap.add_argument("--cache", default="/tmp/bench_ngram_wiki_sp8192.npy", help="tokenized corpus cache ('' = none)")
    ap.add_argument("--order", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--check", type=int, default=0, help="compare the first N targets with the reference")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.tokens, args.order - 1, args.repeat) < 1 or args.check < 0 or not 0 < args.threshold <= 1:
        ap.error("--tokens, --repeat >= 1, --order >= 2, --check >= 0 and 0 < --threshold <= 1")
    for what, p in (("corpus", args.corpus), ("tokenizer", args.tokenizer)):
        if not Path(p).is_file():
            print(f"error: --{what} {p} is not a file; pass --{what} PATH", file=sys.stderr)
            return 2
    try:
        wiki = wiki_tokens(Path(args.corpus), Path(args.tokenizer), Path(args.cache) if args.cache else None)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # not JSON lines of {"text"}, not a model
        print(f"error: cannot read the corpus or tokenizer ({type(e).__name__}: {e}); pass a JSONL --corpus and a "
              f"SentencePiece --tokenizer", file=sys.stderr)
        return 2
    n = args.tokens + 1
    freq = np.bincount(wiki, minlength=8192).astype(np.float64)
    rng = np.random.default_rng(args.seed)
    fill = rng.choice(freq.size, size=max(n - wiki.size, 0), p=freq / freq.sum()).astype(np.uint16)
    stream = np.concatenate([wiki, fill])[:n]
    print(f"ngram_stream targets:{n - 1} wiki_tokens:{min(wiki.size, n)} unigram_tokens:{fill.size}")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        hints = tg.ngram_hints(stream, args.order, args.threshold)
        times.append(time.perf_counter() - t0)
    y = stream[1:].astype(np.int64)
    hinted, correct = int((hints >= 0).sum()), int((hints == y).sum())
    status = 0
    if args.check:
        m = min(args.check, n - 1)
        t0 = time.perf_counter()
        ref = reference_hints(stream[: m + 1], args.order, args.threshold)
        diff = int((ref != tg.ngram_hints(stream[: m + 1], args.order, args.threshold)).sum())
        print(f"ngram_check targets:{m} hinted:{int((ref >= 0).sum())} differences:{diff} "
              f"reference_time:{time.perf_counter() - t0:.1f}s")
        status = int(diff > 0)
    print(f"ngram_bench targets:{n - 1} hinted:{hinted} correct:{correct} order:{args.order} "
          f"threshold:{args.threshold} precompute:{min(times):.2f}s runs:{','.join(f'{t:.2f}' for t in times)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
