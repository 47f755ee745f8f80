"""Token-only causal n-gram tilt: hints against the literal rule, their causality (with a planted
look-ahead caught), exact collision handling, the tilt as an exact renormalisation, the tilted
stages' causality, and the bpb moving the way the hints' accuracy says."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import FINEWEB, REPO, SP1024, TINY
from test_eval import random_model

sys.path.insert(0, str(REPO / "tools"))
import bench_ngram  # noqa: E402
import causality_check as cc  # noqa: E402

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def reference(tokens, order, threshold, lookahead=False):
    """The rule read literally; lookahead=True plants the bug of adding a target before looking it up."""
    if not lookahead:
        return bench_ngram.reference_hints(tokens, order, threshold)
    k, t = order - 1, [int(x) for x in tokens]
    out, table = np.full(len(t) - 1, -1, dtype=np.int32), {}
    for i in range(k - 1, len(t) - 1):
        s = table.setdefault(tuple(t[i - k + 1 : i + 1]), [0, 0, -1, {}])
        c = s[3][t[i + 1]] = s[3].get(t[i + 1], 0) + 1
        s[0] += 1
        if c > s[1]:
            s[1], s[2] = c, t[i + 1]
        if s[1] / s[0] >= threshold:
            out[i] = s[2]
    return out


def repetitive(n, vocab=1024, seed=0):
    """Stream of a few phrases repeated with random substitutions: many contexts recur, some hints miss."""
    g = np.random.default_rng(seed)
    phrases = [g.integers(0, vocab, g.integers(5, 40)) for _ in range(12)]
    out = np.concatenate([phrases[i] for i in g.integers(0, 12, n)])[: n + 1]
    noise = g.random(out.size) < 0.05
    out[noise] = g.integers(0, vocab, noise.sum())
    return out


@pytest.fixture(scope="module")
def fineweb_tokens(shared_data):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = [json.loads(line)["text"] for line in FINEWEB.open(encoding="utf-8")][:60]
    return np.concatenate([[tg.BOS_ID] + ids for ids in sp.encode(docs)])[:200_001]


def test_hints_equal_the_literal_rule_on_random_streams():
    g = np.random.default_rng(0)
    for _ in range(300):
        order, thr = int(g.integers(2, 10)), float(g.choice([0.34, 0.5, 0.8, 1.0]))
        tok = g.integers(0, int(g.integers(2, 6)), int(g.integers(1, 400)))
        assert np.array_equal(tg.ngram_hints(tok, order, thr), reference(tok, order, thr)), (tok, order, thr)


@pytest.mark.parametrize("order,thr", [(16, 0.8), (4, 0.8), (3, 0.5)])
def test_hints_equal_the_literal_rule_on_200k_fineweb_tokens(fineweb_tokens, order, thr):
    hints = tg.ngram_hints(fineweb_tokens, order, thr)
    assert np.array_equal(hints, reference(fineweb_tokens, order, thr))
    assert (hints >= 0).sum() > 200  # the rule fires on text


def test_top_changes_only_when_a_count_strictly_exceeds_it():
    # context (5,): next tokens 1, 2, 2, 1, 1 -> before each: none, 1 (1/1), 1 (1/2 tie), 2 (2/3), 2 (2/4 tie)
    tok = np.array([5, 1, 5, 2, 5, 2, 5, 1, 5, 1, 5, 7])
    hints = tg.ngram_hints(tok, 2, 0.0)
    assert hints[::2].tolist() == [-1, 1, 1, 2, 2, 1]
    assert tg.ngram_hints(tok, 2, 0.6)[::2].tolist() == [-1, 1, -1, 2, -1, 1]  # shares 1, 1/2, 2/3, 2/4, 3/5


def test_hash_collisions_are_resolved_exactly(monkeypatch):
    tok = np.random.default_rng(1).integers(0, 4, 3000)
    want = reference(tok, 5, 0.5)
    monkeypatch.setattr(tg, "NGRAM_MULTS", (1, tg.NGRAM_MULTS[0]))  # multiplier 1: a key is the token sum
    assert np.array_equal(tg.ngram_hints(tok, 5, 0.5), want)
    monkeypatch.setattr(tg, "NGRAM_MULTS", (1,))
    with pytest.raises(RuntimeError, match="collisions"):
        tg.ngram_hints(tok, 5, 0.5)


def leaks(hint_fn, tok, points) -> tuple[list[int], int]:
    """(targets i whose perturbation, token i+1 changed, changed a hint at a target <= i; how many of
    the perturbations changed any hint)."""
    base, out, reached = hint_fn(tok), [], 0
    for i in points:
        t = tok.copy()
        t[i + 1] = (t[i + 1] + 1) % 3
        new = hint_fn(t)
        out += [i] if not np.array_equal(new[: i + 1], base[: i + 1]) else []
        reached += not np.array_equal(new, base)
    return out, reached


def test_hints_are_causal_and_a_planted_look_ahead_is_caught():
    tok = np.random.default_rng(2).integers(0, 3, 2000)
    points = range(0, 1999, 7)
    leaked, reached = leaks(lambda t: tg.ngram_hints(t, 4, 0.5), tok, points)
    assert leaked == [] and reached > 0.5 * len(points)  # the perturbations do reach later hints
    assert leaks(lambda t: reference(t, 4, 0.5), tok, points)[0] == []
    assert len(leaks(lambda t: reference(t, 4, 0.5, lookahead=True), tok, points)[0]) > 10


def test_tilt_is_an_exact_renormalisation():
    g = torch.Generator().manual_seed(0)
    z = 30 * torch.tanh(torch.randn(64, 50, generator=g, dtype=torch.float64) * 3 / 30)
    hint = torch.randint(-1, 50, (64,), generator=g)
    beta = 2.625
    p = torch.softmax(z, -1)
    tilted = p * torch.exp(beta * (torch.arange(50) == hint[:, None]).double())
    tilted = torch.where(hint[:, None] >= 0, tilted / tilted.sum(-1, keepdim=True), p)
    assert torch.allclose(tilted.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-12)
    lp = torch.log_softmax(z, -1)
    nlq = -lp.gather(1, hint.clamp_min(0)[:, None])[:, 0]
    for y in range(50):  # every outcome, so the whole distribution is the tilted one
        yy = torch.full((64,), y)
        got = tg.tilt_nll(-lp[:, y], nlq, yy, hint, beta)
        assert torch.allclose(got, -torch.log(tilted[:, y]), rtol=0, atol=1e-12)


def test_token_nll_with_hints_keeps_the_nll_bit_for_bit():
    h = tg.Hyperparameters(**TINY)
    torch.manual_seed(0)
    model = tg.GPT(h)
    x, y = torch.randint(0, 1024, (2, 2, 64))
    hints = torch.randint(-1, 1024, (2, 64))
    nll, nlq = model.token_nll(x, y, hints=hints)
    assert torch.equal(nll, model.token_nll(x, y))
    assert torch.equal(nlq, model.token_nll(x, hints.clamp_min(0)))


def tiny(**over):
    return tg.Hyperparameters(**{**TINY, "eval_stride": 16, "ttt_chunk_tokens": 128, "ttt_epochs": 1, "ttt_lr": 0.5,
                                 "ttt_batch_seqs": 2, "ngram_tilt": True, "ngram_order": 4, "ngram_threshold": 0.5, **over})


LUTS = (torch.arange(1024) % 5 + 1, torch.arange(1024) % 3 == 0, torch.zeros(1024, dtype=torch.bool))


@pytest.mark.parametrize("stage", ["sliding", "ttt", "doc_sliding", "lora_ttt"])
def test_tilted_stages_are_causal(stage):
    h = tiny(lora_rank=4, lora_chunk_tokens=32, lora_batch_docs=2, phased_prefix_docs=2, phased_num_phases=1)
    tokens = torch.from_numpy(repetitive(500)).long()
    tokens[::120] = tg.BOS_ID  # documents for the document stages
    assert (tg.tilt_plan(h, tokens)[0] >= 0).sum() > 100
    for p in (130, 300):
        r = cc.check_causality(h, lambda: random_model(h), tokens, LUTS, stage, p, seed=p)
        assert r["mismatches"] == r["hint_mismatches"] == 0 and r["changed_after"] > 0 and r["tilt"] == 1, r


def test_causality_check_catches_a_look_ahead_hint(monkeypatch):
    h = tiny()
    monkeypatch.setattr(tg, "ngram_hints", lambda t, o, th: reference(t, o, th, lookahead=True))
    fresh = torch.randint(0, 1024, (501,), generator=torch.Generator().manual_seed(0))  # new contexts: each hint is its own target
    r = cc.check_causality(h, lambda: random_model(h), fresh, LUTS, "sliding", 250)
    assert r["hint_mismatches"] > 0  # target 250's hint read its own target
    monkeypatch.undo()
    assert cc.check_causality(h, lambda: random_model(h), fresh, LUTS, "sliding", 250)["hint_mismatches"] == 0


def test_tilt_moves_bpb_the_way_hint_accuracy_says():
    h = tiny(ngram_order=2)  # context: the target's input token
    model = random_model(h)
    perm = np.random.default_rng(3).permutation(np.arange(2, 1024))
    streams = {"right": repetitive(1500),  # repeated phrases: most hints come true
               "wrong": np.r_[perm, perm[::-1]]}  # the second pass follows each token by another: every hint misses
    for kind, tok in streams.items():
        tokens = torch.from_numpy(tok).long()
        tilt = tg.tilt_plan(h, tokens)
        plain, nll = tg.eval_windows(h, model.token_nll, CPU, tokens, LUTS, 64, collect=True)
        tilted, nll_t = tg.eval_windows(h, model.token_nll, CPU, tokens, LUTS, 64, collect=True, tilt=tilt)
        n = (tokens.numel() - 1) // 64 * 64  # q = p(hint) from the same windows (stride = window)
        with torch.no_grad():
            q = torch.exp(-model.token_nll(tokens[:n].view(-1, 64), tilt[0][:n].clamp_min(0).view(-1, 64))).flatten()
        hinted = tilt[0] >= 0
        acc = (tilt[0] == tokens[1:])[hinted].float().mean().item()
        assert hinted.sum() > 500 and q[hinted[:n]].mean() < 0.01
        assert torch.equal(nll[~hinted], nll_t[~hinted])  # only hinted targets change
        if kind == "right":  # accuracy far above q: the tilt pays
            assert acc > 0.6 and tilted.val_bpb < plain.val_bpb - 0.1
        else:
            assert acc == 0 and tilted.val_bpb > plain.val_bpb


@pytest.mark.parametrize("stage", ["ttt", "lora_ttt"])
def test_training_never_sees_the_tilt(stage):
    """Scores of unhinted targets depend only on the weights trained so far: bit-identical with the
    tilt on and off, so neither the TTT SGD nor the adapters trained on a tilted loss."""
    h = tiny(lora_rank=4, lora_chunk_tokens=32, lora_batch_docs=2, phased_prefix_docs=2, phased_num_phases=1)
    tokens = torch.from_numpy(repetitive(500)).long()
    tokens[::120] = tg.BOS_ID
    on = cc.stage_nll(h, lambda: random_model(h), tokens, LUTS, stage)
    off = cc.stage_nll(dataclasses.replace(h, ngram_tilt=False), lambda: random_model(h), tokens, LUTS, stage)
    hinted = tg.tilt_plan(h, tokens)[0] >= 0
    assert hinted.sum() > 100 and not torch.equal(on[hinted], off[hinted])
    assert torch.equal(on[~hinted], off[~hinted])
