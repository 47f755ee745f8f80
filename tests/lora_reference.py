"""The per-document LoRA stage as it ran before packing: one [rows, EVAL_SEQ_LEN] batch a step, every
row padded to the full window, one seeded A shared by all rows. The packed stage must compute the
same function (tests/test_eval_docs.py)."""
from __future__ import annotations

import math
import time

import torch

import train_gpt as tg
from torch import Tensor


class DocLoRA:
    """Per-document adapters, one row per document in flight: y += (x A^T) B^T * alpha/r per virtual
    layer slot and target, A [rows, r, in], B [rows, out, r]. A starts from one seeded draw
    uniform(+-1/sqrt(in)), B at 0, so a fresh row's adapters are exactly the identity."""

    def __init__(self, h: tg.Hyperparameters, model: tg.GPT, rows: int, device: torch.device):
        self.h, self.scale = h, h.lora_alpha / h.lora_rank
        d, kv = h.model_dim, h.num_kv_heads * (h.model_dim // h.num_heads)
        dims = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d), "head": (d, h.vocab_size)}
        sched = model.schedules[model.looping_active]
        n_slots = len(sched.encoder) + len(sched.decoder)
        sites = [(v, t) for v in range(n_slots) for t in h.lora_target_list if t != "head"]
        sites += [(-1, "head")] if "head" in h.lora_target_list else []
        gen = torch.Generator().manual_seed(h.seed)
        self.init = {}
        for site in sites:
            n_in, _ = dims[site[1]]
            self.init[site] = ((torch.rand(h.lora_rank, n_in, generator=gen) * 2 - 1) / math.sqrt(n_in)).to(device)
        self.a = {s: a.expand(rows, -1, -1).clone().requires_grad_() for s, a in self.init.items()}
        self.b = {s: torch.zeros(rows, dims[s[1]][1], h.lora_rank, device=device, requires_grad=True) for s in sites}
        self.params = [*self.a.values(), *self.b.values()]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(rows, device=device)

    def slot(self, v: int):
        def apply(target: str, x: tg.Tensor, y: tg.Tensor) -> tg.Tensor:
            site = (v, target)
            if site not in self.a:
                return y
            a, b = self.a[site].to(x.dtype), self.b[site].to(x.dtype)
            return y + torch.matmul(torch.matmul(x, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale
        return apply

    @torch.no_grad()
    def reset_rows(self, rows: tg.Tensor, keep_a: bool) -> None:
        """A new document enters these rows: B = 0 and optimizer state 0; A back to the draw unless kept."""
        for s in self.a:
            self.b[s][rows] = 0
            if not keep_a:
                self.a[s][rows] = self.init[s]
        for t in (*self.m, *self.v):
            t[rows] = 0
        self.steps[rows] = 0

    @torch.no_grad()
    def step(self, rows: tg.Tensor) -> None:
        """AdamW on the given rows only, each with its own step count (rows are independent)."""
        h, mask = self.h, torch.zeros_like(self.steps, dtype=torch.bool)
        mask[rows] = True
        self.steps += mask
        t = self.steps.clamp(min=1)
        bc1, bc2 = 1 - h.lora_beta1 ** t, 1 - h.lora_beta2 ** t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            sh = (-1,) + (1,) * (p.dim() - 1)
            k = mask.view(sh)
            m.copy_(torch.where(k, h.lora_beta1 * m + (1 - h.lora_beta1) * g, m))
            v.copy_(torch.where(k, h.lora_beta2 * v + (1 - h.lora_beta2) * g * g, v))
            upd = p * (1 - h.lora_lr * h.lora_wd) - (h.lora_lr / bc1).view(sh) * m / ((v / bc2.view(sh)).sqrt() + h.lora_eps)
            p.copy_(torch.where(k, upd, p))
            p.grad = None


def eval_lora_ttt(h: tg.Hyperparameters, model: tg.GPT, loss_fn, d: tg.Dist, tokens: tg.Tensor, luts,
                  collect: bool = False, log=None, trace=None, tilt=None) -> tuple[tg.EvalResult, tg.Tensor | None]:
    """Per-document LoRA TTT with phased global SGD; mutates the model.

    Documents go to ranks round-robin in stream order; each rank keeps LORA_BATCH_DOCS documents in
    flight and refills a row as soon as its document ends. Each step scores the next chunk of every
    row with the window of <= EVAL_SEQ_LEN tokens ending at the chunk's nominal end, then takes one AdamW step
    per row on the mean NLL of exactly the targets it just scored (not after a document's last
    chunk). A document's targets therefore depend on its own earlier tokens, on the base weights and
    (LORA_WARM_START_A) on the A of earlier documents of its row: everything already scored.
    Phases: documents at or past the next bound wait until every rank has scored all documents
    before it; then all ranks run tg.global_sgd on those documents and restart the adapters.
    trace (tests): ("score"|"train"|"sgd", first target, end) of every row and SGD sequence.
    """
    T, C, total, dev = h.eval_seq_len, h.lora_chunk_tokens, tokens.numel() - 1, tokens.device
    starts, ends = tg.doc_spans(tokens)
    bounds = tg.phase_bounds(h, len(starts))
    mine = list(range(d.rank, len(starts), d.world_size))
    luts = tuple(t.to(dev) for t in luts)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    nll_out = torch.zeros(total, device=dev) if collect else None
    model.requires_grad_(False)
    R = h.lora_batch_docs
    lora = DocLoRA(h, model, R, dev)
    row_doc, row_pos = [-1] * R, [0] * R  # document in each row and its next target
    qi, phase, t0, n_steps = 0, 0, time.perf_counter(), 0
    while True:
        gate = bounds[phase] if phase < len(bounds) else len(starts)
        fresh = []
        for r in range(R):
            if row_doc[r] < 0 and qi < len(mine) and mine[qi] < gate:
                row_doc[r], row_pos[r] = mine[qi], int(starts[mine[qi]])
                fresh.append(r)
                qi += 1
        if fresh:
            lora.reset_rows(torch.tensor(fresh, device=dev), keep_a=h.lora_warm_start_a)
        active = [r for r in range(R) if row_doc[r] >= 0]
        if not active:
            if phase == len(bounds):
                break
            n_tgt = int(starts[bounds[phase]])
            chunks = tg.global_sgd(h, model, loss_fn, d, tokens, n_tgt, trace)
            if log is not None:
                log(f"lora_ttt_phase {phase + 1}/{len(bounds)} docs:{bounds[phase]} targets:{n_tgt} "
                    f"sgd_chunks:{chunks} time:{time.perf_counter() - t0:.1f}s")
            phase += 1
            lora = DocLoRA(h, model, R, dev)
            continue
        first = torch.tensor([row_pos[r] if row_doc[r] >= 0 else 0 for r in range(R)], device=dev)
        end = torch.tensor([min(row_pos[r] + C, int(ends[row_doc[r]])) if row_doc[r] >= 0 else 0 for r in range(R)], device=dev)
        ws = torch.tensor([max(int(starts[row_doc[r]]), row_pos[r] + C - T) if row_doc[r] >= 0 else 0 for r in range(R)], device=dev)
        x, y, scored, idx = tg.window_batch(tokens, ws, first, end, T)
        more = [r for r in active if int(end[r]) < int(ends[row_doc[r]])]
        with tg.autocast_ctx(dev), torch.set_grad_enabled(bool(more)):
            nll, score = tg.score_nll(lambda x, y, hints=None: model.token_nll(x, y, lora=lora, hints=hints), x, y, idx, tilt)
        tg.accumulate(score, x, y, scored, idx, luts, sums, nll_out)  # the adapters train on the untilted nll
        if trace is not None:  # read off the masks that are summed and trained on
            trace.extend(("score", *tg.spans(idx[r], scored[r])) for r in range(R) if scored[r].any())
        if more:  # one step per row on the mean NLL of the targets scored above
            m = scored[more].float()
            (nll[more] * m).sum(1).div(m.sum(1)).sum().backward()
            lora.step(torch.tensor(more, device=dev))
            if trace is not None:
                trace.extend(("train", *tg.spans(idx[r], m[i] > 0)) for i, r in enumerate(more))
        for r in active:
            row_pos[r] = int(end[r])
            if row_pos[r] >= ends[row_doc[r]]:
                row_doc[r] = -1
        n_steps += 1
        if log is not None and n_steps % 500 == 0:
            r_ = tg.bpb_from_sums(*sums.tolist())
            log(f"lora_ttt_progress rank0_docs:{qi}/{len(mine)} steps:{n_steps} val_bpb:{r_.val_bpb:.6f} "
                f"time:{time.perf_counter() - t0:.1f}s")
    return tg.finish_eval(sums, nll_out)
