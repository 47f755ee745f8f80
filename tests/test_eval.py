"""Eval stages: window planning, sliding and score-first TTT against direct references, causality
by perturbation, the per-target NLL dump, and distributed equivalence."""
import math
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
import ttt_legality as legal
from conftest import REPO, SP1024, TINY, short_docs_dataset, tiny_env

sys.path.insert(0, str(REPO / "tools"))
import causality_check as cc  # noqa: E402
from test_train_gpt import run_script  # noqa: E402

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def random_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """A model whose every block matters (zero-init output projections would make it a bigram)."""
    torch.manual_seed(seed)
    m = tg.GPT(h)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight") or name == "tok_emb.weight":
                p.normal_(0, 0.05)
    return m


def fake_luts(vocab: int):
    """Byte tables with varied counts, so byte weighting is exercised without a tokenizer."""
    base = torch.arange(vocab) % 5 + 1
    return base, torch.arange(vocab) % 3 == 0, torch.zeros(vocab, dtype=torch.bool)


def stream(n: int, vocab: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n + 1,), generator=torch.Generator().manual_seed(seed))


# --- Planning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,T,stride", [(1000, 64, 16), (1024, 64, 64), (64, 64, 16), (30, 64, 16),
                                            (4097, 256, 64), (5000, 128, 7), (129, 64, 1)])
def test_every_target_scored_once_with_full_context(total, T, stride):
    starts = tg.window_starts(total, T, stride)
    first = tg.first_scored(starts, T, stride)
    end = np.minimum(starts + T, total)
    counts = np.zeros(total, dtype=np.int64)
    for f, e in zip(first, end):
        counts[f:e] += 1
    assert (counts == 1).all()
    assert (first < end).all()  # no empty windows
    for s, f, e in zip(starts, first, end):  # context of target i is i - s tokens before it
        i = np.arange(f, e)
        assert ((i - s >= T - stride) | (s == 0)).all()


def test_ttt_chunks_own_the_windows_that_start_scoring_in_them():
    h = tiny(eval_seq_len=64, eval_stride=16, ttt_chunk_tokens=128)
    total = 1000
    starts, bounds = tg.ttt_chunk_bounds(total, h)
    first = tg.first_scored(starts, 64, 16)
    assert bounds[0] == 0 and bounds[-1] == len(starts) and len(bounds) - 1 == math.ceil(total / 128)
    for c in range(len(bounds) - 1):
        assert (first[bounds[c] : bounds[c + 1]] // 128 == c).all()


# --- Sliding and plain eval against direct references -------------------------------------------


def boundary_luts(vocab: int):
    """fake_luts plus boundary tokens (BOS and every 7th id, no bytes of their own), so the dropped
    leading space after a boundary is exercised."""
    base, lead, _ = fake_luts(vocab)
    boundary = torch.arange(vocab) % 7 == 0
    boundary[tg.BOS_ID] = True
    return torch.where(boundary, 0, base), lead & ~boundary, boundary


def stream_with_bos(n: int, vocab: int = 1024, seed: int = 0, every: int = 23) -> torch.Tensor:
    """A random stream with a BOS every `every` tokens, many of them followed by a leading-space token."""
    t = stream(n, vocab, seed)
    t[::every] = tg.BOS_ID
    t[1::every * 2] = 3  # a leading-space id (3 % 3 == 0) right after BOS
    return t


def reference_eval(model, tokens: torch.Tensor, luts, T: int, stride: int):
    """Per target, written out: its window [s, s+T) (the last one holding it with >= T-stride tokens
    of context, or the first window), its NLL there and its bytes from the tables by hand."""
    base, lead, boundary = luts
    total, cache = tokens.numel() - 1, {}
    nll, nbytes = torch.zeros(total), []
    with torch.no_grad():
        for i in range(total):
            s = ((i - T) // stride + 1) * stride if i >= T else 0
            if s not in cache:
                w = tokens[s : min(s + T, total) + 1]
                cache[s] = model.token_nll(w[None, :-1], w[None, 1:])[0]
            nll[i] = cache[s][i - s]
            prev, tgt = int(tokens[i]), int(tokens[i + 1])
            nbytes.append(int(base[tgt]) + int(bool(lead[tgt]) and not bool(boundary[prev])))
    return nll, sum(nbytes)


@pytest.mark.parametrize("stride", [16, 64])  # 64 = EVAL_SEQ_LEN: the plain eval
def test_sliding_and_plain_eval_equal_window_by_window_reference(stride):
    h = tiny(val_batch_tokens=3 * 64)  # 3 windows per batch: exercises padding of the last batch
    model, luts, tokens = random_model(h), boundary_luts(1024), stream_with_bos(500)
    after_boundary = luts[2][tokens[:-1]] & luts[1][tokens[1:]]
    assert after_boundary.sum() >= 10  # the stream exercises the dropped-space term
    r, nll = tg.eval_windows(h, model.token_nll, CPU, tokens, luts, stride, collect=True)
    ref, ref_bytes = reference_eval(model, tokens, luts, 64, stride)
    assert torch.allclose(nll, ref, atol=1e-5)  # 500 targets: the last window is partial
    assert r.tokens == 500 and r.bytes == ref_bytes
    assert r.val_loss == pytest.approx(ref.double().mean().item(), rel=1e-6)
    assert r.val_bpb == pytest.approx(ref.double().sum().item() / (math.log(2) * ref_bytes), rel=1e-6)
    if stride == 64:
        assert tg.eval_val(h, model, CPU, tokens, luts).val_bpb == pytest.approx(r.val_bpb, rel=1e-12)


def test_eval_windows_longer_than_training_at_the_record_ratio():
    """EVAL_SEQ_LEN 2560 over TRAIN_SEQ_LEN 2048 (#2135), at toy scale 80 over 64: the rotary tables cover
    the eval length, sliding and plain windows match the reference, and the TTT chunks (a multiple of
    it) score every target once (no epochs: the same NLL as the sliding eval)."""
    tg.Hyperparameters().validate()  # the record's 2560 with its TTT_CHUNK_TOKENS
    h = tiny(eval_seq_len=80, eval_stride=16, ttt_chunk_tokens=160, val_batch_tokens=3 * 80, ttt_epochs=0)
    h.validate()
    model, luts, tokens = random_model(h), boundary_luts(1024), stream_with_bos(700)
    for stride in (16, 80):
        r, nll = tg.eval_windows(h, model.token_nll, CPU, tokens, luts, stride, collect=True)
        ref, ref_bytes = reference_eval(model, tokens, luts, 80, stride)
        assert torch.allclose(nll, ref, atol=1e-5) and r.bytes == ref_bytes
    r_ttt, nll_ttt = tg.eval_ttt(h, model, model.token_nll, None, CPU, tokens, luts, collect=True)
    assert torch.allclose(nll_ttt, reference_eval(model, tokens, luts, 80, 16)[0], atol=1e-5) and r_ttt.tokens == 700


def test_plain_windows_are_the_direct_reshape():
    h = tiny()
    model, luts, tokens = random_model(h), boundary_luts(1024), stream_with_bos(64 * 10)
    _, nll = tg.eval_windows(h, model.token_nll, CPU, tokens, luts, h.eval_seq_len, collect=True)
    with torch.no_grad():
        ref = model.token_nll(tokens[:-1].view(-1, 64), tokens[1:].view(-1, 64)).flatten()
    assert torch.allclose(nll, ref, atol=1e-6)


# --- TTT ---------------------------------------------------------------------------------------------


def run_ttt(h, tokens, luts, seed=0):
    model = random_model(h, seed)
    tg.prepare_ttt(model, h)
    r, nll = tg.eval_ttt(h, model, model.token_nll, model, CPU, tokens, luts, collect=True)
    return r, nll, model


TTT = dict(ttt_enabled=True, eval_stride=16, ttt_chunk_tokens=128, ttt_epochs=2, ttt_lr=0.05, ttt_batch_seqs=2)


def test_ttt_with_zero_lr_equals_sliding():
    h = tiny(**{**TTT, "ttt_lr": 0.0})
    luts, tokens = fake_luts(1024), stream(700)
    r, nll, _ = run_ttt(h, tokens, luts)
    rs, nlls = tg.eval_windows(h, random_model(h).token_nll, CPU, tokens, luts, 16, collect=True)
    assert torch.allclose(nll, nlls, atol=1e-6)
    assert r.tokens == rs.tokens == 700 and r.bytes == rs.bytes
    assert r.val_bpb == pytest.approx(rs.val_bpb, rel=1e-6)


def test_ttt_scores_first_chunk_before_any_update_and_adapts_later():
    h = tiny(**TTT)
    luts, tokens = fake_luts(1024), stream(700)
    _, nll, model = run_ttt(h, tokens, luts)
    _, nlls = tg.eval_windows(h, random_model(h).token_nll, CPU, tokens, luts, 16, collect=True)
    assert torch.equal(nll[:128], nlls[:128])  # chunk 0: the artifact's weights
    assert not torch.allclose(nll[128:], nlls[128:])  # later chunks: adapted weights
    before = random_model(h).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ttt_freeze_blocks_and_hash_embed():
    h = tiny(**TTT, ttt_freeze_blocks=2, ttt_hash_embed=True, ttt_hash_buckets=64)
    luts, tokens = fake_luts(1024), stream(700)
    fresh = random_model(h)
    tg.prepare_ttt(fresh, h)
    with torch.no_grad():  # zero-init hash embedding is an exact identity before training
        x = tokens[:-1][: 64 * 4].view(4, 64)
        assert torch.equal(fresh.logits(x), random_model(h).logits(x))
    _, _, model = run_ttt(h, tokens, luts)
    sd0 = fresh.state_dict()
    for k, v in model.state_dict().items():
        frozen = k.startswith(("blocks.0.", "blocks.1."))
        assert torch.equal(sd0[k], v) == frozen, k
    assert model.hash_embed.weight.abs().sum() > 0
    assert "hash_embed.weight" not in tg.GPT(h).state_dict()  # never part of the artifact


def test_bigram_hash_reads_previous_and_current_token_only():
    ids = torch.randint(0, 1024, (3, 50), generator=torch.Generator().manual_seed(1))
    hsh = tg.bigram_hash(ids, 16384)
    assert hsh.min() >= 0 and hsh.max() < 16384
    other = ids.clone()
    other[:, 20:] = (other[:, 20:] + 7) % 1024
    assert torch.equal(tg.bigram_hash(other, 16384)[:, :20], hsh[:, :20])
    pairs = {}
    for row_ids, row_h in zip(ids.tolist(), hsh.tolist()):
        for t in range(1, 50):  # the same (prev, cur) pair always lands in the same bucket
            assert pairs.setdefault((row_ids[t - 1], row_ids[t]), row_h[t]) == row_h[t]


def test_ttt_step_shares_partition_each_step():
    h = tiny(**TTT)
    shares = [tg.ttt_step_shares(h, tg.Dist(r, 2, r, torch.device("cpu"))) for r in range(2)]
    for (f0, n0, g0), (f1, n1, g1) in zip(*shares):
        assert g0 == g1 and n0 + n1 == g0 and f0 + n0 == f1


def reference_ttt_steps(h: tg.Hyperparameters, total: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The targets of each TTT step by definition: every chunk but the last, once scored, is cut into
    TTT_CHUNK_TOKENS / EVAL_SEQ_LEN sequences; each epoch walks them TTT_BATCH_SEQS at a time, and
    a rank trains on its contiguous share of a step's sequences."""
    T, C = h.eval_seq_len, h.ttt_chunk_tokens
    steps = []
    for c in range(math.ceil(total / C) - 1):
        for _ in range(h.ttt_epochs):
            for s in range(0, C // T, h.ttt_batch_seqs):
                n = min(h.ttt_batch_seqs, C // T - s)
                a, b = s + n * rank // world, s + n * (rank + 1) // world
                steps.append(list(range(c * C + a * T, c * C + b * T)))
    return steps


def spied_ttt(h, monkeypatch, tokens, d=CPU):
    model = random_model(h)
    tg.prepare_ttt(model, h)
    with monkeypatch.context() as mp:
        events, loss = legal.spy_ttt(mp, tg, tokens, model)
        tg.eval_ttt(h, model, model.token_nll, loss, d, tokens, fake_luts(1024))
    return events


TTT_SPY = dict(TTT, ttt_chunk_tokens=256, ttt_batch_seqs=3)  # 4 sequences a chunk: steps of 3 and 1


@pytest.mark.parametrize("over", [{}, dict(ttt_epochs=1, ttt_hash_embed=True, ttt_hash_buckets=64,
                                           ttt_freeze_blocks=2, ttt_chunk_tokens=128, eval_stride=24)])
def test_ttt_trains_exactly_the_scored_chunks(over, monkeypatch):
    h = tiny(**{**TTT_SPY, **over})
    tokens = legal.position_stream(700, 1024)
    events = spied_ttt(h, monkeypatch, tokens)
    legal.assert_score_first(events, 700)
    assert legal.train_steps(events) == reference_ttt_steps(h, 700)
    scored = torch.cat([p for kind, p in events if kind == "score"])
    assert sorted(scored.tolist()) == list(range(700))  # every target scored exactly once


def test_ttt_rank_shares_make_up_each_step(monkeypatch):
    h = tiny(**TTT_SPY)
    tokens = legal.position_stream(700, 1024)
    per_rank = [spied_ttt(h, monkeypatch, tokens, tg.Dist(r, 2, r, torch.device("cpu"))) for r in range(2)]
    for r, events in enumerate(per_rank):
        assert legal.train_steps(events) == reference_ttt_steps(h, 700, r, 2)
    assert [k for k, _ in per_rank[0]] == [k for k, _ in per_rank[1]]  # same step sequence on both ranks
    merged = [(k, torch.cat([a, b])) for (k, a), (_, b) in zip(*per_rank)]
    legal.assert_score_first(merged, 700)
    assert legal.train_steps(merged) == reference_ttt_steps(h, 700)


def test_score_first_check_catches_a_one_token_look_ahead():
    scored = [("score", torch.arange(0, 128)), ("train", torch.arange(1, 129))]
    with pytest.raises(AssertionError, match=r"not yet scored: \[128\]"):
        legal.assert_score_first(scored, 256)
    with pytest.raises(AssertionError, match="scored twice"):
        legal.assert_score_first([("score", torch.arange(0, 128)), ("score", torch.arange(127, 130))], 256)


# --- Causality by perturbation -------------------------------------------------------------------


@pytest.mark.parametrize("stage,over", [("plain", {}), ("sliding", {}), ("ttt", {}),
                                        ("ttt", dict(ttt_hash_embed=True, ttt_hash_buckets=256))])
def test_every_stage_is_causal(stage, over):
    h = tiny(**{**TTT, "ttt_lr": 0.5, **over})  # a large LR makes any leak through updates visible
    luts, tokens = fake_luts(1024), stream(600)
    for p in (100, 127, 128, 129, 300, 513):
        r = cc.check_causality(h, lambda: random_model(h), tokens, luts, stage, p, seed=p)
        assert r["mismatches"] == 0, r
        assert r["changed_after"] > 0, r  # the perturbation did reach the scores


@pytest.mark.parametrize("stage", ["sliding", "ttt"])
def test_causality_check_catches_a_leak(stage):
    h = tiny(**TTT)
    luts, tokens = fake_luts(1024), stream(400)
    model = random_model(h)

    def leaky(x, y):  # position t sees input t+2: the token after the one it scores
        return model.token_nll(torch.roll(x, -2, dims=1), y)

    r = cc.check_causality(h, lambda: model, tokens, luts, stage, 200, scorer=leaky)
    assert r["mismatches"] > 0


# --- End to end: NLL dump, causality tool, distributed equivalence ----------------------------


@pytest.fixture(scope="module")
def small_dataset(shared_data, tmp_path_factory):
    """4 validation documents cut to 4,000 characters (~6k tokens) keep the end-to-end eval runs short."""
    return short_docs_dataset(tmp_path_factory.mktemp("sp1024_small"), 60, 4, 4000, shard_tokens=300_000)


@pytest.fixture(scope="module")
def eval_run(small_dataset, tmp_path_factory):
    tmp, dataset = tmp_path_factory.mktemp("evalrun"), small_dataset
    env = tiny_env(iterations=8, data_path=str(dataset), tokenizer_path=str(SP1024), run_id="ev",
                   sliding_window_enabled=1, ttt_enabled=1, ttt_hash_embed=1, ttt_lr=0.02,
                   doc_eval_enabled=1, lora_ttt_enabled=1, lora_rank=4, lora_chunk_tokens=64, lora_batch_docs=4,
                   lora_warm_start_a=0, phased_prefix_docs=2, phased_num_phases=1, eval_nll_dir=str(tmp / "nll"))
    res = run_script(env, tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, env, res.stdout


def logged(stdout: str, stage: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith(f"final_{stage} "))
    return {k: float(v.rstrip("ms")) for k, v in (kv.split(":") for kv in line.split()[1:])}


def test_nll_dump_recomputes_logged_bpb(eval_run, small_dataset):
    tmp, _, out = eval_run
    val = tg.load_val_tokens(str(small_dataset), TINY["eval_seq_len"])
    luts = tg.build_byte_luts(str(SP1024), 1024)
    nbytes = np.load(tmp / "nll" / "bytes.npy")
    assert np.array_equal(nbytes, tg.target_bytes(val[:-1], val[1:], luts).numpy())
    line = next(l for l in out.splitlines() if l.startswith("val_tokens:"))
    assert f"val_tokens:{val.numel() - 1} val_bytes:{int(nbytes.sum())} " in line and line.endswith(" byte_count:tables")
    for stage in ("pre_quant", "quantized", "sliding", "ttt", "doc_quantized", "doc_sliding", "lora_ttt"):
        nll = np.load(tmp / "nll" / f"{stage}.npy")
        assert nll.dtype == np.float32 and nll.shape == (val.numel() - 1,)
        bpb = nll.astype(np.float64).sum() / (math.log(2) * nbytes.sum())
        assert bpb == pytest.approx(logged(out, stage)["val_bpb"], abs=6e-9)


def test_eval_budget_line_sums_the_stages(eval_run):
    _, _, out = eval_run
    line = next(l for l in out.splitlines() if l.startswith("eval_budget "))
    fields = dict(kv.split(":", 1) for kv in line.split()[1:])
    stages = ("quantized", "sliding", "doc_quantized", "doc_sliding", "ttt", "lora_ttt")
    assert fields["limit"] == "600s" and fields["stages"] == "load+warmup+" + "+".join(stages)
    stage_s = sum(logged(out, s)["eval_time"] for s in stages) / 1000
    assert stage_s <= float(fields["used"].rstrip("s")) + 0.1
    assert "ttt_progress chunk:" in out and "lora_ttt_phase 1/1 docs:2" in out


def test_causality_tool_on_saved_artifact(eval_run):
    tmp, env, _ = eval_run
    import subprocess
    from conftest import clean_environ

    env = {**clean_environ(), **env, "OMP_NUM_THREADS": "1"}
    env.pop("EVAL_NLL_DIR")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "causality_check.py"), "--artifact",
                          str(tmp / "logs" / "ev.ptz"), "--tokens", "1200", "--positions", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [l for l in res.stdout.splitlines() if " causal:" in l]
    n_points = int(res.stdout.split(" points:")[1].split()[0])
    assert "result:ok" in res.stdout and len(lines) == 6 * n_points and all(l.endswith("causal:1") for l in lines)


def test_two_processes_match_one_on_sliding_and_ttt(eval_run, tmp_path):
    tmp, env, out = eval_run
    env = {**env, "EVAL_ARTIFACT": str(tmp / "logs" / "ev.ptz"), "RUN_ID": "ev2", "EVAL_NLL_DIR": ""}
    res = run_script(env, tmp_path, torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("quantized", "sliding", "ttt", "doc_quantized", "doc_sliding", "lora_ttt"):
        assert logged(res.stdout, stage)["val_bpb"] == pytest.approx(logged(out, stage)["val_bpb"], abs=1e-5)
