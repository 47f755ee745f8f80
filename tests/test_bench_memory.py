"""tools/bench_memory.py (bench.py --memory): the live-bytes tracker against allocations of known size,
the FA3 stand-in's math and buffers, the fit and its projection, and the tool end to end at a tiny size."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_memory as bm  # noqa: E402
import cuda_contract  # noqa: E402

KB = bm.BLOCK


def test_tracker_counts_known_allocations_frees_and_saved_tensors():
    with bm.LiveBytes() as m:
        r = torch.empty(1000)  # 4000 bytes -> one 4096-byte block, as the CUDA allocator counts it
        assert m.now == 4096
        del r
        a = torch.empty(2**18)  # 1 MiB
        b = torch.empty(3 * 2**18)  # 3 MiB
        assert m.now == 4 * 2**20  # r's block went with the sweep that a's allocation set off
        b.view(-1, 2).add_(1.0)  # a view and an in-place op allocate nothing
        assert m.now == 4 * 2**20
        del a
        c = torch.empty(2**18)  # a is gone before c exists: 4 MiB at most, never 5
        assert m.peak == 4 * 2**20 and m.now == 4 * 2**20
        del b, c
        w = torch.ones(2**16, requires_grad=True)  # 256 KiB
        m.set_label("graph")
        out = w.exp().sum()  # exp's result lives on only inside autograd (saved for backward)
        assert m.now == 2 * 2**18 + KB  # w, the saved exp result, the scalar
        del out
        torch.empty(1)  # the next op sees the graph gone
        assert m.now == 2**18 + KB
        assert m.peaks["graph"] == 2 * 2**18 + KB
        assert m.peak == 4 * 2**20


def test_fa3_standin_matches_autograd_and_allocates_fa3_buffers():
    torch.manual_seed(0)
    N, H, Hkv, D = 40, 4, 2, 16
    q, k, v = (torch.randn(N, h, D, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 7, 25, 40, 40], dtype=torch.int32)  # padded as doc_layout pads
    out = bm.fa3_varlen(q, k, v, cu, cu, 40, 40, causal=True)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    seg = torch.searchsorted(cu, torch.arange(N, dtype=torch.int32), right=True)
    ref = cuda_contract._attend(qr, kr, vr, seg)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), g.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    ws = bm.fa3_bwd(g, q.detach(), k.detach(), v.detach(), out.detach(), cu)[3:]
    padded = -(-(N + 4 * 128) // 128) * 128
    assert [tuple(t.shape) for t in ws] == [(H, padded), (H, padded), (H, padded * 32), (Hkv, padded, 32), (Hkv, padded, 32)]


def test_fit_recovers_the_terms_and_projects_linearly():
    fixed, per_row, per_token = 5e8, 3e6, 2e4
    pts = [(r, t, int(fixed + per_row * r + per_token * r * t)) for r in (1, 2) for t in (128, 256)]
    coef, resid = bm.fit(pts)
    np.testing.assert_allclose(coef, [fixed, per_row, per_token], rtol=1e-6)
    assert resid < 1.0
    p = [bm.project(coef, r, 2048) for r in (16, 32, 48)]
    assert abs((p[2] - p[1]) - (p[1] - p[0])) < 1e-3 * p[0]


def test_drivers_are_the_record_per_gpu_batches():
    h = bm.tg.Hyperparameters()
    d = bm.drivers(h, 8)
    assert d["train_loop_on"] == (48, 2048)  # 786432 / 8 / 2048
    assert d["eval_plain"] == (25, 2560)  # 524288 // (8 * 2560): EVAL_SEQ_LEN 2560 (#2135)
    assert d["ttt_train"] == (2, 2560) and d["lora_sgd"] == (2, 2560)  # a 40960-token chunk: 16 sequences / 8
    assert d["lora"] == (64, 16 * 2560 // 64)  # every row gathered, LORA_MAX_LANES=16 lanes of 2560 tokens


def test_bench_memory_runs_end_to_end_at_a_tiny_size():
    env = {**os.environ, "PRESET": "smoke", "OMP_NUM_THREADS": "1", "NUM_LAYERS": "3", "LOOP_START": "1",
           "LOOP_END": "1", "PARALLEL_RESIDUAL_START": "2", "XSA_LAST_N": "3", "MODEL_DIM": "64", "VOCAB_SIZE": "512"}
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--memory", "--rows", "1", "2",
                          "--seq-lens", "16", "32"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    phases = {}
    for line in res.stdout.splitlines():
        kv = dict(w.split(":", 1) for w in line.split() if ":" in w)
        if line.startswith("phase:"):
            phases[kv["phase"]] = kv
        if line.startswith("fit ") and kv["phase"] in ("train_loop_off", "train_loop_on"):  # activations grow
            assert float(kv["per_token"].removesuffix("KiB")) > 0, line
            assert float(kv["max_residual"].removesuffix("MiB")) < 1.0, line
    assert set(phases) == set(bm.STAGES), sorted(phases)
    assert all(float(p["projected_gib"]) > 0 and p["fits_h100"] == "yes" for p in phases.values()), phases
    assert "peak_phase:" in res.stdout and "modelled val_tokens:" in res.stdout
