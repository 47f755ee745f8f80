#!/usr/bin/env python3
"""Per-GPU training-step benchmark for train_gpt.py on synthetic tokens (no data files needed).

Builds the model from Hyperparameters.from_env() (so PRESET / env overrides apply) on CUDA if
available, else CPU, and times training steps of one micro-batch: train_batch_tokens // 8 tokens
(98,304 for the record config, i.e. what each of 8 GPUs processes per optimizer step) shaped
[-1, train_seq_len]. A step is forward + backward + grad clip + optimizer step + EMA update, as in
the trainer's timed region, but single-process: no gradient all-reduce, and Muon orthogonalises
every matrix (on 8 GPUs each rank does 1/8 of them), so Muon time is overstated. Each loop mode is
measured separately (looping off, then on when NUM_LOOPS > 0). On CUDA: bf16 autocast, and
torch.compile(fullgraph=True, dynamic=False) when COMPILE is true.

    python3 tools/bench.py                        # GPU, record config
    PRESET=smoke python3 tools/bench.py           # CPU smoke config
    NUM_LAYERS=12 python3 tools/bench.py --steps 100 --peak-tflops 989

Output: `key:value` lines; one `mode:...` line per loop mode.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def matmul_flops_per_token(model: tg.GPT, h: tg.Hyperparameters, looping: bool) -> int:
    """Model training FLOPs per token for one loop mode.

    6 x (weight-matrix params of a block, counted once per layer application, + embed_proj/head_proj
    + the tied head d_embed x V) + 12 x applications x seq_len x model_dim / 2 (QK^T and AV, forward
    and backward, halved for the causal mask). The embedding lookup, norms and Muon are not counted.
    """
    sched = model.schedules[looping]
    per_block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.blocks]
    applied = sum(per_block[i] for i in sched.encoder + sched.decoder)
    projs = sum(m.weight.numel() for m in (model.embed_proj, model.head_proj) if m is not None)
    head = h.model_dim_embed * h.vocab_size
    n_apps = len(sched.encoder) + len(sched.decoder)
    return 6 * (applied + projs + head) + 12 * n_apps * h.train_seq_len * h.model_dim // 2


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process-lifetime peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(h: tg.Hyperparameters, model: tg.GPT, device: torch.device):
    """One training step on (x, y); mirrors Trainer.train_step + update_ema for a single micro-batch."""
    opts = tg.build_optimizers(h, model, tg.Dist(0, 1, 0, device))
    run = torch.compile(model, dynamic=False, fullgraph=True) if (h.compile and device.type == "cuda") else model
    params = list(model.parameters())
    ema = [t.detach().float().clone() for t in model.state_dict().values()]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with tg.autocast_ctx(device):
            loss = run(x, y)
        loss.backward()
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, h.grad_clip_norm)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [t.float() for t in model.state_dict().values()], 1 - h.ema_decay)
        return loss.detach()

    return step


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="Per-GPU training-step benchmark on synthetic tokens.")
    p.add_argument("--warmup", type=int, default=20 if cuda else 1, help="untimed steps per loop mode (default: 20 GPU, 1 CPU)")
    p.add_argument("--steps", type=int, default=50 if cuda else 2, help="timed steps per loop mode (default: 50 GPU, 2 CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s per GPU for MFU (H100 SXM bf16: 989)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        h = tg.Hyperparameters.from_env()
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(device)
    step = make_step(h, model, device)
    tokens = h.train_batch_tokens // 8
    data = torch.randint(0, h.vocab_size, (tokens + 1,), device=device)
    x, y = data[:-1].view(-1, h.train_seq_len), data[1:].view(-1, h.train_seq_len)  # [B, T]

    name = f"{device} ({torch.cuda.get_device_name(device)})" if cuda else "cpu"
    print(f"device:{name}")
    print(f"torch:{torch.__version__} compile:{int(h.compile and cuda)} autocast:{'bf16' if cuda else 'off'}")
    print(f"model_params:{tg.count_params(model)}")
    print(f"micro_batch:{x.size(0)}x{x.size(1)} tokens:{tokens} warmup:{args.warmup} steps:{args.steps}")
    for looping in [False, True] if h.looping_enabled else [False]:
        tg.set_looping(model, looping)
        for _ in range(args.warmup):
            step(x, y)
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(x, y)
        sync(device)
        sec = (time.perf_counter() - t0) / args.steps
        flops = matmul_flops_per_token(model, h, looping)
        mfu = f"{100 * flops * tokens / sec / (args.peak_tflops * 1e12):.1f}%" if cuda else "n/a"
        print(f"mode:looping_{'on' if looping else 'off'} ms/step:{sec * 1000:.2f} tokens/s:{tokens / sec:.0f} "
              f"peak_mem_mib:{peak_memory_mib(device):.0f} flops/token:{flops} mfu:{mfu} loss:{loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
