"""The frontier training stack: document-masked attention, SmearGate, the attention-output gate,
Polar Express, fused softcapped CE, and the compiled graph; each against an independent reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
BOS = tg.BOS_ID


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def docs_row(lengths, gen, vocab=1024) -> torch.Tensor:
    """One row of documents [BOS] + body, bodies drawn without BOS; lengths include the BOS."""
    parts = []
    for n in lengths:
        body = torch.randint(2, vocab, (n - 1,), generator=gen)
        parts.append(torch.cat([torch.tensor([BOS]), body]))
    return torch.cat(parts)


def perturbed_model(h, seed=0) -> tg.GPT:
    """Off the zero/identity init so that every gate, smear and lane carries signal."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# --- document-masked attention --------------------------------------------------------------------


def reference_segments(ids):
    """(row, start, end) of each segment: a row start or a BOS opens one."""
    out = []
    for b, row in enumerate(ids.tolist()):
        starts = sorted({0} | {t for t, v in enumerate(row) if v == BOS})
        out += [(b, s, e) for s, e in zip(starts, starts[1:] + [len(row)])]
    return out


def per_segment_attention(q, k, v, segs):
    """Each segment attended alone with plain causal SDPA: the independent reference."""
    y = torch.zeros_like(q)
    for b, s, e in segs:
        t = lambda z: z[b : b + 1, s:e].transpose(1, 2)  # noqa: E731
        y[b, s:e] = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True).transpose(1, 2)[0]
    return y


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """CPU stand-in for FA3 flash_attn_varlen_func, written from its contract (packed [N,H,D])."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    cu = cu_q.tolist()
    y = torch.zeros_like(q)
    for s, e in zip(cu, cu[1:]):
        if e > s:
            assert e - s <= max_q
            t = lambda z: z[None, s:e].transpose(1, 2)  # noqa: E731
            y[s:e] = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True).transpose(1, 2)[0]
    return y


def test_doc_attention_equals_each_segment_alone(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.cat([torch.randint(2, 1024, (5,), generator=gen), docs_row([20, 9, 30], gen)]),
                       docs_row([1, 40, 23], gen), torch.randint(2, 1024, (64,), generator=gen)])
    q, k, v = torch.randn(3, 64, 4, 16, generator=gen), torch.randn(3, 64, 2, 16, generator=gen), torch.randn(3, 64, 2, 16, generator=gen)
    ref = per_segment_attention(q, k, v, reference_segments(ids))
    torch.testing.assert_close(tg.attention(q, k, v, tg.doc_layout(ids, varlen=False)), ref, rtol=1e-5, atol=1e-6)
    # the FA3 varlen path: boundary list = segment starts of the flattened batch, padded to a bucket
    layout = tg.doc_layout(ids, varlen=True)
    starts = [b * 64 + s for b, s, _ in reference_segments(ids)]
    cu = layout.cu_seqlens.tolist()
    assert layout.mask is None and len(cu) % tg.CU_BUCKET == 0
    assert cu[: len(starts)] == starts and set(cu[len(starts):]) == {3 * 64}
    monkeypatch.setattr(tg, "_fa3_varlen", fake_varlen)
    torch.testing.assert_close(tg.attention(q, k, v, layout), ref, rtol=1e-5, atol=1e-6)
    # off: exactly the plain causal call of before
    plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    assert torch.equal(tg.attention(q, k, v, None), plain.transpose(1, 2))


def test_varlen_warmup_batches_fill_every_boundary_bucket():
    """The compile warmup of the FA3 varlen path: one batch per reachable cu_seqlens size."""
    x = torch.randint(0, 1024, (5, 100), generator=torch.Generator().manual_seed(10))
    batches = tg.varlen_warmup_ids(x, torch.Generator().manual_seed(0), range(1, 7))
    sizes = [tg.doc_layout(b, varlen=True).cu_seqlens.numel() for b in batches]
    assert sizes == [k * tg.CU_BUCKET for k in range(1, 7)]
    # bucket 8 (449..512 entries) is reached by a batch whose 500 tokens all start a segment; 9 by none
    last = tg.varlen_warmup_ids(x, torch.Generator(), range(8, 10))
    assert len(last) == 1 and tg.doc_layout(last[0], varlen=True).cu_seqlens.numel() == 8 * tg.CU_BUCKET
    kept = torch.where(x == BOS, BOS + 1, x)  # only BOS positions change
    assert all(b.shape == x.shape and torch.equal(b[b != BOS], kept[b != BOS]) for b in batches)


def doc_stream(gen, lengths):
    return docs_row(lengths, gen)


@pytest.mark.parametrize("looping", [False, True])
def test_earlier_documents_cannot_change_later_nll(looping):
    """Replacing every token of the documents before document k leaves each NLL of document k
    bit-identical; scoring document k alone gives the same NLL (RoPE sees only offsets)."""
    h = tiny()
    model = perturbed_model(h)
    model.looping_active = looping
    gen = torch.Generator().manual_seed(1)
    row = doc_stream(gen, [17, 22, 26])  # 65 tokens: x = row[:-1], y = row[1:]
    x, y = row[None, :-1], row[None, 1:]
    base = model.token_nll(x, y)
    k0 = 17 + 22  # document 3 starts here; its targets are positions k0.. (x[k0] = BOS predicts its first token)
    alt = row.clone()
    alt[1:17] = torch.randint(2, 1024, (16,), generator=gen)
    alt[18:k0] = torch.randint(2, 1024, (k0 - 18,), generator=gen)
    nll = model.token_nll(alt[None, :-1], alt[None, 1:])
    assert torch.equal(nll[0, k0:], base[0, k0:])
    assert not torch.equal(nll[0, 17:k0], base[0, 17:k0])  # document 2 itself was changed
    alone = model.token_nll(row[None, k0:-1], row[None, k0 + 1 :])
    torch.testing.assert_close(alone[0], base[0, k0:], rtol=1e-5, atol=1e-5)
    # the training loss is the mean of these same per-target NLLs
    torch.testing.assert_close(model(x, y), base.mean(), rtol=1e-6, atol=1e-6)
    # negative control: without document masking the earlier documents do leak in
    model.h = tiny(doc_mask=False)
    assert not torch.equal(model.token_nll(alt[None, :-1], alt[None, 1:])[0, k0:], model.token_nll(x, y)[0, k0:])


def stream_and_luts(gen, n_docs=12):
    lengths = [int(n) for n in torch.randint(20, 90, (n_docs,), generator=gen)]
    tokens = doc_stream(gen, lengths)
    luts = (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    return tokens, luts, np.cumsum([0] + lengths)


@pytest.mark.parametrize("stage", ["plain", "sliding", "ttt"])
def test_eval_stages_keep_documents_apart(stage):
    """Every eval stage: targets of a document never depend on earlier documents' tokens (for TTT,
    within the first chunk, before any weight was trained on earlier tokens)."""
    h = tiny(ttt_epochs=1, ttt_chunk_tokens=256, eval_stride=16)
    gen = torch.Generator().manual_seed(2)
    tokens, luts, starts = stream_and_luts(gen)
    alt = tokens.clone()
    k = int(np.searchsorted(starts, 150))  # documents before starts[k] get replaced
    for s, e in zip(starts[:k], starts[1 : k + 1]):
        alt[s + 1 : e] = torch.randint(2, 1024, (e - s - 1,), generator=gen)

    def nll(tok):
        model = perturbed_model(h)
        if stage == "ttt":
            return tg.eval_ttt(h, model, model.token_nll, model, CPU, tok, luts, collect=True)[1]
        stride = h.eval_seq_len if stage == "plain" else h.eval_stride
        return tg.eval_windows(h, model.token_nll, CPU, tok, luts, stride, collect=True)[1]

    a, b = nll(tokens), nll(alt)
    lo, hi = int(starts[k]), (h.ttt_chunk_tokens if stage == "ttt" else tokens.numel() - 1)
    assert torch.equal(a[lo:hi], b[lo:hi]) and not torch.equal(a[:lo], b[:lo])


def test_data_without_bos_is_a_one_line_error():
    h = tiny()
    toks = np.arange(2, 5000) % 1000 + 2
    for what in ("validation", "training"):
        with pytest.raises(tg.ConfigError) as e:
            tg.require_doc_starts(toks, what, h)
        assert "DOC_MASK=0" in str(e.value) and "\n" not in str(e.value)
    tg.require_doc_starts(toks, "validation", tiny(doc_mask=False, smear_gate=False))
    with pytest.raises(tg.ConfigError):  # SmearGate's BOS mask alone needs them too
        tg.require_doc_starts(toks, "validation", tiny(doc_mask=False))
    tg.require_doc_starts(np.concatenate([[BOS], toks]), "validation", h)


# --- SmearGate and the attention-output gate ----------------------------------------------------------


def test_smear_gate_follows_its_equation_and_never_crosses_bos(monkeypatch):
    h = tiny()
    model = perturbed_model(h)
    gen = torch.Generator().manual_seed(3)
    ids = docs_row([10, 14, 8], gen)[None]  # BOS at 0, 10, 24
    e = torch.randn(1, 32, 64, generator=gen)
    out = model.smear(e, ids)
    lam, w = model.smear_lambda.detach(), model.smear_gate.weight.detach()[0]
    ref = e.clone()
    for t in range(1, 32):
        if ids[0, t] != BOS:
            ref[0, t] = e[0, t] + lam * torch.sigmoid(e[0, t, :12] @ w) * e[0, t - 1]
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[0, 10], e[0, 10]) and not torch.equal(out[0, 11], e[0, 11])
    # perturbation across a BOS: everything from the BOS on is identical
    alt = e.clone()
    alt[0, :10] = torch.randn(10, 64, generator=gen)
    assert torch.equal(model.smear(alt, ids)[0, 10:], out[0, 10:])
    # negative control: without the BOS mask the previous document leaks into the BOS row
    monkeypatch.setattr(tg, "BOS_ID", -1)
    assert not torch.equal(model.smear(alt, ids)[0, 10], model.smear(e, ids)[0, 10])


def test_new_parts_are_identity_or_half_at_init_and_switch_off_exactly():
    """Zero init: SmearGate is the identity and the sparse gate halves each head (sigmoid(0)); with
    the switches off the model has the previous parameters and computes the previous function."""
    h_on, h_off = tiny(), tiny(smear_gate=False, attn_gate="none", doc_mask=False)
    torch.manual_seed(0)
    on = tg.GPT(h_on)
    torch.manual_seed(0)
    off = tg.GPT(h_off)
    new = {n for n, _ in on.named_parameters()} - {n for n, _ in off.named_parameters()}
    assert new == {"smear_gate.weight", "smear_lambda"} | {f"blocks.{i}.attn.attn_gate_w" for i in range(4)}
    assert all(tg.param_group(n, p) == "scalar" for n, p in on.named_parameters() if n in new)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in on.named_parameters() if n in new)
    assert tg.count_params(on) - tg.count_params(off) == 12 + 1 + 4 * 4 * 12
    off.load_state_dict({k: v for k, v in on.state_dict().items() if k in off.state_dict()})
    with torch.no_grad():  # with the gate fixed at 1 instead of 0.5 the two models agree
        for blk in off.blocks:
            blk.attn.proj.weight.normal_()
        for b_on, b_off in zip(on.blocks, off.blocks):
            b_on.attn.proj.weight.copy_(2 * b_off.attn.proj.weight)
    ids = torch.randint(2, 1024, (2, 64))  # no BOS: document masking changes nothing either
    torch.testing.assert_close(on.token_nll(ids, ids), off.token_nll(ids, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_attention_gate_scales_each_head(kind):
    h = tiny(attn_gate=kind, sparse_attn_gate_scale=0.5)
    model = perturbed_model(h)
    attn = model.blocks[1].attn
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(2, 16, 64, generator=gen)
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    w = attn.attn_gate_w.detach()
    gate = torch.sigmoid(0.5 * u[..., :12] @ w.T) if kind == "sparse" else torch.sigmoid(u @ w.T)  # [B,T,H]
    captured = []
    hook = attn.proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    out = attn(u, cos, sin)
    w_gate, attn.attn_gate_w = attn.attn_gate_w, None
    attn(u, cos, sin)  # the same heads without the gate
    attn.attn_gate_w = w_gate
    hook.remove()
    heads = captured[1].reshape(2, 16, 4, 16)
    torch.testing.assert_close(out, attn.proj((heads * gate[..., None]).reshape(2, 16, 64)))


# --- Polar Express ------------------------------------------------------------------------------------


def scalar_composition(s, coeffs):
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (2, 48, 128)])
def test_polar_express_band_and_polar_factor(shape):
    """Output singular values are p(sigma/||G||_F) for the composed scalar quintics (the NS output
    shares G's singular vectors), lie in the band 1 +- 0.142 that the 5 triples guarantee on
    [1e-3, 1], and the output is closer to the SVD polar factor U V^T than the classic quintic's."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    U, S, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    sn = S / g.double().norm(dim=(-2, -1), keepdim=True)[..., 0]
    assert sn.min() > 1e-3  # the input range the coefficients are designed for
    x = tg.newton_schulz(g, 5, polar=True).double()
    m = U.mT @ x @ Vh.mT
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    assert (m - torch.diag_embed(diag)).abs().max() < 1e-4
    torch.testing.assert_close(diag, scalar_composition(sn, tg.POLAR_EXPRESS), rtol=0, atol=2e-4)
    assert diag.min() > 0.858 and diag.max() < 1.142
    grid = torch.logspace(-3, 0, 5001, dtype=torch.float64)
    band = scalar_composition(grid, tg.POLAR_EXPRESS)
    assert band.min() > 0.858 and band.max() < 1.142
    polar = U @ Vh
    err = lambda y: ((y.double() - polar).norm() / polar.norm()).item()  # noqa: E731
    assert err(x) < 0.12 and err(x) < 0.6 * err(tg.newton_schulz(g, 5))


def test_classic_newton_schulz_unchanged():
    g = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(6))
    x = g.mT / (g.mT.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = x @ x.mT
        x = 3.4445 * x + (-4.7750 * A + 2.0315 * A @ A) @ x
    assert torch.equal(tg.newton_schulz(g, 5), x.mT) and torch.equal(tg.newton_schulz(g, 5, polar=False), x.mT)
    with pytest.raises(tg.ConfigError):
        tg.Hyperparameters(muon_backend_steps=6).validate()
    tg.Hyperparameters(muon_backend_steps=6, polar_express=False).validate()


# --- fused softcapped cross-entropy ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_softcap_ce_matches_reference_value_and_gradient(dtype):
    """Against F.cross_entropy(cap(z)) through autograd: random logits, the saturated region
    (|z| >> cap, where tanh' ~ 0) and ignored targets; mean and per-target reductions."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(96, 500, generator=gen) * 4
    z[:16] *= 40  # deep in saturation
    z[16:24, :7] = torch.tensor([200.0, -200.0, 1e-3, 0.0, 60.0, -60.0, 30.0])
    z = z.to(dtype)
    t = torch.randint(0, 500, (96,), generator=gen)
    t[::9] = tg.IGNORE_INDEX
    w = torch.rand(96, generator=gen)  # weights on the per-target losses: a non-uniform upstream grad
    for reduction in ("mean", "none"):
        a = z.clone().requires_grad_()
        b = z.clone().float().requires_grad_()
        got = tg.softcap_cross_entropy(a, t, 30.0, reduction)
        ref = F.cross_entropy(30 * torch.tanh(b / 30), t, reduction=reduction)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        ((got * w).sum() if reduction == "none" else got).backward()
        ((ref * w).sum() if reduction == "none" else ref).backward()
        assert a.grad.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(a.grad.float(), b.grad.to(dtype).float(), **tol)
        assert a.grad[t == tg.IGNORE_INDEX].abs().max() == 0


def test_fused_ce_keeps_no_capped_copy_for_backward():
    """What autograd holds between forward and backward: the raw logits and per-row scalars only."""
    x = torch.randn(32, 400, requires_grad=True)
    t = torch.randint(0, 400, (32,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        tg.softcap_cross_entropy(x, t, 30.0)
    big = [s for s in saved if s.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        F.cross_entropy(30 * torch.tanh(x / 30), t)  # the eager form keeps [N, V] copies
    assert sum(s.numel() >= x.numel() for s in saved) >= 2


def test_training_loss_uses_fused_ce_with_the_same_value():
    h = tiny()
    model = perturbed_model(h)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(8))
    fused = model(ids, ids)
    model.h = tiny(fused_ce=False)
    torch.testing.assert_close(fused, model(ids, ids), rtol=1e-6, atol=1e-6)


# --- the compiled graph ---------------------------------------------------------------------------


def test_compiled_training_graph_has_no_break_and_no_recompile_per_batch():
    """fullgraph=True (a graph break raises) on CPU with the aot_eager backend, every new feature on,
    forward + backward in both loop modes; batches with different document counts reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    h = tiny(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, loop_start=1, loop_end=1,
             parallel_residual_start=1, xsa_last_n=2)
    assert h.doc_mask and h.smear_gate and h.attn_gate == "sparse" and h.fused_ce
    torch._dynamo.reset()
    model = perturbed_model(h)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(9)
    try:
        for mode in (False, True):
            model.looping_active = mode
            for n_bos in (1, 9):
                x = torch.randint(2, 1024, (2, 64), generator=gen)
                x.view(-1)[torch.randperm(128, generator=gen)[:n_bos]] = BOS
                loss = compiled(x, x)
                loss.backward()
                ref = model(x, x)  # eager, same weights
                torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            assert cnt.frame_count == 1 + mode  # one graph per loop mode, none per batch
        assert all(p.grad is not None for p in model.parameters())
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("env, words", [
    ({"ATTN_GATE": "full"}, ["ATTN_GATE", "sparse"]),
    ({"GATE_WINDOW": "0"}, ["GATE_WINDOW"]),
    ({"MUON_BACKEND_STEPS": "7"}, ["POLAR_EXPRESS", "MUON_BACKEND_STEPS"]),
])
def test_new_knobs_reject_bad_values(env, words):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env(env)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_triton_ce_kernels_in_the_interpreter():
    """The CUDA kernels themselves, run by Triton's CPU interpreter where Triton is installed."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the kernels run on CUDA only; the PyTorch path is tested above)")
    code = """
import torch, train_gpt as tg
k = tg._build_triton_ce()
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(17, 700, generator=torch.Generator().manual_seed(0)) * 4
    x[:8] *= 40
    x = x.to(dtype)
    t = torch.randint(0, 700, (17,)); t[::5] = -100
    nll, lse = tg._tri_fwd(k, x, t, 30.0)
    ref, ref_lse = tg._ce_math(x, t, 30.0)
    g = torch.rand(17)
    dx, ref_dx = tg._tri_bwd(k, x, t, lse, g, 30.0), tg._ce_math_bwd(x, t, ref_lse, g, 30.0)
    assert dx.dtype == dtype and (dx[t == -100] == 0).all()
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.float(), ref_dx.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6 if dtype == torch.float32 else 4e-3)
print("ok")
"""
    from conftest import REPO
    import os

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_shipped_triton_kernels_compute_what_the_readable_ones_do(tmp_path):
    """The packed file's kernels (locals renamed, statements joined) go through Triton's own parser:
    in the interpreter they give the readable kernels' outputs bit for bit."""
    import importlib.util
    import os
    import subprocess
    import sys

    from conftest import REPO

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the kernels run on CUDA only)")
    sys.path.insert(0, str(REPO / "tools"))
    import pack_code

    packed = tmp_path / "train_gpt.py"
    packed.write_bytes(pack_code.pack_source((REPO / "train_gpt.py").read_bytes()))
    code = """
import inspect, re, runpy, sys, torch, train_gpt as tg
g = runpy.run_path(sys.argv[1], run_name="packed")  # (the minifier renames the triton import: @B.jit)
build = [f for f in g.values() if inspect.isfunction(f) and f.__code__.co_filename.endswith("*") and re.search(r"@\\w+\\.jit\\b", inspect.getsource(f))]
assert len(build) == 1 and build[0] is not tg._build_triton_ce
x = (torch.randn(17, 700, generator=torch.Generator().manual_seed(0)) * 30).bfloat16()
t = torch.randint(0, 700, (17,)); t[::5] = -100
grad = torch.rand(17)
outs = []
for fwd, bwd in (build[0](), tg._build_triton_ce()):
    nll, lse, dx = torch.empty(17), torch.empty(17), torch.empty_like(x)
    fwd[(17,)](x, t, nll, lse, x.stride(0), 700, 30.0, BLOCK=256)
    bwd[(17,)](x, t, lse, grad, dx, x.stride(0), 700, 30.0, BLOCK=256)
    outs.append((nll, lse, dx))
ref = tg._ce_math(x, t, 30.0)[0]
assert all(torch.equal(a, b) for a, b in zip(*outs)) and torch.allclose(outs[0][0], ref, atol=1e-4), outs
print("ok")
"""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", code, str(packed)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
