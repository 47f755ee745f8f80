import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import FINEWEB, REPO, SP1024, SP8192, TINY, clean_environ, tiny_env

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def quiet_log():
    return tg.Logger(CPU, None)


# --- Hyperparameters -----------------------------------------------------------------------------


def test_defaults_are_record_config():
    h = tg.Hyperparameters()
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.vocab_size) == (11, 512, 8, 4, 8192)
    assert (h.loop_start, h.loop_end, h.num_loops, h.parallel_residual_start) == (3, 5, 2, 8)
    assert (h.qk_gain_init, h.muon_momentum, h.ema_decay) == (5.0, 0.97, 0.9965)
    # the 1.0611 record (#1855): schedule, Adam beta2, the new parts; #2135: MATRIX_LR, GPTQ calibration, LQER, eval length
    assert (h.matrix_lr, h.beta2, h.warmdown_frac, h.min_lr, h.gptq_calibration_batches) == (0.028, 0.99, 0.85, 0.10, 32)
    assert (h.lqer_top_n, h.lqer_rank, h.lqer_a_bits, h.lqer_b_bits, h.lqer_group, h.eval_seq_len) == (3, 4, 2, 4, 32, 2560)
    assert (h.lora_lr, h.lora_wd, h.lora_target_list) == (8e-5, 2.0, ("q", "v", "o", "mlp", "head"))
    assert (h.doc_mask, h.smear_gate, h.attn_gate, h.sparse_attn_gate_scale, h.polar_express, h.fused_ce) == (
        True, True, "sparse", 0.5, True, True)
    assert h.train_budget_seconds == pytest.approx(600 - 8)
    # the data of #2135: the CaseOps export; CASEOPS=0 the plain one
    assert h.dataset_dir == os.path.join("./data", "datasets", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    assert h.tokenizer_file == os.path.join("./data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    plain = tg.Hyperparameters.from_env({"CASEOPS": "0"})
    assert (plain.dataset_dir, plain.tokenizer_file) == (os.path.join("./data", "datasets", "fineweb10B_sp8192"),
                                                         os.path.join("./data", "tokenizers", "fineweb_8192_bpe.model"))


def test_from_env_casts_and_presets():
    h = tg.Hyperparameters.from_env({"PRESET": "smoke", "NUM_LAYERS": "5", "COMPILE": "false", "MATRIX_LR": "0.01"})
    assert h.num_layers == 5 and h.compile is False and h.matrix_lr == 0.01
    assert h.model_dim == tg.PRESETS["smoke"]["model_dim"]
    assert tg.Hyperparameters.from_env({"SKIP_GATES_ENABLED": "1"}).skip_gates_enabled is True
    # foreign variables that merely share a generic prefix are left alone
    tg.Hyperparameters.from_env({"MAX_JOBS": "4", "NUM_THREADS": "2", "PATH": "/bin", "RANK": "0"})


@pytest.mark.parametrize("env, words", [
    ({"COMPILE": "yes"}, ["COMPILE", "bool"]),
    ({"NUM_LAYERS": "eleven"}, ["NUM_LAYERS", "int"]),
    ({"MATRIX_LR": "0.02x"}, ["MATRIX_LR", "float"]),
    ({"NUM_LAYER": "3"}, ["NUM_LAYER", "NUM_LAYERS"]),
    ({"MUON_MOMENTUMS": "0.9"}, ["MUON_MOMENTUMS"]),
    ({"PRESET": "huge"}, ["PRESET", "smoke"]),
    ({"NUM_HEADS": "7"}, ["MODEL_DIM", "NUM_HEADS"]),
    ({"TRAIN_BATCH_TOKENS": "1000"}, ["TRAIN_BATCH_TOKENS"]),
])
def test_from_env_rejects(env, words):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env(env)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# --- Data ----------------------------------------------------------------------------------------


def test_shard_round_trip_and_header_checks(tmp_path):
    import build_shards

    toks = np.arange(1000, dtype=np.uint16) * 7
    p = tmp_path / "fineweb_train_000000.bin"
    build_shards.write_shard(p, toks)
    assert np.array_equal(tg.read_shard(str(p)), toks)
    raw = p.read_bytes()
    for name, data, word in [
        ("magic", b"\0\0\0\0" + raw[4:], "magic"),
        ("size", raw[:-2], "header says 1000 tokens"),
        ("short", raw[:100], "shorter than"),
    ]:
        bad = tmp_path / f"{name}.bin"
        bad.write_bytes(data)
        with pytest.raises(tg.ConfigError, match=word) as e:
            tg.read_shard(str(bad))
        assert str(bad) in str(e.value)


def test_val_tokens_truncated_to_whole_sequences(dataset):
    raw = np.concatenate([np.asarray(tg.read_shard(p)) for p in tg.shard_paths(str(dataset), "val")])
    val = tg.load_val_tokens(str(dataset), 64)
    assert (val.numel() - 1) % 64 == 0 and 0 <= raw.size - val.numel() < 64
    assert torch.equal(val, torch.from_numpy(raw[: val.numel()].astype(np.int64)))


def test_loader_is_deterministic_disjoint_and_world_size_independent(dataset):
    paths = tg.shard_paths(str(dataset), "train")
    one = tg.TrainLoader(paths, 64, seed=1)
    x1, y1 = one.next_batch(8, 0, 1)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    two = [tg.TrainLoader(paths, 64, seed=1) for _ in range(2)]
    parts = [two[r].next_batch(8, r, 2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), x1)  # ranks read disjoint slices of the same global batch
    other = tg.TrainLoader(paths, 64, seed=2).next_batch(8, 0, 1)[0]
    assert not torch.equal(other, x1)  # order depends on SEED
    # a whole epoch visits every window exactly once
    n = one.windows_per_epoch
    loader = tg.TrainLoader(paths, 64, seed=3)
    seen = {tuple(r.tolist()) for r in loader.next_batch(n, 0, 1)[0]}
    assert len(seen) == n


def test_byte_luts_match_decoded_utf8(shared_data):
    """Table byte counts equal the UTF-8 length of the decoded text, on every real document."""
    import sentencepiece as spm

    docs = [json.loads(line)["text"] for line in open(FINEWEB, encoding="utf-8")]
    for model, vocab in [(SP1024, 1024), (SP8192, 8192)]:
        sp = spm.SentencePieceProcessor(model_file=str(model))
        luts = tg.build_byte_luts(str(model), vocab)
        for text in docs:
            ids = sp.encode(text)
            seq = torch.tensor([tg.BOS_ID] + ids)
            counted = int(tg.target_bytes(seq[:-1], seq[1:], luts).sum())
            assert counted == len(sp.decode(ids).encode("utf-8"))


def test_byte_luts_reject_wrong_vocab(shared_data):
    with pytest.raises(tg.ConfigError, match="VOCAB_SIZE=8192"):
        tg.build_byte_luts(str(SP1024), 8192)


# --- Model ---------------------------------------------------------------------------------------


def test_default_schedule_matches_spec():
    h = tg.Hyperparameters()
    plain, looped = tg.layer_schedule(h, False), tg.layer_schedule(h, True)
    assert plain == tg.Schedule([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 5, 3)
    assert looped == tg.Schedule([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10], 8, 6)
    # LIFO skips: decoder position j receives the output of encoder position len(enc)-1-j
    pairs = [(looped.decoder[j], looped.encoder[len(looped.encoder) - 1 - j]) for j in range(looped.n_skip)]
    assert pairs == [(5, 4), (3, 3), (4, 5), (5, 4), (6, 3), (7, 2), (8, 1), (9, 0)]
    assert tg.layer_schedule(tg.Hyperparameters(num_loops=0), True) == plain


def test_default_param_count():
    # 04-09 shapes: 35,944,536 + 66 lane parameters (11x2 resid + 11x2x2 post) + 13 SmearGate
    # + 11 x 8 x 12 sparse attention gates = 35,945,671, the count of the 1.0611 record (#1855)
    assert tg.count_params(tg.GPT(tg.Hyperparameters())) == 35_944_536 + 66 + 13 + 1056 == 35_945_671
    off = tg.Hyperparameters(smear_gate=False, attn_gate="none")
    assert tg.count_params(tg.GPT(off)) == 35_944_536 + 66


def test_embedding_projections():
    model = tg.GPT(tiny(embedding_dim=32))
    assert model.tok_emb.weight.shape == (1024, 32)
    assert model.embed_proj.weight.shape == (64, 32) and model.head_proj.weight.shape == (32, 64)
    ids = torch.randint(0, 1024, (2, 16))
    assert model.logits(ids).shape == (2, 16, 1024)
    groups = {n: tg.param_group(n, p) for n, p in model.named_parameters()}
    assert groups["embed_proj.weight"] == groups["head_proj.weight"] == "muon"
    h = tiny(embedding_dim=32)  # quantized like block matrices, never fp16 passthrough
    assert tg.quant_spec("embed_proj.weight", model.embed_proj.weight, h) == (h.matrix_bits, h.matrix_clip_sigmas)
    assert tg.quant_spec("head_proj.weight", model.head_proj.weight, h) == (h.matrix_bits, h.matrix_clip_sigmas)


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = tg.GPT(tiny())
    ids = torch.randint(0, 1024, (4, 64))
    assert abs(model(ids, torch.randint(0, 1024, (4, 64))).item() - math.log(1024)) < 0.02


@pytest.mark.parametrize("looping", [False, True])
def test_future_tokens_cannot_change_past_losses(looping):
    torch.manual_seed(0)
    model = tg.GPT(tiny())
    with torch.no_grad():  # move off the identity-like init so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.looping_active = looping
    ids, tgt = torch.randint(0, 1024, (2, 64)), torch.randint(0, 1024, (2, 64))
    base = model.token_nll(ids, tgt)
    for p in (0, 17, 63):
        changed = ids.clone()
        changed[:, p + 1 :] = torch.randint(0, 1024, changed[:, p + 1 :].shape)
        changed[:, p] = (ids[:, p] + 1) % 1024 if p == 63 else ids[:, p]
        nll = model.token_nll(changed, tgt)
        assert torch.equal(nll[:, :p], base[:, :p])
    assert not torch.equal(nll[:, 63], base[:, 63])


def test_parallel_lanes_follow_spec_equations():
    """One two-lane block against the PR #1530 two-lane equations written out by hand."""
    torch.manual_seed(0)
    h = tiny()
    model = tg.GPT(h)
    blk = model.blocks[3]
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    l0, l1, x0 = torch.randn(3, 2, 8, 64).unbind(0)
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    resid, post = torch.randn(2), torch.randn(2, 2)
    out0, out1 = blk.forward_lanes(l0, l1, x0, cos, sin, resid, post)
    s = 1 / math.sqrt(4)
    a_in = blk.resid_mix[0] * l0 + blk.resid_mix[1] * x0
    A = blk.attn_scale * blk.attn(tg.rms_norm(a_in) * s, cos, sin)
    M = blk.mlp_scale * blk.mlp(tg.rms_norm(l1) * s)
    torch.testing.assert_close(out0, resid[0] * l0 + post[0, 0] * A + post[1, 0] * M)
    torch.testing.assert_close(out1, resid[1] * l1 + post[0, 1] * A + post[1, 1] * M)


# --- Optimizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 48, 48)])
def test_newton_schulz_against_svd_polar_factor(shape):
    """NS5 returns U f(S) V^T: same singular vectors as the SVD polar factor U V^T, f(S) near 1."""
    torch.manual_seed(0)
    g = torch.randn(*shape)
    x = tg.newton_schulz(g, 5)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    m = U.mT @ x @ Vh.mT  # diagonal iff x shares g's singular vectors
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    assert (m - torch.diag_embed(diag)).abs().max() < 1e-4
    assert diag.max() < 1.2 and diag[..., : diag.size(-1) // 2].min() > 0.65  # the quintic's band
    polar = U @ Vh
    cos = (x * polar).sum((-2, -1)) / (x.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.97


def test_muon_step_matches_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16))
    ref = w.detach().clone()
    opt = tg.Muon([w], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5)
    buf = torch.zeros_like(ref)
    for _ in range(3):
        g = torch.randn(32, 16)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        u = g + 0.9 * buf
        u = u / u.norm(dim=1, keepdim=True)
        ref = ref * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(2.0) * tg.newton_schulz(u, 5)
        torch.testing.assert_close(w.detach(), ref)


def test_every_parameter_has_one_optimizer():
    model = tg.GPT(tg.Hyperparameters())
    opts = tg.build_optimizers(tg.Hyperparameters(), model, CPU)
    owned = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    groups = {n: tg.param_group(n, p) for n, p in model.named_parameters()}
    assert groups["tok_emb.weight"] == "embed"
    assert sum(v == "muon" for v in groups.values()) == 66  # 6 matrices x 11 blocks
    assert all(groups[n] == "scalar" for n in groups if n.endswith(("q_gain", "resid_mix", "skip_gates")))


def test_schedules():
    assert tg.lr_multiplier(0.0, 0.72, 0.0) == 1.0 and tg.lr_multiplier(0.27, 0.72, 0.0) == 1.0
    assert tg.lr_multiplier(0.64, 0.72, 0.0) == pytest.approx(0.5)
    assert tg.lr_multiplier(1.0, 0.72, 0.0) == 0.0 and tg.lr_multiplier(0.99, 0.85, 0.1) == 0.1
    lrs = [tg.lr_multiplier(f / 100, 0.72, 0.0) for f in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    h = tg.Hyperparameters()
    assert tg.muon_momentum_at(0, h) == 0.92 and tg.muon_momentum_at(750, h) == pytest.approx(0.945)
    assert tg.muon_momentum_at(10_000, h) == 0.97


# --- Training & evaluation -----------------------------------------------------------------------


def make_trainer(h, dataset):
    torch.manual_seed(h.seed)
    model = tg.GPT(h)
    return tg.Trainer(h, CPU, quiet_log(), model, tg.shard_paths(str(dataset), "train"))


def test_compile_warmup_leaves_trajectory_unchanged(dataset):
    """Warmup steps (both loop modes) are undone: same weights as a run without warmup."""
    results = []
    for warmup in (0, 2):
        h = tiny(iterations=6, warmup_steps=warmup, enable_looping_at=0.5)
        tr = make_trainer(h, dataset)
        tr.warmup()
        tr.run(lambda m: None)
        results.append([p.detach().clone() for p in tr.base.parameters()] + tr.ema)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_tiny_model_learns_real_text(dataset, shared_data):
    h = tiny(iterations=40, train_batch_tokens=8 * 4 * 64)
    luts = tg.build_byte_luts(str(SP1024), 1024)
    val = tg.load_val_tokens(str(dataset), h.eval_seq_len)
    tr = make_trainer(h, dataset)
    before = tg.eval_val(h, tr.base, CPU, val, luts)
    tr.run(lambda m: None)
    assert tr.base.looping_active  # switched on at 35% of the steps
    tr.apply_ema()
    after = tg.eval_val(h, tr.base, CPU, val, luts)
    assert before.val_bpb > 4.0 and after.val_bpb < 0.8 * before.val_bpb  # 4.25 -> 3.22 in 40 steps
    assert after.tokens == val.numel() - 1
    assert after.bytes == int(tg.target_bytes(val[:-1], val[1:], luts).sum())


class SlowLog:
    """Logger stand-in: records lines; each train-loss line takes `delay` seconds to write."""

    def __init__(self, delay: float):
        self.delay, self.lines = delay, []

    def __call__(self, msg: str, console: bool = True) -> None:
        self.lines.append(msg)
        if "train_loss:" in msg:
            time.sleep(self.delay)


def test_training_clock_counts_logging_and_excludes_validation(dataset):
    """train_time = wall time of the loop minus validation passes; slow logging is on the clock."""
    h = tiny(iterations=5, train_log_every=1, val_loss_every=2)
    torch.manual_seed(h.seed)
    log = SlowLog(0.2)
    tr = tg.Trainer(h, CPU, log, tg.GPT(h), tg.shard_paths(str(dataset), "train"))
    val_passes = []

    def slow_val(model):
        val_passes.append(1)
        time.sleep(0.5)
        return tg.EvalResult(1.0, 1.0, 1, 1)

    t0 = time.perf_counter()
    train_time = tr.run(slow_val)
    wall = time.perf_counter() - t0
    assert len(val_passes) == 2  # before steps 3 and 5
    # Five train-loss lines of 0.2 s each are on the clock, the two 0.5 s validation passes are not.
    assert 2 * 0.5 <= wall - train_time < 2 * 0.5 + 0.3
    assert sum(l.startswith("train_clock:") for l in log.lines) == 1
    last = next(l for l in log.lines if l.startswith("train_steps:"))
    assert last == f"train_steps:5 train_time:{train_time * 1000:.0f}ms budget:0.0s"


def test_nonfinite_loss_stops_the_run(dataset):
    tr = make_trainer(tiny(), dataset)
    with torch.no_grad():
        tr.base.tok_emb.weight[:] = float("nan")
    with pytest.raises(tg.TrainingError, match="non-finite"):
        tr.run(lambda m: None)


# --- End to end (subprocess) ---------------------------------------------------------------------


def run_script(env_over: dict, tmp_path, torchrun: int = 0, timeout: int = 600):
    env = {**clean_environ(), **env_over, "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train_gpt.py")]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               str(REPO / "train_gpt.py")]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def final_bpb(stdout: str, stage: str = "pre_quant") -> float:
    line = next(l for l in stdout.splitlines() if l.startswith(f"final_{stage} "))
    return float(line.split("val_bpb:")[1].split()[0])


def test_two_process_run_matches_single_process(dataset, tmp_path):
    env = tiny_env(iterations=12, warmup_steps=1, data_path=str(dataset), tokenizer_path=str(SP1024),
                   run_id="dist", enable_looping_at=0.5)
    single = run_script(env, tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_script({**env, "RUN_ID": "dist2"}, tmp_path, torchrun=2)
    assert double.returncode == 0, double.stderr[-3000:]
    for label in ("model_params:", "val_tokens:", "looping:on", "final_pre_quant"):
        assert label in single.stdout and label in double.stdout
    assert abs(final_bpb(single.stdout) - final_bpb(double.stdout)) < 1e-4
    assert "terminate called" not in double.stderr  # ranks leave the process group together
    log = (tmp_path / "logs" / "dist.txt").read_text()
    assert "hp num_layers:4" in log and "final_pre_quant" in log


def test_two_process_config_error_exits_cleanly_on_both_ranks(tmp_path):
    """Both ranks hit the same bad input: rank 0 prints the one-line error once, every rank leaves
    the group through the barrier with exit 2; no rank is aborted mid-teardown."""
    env = tiny_env(data_path=str(tmp_path / "nope"), tokenizer_path=str(tmp_path / "nope.model"), run_id="bad")
    res = run_script(env, tmp_path, torchrun=2, timeout=300)
    assert res.returncode != 0
    errors = [l for l in res.stderr.splitlines() if l.startswith("error: tokenizer ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "terminate called" not in res.stderr and "exitcode  : 2" in res.stderr


def test_env_error_before_distributed_setup_is_one_line(tmp_path):
    """An error before the process group exists still exits 2 through the shutdown path."""
    r = run_script({"NUM_LAYERS": "4.5"}, tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: NUM_LAYERS"), r.stderr


class NcclBarrier:
    """dist.barrier under ProcessGroupNCCL's contract, built on the store: the per-call timeout is accepted and
    dropped (a blocking call waits out the group's timeout, 60 s here); the work handle's wait(timeout) is
    bounded and raises, as WorkNCCL::wait does after aborting its communicator."""

    def __init__(self):
        self.calls = 0

    def __call__(self, group=None, async_op=False, device_ids=None, timeout=None):
        import threading
        import time

        import torch.distributed as dist

        store, self.calls = dist.distributed_c10d._get_default_store(), self.calls + 1
        key, done = f"nccl_barrier/{self.calls}", threading.Event()
        store.add(key, 1)

        def poll():
            while store.add(key, 0) < dist.get_world_size():
                time.sleep(0.05)
            done.set()

        threading.Thread(target=poll, daemon=True).start()

        class Work:
            def wait(self, timeout=None):
                if not done.wait(timeout.total_seconds() if timeout else 60):
                    raise RuntimeError("Operation timed out!")
                return True

        return Work() if async_op else Work().wait()


def _stuck_peer_worker(rank: int, init: str, out: str, backend: str):
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    if rank == 1:
        time.sleep(600)  # alive but never reaches the barrier, like a rank stuck after a lone failure
    if backend == "nccl":
        dist.barrier = NcclBarrier()
    t0 = time.perf_counter()
    tg.shutdown_distributed(None, timeout_s=5.0)
    with open(out + ".tmp", "w") as f:
        f.write(f"{time.perf_counter() - t0:.3f} {int(dist.is_initialized())}")
    os.replace(out + ".tmp", out)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_shutdown_barrier_is_bounded(tmp_path, backend):
    """Bounded on gloo and under NCCL's barrier semantics, which ignore the barrier's timeout keyword."""
    import time

    import torch.multiprocessing as mp

    out = tmp_path / "rank0.txt"
    ctx = mp.spawn(_stuck_peer_worker, args=(f"file://{tmp_path / 'store'}", str(out), backend), nprocs=2, join=False)
    try:
        deadline = time.time() + 90
        while not out.exists() and time.time() < deadline:
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    waited, still_initialized = out.read_text().split()
    assert 4.5 < float(waited) < 30 and still_initialized == "0"  # waited for the peer, then gave up


def _slow_barrier_worker(rank: int, init: str, out: str):
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    if rank == 1:
        barrier = dist.barrier

        def slow(*a, **k):  # out of the barrier late, like a rank still reading its peer's message
            work = barrier(*a, **k)
            if work is not None:
                work.wait()
            time.sleep(2.0)
            Path(out + ".1").write_text(f"{time.time():.6f}")
            return work

        dist.barrier = slow
    tg.shutdown_distributed(None, timeout_s=60.0)
    if rank == 0:
        Path(out + ".0").write_text(f"{time.time():.6f}")


def test_no_rank_closes_its_group_before_every_peer_is_out_of_the_barrier(tmp_path):
    """Closing the gloo sockets while a peer is still in the barrier aborts that peer ("terminate
    called without an active exception")."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "t")
    mp.spawn(_slow_barrier_worker, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert float(Path(out + ".0").read_text()) >= float(Path(out + ".1").read_text())


def corrupt_copy(dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    shard = sorted(bad.glob("fineweb_train_*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[0:4] = b"\x01\x02\x03\x04"
    shard.write_bytes(bytes(data))
    return bad, shard


@pytest.mark.parametrize("case", ["missing_dir", "vocab", "corrupt", "malformed", "unknown"])
def test_bad_input_is_one_line_error(case, dataset, tmp_path):
    env = tiny_env(data_path=str(dataset), tokenizer_path=str(SP1024), warmup_steps=0, iterations=1)
    if case == "missing_dir":
        env["DATA_PATH"], words = str(tmp_path / "nope"), ["does not exist", "DATA_PATH"]
    elif case == "vocab":
        env["VOCAB_SIZE"], words = "2048", ["VOCAB_SIZE=2048", "1024"]
    elif case == "corrupt":
        bad, shard = corrupt_copy(dataset, tmp_path)
        env["DATA_PATH"], words = str(bad), [str(shard), "magic"]
    elif case == "malformed":
        env["NUM_LAYERS"], words = "4.5", ["NUM_LAYERS", "int"]
    else:
        env["NUM_LAYER"], words = "3", ["NUM_LAYER", "NUM_LAYERS"]
    r = run_script(env, tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert all(w in lines[0] for w in words), lines[0]
