"""Training-side record features, each off by default: the trained asymmetric logit softcap (#1923 form),
AWQ-lite's one global int8 column group (#1908) and the progressive training length (#2014); each
against an independent reference."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def perturbed_model(h, seed=0, scale=0.05) -> tg.GPT:
    """Off the zero/identity init so that the logits reach the bent part of the cap."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("softcap_"):
                p.add_(scale * torch.randn_like(p))
    return model


# --- asymmetric logit softcap ----------------------------------------------------------------------


def test_asym_softcap_is_one_cap_per_sign():
    z = torch.tensor([-50.0, -3.0, -1e-3, 0.0, 1e-3, 2.0, 40.0])
    pos, neg = torch.tensor([5.0]), torch.tensor([2.0])
    want = [(5.0 if v >= 0 else 2.0) * math.tanh(v / (5.0 if v >= 0 else 2.0)) for v in z.tolist()]
    torch.testing.assert_close(tg.asym_cap(z, pos, neg), torch.tensor(want))


def test_asym_softcap_off_adds_nothing_and_on_starts_as_the_fixed_cap():
    off, on = tiny(logit_softcap=3.0), tiny(logit_softcap=3.0, asym_softcap=True)
    a, b = perturbed_model(off, scale=0.3), perturbed_model(on, scale=0.3)
    assert not any(n.startswith("softcap_") for n in a.state_dict())
    assert set(b.state_dict()) - set(a.state_dict()) == {"softcap_pos", "softcap_neg"}
    b.load_state_dict({**a.state_dict(), "softcap_pos": b.softcap_pos, "softcap_neg": b.softcap_neg})
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(1))
    x = a.hidden(ids)
    torch.testing.assert_close(b.head_logits(x), 3.0 * torch.tanh(F.linear(x, a.tok_emb.weight).float() / 3.0))
    torch.testing.assert_close(b(ids, ids), a(ids, ids), rtol=1e-5, atol=1e-5)  # unfused vs fused, same caps


def test_asym_softcap_caps_train_in_the_training_step_and_in_global_sgd():
    """The caps get a gradient from the training loss and move under the optimizers the run builds
    (AdamW, no weight decay) and under global SGD; the logits follow the moved caps."""
    h = tiny(logit_softcap=3.0, asym_softcap=True)
    model = perturbed_model(h, scale=0.3)
    opts = tg.build_optimizers(h, model, CPU)
    assert [g["weight_decay"] for g in opts[0].param_groups if g["params"][0] is model.softcap_pos] == [0.0]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, 1024, (2, 65), generator=gen)
        model(ids[:, :-1], ids[:, 1:]).backward()
        assert model.softcap_pos.grad.abs().item() > 0 and model.softcap_neg.grad.abs().item() > 0
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    pos, neg = model.softcap_pos.item(), model.softcap_neg.item()
    assert abs(pos - 3.0) > 1e-3 and abs(neg - 3.0) > 1e-3 and pos != neg
    x = model.hidden(ids[:, :-1])
    z = F.linear(x, model.tok_emb.weight).float()
    ref = torch.where(z >= 0, pos * torch.tanh(z / pos), neg * torch.tanh(z / neg))
    torch.testing.assert_close(model.head_logits(x), ref)
    tokens = torch.randint(0, 1024, (h.ttt_chunk_tokens + 1,), generator=gen)
    before = (model.softcap_pos.item(), model.softcap_neg.item())
    assert tg.global_sgd(dataclasses.replace(h, phased_lr=0.5), model, model, CPU, tokens, h.ttt_chunk_tokens) == 1
    assert model.softcap_pos.item() != before[0] and model.softcap_neg.item() != before[1]


def test_asym_softcap_caps_are_fp16_passthrough_and_survive_the_artifact(tmp_path):
    h = tiny(asym_softcap=True)
    model = perturbed_model(h)
    with torch.no_grad():
        model.softcap_pos.fill_(31.37)
        model.softcap_neg.fill_(27.21)
    tensors, meta = tg.quantize_state(model, h, None)
    assert meta["softcap_pos"]["kind"] == meta["softcap_neg"]["kind"] == "fp16"
    t2, m2 = tg.deserialize_tensors(tg.serialize_tensors(tensors, meta))
    loaded = tg.GPT(h)
    loaded.load_state_dict(tg.dequantize_state(t2, m2), strict=True)
    assert loaded.softcap_pos.item() == torch.tensor(31.37).half().item()
    assert loaded.softcap_neg.item() == torch.tensor(27.21).half().item()
    path = str(tmp_path / "a.ptz")
    tg.write_artifact(path, tensors, meta, h, looping=False)
    assert tg.load_artifact(path, h)[0]["softcap_pos"].item() == loaded.softcap_pos.item()
    with pytest.raises(tg.ConfigError, match="made with ASYM_SOFTCAP=1 but this run has ASYM_SOFTCAP=0"):
        tg.load_artifact(path, dataclasses.replace(h, asym_softcap=False))


# --- AWQ-lite: one global group ---------------------------------------------------------------------

AWQ = dict(model_dim=128, mlp_mult=5, awq_lite=True)  # candidates (> 65,536 elements): tok_emb, every mlp.fc/proj


def awq_setup(**over):
    h = tiny(**{**AWQ, **over})
    model = perturbed_model(h, seed=3, scale=0.02)
    model.looping_active = True  # looped blocks see two passes per batch
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 1024, (2, 64), generator=gen) for _ in range(3)]
    return h, model, batches, tg.collect_hessians(model, batches, h)


def reference_scores(h, model, batches):
    """(score, name, first column) of every 64-column group of every candidate, from the inputs each
    matrix sees (hooks; the tied embedding's input is the head input) and its weights alone."""
    sq, rows = {}, {}

    def seen(name, x):
        x = x.detach().flatten(0, -2).double()
        sq[name] = sq.get(name, 0) + x.square().sum(0)
        rows[name] = rows.get(name, 0) + x.size(0)

    state = model.state_dict()
    cands = [n for n, p in state.items() if p.ndim == 2 and p.numel() > 65_536 and n in
             {"tok_emb.weight"} | {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}]
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=f"{name}.weight": seen(n, a[0]))
             for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and f"{name}.weight" in cands]
    with torch.no_grad():
        for x in batches:
            seen("tok_emb.weight", model.hidden(x))
    for hk in hooks:
        hk.remove()
    out = []
    for n in cands:
        sal = (sq[n] / rows[n]).sqrt() * state[n].double().abs().mean(0)
        out += [(float(sal[a : a + 64].sum()), n, a) for a in range(0, sal.numel(), 64)]
    assert {n for _, n, _ in out} == {"tok_emb.weight"} | {f"blocks.{i}.mlp.{k}.weight" for i in range(4) for k in ("fc", "proj")}
    return sorted(out, reverse=True)


def test_awq_lite_picks_the_globally_most_salient_groups():
    """Top-k of one ranking over all candidates (looped blocks' inputs averaged over both passes)."""
    h, model, batches, hess = awq_setup()
    ref = reference_scores(h, model, batches)
    for k in (1, 3, 8, 15, 25, 35):
        want = {}
        for _, n, a in ref[:k]:
            want.setdefault(n, []).append(a)
        got = tg.awq_groups(model.state_dict(), hess, dataclasses.replace(h, awq_top_k=k))
        assert {n: sorted(v) for n, v in want.items()} == got, k
    tensors, meta = tg.quantize_state(model, h, hess)
    got = {n: m["awq"] for n, m in meta.items() if "awq" in m}
    assert got == {ref[0][1]: [ref[0][2]]}  # k = 1 (default): one group in one matrix


def test_awq_lite_group_is_int8_inside_gptq_and_round_trips(tmp_path):
    h, model, batches, hess = awq_setup()
    tensors, meta = tg.quantize_state(model, h, hess)
    plain, _ = tg.quantize_state(model, dataclasses.replace(h, awq_lite=False), hess)
    (name, m), = [(n, m) for n, m in meta.items() if "awq" in m]
    (a,) = m["awq"]
    q, s = tensors[name + ".q"], tensors[name + ".scale"]
    lo = tg.qmax(m["bits"])
    rest = torch.cat([q[:, :a], q[:, a + 64 :]], 1)
    assert int(q[:, a : a + 64].abs().max()) > lo and int(rest.abs().max()) <= lo
    assert all(torch.equal(tensors[n], plain[n]) for n in plain if not n.startswith(name))  # one matrix changes
    w = model.state_dict()[name].float()
    deq = tg.dequantize_int(tensors, name, m)
    ref = q.float() * s.float()[:, None]
    ref[:, a : a + 64] = q[:, a : a + 64].float() * (s.float() * lo / 127).half().float()[:, None]
    torch.testing.assert_close(deq, ref, rtol=0, atol=0)
    step8 = ref[:, a : a + 64].sub(w[:, a : a + 64]).abs().max()
    assert step8 < (w - tg.dequantize_int(plain, name, {**m, "awq": []})).abs().max()  # finer where it is int8
    path = str(tmp_path / "a.ptz")
    tg.write_artifact(path, tensors, meta, h, looping=True)
    state, _ = tg.load_artifact(path, h)
    assert torch.equal(state[name].float(), deq.to(state[name].dtype).float())


# --- progressive training length ------------------------------------------------------------------

SCHED = "16@0.25,32@0.5,64@1"  # TINY: TRAIN_SEQ_LEN 64, 128 tokens per rank and micro-step


def test_seq_schedule_maps_the_clock_fraction_to_a_length():
    h = tiny(train_seq_schedule="1024@0.100,2048@0.700,3072@1.000", train_seq_len=3072, train_batch_tokens=786_432)
    stages = tg.parse_seq_schedule(h)
    assert stages == [(1024, 0.1), (2048, 0.7), (3072, 1.0)]
    for frac, want in ((0.0, 1024), (0.05, 1024), (0.1, 1024), (0.1001, 2048), (0.7, 2048), (0.7001, 3072), (1.0, 3072), (1.2, 3072)):
        assert tg.seq_len_at(stages, frac) == want, frac
    assert tg.parse_seq_schedule(tiny()) == [(64, 1.0)]  # off: TRAIN_SEQ_LEN throughout
    # #2014's compile warmup: 1024 plain, 2048 plain and looped, 3072 looped (looping at 0.35)
    assert tg.train_shapes(dataclasses.replace(h, enable_looping_at=0.35)) == [(False, 1024), (False, 2048), (True, 2048), (True, 3072)]
    assert tg.train_shapes(tiny()) == [(False, 64), (True, 64)] and tg.train_shapes(tiny(num_loops=0)) == [(False, 64)]


@pytest.mark.parametrize("spec, words", [
    ("16@0.5,64", "malformed"), ("16@0.5;64@1", "malformed"), ("32@0.6,64@0.5", "rise"), ("16@0.5,64@0.9", "end at 1"),
    ("48@0.5,64@1", "must divide"), ("16@0.5,32@1", "must equal TRAIN_SEQ_LEN=64"), ("0@0.5,64@1", "must divide")])
def test_seq_schedule_errors_are_one_line(spec, words):
    env = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in TINY.items()}
    with pytest.raises(tg.ConfigError, match=words) as e:
        tg.Hyperparameters.from_env({**env, "TRAIN_SEQ_SCHEDULE": spec})
    assert "\n" not in str(e.value) and "TRAIN_SEQ_SCHEDULE" in str(e.value)


def test_loader_rows_at_a_shorter_length_are_window_slices(dataset):
    paths = tg.shard_paths(str(dataset), "train")
    ref, one = tg.TrainLoader(paths, 64, seed=3), tg.TrainLoader(paths, 64, seed=3)
    windows = [ref._window(i) for i in range(8)]
    x, y = one.next_batch(12, 0, 1, 24)  # 2 rows of 24 per 64-token window: 6 windows, the last 16 tokens skipped
    want = torch.from_numpy(np.stack([w[a : a + 25] for w in windows[:6] for a in (0, 24)]).astype(np.int64))
    assert torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:]) and one.next_window == 6
    two = [tg.TrainLoader(paths, 64, seed=3) for _ in range(2)]
    parts = [two[r].next_batch(12, r, 2, 24)[0] for r in range(2)]  # 2 ranks: same rows, same stream position
    assert torch.equal(torch.cat(parts), x) and two[0].next_window == 6


def test_seq_schedule_run_switches_lengths_and_rewarms_the_lr(dataset):
    """A tiny run on the step clock (12 steps): the model sees the scheduled shapes, every step the same
    tokens, the switch is logged, the LR restarts its warmup after each switch, the stream goes on."""
    h = tiny(iterations=12, train_seq_schedule=SCHED, seq_change_warmup_steps=2, enable_looping_at=0.5, warmup_steps=1)
    torch.manual_seed(h.seed)
    logs, shapes, lrs = [], [], []
    tr = tg.Trainer(h, CPU, logs.append, tg.GPT(h), tg.shard_paths(str(dataset), "train"))
    tr.warmup()
    assert logs[-1].endswith("shapes:16:0,32:0,32:1,64:1") and tr.seq_len == 16 and tr.loader.next_window == 0
    model, step = tr.compiled, tr.train_step
    tr.compiled = lambda x, y, docs: shapes.append(tuple(x.shape)) or model(x, y, docs)
    tr.train_step = lambda s, m: lrs.append(m) or step(s, m)
    tr.run(lambda m: None)
    # frac after step s = s/12: 16 while <= 0.25 (steps 0-3), 32 to 0.5 (4-6), then 64
    assert [l for l in logs if l.startswith("seq_len_switch")] == ["seq_len_switch step:4 seq_len:32 frac:0.333",
                                                                    "seq_len_switch step:7 seq_len:64 frac:0.583"]
    want = [(8, 16)] * 4 * 8 + [(4, 32)] * 3 * 8 + [(2, 64)] * 5 * 8  # 8 micro-steps per step on one process
    assert shapes == want
    base = [tg.lr_multiplier(s / 12, h.warmdown_frac, h.min_lr) for s in range(12)]
    ramp = [1, 1, 1, 1, 0.5, 1, 1, 0.5, 1, 1, 1, 1]
    assert lrs == pytest.approx([b * r for b, r in zip(base, ramp)], abs=0)
    # each micro-step reads 2 windows (8 rows of 16 / 4 per window, 4 of 32 / 2, 2 of 64 / 1): nothing skipped
    # or read twice at a switch; the next prefetched micro-step starts where the run stopped
    assert [f.result()[1] for f in tr.pending] == [12 * 8 * 2] and tr.loader.next_window == 12 * 8 * 2 + 2


def test_seq_schedule_warmup_leaves_trajectory_unchanged(dataset):
    results = []
    for warmup in (0, 1):
        h = tiny(iterations=8, warmup_steps=warmup, enable_looping_at=0.5, train_seq_schedule=SCHED)
        torch.manual_seed(h.seed)
        tr = tg.Trainer(h, CPU, lambda m: None, tg.GPT(h), tg.shard_paths(str(dataset), "train"))
        tr.warmup()
        tr.run(lambda m: None)
        results.append([p.detach().clone() for p in tr.base.parameters()] + tr.ema)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("name, ours", [("ASYM_LOGIT_RESCALE", "ASYM_SOFTCAP"), ("AWQ_LITE_GROUP_TOP_K", "AWQ_TOP_K"),
                                        ("COMPILE_SHAPE_WARMUP", "WARMUP_STEPS")])
def test_record_names_of_these_features_point_to_ours(name, ours):
    with pytest.raises(tg.ConfigError, match=f"^{name} is a setting of other record scripts.*use {ours}"):
        tg.Hyperparameters.from_env({name: "1"})
