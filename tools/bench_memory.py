#!/usr/bin/env python3
"""How much GPU memory does each phase of a run need at the record config? `python3 tools/bench_memory.py`

Peak device memory of every phase of a run, measured on CPU at small batch, projected per GPU.

`tools/bench.py --memory` runs this. Each phase runs train_gpt's own code under the CUDA contract
(tests/cuda_contract.py: bf16 autocast, the FA3 varlen path) at the configured width, depth and vocab
(default: the record config), at a few small batches of `rows` sequences of T tokens. A dispatch
mode (LiveBytes) adds up the bytes of every live tensor storage the run creates, as CUDA's
`max_memory_allocated` counts them (blocks rounded up to 512 bytes), and keeps the peak of each
phase. Every phase peak is fitted as

    peak = fixed + per_row * rows + per_token * rows * T

and projected to the configured run's per-GPU batch at 8 GPUs (TRAIN_BATCH_TOKENS/8 per micro-step,
VAL_BATCH_TOKENS/(8*EVAL_SEQ_LEN) windows, TTT_BATCH_SEQS/8 rows, LORA_BATCH_DOCS rows, ...).

Attention: FA3 never builds a T x T matrix, so the stand-in used here is opaque to the tracker and
allocates exactly FA3's tensors (hopper/flash_api.cpp): out and the fp32 softmax LSE [H, total] in
forward (saved for backward); dq, dk, dv and the fp32 softmax_d, softmax_lse_log2, dq_accum,
dk_accum, dv_accum workspaces in backward. Its math runs per segment in fp32, unseen.

Modelled, not measured (printed as such): the validation stream that sits on the GPU through every
phase (int64, --val-tokens), the flat gradient copy reduce_grads makes at world size > 1 (TTT
and phased SGD), and the eval phases run eagerly where the GPU runs them compiled. Not counted at all:
allocator fragmentation (reserved - allocated), the CUDA context, NCCL and cuBLAS buffers, Inductor's
workspaces and what its fusion and recomputation save or add.

Output: `key:value` lines; one `point:` line per measurement, one `phase:` line per phase.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import cuda_contract  # noqa: E402
import train_gpt as tg  # noqa: E402

GiB, MiB = 2**30, 2**20
BLOCK = 512  # CUDA's caching allocator rounds every block up to 512 bytes; max_memory_allocated counts blocks
FA3_TILE = 128  # FA3's kBlockM/kBlockN at head dim 64 on sm90: its backward pads each sequence by one tile
RECORD_WORLD = 8
SEED = 0  # synthetic tokens


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes under the mode, and their peak per label.

    Every op's outputs are registered by storage (views and in-place results add nothing); a storage
    counts until it is freed, whoever holds it: a Python tensor, autograd's saved tensors, an optimizer
    state. Frees are found through weak references to the storages, so the total is exact at every op
    boundary where a peak can be set (see __torch_dispatch__). Allocations inside one op (a kernel's
    scratch) are not seen: the FA3 stand-in returns its workspaces as outputs for that reason.
    """

    def __init__(self):
        super().__init__()  # live: storage address -> (weak reference, bytes as the allocator counts them)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.label = ""
        self.peaks: dict[str, int] = {}

    def track(self, t: torch.Tensor) -> None:
        """Count a tensor made outside the dispatcher (torch.from_numpy)."""
        self._add(t)
        self._sweep()
        self._mark()

    def set_label(self, label: str) -> None:
        self._sweep()
        self.label = label
        self.peaks.setdefault(label, self.now)

    def _add(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        n, ptr = st.nbytes(), st.data_ptr()
        if n == 0:
            return 0
        if ptr in self.live:
            if not self.live[ptr][0].expired():
                return 0  # a view or an in-place result: its storage is counted
            self.now -= self.live.pop(ptr)[1]  # freed, and its address reused by this new storage
        size = -(-n // BLOCK) * BLOCK
        self.live[ptr] = (StorageWeakRef(st), size)
        self.now += size
        return size

    def _sweep(self) -> None:
        for ptr in [p for p, (w, _) in self.live.items() if w.expired()]:
            self.now -= self.live.pop(ptr)[1]

    def _mark(self) -> None:
        self.peak = max(self.peak, self.now)
        self.peaks[self.label] = max(self.peaks.get(self.label, 0), self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        added = sum(self._add(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        # self.now is exact after a sweep and an upper bound between sweeps (frees are found late), so
        # only an op that allocates and lifts the bound above the label's peak can set a new peak:
        # sweeping then, and only then, keeps every peak exact at a fraction of the cost.
        if added and self.now > self.peaks.get(self.label, 0):
            self._sweep()
            self._mark()
        return out


# --- FA3 stand-in: FA3's tensors at FA3's shapes, math out of the tracker's sight -------------------

def _segments(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return [(a, b) for a, b in zip(c, c[1:]) if b > a]


def _probs(q, k, a, b, rep):
    """fp32 causal softmax [H, L, L] of segment [a, b) and the scaled scores' logsumexp [H, L]."""
    qs, ks = q[a:b].float().transpose(0, 1), k[a:b].float().repeat_interleave(rep, 1).transpose(0, 1)
    s = qs @ ks.transpose(1, 2) / q.size(-1) ** 0.5
    L = b - a
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (s - lse[..., None]).exp(), lse


@torch.library.custom_op("bench_memory::fa3_fwd", mutates_args=())
def fa3_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rep = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    lse = torch.empty(q.size(1), q.size(0), dtype=torch.float32)  # FA3 varlen: softmax_lse [H, total_q]
    for a, b in _segments(cu):
        p, lse[:, a:b] = _probs(q, k, a, b, rep)
        out[a:b] = (p @ v[a:b].float().repeat_interleave(rep, 1).transpose(0, 1)).transpose(0, 1).to(q.dtype)
    return out, lse


@fa3_fwd.register_fake
def _(q, k, v, cu):
    return torch.empty_like(q), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("bench_memory::fa3_bwd", mutates_args=())
def fa3_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            cu: torch.Tensor) -> list[torch.Tensor]:
    """dq, dk, dv, then FA3's fp32 backward workspaces at their shapes (freed by the caller at once)."""
    N, H, D = q.shape
    Hkv, rep = k.size(1), H // k.size(1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in _segments(cu):
        p, _ = _probs(q, k, a, b, rep)
        gs, vs = g[a:b].float().transpose(0, 1), v[a:b].float().repeat_interleave(rep, 1).transpose(0, 1)
        dp = gs @ vs.transpose(1, 2)
        ds = p * (dp - (gs * out[a:b].float().transpose(0, 1)).sum(-1, keepdim=True)) / D ** 0.5
        qs, ks = q[a:b].float().transpose(0, 1), k[a:b].float().repeat_interleave(rep, 1).transpose(0, 1)
        dq[a:b] = (ds @ ks).transpose(0, 1).to(q.dtype)
        dk[a:b] = (ds.transpose(1, 2) @ qs).view(Hkv, rep, b - a, D).sum(1).transpose(0, 1).to(k.dtype)
        dv[a:b] = (p.transpose(1, 2) @ gs).view(Hkv, rep, b - a, D).sum(1).transpose(0, 1).to(v.dtype)
    padded = -(-(N + (cu.numel() - 1) * FA3_TILE) // FA3_TILE) * FA3_TILE  # total_q_padded_rounded
    hd = -(-D // 32) * 32  # head_size_rounded
    ws = [torch.empty(H, padded), torch.empty(H, padded), torch.empty(H, padded * hd)]  # softmax_d, lse_log2, dq_accum
    if Hkv != H:  # GQA: dk_accum, dv_accum
        ws += [torch.empty(Hkv, padded, hd), torch.empty(Hkv, padded, hd)]
    return [dq, dk, dv, *ws]


@fa3_bwd.register_fake
def _(g, q, k, v, out, cu):
    raise NotImplementedError("the memory stand-in runs eagerly")


def _setup(ctx, inputs, output):
    q, k, v, cu = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)  # FA3's autograd Function saves these


def _backward(ctx, g, _g_lse):
    q, k, v, out, _lse, cu = ctx.saved_tensors
    dq, dk, dv, *_ = fa3_bwd(g.contiguous(), q, k, v, out, cu)
    return dq, dk, dv, None


fa3_fwd.register_autograd(_backward, setup_context=_setup)


def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    cuda_contract._check_qkv(q, k, v, 3)  # FA3's own refusals, so the measured path is the one FA3 takes
    return fa3_fwd(q, k, v, cu_seqlens_q)[0]


def fa3_func(q, k, v, causal=False):
    B, T = q.shape[:2]
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    return fa3_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, T, T, causal).view(q.shape)


# --- measurement --------------------------------------------------------------------------------

class OneMicro(tg.Dist):
    """One rank of the record's 8: one micro-step per optimizer step (grad accumulation 8/8)."""

    @property
    def grad_accum(self) -> int:
        return 1


def stream(n_docs: int, doc_len: int, vocab: int, seed: int) -> np.ndarray:
    """Documents of doc_len tokens, each opening with BOS, plus one token to predict."""
    toks = np.random.default_rng(seed).integers(2, vocab, n_docs * doc_len + 1)
    toks[: n_docs * doc_len : doc_len] = tg.BOS_ID
    return toks


def point_env(rows: int, T: int) -> dict:
    """Knobs of one measurement point: every batch driver at `rows` sequences of T tokens, and the
    least work that still reaches every code path (one TTT chunk trained, one LoRA phase)."""
    return dict(TRAIN_SEQ_LEN=T, EVAL_SEQ_LEN=T, TRAIN_BATCH_TOKENS=8 * rows * T, VAL_BATCH_TOKENS=rows * T,
                EVAL_STRIDE=T // 2, TTT_CHUNK_TOKENS=rows * T, TTT_BATCH_SEQS=rows, TTT_EPOCHS=1,
                LORA_BATCH_DOCS=rows, LORA_CHUNK_TOKENS=T // 2, PHASED_PREFIX_DOCS=rows, PHASED_NUM_PHASES=1,
                GPTQ_CALIBRATION_BATCHES=1, WARMUP_STEPS=0, COMPILE=0, TTT_ENABLED=1, SLIDING_WINDOW_ENABLED=1,
                DOC_EVAL_ENABLED=1, LORA_TTT_ENABLED=1, GPTQ_ENABLED=1)


def hparams(base: dict, rows: int, T: int) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**base, **{k: str(v) for k, v in point_env(rows, T).items()}})


def labelled(meter: LiveBytes, label: str, fn):
    """fn, switching the meter's label on entry: what follows (its backward, the optimizer step) is
    charged to the label until another wrapper switches it."""
    def call(*a, **k):
        meter.set_label(label)
        return fn(*a, **k)
    return call


def measure_train(h: tg.Hyperparameters, seed: int, quantize: bool) -> dict[str, int]:
    """Two training steps per loop mode (the second has every optimizer state), then the GPTQ Hessian
    pass and quantization with the trainer still alive, as in the run."""
    d = OneMicro(0, 1, 0, torch.device("cpu"))
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "fineweb_train_000000.bin")
        toks = stream(64 * h.train_batch_tokens // h.train_seq_len // 8 + 8, h.train_seq_len // 2, h.vocab_size, seed)
        header = np.zeros(tg.HEADER_INTS, dtype="<i4")
        header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, toks.size
        with open(shard, "wb") as f:
            f.write(header.tobytes() + toks.astype("<u2").tobytes())
        for looping in (False, True) if h.looping_enabled else (False,):
            with LiveBytes() as m:
                m.set_label("setup")
                torch.manual_seed(h.seed)
                model = tg.GPT(h)
                trainer = tg.Trainer(h, d, tg.Logger(d, None), model, [shard])
                tg.set_looping(model, looping)
                name = f"train_loop_{'on' if looping else 'off'}"
                # Activations peak in forward/backward, optimizer states in the step: two sub-phases, so
                # that each one's peak moves linearly with the batch (their max does not).
                trainer.compiled = labelled(m, name, trainer.compiled)
                for opt in trainer.opts:
                    opt.step = labelled(m, name + "_opt", opt.step)
                for s in range(2):
                    trainer.train_step(s, 1.0)
                    trainer.update_ema()
                if looping or not h.looping_enabled:  # the run quantizes after training ends in its last mode
                    m.set_label("gptq_hessian")
                    hess = tg.collect_hessians(model, trainer.calibration_batches(), h)
                    for v in hess.values():  # a few hundred tokens leave H singular; a real calibration does not
                        if v.dim() == 2:
                            v.diagonal().add_(v.diagonal().mean() + 1.0)
                    if quantize:  # no batch in it: measured once
                        m.set_label("gptq_quantize")
                        tg.quantize_state(model, h, hess)
                    del hess
                peaks.update({k: v for k, v in m.peaks.items() if k != "setup"})
                trainer.prefetch.shutdown()
                del trainer, model
    return peaks


def measure_eval(h: tg.Hyperparameters, seed: int) -> dict[str, int]:
    """Every eval stage in the run's order on one model, as train_and_eval runs them; each stage on the
    shortest stream that gives it one full batch of each shape."""
    d = tg.Dist(0, 1, 0, torch.device("cpu"))
    T, rows = h.eval_seq_len, eval_rows(h, 1)
    toks = torch.from_numpy(stream(2 * h.lora_batch_docs + rows, T, h.vocab_size, seed))
    luts = (torch.ones(toks.numel(), dtype=torch.int16),)  # bytes per target (the sidecar form)
    with LiveBytes() as m:
        m.set_label("setup")
        m.track(toks)
        m.track(luts[0])
        torch.manual_seed(h.seed)
        model = tg.GPT(h)
        tg.set_looping(model, h.looping_enabled)  # the artifact of a run that switched looping on
        tg.prepare_ttt(model, h)
        scorer, loss_fn = tg.eval_callables(h, model, d)
        m.set_label("eval_plain")
        tg.eval_windows(h, scorer, d, toks[: rows * T + 1], luts, T)
        m.set_label("eval_sliding")
        tg.eval_windows(h, scorer, d, toks[: T + (rows - 1) * h.eval_stride + 1], luts, h.eval_stride)
        m.set_label("eval_doc")
        tg.eval_doc_windows(h, scorer, d, toks[: rows * T + 1], luts, T)
        tg.eval_doc_windows(h, scorer, d, toks[: rows * T + 1], luts, h.eval_stride)
        real_sgd = torch.optim.SGD.step  # TTT and phased SGD build their optimizer inside the stage
        torch.optim.SGD.step = lambda self, *a, **k: labelled(m, m.label.removesuffix("_opt") + "_opt", real_sgd)(self, *a, **k)
        tg.eval_ttt(h, model, labelled(m, "ttt_score", scorer), labelled(m, "ttt_train", loss_fn), d,
                    toks[: h.ttt_chunk_tokens + 2], luts)
        m.set_label("lora_init")
        lora_model = tg.GPT(h)  # lora_stage: a fresh copy while the TTT-trained model stays referenced
        lora_model.load_state_dict(model.state_dict())
        tg.set_looping(lora_model, h.looping_enabled)
        lora_loss = labelled(m, "lora_sgd", tg.eval_callables(h, lora_model, d)[1])
        real, real_nll = tg.DocLoRA, tg.lora_nll
        tg.DocLoRA = labelled(m, "lora_init", real)  # a phase's new adapters are built while the old live
        tg.lora_nll = labelled(m, "lora", real_nll)  # a packed step's forward (its backward and AdamW follow)
        try:  # documents of T tokens: the second step of every row packs a full window
            tg.eval_lora_ttt(h, lora_model, lora_loss, d, toks[: 2 * h.lora_batch_docs * T + 1], luts)
        finally:
            tg.DocLoRA, tg.lora_nll, torch.optim.SGD.step = real, real_nll, real_sgd
        peaks = {k: v for k, v in m.peaks.items() if k != "setup"}
    with LiveBytes() as m:  # adapter state per row: the phased SGD runs with the last phase's adapters alive
        tg.DocLoRA(h, model, h.lora_batch_docs, d.device)
        peaks["lora_state"] = m.peak
    return peaks


# --- projection ---------------------------------------------------------------------------------

def eval_rows(h: tg.Hyperparameters, world: int) -> int:
    return tg.eval_batch_windows(h, world)


def ttt_rows(h: tg.Hyperparameters, world: int) -> int:
    return max(n for _, n, _ in tg.ttt_step_shares(h, tg.Dist(0, world, 0, torch.device("cpu"))))


def lora_batch(h: tg.Hyperparameters) -> tuple[int, int]:
    """(rows, tokens per row) of the LoRA stage's largest forward: every row in flight gathered, at most
    LORA_MAX_LANES lanes of EVAL_SEQ_LEN tokens packed (a step beyond runs as further forwards)."""
    R = h.lora_batch_docs
    return R, min(R, h.lora_max_lanes) * h.eval_seq_len // R


def drivers(h: tg.Hyperparameters, world: int) -> dict[str, tuple[int, int]]:
    """(rows, T) of the batch each phase runs on one rank of `world`."""
    tr, ev = (h.train_batch_tokens // h.train_seq_len // 8, h.train_seq_len), (eval_rows(h, world), h.eval_seq_len)
    out = {"train_loop_off": tr, "train_loop_on": tr, "gptq_hessian": tr, "gptq_quantize": (0, tr[1]),
            "eval_plain": ev, "eval_sliding": ev, "eval_doc": ev, "ttt_score": ev,
            "ttt_train": (ttt_rows(h, world), h.eval_seq_len), "lora": lora_batch(h),
            "lora_init": lora_batch(h), "lora_sgd": (ttt_rows(h, world), h.eval_seq_len),
            "lora_state": (h.lora_batch_docs, 0)}
    return {**out, **{k + "_opt": out[k] for k in ("train_loop_off", "train_loop_on", "ttt_train", "lora_sgd")}}


STAGES = {  # phase -> its sub-phases (the phase's peak is the largest); *_opt: the optimizer step
    "train_loop_off": ["train_loop_off", "train_loop_off_opt"], "train_loop_on": ["train_loop_on", "train_loop_on_opt"],
    "gptq": ["gptq_hessian", "gptq_quantize"], "eval_plain": ["eval_plain"], "eval_sliding": ["eval_sliding"],
    "eval_doc": ["eval_doc"], "ttt": ["ttt_score", "ttt_train", "ttt_train_opt"],
    "lora_ttt": ["lora", "lora_init", "lora_sgd", "lora_sgd_opt"],
}


def fit(points: list[tuple[int, int, int]]) -> tuple[np.ndarray, float]:
    """Least squares of peak = fixed + per_row * rows + per_token * rows * T; (coefficients, worst residual)."""
    a = np.array([[1.0, r, r * t] for r, t, _ in points])
    y = np.array([p for _, _, p in points], dtype=np.float64)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return coef, float(np.abs(a @ coef - y).max())


def project(coef: np.ndarray, rows: int, T: int) -> float:
    return float(coef[0] + coef[1] * rows + coef[2] * rows * T)


def param_bytes(h: tg.Hyperparameters) -> int:
    return sum(p.numel() * 4 for p in tg.GPT(h).parameters())  # fp32 masters: the gradients' size


def run(args) -> int:
    base = dict(os.environ)
    h_rec = tg.Hyperparameters.from_env(base)
    cuda_contract.install(tg, rms_fp32=args.rms_norm_fp32)
    tg._fa3_varlen, tg._fa3_func = fa3_varlen, fa3_func
    print(f"memory_model:d{h_rec.model_dim}_L{h_rec.num_layers}_V{h_rec.vocab_size} torch:{torch.__version__} "
          f"autocast:bf16 attention:fa3_standin rms_norm_fp32:{int(args.rms_norm_fp32)} mode:eager")
    points: dict[str, list[tuple[int, int, int]]] = {}
    t0 = time.perf_counter()
    for T in args.seq_lens:
        for rows in args.rows:
            h = hparams(base, rows, T)
            peaks = {**measure_train(h, SEED, not points), **measure_eval(h, SEED)}
            for k, v in peaks.items():
                r, t = drivers(h, 1)[k]
                points.setdefault(k, []).append((r, t, v))
            print(f"point rows:{rows} T:{T} " + " ".join(f"{k}:{v / MiB:.1f}MiB" for k, v in sorted(peaks.items()))
                  + f" elapsed:{time.perf_counter() - t0:.0f}s", flush=True)
    coefs = {k: fit(p) for k, p in points.items()}
    rec = drivers(h_rec, RECORD_WORLD)
    val_bytes = (args.val_tokens + 1) * 8
    grads_flat = param_bytes(h_rec)
    state_row = coefs["lora_state"][0][1]
    print(f"record world:{RECORD_WORLD} train_rows:{rec['train_loop_on'][0]}x{h_rec.train_seq_len} "
          f"eval_rows:{rec['eval_plain'][0]}x{h_rec.eval_seq_len} ttt_rows:{rec['ttt_train'][0]} "
          f"lora_rows:{h_rec.lora_batch_docs} capacity:{args.capacity_gib:.1f}GiB")
    print(f"modelled val_tokens:{val_bytes / MiB:.1f}MiB (int64 x {args.val_tokens + 1}, every phase) "
          f"reduce_grads_flat:{grads_flat / MiB:.1f}MiB (ttt_train_opt, lora_sgd_opt: after backward)")
    out = {}
    for stage, subs in STAGES.items():
        best = None
        for s in subs:
            coef, resid = coefs[s]
            r, t = rec[s]
            if s.startswith("lora_sgd"):  # its per-row term holds the adapters of LORA_BATCH_DOCS rows, not the SGD rows'
                proj = project(coef - np.array([0, state_row, 0]), r, t) + state_row * h_rec.lora_batch_docs
            else:
                proj = project(coef, r, t)
            extra = val_bytes + (grads_flat if s in ("ttt_train_opt", "lora_sgd_opt") else 0)
            total = proj + extra
            pts = " ".join(f"{rr}x{tt}:{p / MiB:.1f}" for rr, tt, p in points[s])
            print(f"fit phase:{s} points_MiB:[{pts}] fixed:{coef[0] / MiB:.1f}MiB per_row:{coef[1] / MiB:.3f}MiB "
                  f"per_token:{coef[2] / 1024:.2f}KiB max_residual:{resid / MiB:.2f}MiB batch:{r}x{t} "
                  f"measured_part:{proj / GiB:.2f}GiB modelled_part:{extra / GiB:.2f}GiB projected:{total / GiB:.2f}GiB")
            if best is None or total > best[1]:
                best = (s, total)
        out[stage] = best
    for stage, (sub, total) in out.items():
        margin = args.capacity_gib - total / GiB
        print(f"phase:{stage} projected_gib:{total / GiB:.2f} peak_in:{sub} fits_h100:{'yes' if margin > 0 else 'NO'} "
              f"margin_gib:{margin:.2f}")
    worst = max(out.items(), key=lambda kv: kv[1][1])
    print(f"peak_phase:{worst[0]} projected_gib:{worst[1][1] / GiB:.2f} "
          f"not_measured:allocator_fragmentation,cuda_context,nccl,cublas_workspace,inductor_workspace_and_fusion "
          f"elapsed:{time.perf_counter() - t0:.0f}s")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--memory")
    g.add_argument("--rows", type=int, nargs="+", default=[1, 2], help="sequences per batch of each measurement")
    g.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256], help="T of each measurement (per-token and per-row terms need two)")
    g.add_argument("--val-tokens", type=int, default=40_540_160, help="validation stream on the GPU (the SP8192 FineWeb val split)")
    g.add_argument("--capacity-gib", type=float, default=79.0, help="usable GPU memory (an H100 80 GB reports ~79.1 GiB)")
    g.add_argument("--rms-norm-fp32", action="store_true", help="torch >= 2.12's autocast policy: rms_norm in fp32")


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Two distinct row counts and two distinct T: per-row and per-token terms are told apart only so."""
    if min(args.rows) < 1 or len(set(args.rows)) < 2:
        p.error("--rows needs two or more distinct counts >= 1")
    if min(args.seq_lens) < 8 or len(set(args.seq_lens)) < 2 or any(t % 2 for t in args.seq_lens):
        p.error("--seq-lens needs two or more distinct even lengths >= 8")
    if args.val_tokens < 0 or not args.capacity_gib > 0:
        p.error("--val-tokens must be >= 0 and --capacity-gib > 0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        return run(args)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
