"""The training step's distributed paths: cu_seqlens from the loader thread, no host sync per step,
gradients reduced to their owners, one training clock for every rank; the same weights as one process."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

import cuda_contract
import train_gpt as tg
from conftest import TINY

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
BOS = tg.BOS_ID


def quiet(msg: str, console: bool = True) -> None:
    pass


def test_host_cu_seqlens_equals_device_layout():
    gen = torch.Generator().manual_seed(0)
    B, T = 4, 100
    cases = [torch.randint(2, 50, (B, T), generator=gen) for _ in range(3)]  # no BOS: one segment per row
    for rate in (0.02, 0.2, 0.6, 1.0):
        x = torch.randint(2, 50, (B, T), generator=gen)
        x[torch.rand(B, T, generator=gen) < rate] = BOS
        cases.append(x)
    for n in (tg.CU_BUCKET - 1, tg.CU_BUCKET, 2 * tg.CU_BUCKET - 1):  # n starts + the end: one bucket full, one over, two full
        x = torch.full((B, T), 7)
        x.view(-1)[torch.randperm(B * T, generator=gen)[: n - B]] = BOS
        x[:, 0] = 7
        cases.append(x)
    sizes = set()
    for x in cases:
        want = tg.doc_layout(x, varlen=True).cu_seqlens
        got = tg.host_cu_seqlens(torch.cat([x, x[:, :1]], 1)[:, :-1])  # a strided view, as the loader's x
        assert got.dtype == torch.int32 and torch.equal(got, want)
        sizes.add(got.numel())
    assert sizes >= {tg.CU_BUCKET, 2 * tg.CU_BUCKET}


class HostReads(TorchFunctionMode):
    """Records the calls that read a tensor's values on the host (a device sync on a GPU)."""

    NAMES = {"tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls, self.allowed = [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES and not self.allowed:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_training_loop_has_no_host_sync_per_step(dataset, monkeypatch):
    """Under the CUDA contract (FA3 varlen stand-in): the varlen kernel gets the loader's cu_seqlens, equal
    to the device-built ones; the only host read per step is the previous step's flags (read_flags)."""
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    seen = []
    varlen = tg._fa3_varlen
    monkeypatch.setattr(tg, "_fa3_varlen", lambda q, k, v, cu, *a, **kw: seen.append(cu) or varlen(q, k, v, cu, *a, **kw))
    paths = tg.shard_paths(str(dataset), "train")
    counts = {}
    for n in (2, 5):
        h = tg.Hyperparameters(**{**TINY, "iterations": n, "train_log_every": 1000, "compile": False})
        torch.manual_seed(h.seed)
        tr = tg.Trainer(h, CPU, quiet, tg.GPT(h), paths)
        read, timed = tr.read_flags, []
        sync_time = tr.sync_time
        tr.sync_time = lambda: timed.append(1) or sync_time()
        mode = HostReads()

        def read_flags(pending):
            mode.allowed = True
            try:
                return read(pending)
            finally:
                mode.allowed = False

        tr.read_flags = read_flags
        seen.clear()
        with mode:
            tr.run(lambda m: None)
        counts[n] = (len(mode.calls), len(timed))
        assert len(timed) == 2, "the training clock synchronizes at its start and end only"
        ref = tg.TrainLoader(paths, h.train_seq_len, h.seed)
        want = [tg.doc_layout(ref.next_batch(tr.seqs_per_micro, 0, 1)[0], varlen=True).cu_seqlens for _ in range(8 * n)]
        distinct = [c for i, c in enumerate(seen) if i == 0 or c is not seen[i - 1]]
        assert len(distinct) == len(want) and all(torch.equal(a, b) for a, b in zip(distinct, want))
    assert counts[2] == counts[5], f"host reads grow with the steps: {counts}"  # the log lines' loss.item() only


def run_steps(h, d: tg.Dist, paths, steps: int = 3):
    """Weights after `steps` steps, and the first step's gradients that this rank holds in full, before
    and after the clip."""
    torch.manual_seed(h.seed)
    tr = tg.Trainer(h, d, quiet, tg.GPT(h), paths)
    mine = {id(p) for p in tr.sync.mine} if tr.sync else {id(p) for p in tr.params}
    pre, post = {}, {}

    def snap(grads: dict, f):
        def wrapped(*a, **kw):
            grads.update({} if grads else {i: p.grad.clone() for i, p in enumerate(tr.params) if id(p) in mine})
            return f(*a, **kw)
        return wrapped

    adam, clip = tr.opts[0], torch.nn.utils.clip_grad_norm_
    adam.step = snap(post, adam.step)
    if tr.sync:
        tr.sync.clip_ = snap(pre, tr.sync.clip_)
    torch.nn.utils.clip_grad_norm_ = snap(pre, clip)
    try:
        for s in range(steps):
            tg.set_looping(tr.base, s == steps - 1)  # both loop modes
            tr.train_step(s, 1.0 - 0.2 * s)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return [p.detach().clone() for p in tr.base.parameters()], pre, post


def budget_run(h, d: tg.Dist, paths, skew: float) -> list:
    """A run on the clock whose rank-local clock runs `skew` times fast: the LR multiplier and loop mode of
    every step, as this rank applied them."""
    import time

    perf = time.perf_counter
    t0 = perf()
    tg.time.perf_counter = lambda: t0 + (perf() - t0) * skew
    torch.manual_seed(h.seed)
    tr = tg.Trainer(h, d, quiet, tg.GPT(h), paths)
    applied, step = [], tr.train_step
    tr.train_step = lambda s, lr: applied.append((s, lr, tr.base.looping_active)) or step(s, lr)
    try:
        tr.run(lambda m: None)
    finally:
        tg.time.perf_counter = perf
    return applied


CLOCK = dict(max_wallclock_seconds=1.5, gptq_reserve_seconds=0.0, iterations=10_000, train_log_every=10_000,
             warmdown_frac=0.9, enable_looping_at=0.5)


def _worker(rank: int, init: str, out: str, paths: list[str]):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    d = tg.Dist(rank, 2, 0, torch.device("cpu"))
    weights = run_steps(tg.Hyperparameters(**TINY), d, paths)
    applied = budget_run(tg.Hyperparameters(**{**TINY, **CLOCK}), d, paths, skew=1.0 + 2.0 * rank)
    torch.save((weights, applied), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_match_one_and_share_one_clock(dataset, tmp_path):
    """Three steps (grad clip on, both loop modes) give one process's weights on two; and with rank 1's
    own clock three times fast, both ranks apply the same LR and loop mode at every step and stop together."""
    paths = tg.shard_paths(str(dataset), "train")
    out = str(tmp_path / "w")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", out, paths), nprocs=2, join=True)
    ref = run_steps(tg.Hyperparameters(**TINY), CPU, paths)
    ((w0, *g0), a0), ((w1, *g1), a1) = (torch.load(f"{out}.{r}") for r in range(2))
    for a, b, c in zip(ref[0], w0, w1):
        assert torch.equal(b, c)  # every rank applies the same updates
        torch.testing.assert_close(b, a, rtol=0, atol=5e-6)  # the flat all-reduce of before: 2.2e-6 here
    for k in (0, 1):  # before and after the clip
        assert set(g0[k]) | set(g1[k]) == set(ref[k + 1]) and set(g0[k]) - set(g1[k])  # a Muon gradient on its owner only
        for g in (g0[k], g1[k]):
            for i, t in g.items():
                torch.testing.assert_close(t, ref[k + 1][i], rtol=1e-4, atol=1e-8)  # averaged (and clipped) as on one process
    assert len(a0) > 3 and a0 == a1
    assert a0[-1][1] < 1.0 and a0[-1][2]  # the clock reached the warmdown and the looping switch


def test_muon_owners_balance_and_bytes_per_step():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(tg.__file__).parent / "tools"))
    import comm_bytes

    assert tg.muon_owners([4, 1, 4, 2, 1], 2) == [0, 1, 1, 0, 1]  # largest first to the least loaded: 6 and 6
    r = comm_bytes.step_bytes([4, 4], [2], 2)  # W=2: all-reduce sends 1x the buffer, gather/reduce 0.5x
    assert r["before"] == 4 * 10 + 4 * 8 and r["after"] == 0.5 * 4 * 8 + 4 * 2 + 0.5 * 2 * 2 * 4 + 4
