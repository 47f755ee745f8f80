#!/usr/bin/env python3
"""How fast is a training step of train_gpt.py (synthetic tokens, no data files)? `python3 tools/bench.py`

Training-step benchmark of train_gpt.py on synthetic tokens (no data files needed).

Runs the real Trainer (prefetching loader, micro-step accumulation, gradient all-reduce, Muon
sharded over ranks, clip, EMA) of Hyperparameters.from_env() on every rank it is launched with, over
a synthetic shard written to a temporary directory. Each loop mode is warmed up (compile) and then
timed separately. Prints ms/step, tokens/s per GPU, peak memory, model FLOPs per token and MFU
against the GPU's bf16 dense peak (--peak-tflops).

    python3 tools/bench.py                                          # one GPU, grad accumulation 8
    torchrun --standalone --nproc_per_node=8 tools/bench.py         # the record setting
    PRESET=smoke python3 tools/bench.py                             # CPU smoke config
    python3 tools/bench.py --memory                                 # peak memory per phase, projected (CPU)
    python3 tools/bench.py --compare "" "NUM_LAYERS=12 MLP_MULT=3"  # A/B, alternating, ratio B/A

Output: `key:value` lines; one `mode:...` line per loop mode (rank 0).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory  # noqa: E402
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


def synthetic_shard(path: str, n_tokens: int, vocab: int, seed: int) -> None:
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, n_tokens
    toks = np.random.default_rng(seed).integers(2, vocab, n_tokens, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())


def bench(args) -> int:
    d = tg.setup_distributed()
    h = tg.Hyperparameters.from_env()
    cuda = d.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(h.seed)
    modes = [False, True] if h.looping_enabled else [False]
    steps_total = len(modes) * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "fineweb_train_000000.bin")
        # Enough windows that no step reads one twice (the loader reshuffles per epoch anyway).
        synthetic_shard(shard, (steps_total + 2) * h.train_batch_tokens * 9 // 8 + h.train_seq_len + 1, h.vocab_size, h.seed)
        model = tg.GPT(h).to(d.device)
        trainer = tg.Trainer(h, d, tg.Logger(d, None), model, [shard])
        tokens = h.train_batch_tokens // d.world_size  # per GPU per optimizer step
        if d.is_main:
            name = f"{d.device} ({torch.cuda.get_device_name(d.device)})" if cuda else "cpu"
            print(f"device:{name} world_size:{d.world_size} grad_accum:{d.grad_accum}")
            print(f"torch:{torch.__version__} compile:{int(h.compile and cuda)} autocast:{'bf16' if cuda else 'off'} "
                  f"attention:{'fa3' if tg._fa3_func is not None and cuda else 'sdpa'}")
            print(f"model_params:{tg.count_params(model)} tokens_per_step_per_gpu:{tokens} warmup:{args.warmup} steps:{args.steps}")
        for looping in modes:
            tg.set_looping(model, looping)
            t0 = time.perf_counter()
            for s in range(args.warmup):
                trainer.train_step(s, 1.0)
                trainer.update_ema()
            warm = trainer.sync_time() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats(d.device)
            t0 = trainer.sync_time()
            for s in range(args.steps):
                loss = trainer.train_step(s, 1.0)
                trainer.update_ema()
            sec = (trainer.sync_time() - t0) / args.steps
            flops = matmul_flops_per_token(model, h, looping)
            mfu = f"{100 * flops * tokens / sec / (args.peak_tflops * 1e12):.1f}%" if cuda else "n/a"
            if d.is_main:
                print(f"mode:looping_{'on' if looping else 'off'} ms/step:{sec * 1000:.2f} tokens/s_per_gpu:{tokens / sec:.0f} "
                      f"peak_mem_mib:{peak_memory_mib(d.device):.0f} flops/token:{flops} mfu:{mfu} "
                      f"warmup:{warm:.1f}s loss:{loss.item():.4f}", flush=True)
    tg.shutdown_distributed(d)
    return 0


def parse_env(spec: str) -> dict:
    out = {}
    for kv in spec.split():
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"error: --compare expects KEY=VALUE words, got {kv!r}")
        out[k] = v
    return out


def compare(args) -> int:
    """Run configs A and B alternately in fresh processes; report each one's median ms/step and B/A."""
    base = [sys.executable, os.path.abspath(__file__), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--peak-tflops", str(args.peak_tflops)]
    results: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    for r in range(args.rounds):
        for label, spec in zip("AB", args.compare):
            res = subprocess.run(base, env={**os.environ, **parse_env(spec)}, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"error: config {label} ({spec or 'defaults'}) failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 2
            for line in res.stdout.splitlines():
                if line.startswith("mode:"):
                    kv = dict(w.split(":", 1) for w in line.split())
                    results[label].setdefault(kv["mode"], []).append(float(kv["ms/step"]))
            print(f"round:{r + 1} config:{label} " + " ".join(f"{m}:{v[-1]:.2f}ms" for m, v in results[label].items()), flush=True)
    for mode in results["A"]:
        a, b = statistics.median(results["A"][mode]), statistics.median(results["B"].get(mode, [float("nan")]))
        print(f"compare mode:{mode} A_ms/step:{a:.2f} B_ms/step:{b:.2f} ratio_B/A:{b / a:.4f}")
    return 0


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="Training-step benchmark on synthetic tokens.")
    p.add_argument("--warmup", type=int, default=20 if cuda else 1, help="untimed steps per loop mode (default: 20 GPU, 1 CPU)")
    p.add_argument("--steps", type=int, default=50 if cuda else 2, help="timed steps per loop mode (default: 50 GPU, 2 CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s per GPU for MFU (H100 SXM bf16: 989)")
    p.add_argument("--compare", nargs=2, metavar=("ENV_A", "ENV_B"), help='two "KEY=VALUE ..." env sets to run alternately')
    p.add_argument("--rounds", type=int, default=2, help="alternations for --compare")
    p.add_argument("--memory", action="store_true", help="peak memory of every phase on CPU, projected to 8 GPUs (tools/bench_memory.py)")
    bench_memory.add_args(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.memory:
        bench_memory.check_args(p, args)
    try:
        if args.memory:
            return bench_memory.run(args)
        return compare(args) if args.compare else bench(args)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
