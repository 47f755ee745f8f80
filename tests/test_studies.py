"""Embedding & head studies: each switch trains, survives the artifact round trip and
evaluates; switched off, the default model is untouched. tools/analyze.py against direct computations."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import REPO, SP1024, TINY

sys.path.insert(0, str(REPO / "tools"))
CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
V, D, L = TINY["vocab_size"], TINY["model_dim"], TINY["num_layers"]

SWITCHES = {
    "embedding_dim": dict(embedding_dim=32),
    "rotation": dict(embed_rotation_rank=4),
    "no_x0": dict(resid_mix_enabled=False),
    "extra_embeds": dict(num_extra_embeds=2),
    "factorized": dict(head_kind="factorized", head_rank=16),
    "mos": dict(head_kind="mos", head_rank=16, head_experts=3),
    "simplex": dict(head_kind="simplex", head_rank=16),
    "tiers_freq": dict(embed_bits_tiers="128:8,rest:5:8", lqer_top_n=3),  # LQER of the per-row-clip embedding too
    "tiers_damage": dict(embed_bits_tiers="64:8,256:6,rest:4:6", embed_tier_rank="damage", lqer_top_n=3),
    "sparsity": dict(embed_sparsity=0.75),
}
# Parameters each switch adds to TINY, counted from the modules' shapes.
EXTRA_PARAMS = {
    "embedding_dim": V * (32 - D) + 2 * 32 * D,
    "rotation": 2 * (4 * D + D * 4),  # A: r x d and B: d x r at both ends
    "no_x0": -L * 2 * D,
    "extra_embeds": 2 * V * D + L * 2 * D,  # two tables + two resid_mix rows per block
    "factorized": 16 * D + V * 16,
    "mos": 3 * 16 * D + V * 16 + 3 * D,
    "simplex": 16 * D + V * 16,
}


def tiny(**over) -> tg.Hyperparameters:
    h = tg.Hyperparameters(**{**TINY, **over})
    h.validate()
    return h


def perturbed(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# --- switched off ---------------------------------------------------------------------------------


def test_switches_off_leave_the_default_model_unchanged():
    h = tg.Hyperparameters()
    shapes = {k: tuple(v.shape) for k, v in tg.GPT(h).state_dict().items()}
    blk = {"attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512), "attn.q_gain": (8,), "attn.c_q.weight": (512, 512),
           "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512), "attn.proj.weight": (512, 512),
           "mlp.fc.weight": (2048, 512), "mlp.proj.weight": (512, 2048)}
    blk["attn.attn_gate_w"] = (8, 12)  # sparse attention-output gate (PR #1787)
    expect = {"tok_emb.weight": (8192, 512), "skip_weights": (8, 512), "skip_gates": (8, 512),
              "parallel_resid_lambdas": (11, 2), "parallel_post_lambdas": (11, 2, 2),
              "smear_gate.weight": (1, 12), "smear_lambda": (1,)}
    expect.update({f"blocks.{i}.{k}": s for i in range(11) for k, s in blk.items()})
    assert shapes == expect
    assert sum(math.prod(s) for s in shapes.values()) == 35_945_671
    off = tg.Hyperparameters.from_env({"RESID_MIX_ENABLED": "1", "NUM_EXTRA_EMBEDS": "0", "EMBED_ROTATION_RANK": "0",
                                       "HEAD_KIND": "tied", "EMBED_BITS_TIERS": "", "EMBED_SPARSITY": "0"})
    assert off == h
    # the artifact stores only non-default shape knobs, so a default artifact carries no study keys
    assert {k for k in tg.SHAPE_KEYS if getattr(h, k) != tg._DEFAULTS[k]} == set()


@pytest.mark.parametrize("name", sorted(EXTRA_PARAMS))
def test_switch_parameter_counts(name):
    base = tg.count_params(tg.GPT(tiny()))
    assert tg.count_params(tg.GPT(tiny(**SWITCHES[name]))) - base == EXTRA_PARAMS[name]


# --- what each switch computes ---------------------------------------------------------------------


def test_rotation_is_the_exact_identity_at_init():
    torch.manual_seed(0)
    plain = perturbed(tg.GPT(tiny()))
    rot = tg.GPT(tiny(embed_rotation_rank=4))
    missing, unexpected = rot.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["in_rot.a.weight", "in_rot.b.weight", "out_rot.a.weight", "out_rot.b.weight"] and not unexpected
    assert torch.all(rot.in_rot.b.weight == 0) and torch.all(rot.out_rot.b.weight == 0)
    ids = torch.randint(0, V, (2, 32))
    assert torch.equal(rot.logits(ids), plain.logits(ids))
    x = torch.randn(3, D)
    with torch.no_grad():
        rot.in_rot.b.weight.normal_()
    b, a = rot.in_rot.b.weight, rot.in_rot.a.weight
    torch.testing.assert_close(rot.in_rot(x), x + x @ a.T @ b.T)
    assert not torch.equal(rot.logits(ids), plain.logits(ids))
    h = tiny(embed_rotation_rank=4)  # 256-element matrices: fp16 passthrough; larger ones are quantized
    assert tg.quant_spec("in_rot.a.weight", rot.in_rot.a.weight, h) is None
    assert tg.quant_spec("in_rot.a.weight", torch.zeros(256, 512), h) == (h.matrix_bits, h.matrix_clip_sigmas)


def test_extra_embeds_and_no_x0_block_inputs():
    """x_in = m0 x + m1 x0 + m2 x01 + m3 x02 ; without resid_mix x_in = x."""
    torch.manual_seed(0)
    model = perturbed(tg.GPT(tiny(num_extra_embeds=2, smear_gate=False)))  # x0 = the normed lookups, unsmeared
    blk = model.blocks[1]
    x, x0, e1, e2 = torch.randn(4, 2, 8, D).unbind(0)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    m = blk.resid_mix
    x_in, _ = blk._attn(x, (x0, e1, e2), cos, sin)
    torch.testing.assert_close(x_in, m[0] * x + m[1] * x0 + m[2] * e1 + m[3] * e2)
    ids = torch.randint(0, V, (1, 8))
    x0s = []
    hook = blk.register_forward_pre_hook(lambda mod, args: x0s.append(args[1]))
    model.hidden(ids)
    hook.remove()
    ref = [tg.rms_norm(t(ids)) for t in (model.tok_emb, *model.extra_embeds)]
    assert len(x0s[0]) == 3 and all(torch.equal(a, b) for a, b in zip(x0s[0], ref))
    plain = perturbed(tg.GPT(tiny(resid_mix_enabled=False)))
    assert plain.blocks[1].resid_mix is None
    assert torch.equal(plain.blocks[1]._attn(x, x0, cos, sin)[0], x)


@pytest.mark.parametrize("kind", ["factorized", "mos", "simplex"])
def test_heads_give_normalized_distributions_through_token_nll(kind):
    """token_nll = -log p(target) with p from a direct computation of each head; p sums to 1."""
    torch.manual_seed(0)
    h = tiny(head_kind=kind, head_rank=16, head_experts=3)
    model = perturbed(tg.GPT(h), 0.2)
    ids, tgt = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    x = model.hidden(ids).double()
    cap = lambda z: 30 * torch.tanh(z / 30)  # noqa: E731
    W1, W2 = model.head_down.weight.double(), model.head_out.weight.double()
    if kind == "factorized":
        p = torch.softmax(cap(x @ W1.T @ W2.T), -1)
    elif kind == "simplex":
        p = torch.softmax(cap(torch.softmax(x @ W1.T, -1) @ W2.T), -1)
    else:
        pi = torch.softmax(x @ model.head_gate.weight.double().T, -1)
        p = sum(pi[..., k : k + 1] * torch.softmax(cap(torch.tanh(x @ W1[16 * k : 16 * (k + 1)].T) @ W2.T), -1) for k in range(3))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 16, dtype=torch.float64))
    ref = -torch.log(p.gather(-1, tgt[..., None]))[..., 0]
    torch.testing.assert_close(model.token_nll(ids, tgt).double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(ids, tgt).double(), ref.mean(), rtol=1e-4, atol=1e-4)
    groups = {n: tg.param_group(n, p) for n, p in model.named_parameters()}
    assert groups["head_out.weight"] == "embed" and groups["head_down.weight"] == "muon"
    assert kind != "mos" or groups["head_gate.weight"] == "scalar"


def test_sparsify_rows_keeps_the_top_magnitudes():
    w = torch.randn(7, 20)
    ref = w.clone()
    tg.sparsify_rows_(w, 0.75)
    for r in range(7):
        keep = ref[r].abs().argsort(descending=True)[:5]
        assert torch.equal(w[r].nonzero().flatten().sort().values, keep.sort().values)
        assert torch.equal(w[r, keep], ref[r, keep])


# --- each switch trains, round-trips through the artifact and evaluates ---------------------------


@pytest.fixture(scope="module")
def val_and_luts(dataset):
    return tg.load_val_tokens(str(dataset), 64)[: 48 * 64 + 1], tg.build_byte_luts(str(SP1024), V)


def train_tiny(h, dataset, steps):
    torch.manual_seed(0)
    tr = tg.Trainer(h, CPU, tg.Logger(CPU, None), tg.GPT(h), tg.shard_paths(str(dataset), "train"))
    losses = []
    for s in range(steps):
        losses.append(tr.train_step(s, 1.0).item())
        tr.update_ema()
    return tr, losses


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_trains_and_survives_the_artifact_round_trip(name, dataset, val_and_luts, tmp_path):
    h = tiny(**SWITCHES[name], gptq_calibration_batches=2)
    val, luts = val_and_luts
    tr, losses = train_tiny(h, dataset, 14)
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    tr.apply_ema()
    pre = tg.eval_val(h, tr.base, CPU, val, luts)
    hess = tg.collect_hessians(tr.base, tr.calibration_batches(), h)
    tensors, meta = tg.quantize_state(tr.base, h, hess)
    path = str(tmp_path / f"{name}.ptz")
    tg.write_artifact(path, tensors, meta, h, looping=False)
    state, _ = tg.load_artifact(path, h)
    model = tg.GPT(h)
    model.load_state_dict(state, strict=True)
    quant = tg.eval_val(h, model, CPU, val, luts)
    print(f"{name}: pre {pre.val_bpb:.4f} quantized {quant.val_bpb:.4f}")
    assert abs(quant.val_bpb - pre.val_bpb) < 0.02 * pre.val_bpb
    # every matrix of the study is stored as intended (quantized where large, fp16 where small)
    for n, p in tr.base.state_dict().items():
        kind = "sparse" if n == "tok_emb.weight" and h.embed_sparsity else ("fp16" if tg.quant_spec(n, p, h) is None else "int")
        assert meta[n]["kind"] == kind, n
    if name == "embedding_dim":  # the projections are GPTQ-quantized and their stored bytes reported
        assert {"embed_proj.weight", "head_proj.weight"} <= hess.keys()
        assert meta["embed_proj.weight"]["bits"] == h.matrix_bits
        line = tg.quant_report(tensors, meta, h)[0]
        assert f"embed_proj:{D * 32 + D * 2}" in line.split() and f"head_proj:{32 * D + 32 * 2}" in line.split()
        rep = subprocess.run([sys.executable, str(REPO / "tools" / "compression_report.py"), path, "--by", "module"],
                             capture_output=True, text=True, check=True).stdout
        assert f"group:embed_proj tensors:2 raw_bytes:{D * 32 + D * 2} " in rep
    if name in ("mos", "no_x0"):  # the artifact names the knob a mismatched run must set
        with pytest.raises(tg.ConfigError, match="set HEAD_KIND=mos" if name == "mos" else "set RESID_MIX_ENABLED=0"):
            tg.load_artifact(path, tiny())


def test_sparsity_is_kept_through_training_ema_and_storage(dataset, tmp_path):
    h = tiny(embed_sparsity=0.75, iterations=6)
    torch.manual_seed(0)
    tr = tg.Trainer(h, CPU, tg.Logger(CPU, None), tg.GPT(h), tg.shard_paths(str(dataset), "train"))
    tr.run(lambda m: None)
    keep = D // 4
    ema = dict(zip(tr.base.state_dict(), tr.ema))["tok_emb.weight"]
    for w in (tr.base.tok_emb.weight, ema):
        assert torch.all((w != 0).sum(1) == keep)
    tr.apply_ema()
    tensors, meta = tg.quantize_state(tr.base, h, None)
    assert meta["tok_emb.weight"]["kind"] == "sparse" and "tok_emb.weight.q" not in tensors
    assert tensors["tok_emb.weight.values"].numel() == V * keep
    state = tg.dequantize_state(tensors, meta)
    assert torch.equal(state["tok_emb.weight"], tr.base.tok_emb.weight.detach().half().float())
    line = next(l for l in tg.quant_report(tensors, meta, h) if l.startswith("embed_sparsity"))
    kv = dict(t.split(":") for t in line.split()[1:])
    assert float(kv["effective"]) == float(kv["target"]) == 0.75 == float((state["tok_emb.weight"] == 0).float().mean())


@pytest.mark.parametrize("rank", ["freq", "damage"])
def test_bit_tiers_follow_the_row_ranking(rank, dataset):
    h = tiny(embed_bits_tiers="100:8,300:6,rest:4:2", embed_tier_rank=rank)
    torch.manual_seed(0)
    model = perturbed(tg.GPT(h), 0.02)
    loader = tg.TrainLoader(tg.shard_paths(str(dataset), "train"), 64, seed=5)
    batches = [loader.next_batch(4, 0, 1)[0] for _ in range(3)]
    stats = tg.collect_hessians(model, batches, h)
    counts = np.bincount(torch.cat(batches).flatten().numpy(), minlength=V).astype(np.float64)
    score = counts.copy()
    if rank == "damage":  # per-row norm of the next-token loss gradient, averaged over the batches
        gn = torch.zeros(V)
        for x in batches:
            model.zero_grad()
            F.cross_entropy(model.logits(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
            gn += model.tok_emb.weight.grad.norm(dim=1)
        score = counts * (gn / len(batches)).double().numpy()
        model.zero_grad()
    order = np.lexsort((np.arange(V), -score))  # best first, ties by token id
    expect = np.full(V, 4)
    expect[order[:300]], expect[order[:100]] = 6, 8
    tensors, meta = tg.quantize_state(model, h, stats)
    bits = tensors["tok_emb.weight.bits"].long()
    assert np.array_equal(bits.numpy(), expect)
    q = tensors["tok_emb.weight.q"].long().abs().max(dim=1).values
    assert torch.all(q <= 2 ** (bits - 1) - 1) and int(q[bits == 4].max()) == 7  # clip 2 sigma: int4 rows saturate
    s = tensors["tok_emb.weight.scale"].float()
    std = model.tok_emb.weight.detach().std(dim=1, unbiased=True)  # the records' row std
    torch.testing.assert_close(s, (torch.where(bits == 4, 2.0, h.embed_clip_sigmas) * std / (2 ** (bits - 1) - 1)).half().float())
    assert meta["tok_emb.weight"]["bits"] == 8
    assert "rows_by_bits:8:100,6:200,4:724" in tg.quant_report(tensors, meta, h)[-1]


@pytest.mark.parametrize("env, words", [
    ({"HEAD_KIND": "big"}, ["HEAD_KIND", "mos"]),
    ({"EMBED_BITS_TIERS": "1024:9,rest:5"}, ["EMBED_BITS_TIERS", "rest:BITS"]),
    ({"EMBED_BITS_TIERS": "rest:5,1024:8"}, ["EMBED_BITS_TIERS"]),
    ({"EMBED_BITS_TIERS": "1024:8"}, ["EMBED_BITS_TIERS"]),
    ({"EMBED_BITS_TIERS": "1024:8,rest:5", "GPTQ_ENABLED": "0"}, ["EMBED_BITS_TIERS", "GPTQ_ENABLED=1"]),
    ({"EMBED_TIER_RANK": "norm"}, ["EMBED_TIER_RANK"]),
    ({"EMBED_SPARSITY": "1"}, ["EMBED_SPARSITY"]),
    ({"NUM_EXTRA_EMBEDS": "1", "RESID_MIX_ENABLED": "0"}, ["NUM_EXTRA_EMBEDS", "RESID_MIX_ENABLED=1"]),
    ({"EMBED_ROTATION_RANK": "600"}, ["EMBED_ROTATION_RANK"]),
])
def test_bad_study_settings_are_one_line_errors(env, words):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env(env)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# --- tools/analyze.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzed(dataset, tmp_path_factory):
    """A tiny run with projections, rotations, an extra table and bit tiers, then the analysis."""
    import analyze

    tmp = tmp_path_factory.mktemp("analysis")
    h = tg.Hyperparameters(**{**TINY, "iterations": 10, "data_path": str(dataset), "tokenizer_path": str(SP1024),
                              "run_id": "an", "log_dir": str(tmp), "gptq_calibration_batches": 2, "embedding_dim": 32,
                              "embed_rotation_rank": 4, "num_extra_embeds": 1, "embed_bits_tiers": "128:8,rest:6",
                              "enable_looping_at": 0.5})
    assert tg.train_and_eval(h, CPU) == 0
    text = "The capital of France is Paris."
    assert analyze.main([str(tmp / "an.ptz"), "--log", str(tmp / "an.txt"), "--text", text, "--topk", "3",
                         "--out", str(tmp / "out")]) == 0
    return h, tmp, json.loads((tmp / "out" / "report.json").read_text()), text


def test_run_logs_study_reports(analyzed):
    _, tmp, _, _ = analyzed
    log = (tmp / "an.txt").read_text()
    assert "embed_tiers spec:128:8,rest:6 rank:freq rows_by_bits:8:128,6:896" in log
    stored = next(l for l in log.splitlines() if l.startswith("stored_bytes"))
    assert all(f" {k}:" in stored for k in ("tok_emb", "embed_proj", "head_proj", "in_rot", "out_rot", "extra_embeds", "blocks"))


def test_analysis_matches_direct_computation(analyzed, dataset):
    import sentencepiece as spm

    h, tmp, rep, text = analyzed
    state, looping = tg.load_artifact(str(tmp / "an.ptz"), h)
    assert rep["looping"] == looping and rep["params"] == sum(t.numel() for t in state.values())
    for i, b in enumerate(rep["blocks"]):
        wo, s = state[f"blocks.{i}.attn.proj.weight"].double().numpy(), state[f"blocks.{i}.attn_scale"].double().numpy()
        wd, sm = state[f"blocks.{i}.mlp.proj.weight"].double().numpy(), state[f"blocks.{i}.mlp_scale"].double().numpy()
        assert b["attn_eff"] == pytest.approx(np.linalg.norm(s[:, None] * wo), rel=1e-12)
        assert b["mlp_eff"] == pytest.approx(np.linalg.norm(sm[:, None] * wd), rel=1e-12)
        assert b["q_gain_std"] == pytest.approx(np.std(state[f"blocks.{i}.attn.q_gain"].numpy()), rel=1e-5, abs=1e-7)
        assert b["attn_gate_norm"] == pytest.approx(np.linalg.norm(state[f"blocks.{i}.attn.attn_gate_w"].numpy()), rel=1e-5)
        mix = state[f"blocks.{i}.resid_mix"].numpy()
        assert (b["x0_weight"], b["x01_weight"]) == (pytest.approx(mix[1].mean(), abs=1e-7), pytest.approx(mix[2].mean(), abs=1e-7))
    tot = [b["attn_eff"] + b["mlp_eff"] for b in rep["blocks"]]
    assert rep["summary"]["boundary_share"] == pytest.approx((tot[0] + tot[-1]) / sum(tot))
    # skips: decoder position 0 of the looped schedule [0,1,2]+[1,2,3] pairs layer 1 with encoder layer 2
    g, w = 1 / (1 + np.exp(-state["skip_gates"].numpy()[0])), state["skip_weights"].numpy()[0]
    assert rep["skips"][0]["effective_skip"] == pytest.approx(((1 - g) * w).mean(), rel=1e-5)
    assert (rep["skips"][0]["decoder_layer"], rep["skips"][0]["encoder_layer"]) == (1, 2)
    post = state["parallel_post_lambdas"].numpy()[2]
    assert [r["block"] for r in rep["lanes"]] == [2, 3]
    assert rep["lanes"][0]["attn_share_lane1"] == pytest.approx(post[0, 1] ** 2 / (post[0, 0] ** 2 + post[0, 1] ** 2))
    sv = np.linalg.svd(state["embed_proj.weight"].double().numpy(), compute_uv=False)
    np.testing.assert_allclose(rep["spectra"]["embed_proj"], sv, rtol=1e-9)
    ba = state["out_rot.b.weight"].double().numpy() @ state["out_rot.a.weight"].double().numpy()
    np.testing.assert_allclose(rep["spectra"]["out_rot I+BA"], np.linalg.svd(np.eye(D) + ba, compute_uv=False), rtol=1e-9)
    # logit lens: the embedding x0 decoded through the tied head, written out by hand
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    ids = torch.tensor([tg.BOS_ID] + sp.encode(text))
    assert rep["logit_lens"]["tokens"] == ids.tolist()
    rot = lambda x, n: x + x @ state[f"{n}.a.weight"].T @ state[f"{n}.b.weight"].T  # noqa: E731
    e = state["tok_emb.weight"][ids]
    lam, w = state["smear_lambda"][0], state["smear_gate.weight"][0]
    assert lam != 0 and rep["smear"]["smear_lambda"] == pytest.approx(float(lam))
    gate = lam * torch.sigmoid(e[:, :12] @ w) * (ids != tg.BOS_ID)  # SmearGate, written out
    e = torch.cat([e[:1], e[1:] + gate[1:, None] * e[:-1]])
    x0 = tg.rms_norm(rot(e @ state["embed_proj.weight"].T, "in_rot"))
    head_in = rot(tg.rms_norm(x0), "out_rot") @ state["head_proj.weight"].T
    logits = 30 * torch.tanh(head_in @ state["tok_emb.weight"].T / 30)
    assert rep["logit_lens"]["topk"]["x0"] == logits.topk(3, dim=-1).indices.tolist()
    model = tg.GPT(h)
    model.load_state_dict(state)
    model.looping_active = looping
    with torch.no_grad():
        assert rep["logit_lens"]["topk"]["final"] == model.logits(ids[None])[0].topk(3, dim=-1).indices.tolist()
    assert set(rep["logit_lens"]["topk"]) == {"final", "x0", "x01"}
    # per-row statistics: rank buckets by training-token counts
    counts = np.bincount(np.concatenate([np.asarray(tg.read_shard(p)) for p in tg.shard_paths(str(dataset), "train")]), minlength=V)
    order = np.argsort(-counts, kind="stable")
    rows = rep["embed_rows"]
    assert [r["rows"] for r in rows] == [64, 192, 768]
    assert rows[0]["token_share"] == pytest.approx(counts[order[:64]].sum() / counts.sum())
    emb = state["tok_emb.weight"].numpy()
    assert rows[2]["row_norm"] == pytest.approx(np.linalg.norm(emb[order[256:]], axis=1).mean(), rel=1e-6)
    assert sum(r["bits"] * r["rows"] for r in rows) == pytest.approx(128 * 8 + 896 * 6)


def test_analysis_writes_report_and_png(analyzed):
    _, tmp, _, _ = analyzed
    md = (tmp / "out" / "report.md").read_text()
    for heading in ("## Blocks", "## U-net skips", "## Parallel lanes", "## Singular values", "## Logit lens",
                    "## Embedding rows by training-token frequency"):
        assert heading in md
    assert (tmp / "out" / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analysis_bad_input_is_one_line_error(analyzed, capsys):
    import analyze

    _, tmp, _, _ = analyzed
    assert analyze.main([str(tmp / "missing.ptz"), "--log", str(tmp / "an.txt")]) == 2
    assert analyze.main([str(tmp / "an.ptz"), "--log", str(tmp / "an.txt"), "--set", "NUM_LAYERS=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.ptz not found" in err[0] and "set NUM_LAYERS=4" in err[1]
