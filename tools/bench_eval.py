#!/usr/bin/env python3
"""How long does each eval stage of train_gpt.py take on WORLD GPUs (synthetic tokens)? `python3 tools/bench_eval.py`

Eval-stage timing of train_gpt.py on synthetic tokens, as rank 0 of a WORLD-GPU run.

Builds the model from Hyperparameters.from_env() (PRESET / env overrides apply) with random
weights, and runs the record config's stages (plain, then lora_ttt with its phased global SGD: the
score) or those --stages names (sliding, ttt, doc_plain, doc_sliding), over a synthetic validation stream of --tokens
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

Without a GPU, `--project` projects the LoRA TTT stage and the eval budget to 8xH100 from the
validation set's document lengths (`--lengths`: an .npy of lengths as the records log them, `dl:`
= a BOS through the next document's BOS = targets + 1; or a val shard .bin, lengths from its BOS
positions). A step costs FLOPs / rate + rows x a per-row cost. FLOPs: PyTorch's FlopCounterMode on
the meta device at 1024 and 2048 positions separates the matmuls (per position; the head apart)
from attention (per query-key pair, causal half); frozen matmuls x2 with a backward, adapters and
attention x3. The rate and the per-row cost are calibrated on a public record's own algorithm
(documents sorted by length into batches of 64, longest batch first, a dynamic queue over 8 ranks,
one [rows, min((ci+1)*chunk, 2048)] step per chunk of the batch's longest document, phases paused
at barriers: an event simulation) so that it reproduces that record's LoRA scoring time (its TTT
timer minus its phase pauses, ttpr - ttpp) and its first barrier (ttpp of phase 1). `--check`
models other records with the same constants. Ours is then simulated rank by rank with
train_gpt.py's own planners (lora_queues, lora_rows, pack_lanes, lane_bucket) at the env config,
over --orders random stream orders (the real order is not in the logs): each phase block ends at
the slowest rank, then the global SGD (its chunks x the calibration record's seconds per chunk,
scaled by the FLOPs of a chunk at EVAL_SEQ_LEN). Added: the diagnostic quantized eval (forward
FLOPs at the same rate), the compile warmup and the artifact load (assumed from the records' logs).

    python3 tools/bench_eval.py --project --lengths val_lengths.npy [--orders 5] [--sweep]
        [--calibrate 04-19|04-22|04-13|1855] [--calib-lengths F] [--check 04-16=sp8192_lengths.npy ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

STAGES = ("plain", "sliding", "ttt", "doc_plain", "doc_sliding", "lora_ttt")
VAL_TARGETS = 40_540_160  # the FineWeb validation stream at EVAL_SEQ_LEN=2048 (04-09 log: val_tokens)


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


# --- Projection of the LoRA stage to 8xH100 (--project) -----------------------------------------
# Cost of one forward(+backward) step = FLOPs / rate + rows x per-row cost, with FLOPs = frozen matmuls
# per position + adapters per position + attention per (query, key) pair + head per head position.
# The rate and the per-row cost are calibrated on a public record's own algorithm (sorted batches of
# 64 documents, [64, ctx] steps, a dynamic queue over 8 ranks, phased global SGD), then applied to ours.
# The records' figures below are from their logs: eval_time of quantized_ttt_phased (the TTT timer),
# ttpp/ttpr (phase pause start/end), tttg (global SGD chunks); #1855's from its seed-42 log.


class Record(NamedTuple):
    """Logged figures of one public record's LoRA TTT stage on 8xH100 (seconds on its TTT timer)."""
    source: str  # record folder (PR), seed of the log
    vocab: str  # validation set it scored: sp8192 or caseops
    rank: int  # LoRA rank
    chunk: int  # targets per chunk
    prefix: int  # phased global SGD: documents of the prefix (0: none)
    phases: int
    timer: float  # the logged TTT eval_time
    pauses: tuple  # per phase (ttpp, ttpr): every rank at the barrier, global SGD done
    sgd_chunks: tuple  # tttg chunks per phase


RECORDS = {
    "04-19": Record("2026-04-19_SP8192_CaseOps_GatedAttn_QuantGate_Loop45_PhasedTTT (PR #1736) seed 0", "caseops",
                    96, 48, 2000, 3, 399.3, ((166.7, 177.4), (240.6, 256.4), (273.4, 294.2)), (111, 185, 250)),
    "04-22": Record("2026-04-22_..._PhasedTTT_MLPClip12 (PR #1769) seed 1", "caseops",
                    96, 48, 2000, 3, 391.2, ((164.9, 174.9), (236.6, 251.5), (268.6, 288.1)), (111, 185, 250)),
    "1855": Record("2026-04-27_..._1.0611 (PR #1855) seed 42", "caseops",
                   80, 48, 2500, 3, 508.8, ((209.0, 225.6), (331.0, 360.8), (377.0, 415.0)), (131, 219, 289)),
    "04-16": Record("2026-04-16_SmearGate_AttentionOutputGate_ScoreFirstTTT seed 0", "sp8192", 96, 48, 0, 0, 234.1, (), ()),
    "04-13": Record("2026-04-13_VarLenAttn_PhasingTTT2000 seed 0", "sp8192", 96, 32, 2000, 1, 500.1, ((251.3, 301.1),), (213,)),
}
RECORD_BATCH, RECORD_CTX, RECORD_WORLD, RECORD_SGD_CHUNK = 64, 2048, 8, 32_768
WARMUP_SECONDS = 89.6  # median TTT compile warmup of 04-16, 04-19, 04-22 and #1855's three seeds (83.7-137.6 s)
LOAD_SECONDS = 20.0  # #1855 logs: artifact decompression 18.2-20.4 s
NGRAM_SECONDS = 10.8  # tools/bench_ngram.py: the hint precompute of 47.85M targets, 3.6-10.8 s on one CPU core (the slow end)
EVAL_TARGET_SECONDS = 540.0  # 600 s limit minus a 60 s margin


def read_lengths(path: str) -> np.ndarray:
    """Per-document lengths as the records log them (`dl:`: a BOS through the next document's BOS, i.e.
    targets + 1): an .npy of lengths, or a validation shard (.bin) whose BOS positions give them."""
    p = Path(path)
    if not p.is_file():
        raise tg.ConfigError(f"--lengths {path} is not a file; pass an .npy of document lengths or a val shard .bin")
    if p.suffix == ".bin":
        toks = tg.read_shard(str(p))
        starts = np.union1d([0], np.flatnonzero(np.asarray(toks) == tg.BOS_ID))
        out = np.diff(np.append(starts, toks.size - 1)) + 1
    else:
        try:
            out = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 (np.load raises many kinds on a file that is not an .npy)
            raise tg.ConfigError(f"--lengths {path} is not an .npy array ({str(e).splitlines()[0][:80]}); "
                                 f"pass an .npy of document lengths or a val shard .bin") from None
    if out.ndim != 1 or out.size == 0 or out.dtype.kind not in "iu" or out.min() < 2:
        raise tg.ConfigError(f"--lengths {path}: need a 1-D integer array of document lengths >= 2 (BOS to next BOS)")
    return out.astype(np.int64)


class Flops(NamedTuple):
    """Forward FLOPs: per position of the frozen body and of its adapters, per head position (tied head,
    its adapter), and per (query, key) pair of causal attention."""
    base: float
    lora: float
    head: float
    head_lora: float
    att: float

    def step(self, positions, head_positions, pairs, train):
        """A forward, and with train its backward: input gradients only through the frozen matmuls (x2),
        input and weight gradients of the adapters (x3), attention backward ~2x its forward (x3)."""
        m, ma = np.where(train, 2, 1), np.where(train, 3, 1)
        return (m * (self.base * positions + self.head * head_positions)
                + ma * (self.lora * positions + self.head_lora * head_positions + self.att * pairs))

    @property
    def params(self) -> float:
        """Adapter parameters of one row: r (in + out) per site, half the adapters' FLOPs per position."""
        return (self.lora + self.head_lora) / 2

    def train_tokens(self, tokens, seq_len):
        """Full-model SGD (weight gradients too, x3) on tokens in sequences of seq_len: the global SGD."""
        return 3 * ((self.base + self.head) * tokens + self.att * tokens * seq_len)


_FLOPS: dict = {}


def flop_terms(h: tg.Hyperparameters) -> Flops:
    """FlopCounterMode at 1024 and 2048 positions separates the matmuls (linear) from attention
    (quadratic; the counter charges the full square, causal kernels half of it)."""
    key = tuple((f.name, getattr(h, f.name)) for f in tg.fields(h) if f.name not in ("eval_seq_len", "ttt_chunk_tokens"))
    if key not in _FLOPS:
        f1, f2 = (row_flops(dataclasses.replace(h, eval_seq_len=n, ttt_chunk_tokens=n)) for n in (1024, 2048))
        quad = (f2 - 2 * f1) / (2 * 1024**2)
        lin, head = f1 / 1024 - quad * 1024, 2.0 * h.model_dim * h.vocab_size
        per = lora_row_flops(dataclasses.replace(h, eval_seq_len=1))
        head_lora = 2.0 * h.lora_rank * (h.model_dim + h.vocab_size) if "head" in h.lora_target_list else 0.0
        _FLOPS[key] = Flops(lin - head, per - head_lora, head, head_lora, quad / 2)
    return _FLOPS[key]


class Rate(NamedTuple):
    """Seconds of a clock (FLOPs, rows x steps, pause seconds)."""
    sec_per_flop: float
    per_row: float  # per row of a step, whatever its context: the record's host loop over its rows and every
    # row's adapters and AdamW state read and written each step (the same in ours: lora_rows, the flat AdamW)

    def secs(self, clock) -> float:
        return float(clock[0] * self.sec_per_flop + clock[1] * self.per_row) + (clock[2] if len(clock) > 2 else 0.0)


def record_batches(lengths: np.ndarray, chunk: int, fl: Flops, bsz: int = RECORD_BATCH, T: int = RECORD_CTX):
    """The record's queue: documents sorted by length, batches of bsz cut from the shortest, taken longest
    first. Each batch runs one [bsz, ctx] step per chunk of its longest document, ctx = min((ci+1)*chunk, T)
    whatever the documents' lengths, backward on all but the last. Returns [(docs, (FLOPs, rows x steps))]."""
    s = np.sort(lengths - 1)  # targets
    cuts = [s[i : i + bsz] for i in range(0, len(s), bsz)]
    cuts.sort(key=lambda b: -int(b.max()))  # stable: ties keep the ascending order, as the record's sort
    nc_max = -(-int(s.max()) // chunk)
    ctx = np.minimum(np.arange(1, nc_max + 1) * chunk, T).astype(np.float64)
    train = np.concatenate([[0.0], np.cumsum(fl.step(ctx, ctx, ctx**2, True))])
    fwd = fl.step(ctx, ctx, ctx**2, False)
    out = []
    for b in cuts:
        nc = -(-int(b.max()) // chunk)
        out.append((len(b), (len(b) * (train[nc - 1] + fwd[nc - 1]), len(b) * nc)))
    return out


def simulate_record(batches, bounds, pauses, rate: Rate, world: int = RECORD_WORLD):
    """Event simulation of the record's queue: a free rank claims the next batch; when the documents of
    finished batches reach a phase bound, each rank stops after its current batch; once all wait, the
    global SGD takes pauses[phase] and all resume. Clocks are (FLOPs, rows x steps, pause seconds) so a
    fit can solve for the rate. Returns (clock of the last rank to finish, [clock at each barrier])."""
    clock, heap, waiting, barriers = np.zeros((world, 3)), [], [], []
    q = done = phase = 0
    flag = False

    def claim(r):
        nonlocal q
        if q < len(batches):
            clock[r, :2] += batches[q][1]
            heapq.heappush(heap, (rate.secs(clock[r]), r, q))
            q += 1

    for r in range(world):
        claim(r)
    while heap:
        _, r, b = heapq.heappop(heap)
        if phase < len(bounds):
            done += batches[b][0]
            flag = flag or done >= bounds[phase]
        if not (flag and phase < len(bounds)):
            claim(r)
            continue
        waiting.append(r)
        if heap:
            continue
        c = max((clock[w] for w in waiting), key=rate.secs).copy()
        barriers.append(c.copy())
        c[2] += pauses[phase]
        for w in waiting:
            clock[w] = c
        phase, flag, waiting = phase + 1, False, []
        for w in range(world):
            claim(w)
    return max(clock, key=rate.secs).copy(), barriers


def record_model(rec: Record, lengths: np.ndarray, base: tg.Hyperparameters):
    """(batches, phase bounds, logged pause seconds) of a record on these lengths."""
    h = dataclasses.replace(base, lora_rank=rec.rank, lora_targets="q,k,v,o,mlp,head")
    bounds = [rec.prefix * (p + 1) // rec.phases for p in range(rec.phases)]
    return record_batches(lengths, rec.chunk, flop_terms(h)), bounds, [b - a for a, b in rec.pauses]


def logged_scoring(rec: Record) -> float:
    """The record's LoRA scoring time: its TTT timer minus its phase pauses (barrier to global SGD done)."""
    return rec.timer - sum(b - a for a, b in rec.pauses)


def calibrate(rec: Record, lengths: np.ndarray, base: tg.Hyperparameters) -> Rate:
    """The rate and per-row step cost that reproduce the record's scoring time and its first barrier (ttpp
    of phase 1). That barrier waits for the longest batches, [64, 2048] and [16, 2048] steps: mostly
    FLOPs; the total adds ~700 short 64-row batches: mostly rows. A per-step constant is not separable
    from the per-row cost on these logs (nearly every step has 64 rows)."""
    if not rec.pauses:
        raise tg.ConfigError(f"--calibrate {rec.source}: needs a record with phases (a logged barrier time)")
    batches, bounds, pauses = record_model(rec, lengths, base)
    want = [logged_scoring(rec), rec.pauses[0][0]]
    rate, seen = Rate(1 / 200e12, 5e-4), []
    for _ in range(30):  # the critical path depends on the rate: re-solve until it repeats
        end, bars = simulate_record(batches, bounds, pauses, rate)
        if not bars:
            raise tg.ConfigError(f"--calibrate: {len(lengths)} documents never reach the record's first phase bound "
                                 f"{bounds[0]}; pass the full validation set's lengths")
        try:
            k, c = np.linalg.solve(np.array([end[:2], bars[0][:2]]), want)
        except np.linalg.LinAlgError:
            k = c = -1.0
        if k <= 0 or c < 0:
            raise tg.ConfigError(f"--calibrate {rec.source}: no positive rate fits these lengths; "
                                 f"pass the lengths of the validation set it scored ({rec.vocab})")
        rate = Rate(float(k), float(c))
        if rate in seen:
            break
        seen.append(rate)
    return rate


def record_positions(lengths: np.ndarray, chunk: int, bsz: int = RECORD_BATCH, T: int = RECORD_CTX) -> float:
    """Positions the record's forwards process per target (every row padded to the step's ctx)."""
    ctx = np.concatenate([[0], np.cumsum(np.minimum(np.arange(1, -(-int(lengths.max()) // chunk) + 1) * chunk, T))])
    s = np.sort(lengths - 1)
    nc = np.array([-(-int(s[i : i + bsz].max()) // chunk) for i in range(0, len(s), bsz)])
    rows = np.array([len(s[i : i + bsz]) for i in range(0, len(s), bsz)])
    return float((rows * ctx[nc]).sum() / s.sum())


def check_record(rec: Record, lengths: np.ndarray, base: tg.Hyperparameters, rate: Rate) -> dict:
    batches, bounds, pauses = record_model(rec, lengths, base)
    end, bars = simulate_record(batches, bounds, pauses, rate)
    out = {"scoring": rate.secs(end[:2]), "timer": rate.secs(end), "logged_scoring": logged_scoring(rec),
           "barriers": [rate.secs(b) for b in bars], "logged_barriers": [a for a, _ in rec.pauses],
           "positions_per_target": record_positions(lengths, rec.chunk)}
    return out


# --- Our stage: every rank's packed steps from train_gpt's own planners ---------------------------


class RankSteps(NamedTuple):
    """One rank's forwards of one phase block: positions (lanes x T), attention pairs, trains (backward),
    rows (the windows it gathers, trains and writes back)."""
    positions: np.ndarray
    pairs: np.ndarray
    train: np.ndarray
    rows: np.ndarray


def lora_plan(h: tg.Hyperparameters, starts: np.ndarray, ends: np.ndarray, at_bos: np.ndarray, world: int):
    """[rank][block] -> RankSteps of eval_lora_ttt (lora_queues, lora_rows, lora_substeps, pack_lanes,
    lane_bucket: the stage's own functions), and the work totals it logs: (positions, ideal positions, targets)."""
    T, C, R = h.eval_seq_len, h.lora_chunk_tokens, h.lora_batch_docs
    plan, work, cend = [], np.zeros(3), tg.lora_chunk_ends(h, int((ends - starts).max()))
    for blocks in tg.lora_queues(starts, ends, h, world):
        plan.append([])
        for docs in blocks:
            pos, pairs, train, rows = [], [], [], []
            for _, all_wins in tg.lora_rows(starts, ends, docs, R, cend, T):
                bos = [w[2] == starts[w[1]] and at_bos[w[1]] for w in all_wins]
                for wins, (place, n) in tg.lora_substeps(all_wins, bos, T, h.lora_max_lanes):
                    lanes = tg.lane_bucket(n, R)
                    seg = np.diff(np.append(np.union1d([lane * T + off for lane, off in place], np.arange(lanes) * T), lanes * T))
                    pos.append(lanes * T)
                    pairs.append(float((seg.astype(np.float64) ** 2).sum()))  # segments run from a window start to the next (tails included)
                    train.append(any(w[5] for w in wins))
                    rows.append(len(wins))
                    work += (lanes * T, sum(min(w[4] - starts[w[1]], T) for w in wins), sum(w[4] - w[3] for w in wins))
            plan[-1].append(RankSteps(np.array(pos, np.float64), np.array(pairs), np.array(train, bool), np.array(rows, np.float64)))
    return plan, work


def sgd_chunks(h: tg.Hyperparameters, starts: np.ndarray) -> list[int]:
    """Global SGD chunks at each phase bound (global_sgd: a partial last chunk is skipped)."""
    if h.phased_lr == 0:
        return [0] * len(tg.phase_bounds(h, len(starts)))
    return [int(starts[b]) // h.ttt_chunk_tokens for b in tg.phase_bounds(h, len(starts))]


def lora_seconds(h, plan, chunks, rate: Rate, sgd_chunk_s: float, fl: Flops) -> dict:
    """Wall time of the stage: each block ends when its slowest rank ends (global_sgd's all-reduces are a
    barrier; a phase with no SGD chunk has none), then the global SGD."""
    H = h.lora_batch_docs * h.lora_chunk_tokens  # the head runs on [rows, chunk] scored positions
    clocks = [[(fl.step(s.positions, H, s.pairs, s.train).sum(), s.rows.sum()) for s in blocks]  # per-row cost: rows in flight
              for blocks in plan]
    per = [[rate.secs(c) for c in blocks] for blocks in clocks]
    rows = sum(c[1] for blocks in clocks for c in blocks) * rate.per_row
    clock, scoring, wait, sgd = np.zeros(len(plan)), 0.0, 0.0, 0.0
    for p in range(len(plan[0])):
        clock += [blocks[p] for blocks in per]
        if p < len(plan[0]) - 1 and chunks[p] == 0:
            continue
        top = clock.max()
        wait += float((top - clock).sum() / len(clock))
        scoring += top
        if p < len(plan[0]) - 1:
            sgd += chunks[p] * sgd_chunk_s
        clock[:] = 0
    busy = sum(map(sum, per))
    return {"scoring": scoring, "sgd": sgd, "mean_wait": wait, "total": scoring + sgd, "row_share": rows / max(busy, 1e-30)}


def stream_order(lengths: np.ndarray, seed: int):
    """Document spans of one random stream order of these lengths (targets = length - 1 each)."""
    t = np.random.default_rng(seed).permutation(lengths - 1)
    ends = np.cumsum(t)
    return ends - t, ends


def project_ours(h: tg.Hyperparameters, lengths: np.ndarray, orders: int, rate: Rate, sgd_chunk_s: float, world: int) -> dict:
    """Our stage over several random stream orders: per order the LoRA seconds and the work figures."""
    fl = flop_terms(h)
    ref = flop_terms(dataclasses.replace(h, eval_seq_len=RECORD_CTX, ttt_chunk_tokens=RECORD_SGD_CHUNK))
    chunk_s = sgd_chunk_s * fl.train_tokens(h.ttt_chunk_tokens, h.eval_seq_len) / ref.train_tokens(RECORD_SGD_CHUNK, RECORD_CTX)
    runs = []
    for seed in range(orders):
        starts, ends = stream_order(lengths, seed)
        plan, work = lora_plan(h, starts, ends, np.ones(len(starts), bool), world)
        chunks = sgd_chunks(h, starts)
        r = lora_seconds(h, plan, chunks, rate, chunk_s, fl)
        r |= {"positions_per_target": work[0] / work[2], "ideal": work[1] / work[2], "sgd_chunks": sum(chunks),
              "sgd_tokens": sum(chunks) * h.ttt_chunk_tokens, "sgd_chunk_s": chunk_s, "rank_steps_max": max(sum(len(s.positions) for s in b) for b in plan)}
        runs.append(r)
    return {k: [r[k] for r in runs] for k in runs[0]}


def fixed_stages(h: tg.Hyperparameters, targets: int, rate: Rate, world: int) -> dict:
    """Seconds of the other eval-clock items: the diagnostic quantized eval (forward of [B, T] windows over
    every target, each rank its share, from the same rate), the compile warmup and the artifact load (both
    from the records' logs)."""
    fl, T = flop_terms(h)._replace(lora=0.0, head_lora=0.0), h.eval_seq_len
    windows = -(-(-(-targets // T)) // world)  # no adapters: no per-row cost
    quant = rate.secs((fl.step(windows * T, windows * T, windows * T * T, False), 0.0))
    return {"quantized": quant, "warmup": WARMUP_SECONDS, "load": LOAD_SECONDS, "ngram": NGRAM_SECONDS * h.ngram_tilt}


SWEEP = [dict(eval_seq_len=2560, ttt_chunk_tokens=30720, lora_batch_docs=64, lora_chunk_tokens=48, lora_warm_start_a=w,
              phased_prefix_docs=p, phased_num_phases=1) for w in (True, False) for p in (2500, 5000, 10000)]


def spread(xs, fmt: str = ".1f") -> str:
    return "/".join(format(v, fmt) for v in (min(xs), float(np.median(xs)), max(xs)))


def project(h: tg.Hyperparameters, args) -> int:
    """--project: calibrate on a record, check the others asked for, project ours (and the sweep)."""
    if not args.lengths:
        raise tg.ConfigError("--project needs --lengths FILE (an .npy of validation document lengths or a val shard .bin)")
    lengths = read_lengths(args.lengths)
    base = tg.Hyperparameters()  # the record config: the records' model
    rec = RECORDS[args.calibrate]
    rate = calibrate(rec, read_lengths(args.calib_lengths) if args.calib_lengths else lengths, base)
    sgd_chunk_s = sum(b - a for a, b in rec.pauses) / sum(rec.sgd_chunks)
    print(f"calibration record:{args.calibrate} source:{rec.source} rate:{1 / rate.sec_per_flop / 1e12:.1f}TFLOP/s/gpu "
          f"per_row:{rate.per_row * 1e3:.3f}ms/row/step sgd_chunk:{sgd_chunk_s:.4f}s (pauses / chunks of its log)")
    checks = [(args.calibrate, args.calib_lengths or args.lengths)] + [tuple(c.split("=", 1)) for c in args.check]
    rows = []
    for name, path in checks:
        if name not in RECORDS:
            raise tg.ConfigError(f"--check {name}: unknown record; use one of {sorted(RECORDS)}")
        r = check_record(RECORDS[name], read_lengths(path), base, rate)
        err = r["scoring"] / r["logged_scoring"] - 1
        bar = " ".join(f"barrier{i + 1}:{a:.1f}s/{b:.1f}s" for i, (a, b) in enumerate(zip(r["barriers"], r["logged_barriers"])))
        print(f"record:{name} lora_scoring:{r['scoring']:.1f}s logged:{r['logged_scoring']:.1f}s error:{err:+.1%} "
              f"timer:{r['timer']:.1f}s logged_timer:{RECORDS[name].timer:.1f}s {bar} (modelled/logged) "
              f"positions_per_target:{r['positions_per_target']:.2f}")
        rows.append((name, r))
    configs = [("env", h)] + ([(f"sweep{i}", dataclasses.replace(h, **kw)) for i, kw in enumerate(SWEEP)] if args.sweep else [])
    results = []
    for name, hc in configs:
        hc.validate()
        o = project_ours(hc, lengths, args.orders, rate, sgd_chunk_s, args.world)
        fx = fixed_stages(hc, int((lengths - 1).sum()), rate, args.world)
        total = [t + sum(fx.values()) for t in o["total"]]
        print(f"ours:{name} seq_len:{hc.eval_seq_len} batch_docs:{hc.lora_batch_docs} chunk:{hc.lora_chunk_tokens} "
              f"warm_start_a:{int(hc.lora_warm_start_a)} prefix:{hc.phased_prefix_docs} phases:{hc.phased_num_phases} "
              f"orders:{args.orders} (min/median/max)")
        print(f"ours:{name} lora_ttt_work positions_per_target:{spread(o['positions_per_target'], '.2f')} ideal:{spread(o['ideal'], '.2f')} "
              f"rank_steps_max:{spread(o['rank_steps_max'], '.0f')}")
        print(f"ours:{name} lora_scoring:{spread(o['scoring'])}s mean_barrier_wait:{spread(o['mean_wait'])}s "
              f"per_row_share:{spread(o['row_share'], '.2f')} "
              f"global_sgd:{spread(o['sgd'])}s sgd_chunks:{spread(o['sgd_chunks'], '.0f')} sgd_tokens:{spread(o['sgd_tokens'], '.0f')} "
              f"sgd_chunk:{o['sgd_chunk_s'][0]:.4f}s")
        print(f"ours:{name} quantized:{fx['quantized']:.1f}s warmup:{fx['warmup']:.1f}s load:{fx['load']:.1f}s ngram:{fx['ngram']:.1f}s "
              f"eval_budget:{spread(total)}s target:{EVAL_TARGET_SECONDS:.0f}s limit:{tg.EVAL_LIMIT_SECONDS:.0f}s")
        results.append((name, hc, o, fx, total))
    table(rec, args.calibrate, rows[0][1], results[0])
    if args.sweep:
        print("| LORA_WARM_START_A | PHASED_PREFIX_DOCS | positions/target | global SGD tokens (M) | mean barrier wait s "
              "| LoRA scoring s | global SGD s | eval_budget s |")
        print("|---|---|---|---|---|---|---|---|")
        for name, hc, o, fx, total in results[1:]:
            print(f"| {int(hc.lora_warm_start_a)} | {hc.phased_prefix_docs} | {spread(o['positions_per_target'], '.2f')} | "
                  f"{spread([t / 1e6 for t in o['sgd_tokens']], '.2f')} | {spread(o['mean_wait'])} | {spread(o['scoring'])} | "
                  f"{spread(o['sgd'])} | {spread(total)} |")
    return 0


def table(rec: Record, name: str, r: dict, ours) -> None:
    """Record (modelled vs logged) next to ours (min/median/max over the orders), as a markdown table."""
    _, hc, o, fx, total = ours
    pauses = sum(b - a for a, b in rec.pauses)
    print(f"| seconds | record {name} modelled | record {name} logged | ours (min/median/max) |")
    print("|---|---|---|---|")
    print(f"| LoRA scoring (with barrier waits) | {r['scoring']:.1f} | {r['logged_scoring']:.1f} | {spread(o['scoring'])} |")
    print(f"| global SGD | {pauses:.1f} (logged) | {pauses:.1f} | {spread(o['sgd'])} |")
    print(f"| quantized diagnostic | - | - | {fx['quantized']:.1f} |")
    print(f"| compile warmup (assumed) | - | outside its timer | {fx['warmup']:.1f} |")
    print(f"| artifact load (assumed) | - | outside its timer | {fx['load']:.1f} |")
    print(f"| n-gram hints (CPU-measured) | - | - | {fx['ngram']:.1f} |")
    print(f"| TTT timer | {r['timer']:.1f} | {rec.timer:.1f} | {spread(o['total'])} |")
    print(f"| eval_budget (target {EVAL_TARGET_SECONDS:.0f}) | - | - | {spread(total)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=0, help="validation targets (0: 40.5M on CUDA, 16k on CPU)")
    ap.add_argument("--world", type=int, default=8, help="emulate rank 0 of this many GPUs")
    ap.add_argument("--stages", nargs="+", default=["plain", "lora_ttt"], choices=list(STAGES))
    ap.add_argument("--doc-len", type=float, default=810.0, help="mean synthetic document length (tokens)")
    ap.add_argument("--project", action="store_true", help="project the LoRA stage and the eval budget to --world H100s (no timing)")
    ap.add_argument("--lengths", help="--project: validation document lengths, .npy (records' dl:) or a val shard .bin")
    ap.add_argument("--calibrate", default="04-19", choices=sorted(k for k, r in RECORDS.items() if r.pauses),
                    help="--project: record whose logged times fix the rate and the per-step cost")
    ap.add_argument("--calib-lengths", help="--project: lengths of the set the calibration record scored (default --lengths)")
    ap.add_argument("--check", nargs="*", default=[], metavar="RECORD=LENGTHS",
                    help=f"--project: also model these records on their sets' lengths ({', '.join(RECORDS)})")
    ap.add_argument("--orders", type=int, default=5, help="--project: random stream orders of the documents")
    ap.add_argument("--sweep", action="store_true", help="--project: also the EVAL_SEQ_LEN=2560 one-phase sweep")
    args = ap.parse_args(argv)
    if args.project:
        try:
            if args.orders < 1 or args.world < 1:
                raise tg.ConfigError(f"--orders {args.orders} and --world {args.world} must be >= 1")
            if any("=" not in c for c in args.check):
                raise tg.ConfigError(f"--check takes RECORD=LENGTHS pairs, got {args.check}")
            return project(tg.Hyperparameters.from_env(), args)
        except tg.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
    print(f"eval_total:{total:.1f}s limit:{tg.EVAL_LIMIT_SECONDS:.0f}s (plain is a diagnostic; the last stage is the score)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
