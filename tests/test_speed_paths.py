"""The fast paths give the same numbers as the plain ones: batched Newton-Schulz, Muon sharded over
ranks, the prefetching loader; and the benchmark tool's numbers agree with the model on CPU."""
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import REPO, TINY, clean_environ, tiny_env

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def test_batched_newton_schulz_equals_per_matrix():
    g = torch.randn(5, 48, 80, generator=torch.Generator().manual_seed(0))
    batched = tg.newton_schulz(g, 5)
    single = torch.stack([tg.newton_schulz(m, 5) for m in g])
    assert torch.allclose(batched, single, atol=1e-5)
    tall = torch.randn(3, 96, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(tg.newton_schulz(tall, 5), torch.stack([tg.newton_schulz(m, 5) for m in tall]), atol=1e-5)


def muon_params(seed: int = 0):
    """Mixed shapes so that sharding, per-shape batching and the flat offsets all matter."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(32, 64), (64, 32), (32, 64), (16, 16), (32, 64), (64, 32), (8, 40)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    return ps, grads


def run_muon(rank: int, world: int) -> list[torch.Tensor]:
    ps, grads = muon_params()
    opt = tg.Muon(ps, lr=0.02, momentum=0.95, backend_steps=5, weight_decay=0.1, rank=rank, world_size=world)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in ps]


def _muon_worker(rank: int, world: int, init: str, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.save(run_muon(rank, world), f"{out}.{rank}")
    dist.barrier()  # neither rank tears down its gloo threads while the other still talks to it
    dist.destroy_process_group()


def test_sharded_muon_matches_unsharded(tmp_path):
    ref = run_muon(0, 1)
    out = str(tmp_path / "muon")
    mp.spawn(_muon_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, atol=1e-6)


def test_prefetching_loader_keeps_the_stream(dataset):
    h = tg.Hyperparameters(**TINY)
    paths = tg.shard_paths(str(dataset), "train")
    tr = tg.Trainer(h, CPU, tg.Logger(CPU, None), tg.GPT(h), paths)
    ref = tg.TrainLoader(paths, h.train_seq_len, h.seed)
    for _ in range(5):
        x, y = tr.next_micro_batch()
        rx, ry = ref.next_batch(tr.seqs_per_micro, 0, 1)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    tr.rewind_loader()
    x, _ = tr.next_micro_batch()
    assert torch.equal(x, tg.TrainLoader(paths, h.train_seq_len, h.seed).next_batch(tr.seqs_per_micro, 0, 1)[0])


def run_bench(args, env_over):
    env = {**clean_environ(), **tiny_env(), **env_over, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def bench_modes(stdout: str) -> dict[str, dict[str, str]]:
    modes = [dict(w.split(":", 1) for w in l.split()) for l in stdout.splitlines() if l.startswith("mode:")]
    return {m["mode"]: m for m in modes}


def test_bench_numbers_are_consistent_with_the_model():
    res = run_bench(["--steps", "1", "--warmup", "0"], {})
    assert res.returncode == 0, res.stderr[-2000:]
    h = tg.Hyperparameters(**TINY)
    model = tg.GPT(h)
    head = dict(w.split(":", 1) for w in next(l for l in res.stdout.splitlines() if l.startswith("model_params:")).split())
    assert int(head["model_params"]) == tg.count_params(model)
    tokens = int(head["tokens_per_step_per_gpu"])
    assert tokens == h.train_batch_tokens
    modes = bench_modes(res.stdout)
    assert list(modes) == ["looping_off", "looping_on"]
    # FLOPs per token as documented: 6 x (weight matrices of each layer application + tied head)
    # + 6 x applications x seq_len x d (causal attention), from the parameter shapes
    matrices = [sum(p.numel() for n, p in b.named_parameters() if tg.param_group(n, p) == "muon") for b in model.blocks]
    for mode, looping in (("looping_off", False), ("looping_on", True)):
        m, sched = modes[mode], model.schedules[looping]
        apps = sched.encoder + sched.decoder
        flops = 6 * (sum(matrices[i] for i in apps) + h.vocab_size * h.model_dim) + 6 * len(apps) * h.train_seq_len * h.model_dim
        assert int(m["flops/token"]) == flops, mode
        ms = float(m["ms/step"])
        assert ms > 0 and abs(float(m["tokens/s_per_gpu"]) - tokens / (ms / 1000)) <= 1
        assert float(m["peak_mem_mib"]) > 0 and m["mfu"] == "n/a" and m["warmup"] == "0.0s"
    # the first timed step is the first step: the loss of uniform guessing
    assert abs(float(modes["looping_off"]["loss"]) - math.log(h.vocab_size)) < 0.02


def test_bench_compare_reports_medians_and_ratio():
    res = run_bench(["--steps", "1", "--warmup", "0", "--rounds", "1", "--compare", "", "NUM_LOOPS=0"], {})
    assert res.returncode == 0, res.stderr[-2000:]
    rounds = {l.split()[1]: dict(w.split(":", 1) for w in l.split()[2:]) for l in res.stdout.splitlines()
              if l.startswith("round:")}
    assert set(rounds["config:A"]) == {"looping_off", "looping_on"}
    assert set(rounds["config:B"]) == {"looping_off"}  # NUM_LOOPS=0 reached config B's process only
    line = next(l for l in res.stdout.splitlines() if l.startswith("compare mode:looping_off"))
    kv = dict(w.split(":", 1) for w in line.split()[1:])
    assert float(kv["A_ms/step"]) == float(rounds["config:A"]["looping_off"].rstrip("ms"))  # median of 1 round
    assert float(kv["B_ms/step"]) == float(rounds["config:B"]["looping_off"].rstrip("ms"))
    assert float(kv["ratio_B/A"]) == pytest.approx(float(kv["B_ms/step"]) / float(kv["A_ms/step"]), rel=1e-3)
