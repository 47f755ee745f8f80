#!/usr/bin/env python3
"""How long does each eval stage of train_gpt.py take on WORLD GPUs (synthetic tokens)? `python3 tools/bench_eval.py`

Eval-stage timing of train_gpt.py on synthetic tokens, as rank 0 of a WORLD-GPU run.

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

Without a GPU, `--project` counts instead of timing: forward FLOPs of one EVAL_SEQ_LEN row (PyTorch's
FlopCounterMode on the meta device, the config from the env), the rows each stage runs on rank 0
(from the same planners the stages use, synthetic document lengths), backward = 2x forward, plus the
adapters' FLOPs. FLOPs become seconds at two rates, both calibrated on the 04-09 record's logs on
8xH100: forward-only work at the rate at which its sliding eval (stride 64, window 2048) takes 107 s
(94-121 s); forward+backward work (TTT updates, LoRA steps, the phased SGD) at the rate at which
its TTT's training part took 343 - 107 s (TTT 318-368 s; eager, 2 sequences per rank per step, so
this bound is pessimistic for the LoRA stage's 64-row steps). The LoRA stage is printed at both
rates: a range, not a measurement.

    python3 tools/bench_eval.py --project [--world 8] [--tokens 40540160]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

STAGES = ("plain", "sliding", "ttt", "doc_plain", "doc_sliding", "lora_ttt")
VAL_TARGETS = 40_540_160  # the FineWeb validation stream at EVAL_SEQ_LEN=2048 (04-09 log: val_tokens)


SLIDING_0409_SECONDS = 107.0  # 04-09 record logs: sliding eval 94-121 s on 8xH100 (stride 64, window 2048)
TTT_0409_SECONDS = 343.0  # 04-09 record logs: TTT 318-368 s (scoring + 3 epochs of SGD per 32,768-token chunk)


def row_flops(h: tg.Hyperparameters) -> float:
    """Forward FLOPs of one [1, EVAL_SEQ_LEN] row (looping on), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = tg.GPT(h)
    tg.set_looping(m, h.looping_enabled)
    x = torch.zeros(1, h.eval_seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc:
        m.token_nll(x, x)
    return float(fc.get_total_flops())


def lora_row_flops(h: tg.Hyperparameters) -> float:
    """Forward FLOPs the adapters add to one row: 2 r (in + out) per target per virtual slot."""
    d, kv = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads)
    dims = {"q": d + d, "k": d + kv, "v": d + kv, "o": d + d, "mlp": d + d, "head": d + h.vocab_size}
    sched = tg.layer_schedule(h, h.looping_enabled)
    slots = len(sched.encoder) + len(sched.decoder)
    per_tok = sum(dims[t] * (1 if t == "head" else slots) for t in h.lora_target_list) * 2 * h.lora_rank
    return per_tok * h.eval_seq_len


def lora_steps(h: tg.Hyperparameters, starts: np.ndarray, ends: np.ndarray, world: int) -> int:
    """Steps rank 0 of eval_lora_ttt takes: rows refilled in stream order, drained at each phase bound."""
    bounds = tg.phase_bounds(h, len(starts))
    n_chunks = -(-(ends - starts) // h.lora_chunk_tokens)
    mine = list(range(0, len(starts), world))
    left, qi, steps, phase = [0] * h.lora_batch_docs, 0, 0, 0
    while True:
        gate = bounds[phase] if phase < len(bounds) else len(starts)
        for r in range(len(left)):
            if left[r] == 0 and qi < len(mine) and mine[qi] < gate:
                left[r], qi = int(n_chunks[mine[qi]]), qi + 1
        if not any(left):
            if phase == len(bounds):
                return steps
            phase += 1
            continue
        steps += 1
        left = [max(c - 1, 0) for c in left]


def project(h: tg.Hyperparameters, args) -> int:
    n = args.tokens or VAL_TARGETS
    T, W = h.eval_seq_len, args.world
    gen = np.random.default_rng(0)
    lengths = np.maximum(gen.exponential(args.doc_len, n // 8 + 1).astype(np.int64), 1)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    starts = starts[starts < n]
    ends = np.append(starts[1:], n)
    ref = tg.Hyperparameters(**{**{f.name: getattr(h, f.name) for f in tg.fields(h)}, "eval_seq_len": 2048, "eval_stride": 64})
    f_ref = row_flops(ref)
    rate = (len(tg.window_starts(VAL_TARGETS, 2048, 64)) / 8) * f_ref / SLIDING_0409_SECONDS
    ttt_seqs = (-(-VAL_TARGETS // 32768) - 1) * 3 * (32768 // 2048 // 8)  # per rank, 04-09 TTT
    train_rate = ttt_seqs * 3 * f_ref / (TTT_0409_SECONDS - SLIDING_0409_SECONDS)
    f_row, f_lora = row_flops(h), lora_row_flops(h)
    per_rank = lambda rows: -(-rows // W)  # noqa: E731
    rows = {
        "plain": per_rank(-(-n // T)),
        "sliding": per_rank(len(tg.window_starts(n, T, h.eval_stride))),
        "doc_plain": per_rank(len(tg.doc_windows(starts, ends, T, T)[0])),
        "doc_sliding": per_rank(len(tg.doc_windows(starts, ends, T, h.eval_stride)[0])),
    }
    ttt_train = (-(-n // h.ttt_chunk_tokens) - 1) * h.ttt_epochs * per_rank(h.ttt_chunk_tokens // T)
    secs = {k: v * f_row / rate for k, v in rows.items()}
    secs["ttt"] = rows["sliding"] * f_row / rate + 3 * ttt_train * f_row / train_rate
    steps = lora_steps(h, starts, ends, W)
    bounds = tg.phase_bounds(h, len(starts))
    sgd_seqs = sum(int(starts[b]) // h.ttt_chunk_tokens * per_rank(h.ttt_chunk_tokens // T) for b in bounds)
    lora_work = steps * h.lora_batch_docs * 3 * (f_row + f_lora) + 3 * sgd_seqs * f_row
    secs["lora_ttt"] = lora_work / rate
    print(f"method:flop_count calibration:04-09_logs sliding={SLIDING_0409_SECONDS:.0f}s ttt={TTT_0409_SECONDS:.0f}s "
          f"fwd_rate:{rate / 1e12:.1f}TFLOP/s/gpu train_rate:{train_rate / 1e12:.1f}TFLOP/s/gpu "
          f"world:{W} targets:{n} docs:{len(starts)} mean_doc:{args.doc_len:g} seq_len:{T} stride:{h.eval_stride} "
          f"row_fwd:{f_row / 1e9:.1f}GFLOP lora_row_fwd:{f_lora / 1e9:.1f}GFLOP")
    print(f"lora_ttt rank0_steps:{steps} rows:{h.lora_batch_docs} phase_bounds:{bounds} sgd_seqs_rank0:{sgd_seqs} "
          f"at_fwd_rate:{lora_work / rate:.1f}s at_train_rate:{lora_work / train_rate:.1f}s")
    for k in args.stages:
        print(f"stage:{k} projected_world{W}:{secs[k]:.1f}s")
    print(f"eval_total:{sum(secs[k] for k in args.stages):.1f}s limit:{tg.EVAL_LIMIT_SECONDS:.0f}s (no load/compile counted)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=0, help="validation targets (0: 40.5M on CUDA, 16k on CPU)")
    ap.add_argument("--world", type=int, default=8, help="emulate rank 0 of this many GPUs")
    ap.add_argument("--stages", nargs="+", default=["plain", "sliding", "ttt"], choices=list(STAGES))
    ap.add_argument("--doc-len", type=float, default=810.0, help="mean synthetic document length (tokens)")
    ap.add_argument("--project", action="store_true", help="FLOP-count projection to --world H100s (no timing)")
    args = ap.parse_args(argv)
    h = tg.Hyperparameters.from_env()
    if args.project:
        return project(h, args)
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
    warm = tg.eval_warmup(h, model, scorer, loss_fn, d, tokens)
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
