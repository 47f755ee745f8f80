"""tools/bench_eval.py --project: the simulated steps of our LoRA stage are the steps eval_lora_ttt takes
(counted inside the real stage on a tiny CPU stream, per rank), the record's queue simulation follows a
hand-worked timeline with its barrier, our blocks wait for their slowest rank at every phase bound with
global SGD, lengths read from a shard match doc_spans, and on the real validation lengths one
calibration reproduces the other records of its code line."""
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO, SHARED_DATA
from test_eval import fake_luts, random_model, tiny
from test_eval_docs import LORA, doc_stream

sys.path.insert(0, str(REPO / "tools"))
import bench_eval as be  # noqa: E402

LENGTHS = SHARED_DATA / "val_doc_lengths"


def run_stage(h, tokens, rank, world, monkeypatch):
    """eval_lora_ttt as rank `rank` of `world` (no process group: the collectives are no-ops, so the rank
    does exactly its share); returns every LoraStep it built and its lora_ttt_work line."""
    steps, lines = [], []
    real = tg.lora_step

    def spy(*a):
        steps.append(real(*a))
        return steps[-1]

    monkeypatch.setattr(tg, "lora_step", spy)
    model = random_model(h)
    tg.eval_lora_ttt(h, model, model, tg.Dist(rank, world, 0, torch.device("cpu")), tokens, fake_luts(h.vocab_size),
                     log=lines.append)
    return steps, next(line for line in lines if line.startswith("lora_ttt_work"))


@pytest.mark.parametrize("warm, world, lanes", [(True, 1, 24), (False, 2, 1)])  # lanes 1: steps split into forwards
def test_simulated_steps_are_the_steps_the_stage_takes(warm, world, lanes, monkeypatch):
    h = tiny(**{**LORA, "lora_warm_start_a": warm, "lora_batch_docs": 4, "eval_seq_len": 64, "lora_chunk_tokens": 16,
                "lora_max_lanes": lanes})
    tokens = doc_stream(1500, seed=3, mean=60)
    starts, ends = tg.doc_spans(tokens)
    at_bos = tokens[:-1].numpy()[starts] == tg.BOS_ID
    plan, work = be.lora_plan(h, starts, ends, at_bos, world)
    assert len(plan) == world and all(len(b) == len(tg.phase_bounds(h, len(starts))) + 1 for b in plan)
    total = np.zeros(3)
    for rank in range(world):
        steps, line = run_stage(h, tokens, rank, world, monkeypatch)
        sim = plan[rank]
        assert sum(len(s.positions) for s in sim) == len(steps) == int(re.search(r"rank0_steps:(\d+)", line)[1])
        assert np.concatenate([s.positions for s in sim]).tolist() == [s.tok.size for s in steps]
        pairs = [float((np.diff(s.cu).astype(np.float64) ** 2).sum()) for s in steps]  # the attention segments it runs
        assert np.concatenate([s.pairs for s in sim]).tolist() == pairs
        assert np.concatenate([s.train for s in sim]).tolist() == [bool(s.more.any()) for s in steps]
        assert np.concatenate([s.rows for s in sim]).tolist() == [len(s.rows) for s in steps]  # rows gathered per forward
        total[0] += sum(s.tok.size for s in steps)
        total[2] += sum(int(s.mask.sum()) for s in steps)
    assert total[2] == work[2] == len(tokens) - 1  # every target once, over the ranks
    assert total[0] == work[0]
    if world == 1:  # the stage's own figures (summed over ranks by its all-reduce, here one rank)
        ppt, ideal = (float(x) for x in re.search(r"positions_per_target:([\d.]+) ideal:([\d.]+)", line).groups())
        assert ppt == pytest.approx(work[0] / work[2], abs=1e-3) and ideal == pytest.approx(work[1] / work[2], abs=1e-3)


def test_record_queue_follows_a_hand_timeline_with_its_barrier():
    # 2 ranks, a phase bound after 2 documents, a 5 s pause. r0 takes b0 (10 s), r1 b1 (3 s) then b2 (3 s):
    # 2 documents done at t=6, so r1 waits; r0 arrives at 10; SGD to 15; then b3 (3 s) and b4 (1 s): end 18.
    batches = [(1, (10.0, 0.0)), (1, (3.0, 0.0)), (1, (3.0, 0.0)), (1, (3.0, 0.0)), (1, (1.0, 0.0))]
    rate = be.Rate(1.0, 0.0)
    end, bars = be.simulate_record(batches, [2], [5.0], rate, world=2)
    assert rate.secs(end) == 18.0 and [rate.secs(b) for b in bars] == [10.0]
    end, bars = be.simulate_record(batches, [], [], rate, world=2)  # no phases: r1 runs b1, b2, b3 (t=9), b4 (t=10)
    assert rate.secs(end) == 10.0 and bars == []


def test_record_batches_follow_the_record_queue():
    fl = be.Flops(1.0, 0.0, 0.0, 0.0, 0.0)  # FLOPs = positions (x2 with a backward)
    lengths = np.array([5, 101, 50, 51, 3, 200, 7]) + 1  # targets + 1, as the records log them
    b = be.record_batches(lengths, chunk=50, fl=fl, bsz=2, T=100)
    # sorted [3, 5 | 7, 50 | 51, 101 | 200]: cut from the shortest, so the longest batch holds the remainder
    assert [d for d, _ in b] == [1, 2, 2, 2]
    # 200 targets: 4 chunks at ctx 50, 100, 100, 100, backward on all but the last; 101: 3 chunks; 50 and 5: 1
    assert [c for _, c in b] == [(2 * 250 + 100, 4), (2 * (2 * 150 + 100), 6), (2 * 50, 2), (2 * 50, 2)]
    assert be.record_positions(lengths, 50, 2, 100) == (350 + 2 * 250 + 2 * 50 + 2 * 50) / 417  # rows padded to ctx


def test_every_block_waits_for_its_slowest_rank_and_the_global_sgd():
    h = tiny(**LORA)
    rate, fl = be.Rate(0.0, 1.0), be.Flops(0.0, 0.0, 0.0, 0.0, 0.0)  # a step costs its rows

    def steps(n):
        return be.RankSteps(np.zeros(n), np.zeros(n), np.ones(n, bool), np.full(n, float(h.lora_batch_docs)))

    plan = [[steps(10), steps(1)], [steps(1), steps(10)]]  # each rank 11 steps, never at the same time
    rows = h.lora_batch_docs
    r = be.lora_seconds(h, plan, [2], rate, 7.0, fl)
    assert r["scoring"] == 20 * rows and r["sgd"] == 14.0 and r["total"] == 20 * rows + 14.0
    r = be.lora_seconds(h, plan, [0], rate, 7.0, fl)  # no SGD chunk: global_sgd returns before any collective
    assert r["scoring"] == 11 * rows and r["sgd"] == 0.0


def test_lengths_from_a_shard_are_the_document_spans(tmp_path):
    toks = doc_stream(400, seed=1, mean=30).numpy().astype("<u2")
    path = tmp_path / "fineweb_val_000000.bin"
    header = np.zeros(tg.HEADER_INTS, "<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, toks.size
    path.write_bytes(header.tobytes() + toks.tobytes())
    starts, ends = tg.doc_spans(torch.from_numpy(toks.astype(np.int64)))
    assert (be.read_lengths(str(path)) - 1).tolist() == (ends - starts).tolist()
    np.save(tmp_path / "l.npy", np.array([3, 1]))
    with pytest.raises(tg.ConfigError, match="lengths >= 2"):
        be.read_lengths(str(tmp_path / "l.npy"))


@pytest.mark.skipif(not LENGTHS.is_dir(), reason="needs the reconstructed validation lengths")
def test_one_calibration_reproduces_the_records_of_its_code_line():
    caseops = be.read_lengths(str(LENGTHS / "fineweb_val_caseops_sp8192.npy"))
    sp = be.read_lengths(str(LENGTHS / "fineweb_val_sp8192.npy"))
    base = tg.Hyperparameters()
    rate = be.calibrate(be.RECORDS["04-19"], caseops, base)
    for name, lengths in (("04-19", caseops), ("04-22", caseops), ("04-16", sp)):  # 04-16: other lengths, no phases
        r = be.check_record(be.RECORDS[name], lengths, base, rate)
        assert r["scoring"] == pytest.approx(r["logged_scoring"], rel=0.10), name
    assert be.check_record(be.RECORDS["04-19"], caseops, base, rate)["barriers"][0] == pytest.approx(166.7, rel=1e-6)
    wrong = be.check_record(be.RECORDS["04-16"], caseops, base, rate)  # the other tokenizer's lengths: visibly off
    assert abs(wrong["scoring"] / wrong["logged_scoring"] - 1) > 0.10


def test_project_refuses_without_lengths(capsys):
    assert be.main(["--project"]) == 2
    assert "error: --project needs --lengths" in capsys.readouterr().err


def test_project_runs_on_a_small_set(tmp_path, capsys, monkeypatch):
    for k in [k for k in list(__import__("os").environ) if k in {f.name.upper() for f in tg.fields(tg.Hyperparameters)}]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PRESET", "smoke")
    lengths = np.random.default_rng(0).integers(2, 700, 3000)
    np.save(tmp_path / "l.npy", lengths)
    monkeypatch.setattr(be, "calibrate", lambda *a: be.Rate(1 / 200e12, 5e-4))  # the real fit needs 50,000 documents
    assert be.main(["--project", "--lengths", str(tmp_path / "l.npy"), "--orders", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ours:env lora_ttt_work positions_per_target:[\d.]+/", out)
    assert re.search(r"eval_budget:[\d.]+/[\d.]+/[\d.]+s target:540s", out)


@pytest.mark.skipif(not LENGTHS.is_dir(), reason="needs the reconstructed validation lengths")
def test_record_config_packs_within_half_again_of_the_ideal():
    """At the defaults on the real length distribution (one stream order, 8 ranks, the stage's own
    planners), the forwards process at most 1.5x the ideal positions per target, Σ min(chunk end −
    document start, EVAL_SEQ_LEN), and far below one padded row per document and step."""
    h = tg.Hyperparameters()
    starts, ends = be.stream_order(be.read_lengths(str(LENGTHS / "fineweb_val_caseops_sp8192.npy")), 0)
    plan, work = be.lora_plan(h, starts, ends, np.ones(len(starts), bool), 8)
    x, y = work[0] / work[2], work[1] / work[2]
    doc, _, first, end = tg.lora_windows(starts, ends, tg.lora_chunk_ends(h, int((ends - starts).max())), h.eval_seq_len)
    assert y == pytest.approx(np.minimum(end - starts[doc], h.eval_seq_len).sum() / (end - first).sum(), rel=1e-9)
    padded = max(sum(len(s.positions) for s in b) for b in plan) * h.lora_batch_docs * h.eval_seq_len * 8 / work[2]
    assert y <= x <= 1.5 * y and x < padded / 2, (x, y, padded)
