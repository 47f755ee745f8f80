#!/usr/bin/env python3
"""How fast does data/build_shards.py export documents and tokens? `python3 tools/bench_export.py --input FILE.jsonl --tokenizer SP.model`

Export throughput of data/build_shards.py: documents and tokens per second.

Exports the given documents into a temporary directory once per (tokenizer, worker count) and
reports the wall time of the whole export (reading JSON, encoding, writing shards), and the CPU
time of this process and its workers, which a busy machine inflates less than the wall time:

    python3 tools/bench_export.py --input ../shared/data/corpus/*.jsonl \
        --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model ../shared/data/tokenizers/fineweb_8192_bpe.model \
        --workers 1 2

Output: one `key:value` line per run.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import build_shards  # noqa: E402


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench(inputs: list[str], tokenizer: str, workers: int, val_docs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), cpu_seconds()
        s = build_shards.build_shards(inputs, tokenizer, Path(tmp) / "out", val_docs=val_docs, workers=workers)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    docs, tokens = s["val_docs"] + s["train_docs"], s["val_tokens"] + s["train_tokens"]
    text_bytes = sum(os.path.getsize(p) for p in inputs)
    return {"tokenizer": Path(tokenizer).name, "workers": workers, "docs": docs, "tokens": tokens, "seconds": f"{dt:.2f}",
            "docs/s": f"{docs / dt:.0f}", "tokens/s": f"{tokens / dt:.0f}", "input_MB/s": f"{text_bytes / 1e6 / dt:.2f}",
            "cpu_seconds": f"{cpu:.2f}", "tokens/cpu_s": f"{tokens / cpu:.0f}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure export throughput (documents/s, tokens/s).")
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl / .txt documents")
    parser.add_argument("--tokenizer", nargs="+", required=True, help="SentencePiece .model file(s)")
    parser.add_argument("--workers", nargs="+", type=int, default=[2], help="worker counts to try")
    parser.add_argument("--val-docs", type=int, default=50, help="validation documents (does not change the cost)")
    args = parser.parse_args(argv)
    print(f"cpus:{os.cpu_count()} affinity:{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 'n/a'} "
          f"load1:{os.getloadavg()[0]:.2f}")
    try:
        for tok in args.tokenizer:
            for w in args.workers:
                print(" ".join(f"{k}:{v}" for k, v in bench(args.input, tok, w, args.val_docs).items()), flush=True)
    except (OSError, ValueError, RuntimeError) as e:  # bad --input/--tokenizer: one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
