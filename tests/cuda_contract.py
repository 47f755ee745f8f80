"""The CUDA contract on CPU: run train_gpt's GPU code paths where no GPU is, under the GPU's rules.

install(tg) switches train_gpt to its CUDA paths on the CPU (tg.CUDA_CONTRACT: bf16 autocast through
autocast_ctx, compile where COMPILE=1, bf16 Newton-Schulz, fused AdamW) and installs FlashAttention 3
stand-ins as tg._fa3_func / tg._fa3_varlen, so uses_varlen is true and every document-masked forward
takes the cu_seqlens path. The stand-ins refuse what FA3's interface refuses (hopper/flash_api.cpp:
q, k, v of one dtype among fp16/bf16/fp8_e4m3, contiguous last dim, int32 contiguous cu_seqlens,
(total, H, D) varlen layout with H a multiple of the KV heads, head dim <= 256 and a multiple of 8,
max_seqlen covering every segment) and compute the attention in fp32 PyTorch; and a grouped_mm
stand-in (the LoRA stage's adapters) that refuses what CUDA's torch._grouped_mm refuses. They are custom ops, as
FA3's are, so a compiled graph treats them as opaque kernels; the checks also run on fake tensors,
so a contract breach fails at trace time too.

rms_norm_fp32=True simulates the autocast policy of torch >= 2.12, where rms_norm runs in fp32 and
returns fp32 under autocast (torch 2.13's CPU autocast keeps it in bf16, so the CUDA policy is mimicked).

    python tests/cuda_contract.py [--rms-norm-fp32] [--tuple-return] [--compile-backend B]
runs train_gpt.main() under the contract (env vars configure the run, as for train_gpt.py).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

FA3_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
CALLS = {"func": 0, "varlen": 0, "grouped_mm": 0}  # kernel launches, eager or from a compiled graph (counted in the op: a
# counter read while tracing would become a guard, and every call would recompile)


class ContractError(RuntimeError):
    """What FA3 would raise (a RuntimeError from its C++ checks)."""


def _check_qkv(q, k, v, rank: int):
    for t in (q, k, v):
        if t.dim() != rank:
            raise ContractError(f"FA3 stand-in: expected {rank}-d q/k/v, got shape {tuple(t.shape)}")
    if q.dtype not in FA3_DTYPES:
        raise ContractError(f"FlashAttention only supports fp16, bf16, and fp8_e4m3 data type (got q {q.dtype})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ContractError(f"query and key/value must have the same dtype (q {q.dtype}, k {k.dtype}, v {v.dtype})")
    for name, t in zip("qkv", (q, k, v)):
        if t.stride(-1) != 1:
            raise ContractError(f"Input tensor {name} must have contiguous last dimension")
    D = q.size(-1)
    if k.size(-1) != D or v.size(-1) != D:
        raise ContractError("FA3 stand-in: q, k, v head dims differ")
    if D > 256 or D % 8:
        raise ContractError(f"FlashAttention forward only supports head dimension at most 256 and a multiple of 8 (got {D})")
    H, Hkv = q.size(-2), k.size(-2)
    if v.size(-2) != Hkv or H % Hkv:
        raise ContractError(f"Number of heads in key/value must divide number of heads in query ({H} vs {Hkv})")


def _attend(q, k, v, seg):
    """Causal attention of q [N,H,D] over k, v [N,Hkv,D] within equal seg ids, fp32; out in q's dtype."""
    N, H, D = q.shape
    rep = H // k.size(1)
    qf, kf, vf = q.float().transpose(0, 1), k.float().repeat_interleave(rep, 1).transpose(0, 1), v.float().repeat_interleave(rep, 1).transpose(0, 1)
    pos = torch.arange(N, device=q.device)
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask[None])
    return out.transpose(0, 1).contiguous().to(q.dtype)  # FA3 returns a contiguous (…, H, D) tensor


@torch.library.custom_op("fa3_standin::fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _check_qkv(q, k, v, 4)
    CALLS["func"] += 1
    B, T = q.shape[:2]
    seg = torch.arange(B, device=q.device).repeat_interleave(T)
    return _attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), seg).view(q.shape)


@_fwd.register_fake
def _(q, k, v):
    _check_qkv(q, k, v, 4)
    return torch.empty_like(q)


def _check_cu(cu, total: int, max_seqlen: int):
    if cu.dtype != torch.int32:
        raise ContractError(f"cu_seqlens_q must have dtype int32 (got {cu.dtype})")
    if cu.dim() != 1 or not cu.is_contiguous():
        raise ContractError("cu_seqlens_q must be a contiguous 1-d tensor")


def _check_cu_values(cu, total: int, max_seqlen: int):
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ContractError(f"FA3 stand-in: cu_seqlens must rise from 0 to total={total}: {c[:8]}...{c[-4:]}")
    if max(b - a for a, b in zip(c, c[1:])) > max_seqlen:
        raise ContractError(f"FA3 stand-in: a segment is longer than max_seqlen={max_seqlen}")


@torch.library.custom_op("fa3_standin::varlen", mutates_args=())
def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            max_q: int, max_k: int) -> torch.Tensor:
    _check_qkv(q, k, v, 3)
    _check_cu(cu_q, q.size(0), max_q)
    _check_cu(cu_k, k.size(0), max_k)
    _check_cu_values(cu_q, q.size(0), max_q)
    CALLS["varlen"] += 1
    if not torch.equal(cu_q, cu_k):
        raise ContractError("FA3 stand-in: self-attention needs cu_seqlens_q == cu_seqlens_k")
    pos = torch.arange(q.size(0), device=q.device, dtype=torch.int32)
    seg = torch.searchsorted(cu_q, pos, right=True)
    return _attend(q, k, v, seg)


@_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    _check_qkv(q, k, v, 3)
    _check_cu(cu_q, q.size(0), max_q)
    _check_cu(cu_k, k.size(0), max_k)
    return torch.empty_like(q)


def _register_autograd(op, n_tensors: int):
    """Backward by recomputing the fp32 attention with autograd (the stand-in is not under test there)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.rest = inputs[n_tensors:]

    def backward(ctx, g):
        saved = ctx.saved_tensors
        q, k, v = (t.detach().float().requires_grad_() for t in saved[:3])
        with torch.enable_grad():
            if n_tensors == 3:
                B, T = q.shape[:2]
                seg = torch.arange(B, device=q.device).repeat_interleave(T)
                out = _attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), seg).view(q.shape)
            else:
                pos = torch.arange(q.size(0), device=q.device, dtype=torch.int32)
                out = _attend(q, k, v, torch.searchsorted(saved[3], pos, right=True))
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g.float())
        grads = [dq.to(saved[0].dtype), dk.to(saved[1].dtype), dv.to(saved[2].dtype)]
        return tuple(grads) + (None,) * (n_tensors - 3 + len(ctx.rest))

    op.register_autograd(backward, setup_context=setup)


_register_autograd(_fwd, 3)
_register_autograd(_varlen, 5)


def fa3_func(q, k, v, causal: bool = False, tuple_return: bool = False):
    if not causal:
        raise ContractError("FA3 stand-in: train_gpt only ever calls causal attention")
    out = _fwd(q, k, v)
    return (out, None) if tuple_return else out


def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal: bool = False,
               tuple_return: bool = False):
    if not causal:
        raise ContractError("FA3 stand-in: train_gpt only ever calls causal attention")
    out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    return (out, None) if tuple_return else out


def rms_norm_fp32(x):
    """torch >= 2.12's CUDA autocast policy for rms_norm: inputs cast to fp32, fp32 out."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.float(), (x.size(-1),))
    return F.rms_norm(x, (x.size(-1),))


def grouped_mm(x, w, offs):
    """torch._grouped_mm as CUDA runs it (aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp):
    bf16 operands, a 2-d x [N, K] and a 3-d w [G, K, n], int32 offs [G] ending each group, each
    matrix's last dim contiguous and its row stride a multiple of 16 bytes. The CPU kernel accepts
    fp32 and any layout, so without this stand-in a wrong dtype only fails on the GPU."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ContractError(f"grouped_mm on CUDA takes bf16 operands (got {x.dtype} @ {w.dtype})")
    if x.dim() != 2 or w.dim() != 3 or offs.dim() != 1 or offs.dtype != torch.int32 or offs.numel() != w.size(0):
        raise ContractError(f"grouped_mm stand-in: 2-d @ 3-d with int32 offs per group (got {tuple(x.shape)} @ {tuple(w.shape)}, offs {offs.dtype} {tuple(offs.shape)})")
    for name, t in (("mat_a", x), ("mat_b", w)):
        if t.stride(-1) != 1 or t.stride(-2) % 8:
            raise ContractError(f"grouped_mm stand-in: {name} needs a contiguous last dim and 16-byte aligned rows (strides {t.stride()})")
    if x.size(1) != w.size(1):
        raise ContractError(f"grouped_mm stand-in: contraction dims differ ({x.size(1)} vs {w.size(1)})")
    if not torch.compiler.is_compiling():  # values exist only in eager runs (the compiled graph's are checked there)
        if (offs.diff() < 0).any() or int(offs[-1]) > x.size(0):
            raise ContractError("grouped_mm stand-in: offs must rise and end within the rows")
        CALLS["grouped_mm"] += 1
    return torch._grouped_mm(x, w, offs=offs)


def install(tg, rms_fp32: bool = False, tuple_return: bool = False, monkeypatch=None) -> None:
    """Switch module tg (train_gpt) to its CUDA paths on CPU; with monkeypatch, undone after the test."""
    values = {"CUDA_CONTRACT": True,
              "_fa3_func": functools.partial(fa3_func, tuple_return=tuple_return),
              "_fa3_varlen": functools.partial(fa3_varlen, tuple_return=tuple_return), "grouped_mm": grouped_mm}
    if rms_fp32:
        values["rms_norm"] = rms_norm_fp32
    for name, value in values.items():
        if monkeypatch is not None:
            monkeypatch.setattr(tg, name, value)
        else:
            setattr(tg, name, value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run train_gpt.main() under the CUDA contract on CPU")
    ap.add_argument("--rms-norm-fp32", action="store_true", help="simulate torch >= 2.12's rms_norm autocast policy")
    ap.add_argument("--tuple-return", action="store_true", help="stand-ins return (out, lse), as older FA3 builds")
    ap.add_argument("--compile-backend", default="", help="torch.compile backend (e.g. aot_eager); default inductor")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_gpt as tg

    install(tg, args.rms_norm_fp32, args.tuple_return)
    if args.compile_backend:
        tg.torch.compile = functools.partial(torch.compile, backend=args.compile_backend)
    return tg.main()


if __name__ == "__main__":
    sys.exit(main())
