"""Document-masked eval stages and per-document LoRA TTT with phased global SGD: planning against
direct references, score-first by perturbation (inside a document, at document starts, at phase
boundaries), document independence, LoRA at LR 0 == document-masked sliding, and a position spy on
every training step."""
import dataclasses
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO
from test_eval import CPU, fake_luts, random_model, stream, tiny

sys.path.insert(0, str(REPO / "tools"))
import causality_check as cc  # noqa: E402
import ttt_legality as legal  # noqa: E402


def doc_stream(n: int, seed: int = 0, mean: int = 90) -> torch.Tensor:
    """Random tokens with a BOS at 0 and about n/mean more BOS at random places (documents of varied length)."""
    t = stream(n, seed=seed)
    t[t == tg.BOS_ID] = 2
    t[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: n // mean]] = tg.BOS_ID
    t[0] = tg.BOS_ID
    return t


def replace_tokens(tokens: torch.Tensor, lo: int, hi: int, seed: int = 5) -> torch.Tensor:
    """Every non-BOS token at positions [lo, hi) replaced by another non-BOS token (same documents)."""
    out = tokens.clone()
    shift = torch.randint(1, 1021, tokens.shape, generator=torch.Generator().manual_seed(seed))
    new = (tokens - 2 + shift) % 1022 + 2  # in [2, 1024) and never the old token
    mask = tokens != tg.BOS_ID
    mask[:lo] = False
    mask[hi:] = False
    out[mask] = new[mask]
    return out


def change_docs(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Every document but `keep` changed (token e[keep] is its last target: the next BOS or the stream end)."""
    s, e = tg.doc_spans(tokens)
    return replace_tokens(replace_tokens(tokens, 0, int(s[keep])), int(e[keep]) + 1, tokens.numel(), seed=6)


LORA = dict(eval_stride=16, lora_rank=4, lora_alpha=8.0, lora_chunk_tokens=16, lora_batch_docs=3, lora_lr=0.05,
            phased_prefix_docs=4, phased_num_phases=2, phased_lr=0.05, ttt_chunk_tokens=128, ttt_batch_seqs=2)


def run_lora(h, tokens, luts, seed=0, trace=None):
    model = random_model(h, seed)
    return tg.eval_lora_ttt(h, model, model, CPU, tokens, luts, collect=True, trace=trace)


# --- Planning ------------------------------------------------------------------------------------


def test_doc_spans_partition_targets_at_bos():
    t = torch.tensor([5, 1, 7, 8, 1, 1, 9, 4])  # no BOS at 0: a leading pseudo-document
    s, e = tg.doc_spans(t)
    assert s.tolist() == [0, 1, 4, 5] and e.tolist() == [1, 4, 5, 7]


@pytest.mark.parametrize("T,stride", [(64, 16), (64, 64), (64, 48), (32, 7)])
def test_doc_windows_score_each_target_once_inside_its_document(T, stride):
    tokens = doc_stream(900, seed=T + stride)
    starts, ends = tg.doc_spans(tokens)
    ws, first, end = tg.doc_windows(starts, ends, T, stride)
    counts = np.zeros(900, dtype=np.int64)
    for w, f, e in zip(ws, first, end):
        k = np.searchsorted(starts, w, side="right") - 1
        assert starts[k] <= w <= f < e <= ends[k] and e - w <= T  # one document, at most T tokens
        counts[f:e] += 1
        for i in range(f, e):  # context of target i: the window ending at its chunk end, or the doc start
            c_end = starts[k] + ((i - starts[k]) // stride + 1) * stride  # nominal: not cut at the doc end
            want = (starts[k] + (i - starts[k]) // T * T) if stride == T else max(starts[k], c_end - T)
            assert w == want
    assert (counts == 1).all()


# --- Document-masked stages against direct references -------------------------------------------


def test_doc_plain_equals_each_document_alone_and_sliding_equals_direct_windows():
    h = tiny(eval_stride=16, val_batch_tokens=3 * 64)
    model, luts, tokens = random_model(h), fake_luts(1024), doc_stream(300, seed=3, mean=100)
    starts, ends = tg.doc_spans(tokens)
    rp, plain = tg.eval_doc_windows(h, model.token_nll, CPU, tokens, luts, 64, collect=True)
    rs, slide = tg.eval_doc_windows(h, model.token_nll, CPU, tokens, luts, 16, collect=True)
    for s, e in zip(starts, ends):  # plain: the document as a stream of its own, cut every 64
        _, ref = tg.eval_windows(h, model.token_nll, CPU, tokens[s : e + 1], luts, 64, collect=True)
        assert torch.allclose(plain[s:e], ref, atol=1e-5)
    with torch.no_grad():  # sliding: target i from the window ending at its 16-chunk end, inside its doc
        for i in range(0, 300, 3):
            k = np.searchsorted(starts, i, side="right") - 1
            w = max(starts[k], starts[k] + ((i - starts[k]) // 16 + 1) * 16 - 64)
            x = tokens[w : i + 1]
            assert torch.allclose(slide[i], model.token_nll(x[None], tokens[w + 1 : i + 2][None])[0, -1], atol=1e-5)
    nbytes = tg.target_bytes(tokens[:-1], tokens[1:], luts).sum().item()
    assert rp.tokens == rs.tokens == 300 and rp.bytes == rs.bytes == nbytes
    assert rs.val_loss == pytest.approx(slide.double().mean().item(), rel=1e-9)


def test_lora_at_lr_zero_without_phases_equals_doc_sliding():
    h = tiny(**{**LORA, "lora_lr": 0.0, "phased_num_phases": 0})
    luts, tokens = fake_luts(1024), doc_stream(400, seed=4, mean=60)
    r, nll = run_lora(h, tokens, luts)
    rs, ref = tg.eval_doc_windows(h, random_model(h).token_nll, CPU, tokens, luts, 16, collect=True)
    # packed windows reach the same function through other matmul shapes: equal up to fp32 rounding
    assert torch.allclose(nll, ref, rtol=0, atol=2e-6) and r.val_bpb == pytest.approx(rs.val_bpb, rel=1e-7)
    assert (r.tokens, r.bytes) == (rs.tokens, rs.bytes)
    r2, nll2 = run_lora(dataclasses.replace(h, lora_lr=0.05), tokens, luts)
    assert not torch.equal(nll2, ref)  # the adapters do move once they learn


def test_fresh_adapters_are_the_identity_and_targets_knob():
    h = tiny(**LORA, lora_targets="k,o,mlp,head")
    model, tokens = random_model(h), doc_stream(3 * 64 + 1)
    lora = tg.DocLoRA(h, model, 3, torch.device("cpu"))
    assert {t for _, t in lora.sites} == {"k", "o", "mlp", "head"}
    n_slots = len(model.schedules[False].encoder) + len(model.schedules[False].decoder)
    assert len(lora.sites) == 3 * n_slots + 1  # one set per virtual layer slot, one head
    wins = [(r, 0, 64 * r, 64 * r, 64 * r + 64, True) for r in range(3)]  # one full window a row
    s = tg.lora_step(wins, [False] * 3, 3, 64, 64)
    g = {k: torch.from_numpy(v) for k, v in s._asdict().items()}
    ids, y = tokens[g["tok"]], tokens[g["tgt"] + 1]
    nll = lambda: tg.lora_nll(model, lora, lora.gather(g["rows"]), ids, None, g["rope"], g["seq"], g["offs"], g["head"],  # noqa: E731
                              g["pos"], y)
    with torch.no_grad():
        assert torch.equal(nll(), model.token_nll(ids, y))
        lora.p.copy_(torch.where(lora.is_a, lora.p, torch.randn_like(lora.p)))  # B != 0
        assert not torch.allclose(nll(), model.token_nll(ids, y))
    with pytest.raises(tg.ConfigError, match="LORA_TARGETS"):
        tiny(lora_targets="q,gate").validate()
    with pytest.raises(tg.ConfigError, match="LORA_CHUNK_TOKENS"):  # a chunk longer than its window
        tiny(lora_chunk_tokens=65).validate()


# --- Legality: score-first by perturbation, document independence, position spy ------------------


@pytest.mark.parametrize("stage,short", [("doc_plain", ""), ("doc_sliding", ""), ("lora_ttt", ""), ("lora_ttt", "24:4,60:8")])
def test_new_stages_are_score_first(stage, short):
    """p inside a document, around a document start, around each phase bound (the first target scored
    with the updated base), and near the end where the perturbation changes the document count; the
    LoRA stage also with short-document chunks (sized by offset, never by where a document ends)."""
    h = tiny(**{**LORA, "lora_lr": 0.5, "phased_lr": 0.5, "lora_short_chunks": short})  # large LRs make any leak visible
    luts, tokens = fake_luts(1024), doc_stream(400, seed=1, mean=60)
    starts, ends = tg.doc_spans(tokens)
    bounds = [int(starts[b]) for b in tg.phase_bounds(h, len(starts))]
    assert len(bounds) == 2 and len(starts) > 5
    # p = a document's end - 1 replaces the next BOS: that document (longer than a window, last chunk
    # partial) no longer ends there, so nothing before p may depend on where it ended
    k = next(k for k in range(len(starts) - 1) if ends[k] - starts[k] > 80 and (ends[k] - starts[k]) % 16)
    points = sorted({int(starts[1]) + 20, int(ends[k]) - 1, int(starts[2]), bounds[0] + 1, bounds[1], 390})
    base = cc.stage_nll(h, lambda: random_model(h), tokens, luts, stage)
    for p in points:
        other = cc.stage_nll(h, lambda: random_model(h), cc.perturb_after(tokens, p, 1024, p), luts, stage)
        assert torch.equal(other[:p], base[:p]), (p, (other[:p] != base[:p]).nonzero().flatten()[:5])
        assert not torch.equal(other[p:], base[p:]), p


@pytest.mark.parametrize("stage", ["doc_plain", "doc_sliding", "lora_ttt"])
def test_documents_are_independent(stage):
    h = tiny(**{**LORA, "phased_num_phases": 0, "lora_warm_start_a": False})
    luts, tokens = fake_luts(1024), doc_stream(400, seed=2, mean=60)
    starts, ends = tg.doc_spans(tokens)
    nll = lambda t: cc.stage_nll(h, lambda: random_model(h), t, luts, stage)  # noqa: E731
    base = nll(tokens)
    for k in (0, len(starts) - 1):
        other = nll(change_docs(tokens, k))
        assert torch.equal(other[starts[k] : ends[k]], base[starts[k] : ends[k]]), k
        assert not torch.equal(other, base)


def test_phased_sgd_carries_a_document_only_into_documents_scored_after_its_phase():
    h = tiny(**{**LORA, "lora_warm_start_a": False})
    luts, tokens = fake_luts(1024), doc_stream(400, seed=2, mean=60)
    starts, ends = tg.doc_spans(tokens)
    b1 = tg.phase_bounds(h, len(starts))[0]  # documents [0, b1) train the base before b1.. are scored
    base = run_lora(h, tokens, luts)[1]
    other = run_lora(h, change_docs(tokens, keep=1), luts)[1]  # every document but 1 changes
    assert torch.equal(other[starts[1] : ends[1]], base[starts[1] : ends[1]])
    other = run_lora(h, replace_tokens(tokens, 0, int(ends[0])), luts)[1]  # only document 0 changes
    assert torch.equal(other[starts[1] : starts[b1]], base[starts[1] : starts[b1]])  # same phase: untouched
    assert not torch.equal(other[starts[b1] :], base[starts[b1] :])  # after its phase: the updated base


def test_position_spy_every_trained_target_was_scored_first():
    h = tiny(**LORA)
    luts, tokens = fake_luts(1024), doc_stream(400, seed=6, mean=60)
    starts, ends = tg.doc_spans(tokens)
    trace = []
    run_lora(h, tokens, luts, trace=trace)
    scored = np.zeros(400, dtype=bool)
    last_score, n_lora, n_sgd, phase_ends, prev = {}, 0, 0, [], None
    bounds = [int(starts[b]) for b in tg.phase_bounds(h, len(starts))]
    for kind, a, b in trace:
        k = int(np.searchsorted(starts, a, side="right") - 1)
        if kind == "score":
            assert not scored[a:b].any()  # each target scored once
            scored[a:b] = True
            last_score[k] = (a, b)
        elif kind == "train":  # a LoRA step: exactly the chunk this document just scored, never its last
            assert (a, b) == last_score[k] and b < ends[k], (a, b)
            n_lora += 1
        else:  # global SGD: scored targets of documents before a phase bound
            assert scored[a:b].all() and b <= bounds[-1], (a, b)
            n_sgd += 1
            phase_ends += [b] if prev != "sgd" else []
            phase_ends[-1] = max(phase_ends[-1], b)
        prev = kind
    assert scored.all()
    legal.assert_score_first([("score" if k == "score" else "train", torch.arange(a, b)) for k, a, b in trace], 400)
    n_chunks = len(tg.doc_chunks(starts, ends, h.lora_chunk_tokens)[0])
    assert n_lora == n_chunks - len(starts)  # every chunk but each document's last trains once
    C = h.ttt_chunk_tokens  # each phase trains every whole chunk before its bound, and nothing else
    assert phase_ends == [b // C * C for b in bounds if b >= C] and n_sgd > 0


# --- Packed steps: the same function as one padded row per document, less work ---------------------


def lengths_stream(lengths, seed: int = 0) -> torch.Tensor:
    """Random tokens with documents of exactly these lengths (each starts with a BOS)."""
    t = stream(int(sum(lengths)), seed=seed)
    t[t == tg.BOS_ID] = 2
    t[np.cumsum([0, *lengths[:-1]])] = tg.BOS_ID
    return t


@pytest.mark.parametrize("warm,tilt", [(True, False), (False, False), (True, True)])
def test_packed_stage_equals_the_unpacked_reference(warm, tilt):
    """Phases, LR > 0, documents longer than a window (windows inside a document) and shorter ones:
    val_bpb to 1e-6 and every NLL to fp32 rounding. Without warm-start A the documents are dealt
    longest first (another order, other rows): the same scores, since no score depends on placement."""
    import lora_reference as ref
    h = tiny(**{**LORA, "lora_warm_start_a": warm, "lora_batch_docs": 4})
    lengths = [150, 7, 40, 90, 3, 70, 20, 130, 12, 60, 33, 5]
    luts, tokens = fake_luts(1024), lengths_stream(lengths, seed=9)
    tl = None
    if tilt:  # a small alphabet, so that contexts repeat and hints fire
        tokens = torch.where(tokens == tg.BOS_ID, tokens, tokens % 6 + 2)
        tl = (torch.from_numpy(tg.ngram_hints(tokens.numpy(), 2, 0.3)).long(), 2.0)
        assert (tl[0] >= 0).sum() > 100
    m = random_model(h)
    r, nll = tg.eval_lora_ttt(h, m, m, CPU, tokens, luts, collect=True, tilt=tl)
    m = random_model(h)
    rr, nll_ref = ref.eval_lora_ttt(h, m, m, CPU, tokens, luts, collect=True, tilt=tl)
    assert (r.tokens, r.bytes) == (rr.tokens, rr.bytes) == (len(tokens) - 1, tg.target_bytes(tokens[:-1], tokens[1:], luts).sum().item())
    assert r.val_bpb == pytest.approx(rr.val_bpb, rel=1e-6, abs=0)
    assert torch.allclose(nll, nll_ref, rtol=0, atol=1e-5), (nll - nll_ref).abs().max()


def test_lora_step_layout_packs_each_window_whole_with_its_row():
    rng = np.random.default_rng(0)
    T, C, R = 64, 16, 12
    for _ in range(30):
        n = int(rng.integers(1, R + 1))
        wins, pos = [], 0
        for r in sorted(rng.choice(R, n, replace=False).tolist()):
            w = int(rng.integers(1, T + 1))
            first = pos + max(w - C, 0) + int(rng.integers(0, 2))
            wins.append((r, r, pos, min(first, pos + w - 1), pos + w, bool(rng.integers(0, 2))))
            pos += w + 5
        at_bos = [bool(rng.integers(0, 2)) for _ in wins]
        s = tg.lora_step(wins, at_bos, R, C, T)
        L = s.tok.shape[0]
        lanes = len({int(np.flatnonzero(s.tok.flatten() == w[2])[0]) // T for w in wins})
        assert lanes <= L == tg.lane_bucket(L, R) and L < max(2, 1.25 * lanes + 1)
        flat_tok, flat_rope = s.tok.flatten(), s.rope.flatten()
        group = np.searchsorted(s.offs, np.arange(L * T), side="right")  # adapter group of each position
        cu = set(s.cu.tolist())
        for i, ((r, _, ws, first, end, more), b) in enumerate(zip(wins, at_bos)):
            at = np.flatnonzero(flat_tok == ws)
            assert at.size == 1
            p = int(at[0])
            assert (flat_tok[p : p + end - ws] == np.arange(ws, end)).all()  # whole and in order
            assert (flat_rope[p : p + end - ws] == np.arange(end - ws)).all()  # RoPE restarts at 0
            assert b or p % T == 0  # a window inside its document opens a lane
            assert (s.seq[group[p : p + end - ws]] == i).all() and p in cu  # its window's adapters, own segment
            k = s.mask[i].sum()
            assert k == end - first and (s.tgt[i, :k] == np.arange(first, end)).all() and s.rows[i] == r and s.head[i] == i
            assert (flat_tok[s.pos[i, :k]] == np.arange(first, end)).all() and s.more[i] == more
        assert (s.tok >= 0).sum() == sum(w[4] - w[2] for w in wins)  # nothing scored twice, nothing dropped
        assert s.cu.size == R + L + 1 and (np.diff(s.cu) >= 0).all() and s.cu[-1] == L * T


@pytest.mark.parametrize("warm", [True, False])
def test_lora_queues_keep_phase_blocks_and_balance_without_warm_start(warm):
    h = tiny(**{**LORA, "lora_warm_start_a": warm, "phased_prefix_docs": 40, "phased_num_phases": 2})
    lengths = np.random.default_rng(1).geometric(1 / 80, 300)
    starts = np.cumsum([0, *lengths[:-1]])
    ends = starts + lengths
    qs = tg.lora_queues(starts, ends, h, 4)
    edges = [0, 20, 40, 300]
    doc, ws, _, end = tg.lora_windows(starts, ends, tg.lora_chunk_ends(h, int(lengths.max())), h.eval_seq_len)
    work = np.bincount(doc, end - ws)
    for b in range(3):
        got = np.concatenate([qs[r][b] for r in range(4)])
        assert sorted(got.tolist()) == list(range(edges[b], edges[b + 1]))  # every document once, in its block
        if warm:  # placement independent of lengths: round-robin in stream order
            assert all((qs[r][b] % 4 == r).all() and (np.diff(qs[r][b]) > 0).all() for r in range(4))
        else:  # LPT: no rank above the mean by more than one document's work
            loads = [work[qs[r][b]].sum() for r in range(4)]
            assert max(loads) <= work[edges[b] : edges[b + 1]].sum() / 4 + work[edges[b] : edges[b + 1]].max()
            assert all((np.diff(work[qs[r][b]]) <= 0).all() for r in range(4))  # longest first


def test_lora_work_log_counts_positions_against_the_ideal():
    h = tiny(**{**LORA, "phased_num_phases": 0, "lora_batch_docs": 4})
    lengths = [150, 7, 40, 90, 3, 70, 20, 130, 12, 60, 33, 5]
    tokens, lines = lengths_stream(lengths, seed=3), []
    tg.eval_lora_ttt(h, random_model(h), random_model(h), CPU, tokens, fake_luts(1024), log=lines.append)
    line = next(x for x in lines if x.startswith("lora_ttt_work"))
    kv = dict(f.split(":") for f in line.split()[1:])
    T, C = h.eval_seq_len, h.lora_chunk_tokens
    starts = np.cumsum([0, *lengths[:-1]])
    doc, _, end = tg.doc_chunks(starts, starts + np.array(lengths), C)  # targets: the last doc ends at the stream end
    ideal = np.minimum(end - starts[doc], T).sum() / sum(lengths)
    assert int(kv["targets"]) == sum(lengths) and float(kv["ideal"]) == pytest.approx(ideal, abs=1e-3)
    assert float(kv["ideal"]) <= float(kv["positions_per_target"])


def test_lora_stage_reads_no_device_value_per_step():
    """Row bookkeeping comes from the host's document lengths: the number of host reads of tensor
    values (a device sync each on a GPU) does not grow with the steps the stage takes."""
    from test_dist_step import HostReads

    class Reads(HostReads):  # and boolean-mask indexing, whose output size is read back from the device
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            idx = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx if isinstance(idx, tuple) else (idx,))):
                self.calls.append("mask_index")
            return super().__torch_function__(func, types, args, kwargs)
    h = tiny(**{**LORA, "lora_batch_docs": 4, "phased_prefix_docs": 3, "phased_num_phases": 1})
    counts = []
    for lengths in ([150, 7, 40, 90, 3, 70], [150, 7, 40, 90, 3, 70, 20, 130, 12, 60, 33, 5, 170, 44]):
        tokens, m, mode = lengths_stream(lengths, seed=3), random_model(h), Reads()
        with mode:
            tg.eval_lora_ttt(h, m, m, CPU, tokens, fake_luts(1024))
        counts.append(len(mode.calls))
    assert counts[0] == counts[1], counts


def test_a_step_split_by_lanes_computes_the_same():
    """LORA_MAX_LANES bounds the lanes of one forward: a step whose windows need more runs as several
    forwards (each with its own rows' AdamW step), the same scores as one forward per step."""
    h = tiny(**{**LORA, "lora_batch_docs": 6, "phased_num_phases": 1, "phased_prefix_docs": 4})
    lengths = [150, 70, 40, 90, 130, 70, 20, 130, 12, 160, 33, 5]
    luts, tokens, out = fake_luts(1024), lengths_stream(lengths, seed=4), []
    for lanes in (64, 1):
        m, lines = random_model(h), []
        out.append(tg.eval_lora_ttt(dataclasses.replace(h, lora_max_lanes=lanes), m, m, CPU, tokens, luts, collect=True,
                                    log=lines.append))
        out.append(int(next(x for x in lines if x.startswith("lora_ttt_work")).split("rank0_steps:")[1]))
    (r1, nll1), n1, (r2, nll2), n2 = out
    assert n2 > n1  # the split ran more forwards
    assert r1.val_bpb == pytest.approx(r2.val_bpb, rel=1e-6) and torch.allclose(nll1, nll2, rtol=0, atol=1e-5)
    wins = [(r, r, 100 * r, 100 * r + 20, 100 * r + 64, True) for r in range(6)]
    subs = tg.lora_substeps(wins, [False] * 6, 64, 4)  # six lanes of one window each: 4 + 2
    assert [len(w) for w, _ in subs] == [4, 2] and sorted(x for w, _ in subs for x in w) == wins
    assert [p[1] for _, p in subs] == [4, 2] and all(lane < 4 for _, p in subs for lane, _ in p[0])  # lanes renumbered


def test_short_chunks_follow_the_offset_inside_the_document():
    """LORA_SHORT_CHUNKS: chunk sizes by the chunk's start offset (8 below 256, 24 below 2000, then 48),
    every target in one chunk, each trained chunk the one just scored; a document's chunks are the
    same whatever its length (its first chunks equal a longer document's)."""
    h = tiny(**{**LORA, "lora_short_chunks": "24:4,60:8", "phased_num_phases": 0})
    cend = tg.lora_chunk_ends(h, 200)
    assert cend[:8].tolist() == [4, 8, 12, 16, 20, 24, 32, 40] and cend[8:11].tolist() == [48, 56, 64]
    assert (np.diff(cend[11:]) == 16).all()  # from the first chunk starting at or past 60: LORA_CHUNK_TOKENS
    big = tg.Hyperparameters(lora_short_chunks="256:8,2000:24")
    e = tg.lora_chunk_ends(big, 2100)
    assert e[31] == 256 and e[32] == 280 and (np.diff(e[32:-2]) == 24).all() and e[-1] - e[-2] == 48
    lengths = [150, 7, 40, 90, 3, 70]
    tokens, trace = lengths_stream(lengths, seed=2), []
    m = random_model(h)
    tg.eval_lora_ttt(h, m, m, CPU, tokens, fake_luts(1024), trace=trace)
    starts = np.cumsum([0, *lengths[:-1]])
    for k, (s, n) in enumerate(zip(starts, lengths)):
        want = [(s + a, s + min(b, n)) for a, b in zip(np.r_[0, cend[:-1]], cend) if a < n]
        got = [(a, b) for kind, a, b in trace if kind == "score" and s <= a < s + n]
        assert got == want, k
        trained = [(a, b) for kind, a, b in trace if kind == "train" and s <= a < s + n]
        assert trained == want[:-1], k  # every chunk but the last trains, on exactly what it scored
