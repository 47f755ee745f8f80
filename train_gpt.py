"""Parameter Golf: train the best LM whose code + compressed weights fit in 16,000,000 bytes.

Trains in <=600 s on 8xH100 and scores val_bpb (bits per byte) on the fixed FineWeb validation set.
Model: 11-layer tied-embedding GPT (d=512, GQA 8/4, MLP 4x LeakyReLU(0.5)^2, SP8192 CaseOps) with depth
recurrence of layers 3..5, gated U-net skips, a two-lane parallel-residual decoder, attention within
documents, SmearGate, gated head outputs; Muon (Polar Express) + AdamW. 1.0611's config, #2135's values.

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # record config, 8 GPUs
    PRESET=smoke DATA_PATH=... TOKENIZER_PATH=... python train_gpt.py   # tiny CPU run

Every knob is an env var named after its Hyperparameters field in upper case. The ones people touch:
SEED, RUN_ID, DATA_DIR, CASEOPS, MAX_WALLCLOCK_SECONDS, ITERATIONS, NUM_LAYERS, MODEL_DIM, MATRIX_LR,
LOOP_START/LOOP_END/NUM_LOOPS, PARALLEL_RESIDUAL_START, COMPILE. The log (logs/<RUN_ID>.txt) ends
with `final_<stage> val_loss:... val_bpb:...` lines.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import glob
import hashlib
import heapq
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_fa3_error = ""  # why FA3 is unusable: a wheel built for another torch raises inside the import
try:  # FlashAttention 3 (Hopper); PyTorch SDPA is the fallback everywhere else
    from flash_attn_interface import flash_attn_func as _fa3_func, flash_attn_varlen_func as _fa3_varlen
except (ImportError, OSError) as e:
    _fa3_func = _fa3_varlen = None
    _fa3_error = f"{type(e).__name__}: {' '.join(str(e).split())}"

# ------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------
# Defaults are the training config of the 1.0611 record (#1855): the 04-09 stack, the two-lane parallel
# decoder (#1530), document-masked attention, SmearGate, the sparse attention gate, Polar Express, with the
# values #2135 changed (data, LR, LQER, GPTQ calibration, eval length; docs/model.md lists where we differ).
# Each field is read from the env var of the same name in upper case; nothing else reads os.environ
# except setup_distributed().


class ConfigError(ValueError):
    """A user-facing mistake (env var, data, tokenizer): printed as one line, exit status 2."""


class TrainingError(RuntimeError):
    """The run itself failed (e.g. the loss diverged): printed as one line, exit status 3."""


@dataclass(frozen=True)
class Hyperparameters:
    # --- run & paths ---
    preset: str = ""  # "" (record config) or "smoke" (tiny CPU config); applied before env overrides
    run_id: str = ""  # "" -> generated
    seed: int = 1337  # init seed and training-data order
    data_dir: str = "./data"  # root holding datasets/ and tokenizers/
    caseops: bool = True  # default paths: 1 the CaseOps export (byte sidecar), as #2135; 0 the plain fineweb10B_sp{vocab_size}
    data_path: str = ""  # "" -> {data_dir}/datasets/fineweb10B_sp{vocab_size}[_lossless_caps_caseops_v1_reserved]
    tokenizer_path: str = ""  # "" -> {data_dir}/tokenizers/fineweb_{vocab_size}_bpe[_lossless_caps_caseops_v1_reserved].model
    log_dir: str = "logs"  # logs/<run_id>.txt
    compile: bool = True  # torch.compile on CUDA; CPU never compiles
    sdpa_fallback: bool = False  # CUDA, DOC_MASK=1, no FA3: 1 runs masked SDPA (math kernel: slow, T^2 memory); 0 stops
    # --- model ---
    vocab_size: int = 8192  # must equal the tokenizer's piece count
    num_layers: int = 11  # physical blocks
    model_dim: int = 512  # residual width d
    embedding_dim: int = 0  # 0 -> model_dim; smaller adds embed_proj / head_proj
    num_heads: int = 8  # query heads (head_dim = model_dim / num_heads)
    num_kv_heads: int = 4  # GQA key/value heads
    mlp_mult: int = 4  # MLP hidden = mlp_mult * model_dim
    rope_dims: int = 16  # partial RoPE: rotated dims per head
    rope_base: float = 10000.0  # RoPE frequency base
    qk_gain_init: float = 5.0  # two-lane run; 04-09 used 5.25
    xsa_last_n: int = 11  # exclusive self-attention on the last n physical layers
    logit_softcap: float = 30.0  # logits = c * tanh(z / c)
    fused_ce: bool = True  # training loss: softcapped CE as one op on the raw logits (Triton on CUDA), no capped copy kept
    doc_mask: bool = True  # attention only within documents (cut at every BOS); 0: plain causal over the row
    smear_gate: bool = True  # SmearGate: e_t += lam*sigmoid(w.e_t[:GATE_WINDOW])*e_{t-1}, never into a BOS
    attn_gate: str = "sparse"  # gate on each head's output: sparse (first GATE_WINDOW dims) | dense (all) | none
    sparse_attn_gate_scale: float = 0.5  # sparse gate: sigmoid(scale * W u[:GATE_WINDOW]); record value
    gate_window: int = 12  # leading input dims read by SmearGate and the sparse attention gate
    ln_scale: bool = True  # scale normed sublayer inputs by 1/sqrt(layer+1)
    skip_gates_enabled: bool = True  # sigmoid gates on the U-net skips
    tied_embed_init_std: float = 0.005  # init std of the tied embedding
    loop_start: int = 3  # depth recurrence: layers loop_start..loop_end run 1+num_loops times
    loop_end: int = 5  # last looped layer (inclusive)
    num_loops: int = 2  # 0 disables recurrence
    enable_looping_at: float = 0.35  # fraction of the training clock at which recurrence switches on
    parallel_residual_start: int = 8  # first physical layer of the two-lane decoder; <0 or >=num_layers: off
    asym_softcap: bool = False  # trained caps softcap_pos (z>=0) / softcap_neg (z<0), init LOGIT_SOFTCAP (#1923 form)
    # --- studies: embedding & head ---
    resid_mix_enabled: bool = True  # 0 drops the x0 pathway (resid_mix) from every block
    num_extra_embeds: int = 0  # k extra RMS-normed token tables, mixed into every block input by resid_mix
    embed_rotation_rank: int = 0  # r>0: x -> x + B(A x) after the embedding and before the head, B = 0 at init
    head_kind: str = "tied"  # tied | factorized (d->r->vocab) | mos (mixture of softmaxes) | simplex
    head_rank: int = 128  # bottleneck r of the factorized, mos and simplex heads
    head_experts: int = 2  # mixture components of the mos head
    embed_bits_tiers: str = ""  # per-row embedding bits by row rank, e.g. 1024:8,rest:5 (ROWS:BITS[:CLIP])
    embed_tier_rank: str = "freq"  # row ranking of the tiers: freq (token count) | damage (count x grad norm)
    embed_sparsity: float = 0.0  # f>0: keep the top (1-f) magnitudes per embedding row, stored as bitmap + fp16
    # --- optimizer ---
    matrix_lr: float = 0.028  # Muon LR for block matrices (#2135; #1855 used 0.026, 04-09 0.022)
    tied_embed_lr: float = 0.03  # AdamW LR for the tied embedding
    scalar_lr: float = 0.02  # AdamW LR for control tensors (scales, gains, mixes, gates, lanes)
    muon_momentum: float = 0.97  # two-lane run; 04-09 used 0.99
    muon_momentum_warmup_start: float = 0.92  # momentum at step 0, linear to MUON_MOMENTUM
    muon_momentum_warmup_steps: int = 1500  # steps of the momentum warmup
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    polar_express: bool = True  # per-iteration Polar Express coefficients (at most 5 steps); 0: classic quintic
    muon_wd: float = 0.095  # decoupled weight decay of Muon matrices
    embed_wd: float = 0.085  # AdamW weight decay of the embedding
    adam_wd: float = 0.02  # AdamW weight decay of control tensors
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2 (#1855; 04-09 used 0.95)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip_norm: float = 0.3  # 0 disables
    ema_decay: float = 0.9965  # 04-09 and #1855; the two-lane run used 0.997
    warmdown_frac: float = 0.85  # final fraction of training with linearly decaying LR (#1855; 04-09: 0.72)
    min_lr: float = 0.10  # floor of the LR multiplier during warmdown (#1855; 04-09: 0)
    # --- training ---
    train_batch_tokens: int = 786_432  # global tokens per optimizer step
    train_seq_len: int = 2048  # tokens per training sequence
    iterations: int = 20_000  # ceiling; record runs stop on the wallclock
    max_wallclock_seconds: float = 600.0  # 0 -> no cap, schedules run on steps
    gptq_reserve_seconds: float = 8.0  # carved out of the cap for the GPTQ Hessian pass (32 batches: 6.9 s in #2135)
    warmup_steps: int = 20  # compile warmup steps per loop mode; state is restored afterwards
    train_log_every: int = 100  # steps between train-loss log lines
    val_loss_every: int = 4000  # 0: only the final eval
    train_seq_schedule: str = ""  # LEN@FRAC,...: length by fraction of the training clock, e.g. 1024@0.1,2048@0.7,3072@1 (#2014)
    seq_change_warmup_steps: int = 32  # TRAIN_SEQ_SCHEDULE: LR x min(1, (step-s+1)/n) after a switch at step s (#2014)
    # --- quantization & artifact ---
    gptq_enabled: bool = True  # 0: round-to-nearest with the same SDClip scales (ablation)
    gptq_calibration_batches: int = 32  # training micro-batches per rank for the GPTQ Hessians (#2135; #1855: 16, 04-09: 64)
    matrix_bits: int = 6  # block matrices and embed/head projections
    matrix_clip_sigmas: float = 12.85  # SDClip k (step = k*std(row)/R) of matrices without a group k below
    embed_bits: int = 7  # tied embedding (PR #1855; int8 measured ~268 KB larger at full size, over the limit)
    embed_clip_sigmas: float = 14.0  # SDClip k of the embedding (PR #1855; 20.0 with EMBED_BITS=8 before)
    mlp_clip_sigmas: float = 11.5  # SDClip k of MLP matrices (PR #1855, unchanged in #2135); 0 -> MATRIX_CLIP_SIGMAS
    attn_clip_sigmas: float = 13.0  # SDClip k of attention matrices (PR #1855, unchanged in #2135); 0 -> MATRIX_CLIP_SIGMAS
    quant_gate: bool = True  # attention-output gate weights as int8 rows (PR #1855), not fp16
    lqer_top_n: int = 3  # LQER: rank-r correction of the n tensors with the largest GPTQ error (#1855, #2135)
    lqer_rank: int = 4  # LQER: rank r of the error's truncated SVD
    lqer_a_bits: int = 2  # LQER: bits of factor A (one scale per tensor)
    lqer_b_bits: int = 4  # LQER: bits of factor B (one scale per LQER_GROUP values)
    lqer_group: int = 32  # LQER: group size of B's scales (#2135; #1855: 64)
    awq_lite: bool = False  # keep the most salient 64-column group of all GPTQ matrices at int8 (#1908, in #1945-#2014)
    compressor: str = "brotli"  # brotli (one byte-shuffled stream) | pergroup (streams by role, smallest codec each)
    row_reorder: bool = False  # pergroup: reorder the rows of each code matrix by a greedy L1 chain (stored permutation)
    fit_artifact: bool = True  # over the size limit: re-quantize the block matrices with a larger SDClip k until it fits
    fit_margin: int = 0  # bytes kept under the limit by FIT_ARTIFACT (the count is exact; room for later code edits)
    artifact_path: str = ""  # "" -> {log_dir}/{run_id}.ptz
    eval_artifact: str = ""  # path: skip training, load this artifact and run every eval stage
    awq_top_k: int = 1  # AWQ_LITE: the k most salient 64-column groups over all GPTQ matrices (#1908: 1)
    # --- evaluation ---
    eval_seq_len: int = 2560  # tokens per eval window (also sets the val truncation; #1953, #2135)
    val_batch_tokens: int = 524_288  # global tokens per eval batch (524288/8/2560 -> 25 windows per rank)
    sliding_window_enabled: bool = False  # stage final_sliding: overlapping windows, stride EVAL_STRIDE
    eval_stride: int = 64  # sliding/TTT: later windows score only their last EVAL_STRIDE targets
    ttt_enabled: bool = False  # stage final_ttt: score-first full-model SGD TTT (04-09; the score before LoRA TTT)
    ttt_chunk_tokens: int = 40_960  # TTT and phased SGD chunk; multiple of EVAL_SEQ_LEN (16 x 2560: 2 per rank)
    ttt_epochs: int = 3  # TTT: passes over each scored chunk
    ttt_lr: float = 0.005  # TTT: SGD LR, cosine over chunks
    ttt_momentum: float = 0.9  # TTT: SGD momentum
    ttt_grad_clip: float = 1.0  # TTT: global grad-norm clip; 0 disables
    ttt_batch_seqs: int = 32  # TTT: global sequences per SGD step, split across ranks
    ttt_freeze_blocks: int = 0  # TTT: the first n physical blocks stay fixed
    ttt_hash_embed: bool = False  # TTT: add a zero-init bigram hash embedding trained only during TTT
    ttt_hash_buckets: int = 16_384  # TTT: buckets of the bigram hash embedding
    eval_nll_dir: str = ""  # dir: each stage writes <stage>.npy (float32 NLL per target) + bytes.npy
    # --- document-masked eval and per-document LoRA TTT (record #1855; off: not yet measured in budget) ---
    doc_eval_enabled: bool = False  # stages final_doc_quantized/final_doc_sliding: windows never cross a BOS
    lora_ttt_enabled: bool = True  # stage final_lora_ttt: per-document LoRA TTT + phased global SGD (the score)
    lora_rank: int = 80  # LoRA rank r (#1855; 04-10 used 96)
    lora_alpha: float = 144.0  # LoRA output scale alpha/r (#1855)
    lora_targets: str = "q,v,o,mlp,head"  # comma list of q,k,v,o,mlp,head; #2135 drops k (#1855: all six)
    lora_lr: float = 8e-5  # AdamW LR of the adapters (#2135; #1855: 1e-4)
    lora_beta1: float = 0.0  # AdamW beta1 (#1855)
    lora_beta2: float = 0.99  # AdamW beta2 (#1855)
    lora_eps: float = 1e-10  # AdamW epsilon (#1855)
    lora_wd: float = 2.0  # AdamW decoupled weight decay (#2135; #1855: 0.5)
    lora_chunk_tokens: int = 48  # targets scored per chunk, then one adapter step on them (#1855)
    lora_short_chunks: str = ""  # "256:8,2000:24": smaller chunks while a chunk starts below each offset (#2014's sizes)
    lora_batch_docs: int = 64  # documents in flight per rank
    lora_max_lanes: int = 16  # a step whose windows pack into more EVAL_SEQ_LEN lanes runs as several forwards (memory)
    lora_warm_start_a: bool = True  # A carries over to the next document of its row; B always restarts at 0
    phased_prefix_docs: int = 2500  # global SGD on the first N documents, paused at 1/P..P/P of them (#1855)
    phased_num_phases: int = 1  # P; 0 disables the global SGD phases (#2135: 1; #1855: 3)
    phased_lr: float = 1e-3  # global SGD LR, cosine over the chunks of each phase (#1855)
    phased_momentum: float = 0.9  # global SGD momentum (#1855)
    phased_grad_clip: float = 1.0  # global SGD grad-norm clip; 0 disables
    # --- token-only causal n-gram tilt (#2130/#2135; scoring only, never a training loss) ---
    ngram_tilt: bool = True  # score hinted targets under the model's distribution tilted toward the hint (#2135)
    ngram_order: int = 16  # the hint's context: the NGRAM_ORDER-1 stream tokens up to the target's input
    ngram_threshold: float = 0.8  # hint = top next token of the context when its share of earlier targets >= this
    ngram_beta: float = 2.625  # tilt p'(a) ~ p(a) e^{beta [a = hint]}

    @property
    def model_dim_embed(self) -> int:
        return self.embedding_dim or self.model_dim

    @property
    def dataset_dir(self) -> str:
        return self.data_path or os.path.join(self.data_dir, "datasets", f"fineweb10B_sp{self.vocab_size}{CASEOPS_SUFFIX * self.caseops}")

    @property
    def tokenizer_file(self) -> str:
        return self.tokenizer_path or os.path.join(self.data_dir, "tokenizers", f"fineweb_{self.vocab_size}_bpe{CASEOPS_SUFFIX * self.caseops}.model")

    @property
    def artifact_file(self) -> str:
        return self.artifact_path or os.path.join(self.log_dir, f"{self.run_id}.ptz")

    @property
    def train_budget_seconds(self) -> float:
        """Training clock budget: the cap minus the GPTQ reserve (0 when uncapped)."""
        return max(self.max_wallclock_seconds - self.gptq_reserve_seconds, 0.0) if self.max_wallclock_seconds > 0 else 0.0

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def looping_enabled(self) -> bool:
        return self.num_loops > 0

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        """Preset first, then env overrides. Malformed values and near-miss names raise ConfigError."""
        env = os.environ if env is None else env
        names = {f.name.upper(): f for f in fields(cls)}
        check_unknown_env(env, names)
        kv = dict(PINNED or {})  # a shipped file starts from its packed config
        preset = env.get("PRESET", "")
        if preset:
            if preset not in PRESETS:
                raise ConfigError(f"PRESET={preset!r} is unknown; use one of {sorted(PRESETS)}")
            kv.update(PRESETS[preset])
        for key, f in names.items():
            if key in env:
                kv[f.name] = parse_env_value(key, env[key], f.type)
        h = cls(**kv)
        h.validate()
        return h

    def validate(self) -> None:
        if PINNED is None:
            return check_config(self)
        for f in fields(self):  # a packed file: its config was checked when it was packed (check_config)
            v, want = getattr(self, f.name), PINNED.get(f.name, f.default)
            if f.name not in FREE_KNOBS and v != want:
                raise ConfigError(f"{f.name.upper()}={env_value(v)}: this train_gpt.py was packed for {f.name.upper()}="
                                  f"{env_value(want)}; run the readable source for other values")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"SEED={self.seed} must lie in [0,4294967295]")


def check_config(h: Hyperparameters) -> None:
    """Every knob's range and the knobs' consistency; a ConfigError names the first violation."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)
    for f in fields(h):  # a NaN passes every comparison below, so it is refused first
        v = getattr(h, f.name)
        need(not isinstance(v, float) or math.isfinite(v), f"{f.name.upper()}={v} must be a finite number")
    for interval, names in VALUE_RANGES.items():
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        for name in names.split():
            v = getattr(h, name)
            need((lo <= v if interval[0] == "[" else lo < v) and (v <= hi if interval[-1] == "]" else v < hi),
                 f"{name.upper()}={v} must lie in {interval}")
    need(h.model_dim % h.num_heads == 0, f"MODEL_DIM={h.model_dim} must be divisible by NUM_HEADS={h.num_heads}")
    need(h.num_heads % h.num_kv_heads == 0, f"NUM_HEADS={h.num_heads} must be divisible by NUM_KV_HEADS={h.num_kv_heads}")
    hd = h.model_dim // h.num_heads
    need(h.rope_dims % 2 == 0 and 0 <= h.rope_dims <= hd, f"ROPE_DIMS={h.rope_dims} must be even and <= head_dim {hd}")
    need(0 < h.model_dim_embed <= h.model_dim, f"EMBEDDING_DIM={h.embedding_dim} must be in [0, MODEL_DIM={h.model_dim}]")
    if h.looping_enabled:
        need(0 <= h.loop_start <= h.loop_end < h.num_layers,
             f"LOOP_START={h.loop_start}/LOOP_END={h.loop_end} must satisfy 0 <= start <= end < NUM_LAYERS={h.num_layers}")
    need(h.train_seq_len > 0 and h.train_batch_tokens % (8 * h.train_seq_len) == 0,
         f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} must be a multiple of 8*TRAIN_SEQ_LEN={8 * h.train_seq_len}")
    need(h.eval_seq_len > 0 and h.val_batch_tokens >= h.eval_seq_len,
         f"VAL_BATCH_TOKENS={h.val_batch_tokens} must be >= EVAL_SEQ_LEN={h.eval_seq_len}")
    need(h.max_wallclock_seconds <= 0 or h.max_wallclock_seconds > h.gptq_reserve_seconds,
         f"MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds} must exceed GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds} (or be 0 for no cap)")
    need(0 <= h.warmdown_frac <= 1 and 0 <= h.min_lr <= 1, "WARMDOWN_FRAC and MIN_LR must lie in [0, 1]")
    need(2 <= h.matrix_bits <= 8 and 2 <= h.embed_bits <= 8,
         f"MATRIX_BITS={h.matrix_bits} and EMBED_BITS={h.embed_bits} must lie in [2, 8]")
    need(0 < h.eval_stride <= h.eval_seq_len, f"EVAL_STRIDE={h.eval_stride} must lie in [1, EVAL_SEQ_LEN={h.eval_seq_len}]")
    need(h.ttt_chunk_tokens > 0 and h.ttt_chunk_tokens % h.eval_seq_len == 0,
         f"TTT_CHUNK_TOKENS={h.ttt_chunk_tokens} must be a positive multiple of EVAL_SEQ_LEN={h.eval_seq_len}")
    need(h.ttt_epochs >= 0 and h.ttt_batch_seqs > 0 and h.ttt_hash_buckets > 0,
         "TTT_EPOCHS must be >= 0, TTT_BATCH_SEQS and TTT_HASH_BUCKETS > 0")
    need(0 <= h.ttt_freeze_blocks <= h.num_layers, f"TTT_FREEZE_BLOCKS={h.ttt_freeze_blocks} must lie in [0, NUM_LAYERS={h.num_layers}]")
    need(h.lora_rank > 0 and 0 < h.lora_chunk_tokens <= h.eval_seq_len and h.lora_batch_docs > 0,
         f"LORA_RANK and LORA_BATCH_DOCS must be positive and LORA_CHUNK_TOKENS in [1, EVAL_SEQ_LEN={h.eval_seq_len}]")
    bad = set(h.lora_target_list) - set(LORA_TARGETS)
    need(not bad and h.lora_target_list, f"LORA_TARGETS={h.lora_targets!r} must be a comma list of {','.join(LORA_TARGETS)}")
    need(not h.lora_ttt_enabled or "head" not in h.lora_target_list or h.head_kind not in HEAD_KINDS
         or (h.head_kind == "tied" and h.embedding_dim in (0, h.model_dim)),
         "LORA_TARGETS=...head needs HEAD_KIND=tied and EMBEDDING_DIM=0; drop head from the list")
    need(h.phased_num_phases >= 0 and h.phased_prefix_docs >= 0, "PHASED_NUM_PHASES and PHASED_PREFIX_DOCS must be >= 0")
    try:
        sc = short_chunks(h.lora_short_chunks)
    except ValueError:
        sc = [(0, 0)]
    need(all(len(p) == 2 and 0 < p[1] <= h.lora_chunk_tokens for p in sc) and [p[0] for p in sc] == sorted({p[0] for p in sc})
         and all(p[0] > 0 for p in sc), f"LORA_SHORT_CHUNKS={h.lora_short_chunks!r} must be rising offset:size pairs, "
         f"sizes in [1, LORA_CHUNK_TOKENS={h.lora_chunk_tokens}], e.g. 256:8,2000:24")
    need(h.vocab_size <= 65536, f"VOCAB_SIZE={h.vocab_size} does not fit the uint16 shard format")
    need(h.attn_gate in ("none", "sparse", "dense"), f"ATTN_GATE={h.attn_gate!r} must be none, sparse or dense")
    need(0 < h.gate_window <= h.model_dim_embed, f"GATE_WINDOW={h.gate_window} must lie in [1, {h.model_dim_embed}]")
    need(not h.polar_express or 0 < h.muon_backend_steps <= len(POLAR_EXPRESS),
         f"POLAR_EXPRESS=1 has coefficients for 1..{len(POLAR_EXPRESS)} steps, MUON_BACKEND_STEPS={h.muon_backend_steps}; set POLAR_EXPRESS=0")
    need(h.head_kind in HEAD_KINDS, f"HEAD_KIND={h.head_kind!r} must be one of {'|'.join(HEAD_KINDS)}")
    need(min(h.head_rank, h.head_experts) > 0, "HEAD_RANK and HEAD_EXPERTS must be positive")
    need(0 <= h.embed_rotation_rank <= h.model_dim, f"EMBED_ROTATION_RANK={h.embed_rotation_rank} must lie in [0, MODEL_DIM]")
    need(h.num_extra_embeds >= 0 and (h.resid_mix_enabled or not h.num_extra_embeds),
         f"NUM_EXTRA_EMBEDS={h.num_extra_embeds} must be >= 0 and needs RESID_MIX_ENABLED=1")
    need(0 <= h.embed_sparsity < 1 and round((1 - h.embed_sparsity) * h.model_dim_embed) >= 1,
         f"EMBED_SPARSITY={h.embed_sparsity} must lie in [0, 1) and keep a value per row")
    need(min(h.mlp_clip_sigmas, h.attn_clip_sigmas) >= 0 and min(h.matrix_clip_sigmas, h.embed_clip_sigmas) > 0,
         "*_CLIP_SIGMAS must be > 0 (MLP_/ATTN_CLIP_SIGMAS: 0 means MATRIX_CLIP_SIGMAS)")
    need(h.lqer_top_n >= 0 and h.lqer_rank > 0 and h.lqer_group > 0 and 2 <= min(h.lqer_a_bits, h.lqer_b_bits)
         and max(h.lqer_a_bits, h.lqer_b_bits) <= 8, "LQER_TOP_N must be >= 0, LQER_RANK/LQER_GROUP > 0, LQER_*_BITS in [2, 8]")
    need(h.compressor in ("brotli", "pergroup"), f"COMPRESSOR={h.compressor!r} must be brotli or pergroup")
    need(h.embed_tier_rank in ("freq", "damage"), f"EMBED_TIER_RANK={h.embed_tier_rank!r} must be freq or damage")
    check_seq_schedule(h)
    if h.embed_bits_tiers:  # rows are ranked in the GPTQ calibration pass
        need(h.gptq_enabled and not h.embed_sparsity, "EMBED_BITS_TIERS needs GPTQ_ENABLED=1 and EMBED_SPARSITY=0")
        parse_tiers(h.embed_bits_tiers, h.vocab_size, h.embed_clip_sigmas)


def check_seq_schedule(h: Hyperparameters) -> None:
    """TRAIN_SEQ_SCHEDULE: LEN@FRAC stages, fractions rising to 1, each length a divisor of a rank's
    micro-step tokens, the longest TRAIN_SEQ_LEN."""
    if not h.train_seq_schedule:
        return
    fix = "use LEN@FRAC,... with fractions rising to 1, e.g. 1024@0.1,2048@0.7,3072@1"
    try:
        stages = parse_seq_schedule(h)
    except ValueError:
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE={h.train_seq_schedule!r} is malformed; {fix}") from None
    ends = [f for _, f in stages]
    if not (0 < ends[0] and all(a < b for a, b in zip(ends, ends[1:])) and ends[-1] == 1):
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE={h.train_seq_schedule!r}: fractions must rise in (0, 1] and end at 1; {fix}")
    for n, _ in stages:
        if n <= 0 or h.train_batch_tokens % (8 * n):
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE length {n} must divide the tokens of a rank's micro-step, "
                              f"TRAIN_BATCH_TOKENS/8={h.train_batch_tokens // 8}; pick a divisor")
    if max(n for n, _ in stages) != h.train_seq_len:
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE's longest length {max(n for n, _ in stages)} must equal TRAIN_SEQ_LEN="
                          f"{h.train_seq_len} (the loader's windows, the rotary tables); set TRAIN_SEQ_LEN to it")


# Allowed values, interval -> fields: checked at parse time, not found as a NaN at the end.
VALUE_RANGES = {
    "[0,4294967295]": "seed",  # numpy seeds are unsigned 32-bit
    "[0,inf)": "iterations warmup_steps val_loss_every seq_change_warmup_steps muon_momentum_warmup_steps muon_backend_steps xsa_last_n "
               "embedding_dim ttt_epochs ttt_freeze_blocks matrix_lr tied_embed_lr scalar_lr ttt_lr muon_wd embed_wd "
               "adam_wd grad_clip_norm ttt_grad_clip max_wallclock_seconds gptq_reserve_seconds tied_embed_init_std "
               "lora_lr lora_wd phased_lr phased_grad_clip ngram_beta fit_margin",
    "[1,inf)": "lora_max_lanes vocab_size num_layers model_dim num_heads num_kv_heads mlp_mult train_batch_tokens train_seq_len "
               "eval_seq_len val_batch_tokens train_log_every gptq_calibration_batches awq_top_k",
    "(0,inf)": "adam_eps logit_softcap rope_base matrix_clip_sigmas embed_clip_sigmas lora_eps lora_alpha",
    "[0,1)": "ema_decay muon_momentum muon_momentum_warmup_start beta1 beta2 ttt_momentum lora_beta1 lora_beta2 "
             "phased_momentum",
    "[0,1]": "enable_looping_at warmdown_frac min_lr ngram_threshold",
    "[2,inf)": "ngram_order",
}

# Tiny config for CPU smoke runs and tests: every feature of the record config, at toy scale.
PRESETS = {
    "smoke": dict(
        vocab_size=1024, num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8,
        xsa_last_n=6, loop_start=2, loop_end=3, num_loops=1, parallel_residual_start=4,
        train_batch_tokens=8 * 512, train_seq_len=256, eval_seq_len=256, val_batch_tokens=16 * 256,
        iterations=150, max_wallclock_seconds=0.0, gptq_reserve_seconds=0.0, warmup_steps=1, gptq_calibration_batches=8,
        muon_momentum_warmup_steps=50, train_log_every=25, val_loss_every=0, matrix_lr=0.03,
        tied_embed_lr=0.05, ema_decay=0.95, eval_stride=128, ttt_chunk_tokens=8192, ttt_epochs=1,
        lora_rank=8, lora_alpha=14.4, lora_batch_docs=8, phased_prefix_docs=24, caseops=False,
    ),
}

# Env vars that belong to the launcher, not to us; never flagged as near-misses.
_FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
# Generic prefixes shared with other software; only close misspellings of these are flagged.
_GENERIC_PREFIXES = {"MAX", "MIN", "NUM", "RUN", "LOG", "DATA", "TRAIN", "ENABLE", "MODEL", "EVAL", "VAL"}
# Words of knob names that system variables use too (LD_LIBRARY_PATH, OMP_NUM_THREADS): sharing only
# these is no sign of a misnamed knob. Variables of the software around a run are never flagged.
_COMMON_WORDS = set("A B N AT ID PATH DIR RUN LOG MAX MIN NUM SIZE RANK GROUP START END LAST TOP BASE PREFIX EXTRA INIT "
                    "EVERY KIND BACKEND ENABLE ENABLED COMPILE SECONDS".split())
_OTHER_SOFTWARE = tuple(w + "_" for w in "CUDA CUDNN CUBLAS NCCL NVIDIA NV OMP KMP MKL GOMP OPENBLAS TRITON LD LC XDG SSH "
                        "MASTER ROLE SLURM OMPI PMI PMIX HF WANDB CONDA PIP GIT".split()) + ("TORCH", "PYTORCH", "PYTHON")
# Names the challenge's baseline and record scripts read (their logs' hyperparameter dumps) that this
# script does not: refused, pointing at our knob ("" = no equivalent). Our own fields always win.
RECORD_ENV = {
    "WARMDOWN_ITERS": "WARMDOWN_FRAC (a fraction of the training clock)", "VAL_BATCH_SIZE": "VAL_BATCH_TOKENS",
    "TIE_EMBEDDINGS": "HEAD_KIND (tied unless set)", "EMBED_LR": "TIED_EMBED_LR", "HEAD_LR": "TIED_EMBED_LR",
    "PARALLEL_START_LAYER": "PARALLEL_RESIDUAL_START", "EVAL_ONLY_PATH": "EVAL_ARTIFACT", "EVAL_ONLY_QUANTIZED_PATH": "EVAL_ARTIFACT",
    "ARTIFACT_DIR": "ARTIFACT_PATH", "FORCE_STOP_STEP": "ITERATIONS", "ASYM_LOGIT_RESCALE": "ASYM_SOFTCAP (caps trained here)",
    "AWQ_LITE_GROUP_TOP_K": "AWQ_TOP_K", "COMPILE_SHAPE_WARMUP": "WARMUP_STEPS (the warmup compiles every schedule shape)",
    "CASEOPS_ENABLED": "CASEOPS", **dict.fromkeys("PARALLEL_FINAL_LANE ROPE_YARN VAL_DOC_FRACTION".split(), ""),
}
RECORD_ENV_PREFIXES = {"TTT_LORA_": "LORA_TTT_ENABLED=1 and the LORA_* knobs", "GLOBAL_TTT_": "the PHASED_* knobs",
                       "PHASED_TTT_": "the PHASED_* knobs", "SMEAR_GATE_": "SMEAR_GATE and GATE_WINDOW",
                       "GATED_ATTN_": "ATTN_GATE=dense", "ATTN_OUT_GATE_": "ATTN_GATE", "GATE_": "ATTN_GATE and GATE_WINDOW",
                       "ETLB_": "", "LQER_": "LQER_TOP_N and the other LQER_* knobs"}


def parse_env_value(key: str, raw: str, typ) -> object:
    """Cast an env string by the field's annotation; bools accept only 0/1/true/false."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ)
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low not in ("0", "1", "true", "false"):
                raise ValueError
            return low in ("1", "true")
        return typ(raw.strip()) if typ is not str else raw
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {typ.__name__}; fix or unset it") from None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: one typo (NUM_LAYER for NUM_LAYERS) is distance 1."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def check_unknown_env(env, known: dict) -> None:
    """Raise on env vars of other record scripts and on ones that look like our knobs but are not: one
    edit away (NUM_LAYER), in a knob family (MUON_LR) or sharing a word with a knob (KV_HEADS)."""
    prefixes = {}
    for name in known:
        head = name.split("_")[0]
        prefixes[head] = prefixes.get(head, 0) + 1
    families = {p for p, n in prefixes.items() if n >= 2 and p not in _GENERIC_PREFIXES}
    words = {w for name in known for w in name.split("_")} - _COMMON_WORDS
    for key in env:
        if key in known or key in _FOREIGN_ENV:
            continue
        ours = RECORD_ENV.get(key, next((v for p, v in RECORD_ENV_PREFIXES.items() if key.startswith(p)), None))
        if ours is not None:
            raise ConfigError(f"{key} is a setting of other record scripts, not of this one; "
                              + (f"use {ours} instead" if ours else "there is no equivalent here, unset it"))
        close = [name for name in known if edit_distance(key, name) <= 1]
        parts = set(key.split("_"))
        if close or key.split("_")[0] in families or (parts & words and not key.lstrip("_").startswith(_OTHER_SOFTWARE)):
            near = sorted(known, key=lambda n: (-len(parts & set(n.split("_"))), edit_distance(key, n)))[:3]
            near = [n for n in near if parts & set(n.split("_"))] or near[:1]
            hint = f"; did you mean {close[0]}?" if close else f"; closest knobs: {', '.join(near)}"
            raise ConfigError(f"unknown setting {key}={env[key]!r}{hint} (unset it or use a known knob)")


# ------------------------------------------------------------------------------------------------
# Distributed & logging
# ------------------------------------------------------------------------------------------------
# One process without torchrun; under torchrun NCCL on CUDA and gloo on CPU. Rank 0 logs.


class Dist(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum(self) -> int:
        """8 / world size, so the global batch (and the result) does not depend on the GPU count."""
        return 8 // self.world_size


CUDA_CONTRACT = False  # tests set it to run the CUDA code paths on CPU: bf16 autocast, FA3 stand-ins, compile


def cuda_path(device: torch.device) -> bool:
    """Whether the GPU code paths (autocast, FA3, compile) run on this device."""
    return device.type == "cuda" or CUDA_CONTRACT


def launch_rank() -> int:
    """This process's torchrun rank (0 without torchrun); known before any setup, so errors print once."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed() -> Dist:
    rank = launch_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world != 0:
        raise ConfigError(f"WORLD_SIZE={world} must divide 8 (grad accumulation = 8 / world size)")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


def shutdown_distributed(d: Dist | None, timeout_s: float = 120.0) -> None:
    """Barrier, then destroy the process group: a rank that tears its group down while a peer still
    talks to it aborts that peer ("terminate called without an active exception"). Bounded, so a
    rank that failed alone still exits (torchrun then stops the others)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    ids = [d.local_rank] if d is not None and d.device.type == "cuda" else None
    try:
        t = timedelta(seconds=timeout_s)
        try:  # gloo times the barrier out itself, so no op is left pending to block destroy_process_group
            work = dist.barrier(device_ids=ids, async_op=True, timeout=t)
        except TypeError:  # torch without a per-call timeout
            work = dist.barrier(device_ids=ids, async_op=True)
        work.wait(t)  # NCCL drops the per-call timeout (a blocking barrier waits out the group's); this wait is bounded
        # A rank leaves the barrier once it has heard from every peer, maybe before a peer has heard
        # from it: each says it is out through the store, and none closes its sockets before all are.
        store = dist.distributed_c10d._get_default_store()
        store.set(f"shutdown/{dist.get_rank()}", "1")
        store.wait([f"shutdown/{r}" for r in range(dist.get_world_size())], timedelta(seconds=timeout_s))
    except Exception:  # a peer is gone or waits in another collective: tear down regardless
        pass
    dist.destroy_process_group()


def all_reduce(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def reduce_grads(params: list[Tensor], world_size: int, average: bool) -> None:
    """Sum (or average) gradients over ranks with one flat all-reduce."""
    if world_size == 1:
        return
    for p in params:  # a parameter without a gradient here still joins the reduction
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = all_reduce(torch.cat([g.flatten() for g in grads]))
    if average:
        flat /= world_size
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


class GradSync:
    """Sums gradients over ranks while backward runs, then averages them (sum / world size, as one flat
    all-reduce did). On the last micro-step each parameter's post-accumulate-grad hook marks it ready and
    the ready prefix of one fixed order (the same on every rank, so collectives pair up) is launched async:
    a Muon matrix reduced to the rank that owns it (only it reads the sum; elsewhere the buffer is left
    partial and never read), an Adam parameter all-reduced; the small ones go in one packed all-reduce."""

    def __init__(self, params: list[Tensor], owners: list[int], rank: int, world: int, small: int = 1 << 15):
        self.rank, self.world, self.armed, self.works = rank, world, False, []
        order = list(zip(params, owners))[::-1]  # backward reaches the last layers first
        self.big = [(p, o) for p, o in order if p.numel() > small or o >= 0]
        self.small = [p for p, o in order if p.numel() <= small and o < 0]
        self.ready, self.next = set(), 0
        self.mine = [p for p, o in order if o in (-1, rank)]  # full averaged gradients here after finish()
        idx = {id(p): i for i, (p, _) in enumerate(self.big)}
        for p, _ in self.big:
            p.register_post_accumulate_grad_hook(lambda p, i=idx[id(p)]: self._ready(i))

    def _ready(self, i: int) -> None:
        if self.armed:
            self.ready.add(i)
            while self.next in self.ready:
                self._launch(*self.big[self.next])

    def _launch(self, p: Tensor, owner: int) -> None:
        if p.grad is None:  # a parameter without a gradient here still joins the reduction
            p.grad = torch.zeros_like(p)
        self.works.append(dist.reduce(p.grad, owner, async_op=True) if owner >= 0 else dist.all_reduce(p.grad, async_op=True))
        self.next += 1

    def finish(self) -> None:
        while self.next < len(self.big):
            self._launch(*self.big[self.next])
        if self.small:  # ~32K elements in one packed all-reduce
            reduce_grads(self.small, self.world, average=False)
        for w in self.works:
            w.wait()
        torch._foreach_div_([p.grad for p in self.mine], float(self.world))
        self.armed, self.works, self.ready, self.next = False, [], set(), 0

    def clip_(self, max_norm: float) -> None:
        """clip_grad_norm_ over every gradient, each counted once: the Adam ones (the same on every rank) on
        rank 0, each Muon matrix on its owner, summed over ranks by a one-element all-reduce."""
        rep = [p.grad for p in self.small] + [p.grad for p, o in self.big if o < 0]
        own = [p.grad for p, o in self.big if o == self.rank]
        g = own + rep if self.rank == 0 else own
        total = all_reduce(torch.stack(torch._foreach_norm(g)).square().sum() if g else torch.zeros((), device=rep[0].device)).sqrt()
        torch._foreach_mul_([p.grad for p in self.mine], (max_norm / (total + 1e-6)).clamp(max=1.0))


class Logger:
    """Rank-0 logger: console plus logs/<run_id>.txt, locked while open (the lock dies with the process)."""

    def __init__(self, d: Dist, path: str | None):
        self.enabled = d.is_main
        self.path, self.file = path, None
        if self.enabled and path:
            import fcntl

            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                raise ConfigError(f"log {path} is being written by another process; stop it or choose another RUN_ID") from None

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
# Shards: 256 int32 header (magic, version, n) + n uint16 tokens. Every document is [BOS] + ids, so
# the batches below carry BOS=1 at each document start (x == BOS_ID gives document boundaries).

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
BOS_ID = 1


def read_shard(path: str) -> np.ndarray:
    """Memory-map one shard after checking magic, version and exact file size."""
    try:
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ConfigError(f"cannot read shard {path}: {e}") from None
    if header.size < HEADER_INTS:
        raise ConfigError(f"corrupt shard {path}: file shorter than the 1024-byte header; rebuild it")
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"corrupt shard {path}: magic/version {header[0]}/{header[1]}, "
                          f"expected {SHARD_MAGIC}/{SHARD_VERSION}; rebuild or re-download it")
    n = int(header[2])
    size = os.path.getsize(path)
    if size != HEADER_INTS * 4 + 2 * n:
        raise ConfigError(f"corrupt shard {path}: {size} bytes but header says {n} tokens "
                          f"({HEADER_INTS * 4 + 2 * n} bytes); rebuild or re-download it")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(n,))


def shard_paths(data_dir: str, split: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data directory {data_dir} does not exist; download it (data/download_fineweb.py; CASEOPS=0 "
                          f"reads the plain export), set DATA_PATH or DATA_DIR, or build shards with data/build_shards.py")
    paths = sorted(p for p in glob.glob(os.path.join(data_dir, f"fineweb_{split}_*.bin")) if "_bytes_" not in p)
    if not paths:
        raise ConfigError(f"no fineweb_{split}_*.bin shards in {data_dir}; build or download them first")
    return paths


# Published exports by folder name: (training shards, validation targets cut to a multiple of `cut`). The
# CaseOps export is romeerp/parameter-golf-caseops-v1, the data of #2135 (its log: train_shards:80
# val_tokens:47851520 at EVAL_SEQ_LEN 2560). A folder of that name with more shards (1499) or other
# validation tokens is the prep of #2127 that trained on 40,000 of the 50,000 validation documents.
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"
PUBLISHED = {f"fineweb10B_sp8192{CASEOPS_SUFFIX}": (80, 47_851_520, 2560)}


def data_kind(data_dir: str, train_shards: int, val_targets: int) -> tuple[str, str]:
    """(variant, "published" | "local") of a dataset folder. A published export, known by its name or by the
    manifest.json download_fineweb.py keeps in it, must hold at most its training shards and exactly its
    validation tokens (ConfigError otherwise); anything else was built locally and is not checked."""
    name = os.path.basename(os.path.normpath(data_dir))
    variant, want = name.removeprefix("fineweb10B_"), PUBLISHED.get(name)
    if want is None:
        try:
            meta = json.loads(Path(data_dir, "manifest.json").read_text(encoding="utf-8"))
            stats = next(d["stats"] for d in meta["datasets"] if d["name"] == name)
            want = int(stats["files_train"]), int(stats["tokens_val"]) - 1, 1
        except (OSError, ValueError, KeyError, TypeError, StopIteration):
            return variant, "local"
    shards, targets, cut = want
    if train_shards > shards or val_targets // cut * cut != targets:
        raise ConfigError(f"{data_dir} holds {train_shards} training shards and {val_targets // cut * cut} validation targets, "
                          f"the published export at most {shards} and {targets}: such a copy can train on validation "
                          f"documents (#2127); download it again (data/download_fineweb.py) or rename it if it is your own corpus")
    return variant, "published"


def load_val_tokens(data_dir: str, seq_len: int) -> Tensor:
    """All val shards in order, truncated to U+1 tokens with U a multiple of seq_len."""
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(data_dir, "val")])
    usable = (tokens.size - 1) // seq_len * seq_len
    if usable <= 0:
        raise ConfigError(f"validation split in {data_dir} has {tokens.size} tokens, fewer than EVAL_SEQ_LEN+1")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def load_val_bytes(data_dir: str, val_tokens: Tensor, luts, tokenizer_path: str = "") -> Tensor | None:
    """Bytes per target from the CaseOps sidecar fineweb_val_bytes_*.bin (one entry per val token,
    entry i+1 for target i), or None without one. Aligned, it agrees with the byte tables except at
    operators (0 for 3) and text changed by normalization; shifted, in about a quarter of entries.
    Given the tokenizer, its operators must count 0 bytes (a copy of the tables agrees everywhere)."""
    paths = sorted(glob.glob(os.path.join(data_dir, "fineweb_val_bytes_*.bin")))
    if not paths:
        return None
    val = shard_paths(data_dir, "val")
    parts = [read_shard(p) for p in paths]
    if [p.replace("_val_bytes_", "_val_") for p in paths] != val or any(len(b) != len(read_shard(v)) for b, v in zip(parts, val)):
        raise ConfigError(f"byte sidecar in {data_dir} does not match its val shards (one fineweb_val_bytes_k.bin with one "
                          f"entry per token of each fineweb_val_k.bin); re-export or re-download the dataset")
    b = torch.from_numpy(np.concatenate(parts)[1 : val_tokens.numel()].astype(np.int32))
    tb = target_bytes(val_tokens[:-1], val_tokens[1:], luts)
    agree = ((tb == b) | ((tb == 3) & (b == 0))).double().mean().item()
    if agree < 0.6:
        raise ConfigError(f"byte sidecar in {data_dir} is not aligned with its val shards ({agree:.1%} of entries agree "
                          f"with the byte tables); re-export or re-download the dataset")
    if tokenizer_path:  # an escaped literal operator counts 3 bytes; rare
        sp = load_tokenizer(tokenizer_path)
        at = torch.isin(val_tokens[1:], torch.tensor([sp.piece_to_id(c) for c in "\ue001\ue002\ue003\ue004"]))
        if at.any() and sp.piece_to_id("\ue001") != sp.unk_id() and (b[at] == 0).double().mean() < 0.5:
            raise ConfigError(f"byte sidecar in {data_dir} counts the CaseOps operators as text ({(b[at] != 0).double().mean():.0%} "
                              f"of operator tokens have bytes), so val_bpb would be wrong; re-export it with "
                              f"data/build_shards.py --caseops or re-download the dataset")
    return b


class TrainLoader:
    """Deterministic global stream of (seq_len+1)-token windows, reshuffled every epoch by SEED.

    The stream does not depend on the world size: global step s uses windows
    [s*G, (s+1)*G) with G sequences per step, and rank r takes its contiguous share of each
    micro-step, so ranks read disjoint windows and 1 or 8 GPUs see the same global batches.
    """

    def __init__(self, paths: list[str], seq_len: int, seed: int):
        self.shards = [read_shard(p) for p in paths]
        self.seq_len, self.seed = seq_len, seed
        counts = np.array([len(s) // (seq_len + 1) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise ConfigError(f"training shards hold fewer than TRAIN_SEQ_LEN+1={seq_len + 1} tokens")
        self.cum = np.concatenate([[0], np.cumsum(counts)])
        self.next_window = 0
        self._epoch, self._perm = -1, None

    @property
    def windows_per_epoch(self) -> int:
        return int(self.cum[-1])

    def _window(self, k: int) -> np.ndarray:
        epoch, idx = divmod(k, self.windows_per_epoch)
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.windows_per_epoch)
        w = int(self._perm[idx])
        s = int(np.searchsorted(self.cum, w, side="right") - 1)
        start = (w - int(self.cum[s])) * (self.seq_len + 1)
        return self.shards[s][start : start + self.seq_len + 1]

    def next_batch(self, n_global: int, rank: int, world: int, seq_len: int = 0) -> tuple[Tensor, Tensor]:
        """Next micro-step: n_global sequences across all ranks, this rank's share as (x, y).

        seq_len below the loader's T (TRAIN_SEQ_SCHEDULE): each window gives its leading T // seq_len rows of
        seq_len tokens, the rest of it is skipped; a rank reads whole windows, so the stream stays world-size
        independent (every (rank, micro-step) reads as many)."""
        per_rank = n_global // world
        if seq_len and seq_len != self.seq_len:
            k = self.seq_len // seq_len
            n = -(-per_rank // k)  # windows per rank
            base = self.next_window + rank * n
            t = torch.from_numpy(np.stack([self._window(base + i) for i in range(n)]).astype(np.int64))
            self.next_window += n * world
            return (t[:, : k * seq_len].reshape(-1, seq_len)[:per_rank], t[:, 1 : k * seq_len + 1].reshape(-1, seq_len)[:per_rank])
        base = self.next_window + rank * per_rank
        buf = np.stack([self._window(base + i) for i in range(per_rank)]).astype(np.int64)
        self.next_window += n_global
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]


def require_doc_starts(tokens, what: str, h: Hyperparameters) -> None:
    """Document masking and the SmearGate BOS mask read BOS as the document delimiter; shards from an
    exporter without BOS would silently turn them into plain causal / cross-document smearing."""
    if not (h.doc_mask or h.smear_gate):
        return
    head = np.asarray(tokens[: 1 << 20])
    if head.size and (head[0] != BOS_ID if what == "validation" else not (head == BOS_ID).any()):
        raise ConfigError(f"DOC_MASK=1 and SMEAR_GATE=1 read BOS (id {BOS_ID}) as the document start, but the {what} shards "
                          f"{'do not start with it' if what == 'validation' else 'hold none in their first 1M tokens'}; "
                          f"re-export them with BOS or set DOC_MASK=0 SMEAR_GATE=0")


def shard_max_ids(paths: list[str], rank: int = 0, world: int = 1) -> Tensor:
    """Largest id per shard of this rank's share (others 0); all-reduce MAX completes it."""
    out = torch.zeros(len(paths), dtype=torch.int64)
    for i in range(rank, len(paths), world):
        out[i] = int(read_shard(paths[i]).max(initial=0))
    return out


def load_tokenizer(path: str):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer {path} not found; set TOKENIZER_PATH or DATA_DIR")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"tokenizer {path} is not a SentencePiece model ({' '.join(str(e).split())}); "
                          f"set TOKENIZER_PATH to the .model file that built the shards") from None


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


TOKENIZER_META = "tokenizer.json"  # {"file", "sha256", "vocab_size"} of the tokenizer, next to the shards


def check_tokenizer_built_shards(tokenizer_path: str, data_dir: str, val_tokens: np.ndarray,
                                 max_docs: int = 32, max_tokens: int = 1 << 17) -> int:
    """Stop unless this tokenizer made the shards (another one of the same size gives a wrong val_bpb).

    By the sha256 our exporters record, when present; always by re-encoding: documents are [BOS] +
    sp.encode(text), so only their own tokenizer turns decoded text back into the same ids (60 of 60
    FineWeb documents; 0 of 60 for each of five other sp1024/sp8192-sized tokenizers). Returns the count.
    """
    meta_path = os.path.join(data_dir, TOKENIZER_META)
    if os.path.isfile(meta_path):
        try:
            meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
            want, name = meta["sha256"], meta.get("file", "?")
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{meta_path} is corrupt; rebuild the shards or delete it") from None
        have = file_sha256(tokenizer_path)
        if have != want:
            raise ConfigError(f"tokenizer {tokenizer_path} (sha256 {have[:12]}) did not build the shards in {data_dir}: "
                              f"they record {name} (sha256 {want[:12]}); set TOKENIZER_PATH to that file")
    sp = load_tokenizer(tokenizer_path)
    starts = np.flatnonzero(val_tokens == BOS_ID)
    same = checked = n_tok = 0
    for a, b in zip(starts[:-1], starts[1:]):  # whole documents only: the last one may be truncated
        if checked == max_docs or n_tok > max_tokens:
            break
        ids = val_tokens[a + 1 : b].tolist()
        n_tok += len(ids)
        if sp.unk_id() in ids:  # <unk> decodes to " ⁇ ", which no tokenizer encodes back to <unk>
            continue
        same += sp.encode(sp.decode(ids)) == ids
        checked += 1
    if not checked:  # one (truncated) document, or no BOS: the text of the first window up to its last space
        a = int(starts[-1]) + 1 if starts.size else 0
        ids = val_tokens[a : a + 4096].tolist()
        ids = ids[: ids.index(sp.unk_id())] if sp.unk_id() in ids else ids
        text = sp.decode(ids)
        enc = sp.encode(text[: max(text.rfind(" "), 0)])[:-2]  # a piece may span the cut
        same, checked = int(bool(enc) and enc == ids[: len(enc)]), 1
    if same < 0.9 * checked:
        raise ConfigError(f"tokenizer {tokenizer_path} did not build the shards in {data_dir}: only {same}/{checked} "
                          f"validation documents re-encode to their stored ids; set TOKENIZER_PATH (and VOCAB_SIZE) "
                          f"to the tokenizer that built them")
    return checked


def build_byte_luts(tokenizer_path: str, vocab_size: int, sidecar: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (base_bytes, has_leading_space, is_boundary) for the val_bpb byte count.
    A CaseOps tokenizer needs the byte sidecar (sidecar=True): the tables would count operators as text."""
    sp = load_tokenizer(tokenizer_path)
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"VOCAB_SIZE={vocab_size} but tokenizer {tokenizer_path} has {sp.vocab_size()} "
                          f"pieces; set VOCAB_SIZE={sp.vocab_size()} or use the matching tokenizer")
    # Without a standalone "▁" every space becomes 3 byte-fallback tokens and bytes are over-counted (#897).
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise ConfigError(f"tokenizer {tokenizer_path} has no standalone '\u2581' piece; val_bpb would be wrong")
    if not sidecar and sp.piece_to_id("\ue001") != sp.unk_id():
        raise ConfigError(f"tokenizer {tokenizer_path} is a CaseOps tokenizer but the dataset has no fineweb_val_bytes_*.bin "
                          f"sidecar; byte tables would count its operators as text bytes")
    base = torch.zeros(vocab_size, dtype=torch.int64)
    lead = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):  # one raw byte, not the 3 bytes of U+FFFD
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            lead[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, lead, boundary


def target_bytes(prev: Tensor, tgt: Tensor, luts: tuple[Tensor, ...], idx: Tensor | None = None) -> Tensor:
    """Bytes of each target given its previous token: the leading space is dropped after a boundary.
    luts = (sidecar,) holds the bytes per target position instead: those at positions idx."""
    if len(luts) == 1:
        return luts[0][idx.clamp(max=luts[0].numel() - 1)]
    base, lead, boundary = luts
    return base[tgt] + (lead[tgt] & ~boundary[prev]).long()


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
# Weightless RMSNorm everywhere; matrices fp32 masters used under bf16 autocast on CUDA.


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, rope_dims: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [T, rd/2]
    return angles.cos(), angles.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first rope_dims of each head (dim i pairs with i + rope_dims/2)."""
    rd = cos.size(-1) * 2
    if rd == 0:
        return x
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    c, s = ((t[None] if t.dim() == 2 else t)[:, :, None, :].to(x.dtype) for t in (cos, sin))  # [1 or B,T,1,rd/2]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, x_pass], dim=-1)


# Document-masked attention: a row is cut into segments at position 0 and at every BOS, and a query
# sees only earlier keys of its own segment. RoPE positions stay absolute within the row, as in the
# record (#1530/#1855): q.k depends only on the offset, so a document scores the same wherever it sits.
CU_BUCKET = 64  # FA3 varlen boundary lists are padded to a multiple of this: few compiled shapes (#1530)


class DocLayout(NamedTuple):
    """Segments of a [B,T] batch, in the form the attention path needs: exactly one field is set.

    mask: [B,1,T,T] bool, key j visible to query i (same segment and j <= i); SDPA path, static shape.
    cu_seqlens: int32 segment starts in the flattened B*T stream, then B*T, padded with B*T to a multiple
        of CU_BUCKET (FA3 varlen path; built outside the compiled graph, one compiled shape per bucket).
    """
    mask: Tensor | None
    cu_seqlens: Tensor | None


def doc_layout(ids: Tensor, varlen: bool | None = None) -> DocLayout:
    """DocLayout of token ids [B,T]. varlen None: FA3 varlen on CUDA when FA3 is importable and we are
    not inside a compiled graph (cu_seqlens has a data-dependent size), else the SDPA mask."""
    if varlen is None:
        varlen = _fa3_varlen is not None and cuda_path(ids.device) and not torch.compiler.is_compiling()
    B, T = ids.shape
    starts = ids == BOS_ID
    if varlen:
        starts = starts.clone()
        starts[:, 0] = True
        pos = starts.flatten().nonzero().flatten().int()
        pad = torch.full((1 + (-(pos.numel() + 1)) % CU_BUCKET,), B * T, dtype=torch.int32, device=ids.device)
        return DocLayout(None, torch.cat([pos, pad]))
    seg = starts.int().cumsum(1)  # [B,T]: equal ids <=> same segment
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    return DocLayout(((seg[:, :, None] == seg[:, None, :]) & causal)[:, None], None)


def host_cu_seqlens(x: Tensor) -> Tensor:
    """doc_layout(x, varlen=True).cu_seqlens of a host batch, built by the loader thread with the batch:
    the step then has no nonzero() device sync (as the 1.0611 record's loader)."""
    starts = x.numpy() == BOS_ID
    starts[:, 0] = True
    pos = np.flatnonzero(starts)
    cu = np.full(-(-(pos.size + 1) // CU_BUCKET) * CU_BUCKET, x.numel(), dtype=np.int32)
    cu[: pos.size] = pos
    return torch.from_numpy(cu)


def attention(q: Tensor, k: Tensor, v: Tensor, docs: DocLayout | None = None) -> Tensor:
    """The attention of every forward path (training, eval, TTT, GPTQ calibration).

    attention(q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D], docs: DocLayout | None) -> [B,T,H,D].
    docs None: causal over the whole row. Otherwise causal within each document segment
    (doc_layout); the FA3 varlen kernel for a cu_seqlens layout, SDPA with the boolean mask else.
    """
    B, T, H, D = q.shape
    fa3 = docs.cu_seqlens is not None if docs is not None else _fa3_func is not None and cuda_path(q.device)
    if fa3:  # FA3 takes one 16-bit dtype; torch >= 2.12 autocasts the QK rms_norm to fp32 while v stays bf16
        q, k = q.to(v.dtype), k.to(v.dtype)
    if docs is not None and docs.cu_seqlens is not None:
        cu = docs.cu_seqlens
        out = _fa3_varlen(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, cu, T, T, causal=True)
        return (out[0] if isinstance(out, tuple) else out).view(B, T, H, D)
    if fa3:
        out = _fa3_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=None if docs is None else docs.mask, is_causal=docs is None, enable_gqa=True)
    return y.transpose(1, 2)


def set_compile_limits() -> None:
    """Room for both loop modes times the varlen boundary buckets (the record used 64)."""
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)


def uses_varlen(h: Hyperparameters, device: torch.device) -> bool:
    return h.doc_mask and _fa3_varlen is not None and cuda_path(device)


def fa3_refusal(h: Hyperparameters, device: torch.device) -> str:
    """Why a CUDA run must not start: without FA3 the document mask runs SDPA's math kernel on a
    [B,1,T,T] mask (no flash/efficient kernel takes it), out of memory at the record batch."""
    if h.lora_ttt_enabled and cuda_path(device) and h.lora_rank % 8:
        return f"LORA_RANK={h.lora_rank}: the LoRA stage's grouped matmuls on CUDA need 16-byte rows; use a multiple of 8"
    if not (h.doc_mask and cuda_path(device)) or _fa3_varlen is not None or h.sdpa_fallback:
        return ""
    cu = (torch.version.cuda or "12.8").replace(".", "")
    return (f"DOC_MASK=1 on CUDA needs FlashAttention 3 (flash_attn_interface): "
            f"{_fa3_error or 'not installed'}; install the wheel for torch {torch.__version__}: pip install flash-attn-3 "
            f"--index-url https://download.pytorch.org/whl/cu{cu}/flash-attn-3/ (README: Install), or set SDPA_FALLBACK=1")


def bos_stats(tokens, T: int) -> tuple[float, float]:
    """(BOS per token, dispersion) over rows of T tokens cut as the loader cuts windows (T+1 apart):
    dispersion = variance of a row's BOS count / the binomial's (document lengths spread it wider)."""
    n = len(tokens) // (T + 1)
    c = (np.asarray(tokens[: n * (T + 1)]).reshape(n, T + 1)[:, 1:T] == BOS_ID).sum(1)
    rate = c.mean() / (T - 1) if n else 0.0
    return rate, float(c.var() / ((T - 1) * rate * (1 - rate))) if 0 < rate < 1 else 1.0


def varlen_buckets(rate: float, dispersion: float, B: int, T: int, sigmas: float = 6.0) -> range:
    """cu_seqlens buckets (k: k*CU_BUCKET entries) a [B,T] batch of independent rows reaches: its
    segments are B + the BOS among B*(T-1) tokens, mean B(T-1)rate, variance dispersion times the
    binomial's; the range covers mean +- sigmas sd (6: a miss in ~1e9 batches, normal tails)."""
    n = B * (T - 1)
    mean, sd = n * rate, math.sqrt(max(dispersion, 1.0) * n * rate * (1 - rate))
    return seg_buckets(B + max(math.floor(mean - sigmas * sd), 0), B + min(math.ceil(mean + sigmas * sd), n))


def seg_buckets(lo: int, hi: int) -> range:
    """The cu_seqlens buckets of batches holding lo..hi segments: len(cu) = segments + 1, padded up."""
    return range(int(lo) // CU_BUCKET + 1, int(hi) // CU_BUCKET + 2)


def varlen_warmup_ids(x: Tensor, gen: torch.Generator, buckets) -> list[Tensor]:
    """Copies of x with BOS planted so that their cu_seqlens fill each bucket size k in buckets
    (those a batch of x's shape reaches): compiled before any clock starts."""
    B, T = x.shape
    out = []
    for k in buckets:
        segs = min(k * CU_BUCKET - 1, B * T)  # boundary list = segs starts + the end: fills bucket k
        if segs < max(B, (k - 1) * CU_BUCKET):
            continue
        xb = x.clone().flatten()
        xb[xb == BOS_ID] = BOS_ID + 1
        cand = torch.arange(B * T).view(B, T)[:, 1:].flatten()
        xb[cand[torch.randperm(cand.numel(), generator=gen)[: segs - B]].to(xb.device)] = BOS_ID
        out.append(xb.view(B, T))
    return out


# Fused softcapped cross-entropy (#1787): NLL of softmax(c*tanh(x/c)) straight from the raw logits x.
# Backward recomputes the capped logits from x (alive anyway) and the saved per-row logsumexp, so no
# fp32 [N, vocab] copy is kept between forward and backward. One custom op: opaque to torch.compile;
# Triton kernels on CUDA (when importable and self-checked), the same math in PyTorch elsewhere.
IGNORE_INDEX = -100  # as F.cross_entropy


def _ce_math(x: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    z = cap * torch.tanh(x.float() / cap)
    lse = torch.logsumexp(z, dim=-1)
    zt = z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(targets != IGNORE_INDEX, lse - zt, 0.0), lse


def _ce_math_bwd(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor, cap: float) -> Tensor:
    th = torch.tanh(x.float() / cap)
    p = torch.exp(cap * th - lse[:, None])  # softmax of the capped logits
    valid = targets != IGNORE_INDEX
    p.scatter_add_(1, targets.clamp_min(0)[:, None], -valid.float()[:, None])  # - onehot
    return (p * (1 - th * th) * torch.where(valid, g, 0.0)[:, None]).to(x.dtype)


_TRITON_CE: dict = {}  # "kernels": (fwd, bwd) or None; "why": why the PyTorch path is used


def _build_triton_ce():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(X, T, NLL, LSE, stride, V, cap, BLOCK: tl.constexpr):  # one program per row, streaming logsumexp
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(T + row)
        m = float("-inf")
        acc = 0.0
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride + cols, mask=cols < V, other=0.0).to(tl.float32)
            z = tl.where(cols < V, cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0), float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(acc)
        valid = tgt != -100  # IGNORE_INDEX (a jit function reads no module globals)
        xt = tl.load(X + row * stride + tl.where(valid, tgt, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(NLL + row, tl.where(valid, lse - cap * (2.0 * tl.sigmoid(2.0 * xt / cap) - 1.0), 0.0))

    @triton.jit
    def bwd(X, T, LSE, G, DX, stride, V, cap, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        tgt = tl.load(T + row)
        g = tl.where(tgt != -100, tl.load(G + row), 0.0)
        lse = tl.load(LSE + row)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride + cols, mask=cols < V, other=0.0).to(tl.float32)
            th = 2.0 * tl.sigmoid(2.0 * x / cap) - 1.0
            p = tl.exp(cap * th - lse)
            p = tl.where(cols == tgt, p - 1.0, p)
            tl.store(DX + row * stride + cols, (g * p * (1.0 - th * th)).to(DX.dtype.element_ty), mask=cols < V)

    return fwd, bwd


def _tri_fwd(k, x: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    x, targets = x.contiguous(), targets.contiguous()
    nll, lse = (torch.empty(x.size(0), device=x.device) for _ in range(2))
    k[0][(x.size(0),)](x, targets, nll, lse, x.stride(0), x.size(1), cap, BLOCK=1024)
    return nll, lse


def _tri_bwd(k, x: Tensor, targets: Tensor, lse: Tensor, g: Tensor, cap: float) -> Tensor:
    x = x.contiguous()
    dx = torch.empty_like(x)
    k[1][(x.size(0),)](x, targets.contiguous(), lse, g.contiguous().float(), dx, x.stride(0), x.size(1), cap, BLOCK=1024)
    return dx


def _triton_ce(device: torch.device):
    """The Triton kernels, built and checked against the PyTorch math (saturated logits, ignored
    targets) on first CUDA use; None without Triton or when the check fails (reason in _TRITON_CE)."""
    if "kernels" not in _TRITON_CE:
        k, why = None, "no triton"
        try:
            k = _build_triton_ce()
            gen = torch.Generator(device=device).manual_seed(0)
            x = (torch.randn(64, 1000, device=device, generator=gen) * 40).bfloat16()
            t = torch.randint(0, 1000, (64,), device=device, generator=gen)
            t[::7] = IGNORE_INDEX
            nll, lse = _tri_fwd(k, x, t, 30.0)
            ref, ref_lse = _ce_math(x, t, 30.0)
            g = torch.rand(64, device=device, generator=gen)
            dx, ref_dx = _tri_bwd(k, x, t, lse, g, 30.0), _ce_math_bwd(x, t, ref_lse, g, 30.0)
            ok = torch.allclose(nll, ref, rtol=1e-3, atol=1e-3) and torch.allclose(dx.float(), ref_dx.float(), rtol=2e-2, atol=1e-3)
            k, why = (k, "") if ok else (None, "triton self-check mismatch")
        except ImportError:
            k = None
        except Exception as e:  # noqa: BLE001 -- any failure of the optional kernel means: do not use it
            k, why = None, f"triton self-check failed: {type(e).__name__}"
        _TRITON_CE.update(kernels=k, why=why)
    return _TRITON_CE["kernels"]


def _use_triton(x: Tensor) -> bool:
    return x.is_cuda and _triton_ce(x.device) is not None


def _op_namespace() -> str:
    """pgolf, or pgolf<k> when other copies of this file in the process took it (tools load the shipped
    code as a module): registering an op name again would send every copy's calls to the last one."""
    k = 0
    while hasattr(getattr(torch.ops, f"pgolf{k or ''}"), "softcap_ce"):
        k += 1
    return f"pgolf{k or ''}"


_OPS = _op_namespace()


@torch.library.custom_op(f"{_OPS}::softcap_ce", mutates_args=())
def _softcap_ce(x: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return _tri_fwd(_triton_ce(x.device), x, targets, cap) if _use_triton(x) else _ce_math(x, targets, cap)


@_softcap_ce.register_fake
def _(x, targets, cap):
    return x.new_empty(x.size(0), dtype=torch.float32), x.new_empty(x.size(0), dtype=torch.float32)


@torch.library.custom_op(f"{_OPS}::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd(x: Tensor, targets: Tensor, lse: Tensor, g: Tensor, cap: float) -> Tensor:
    if _use_triton(x):
        return _tri_bwd(_triton_ce(x.device), x, targets, lse, g, cap)
    return _ce_math_bwd(x, targets, lse, g, cap)


@_softcap_ce_bwd.register_fake
def _(x, targets, lse, g, cap):
    return torch.empty_like(x)


def _ce_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.cap = inputs[2]


def _ce_backward(ctx, g_nll, g_lse):
    x, targets, lse = ctx.saved_tensors
    return _softcap_ce_bwd(x, targets, lse, g_nll, ctx.cap), None, None


_softcap_ce.register_autograd(_ce_backward, setup_context=_ce_setup)


def softcap_cross_entropy(x: Tensor, targets: Tensor, cap: float, reduction: str = "mean") -> Tensor:
    """F.cross_entropy(cap * tanh(x / cap), targets) for raw logits x [N, V] (any float dtype), in value
    and gradient; targets equal to IGNORE_INDEX add nothing. reduction: mean (over the rest) | none."""
    nll = _softcap_ce(x, targets, float(cap))[0]
    return nll if reduction == "none" else nll.sum() / (targets != IGNORE_INDEX).sum().clamp_min(1)


def fused_ce_backend(device: torch.device) -> str:
    """triton, or torch with the reason on CUDA (builds and checks the kernels on first call)."""
    if device.type != "cuda":
        return "torch"
    return "triton" if _triton_ce(device) is not None else f"torch ({_TRITON_CE['why']})"


def asym_cap(z: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """pos*tanh(z/pos) where z >= 0, neg*tanh(z/neg) below (#1923; z >= 0 as #2135): one cap per sign."""
    return torch.where(z >= 0, pos * torch.tanh(z / pos), neg * torch.tanh(z / neg))


HEAD_KINDS = ("tied", "factorized", "mos", "simplex")
LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")  # per-document TTT adapter sites (#1855)


class LowRankResidual(nn.Module):
    """x -> x + B(A x) with B = 0 at init: a learned basis rotation that starts as the exact identity."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.a = nn.Linear(d, r, bias=False)
        self.b = nn.Linear(r, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.b(self.a(x))


def sparsify_rows_(w: Tensor, sparsity: float) -> Tensor:
    """Keep the round((1-sparsity)*cols) largest magnitudes of each row, zero the rest (in place)."""
    drop = w.size(1) - round((1 - sparsity) * w.size(1))
    return w.scatter_(1, w.abs().topk(drop, dim=1, largest=False).indices, 0.0)


class Attention(nn.Module):
    def __init__(self, h: Hyperparameters, xsa: bool):
        super().__init__()
        d, self.nh, self.nkv = h.model_dim, h.num_heads, h.num_kv_heads
        self.hd = d // h.num_heads
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.c_v = nn.Linear(d, self.nkv * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((self.nh,), h.qk_gain_init))
        self.xsa = xsa
        # per-head output gate, initialised in GPT._init_weights (sparse: #1787, dense: #1736)
        self.gate_in = h.gate_window if h.attn_gate == "sparse" else d
        self.gate_scale = h.sparse_attn_gate_scale if h.attn_gate == "sparse" else 1.0
        self.attn_gate_w = nn.Parameter(torch.zeros(self.nh, self.gate_in)) if h.attn_gate != "none" else None

    def forward(self, u: Tensor, cos: Tensor, sin: Tensor, docs: DocLayout | None = None, lora=None) -> Tensor:
        B, T, C = u.shape
        q, k, v = self.c_q(u), self.c_k(u), self.c_v(u)
        if lora is not None:  # per-document TTT adapters read the block's normed input
            q, k, v = lora("q", u, q), lora("k", u, k), lora("v", u, v)
        q = q.view(B, T, self.nh, self.hd)
        k = k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd)
        q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[:, None]
        k = apply_partial_rope(rms_norm(k), cos, sin)
        y = attention(q, k, v, docs)  # [B,T,H,D]
        if self.xsa:  # remove the component along the token's own value direction
            y = y.view(B, T, self.nkv, self.nh // self.nkv, self.hd)  # [B,T,Hkv,G,D]
            vn = F.normalize(v, dim=-1).unsqueeze(3)  # [B,T,Hkv,1,D]
            y = y - (y * vn).sum(-1, keepdim=True) * vn
        if self.attn_gate_w is not None:  # after XSA, before the output projection
            g = torch.sigmoid(self.gate_scale * F.linear(u[..., : self.gate_in], self.attn_gate_w.to(u.dtype)))
            y = y.reshape(B, T, self.nh, self.hd) * g[..., None]
        out = self.proj(y.reshape(B, T, C))
        return out if lora is None else lora("o", u, out)


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.fc = nn.Linear(h.model_dim, h.mlp_mult * h.model_dim, bias=False)
        self.proj = nn.Linear(h.mlp_mult * h.model_dim, h.model_dim, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(u), 0.5).square())


class Block(nn.Module):
    """One physical layer; runs sequentially or as one step of the two-lane decoder."""

    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        d = h.model_dim
        self.attn = Attention(h, xsa=layer >= h.num_layers - h.xsa_last_n)
        self.mlp = MLP(h)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        # rows: weight of x, of x0, of each extra embedding; None drops the x0 pathway
        self.resid_mix = nn.Parameter(torch.cat([torch.ones(1, d), torch.zeros(1 + h.num_extra_embeds, d)])) if h.resid_mix_enabled else None
        self.ln_s = 1.0 / math.sqrt(layer + 1) if h.ln_scale else 1.0

    def _mlp(self, x: Tensor, lora) -> Tensor:
        u = rms_norm(x) * self.ln_s
        m = self.mlp(u)
        return self.mlp_scale.to(x.dtype) * (m if lora is None else lora("mlp", u, m))

    def _attn(self, x: Tensor, x0, cos: Tensor, sin: Tensor, docs=None, lora=None) -> tuple[Tensor, Tensor]:
        x_in = x
        if self.resid_mix is not None:  # x0: the normed embedding, or a tuple with the extra embeddings
            mix = self.resid_mix.to(x.dtype)
            x_in = mix[0] * x
            for j, e in enumerate(x0 if isinstance(x0, tuple) else (x0,), 1):
                x_in = x_in + mix[j] * e
        return x_in, self.attn_scale.to(x.dtype) * self.attn(rms_norm(x_in) * self.ln_s, cos, sin, docs, lora)

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, docs: DocLayout | None = None, lora=None) -> Tensor:
        x_in, a = self._attn(x, x0, cos, sin, docs, lora)
        x = x_in + a
        return x + self._mlp(x, lora)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, cos, sin, resid: Tensor, post: Tensor, docs=None, lora=None):
        """Attention reads lane0 (mixed with x0), MLP reads lane1; both write both lanes (#1529/#1530)."""
        _, a = self._attn(lane0, x0, cos, sin, docs, lora)
        m = self._mlp(lane1, lora)
        resid, post = resid.to(a.dtype), post.to(a.dtype)  # post[src, dst]: src 0 attn / 1 mlp
        out0 = resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m
        out1 = resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m
        return out0, out1


def bigram_hash(ids: Tensor, buckets: int) -> Tensor:
    """Bucket of (previous, current) input token; the first position of a window pairs with 0 (pad)."""
    prev = F.pad(ids[:, :-1], (1, 0))
    return ((prev * 1_000_003) ^ (ids * 8191)) % buckets


class Schedule(NamedTuple):
    encoder: list[int]  # physical layer of each encoder application
    decoder: list[int]
    n_skip: int  # decoder positions 0..n_skip-1 receive a skip (LIFO from the encoder)
    parallel_from: int  # first decoder position of the two-lane region (len(decoder) if none)


def layer_schedule(h: Hyperparameters, looping: bool) -> Schedule:
    """Virtual layer order, its encoder/decoder split and where the two lanes start."""
    order = list(range(h.num_layers))
    if looping and h.looping_enabled:
        loop = list(range(h.loop_start, h.loop_end + 1))
        order = order[: h.loop_start] + loop * (h.num_loops + 1) + order[h.loop_end + 1 :]
    enc, dec = order[: len(order) // 2], order[len(order) // 2 :]
    start = h.parallel_residual_start
    par = next((j for j, i in enumerate(dec) if 0 <= start <= i), len(dec))
    return Schedule(enc, dec, min(len(enc), len(dec)), par)


class GPT(nn.Module):
    """Tied-embedding GPT for Parameter Golf.

    - weightless RMSNorm, x0 = norm(embedding) mixed into every block (resid_mix)
    - GQA attention: QK RMSNorm, per-head q_gain, partial RoPE, XSA on the last xsa_last_n layers
    - MLP: LeakyReLU(0.5)^2; learned attn/mlp output scales; layerwise 1/sqrt(l+1) input scale
    - U-net skips (LIFO) with sigmoid gates; depth recurrence of loop_start..loop_end
    - two-lane parallel residual decoder from parallel_residual_start, output = mean of lanes
    - attention only within documents (cut at every BOS); SmearGate on the embeddings (never into a
      BOS); a sigmoid gate on each head's output
    - optional embed_proj/head_proj when embedding_dim < model_dim; logit softcap
    - studies (all off by default): low-rank rotations at both ends, extra token tables, no x0,
      factorized / mixture-of-softmaxes / simplex heads, a row-sparse embedding
    """

    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.h = h
        d, e, L = h.model_dim, h.model_dim_embed, h.num_layers
        self.tok_emb = nn.Embedding(h.vocab_size, e)
        self.embed_proj = nn.Linear(e, d, bias=False) if e < d else None
        self.head_proj = nn.Linear(d, e, bias=False) if e < d else None
        self.blocks = nn.ModuleList(Block(h, i) for i in range(L))
        self.schedules = {mode: layer_schedule(h, mode) for mode in (False, True)}
        n_skip = max(s.n_skip for s in self.schedules.values())
        self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        self.skip_gates = nn.Parameter(torch.zeros(n_skip, d)) if h.skip_gates_enabled else None
        self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        cos, sin = rotary_tables(max(h.train_seq_len, h.eval_seq_len), h.rope_dims, h.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        r, kind = h.embed_rotation_rank, h.head_kind
        self.in_rot, self.out_rot = (LowRankResidual(d, r), LowRankResidual(d, r)) if r else (None, None)
        self.extra_embeds = nn.ModuleList(nn.Embedding(h.vocab_size, d) for _ in range(h.num_extra_embeds)) or None
        if kind != "tied":
            self.head_down = nn.Linear(e, h.head_rank * (h.head_experts if kind == "mos" else 1), bias=False)
            self.head_out = nn.Linear(h.head_rank, h.vocab_size, bias=False)
            self.head_gate = nn.Linear(e, h.head_experts, bias=False) if kind == "mos" else None
        if h.smear_gate:
            self.smear_gate = nn.Linear(h.gate_window, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if h.asym_softcap:  # trained: the training loss and global SGD run the unfused head through them
            self.softcap_pos = nn.Parameter(torch.full((1,), h.logit_softcap))
            self.softcap_neg = nn.Parameter(torch.full((1,), h.logit_softcap))
        self.looping_active = False
        self.hash_embed: nn.Embedding | None = None  # TTT_HASH_EMBED attaches it at eval; never in the artifact
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Token tables ~ N(0, 0.005^2); q/k/v/fc, projections, head_down, rotation A orthogonal;
        output projections, rotation B and the mos gate zero (the rotations start as the identity)."""
        nn.init.normal_(self.tok_emb.weight, std=self.h.tied_embed_init_std)
        for name, p in self.named_parameters():
            if name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "fc.weight", "_proj.weight", "head_down.weight", "rot.a.weight")):
                nn.init.orthogonal_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight", "rot.b.weight", "head_gate.weight")):
                nn.init.zeros_(p)
            elif name.startswith(("extra_embeds.", "head_out.")):
                nn.init.normal_(p, std=self.h.tied_embed_init_std)
            elif name.endswith(("attn_gate_w", "smear_gate.weight")):  # zero: sparse gate 0.5, smear identity
                nn.init.normal_(p, std=0.005) if self.h.attn_gate == "dense" and "attn" in name else nn.init.zeros_(p)
        self.constrain_()

    @torch.no_grad()
    def constrain_(self, ema: list[Tensor] | None = None) -> None:
        """Re-apply the EMBED_SPARSITY row mask to the live embedding, or to its entry of an EMA list
        (state_dict order): after every optimizer step and every EMA update, so nothing leaks back."""
        if self.h.embed_sparsity > 0:
            w = self.tok_emb.weight if ema is None else ema[list(self.state_dict()).index("tok_emb.weight")]
            sparsify_rows_(w, self.h.embed_sparsity)

    def smear(self, e: Tensor, ids: Tensor) -> Tensor:
        """SmearGate (#1667; BOS fix #1851/#1855): e_t += lam * sigmoid(w . e_t[:window]) * e_{t-1}.

        The gate reads the current token; e_{t-1} is the unsmeared previous row. Nothing is smeared into
        a BOS position, so no information crosses a document start. Identity at init (lam = w = 0).
        """
        g = self.smear_lambda.to(e.dtype) * torch.sigmoid(self.smear_gate(e[..., : self.h.gate_window]))  # [B,T,1]
        g = g * (ids != BOS_ID)[..., None].to(e.dtype)
        return torch.cat([e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]], dim=1)

    def _merge_skip(self, x: Tensor, skip: Tensor, j: int) -> Tensor:
        s = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + s
        return torch.lerp(s, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    def doc_layout(self, ids: Tensor) -> DocLayout | None:
        """The attention layout of a batch: None (plain causal) when DOC_MASK=0."""
        return doc_layout(ids) if self.h.doc_mask else None

    def hidden(self, ids: Tensor, docs: DocLayout | None = None, lora=None, rope: Tensor | None = None) -> Tensor:
        """The head input [B,T,embedding_dim]: final normed state after out_rot and head_proj.

        docs: a precomputed layout of ids (FA3 varlen from outside a compiled graph); None derives it.
        lora: per-document adapters (DocLoRA), one set per virtual layer slot.
        rope: [B,T] RoPE position of each token (packed windows); None: 0..T-1 in every row.
        """
        T = ids.size(1)
        docs = self.doc_layout(ids) if docs is None else docs
        cos, sin = (self.rope_cos[:T], self.rope_sin[:T]) if rope is None else (self.rope_cos[rope], self.rope_sin[rope])
        x = self.tok_emb(ids)
        if self.hash_embed is not None:
            x = x + self.hash_embed(bigram_hash(ids, self.hash_embed.num_embeddings))
        if self.h.smear_gate:
            x = self.smear(x, ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.in_rot is not None:
            x = self.in_rot(x)
        x0 = x = rms_norm(x)
        if self.extra_embeds is not None:
            x0 = (x0, *[rms_norm(t(ids)) for t in self.extra_embeds])
        sched = self.schedules[self.looping_active]
        skips = []
        slot = (lambda v: None) if lora is None else lora.slot
        for v, i in enumerate(sched.encoder):
            x = self.blocks[i](x, x0, cos, sin, docs, slot(v))
            skips.append(x)
        lanes = None
        for j, i in enumerate(sched.decoder):
            lo = slot(len(sched.encoder) + j)
            if j == sched.parallel_from:
                lanes = (x, x)
            if j < sched.n_skip and skips:
                skip = skips.pop()
                if lanes is None:
                    x = self._merge_skip(x, skip, j)
                else:
                    lanes = (self._merge_skip(lanes[0], skip, j), lanes[1])
            if lanes is None:
                x = self.blocks[i](x, x0, cos, sin, docs, lo)
            else:
                lanes = self.blocks[i].forward_lanes(*lanes, x0, cos, sin, self.parallel_resid_lambdas[i],
                                                     self.parallel_post_lambdas[i], docs, lo)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return self.head_input(x)

    def head_input(self, x: Tensor) -> Tensor:
        """A residual-stream vector -> the head's input (final norm, output rotation, head_proj)."""
        x = rms_norm(x)
        if self.out_rot is not None:
            x = self.out_rot(x)
        return self.head_proj(x) if self.head_proj is not None else x

    def head_logits(self, x: Tensor, lora=None) -> Tensor:
        """Head input -> fp32 scores whose log_softmax is the model's distribution over the vocab.

        mos returns log sum_k pi_k softmax_k (already normalized, so log_softmax leaves it as is);
        the experts are tanh(P_k x) (Yang et al. 2018, "Breaking the softmax bottleneck").
        """
        c, kind = self.h.logit_softcap, self.h.head_kind
        cap = lambda z: c * torch.tanh(z.float() / c)  # noqa: E731
        if self.h.asym_softcap:
            cap = lambda z: asym_cap(z.float(), self.softcap_pos, self.softcap_neg)  # noqa: E731
        if kind == "tied":
            z = F.linear(x, self.tok_emb.weight)
            return cap(z if lora is None else lora("head", x, z))
        u = self.head_down(x)
        if kind == "factorized":
            return cap(self.head_out(u))
        if kind == "simplex":  # a point of the r-simplex, then the output projection
            return cap(self.head_out(torch.softmax(u.float(), dim=-1)))
        z = cap(self.head_out(torch.tanh(u.unflatten(-1, (self.h.head_experts, -1)))))  # [B,T,K,V]
        log_pi = F.log_softmax(self.head_gate(x).float(), dim=-1)  # [B,T,K]
        return torch.logsumexp(log_pi[..., None] + F.log_softmax(z, dim=-1), dim=-2)

    def logits(self, ids: Tensor, docs: DocLayout | None = None, lora=None) -> Tensor:
        return self.head_logits(self.hidden(ids, docs, lora), None if lora is None else lora.slot(-1))

    def token_nll(self, ids: Tensor, targets: Tensor, docs: DocLayout | None = None, lora=None, hints=None):
        """Per-target NLL in nats, [B,T] float32; with hints [B,T] also -log p(hint) (hinted_nll)."""
        z = self.logits(ids, docs, lora)
        if hints is not None:
            return hinted_nll(z, targets, hints)
        return F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def forward(self, ids: Tensor, targets: Tensor, docs: DocLayout | None = None) -> Tensor:
        """Mean training loss; docs as in hidden(). ASYM_SOFTCAP: the unfused head (the fused op's cap is a constant)."""
        if self.h.fused_ce and self.h.head_kind == "tied" and not self.h.asym_softcap:
            x = F.linear(self.hidden(ids, docs), self.tok_emb.weight)
            return softcap_cross_entropy(x.flatten(0, 1), targets.flatten(), self.h.logit_softcap)
        z = self.logits(ids, docs)
        return F.cross_entropy(z.flatten(0, 1), targets.flatten())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------
# Muon (MuonEq-R) for block matrices, AdamW for the tied embedding and the control tensors.
# Routing is one table; every parameter has exactly one owner (asserted).

CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates",
                    "parallel_resid_lambdas", "parallel_post_lambdas", "head_gate", "attn_gate_w", "smear_gate", "smear_lambda")


def param_group(name: str, p: Tensor) -> str:
    """'embed' | 'cap' | 'scalar' | 'muon' for a named parameter (token tables and the untied head_out: embed;
    the ASYM_SOFTCAP caps: AdamW without weight decay, which would pull them toward 0)."""
    if name.startswith(("tok_emb.", "extra_embeds.", "head_out.")):
        return "embed"
    if name.startswith("softcap_"):
        return "cap"
    if p.ndim < 2 or any(pat in name for pat in CONTROL_PATTERNS):
        return "scalar"
    return "muon"


# Classic Muon quintic coefficients (Keller Jordan, modded-nanogpt).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025): one optimal quintic per iteration, as run by #1344 -> #1787 -> #1855.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(g: Tensor, steps: int, polar: bool = False) -> Tensor:
    """Approximate polar factor U V^T of g ([..., r, c]); bf16 on CUDA, fp32 elsewhere.

    polar: the first `steps` Polar Express triples instead of the classic quintic at every step.
    """
    x = g.bfloat16() if cuda_path(g.device) else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps] if polar else [NS_COEFFS] * steps:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


def muon_owners(sizes: list[int], world: int) -> list[int]:
    """Rank that orthogonalises each matrix: largest first onto the least-loaded rank (ties: lowest), so
    the Newton-Schulz work and the padded all-gather of the updates stay balanced; the same on every rank."""
    load, own = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        own[i] = r = load.index(min(load))
        load[r] += sizes[i]
    return own


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> row normalisation (MuonEq-R) -> Newton-Schulz -> decoupled WD + update.

    Each matrix is orthogonalised by its owner (muon_owners; batched per shape), which alone holds its
    summed gradient and momentum; one all-gather of the updates, each rank's packed in its row of a
    [world, max load] buffer, gives every rank every update. The buffer has Newton-Schulz's output dtype
    (bf16 on the GPU path): gathering the bf16 results is exact and moves half the bytes of fp32.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, polar: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.rank, self.world_size, self.polar = backend_steps, rank, world_size, polar

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            own, at, load = muon_owners([p.numel() for p in params], self.world_size), [], [0] * self.world_size
            for p, r in zip(params, own):
                at.append(load[r])
                load[r] += p.numel()
            dev = params[0].device
            out = torch.empty(self.world_size, max(load), device=dev, dtype=torch.bfloat16 if cuda_path(dev) else torch.float32)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                if own[i] == self.rank:
                    by_shape.setdefault(tuple(p.shape), []).append(i)
            for idx in by_shape.values():
                us = []
                for i in idx:
                    p = params[i]
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(mu).add_(p.grad)
                    u = p.grad.add(buf, alpha=mu)
                    us.append(u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7))
                for i, o in zip(idx, newton_schulz(torch.stack(us), self.backend_steps, self.polar)):
                    out[self.rank, at[i] : at[i] + o.numel()] = o.flatten()
            if self.world_size > 1:
                getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out.view(-1), out[self.rank])
            for i, p in enumerate(params):
                r, c = p.shape
                p.mul_(1 - lr * wd)
                p.add_(out[own[i], at[i] : at[i] + p.numel()].view_as(p), alpha=-lr * math.sqrt(max(1.0, r / c)))


def build_optimizers(h: Hyperparameters, model: GPT, d: Dist) -> list[torch.optim.Optimizer]:
    groups: dict[str, list[Tensor]] = {"embed": [], "scalar": [], "muon": [], "cap": []}
    for name, p in model.named_parameters():
        groups[param_group(name, p)].append(p)
    owned = sum(len(v) for v in groups.values())
    assert owned == len(list(model.parameters())), "every parameter must have exactly one optimizer"
    adam_kw = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=cuda_path(d.device))
    adam = torch.optim.AdamW(
        [dict(params=groups["embed"], lr=h.tied_embed_lr, weight_decay=h.embed_wd),
         dict(params=groups["scalar"], lr=h.scalar_lr, weight_decay=h.adam_wd)]
        + [dict(params=groups["cap"], lr=h.scalar_lr, weight_decay=0.0)] * bool(groups["cap"]), **adam_kw)
    muon = Muon(groups["muon"], lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps,
                weight_decay=h.muon_wd, rank=d.rank, world_size=d.world_size, polar=h.polar_express)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [adam, muon]


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """1 until 1-warmdown_frac of training, then linear to 0, floored at min_lr."""
    if warmdown_frac <= 0 or frac < 1 - warmdown_frac:
        return 1.0
    return max((1 - frac) / warmdown_frac, min_lr)


def muon_momentum_at(step: int, h: Hyperparameters) -> float:
    t = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - t) * h.muon_momentum_warmup_start + t * h.muon_momentum


# ------------------------------------------------------------------------------------------------
# Quantization & serialization
# ------------------------------------------------------------------------------------------------
# Block matrices and embed/head projections: GPTQ int6 (SDClip k=12.85); tied embedding: GPTQ int8
# (k=20) with the Hessian of the head input; control tensors: fp16 passthrough. The codes go into a
# pickle-free container, byte-shuffled and brotli-11 compressed. Counted bytes = packed code + file.

ARTIFACT_MAGIC = b"PGQ1"
SHUFFLE_MAGIC = b"BSHF"
SIZE_LIMIT = 16_000_000
ARTIFACT_MAX_BYTES = 1 << 30  # far over the limit: bounds what a wrong EVAL_ARTIFACT makes us read
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


# Matrix groups with their own SDClip k (knob <GROUP>_CLIP_SIGMAS, 0 -> MATRIX_CLIP_SIGMAS).
CLIP_GROUPS = (("mlp", ".mlp."), ("attn", ".attn."))
# Gate weights the record stores as int8 rows with max-abs scales (GATED_ATTN_QUANT_GATE, PR #1855).
QUANT_GATE_PATTERNS = ("attn_gate",)
AWQ_GROUP = 64  # columns kept at int8 by AWQ-lite
FIT_MAX_MULT, FIT_STEPS = 4.0, 4  # FIT_ARTIFACT: coarsest clip multiplier; bisection steps below it


def quant_spec(name: str, p: Tensor, h: Hyperparameters) -> tuple[int, float] | None:
    """(bits, clip_sigmas) for quantized tensors, None for fp16 passthrough (control tensors, and
    rotation matrices of <= 65,536 elements, the passthrough size of the baseline). clip 0 marks
    gate rows: int8 with max-abs row scales, no GPTQ."""
    group = param_group(name, p)
    if group == "embed":
        return h.embed_bits, h.embed_clip_sigmas
    if h.quant_gate and p.ndim == 2 and 32 <= p.numel() <= 8192 and any(g in name for g in QUANT_GATE_PATTERNS):
        return 8, 0.0
    if group != "muon" or ("_rot." in name and p.numel() <= 65_536):
        return None
    clip = next((getattr(h, f"{g}_clip_sigmas") for g, pat in CLIP_GROUPS if pat in name), 0.0)
    return h.matrix_bits, clip or h.matrix_clip_sigmas


def parse_tiers(spec: str, vocab: int, clip: float) -> list[tuple[int, int, float]]:
    """'1024:8,4096:6,rest:4' -> [(end_rank, bits, clip)]: cumulative row-rank ends, optional :CLIP."""
    tiers, start = [], 0
    try:
        for part in spec.split(","):
            f = part.strip().split(":")
            end = vocab if f[0] == "rest" else int(f[0])
            tiers.append((end, int(f[1]), float(f[2]) if len(f) > 2 else clip))
            if not (start < end <= vocab and 2 <= tiers[-1][1] <= 8 and len(f) <= 3 and tiers[-1][2] > 0):
                raise ValueError
            start = end
        if start != vocab:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(f"EMBED_BITS_TIERS={spec!r}: use increasing ROWS:BITS[:CLIP] (bits 2..8, rows <= "
                          f"VOCAB_SIZE={vocab}) ending with rest:BITS, e.g. 1024:8,rest:5") from None
    return tiers


def embed_row_tiers(h: Hyperparameters, stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-row (bits, clip) of the embedding: rows ranked by token count, or by count x mean
    gradient norm (the "damage" score), best first; ties keep token-id order."""
    if "tok_emb.weight.freq" not in stats:
        raise ValueError("EMBED_BITS_TIERS needs the row statistics of the GPTQ calibration pass")
    score = stats["tok_emb.weight.freq"].double()
    if h.embed_tier_rank == "damage":
        score = score * stats["tok_emb.weight.gnorm"].double()
    order = torch.argsort(score.cpu(), descending=True, stable=True)
    bits, clip, start = torch.zeros(h.vocab_size, dtype=torch.long), torch.zeros(h.vocab_size), 0
    for end, b, c in parse_tiers(h.embed_bits_tiers, h.vocab_size, h.embed_clip_sigmas):
        bits[order[start:end]], clip[order[start:end]], start = b, c, end
    return bits, clip


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed `bits`-bit grid: 31 for int6, 127 for int8."""
    return 2 ** (bits - 1) - 1


def sdclip_scales(w: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """Per-row step k*std(row)/R as fp16 (never 0): k sets the code entropy, hence the size.
    std is the unbiased row std (torch's default, as PRs #1855/#2135 compute it): the population
    std shrinks every step by sqrt(1 - 1/cols), which moves int codes off the record's."""
    std = w.float().std(dim=1, correction=1)
    scale = clip_sigmas * std / qmax(bits)
    return scale.clamp(torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max).half()


def qmax_rows(bits, device=None) -> Tensor:
    """qmax as a float column [1,1], or [rows,1] for per-row bits."""
    return torch.as_tensor(qmax(bits), dtype=torch.float32, device=device).reshape(-1, 1)


def quantize_rtn(w: Tensor, scales: Tensor, bits) -> Tensor:
    r = qmax_rows(bits, w.device)
    return torch.clamp(torch.round(w.float() / scales.float()[:, None]), -r, r).to(torch.int8)


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


def awq_scales(scales: Tensor, bits: int) -> Tensor:
    """Row steps of the AWQ-lite int8 columns: the matrix's step refined to the int8 grid."""
    return (scales.float() * qmax(bits) / qmax(8)).clamp(torch.finfo(torch.float16).tiny).half()


def awq_groups(state: dict[str, Tensor], stats: dict[str, Tensor], h: Hyperparameters) -> dict[str, list[int]]:
    """AWQ-lite (#1908): {matrix: first columns} of the AWQ_TOP_K most salient AWQ_GROUP-column groups
    over every GPTQ matrix of > 65,536 elements below 8 bits, ranked together. Column saliency = input
    RMS (over every row the matrix saw in calibration) x mean |W[:, j]|; a group scores its columns' sum."""
    found = []
    for name, p in state.items():
        spec = quant_spec(name, p, h)
        if name in stats and spec and spec[1] and spec[0] < 8 and p.numel() > 65_536 and not (h.embed_bits_tiers and name == "tok_emb.weight"):
            rms = (stats[name].diagonal().float() / stats[name + ".rows"].float()).sqrt()
            sal = rms.to(p.device) * p.float().abs().mean(0)
            score = F.pad(sal, (0, -sal.numel() % AWQ_GROUP)).reshape(-1, AWQ_GROUP).sum(1)
            found += [(v, name, i * AWQ_GROUP) for i, v in enumerate(score.tolist())]
    out: dict[str, list[int]] = {}
    for _, name, a in sorted(found, key=lambda t: -t[0])[: h.awq_top_k]:  # stable: ties keep state order
        out.setdefault(name, []).append(a)
    return {k: sorted(v) for k, v in out.items()}


def gptq_quantize(w: Tensor, hess: Tensor, bits, clip_sigmas, block: int = 128, keep: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """GPTQ (act-order, 1% damping, Cholesky of H^-1, 128-column blocks) with fixed SDClip scales.

    Each column is rounded, and its error, weighted by the inverse Hessian, is pushed onto the
    columns not yet quantized so that ||WX - QX|| (not ||W - Q||) is minimised. bits and
    clip_sigmas may be per-row tensors (embedding bit tiers). keep: first columns of AWQ-lite
    groups rounded on the int8 grid (awq_scales) inside the same pass.
    """
    r = qmax_rows(bits, w.device)[:, 0]
    scales = sdclip_scales(w, bits, clip_sigmas)
    s = scales.float()
    H = hess.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(0.01 * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H[perm][:, perm])), upper=True).float()
    W = w.float()[:, perm].clone()
    W[:, dead[perm]] = 0.0
    Q = torch.zeros_like(W)
    hi = [any(a <= c < a + AWQ_GROUP for a in keep) for c in perm.tolist()] if keep else None
    if hi:
        s8, r8 = awq_scales(scales, bits).float(), float(qmax(8))
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        err = torch.zeros(W.size(0), i2 - i1, device=W.device)
        for j in range(i1, i2):
            sj, rj = (s8, r8) if hi and hi[j] else (s, r)
            Q[:, j] = torch.clamp(torch.round(W[:, j] / sj), -rj, rj)
            err[:, j - i1] = (W[:, j] - Q[:, j] * sj) / U[j, j]
            W[:, j + 1 : i2] -= err[:, j - i1 : j - i1 + 1] * U[j, j + 1 : i2]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8), scales


@torch.no_grad()
def collect_hessians(model: GPT, batches, h: Hyperparameters) -> dict[str, Tensor]:
    """H = sum X^T X of each quantized matrix's input over calibration batches (training data only).

    The tied embedding acts as the output head, so its X is the head input (final-norm output);
    an untied embedding is a lookup (diagonal H: GPTQ = RTN) and gets none. Looped layers see every
    pass. Divided by the batch count; only the damping sees the scale. With EMBED_BITS_TIERS it also
    holds the embedding's per-row token counts ("tok_emb.weight.freq") and, for damage ranking, the
    per-row norms of the next-token loss gradient ("tok_emb.weight.gnorm").
    """
    hess: dict[str, Tensor] = {}
    damage = bool(h.embed_bits_tiers) and h.embed_tier_rank == "damage"

    def add(name: str, x: Tensor):
        x = x.detach().flatten(0, -2).float()
        hess[name] = hess.get(name, 0) + x.T @ x
        if h.awq_lite:  # rows seen (looped layers see every pass): AWQ-lite's input RMS is diag(H) / rows
            hess[name + ".rows"] = hess.get(name + ".rows", 0) + torch.tensor(float(x.size(0)), device=x.device)

    hooks = [mod.register_forward_pre_hook(lambda m, a, n=f"{name}.weight": add(n, a[0]))
             for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and quant_spec(f"{name}.weight", mod.weight, h)]
    n = 0
    try:
        for x in batches:
            with autocast_ctx(x.device), torch.set_grad_enabled(damage):
                hid = model.hidden(x)
                if h.head_kind == "tied":
                    add("tok_emb.weight", hid)
                if h.head_kind != "tied" or damage:  # runs the head's hooks
                    z = model.head_logits(hid)
                if damage:
                    F.cross_entropy(z[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
            if h.embed_bits_tiers:
                hess["tok_emb.weight.freq"] = hess.get("tok_emb.weight.freq", 0) + torch.bincount(x.flatten(), minlength=h.vocab_size).float()
            if damage:
                hess["tok_emb.weight.gnorm"] = hess.get("tok_emb.weight.gnorm", 0) + model.tok_emb.weight.grad.float().norm(dim=1)
                model.zero_grad(set_to_none=True)
            n += 1
    finally:
        for hook in hooks:
            hook.remove()
    return {k: v / n for k, v in hess.items()}


def quantize_asym(x: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor]:
    """Codes in [-2^(b-1), 2^(b-1)-1] with one fp16 step max|g|/(2^(b-1)-1/2) per `group` consecutive
    values: int2 codes are {-2,-1,0,1} at step max/1.5 (LQER factors, PR #1855)."""
    g = x.float().reshape(-1, group)
    s = (g.abs().amax(1) / (2 ** (bits - 1) - 0.5)).clamp(torch.finfo(torch.float16).tiny).half()
    q = torch.clamp(torch.round(g / s.float()[:, None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.to(torch.int8).reshape(x.shape), s


def dequantize_asym(q: Tensor, s: Tensor) -> Tensor:
    return (q.float().reshape(s.numel(), -1) * s.float()[:, None]).reshape(q.shape)


def lqer_factors(err: Tensor, h: Hyperparameters) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LQER: rank-r truncated SVD of the quantization error E ~ (U S)(V^T) = A B; A with one scale,
    B in groups of LQER_GROUP (one group per row of B when its size does not divide)."""
    U, S, Vh = torch.linalg.svd(err.float(), full_matrices=False)
    r = min(h.lqer_rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    qa, sa = quantize_asym(A, h.lqer_a_bits, A.numel())
    qb, sb = quantize_asym(B, h.lqer_b_bits, h.lqer_group if B.numel() % h.lqer_group == 0 else B.size(1))
    return qa, sa, qb, sb


def dequantize_int(tensors: dict[str, Tensor], name: str, m: dict) -> Tensor:
    """Codes x row steps; AWQ-lite columns on their int8 steps; plus the LQER term A B if stored."""
    q, s = tensors[name + ".q"], tensors[name + ".scale"]
    w = dequantize(q, s)
    for a in m.get("awq", ()):
        w[:, a : a + AWQ_GROUP] = dequantize(q[:, a : a + AWQ_GROUP], awq_scales(s, m["bits"]))
    if name + ".lqa" in tensors:
        w += dequantize_asym(tensors[name + ".lqa"], tensors[name + ".lqa_s"]) @ dequantize_asym(tensors[name + ".lqb"], tensors[name + ".lqb_s"])
    return w


def quantize_state(model: GPT, h: Hyperparameters, hessians: dict[str, Tensor] | None, mult: float = 1.0) -> tuple[dict, dict]:
    """State dict -> (tensors, meta) for the artifact; GPTQ where a Hessian is given, else RTN.

    A sparse embedding (EMBED_SPARSITY) is stored as a row-major bitmap of its nonzeros plus their
    fp16 values; a tiered one (EMBED_BITS_TIERS) stores its per-row bit widths beside the codes.
    AWQ-lite marks its int8 column groups in the meta; LQER adds factors <name>.lqa/.lqb (+ _s steps)
    to the LQER_TOP_N tensors with the largest ||W - Q s||_F. mult scales the SDClip k of the block
    matrices (FIT_ARTIFACT); the tied embedding, read at both ends of the model, keeps its k.
    """
    tensors, meta, stats, errs = {}, {}, hessians or {}, {}
    awq = awq_groups(model.state_dict(), stats, h) if h.awq_lite and stats else {}
    for name, p in model.state_dict().items():
        p, dtype = p.detach(), str(p.dtype).removeprefix("torch.")
        if name == "tok_emb.weight" and h.embed_sparsity > 0:
            mask = (p != 0).cpu()
            tensors[name + ".mask"] = torch.from_numpy(np.packbits(mask.numpy(), axis=1))
            tensors[name + ".values"] = p.cpu()[mask].half()
            meta[name] = dict(kind="sparse", cols=p.size(1), dtype=dtype, sparsity=1 - mask.sum().item() / mask.numel())
            continue
        spec = quant_spec(name, p, h)
        if spec is None:
            tensors[name] = p.half().cpu()
            meta[name] = dict(kind="fp16", dtype=dtype)
            continue
        bits, clip = spec
        if clip and param_group(name, p) == "muon":
            clip *= mult
        if name == "tok_emb.weight" and h.embed_bits_tiers:
            bits, clip = (t.to(p.device) for t in embed_row_tiers(h, stats))
            tensors[name + ".bits"] = bits.to(torch.int8).cpu()
        keep = None
        if not isinstance(clip, Tensor) and not clip:  # gate rows (tiered embeddings carry per-row clip tensors)
            s = (p.float().abs().amax(1) / qmax(bits)).clamp(torch.finfo(torch.float16).tiny).half()
            q = quantize_rtn(p, s, bits)
        elif name in stats:
            keep = awq.get(name)
            q, s = gptq_quantize(p, stats[name], bits, clip, keep=keep)
        else:
            s = sdclip_scales(p, bits, clip)
            q = quantize_rtn(p, s, bits)
        tensors[name + ".q"], tensors[name + ".scale"] = q.cpu(), s.cpu()
        meta[name] = dict(kind="int", bits=int(torch.as_tensor(bits).max()), dtype=dtype)
        if keep is not None:
            meta[name]["awq"] = keep
        if h.lqer_top_n and (isinstance(clip, Tensor) or clip):  # not the gate rows
            errs[name] = p.detach().float().cpu() - dequantize_int(tensors, name, meta[name])
    for name in sorted(errs, key=lambda n: -float(torch.linalg.norm(errs[n])))[: h.lqer_top_n]:
        for key, t in zip((".lqa", ".lqa_s", ".lqb", ".lqb_s"), lqer_factors(errs[name], h)):
            tensors[name + key] = t
    return tensors, meta


def dequantize_state(tensors: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    out = {}
    for name, m in meta.items():
        if name + {"int": ".q", "sparse": ".mask"}.get(m["kind"], "") not in tensors:
            raise ValueError(f"tensor {name} listed in the metadata is missing")
        if m["kind"] == "sparse":
            mask = torch.from_numpy(np.unpackbits(tensors[name + ".mask"].numpy(), axis=1, count=m["cols"]).astype(bool))
            t = torch.zeros(mask.shape).masked_scatter_(mask, tensors[name + ".values"].float())
        else:
            t = dequantize_int(tensors, name, m) if m["kind"] == "int" else tensors[name]
        out[name] = t.to(_DTYPES[m["dtype"]])
    return out


def quant_report(tensors: dict[str, Tensor], meta: dict, h: Hyperparameters) -> list[str]:
    """Log lines: stored (pre-compression) bytes per top-level module, and the embedding's
    effective sparsity or bit tiers as stored."""
    groups: dict[str, int] = {}
    for name, t in tensors.items():
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + t.numel() * t.element_size()
    lines = ["stored_bytes " + " ".join(f"{k}:{v}" for k, v in groups.items())]
    m = meta.get("tok_emb.weight", {})
    if m.get("kind") == "sparse":
        lines.append(f"embed_sparsity target:{h.embed_sparsity} effective:{m['sparsity']:.6f} "
                     f"kept_per_row:{round((1 - h.embed_sparsity) * m['cols'])} values:{tensors['tok_emb.weight.values'].numel()}")
    lqer = [n[: -len(".lqa")] for n in tensors if n.endswith(".lqa")]
    if lqer:
        lines.append(f"lqer rank:{h.lqer_rank} a_bits:{h.lqer_a_bits} b_bits:{h.lqer_b_bits} tensors:{','.join(lqer)}")
    if any("awq" in m for m in meta.values()):
        lines.append("awq_lite groups:" + ",".join(f"{n}:{a}" for n, m in meta.items() for a in m.get("awq", ())) + f" size:{AWQ_GROUP}")
    if "tok_emb.weight.bits" in tensors:
        b = tensors["tok_emb.weight.bits"].long()
        lines.append(f"embed_tiers spec:{h.embed_bits_tiers} rank:{h.embed_tier_rank} rows_by_bits:"
                     + ",".join(f"{k}:{int((b == k).sum())}" for k in sorted(set(b.tolist()), reverse=True)))
    return lines


def serialize_tensors(tensors: dict[str, Tensor], meta: dict) -> bytes:
    """PGQ1 | uint32 header length | JSON header (names, dtypes, shapes, offsets, meta) | raw bytes."""
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries.append(dict(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), offset=offset, nbytes=len(raw)))
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps(dict(tensors=entries, meta=meta, body_nbytes=offset), separators=(",", ":")).encode()
    return ARTIFACT_MAGIC + len(header).to_bytes(4, "little") + header + b"".join(chunks)


def deserialize_tensors(data: bytes) -> tuple[dict[str, Tensor], dict]:
    """Inverse of serialize_tensors; any inconsistency raises ValueError (never executes code)."""
    if data[:4] != ARTIFACT_MAGIC:
        raise ValueError("not a PGQ1 artifact (bad magic)")
    n = int.from_bytes(data[4:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
        body = memoryview(data)[8 + n :]
        if len(body) != header["body_nbytes"]:
            raise ValueError(f"truncated or padded: body has {len(body)} bytes, header says {header['body_nbytes']}")
        if not isinstance(header["meta"], dict):
            raise ValueError("meta is not an object")
        tensors = {}
        for e in header["tensors"]:
            dtype = _DTYPES[e["dtype"]]
            if not all(type(x) is int and x >= 0 for x in e["shape"]) or type(e["offset"]) is not int or e["offset"] < 0:
                raise ValueError(f"tensor {e['name']}: shape {e['shape']} or offset {e['offset']} is not valid")
            raw = bytearray(body[e["offset"] : e["offset"] + e["nbytes"]])
            if len(raw) != e["nbytes"] or e["nbytes"] != math.prod(e["shape"]) * dtype.itemsize:
                raise ValueError(f"tensor {e['name']}: {len(raw)} bytes do not match shape {e['shape']} {e['dtype']}")
            tensors[e["name"]] = torch.frombuffer(raw, dtype=dtype).reshape(e["shape"]) if raw else torch.zeros(e["shape"], dtype=dtype)
        return tensors, header["meta"]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt header ({type(e).__name__}: {e})") from None


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """Group byte lanes (e.g. the low and high bytes of fp16) so the compressor sees runs of alike bytes."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(arr[i::stride].tobytes() for i in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    if data[:4] != SHUFFLE_MAGIC:
        return data
    stride, payload = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    out, pos = np.empty_like(payload), 0
    for i in range(stride):
        lane = out[i::stride]
        lane[:] = payload[pos : pos + lane.size]
        pos += lane.size
    return out.tobytes()


def _brotli():
    try:
        import brotli
    except ImportError:
        raise ConfigError("brotli is not installed; pip install brotli") from None
    return brotli


def compress_artifact(data: bytes) -> bytes:
    return _brotli().compress(byte_shuffle(data), quality=11)


# COMPRESSOR=pergroup (the record's layout, pip codecs instead of lrzip): the int8 code matrices of each
# role (the name without its block index) form one stream, optionally row-reordered; everything else
# (steps, fp16 tensors, LQER factors, meta and the stream manifest) is one byte-shuffled stream.
# Each stream takes the smallest of the codecs installed. Container: PGC1 | u8 n | n x (u8 codec id,
# u32 length, u32 crc32 of the decoded stream) | streams, the rest stream first.
PERGROUP_MAGIC = b"PGC1"
CODECS = ("brotli", "lzma", "zstd")  # ids are positions; zstd (pip zstandard) is optional


def codec_fns(name: str):
    """(compress, decompress, error type) of a codec, or None when its package is not installed."""
    import lzma

    if name == "brotli":
        b = _brotli()
        return (lambda d: b.compress(d, quality=11, lgwin=24)), b.decompress, b.error
    if name == "lzma":
        f = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        return (lambda d: lzma.compress(d, format=lzma.FORMAT_RAW, filters=f)), \
            (lambda d: lzma.decompress(d, format=lzma.FORMAT_RAW, filters=f)), lzma.LZMAError
    try:
        import zstandard
    except ImportError:
        return None
    return (lambda d: zstandard.ZstdCompressor(level=22).compress(d)), \
        (lambda d: zstandard.ZstdDecompressor().decompress(d)), zstandard.ZstdError


def smallest_stream(data: bytes) -> tuple[int, bytes, int]:
    """(codec id, bytes, crc32 of data) of the smallest encoding among the installed codecs."""
    import zlib

    outs = [(len(c), i, c) for i, fns in enumerate(map(codec_fns, CODECS)) if fns for c in [fns[0](data)]]
    return min(outs)[1:] + (zlib.crc32(data),)


def l1_chain(q: Tensor) -> Tensor:
    """Greedy nearest-neighbour row order: start at row 0, then always the unused row closest in L1."""
    x, left, order = q.numpy().astype(np.int16), np.arange(1, q.size(0)), [0]
    while left.size:
        k = int(np.abs(x[left] - x[order[-1]]).sum(1).argmin())
        order.append(int(left[k]))
        left = np.delete(left, k)
    return torch.tensor(order, dtype=torch.int16 if q.size(0) < 2**15 else torch.int32)


def tensor_role(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" and parts[1].isdigit() else name


def encode_pergroup(tensors: dict[str, Tensor], meta: dict, reorder: bool) -> bytes:
    groups: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if name.endswith(".q") and t.dtype == torch.int8 and t.ndim == 2:
            groups.setdefault(tensor_role(name), []).append(name)
    rest = {n: t for n, t in tensors.items() if not any(n in g for g in groups.values())}
    streams, manifest = [], []
    for names in groups.values():
        parts = []
        for n in names:
            t = tensors[n]
            if reorder:
                rest[n + ".perm"] = perm = l1_chain(t)
                t = t[perm.long()]
            parts.append(t.T.contiguous().numpy().tobytes())  # column-major, as the record stores codes
        streams.append(smallest_stream(b"".join(parts)))
        manifest.append([[n, list(tensors[n].shape)] for n in names])
    head = smallest_stream(byte_shuffle(serialize_tensors(rest, dict(meta, _streams=manifest))))
    streams = [head] + streams
    return PERGROUP_MAGIC + bytes([len(streams)]) + b"".join(bytes([c]) + len(d).to_bytes(4, "little") + crc.to_bytes(4, "little")
                                                             for c, d, crc in streams) + b"".join(d for _, d, _ in streams)


def _unstream(cid: int, data: bytes) -> bytes:
    if cid >= len(CODECS):
        raise ValueError(f"unknown codec id {cid}")
    fns = codec_fns(CODECS[cid])
    if fns is None:
        raise ConfigError(f"the artifact has a {CODECS[cid]} stream but its package is missing; pip install zstandard")
    try:
        return fns[1](data)
    except fns[2]:
        raise ValueError(f"{CODECS[cid]} stream invalid (truncated or corrupted)") from None


def decode_pergroup(blob: bytes) -> tuple[dict[str, Tensor], dict]:
    import zlib

    n = blob[4] if len(blob) > 4 else 0
    pos = 5 + 9 * n
    u32 = lambda i: int.from_bytes(blob[i : i + 4], "little")  # noqa: E731
    table = [(blob[5 + 9 * i], u32(6 + 9 * i), u32(10 + 9 * i)) for i in range(n)] if len(blob) >= pos else []
    if n == 0 or not table or len(blob) != pos + sum(size for _, size, _ in table):
        raise ValueError("pergroup container truncated or padded")
    datas = []
    for cid, size, crc in table:
        datas.append(_unstream(cid, blob[pos : pos + size]))
        if zlib.crc32(datas[-1]) != crc:
            raise ValueError(f"{CODECS[cid]} stream corrupted (crc32 mismatch)")
        pos += size
    tensors, meta = deserialize_tensors(byte_unshuffle(datas[0]))
    manifest = meta.pop("_streams", None)
    if not isinstance(manifest, list) or len(manifest) != n - 1:
        raise ValueError("pergroup manifest does not match the streams")
    try:
        for entries, data in zip(manifest, datas[1:]):
            buf, off = np.frombuffer(data, dtype=np.int8), 0
            for name, (rows, cols) in entries:
                t = torch.from_numpy(buf[off : off + rows * cols].reshape(cols, rows).T.copy())
                off += rows * cols
                perm = tensors.pop(name + ".perm", None)
                if perm is not None:
                    t[perm.long()] = t.clone()
                tensors[name] = t
            if off != buf.size:
                raise ValueError("a code stream is longer than its tensors")
    except (TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"pergroup stream does not match its manifest ({type(e).__name__}: {e})") from None
    return tensors, meta


def encode_artifact(tensors: dict[str, Tensor], meta: dict, h: Hyperparameters) -> bytes:
    if h.compressor == "pergroup":
        return encode_pergroup(tensors, meta, h.row_reorder)
    return compress_artifact(serialize_tensors(tensors, meta))


def decode_artifact(blob: bytes) -> tuple[dict[str, Tensor], dict]:
    """Either container back to (tensors, meta); corrupt input raises ValueError."""
    if blob[:4] == PERGROUP_MAGIC:
        return decode_pergroup(blob)
    return deserialize_tensors(decompress_artifact(blob))


def decompress_artifact(blob: bytes) -> bytes:
    brotli = _brotli()
    try:
        return byte_unshuffle(brotli.decompress(blob))
    except brotli.error:
        raise ValueError("brotli stream invalid (truncated or corrupted)") from None


# Shapes an artifact must agree on with the model it is loaded into; stored only where they differ
# from the defaults (a missing key reads as the default).
SHAPE_KEYS = ("vocab_size", "num_layers", "model_dim", "embedding_dim", "num_heads", "num_kv_heads", "mlp_mult",
              "skip_gates_enabled", "loop_start", "loop_end", "num_loops", "parallel_residual_start",
              "resid_mix_enabled", "num_extra_embeds", "embed_rotation_rank", "head_kind", "head_rank", "head_experts",
              "smear_gate", "attn_gate", "gate_window", "sparse_attn_gate_scale", "asym_softcap")
# Knobs that change the forward pass but no shape: another value would score silently, so they are stored too.
FORWARD_KEYS = ("rope_dims", "rope_base", "xsa_last_n", "logit_softcap", "ln_scale", "doc_mask")
_DEFAULTS = {f.name: f.default for f in fields(Hyperparameters)}


def payload_checksum(tensors: dict[str, Tensor], meta: dict) -> str:
    """sha256 prefix of the metadata and every tensor's name, dtype, shape and bytes."""
    sha = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        sha.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def env_value(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def write_artifact(path: str, tensors: dict, meta: dict, h: Hyperparameters, looping: bool) -> int:
    return save_artifact_bytes(path, artifact_blob(tensors, meta, h, looping))


def artifact_blob(tensors: dict, meta: dict, h: Hyperparameters, looping: bool) -> bytes:
    """The artifact's bytes. Besides the shape and forward knobs it records every knob of its run (the code
    that decodes it is packed for them) and the tokenizer's sha256 (another tokenizer would score silently)."""
    config = {k: getattr(h, k) for k in SHAPE_KEYS + FORWARD_KEYS if getattr(h, k) != _DEFAULTS[k]}
    info = dict(state=meta, config=config, looping=looping, knobs=run_knobs(h), tokenizer=tokenizer_sha256(h))
    info["checksum"] = payload_checksum(tensors, info)
    return encode_artifact(tensors, info, h)


def run_knobs(h: Hyperparameters) -> dict:
    return {k: v for k, v in dataclasses.asdict(h).items() if k not in FREE_KNOBS and v != _DEFAULTS[k]}


def tokenizer_sha256(h: Hyperparameters) -> str:
    return file_sha256(h.tokenizer_file) if os.path.isfile(h.tokenizer_file) else ""


def save_artifact_bytes(path: str, blob: bytes) -> int:
    """Write via path.tmp + rename; on failure (disk full, file too large) keep the bytes in the temp dir."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(blob)
        os.replace(path + ".tmp", path)
        return os.path.getsize(path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        try:
            fd, kept = tempfile.mkstemp(suffix=".ptz", prefix=Path(path).stem + "_")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            where = f"the artifact was saved to {kept} instead; score it with EVAL_ARTIFACT={kept}"
        except OSError:
            where = "the temp dir had no room for it either, so the trained weights are lost"
        raise TrainingError(f"cannot write artifact {path} ({e.strerror or e}); {where}") from None


def load_artifact(path: str, h: Hyperparameters, info: dict | None = None) -> tuple[dict[str, Tensor], bool]:
    """Read, decompress and dequantize an artifact: (state dict for a model built from h, looping).
    info, when given, receives the artifact's metadata and the sha256 of the bytes read."""
    if not os.path.isfile(path) or os.path.getsize(path) > ARTIFACT_MAX_BYTES:  # a FIFO or /dev/zero never ends
        raise ConfigError(f"artifact {path} is not a regular file of at most {ARTIFACT_MAX_BYTES} bytes; "
                          f"set EVAL_ARTIFACT to a .ptz file written by train_gpt.py")
    try:
        blob = Path(path).read_bytes()
        tensors, meta = decode_artifact(blob)
    except OSError as e:
        raise ConfigError(f"cannot read artifact {path}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"corrupt artifact {path}: {e}") from None
    if not {"config", "state", "looping", "checksum"} <= meta.keys():
        raise ConfigError(f"corrupt artifact {path}: metadata lacks config/state/looping/checksum")
    checksum = meta.pop("checksum")
    if payload_checksum(tensors, meta) != checksum:
        raise ConfigError(f"corrupt artifact {path}: payload checksum mismatch (the file was altered after it was written)")
    for k in SHAPE_KEYS + FORWARD_KEYS:
        v = meta["config"].get(k, _DEFAULTS[k])
        if getattr(h, k) != v:
            raise ConfigError(f"artifact {path} was made with {k.upper()}={env_value(v)} but this run has "
                              f"{k.upper()}={env_value(getattr(h, k))}; set {k.upper()}={env_value(v)}")
    if meta.get("tokenizer", "") != tokenizer_sha256(h):
        raise ConfigError(f"artifact {path} was trained with another tokenizer (sha256 {meta.get('tokenizer', '')[:12] or 'none'}) "
                          f"than {h.tokenizer_file}; set TOKENIZER_PATH and DATA_PATH to the ones it was trained on")
    if info is not None:
        info.update(meta, sha256=hashlib.sha256(blob).hexdigest(), nbytes=len(blob))
    return dequantize_state(tensors, meta["state"]), bool(meta["looping"])


def code_config(h: Hyperparameters, knobs: dict) -> Hyperparameters:
    """The config the counted code is packed for: the artifact's knobs up to the evaluation ones, this run's
    from there (an eval-only run counts the code that can decode its artifact and run its evals)."""
    names = [f.name for f in fields(h)]
    train = names[: names.index("eval_seq_len")]
    return dataclasses.replace(h, **{k: knobs.get(k, _DEFAULTS[k]) for k in train if k not in FREE_KNOBS})


PINNED = None  # the shipped file: {knob: value} of its config where that is not the default
# The knobs a shipped file still takes from the environment (where things are, which run, compile):
# it runs every other knob at its packed value and refuses any other (Hyperparameters.validate).
FREE_KNOBS = ("run_id", "seed", "data_dir", "caseops", "data_path", "tokenizer_path", "log_dir", "artifact_path", "eval_artifact",
              "eval_nll_dir", "compile", "sdpa_fallback")


def counted_code_bytes(h: Hyperparameters, log=print) -> tuple[int, bool]:
    """The code size the artifact counts for config h, and whether it is the packed size (code_packed).
    A shipped file (PINNED set) is the packed wrapper itself; the readable file asks tools/."""
    if PINNED is not None:
        return os.path.getsize(__file__), True
    return readable_code_bytes(h, log)


def readable_code_bytes(h: Hyperparameters, log=print) -> tuple[int, bool]:
    """The size tools/pack_code.py packs this file to for config h (True); in a folder without it (a lone
    copy), an estimate (False, logged as one): brotli-11 of the source less comments, blank lines and indentation."""
    import importlib.util

    src = Path(__file__).read_bytes()
    packer = Path(__file__).resolve().parent / "tools" / "pack_code.py"
    why = "tools/pack_code.py is not beside train_gpt.py; run from the repository"
    if packer.is_file():
        spec = importlib.util.spec_from_file_location("pack_code", packer)
        pack_code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pack_code)
        try:
            return len(pack_code.pack_source(src, h)), True
        except ImportError as e:  # python-minifier missing: the run goes on with the estimate
            why = f"tools/pack_code.py cannot run ({e})"
    log(f"code_size ESTIMATE: {why}; counted_code_bytes is brotli-11 of the source less comment lines, blank lines "
        f"and indentation (code_packed:0)")
    lines = [line.strip() for line in src.decode().splitlines()]
    return len(_brotli().compress("\n".join(x for x in lines if x and x[0] != "#").encode(), quality=11)), False


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
# val_bpb = sum(nll nats) / (ln 2 * sum(target bytes)); sums in float64, all-reduced across ranks.
# Target i is token i+1 of the validation stream. Every stage scores windows of EVAL_SEQ_LEN tokens:
# the first window scores all its targets, each later one (EVAL_STRIDE on) only its last EVAL_STRIDE,
# so every target is scored exactly once, from tokens of its own window up to itself.
# The plain eval is the case stride = EVAL_SEQ_LEN. TTT scores each chunk's windows
# before it trains on that chunk, so a score never depends on the token it scores or later ones.

EVAL_LIMIT_SECONDS = 600.0


class EvalResult(NamedTuple):
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int


def bpb_from_sums(nll_sum: float, n_tokens: int, n_bytes: int) -> EvalResult:
    return EvalResult(nll_sum / n_tokens, nll_sum / (math.log(2) * n_bytes), int(n_tokens), int(n_bytes))


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share of n items for this rank (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def autocast_ctx(device: torch.device):
    """bf16 autocast wherever the GPU paths run: every forward pass, training and eval alike (FA3 takes no fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda_path(device))


def window_starts(total: int, seq_len: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, ... kept while a window has targets past its seq_len-stride context."""
    return np.arange(0, max(total - (seq_len - stride), 1), stride, dtype=np.int64)


def first_scored(starts: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """Index of the first target each window scores."""
    return np.where(starts == 0, 0, starts + seq_len - stride)


def ttt_chunk_bounds(total: int, h: Hyperparameters) -> tuple[np.ndarray, np.ndarray]:
    """Window starts and, per chunk c, the window range [b[c], b[c+1]) whose first target is in c."""
    starts = window_starts(total, h.eval_seq_len, h.eval_stride)
    chunk = first_scored(starts, h.eval_seq_len, h.eval_stride) // h.ttt_chunk_tokens
    n_chunks = -(-total // h.ttt_chunk_tokens)
    return starts, np.searchsorted(chunk, np.arange(n_chunks + 1))


def eval_batch_windows(h: Hyperparameters, world_size: int) -> int:
    return max(h.val_batch_tokens // (world_size * h.eval_seq_len), 1)


# Token-only causal n-gram tilt (#2130/#2135).
# Target i's context is the NGRAM_ORDER-1 stream tokens ending at token i (its input), over the whole
# validation stream (no reset at documents). Its hint is the top next token among the earlier targets
# of the same context, if its share of them is >= NGRAM_THRESHOLD; the top changes only when another
# token's count strictly exceeds the top count (a tie keeps it), the rule of #2135's tables, counted
# exactly here. A hinted target is scored under p'(a) = p(a) e^{beta[a=h]} / Z, the model's
# distribution exactly renormalised; the hint depends on tokens <= i only and never enters a training loss.

NGRAM_MULTS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)  # odd 64-bit hash multipliers


def ngram_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """Hint per target of a token stream (ids < 2^16; -1: none), O(N log N) numpy. Positions sorted by
    a 64-bit hash of their context, then by position, group equal contexts (checked word by word: a
    collision retries with another multiplier); a stable sort by next token gives each pair's running
    count, a running max of it the top count, and the last position where it grew the top token."""
    tok = np.ascontiguousarray(tokens, dtype=np.uint64)
    n, k = tok.size - 1, order - 1
    out = np.full(max(n, 0), -1, dtype=np.int32)
    m = n - k + 1  # targets with a full context: context j is tokens j..j+k-1, its target token j+k
    if m < 2:
        return out
    pb = max((m - 1).bit_length(), 1)
    words, offs = tok, range(k)  # equality of contexts j, j' <=> words[j + o] == words[j' + o] for o in offs
    if k >= 4:  # four 16-bit ids a word
        words = tok[: n - 2] | tok[1 : n - 1] << np.uint64(16) | tok[2:n] << np.uint64(32) | tok[3:] << np.uint64(48)
        offs = sorted({*range(0, k - 4, 4), k - 4})
    for mult in NGRAM_MULTS:
        key = tok[:m].copy()
        for j in range(1, k):  # Horner: the high bits depend on every token of the context
            key *= np.uint64(mult)
            key += tok[j : j + m]
        v = key >> np.uint64(pb)
        v <<= np.uint64(pb)
        v |= np.arange(m, dtype=np.uint64)
        v.sort()  # by (high key bits, position) in one value sort
        dup = (v[1:] ^ v[:-1]) >> np.uint64(pb) == 0
        cand = np.r_[dup, False] | np.r_[False, dup]  # contexts whose high bits occur more than once
        pos = (v[cand] & np.uint64((1 << pb) - 1)).astype(np.int64)
        del v, dup, cand
        kc = key[pos]
        o = np.argsort(kc, kind="stable")  # by (full key, position)
        pos, kc = pos[o], kc[o]
        same = kc[1:] == kc[:-1]
        a, b = pos[:-1][same], pos[1:][same]
        if all(np.array_equal(words[a + j], words[b + j]) for j in offs):
            break
    else:
        raise RuntimeError("ngram_hints: context hash collisions with every multiplier")
    c = pos.size
    if c == 0:
        return out
    start = np.r_[True, ~same]
    gid = np.cumsum(start) - 1
    idx = np.arange(c)
    y = tok[pos + k].astype(np.int64)
    pk = gid << 16 | y
    o = np.argsort(pk, kind="stable")  # by (context, next token, position)
    pk = pk[o]
    run = np.maximum.accumulate(np.where(np.r_[True, pk[1:] != pk[:-1]], idx, 0))
    r = np.empty(c, dtype=np.int64)
    r[o] = idx - run + 1  # count of (context, next token) up to and including this position
    cm = np.maximum.accumulate(gid * (c + 1) + r) - gid * (c + 1)  # top count after this position
    prev = np.r_[0, cm[:-1]]
    prev[start] = 0
    last = np.maximum.accumulate(np.where(r > prev, idx, 0))  # where the top last changed hands
    q = np.flatnonzero(~start)  # lookups of a context seen before: the state after the previous member
    total = q - np.flatnonzero(start)[gid[q]]
    hit = q[cm[q - 1] / total >= threshold]
    out[pos[hit] + k - 1] = y[last[hit - 1]]
    return out


def hinted_nll(z: Tensor, targets: Tensor, hints: Tensor) -> tuple[Tensor, Tensor]:
    """-log p(target) and -log p(hint) from one log-softmax of the scores z [B,T,V]: cross_entropy's own
    two steps, so the first is bit for bit token_nll's without hints."""
    lp = F.log_softmax(z, dim=-1)
    return -lp.gather(-1, targets[..., None])[..., 0], -lp.gather(-1, hints.clamp_min(0)[..., None])[..., 0]


def tilted_nll(scorer, x: Tensor, y: Tensor, idx: Tensor, tilt) -> tuple[Tensor, Tensor]:
    """(NLL, tilted NLL, detached: it is never trained on) of targets y at stream positions idx."""
    hint = tilt[0][idx.clamp(0, tilt[0].numel() - 1)]
    nll, nlq = (t.float() for t in scorer(x, y, hints=hint))
    return nll, tilt_nll(nll.detach(), nlq.detach(), y, hint, tilt[1])


def tilt_nll(nll: Tensor, nlq: Tensor, y: Tensor, hint: Tensor, beta: float) -> Tensor:
    """-log p'(y), p'(a) = p(a) e^{beta [a = hint]} / (1 + q (e^beta - 1)) with q = p(hint) = e^{-nlq};
    nll where there is no hint (-1)."""
    t = nll - beta * (y == hint) + torch.log1p(torch.exp(-nlq) * math.expm1(beta))
    return torch.where(hint >= 0, t, nll)


def tilt_plan(h: Hyperparameters, tokens: Tensor, log=None) -> tuple[Tensor, float] | None:
    """(hint of every target of the stream on its device, beta), or None when NGRAM_TILT=0. Every rank
    computes the same hints from the whole stream; the caller counts the time as evaluation."""
    if not h.ngram_tilt:
        return None
    t0, tok = time.perf_counter(), tokens.cpu().numpy()
    hints = ngram_hints(tok, h.ngram_order, h.ngram_threshold)
    if log:
        log(f"ngram_tilt hinted:{int((hints >= 0).sum())} correct:{int((hints == tok[1:]).sum())} targets:{hints.size} "
            f"order:{h.ngram_order} threshold:{h.ngram_threshold} beta:{h.ngram_beta} precompute:{time.perf_counter() - t0:.1f}s")
    return torch.from_numpy(hints).to(tokens.device, torch.int64), h.ngram_beta


def score_nll(scorer, x: Tensor, y: Tensor, idx: Tensor, tilt) -> tuple[Tensor, Tensor]:
    """(NLL, scored NLL) of targets y at stream positions idx; they differ when tilt = (hints of the
    stream, beta) is given (tilted_nll)."""
    if tilt is not None:
        return tilted_nll(scorer, x, y, idx, tilt)
    nll = scorer(x, y).float()
    return nll, nll


@torch.no_grad()
def score_windows(scorer, tokens: Tensor, starts: Tensor, ctx: int, seq_len: int, per_batch: int,
                  luts, sums: Tensor, nll_out: Tensor | None, tilt=None) -> None:
    """Add the scored targets of these windows to sums (nll, tokens, bytes) and nll_out.

    Batches are padded to per_batch windows (one compiled shape); masks instead of boolean
    indexing keep the loop free of host-device syncs.
    """
    total = tokens.numel() - 1
    pos = torch.arange(seq_len, device=tokens.device)
    for b in range(0, starts.numel(), per_batch):
        ws = starts[b : b + per_batch]
        n = ws.numel()
        ws = F.pad(ws, (0, per_batch - n))
        idx = ws[:, None] + pos
        scored = (idx < total) & ((pos >= ctx) | (ws[:, None] == 0))
        scored[n:] = False
        idx = idx.clamp(max=total - 1)
        x, y = tokens[idx], tokens[idx + 1]
        with autocast_ctx(tokens.device):
            nll = torch.where(scored, score_nll(scorer, x, y, idx, tilt)[1], 0.0)
        sums[0] += nll.double().sum()
        sums[1] += scored.sum()
        sums[2] += torch.where(scored, target_bytes(x, y, luts, idx), 0).sum()
        if nll_out is not None:
            nll_out.scatter_add_(0, idx.flatten(), nll.flatten())


def finish_eval(sums: Tensor, nll_out: Tensor | None) -> tuple[EvalResult, Tensor | None]:
    all_reduce(sums)
    if nll_out is not None:
        all_reduce(nll_out)  # each target was scored on exactly one rank, zeros elsewhere
    return bpb_from_sums(sums[0].item(), int(sums[1].item()), int(sums[2].item())), nll_out


def eval_windows(h: Hyperparameters, scorer, d: Dist, tokens: Tensor, luts, stride: int,
                 collect: bool = False, tilt=None) -> tuple[EvalResult, Tensor | None]:
    """Sliding-window eval (stride = EVAL_SEQ_LEN: plain non-overlapping eval); windows split by rank.

    scorer(x, y) -> per-target NLL [B, T]; collect=True also returns every target's NLL in stream order.
    """
    T, total = h.eval_seq_len, tokens.numel() - 1
    starts = window_starts(total, T, stride)
    lo, hi = rank_range(len(starts), d.rank, d.world_size)
    starts = torch.from_numpy(starts[lo:hi]).to(tokens.device)
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    nll_out = torch.zeros(total, device=tokens.device) if collect else None
    luts = tuple(t.to(tokens.device) for t in luts)
    score_windows(scorer, tokens, starts, T - stride, T, eval_batch_windows(h, d.world_size), luts, sums, nll_out, tilt)
    return finish_eval(sums, nll_out)


def eval_val(h: Hyperparameters, model: nn.Module, d: Dist, val_tokens: Tensor, luts) -> EvalResult:
    """Plain eval: non-overlapping EVAL_SEQ_LEN windows."""
    return eval_windows(h, model.token_nll, d, val_tokens.to(d.device), luts, h.eval_seq_len)[0]


def prepare_ttt(model: GPT, h: Hyperparameters) -> None:
    """Freeze the first TTT_FREEZE_BLOCKS blocks; attach the zero-init hash embedding (identity until trained)."""
    for i, block in enumerate(model.blocks):
        block.requires_grad_(i >= h.ttt_freeze_blocks)
    if h.ttt_hash_embed:
        model.hash_embed = nn.Embedding(h.ttt_hash_buckets, h.model_dim_embed, device=model.tok_emb.weight.device)
        nn.init.zeros_(model.hash_embed.weight)


def ttt_step_shares(h: Hyperparameters, d: Dist) -> list[tuple[int, int, int]]:
    """(first seq, this rank's seqs, global seqs) of each SGD step over one chunk's sequences."""
    n_seq, out = h.ttt_chunk_tokens // h.eval_seq_len, []
    for s in range(0, n_seq, h.ttt_batch_seqs):
        n = min(h.ttt_batch_seqs, n_seq - s)
        a, b = rank_range(n, d.rank, d.world_size)
        out.append((s + a, b - a, n))
    return out


def cosine(c: int, n: int) -> float:
    """LR factor of chunk c of n: cosine from 1 at the first chunk to 0 at the last."""
    return 0.5 * (1 + math.cos(math.pi * c / max(n - 1, 1)))


def sgd_chunk(h: Hyperparameters, opt, params, loss_fn, d: Dist, tokens: Tensor, c: int, lr: float, clip: float,
              trace=None) -> None:
    """One pass of SGD steps over the sequences of chunk c (TTT_CHUNK_TOKENS from c * TTT_CHUNK_TOKENS),
    TTT_BATCH_SEQS a step split by rank: each step's loss is the global mean over its sequences, so
    any world size gives the same update."""
    T, C = h.eval_seq_len, h.ttt_chunk_tokens
    for g in opt.param_groups:
        g["lr"] = lr
    for first, n, n_global in ttt_step_shares(h, d):
        if n > 0:
            lo = c * C + first * T
            if trace is not None:
                trace.append(("sgd", lo, lo + n * T))
            seg = tokens[lo : lo + n * T + 1]
            with autocast_ctx(tokens.device):
                loss = loss_fn(seg[:-1].view(n, T), seg[1:].view(n, T))
            (loss * (n / n_global)).backward()
        reduce_grads(params, d.world_size, average=False)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def eval_ttt(h: Hyperparameters, model: GPT, scorer, loss_fn, d: Dist, tokens: Tensor, luts,
             collect: bool = False, log=None, tilt=None) -> tuple[EvalResult, Tensor | None]:
    """Score-first TTT: for each chunk, score its windows with the current weights, then (except
    for the last chunk) train on the chunk's tokens for TTT_EPOCHS with SGD, cosine LR over chunks.

    The loss of each step is the global mean over its sequences, so any world size gives the same
    update. Mutates the model: run it last.
    """
    T, total = h.eval_seq_len, tokens.numel() - 1
    starts_np, bounds = ttt_chunk_bounds(total, h)
    starts = torch.from_numpy(starts_np).to(tokens.device)
    n_chunks = len(bounds) - 1
    luts = tuple(t.to(tokens.device) for t in luts)
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    nll_out = torch.zeros(total, device=tokens.device) if collect else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    per_batch = eval_batch_windows(h, d.world_size)
    t0, log_every = time.perf_counter(), max(n_chunks // 10, 1)
    for c in range(n_chunks):
        lo, hi = rank_range(int(bounds[c + 1] - bounds[c]), d.rank, d.world_size)
        score_windows(scorer, tokens, starts[bounds[c] + lo : bounds[c] + hi], T - h.eval_stride, T,
                      per_batch, luts, sums, nll_out, tilt)
        if log is not None and ((c + 1) % log_every == 0 or c == n_chunks - 1):
            r = bpb_from_sums(*all_reduce(sums.clone()).tolist())
            log(f"ttt_progress chunk:{c + 1}/{n_chunks} val_bpb:{r.val_bpb:.6f} time:{time.perf_counter() - t0:.1f}s")
        if c == n_chunks - 1 or h.ttt_epochs == 0 or not params:
            continue
        for _ in range(h.ttt_epochs):
            sgd_chunk(h, opt, params, loss_fn, d, tokens, c, h.ttt_lr * cosine(c, n_chunks), h.ttt_grad_clip)
    return finish_eval(sums, nll_out)


def eval_callables(h: Hyperparameters, model: GPT, d: Dist):
    """(scorer, loss_fn): compiled on CUDA (the document layout built outside the graph, see
    doc_layout), the plain model methods elsewhere."""
    if h.compile and cuda_path(d.device):
        set_compile_limits()
        nll, loss = (torch.compile(f, dynamic=False, fullgraph=True) for f in (model.token_nll, model))
        return (lambda x, y, hints=None: nll(x, y, model.doc_layout(x), hints=hints)), (lambda x, y: loss(x, y, model.doc_layout(x)))
    return model.token_nll, model


def window_segments(bos: np.ndarray, T: int, stride: int, B: int) -> np.ndarray:
    """Segments (doc_layout's count) of every run of B consecutive eval windows (T tokens, this stride)
    over a stream's BOS flags: each full batch of a stage (any rank's, any TTT chunk's) is one of them.
    Overlapping windows share their documents, so no binomial model: the runs are counted."""
    total = bos.size - 1
    starts = window_starts(total, T, stride)
    cum = np.concatenate([[0], np.cumsum(bos)])
    rows = cum[np.minimum(starts + T, total)] - cum[starts + 1]  # BOS in x[1:T] of each window
    if rows.size < B:  # one batch, padded with window 0 (score_windows)
        return B + np.array([rows.sum() + (B - rows.size) * rows[0]])
    rc = np.concatenate([[0], np.cumsum(rows)])
    return B + rc[B:] - rc[:-B]


def eval_varlen_buckets(h: Hyperparameters, d: Dist, bos: np.ndarray) -> dict[int, range]:
    """Rows -> cu_seqlens buckets each compiled eval shape reaches on this validation stream: the scorer
    (plain and sliding windows; the document stages hold one segment a row) and the TTT loss rows."""
    T, B, out = h.eval_seq_len, eval_batch_windows(h, d.world_size), {}
    strides = [T] + [h.eval_stride] * (h.sliding_window_enabled or h.ttt_enabled)
    segs = np.concatenate([window_segments(bos, T, s, B) for s in strides] + [[B]] * h.doc_eval_enabled)
    out[B] = seg_buckets(segs.min(), segs.max())
    for n in ttt_loss_rows(h, d):  # chunk rows: consecutive, T apart
        segs = window_segments(bos, T, T, n)
        out.setdefault(n, seg_buckets(segs.min(), segs.max()))
    return out


def ttt_loss_rows(h: Hyperparameters, d: Dist) -> list[int]:
    """The row counts this rank's TTT loss sees (SGD steps of TTT and of the phased global SGD); none without them."""
    if not ((h.ttt_enabled and h.ttt_epochs > 0) or (h.lora_ttt_enabled and h.phased_num_phases > 0)):
        return []
    return sorted({n for _, n, _ in ttt_step_shares(h, d) if n > 0})


def eval_warmup(h: Hyperparameters, model: GPT, scorer, loss_fn, d: Dist, val_tokens: Tensor, log=None) -> float:
    """Compile every eval shape on random tokens (never validation data; its BOS positions only pick
    the cu_seqlens buckets the stages reach); no state is changed."""
    if not (h.compile and cuda_path(d.device)):
        return 0.0
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(h.seed)
    B = eval_batch_windows(h, d.world_size)
    ns = ttt_loss_rows(h, d)
    x, y = torch.randint(0, h.vocab_size, (2, max([B] + ns), h.eval_seq_len), generator=gen).to(d.device)  # TTT rows may outnumber B
    ks = eval_varlen_buckets(h, d, (val_tokens == BOS_ID).cpu().numpy()) if uses_varlen(h, d.device) else {}
    for n, r in sorted(ks.items()):
        if log:
            log(f"varlen_warmup shape:{n}x{h.eval_seq_len} buckets:{r.start}-{r.stop - 1} source:val")

    def shapes(n):
        return varlen_warmup_ids(x[:n], gen, ks[n]) if ks else [x[:n]]
    with torch.no_grad(), autocast_ctx(d.device):
        for xb in shapes(B):
            scorer(xb, y[:B])
            if h.ngram_tilt:  # the graph that also returns -log p(hint)
                scorer(xb, y[:B], hints=y[:B])
    if ns:
        for n in ns:
            for xb in shapes(n):
                with autocast_ctx(d.device):
                    loss_fn(xb, y[:n]).backward()
        model.zero_grad(set_to_none=True)
    if h.lora_ttt_enabled:
        grad = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # as the stage runs it: a graph guards on it
        lora_warmup(h, model, d, h.ngram_tilt)
        for p, g in zip(model.parameters(), grad):
            p.requires_grad_(g)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# Document-masked eval and per-document LoRA TTT (record #1855, built score-first).
# A document starts at a BOS (and at target 0): its targets are [start, next start), so its last
# target is the next document's BOS and every target belongs to exactly one document. Every window
# of these stages holds tokens of one document only, left-aligned in a [rows, EVAL_SEQ_LEN] batch
# (RoPE positions restart at 0 per window; q.k depends only on the offset, so this equals masked
# attention over a packed row). Inputs past a window's end are replaced by token 0, so nothing of
# another document ever enters a forward.

def doc_spans(tokens: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Target ranges [start, end) of the documents of a stream (target i predicts token i+1)."""
    total = tokens.numel() - 1
    bos = np.flatnonzero(tokens[:-1].cpu().numpy() == BOS_ID)
    starts = np.union1d([0], bos).astype(np.int64)
    return starts, np.append(starts[1:], total)


def doc_chunks(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks of `size` targets aligned to each document start: (document, first target, end)."""
    n = -(-(ends - starts) // size)
    doc = np.repeat(np.arange(len(starts)), n)
    j = np.arange(doc.size) - np.repeat(np.cumsum(n) - n, n)
    first = starts[doc] + j * size
    return doc, first, np.minimum(first + size, ends[doc])


def doc_windows(starts: np.ndarray, ends: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window start, first scored target, end) of the document-masked stages.

    stride = seq_len: plain, each window scores itself. Otherwise each `stride` chunk of a document
    is scored by the window of <= seq_len tokens ending at the chunk's nominal end first + stride
    (the LoRA stage's windows); chunks whose window starts at the document start share one window.
    The nominal end, not the document end, keeps a target's context free of where its document ends.
    """
    doc, first, end = doc_chunks(starts, ends, stride)
    if stride == seq_len:
        return first, first, end
    ws = np.maximum(starts[doc], first + stride - seq_len)
    at0 = ws == starts[doc]
    shared = at0 & np.append(at0[1:] & (doc[1:] == doc[:-1]), False)  # a later chunk of the doc shares it
    keep = ~shared
    first = np.where(at0, starts[doc], first)
    return ws[keep], first[keep], end[keep]


def window_batch(tokens: Tensor, ws: Tensor, first: Tensor, end: Tensor, seq_len: int):
    """Inputs, targets and scored mask [B, seq_len] of left-aligned one-document windows."""
    idx = ws[:, None] + torch.arange(seq_len, device=tokens.device)
    valid = idx < end[:, None]
    total = tokens.numel() - 1
    x = torch.where(valid, tokens[idx.clamp(max=total - 1)], 0)
    y = torch.where(valid, tokens[(idx + 1).clamp(max=total)], 0)
    return x, y, valid & (idx >= first[:, None]), idx


@torch.no_grad()
def score_doc_windows(scorer, tokens: Tensor, ws: Tensor, first: Tensor, end: Tensor, seq_len: int, per_batch: int,
                      luts, sums: Tensor, nll_out: Tensor | None, tilt=None) -> None:
    """score_windows for (start, first, end) windows; padded to per_batch rows (one compiled shape)."""
    for b in range(0, ws.numel(), per_batch):
        pad = lambda t: F.pad(t[b : b + per_batch], (0, per_batch - t[b : b + per_batch].numel()))  # noqa: E731
        x, y, scored, idx = window_batch(tokens, pad(ws), pad(first), pad(end), seq_len)
        with autocast_ctx(tokens.device):
            nll = score_nll(scorer, x, y, idx, tilt)[1]
        accumulate(nll, x, y, scored, idx, luts, sums, nll_out)


def accumulate(nll: Tensor, x: Tensor, y: Tensor, scored: Tensor, idx: Tensor, luts, sums: Tensor, nll_out) -> None:
    nll = torch.where(scored, nll.detach(), 0.0)
    sums[0] += nll.double().sum()
    sums[1] += scored.sum()
    sums[2] += torch.where(scored, target_bytes(x, y, luts, idx), 0).sum()
    if nll_out is not None:
        nll_out.scatter_add_(0, torch.where(scored, idx, 0).flatten(), nll.flatten())


def eval_doc_windows(h: Hyperparameters, scorer, d: Dist, tokens: Tensor, luts, stride: int,
                     collect: bool = False, tilt=None) -> tuple[EvalResult, Tensor | None]:
    """Document-masked eval: plain (stride = EVAL_SEQ_LEN) or sliding; windows split by rank."""
    T, total = h.eval_seq_len, tokens.numel() - 1
    plan = doc_windows(*doc_spans(tokens), T, stride)
    lo, hi = rank_range(len(plan[0]), d.rank, d.world_size)
    ws, first, end = (torch.from_numpy(a[lo:hi]).to(tokens.device) for a in plan)
    sums = torch.zeros(3, dtype=torch.float64, device=tokens.device)
    nll_out = torch.zeros(total, device=tokens.device) if collect else None
    luts = tuple(t.to(tokens.device) for t in luts)
    score_doc_windows(scorer, tokens, ws, first, end, T, eval_batch_windows(h, d.world_size), luts, sums, nll_out, tilt)
    return finish_eval(sums, nll_out)


def phase_bounds(h: Hyperparameters, n_docs: int) -> list[int]:
    """Document counts after which the global SGD runs: floor(N*(p+1)/P) of the first N documents.

    Never scaled to the number of documents (that would let the stream's end move a phase); a bound
    at or past the last document would come after every score and is dropped.
    """
    n, p = h.phased_prefix_docs, h.phased_num_phases
    return [b for b in (n * (k + 1) // p for k in range(p)) if 0 < b < n_docs]


# Packed LoRA steps. Each step scores the next chunk of every row in flight with the window of <= T
# tokens ending at the chunk's nominal end. The windows are packed first-fit into lanes of T positions:
# a window that starts at a BOS may follow another in a lane (the BOS starts its attention segment and
# stops SmearGate), one that starts inside its document opens a lane; RoPE positions restart at 0 in
# every window, so a window computes exactly what it computes alone. The adapters run as one grouped
# matmul over the packed tokens, and the head only on the scored positions. All bookkeeping comes from
# the document lengths on the host.

def short_chunks(spec: str) -> list[tuple[int, int]]:
    """LORA_SHORT_CHUNKS "256:8,2000:24" -> [(256, 8), (2000, 24)]."""
    return [tuple(int(v) for v in part.split(":")) for part in spec.split(",") if part.strip()]


def lora_chunk_ends(h: Hyperparameters, n: int) -> np.ndarray:
    """Nominal chunk ends, as offsets from a document's start, covering n targets: LORA_SHORT_CHUNKS
    sizes while a chunk starts below each limit, then LORA_CHUNK_TOKENS. By offset only, so a chunk never
    depends on where its document ends (#2014 picks a batch's size from its longest document)."""
    sched, out, o = short_chunks(h.lora_short_chunks), [], 0
    while o < n:
        o += next((c for lim, c in sched if o < lim), h.lora_chunk_tokens)
        out.append(o)
    return np.array(out or [h.lora_chunk_tokens], np.int64)


def lora_windows(starts: np.ndarray, ends: np.ndarray, cend: np.ndarray, T: int) -> tuple[np.ndarray, ...]:
    """(document, window start, first target, end) of every chunk of the LoRA stage (cend: lora_chunk_ends)."""
    cstart = np.r_[0, cend[:-1]]
    n = np.searchsorted(cstart, ends - starts, side="left")
    doc = np.repeat(np.arange(len(starts)), n)
    j = np.arange(doc.size) - np.repeat(np.cumsum(n) - n, n)
    nominal = starts[doc] + cend[j]
    return doc, np.maximum(starts[doc], nominal - T), starts[doc] + cstart[j], np.minimum(nominal, ends[doc])


def lora_queues(starts: np.ndarray, ends: np.ndarray, h: Hyperparameters, world: int) -> list[list[np.ndarray]]:
    """[rank][phase block] -> the documents that rank takes, in order. Blocks end at phase_bounds (stream
    order: no document's phase depends on a length). With LORA_WARM_START_A a row's A carries into its
    next document, so placement must not depend on lengths: round-robin in stream order. Without it a
    score depends only on the base and the document, so each block is dealt longest first to the rank
    with the least window work so far (LPT): the waits at the bounds and at the end shrink."""
    n = len(starts)
    doc, ws, _, end = lora_windows(starts, ends, lora_chunk_ends(h, int((ends - starts).max(initial=1))), h.eval_seq_len)
    work = np.bincount(doc, end - ws, minlength=n)
    out: list[list[np.ndarray]] = [[] for _ in range(world)]
    edges = [0, *phase_bounds(h, n), n]
    for lo, hi in zip(edges, edges[1:]):
        docs = np.arange(lo, hi)
        if h.lora_warm_start_a:
            own = [docs[docs % world == r] for r in range(world)]
        else:
            heap, own = [(0.0, r) for r in range(world)], [[] for _ in range(world)]
            for k in docs[np.argsort(-work[lo:hi], kind="stable")]:
                w, r = heapq.heappop(heap)
                own[r].append(k)
                heapq.heappush(heap, (w + work[k], r))
        for r in range(world):
            out[r].append(np.asarray(own[r], dtype=np.int64))
    return out


def lora_rows(starts: np.ndarray, ends: np.ndarray, docs: np.ndarray, R: int, cend: np.ndarray, T: int):
    """One rank's steps through one block: free rows (lowest first) take the next documents, then every
    row in flight scores its next chunk (cend: lora_chunk_ends). Yields (fresh rows, [(row, doc, window
    start, first, end, more)]), more: the document has later chunks."""
    row_doc, pos, j, qi, cend = [-1] * R, [0] * R, [0] * R, 0, cend.tolist()
    while True:
        fresh = []
        for r in range(R):
            if row_doc[r] < 0 and qi < len(docs):
                row_doc[r], pos[r], j[r] = int(docs[qi]), int(starts[docs[qi]]), 0
                fresh.append(r)
                qi += 1
        wins = []
        for r, k in enumerate(row_doc):
            if k >= 0:
                s = int(starts[k])
                nominal = s + cend[j[r]]
                end = min(nominal, int(ends[k]))
                wins.append((r, k, max(s, nominal - T), pos[r], end, end < ends[k]))
                pos[r], j[r] = end, j[r] + 1
                row_doc[r] = k if end < ends[k] else -1
        if not wins:
            return
        yield fresh, wins


def lane_bucket(n: int, cap: int) -> int:
    """Lanes of a step rounded up to 1, 2, 3, ... (each <= 25% above the last; at most cap): few shapes."""
    b = 1
    while b < n:
        b = max(b + 1, b * 5 // 4)
    return min(b, max(cap, n))


def pack_lanes(lengths: list[int], at_bos: list[bool], T: int) -> tuple[list[tuple[int, int]], int]:
    """(lane, offset) of each window and the lane count: first-fit decreasing into lanes of T; a window
    not starting at a BOS opens its own lane at offset 0."""
    place: list = [None] * len(lengths)
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (at_bos[i], -lengths[i])):
        j = next((j for j, f in enumerate(free) if f >= lengths[i]), len(free)) if at_bos[i] else len(free)
        if j == len(free):
            free.append(T)
        place[i] = (j, T - free[j])
        free[j] -= lengths[i]
    return place, len(free)


class LoraStep(NamedTuple):
    """Host index arrays of one packed step: W windows (scored rows padded to R), L lanes of T positions.
    Only the W rows in flight are gathered, trained and written back, so a step's cost follows them."""
    tok: np.ndarray  # [L, T] stream position of each input token, -1 = padding
    rope: np.ndarray  # [L, T] RoPE position: restarts at 0 in every window
    seq: np.ndarray  # [R] window of each adapter group, groups in packed order (padding: empty groups)
    offs: np.ndarray  # [R] int32 end of each group in the flattened lanes
    cu: np.ndarray  # int32 attention segment starts (lanes and windows), then L*T repeated: R + L + 1
    rows: np.ndarray  # [W] adapter row of each window
    head: np.ndarray  # [R] window of each scored row (padding: the last window)
    pos: np.ndarray  # [R, C] flattened lane position of each scored target (0 where masked)
    tgt: np.ndarray  # [R, C] stream index of each scored target (0 where masked)
    mask: np.ndarray  # [R, C] scored
    more: np.ndarray  # [W] bool: the window's document has later chunks (its row trains)


def lora_substeps(wins: list, at_bos: list[bool], T: int, max_lanes: int) -> list[tuple[list, tuple[list, int]]]:
    """The windows of one step in groups of at most max_lanes packed lanes, each run as its own forward,
    backward and AdamW: rows are independent, so the step computes the same, in bounded memory. Each
    group comes with its packing (pack_lanes' lanes renumbered from 0), for lora_step."""
    place, n = pack_lanes([w[4] - w[2] for w in wins], at_bos, T)
    out = []
    for g in range(0, n, max_lanes):
        mine = [i for i, (lane, _) in enumerate(place) if g <= lane < g + max_lanes]
        out.append(([wins[i] for i in mine], ([(place[i][0] - g, place[i][1]) for i in mine], min(max_lanes, n - g))))
    return out


def lora_step(wins: list, at_bos: list[bool] | None, R: int, C: int, T: int, packed: tuple[list, int] | None = None) -> LoraStep:
    """The arrays of one forward over wins, packed by pack_lanes (or as packed: lora_substeps' packing)."""
    place, n = packed or pack_lanes([w[4] - w[2] for w in wins], at_bos, T)
    L = lane_bucket(n, R)
    tok, rope = np.full((L, T), -1, np.int64), np.tile(np.arange(T), (L, 1))
    pos, tgt, mask = np.zeros((R, C), np.int64), np.zeros((R, C), np.int64), np.zeros((R, C), bool)
    W = len(wins)
    rows, more = np.zeros(W, np.int64), np.zeros(W, bool)
    flat = []
    for i in sorted(range(len(wins)), key=place.__getitem__):  # by lane and offset: padding continues its window
        (r, _, ws, first, end, mo), (lane, off) = wins[i], place[i]
        tok[lane, off : off + end - ws] = np.arange(ws, end)
        rope[lane, off:] = np.arange(T - off)
        n_sc = end - first
        pos[i, :n_sc] = lane * T + off + first - ws + np.arange(n_sc)
        tgt[i, :n_sc], mask[i, :n_sc], rows[i], more[i] = np.arange(first, end), True, r, mo
        flat.append((lane * T + off, i))  # in packed order already
    starts = [f for f, _ in flat]
    seq = np.array([i for _, i in flat] + [0] * (R - W), np.int64)
    offs = np.array(starts[1:] + [L * T] * (R - W + 1), np.int32)
    cu = np.union1d(starts, np.arange(L) * T)
    cu = np.concatenate([cu, np.full(R + L + 1 - cu.size, L * T)]).astype(np.int32)
    return LoraStep(tok, rope, seq, offs, cu, rows, np.minimum(np.arange(R), W - 1), pos, tgt, mask, more)


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [N, k] @ w[g] [k, n] for the rows of group g: rows offs[g-1]:offs[g] (torch._grouped_mm)."""
    return torch._grouped_mm(x, w, offs=offs)


class DocLoRA:
    """Per-document adapters, one row per document in flight: y += (x A^T) B^T * alpha/r per virtual
    layer slot and target, A [rows, r, in], B [rows, out, r]. Every row's A and B live in one flat
    [rows, P] tensor: a step gathers the rows in flight, trains the copy and writes it back, AdamW
    being a few whole-tensor ops. A starts from one seeded draw uniform(+-1/sqrt(in)), B at 0, so a
    fresh row's adapters are exactly the identity."""

    def __init__(self, h: Hyperparameters, model: GPT, rows: int, device: torch.device):
        self.h, self.scale, r = h, h.lora_alpha / h.lora_rank, h.lora_rank
        d, kv = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads)
        dims = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d), "head": (d, h.vocab_size)}
        sched = model.schedules[model.looping_active]
        n_slots = len(sched.encoder) + len(sched.decoder)
        self.sites = [(v, t) for v in range(n_slots) for t in h.lora_target_list if t != "head"]
        self.sites += [(-1, "head")] if "head" in h.lora_target_list else []
        self.shapes = [s for v, t in self.sites for s in ((r, dims[t][0]), (dims[t][1], r))]
        gen, init = torch.Generator().manual_seed(h.seed), []
        for (a_shape, b_shape) in zip(self.shapes[::2], self.shapes[1::2]):
            init += [((torch.rand(*a_shape, generator=gen) * 2 - 1) / math.sqrt(a_shape[1])).flatten(), torch.zeros(math.prod(b_shape))]
        self.init = torch.cat(init).to(device)
        self.is_a = torch.cat([torch.full((math.prod(s),), i % 2 == 0) for i, s in enumerate(self.shapes)]).to(device)
        self.p = self.init.expand(rows, -1).clone()
        self.m, self.v = torch.zeros_like(self.p), torch.zeros_like(self.p)
        self.steps = torch.zeros(rows, device=device)

    def tensors(self, p: Tensor) -> dict:
        """site -> (A, B): views of flat rows p (autograd sums their gradients into one tensor)."""
        ts = [t.view(-1, *s) for t, s in zip(p.split([math.prod(s) for s in self.shapes], 1), self.shapes)]
        return {site: (ts[2 * i], ts[2 * i + 1]) for i, site in enumerate(self.sites)}

    @torch.no_grad()
    def reset_rows(self, rows: Tensor, keep_a: bool) -> None:
        """A new document enters these rows: B = 0 and optimizer state 0; A back to the draw unless kept."""
        self.p[rows] = torch.where(self.is_a, self.p[rows], 0.0) if keep_a else self.init
        for t in (self.m, self.v):
            t[rows] = 0
        self.steps[rows] = 0

    def gather(self, rows: Tensor) -> Tensor:
        """The flat adapters of these rows, a fresh leaf for this step's forward and backward."""
        return self.p[rows].requires_grad_()

    @torch.no_grad()
    def step(self, rows: Tensor, p: Tensor, more: Tensor) -> None:
        """AdamW on gathered rows p (where more), each with its own step count, written back to its row."""
        f = adamw_rows
        if self.h.compile and cuda_path(p.device):  # one fused kernel; the row count is dynamic
            f = _LORA_GRAPHS["adamw"] = _LORA_GRAPHS.get("adamw") or torch.compile(adamw_rows, fullgraph=True)
            if rows.numel() > 1:
                for t in (rows, p, more):
                    torch._dynamo.mark_dynamic(t, 0)
        out = f(self.h, p, p.grad, self.m[rows], self.v[rows], self.steps[rows] + more, more)
        for t, new in zip((self.p, self.m, self.v, self.steps), out):
            t.index_copy_(0, rows, new)


def adamw_rows(h: Hyperparameters, p: Tensor, g: Tensor, m: Tensor, v: Tensor, steps: Tensor, more: Tensor):
    t, k = steps.clamp(min=1)[:, None], more[:, None]
    bc1, bc2 = 1 - h.lora_beta1 ** t, 1 - h.lora_beta2 ** t
    m = torch.where(k, h.lora_beta1 * m + (1 - h.lora_beta1) * g, m)
    v = torch.where(k, h.lora_beta2 * v + (1 - h.lora_beta2) * g * g, v)
    return torch.where(k, p * (1 - h.lora_lr * h.lora_wd) - (h.lora_lr / bc1) * m / ((v / bc2).sqrt() + h.lora_eps), p), m, v, steps


class PackedLoRA(NamedTuple):
    """DocLoRA.tensors() of the gathered rows, bound to one packed step: groups of tokens (seq, offs)
    and the window of each scored row (rows)."""
    ab: dict
    seq: Tensor
    offs: Tensor
    rows: Tensor
    scale: float

    def slot(self, v: int):
        def apply(target: str, x: Tensor, y: Tensor) -> Tensor:
            if (v, target) not in self.ab:
                return y
            a, b = self.ab[(v, target)]
            if v < 0:  # the head, on [windows, C] scored positions: one row's adapter per window
                a, b = a[self.rows].to(y.dtype), b[self.rows].to(y.dtype)
                return y + torch.bmm(torch.bmm(x.to(y.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * self.scale
            xa = grouped_mm(x.reshape(-1, x.size(-1)).to(y.dtype), a[self.seq].to(y.dtype).transpose(1, 2).contiguous(), self.offs)
            return y + (grouped_mm(xa, b[self.seq].to(y.dtype).transpose(1, 2).contiguous(), self.offs) * self.scale).view_as(y)
        return apply


def lora_nll(model: GPT, lora: DocLoRA, p: Tensor, ids: Tensor, docs, rope: Tensor, seq: Tensor, offs: Tensor,
             head: Tensor, pos: Tensor, y: Tensor, hints=None):
    """Per-target NLL [R, C] of one packed step with the gathered adapters p (with hints also
    -log p(hint), as token_nll)."""
    packed = PackedLoRA(lora.tensors(p), seq, offs, head, lora.scale)
    x = model.hidden(ids, docs, packed, rope)
    z = model.head_logits(x.flatten(0, 1)[pos], packed.slot(-1))
    if hints is not None:
        return hinted_nll(z, y, hints)
    return F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def spans(idx: Tensor, mask: Tensor) -> tuple[int, int]:
    """(first, end) of the targets a mask selects; they must be contiguous (tests' position spy)."""
    sel = idx[mask]
    assert sel.numel() and int(sel[-1]) - int(sel[0]) + 1 == sel.numel()
    return int(sel[0]), int(sel[-1]) + 1


def global_sgd(h: Hyperparameters, model: GPT, loss_fn, d: Dist, tokens: Tensor, n_targets: int, trace=None) -> int:
    """One epoch of full-model SGD on targets [0, n_targets): TTT_CHUNK_TOKENS chunks (a partial last
    chunk is skipped), cosine LR over the chunks, TTT_BATCH_SEQS sequences per step split by rank,
    gradients summed over ranks. Returns the number of chunks trained."""
    n_chunks = n_targets // h.ttt_chunk_tokens
    if n_chunks == 0 or h.phased_lr == 0:
        return 0
    model.requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=h.phased_lr, momentum=h.phased_momentum)
    for c in range(n_chunks):
        sgd_chunk(h, opt, params, loss_fn, d, tokens, c, h.phased_lr * cosine(c, n_chunks), h.phased_grad_clip, trace)
    model.requires_grad_(False)
    return n_chunks


def eval_lora_ttt(h: Hyperparameters, model: GPT, loss_fn, d: Dist, tokens: Tensor, luts,
                  collect: bool = False, log=None, trace=None, tilt=None) -> tuple[EvalResult, Tensor | None]:
    """Per-document LoRA TTT with phased global SGD; mutates the model.

    Each rank takes its documents of each phase block (lora_queues) into LORA_BATCH_DOCS rows and
    refills a row as soon as its document ends. Each step scores the next chunk of every row (packed,
    see lora_step), then takes one AdamW step per row on the mean NLL of exactly the targets it just
    scored (not after a document's last chunk). A document's targets therefore depend on its own
    earlier tokens, on the base weights and (LORA_WARM_START_A) on the A of earlier documents of its
    row: everything already scored. At each phase bound every rank has scored every document before
    it; all ranks then run global_sgd on those documents and restart the adapters.
    trace (tests): ("score"|"train"|"sgd", first target, end) of every row and SGD sequence.
    """
    T, C, R, total, dev = h.eval_seq_len, h.lora_chunk_tokens, h.lora_batch_docs, tokens.numel() - 1, tokens.device
    starts, ends = doc_spans(tokens)
    at_bos = tokens[:-1].cpu().numpy()[starts] == BOS_ID
    bounds = phase_bounds(h, len(starts))
    luts = tuple(t.to(dev) for t in luts)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    nll_out = torch.zeros(total, device=dev) if collect else None
    model.requires_grad_(False)
    fwd, varlen, cend = lora_forward(h, d), uses_varlen(h, dev), lora_chunk_ends(h, int((ends - starts).max()))
    work, t0, n_steps = np.zeros(3), time.perf_counter(), 0
    for phase, docs in enumerate(lora_queues(starts, ends, h, d.world_size)[d.rank]):
        if phase:  # every rank has scored every document before this bound
            n_tgt = int(starts[bounds[phase - 1]])
            chunks = global_sgd(h, model, loss_fn, d, tokens, n_tgt, trace)
            if log is not None:
                log(f"lora_ttt_phase {phase}/{len(bounds)} docs:{bounds[phase - 1]} targets:{n_tgt} "
                    f"sgd_chunks:{chunks} time:{time.perf_counter() - t0:.1f}s")
        lora = DocLoRA(h, model, R, dev)
        for k, (fresh, all_wins) in enumerate(lora_rows(starts, ends, docs, R, cend, T), 1):
            if fresh:
                lora.reset_rows(torch.tensor(fresh, device=dev), keep_a=h.lora_warm_start_a)
            bos = [w[2] == starts[w[1]] and at_bos[w[1]] for w in all_wins]
            for wins, packed in lora_substeps(all_wins, bos, T, h.lora_max_lanes):
                lora_substep(h, model, lora, fwd, tokens, lora_step(wins, None, R, C, T, packed), wins, starts, varlen, luts,
                             sums, nll_out, work, trace, tilt)
                n_steps += 1
            if log is not None and k % 500 == 0:
                r_ = bpb_from_sums(*sums.tolist())
                log(f"lora_ttt_progress block:{phase} rank0_steps:{k} val_bpb:{r_.val_bpb:.6f} time:{time.perf_counter() - t0:.1f}s")
    w = all_reduce(torch.tensor(work, dtype=torch.float64, device=dev)).tolist()
    if log is not None:
        log(f"lora_ttt_work positions_per_target:{w[0] / max(w[2], 1):.3f} ideal:{w[1] / max(w[2], 1):.3f} "
            f"targets:{int(w[2])} rank0_steps:{n_steps}")
    return finish_eval(sums, nll_out)


def lora_substep(h: Hyperparameters, model: GPT, lora: DocLoRA, fwd, tokens: Tensor, s: LoraStep, wins: list, starts,
                 varlen: bool, luts, sums: Tensor, nll_out, work: np.ndarray, trace, tilt) -> None:
    """Score the packed windows of s, then one AdamW step per row on the mean NLL of the targets it just
    scored (rows whose document goes on)."""
    dev, T = tokens.device, h.eval_seq_len
    g = {k: torch.from_numpy(v).to(dev, non_blocking=True) for k, v in s._asdict().items()}
    ids = torch.where(g["tok"] >= 0, tokens[g["tok"].clamp(min=0)], 0)
    x, y, idx, scored = tokens[g["tgt"]], tokens[g["tgt"] + 1], g["tgt"], g["mask"]
    docs, p = DocLayout(None, g["cu"]) if varlen else None, lora.gather(g["rows"])
    with autocast_ctx(dev):
        nll, score = score_nll(lambda x, y, hints=None: fwd(model, lora, p, ids, docs, g["rope"], g["seq"], g["offs"],
                                                            g["head"], g["pos"], y, hints), x, y, idx, tilt)
    accumulate(score, x, y, scored, idx, luts, sums, nll_out)  # the adapters train on the untilted nll
    if trace is not None:  # read off the masks that are summed and trained on
        trace.extend(("score", *spans(idx[i], scored[i])) for i in range(len(wins)))
    if s.more.any():
        m = scored.float()[: len(wins)] * g["more"][:, None]
        (nll[: len(wins)] * m).sum(1).div(m.sum(1).clamp(min=1)).sum().backward()
        lora.step(g["rows"], p, g["more"])
        if trace is not None:
            trace.extend(("train", *spans(idx[i], scored[i])) for i in np.flatnonzero(s.more))
    work += (s.tok.size, sum(min(w[4] - starts[w[1]], T) for w in wins), sum(w[4] - w[3] for w in wins))


_LORA_GRAPHS: dict = {}


def lora_forward(h: Hyperparameters, d: Dist):
    """lora_nll, compiled on CUDA with the lane and row counts dynamic: graphs for one row in one lane,
    several rows in one lane, and several lanes (a size-1 dim is always specialized), compiled in
    eval_warmup."""
    if not (h.compile and cuda_path(d.device)):
        return lora_nll
    if "nll" not in _LORA_GRAPHS:
        set_compile_limits()
        _LORA_GRAPHS["nll"] = torch.compile(lora_nll, fullgraph=True)
    f = _LORA_GRAPHS["nll"]

    def run(model, lora, p, ids, docs, rope, *rest):
        for t in (p, ids, rope, *([docs.cu_seqlens] if docs is not None else [])):
            if t.size(0) > 1:
                torch._dynamo.mark_dynamic(t, 0)
        return f(model, lora, p, ids, docs, rope, *rest)
    return run


def lora_warmup(h: Hyperparameters, model: GPT, d: Dist, tilt: bool) -> None:
    """Compile the LoRA step (forward, backward, AdamW) for one row, several rows in one lane and
    several lanes, on random tokens; the model and every later adapter are untouched."""
    T, C, R, dev = h.eval_seq_len, h.lora_chunk_tokens, h.lora_batch_docs, d.device
    gen = torch.Generator().manual_seed(h.seed)
    fwd, lora = lora_forward(h, d), DocLoRA(h, model, R, dev)
    w = min(C, T // 2)  # two windows of w fit one lane
    for n, span, bos in ((1, T, False), (2, w, True), (2, T, False))[: 1 + 2 * (R > 1)]:
        s = lora_step([(r, r, r * T, r * T + span - min(C, span), r * T + span, True) for r in range(n)], [bos] * n, R, C, T)
        g = {k: torch.from_numpy(v).to(dev) for k, v in s._asdict().items()}
        ids = torch.randint(0, h.vocab_size, s.tok.shape, generator=gen).to(dev)
        y = torch.randint(0, h.vocab_size, s.tgt.shape, generator=gen).to(dev)
        docs, p = DocLayout(None, g["cu"]) if uses_varlen(h, dev) else None, lora.gather(g["rows"])
        with autocast_ctx(dev):
            out = fwd(model, lora, p, ids, docs, g["rope"], g["seq"], g["offs"], g["head"], g["pos"], y, y if tilt else None)
        (out[0] if tilt else out).sum().backward()
        lora.step(g["rows"], p, g["more"])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
# Timed region = wall time from the first training step to the last, as the public records time it:
# steps, EMA, the stop/loop flag all-reduce and logging are all inside; only validation passes are
# excluded, and compile warmup runs before the clock starts (state restored afterwards). The loop
# stops once every rank agrees the budget is spent.


def parse_seq_schedule(h: Hyperparameters) -> list[tuple[int, float]]:
    """TRAIN_SEQ_SCHEDULE '1024@0.1,2048@0.7,3072@1' -> [(length, last fraction of the clock)]; "" -> one stage."""
    if not h.train_seq_schedule:
        return [(h.train_seq_len, 1.0)]
    return [(int(a), float(b)) for a, b in (p.strip().split("@") for p in h.train_seq_schedule.split(","))]


def seq_len_at(stages: list[tuple[int, float]], frac: float) -> int:
    """The length of the first stage whose end is >= frac (the last one past it)."""
    return next((n for n, end in stages if frac <= end), stages[-1][0])


def train_shapes(h: Hyperparameters) -> list[tuple[bool, int]]:
    """(loop mode, length) pairs the training loop can run, compiled before the clock: a stage runs
    plain if it is the first or starts before ENABLE_LOOPING_AT, looped if it ends at or after it."""
    out, lo = set(), 0.0
    for n, hi in parse_seq_schedule(h):
        if not h.looping_enabled or lo == 0 or lo < h.enable_looping_at:
            out.add((False, n))
        if h.looping_enabled and hi >= h.enable_looping_at:
            out.add((True, n))
        lo = hi
    return sorted(out)


def set_looping(model: GPT, on: bool) -> None:
    model.looping_active = on


class Trainer:
    def __init__(self, h: Hyperparameters, d: Dist, log: Logger, model: GPT, train_paths: list[str]):
        self.h, self.d, self.log, self.base = h, d, log, model
        self.compiled = model
        if h.compile and cuda_path(d.device):
            set_compile_limits()
            self.compiled = torch.compile(model, dynamic=False, fullgraph=True)
        self.opts = build_optimizers(h, model, d)
        self.loader = TrainLoader(train_paths, h.train_seq_len, h.seed)
        self.prefetch = concurrent.futures.ThreadPoolExecutor(1)  # batches are read while the GPU computes
        self.pending: collections.deque = collections.deque()
        self.params = list(model.parameters())
        self.ema = [t.detach().float().clone() for t in model.state_dict().values()]
        self.seqs_per_micro = h.train_batch_tokens // h.train_seq_len // 8  # sequences per rank per micro-step
        self.stages = parse_seq_schedule(h)
        self.seq_len, self.switch_step = seq_len_at(self.stages, 0.0), None  # TRAIN_SEQ_SCHEDULE: current length, last switch
        self.varlen = uses_varlen(h, d.device)  # cu_seqlens then come with each batch from the loader thread
        self.sync = None
        if d.world_size > 1:
            muon = self.opts[1].param_groups[0]["params"]
            own = dict(zip(map(id, muon), muon_owners([p.numel() for p in muon], d.world_size)))
            self.sync = GradSync(self.params, [own.get(id(p), -1) for p in self.params], d.rank, d.world_size)

    def _read_batch(self, n: int) -> tuple[list[Tensor], int]:
        """A micro-step of length-n rows and the stream position it was read from."""
        d, at = self.d, self.loader.next_window
        x, y = self.loader.next_batch(self.h.train_batch_tokens // n // 8 * d.world_size, d.rank, d.world_size, n)
        b = [x, y, host_cu_seqlens(x)] if self.varlen else [x, y]
        return ([t.pin_memory() for t in b] if d.device.type == "cuda" else b), at  # pinned: the copies below are async

    def next_micro(self) -> tuple[Tensor, Tensor, DocLayout | None]:
        """This rank's share of the next micro-step of the global stream on the device, with its FA3 varlen
        layout when that path runs (None: the model derives its layout)."""
        while len(self.pending) < 2:  # one worker thread keeps the stream order
            self.pending.append(self.prefetch.submit(self._read_batch, self.seq_len))
        # x, y are views of [B, T+1] windows: copied dense, as the CUDA copy makes them (graphs guard strides)
        b = [t.to(self.d.device, non_blocking=True, copy=True) for t in self.pending.popleft().result()[0]]
        return b[0], b[1], DocLayout(None, b[2]) if self.varlen else None

    def next_micro_batch(self) -> tuple[Tensor, Tensor]:
        return self.next_micro()[:2]

    def rewind_loader(self, at: int = 0) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()
        self.loader.next_window = at

    def set_seq_len(self, n: int) -> None:
        """Switch the training length; batches prefetched at the old one go back to the stream."""
        self.rewind_loader(self.pending[0].result()[1] if self.pending else self.loader.next_window)
        self.seq_len = n

    def train_step(self, step: int, lr_mult: float) -> Tensor:
        h, d = self.h, self.d
        accum = d.grad_accum
        loss_sum = torch.zeros((), device=d.device)
        for k in range(accum):
            x, y, docs = self.next_micro()
            if docs is None and self.compiled is not self.base:  # the SDPA mask, built outside the graph
                docs = self.base.doc_layout(x)
            if self.sync:
                self.sync.armed = k == accum - 1  # gradients reduce as the last backward produces them
            with autocast_ctx(d.device):
                loss = self.compiled(x, y, docs)
            (loss / accum).backward()
            loss_sum += loss.detach()
        if self.sync:
            self.sync.finish()
        if h.grad_clip_norm > 0:
            self.sync.clip_(h.grad_clip_norm) if self.sync else torch.nn.utils.clip_grad_norm_(self.params, h.grad_clip_norm)
        mu = muon_momentum_at(step, h)
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
                if "momentum" in g:
                    g["momentum"] = mu
            opt.step()
        self.base.constrain_()
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        return loss_sum / accum

    @torch.no_grad()
    def update_ema(self) -> None:
        torch._foreach_lerp_(self.ema, [t.float() for t in self.base.state_dict().values()], 1 - self.h.ema_decay)
        self.base.constrain_(self.ema)

    def apply_ema(self) -> None:
        sd = self.base.state_dict()
        self.base.load_state_dict({k: e.to(v.dtype) for (k, v), e in zip(sd.items(), self.ema)}, strict=True)

    def warmup(self) -> None:
        """Compile both loop modes on real steps, then restore model, optimizers and loader."""
        h = self.h
        if h.warmup_steps <= 0:
            return
        model_state = copy.deepcopy(self.base.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in self.opts]
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(h.seed)
        buckets: dict[int, range] = {}
        for mode, n in train_shapes(h):  # every (loop mode, TRAIN_SEQ_SCHEDULE length) the loop can reach
            set_looping(self.base, mode)
            if n != self.seq_len:
                self.set_seq_len(n)
            if uses_varlen(h, self.d.device) and n not in buckets:  # loader rows are independent windows: the binomial model holds
                rate, disp = bos_stats(self.loader.shards[0][: 1 << 25], n)
                ks = buckets[n] = varlen_buckets(rate, disp, h.train_batch_tokens // n // 8, n)
                self.log(f"varlen_warmup shape:{h.train_batch_tokens // n // 8}x{n} buckets:{ks.start}-{ks.stop - 1} "
                         f"source:train bos_rate:{rate:.6f} dispersion:{disp:.2f}")
            for s in range(h.warmup_steps):
                self.train_step(s, 1.0)
            x, y = self.next_micro_batch()
            for xb in varlen_warmup_ids(x, gen, buckets.get(n, [])):
                with autocast_ctx(self.d.device):
                    self.compiled(xb, y, self.base.doc_layout(xb)).backward()
            for o in self.opts:
                o.zero_grad(set_to_none=True)
        self.base.load_state_dict(model_state)
        for o, s in zip(self.opts, opt_states):
            o.load_state_dict(s)
        set_looping(self.base, False)
        self.rewind_loader()
        self.seq_len = seq_len_at(self.stages, 0.0)
        self.log(f"warmup_steps:{h.warmup_steps} warmup_time:{time.perf_counter() - t0:.1f}s (state restored)"
                 + (f" shapes:{','.join(f'{n}:{int(m)}' for m, n in train_shapes(h))}" if h.train_seq_schedule else ""))

    def sync_time(self) -> float:
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def issue_flags(self, loss: Tensor, t: float):
        """[loss non-finite, rank 0's clock t] max-reduced over ranks without the host waiting; read_flags
        reads them a step later, when they have long arrived."""
        d = self.d
        f = torch.stack([(~torch.isfinite(loss)).float(), torch.full((), t if d.is_main else 0.0, device=d.device)])
        work = dist.all_reduce(f, dist.ReduceOp.MAX, async_op=True) if d.world_size > 1 else None
        if d.device.type != "cuda":
            return f, work
        if work:
            work.wait()  # on NCCL the stream waits, not the host
        ev = torch.cuda.Event()
        host = f.to("cpu", non_blocking=True)
        ev.record()
        return host, ev

    @staticmethod
    def nonfinite(step: int) -> TrainingError:
        return TrainingError(f"non-finite train loss at step {step}; lower MATRIX_LR/TIED_EMBED_LR or check the data")

    @staticmethod
    def read_flags(pending) -> tuple[bool, float]:
        f, w = pending
        if w:
            w.synchronize() if isinstance(w, torch.cuda.Event) else w.wait()
        bad, t = f.tolist()
        return bad > 0, t

    def run(self, val_fn) -> int:
        h, log = self.h, self.log
        budget = h.train_budget_seconds
        tokens_per_step = h.train_batch_tokens
        log("train_clock:wall_first_step_to_last includes:steps,ema,flag_allreduce,logging excludes:validation")
        step, paused, shared, pending = 0, 0.0, 0.0, None
        t_start = self.sync_time()  # timed region: everything until the loop ends, minus `paused`
        while step < h.iterations:
            frac = shared / budget if budget > 0 else step / max(h.iterations, 1)
            if h.val_loss_every > 0 and step > 0 and step % h.val_loss_every == 0:
                t0 = self.sync_time()
                r = val_fn(self.base)
                log(f"step:{step}/{h.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} train_time:{(t0 - t_start - paused) * 1000:.0f}ms")
                paused += self.sync_time() - t0
            mult = lr_multiplier(frac, h.warmdown_frac, h.min_lr)
            if self.switch_step is not None and h.seq_change_warmup_steps:  # LR re-warmup after a length switch (#2014)
                mult *= min(1.0, (step - self.switch_step + 1) / h.seq_change_warmup_steps)
            loss = self.train_step(step, mult)
            self.update_ema()
            step += 1
            # No host sync in the step: the flags of step s are read after step s+1 is queued, so the stop,
            # looping and non-finite decisions lag one step. All come from the reduced values (the clock is
            # rank 0's, read once step s-1's flags are in), so every rank takes the same ones, at the same step.
            bad, shared = self.read_flags(pending[1]) if pending else (False, shared)
            t = time.perf_counter() - t_start - paused
            if bad:
                raise self.nonfinite(pending[0])
            pending = step, self.issue_flags(loss, t)
            frac = shared / budget if budget > 0 else step / max(h.iterations, 1)
            stop = budget > 0 and shared >= budget
            if h.looping_enabled and frac >= h.enable_looping_at and not self.base.looping_active:
                set_looping(self.base, True)
                log(f"looping:on step:{step} frac:{frac:.3f} schedule:{self.base.schedules[True].encoder}+{self.base.schedules[True].decoder}")
            if seq_len_at(self.stages, frac) != self.seq_len:
                self.set_seq_len(seq_len_at(self.stages, frac))
                self.switch_step = step
                log(f"seq_len_switch step:{step} seq_len:{self.seq_len} frac:{frac:.3f}")
            if step % h.train_log_every == 0 or step == 1 or stop or step == h.iterations:
                avg = t / step
                eta = (budget - t) if budget > 0 else avg * (h.iterations - step)
                log(f"step:{step}/{h.iterations} train_loss:{loss.item():.4f} train_time:{t * 1000:.0f}ms "
                    f"step_avg:{avg * 1000:.2f}ms tok/s:{tokens_per_step / avg:.0f} eta:{max(eta, 0):.0f}s")
            if stop:
                break
        if pending and self.read_flags(pending[1])[0]:
            raise self.nonfinite(pending[0])
        train_time = self.sync_time() - t_start - paused
        log(f"train_steps:{step} train_time:{train_time * 1000:.0f}ms budget:{budget:.1f}s")
        return train_time

    def calibration_batches(self):
        """GPTQ calibration input: the next training windows (never validation data)."""
        for _ in range(self.h.gptq_calibration_batches):
            yield self.next_micro_batch()[0]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def log_header(h: Hyperparameters, d: Dist, log: Logger) -> None:
    log(f"run_id:{h.run_id}")
    defaults = Hyperparameters()
    for name in sorted(f.name for f in fields(h)):
        log(f"hp {name}:{getattr(h, name)}", console=False)
    overrides = [f"{f.name}={getattr(h, f.name)}" for f in fields(h) if getattr(h, f.name) != getattr(defaults, f.name)]
    log(f"overrides: {' '.join(overrides) or 'none'}")
    log(f"derived grad_accum_steps:{d.grad_accum} data_path:{h.dataset_dir} tokenizer_path:{h.tokenizer_file} "
        f"train_budget:{h.train_budget_seconds:.1f}s world_size:{d.world_size}")
    log(f"versions python:{sys.version.split()[0]} torch:{torch.__version__} cuda:{torch.version.cuda} device:{d.device}"
        + (f" gpu:{torch.cuda.get_device_name(d.device)}" if d.device.type == "cuda" else "")
        + f" attention:{'fa3' if _fa3_func is not None and cuda_path(d.device) else 'sdpa'}"
        + (f" fa3_error:{_fa3_error.replace(' ', '_')[:200]}" if _fa3_error and cuda_path(d.device) else ""))
    src = Path(__file__).read_bytes()
    log(f"code file_bytes:{len(src)} sha256:{hashlib.sha256(src).hexdigest()}")


def timed_eval(stage: str, h: Hyperparameters, d: Dist, log: Logger, fn) -> tuple[EvalResult, float]:
    """Run fn(collect) -> (EvalResult, per-target NLL); log final_<stage>; dump the NLL if asked."""
    t0 = time.perf_counter()
    r, nll = fn(bool(h.eval_nll_dir))
    dt = time.perf_counter() - t0
    if not (math.isfinite(r.val_loss) and math.isfinite(r.val_bpb)):  # never reported as a score
        raise TrainingError(f"stage {stage} scored val_loss:{r.val_loss} val_bpb:{r.val_bpb}, not a result; "
                            f"the model or the TTT settings diverged (lower TTT_LR or the training LRs)")
    log(f"final_{stage} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} eval_time:{dt * 1000:.0f}ms")
    if nll is not None and d.is_main:
        np.save(os.path.join(h.eval_nll_dir, f"{stage}.npy"), nll.cpu().numpy())
    return r, dt


def make_artifact(h: Hyperparameters, d: Dist, log: Logger, trainer: Trainer, train_time: float) -> str:
    """Hessians on training data (inside the training budget), then quantize and write on rank 0.
    Returns, on every rank, the sha256 of the bytes written and (counted_code_bytes, code_packed)."""
    model = trainer.base
    hessians, digest = None, [None, None, None]
    if h.gptq_enabled:
        t0 = trainer.sync_time()
        hessians = collect_hessians(model, trainer.calibration_batches(), h)
        for v in hessians.values():
            all_reduce(v).div_(d.world_size)
        took = trainer.sync_time() - t0
        end = train_time + took
        over = " OVER_CAP" if 0 < h.max_wallclock_seconds < end else ""
        log(f"gptq_hessian_end:{end:.1f}s cap:{h.max_wallclock_seconds:.1f}s hessians:{len(hessians)} calib_data:train "
            f"hessian_time:{took:.1f}s batches:{h.gptq_calibration_batches}{over}")
    if d.is_main:
        # The counted code is known before quantizing: the artifact's budget is the limit less it.
        code, _ = digest[1:] = counted_code_bytes(code_config(h, run_knobs(h)), log)
        budget, state = SIZE_LIMIT - h.fit_margin - code, model.state_dict()

        def attempt(i: int, mult: float):
            t0 = time.perf_counter()
            tensors, meta = quantize_state(model, h, hessians, mult)
            took, blob = time.perf_counter() - t0, artifact_blob(tensors, meta, h, model.looping_active)
            if h.fit_artifact:  # relative ||W - Q||_F over the quantized tensors: what each byte saved costs
                deq, ints = dequantize_state(tensors, meta), [n for n, m in meta.items() if m["kind"] == "int"]
                err = sum(float((state[n].float().cpu() - deq[n].float()).square().sum()) for n in ints)
                norm = sum(float(state[n].float().square().sum()) for n in ints)
                log(f"fit_artifact attempt:{i} clip_mult:{mult:.4f} artifact_bytes:{len(blob)} total:{code + len(blob)} target:{budget + code} "
                    f"fits:{int(len(blob) <= budget)} quant_err:{math.sqrt(err / max(norm, 1e-30)):.6f}")
            return tensors, meta, blob, took

        # Bisection over the clip multiplier on measured sizes only: a non-monotone size costs precision, never a wrong fit.
        best = attempt(1, 1.0)
        if h.fit_artifact and len(best[2]) > budget:
            lo, hi = 1.0, FIT_MAX_MULT
            best = attempt(2, hi)
            if len(best[2]) > budget:
                log(f"fit_artifact FAILED: clip_mult:{hi} still gives total:{code + len(best[2])} > target:{budget + code}")
            else:
                for i in range(3, 3 + FIT_STEPS):
                    mid = math.sqrt(lo * hi)
                    got = attempt(i, mid)
                    lo, hi, best = (lo, mid, got) if len(got[2]) <= budget else (mid, hi, best)
        tensors, meta, blob, took = best
        kinds = [f"int{m['bits']}" if m["kind"] == "int" else m["kind"] for m in meta.values()]
        log("quantized " + " ".join(f"{k}:{kinds.count(k)}" for k in sorted(set(kinds)))
            + f" method:{'gptq' if hessians else 'rtn'} quant_time:{took:.1f}s")
        t0 = time.perf_counter()
        size, digest[0] = save_artifact_bytes(h.artifact_file, blob), hashlib.sha256(blob).hexdigest()
        log(f"artifact_write bytes:{size} compressor:{h.compressor} row_reorder:{int(h.row_reorder)} time:{time.perf_counter() - t0:.1f}s")
        for line in quant_report(tensors, meta, h):
            log(line)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.broadcast_object_list(digest, src=0)
    return digest[0], tuple(digest[1:])


def run_id_taken(h: Hyperparameters) -> str:
    """A RUN_ID is used once: the earlier run's log and artifact are never appended to or replaced."""
    mine = [os.path.join(h.log_dir, f"{h.run_id}.txt")] + ([] if h.eval_artifact else [h.artifact_file])
    if len({os.path.realpath(p) for p in mine}) < len(mine):
        return f"ARTIFACT_PATH={h.artifact_path} is this run's log file; set ARTIFACT_PATH to another file, e.g. {h.run_id}.ptz"
    used = [p for p in mine if os.path.exists(p)]
    return (f"RUN_ID={h.run_id} was already used: {used[0]} exists; choose another RUN_ID "
            f"(or move that run's files away)") if used else ""


def lock_artifact(path: str):
    """(open <path>.lock holding an flock, "") or (None, refusal): a second run on the same path would replace
    this run's artifact between its write and its read-back. The lock dies with the process."""
    import fcntl

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(path + ".lock", "a")
    except OSError as e:
        return None, f"cannot write next to ARTIFACT_PATH {path} ({e.strerror}); set ARTIFACT_PATH to a writable place"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f, ""
    except BlockingIOError:
        f.close()
        return None, f"artifact path {path} is in use by a live run; wait for it or set another ARTIFACT_PATH"


def load_validation(h: Hyperparameters, d: Dist, log: Logger) -> tuple[Tensor, tuple]:
    """The validation tokens on the device and the byte-count tables (or the byte sidecar), checked against the tokenizer."""
    luts = build_byte_luts(h.tokenizer_file, h.vocab_size, bool(glob.glob(os.path.join(h.dataset_dir, "fineweb_val_bytes_*"))))
    val_tokens = load_val_tokens(h.dataset_dir, h.eval_seq_len)
    n_train = len(glob.glob(os.path.join(h.dataset_dir, "fineweb_train_*.bin")))
    variant, kind = data_kind(h.dataset_dir, n_train, sum(len(read_shard(p)) for p in shard_paths(h.dataset_dir, "val")) - 1)
    if int(val_tokens.max()) >= h.vocab_size:
        raise ConfigError(f"validation tokens reach id {int(val_tokens.max())} >= VOCAB_SIZE={h.vocab_size}; data and tokenizer do not match")
    require_doc_starts(val_tokens, "validation", h)
    n_docs = check_tokenizer_built_shards(h.tokenizer_file, h.dataset_dir, val_tokens.numpy())
    sidecar = load_val_bytes(h.dataset_dir, val_tokens, luts, h.tokenizer_file)
    luts = luts if sidecar is None else (sidecar,)
    val_target_bytes = target_bytes(val_tokens[:-1], val_tokens[1:], luts, torch.arange(val_tokens.numel() - 1))
    n_val, counted = val_tokens.numel() - 1, "tables" if sidecar is None else "sidecar"
    log(f"val_tokens:{n_val} val_bytes:{int(val_target_bytes.sum())} tokenizer_check_docs:{n_docs} byte_count:{counted}")
    # What the run scored on, in one line: a published export's counts were checked by data_kind.
    log(f"record_config data:{variant} kind:{kind} tokenizer_sha:{tokenizer_sha256(h)[:12] or 'none'} train_shards:{n_train} "
        f"val_tokens:{n_val} byte_count:{counted}")
    if h.eval_nll_dir and d.is_main:
        os.makedirs(h.eval_nll_dir, exist_ok=True)
        np.save(os.path.join(h.eval_nll_dir, "bytes.npy"), val_target_bytes.numpy().astype(np.int32))
    val_tokens = val_tokens.to(d.device)
    return val_tokens, luts


def train_stage(h: Hyperparameters, d: Dist, log: Logger, val_tokens: Tensor, luts) -> tuple[EvalResult, str, tuple]:
    """Train -> EMA -> pre-quant eval -> artifact written: the pre-quant result, the artifact's sha256 and the counted code."""
    train_paths, t0 = shard_paths(h.dataset_dir, "train"), time.perf_counter()
    max_ids = all_reduce(shard_max_ids(train_paths, d.rank, d.world_size).to(d.device), dist.ReduceOp.MAX).cpu()
    log(f"train_shards:{len(train_paths)} max_id:{int(max_ids.max())} scan_time:{time.perf_counter() - t0:.1f}s")
    if int(max_ids.max()) >= h.vocab_size:  # on CUDA an out-of-range id would be a device assert mid-run
        i = int(max_ids.argmax())
        raise ConfigError(f"training shard {train_paths[i]} holds token id {int(max_ids[i])} >= VOCAB_SIZE={h.vocab_size}; "
                          f"data and tokenizer do not match: rebuild the shards or fix DATA_PATH/VOCAB_SIZE")
    model = GPT(h).to(d.device)
    log(f"model_params:{count_params(model)}")
    for mode, s in model.schedules.items():
        log(f"schedule looping:{int(mode)} encoder:{s.encoder} decoder:{s.decoder} n_skip:{s.n_skip} parallel_from:{s.parallel_from}")
    trainer = Trainer(h, d, log, model, train_paths)
    require_doc_starts(trainer.loader.shards[0], "training", h)
    trainer.warmup()
    train_time = trainer.run(lambda m: eval_val(h, m, d, val_tokens, luts))
    trainer.apply_ema()
    pre, _ = timed_eval("pre_quant", h, d, log,
                        lambda c: eval_windows(h, model.token_nll, d, val_tokens, luts, h.eval_seq_len, c))
    return (pre, *make_artifact(h, d, log, trainer, train_time))


def load_eval_model(h: Hyperparameters, d: Dist, log: Logger, artifact: str, wrote: str | None) -> tuple:
    """A fresh model with the artifact's weights read back from disk, ready to score:
    (model, scorer, loss_fn, state, looping, the artifact's info)."""
    eval_model = GPT(h).to(d.device)
    t1 = time.perf_counter()
    info = {}
    state, looping = load_artifact(artifact, h, info)
    log(f"artifact_decode time:{time.perf_counter() - t1:.2f}s")
    if not h.eval_artifact and info["sha256"] != wrote:
        raise TrainingError(f"artifact {artifact} is not the one this run wrote (another run wrote the same path); "
                            f"give every run its own ARTIFACT_PATH and rerun")
    if "knobs" not in info:
        raise ConfigError(f"artifact {artifact} does not record its run's knobs (an older train_gpt.py wrote it), so the "
                          f"code that decodes it cannot be counted; train it again")
    try:
        eval_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"artifact {artifact} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
    set_looping(eval_model, looping)
    if h.ttt_enabled:
        prepare_ttt(eval_model, h)
    scorer, loss_fn = eval_callables(h, eval_model, d)
    return eval_model, scorer, loss_fn, state, looping, info


def eval_stages(h: Hyperparameters, d: Dist, log: Logger, loaded: tuple, val_tokens: Tensor, luts, pre: EvalResult | None,
                times: dict) -> None:
    """Every eval stage the config enables on the model load_eval_model read back, each timed into times."""
    eval_model, scorer, loss_fn, state, looping, _ = loaded
    times["warmup"] = eval_warmup(h, eval_model, scorer, loss_fn, d, val_tokens, log)
    log(f"eval_warmup time:{times['warmup']:.1f}s tokens:synthetic")
    tilt, t1 = None, time.perf_counter()
    if h.ngram_tilt:  # inside the eval clock: the hints are part of the scoring
        tilt = tilt_plan(h, val_tokens, log)
        times["ngram"] = time.perf_counter() - t1
    quant, times["quantized"] = timed_eval("quantized", h, d, log,
                                           lambda c: eval_windows(h, scorer, d, val_tokens, luts, h.eval_seq_len, c, tilt))
    if pre is not None and tilt is None:  # pre_quant, a training diagnostic, is never tilted
        log(f"quant_gap val_bpb:{quant.val_bpb - pre.val_bpb:+.8f}")
    if h.sliding_window_enabled:
        _, times["sliding"] = timed_eval("sliding", h, d, log,
                                         lambda c: eval_windows(h, scorer, d, val_tokens, luts, h.eval_stride, c, tilt))
    if h.doc_eval_enabled:
        _, times["doc_quantized"] = timed_eval("doc_quantized", h, d, log, lambda c: eval_doc_windows(
            h, scorer, d, val_tokens, luts, h.eval_seq_len, c, tilt))
        _, times["doc_sliding"] = timed_eval("doc_sliding", h, d, log, lambda c: eval_doc_windows(
            h, scorer, d, val_tokens, luts, h.eval_stride, c, tilt))
    if h.ttt_enabled:
        _, times["ttt"] = timed_eval("ttt", h, d, log,
                                     lambda c: eval_ttt(h, eval_model, scorer, loss_fn, d, val_tokens, luts, c, log, tilt))
    if h.lora_ttt_enabled:
        def lora_stage(c):
            m, lf = eval_model, loss_fn
            if h.ttt_enabled:  # the TTT stage changed eval_model: a fresh copy of the artifact's weights
                m = GPT(h).to(d.device)
                m.load_state_dict(state, strict=True)
                set_looping(m, looping)
                lf = eval_callables(h, m, d)[1]
            return eval_lora_ttt(h, m, lf, d, val_tokens, luts, c, log, tilt=tilt)
        _, times["lora_ttt"] = timed_eval("lora_ttt", h, d, log, lora_stage)


def train_and_eval(h: Hyperparameters, d: Dist, log: Logger | None = None) -> int:
    """Train -> EMA -> pre-quant eval -> artifact -> reload from disk -> quantized, sliding, TTT evals. Exit status."""
    log = log or Logger(d, os.path.join(h.log_dir, f"{h.run_id}.txt"))
    log_header(h, d, log)
    if why := fa3_refusal(h, d.device):
        raise ConfigError(why)
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    val_tokens, luts = load_validation(h, d, log)
    log(f"frontier doc_mask:{int(h.doc_mask)} attention:{'fa3_varlen' if uses_varlen(h, d.device) else 'sdpa'} "
        f"smear_gate:{int(h.smear_gate)} attn_gate:{h.attn_gate} polar_express:{int(h.polar_express)} "
        f"fused_ce:{fused_ce_backend(d.device) if h.fused_ce else 'off'}")
    pre = wrote = counted = None
    artifact = h.eval_artifact or h.artifact_file
    if not h.eval_artifact:
        pre, wrote, counted = train_stage(h, d, log, val_tokens, luts)
    # Everything from here on is the submission's evaluation and counts against EVAL_LIMIT_SECONDS.
    t0 = time.perf_counter()
    loaded = load_eval_model(h, d, log, artifact, wrote)
    times, info = {"load": time.perf_counter() - t0}, loaded[-1]
    code, packed = counted or counted_code_bytes(code_config(h, info["knobs"]), log)  # ~1 s, no part of the evaluation
    model_bytes = info["nbytes"]  # the bytes scored, not a later stat of the path
    total = code + model_bytes
    log(f"artifact counted_code_bytes:{code} bytes_model:{model_bytes} bytes_total:{total} "
        f"limit:{SIZE_LIMIT} headroom:{SIZE_LIMIT - total} code_packed:{int(packed)} path:{artifact}")
    eval_stages(h, d, log, loaded, val_tokens, luts, pre, times)
    used = sum(times.values())
    log(f"eval_budget used:{used:.1f}s limit:{EVAL_LIMIT_SECONDS:.0f}s stages:{'+'.join(times)}"
        + ("" if used <= EVAL_LIMIT_SECONDS else " OVER_BUDGET"))
    if total > SIZE_LIMIT:
        log(f"OVER_LIMIT by {total - SIZE_LIMIT} bytes{' at the coarsest FIT_ARTIFACT clip' if h.fit_artifact and not h.eval_artifact else ''}: "
            f"raise MLP_/ATTN_/MATRIX_CLIP_SIGMAS, lower the bits or shrink the model")
        return 4
    return 0


def main() -> int:
    d = log = lock = None
    try:
        h = Hyperparameters.from_env()
        d = setup_distributed()
        run_id = h.run_id or f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
        taken = run_id_taken(dataclasses.replace(h, run_id=run_id)) if d.is_main else ""
        if d.is_main and not taken and not h.eval_artifact:
            lock, taken = lock_artifact(dataclasses.replace(h, run_id=run_id).artifact_file)
        if d.world_size > 1:  # every rank must log to the same file name and agree on the refusal
            obj = [run_id, taken]
            dist.broadcast_object_list(obj, src=0)
            run_id, taken = obj
        if taken:
            raise ConfigError(taken)
        h = dataclasses.replace(h, run_id=run_id)
        try:
            log = Logger(d, os.path.join(h.log_dir, f"{h.run_id}.txt"))
        except OSError as e:
            raise ConfigError(f"cannot write the log in {h.log_dir} ({e.strerror}); set LOG_DIR to a writable folder") from None
        return train_and_eval(h, d, log)
    except (ConfigError, TrainingError, OSError, KeyboardInterrupt, NameError) as e:
        if isinstance(e, NameError):  # code a shipped file left out (PRUNE), reached through an input
            if PINNED is None:
                raise
            e = ConfigError(f"{e}: this train_gpt.py was packed for one config and left that code out; run the readable source")
        # Every rank meets the same error (inputs and scores are identical or all-reduced); rank 0 prints it.
        status = 2 if isinstance(e, ConfigError) else 130 if isinstance(e, KeyboardInterrupt) else 3
        msg = f"I/O error: {' '.join(str(e).split())}" if isinstance(e, OSError) else str(e)
        if status == 130:
            msg = "interrupted (Ctrl-C)" + (f"; the log so far is in {log.path}" if log else "")
        if launch_rank() == 0:
            print(f"error: {msg}", file=sys.stderr, flush=True)
        if log is not None:
            try:
                log(f"error: {msg}", console=False)
            except OSError:  # e.g. the disk that refused the artifact
                pass
        return status
    finally:
        if lock is not None:
            Path(lock.name).unlink(missing_ok=True)
            lock.close()
        shutdown_distributed(d)


if __name__ == "__main__":
    sys.exit(main())
