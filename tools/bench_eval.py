#!/usr/bin/env python3
"""Eval-stage timing of train_gpt.py on synthetic tokens, as rank 0 of a WORLD-GPU run.

Builds the model from Hyperparameters.from_env() (PRESET / env overrides apply) with random
weights, and runs the plain, sliding and TTT stages, and the document stages (doc_plain,
doc_sliding, lora_ttt with its phased global SGD), over a synthetic validation stream of --tokens
targets with the window, chunk and document shares of rank 0 of --world ranks. Documents: a BOS
every ~--doc-len tokens (exponential lengths; 810 = 40.5M val tokens / 50,000 documents). Without a process group the
collectives are no-ops, so the work done is exactly one rank's share: the printed times are the
projection to WORLD GPUs, minus communication (one all-reduce of the gradients per TTT step). The
scores are meaningless (random weights, random tokens); only the times count.

    python3 tools/bench_eval.py                          # GPU, record config, 40.5M tokens, world 8
    python3 tools/bench_eval.py --world 1 --tokens 4000000
    PRESET=smoke python3 tools/bench_eval.py             # CPU smoke config
    python3 tools/bench_eval.py --stages doc_plain doc_sliding lora_ttt   # the document stages

Timed on one GPU with the full 40.5M targets, a stage's time is the 8xH100 projection: rank 0 does
exactly its share (the phased SGD trains on the same 2,500-document prefix at any stream length, so
do not shorten --tokens for lora_ttt). H200 vs H100 speed and the all-reduces are not modelled. On
CPU the times only rank the stages.

Output: `key:value` lines, one per stage, then the sum against the 600 s eval limit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

STAGES = ("plain", "sliding", "ttt", "doc_plain", "doc_sliding", "lora_ttt")
VAL_TARGETS = 40_540_160  # the FineWeb validation stream at EVAL_SEQ_LEN=2048 (SPEC 1.3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=0, help="validation targets (0: 40.5M on CUDA, 16k on CPU)")
    ap.add_argument("--world", type=int, default=8, help="emulate rank 0 of this many GPUs")
    ap.add_argument("--stages", nargs="+", default=["plain", "sliding", "ttt"], choices=list(STAGES))
    ap.add_argument("--doc-len", type=float, default=810.0, help="mean synthetic document length (tokens)")
    args = ap.parse_args(argv)
    h = tg.Hyperparameters.from_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = tg.Dist(0, args.world, 0, device)
    n = args.tokens or (VAL_TARGETS if device.type == "cuda" else 16_384)
    n = n // h.eval_seq_len * h.eval_seq_len
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, h.vocab_size, (n + 1,), generator=gen)
    lengths = torch.empty(n // 8 + 1).exponential_(1 / args.doc_len, generator=gen).long() + 1
    bos = lengths.cumsum(0)
    tokens[bos[bos < n]] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    tokens = tokens.to(device)
    luts = (torch.ones(h.vocab_size, dtype=torch.int64), torch.zeros(h.vocab_size, dtype=torch.bool),
            torch.zeros(h.vocab_size, dtype=torch.bool))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = tg.GPT(h).to(device)
    tg.set_looping(model, h.looping_enabled)
    if "ttt" in args.stages:
        tg.prepare_ttt(model, h)
    scorer, loss_fn = tg.eval_callables(h, model, d)
    warm = tg.eval_warmup(h, model, scorer, loss_fn, d)
    print(f"device:{device} world:{args.world} targets:{n} docs:{len(tg.doc_spans(tokens)[0])} seq_len:{h.eval_seq_len} "
          f"stride:{h.eval_stride} ttt_chunk:{h.ttt_chunk_tokens} compile:{int(h.compile and device.type == 'cuda')}")
    print(f"stage:warmup time:{warm:.1f}s")
    total = warm
    for stage in args.stages:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if stage == "ttt":
            tg.eval_ttt(h, model, scorer, loss_fn, d, tokens, luts)
        elif stage == "lora_ttt":
            tg.eval_lora_ttt(h, model, loss_fn, d, tokens, luts)
        elif stage.startswith("doc_"):
            tg.eval_doc_windows(h, scorer, d, tokens, luts, h.eval_seq_len if stage == "doc_plain" else h.eval_stride)
        else:
            tg.eval_windows(h, scorer, d, tokens, luts, h.eval_seq_len if stage == "plain" else h.eval_stride)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total += dt
        mem = f" peak_mem:{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device.type == "cuda" else ""
        print(f"stage:{stage} time:{dt:.1f}s projected_world{args.world}:{dt:.1f}s{mem}")
    print(f"eval_total:{total:.1f}s limit:{tg.EVAL_LIMIT_SECONDS:.0f}s (plain is a diagnostic; TTT is the score)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
