"""What a first GPU run needs, checked on CPU under the CUDA contract (tests/cuda_contract.py): the
FlashAttention 3 refusal, the cu_seqlens buckets compiled ahead (against counts on real shards)."""
import subprocess
import sys

import numpy as np
import torch

import cuda_contract
import train_gpt as tg
from conftest import REPO, SP1024, TINY, clean_environ, tiny_env

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


# --- FlashAttention 3 missing or broken ------------------------------------------------------------

BROKEN_FA3 = "raise ImportError('libflash.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
RUN_MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); import train_gpt as tg; tg.CUDA_CONTRACT = True; "
            "print('fa3_error=' + tg._fa3_error, flush=True); sys.exit(tg.main())")


def test_cuda_run_without_usable_fa3_stops_before_training(dataset, tmp_path):
    """An FA3 wheel built for another torch raises inside the import: the run (CUDA path) stops with
    one line naming the install and the import error, before the model is built; SDPA_FALLBACK opts out."""
    (tmp_path / "fa3").mkdir()
    (tmp_path / "fa3" / "flash_attn_interface.py").write_text(BROKEN_FA3)
    env = {**clean_environ(), **tiny_env(DATA_PATH=str(dataset), TOKENIZER_PATH=str(SP1024), COMPILE="0", RUN_ID="r"),
           "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "fa3")}
    res = subprocess.run([sys.executable, "-c", RUN_MAIN, str(REPO)], env=env, capture_output=True, text=True, timeout=300)
    assert "fa3_error=ImportError: libflash.so: undefined symbol" in res.stdout
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "DOC_MASK=1 on CUDA needs FlashAttention 3" in err[0], res.stderr
    assert "ImportError: libflash.so: undefined symbol" in err[0] and "pip install flash-attn-3 --index-url" in err[0]
    assert "SDPA_FALLBACK=1" in err[0]
    log = (tmp_path / "logs" / "r.txt").read_text()
    assert "fa3_error:ImportError" in log and "model_params" not in log and "train_shards" not in log


def test_fa3_refusal_only_where_the_mask_would_need_it(monkeypatch):
    monkeypatch.setattr(tg, "_fa3_varlen", None)
    monkeypatch.setattr(tg, "_fa3_error", "")
    cpu = torch.device("cpu")
    assert tg.fa3_refusal(tiny(), cpu) == ""  # CPU: SDPA is the path
    monkeypatch.setattr(tg, "CUDA_CONTRACT", True)
    assert "not installed" in tg.fa3_refusal(tiny(), cpu)
    assert tg.fa3_refusal(tiny(sdpa_fallback=True), cpu) == ""
    assert tg.fa3_refusal(tiny(doc_mask=False), cpu) == ""  # plain causal SDPA keeps the flash kernel
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    assert tg.fa3_refusal(tiny(), cpu) == ""
    assert tg.Hyperparameters.from_env({"SDPA_FALLBACK": "1"}).sdpa_fallback


# --- cu_seqlens buckets compiled ahead ---------------------------------------------------------------


def cu_bucket(x: torch.Tensor) -> int:
    return tg.doc_layout(x, varlen=True).cu_seqlens.numel() // tg.CU_BUCKET


def test_training_buckets_cover_every_batch_of_real_shards(dataset):
    """varlen_buckets from the first shard's BOS rate and dispersion against a brute-force count of
    the segments of every batch of an epoch, as the loader draws them, at several shapes."""
    paths = tg.shard_paths(str(dataset), "train")
    for B, T in ((4, 512), (16, 256), (64, 256), (48, 128)):
        rate, disp = tg.bos_stats(tg.read_shard(paths[0]), T)
        loader = tg.TrainLoader(paths, T, seed=3)
        segs = []
        for _ in range(loader.windows_per_epoch // B):
            x, _ = loader.next_batch(B, 0, 1)
            segs.append(int(((x == tg.BOS_ID).sum() - (x[:, 0] == tg.BOS_ID).sum()).item()) + B)
            if len(segs) <= 8:
                assert cu_bucket(x) == segs[-1] // tg.CU_BUCKET + 1
        seen = {s // tg.CU_BUCKET + 1 for s in segs}
        pred = tg.varlen_buckets(rate, disp, B, T)
        n = B * (T - 1)
        z = (np.array(segs) - B - n * rate) / np.sqrt(disp * n * rate * (1 - rate))
        assert seen <= set(pred) and np.abs(z).max() < 6, (B, T, seen, pred, np.abs(z).max())
        assert pred.start >= min(seen) - 1 and pred.stop - 1 <= max(seen) + 1, (B, T, seen, pred)  # tight
    assert tg.varlen_buckets(0.0, 1.0, 70, 2048) == range(2, 3)  # no BOS: B segments exactly
    assert tg.varlen_buckets(0.5, 1.0, 2, 1000) == range(14, 19)  # 2 + 999 +- 6*22.4 segments: 867..1135


def test_eval_warmup_compiles_exactly_the_buckets_the_stages_reach(monkeypatch):
    """Under the CUDA contract (FA3 varlen path, compile on): eval_warmup's scorer and TTT-loss calls
    fill the cu_seqlens buckets that the plain, sliding and TTT stages reach on the validation stream,
    and no other."""
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    h = tiny(compile=True, sliding_window_enabled=True, ttt_enabled=True, ttt_batch_seqs=5, val_batch_tokens=48 * 64,
             eval_stride=8)
    gen = np.random.default_rng(0)  # documents of ~30 tokens: batches spread over several buckets
    val = torch.from_numpy(gen.integers(2, 1024, 64 * 200 + 1))
    val[np.cumsum(gen.geometric(1 / 30, 500))[:-1] % val.numel()] = tg.BOS_ID
    val[0] = tg.BOS_ID
    seen = {"score": set(), "loss": set()}

    def scorer(x, y):
        seen["score"].add((x.shape[0], cu_bucket(x)))
        return torch.zeros(x.shape)

    def loss_fn(x, y):
        seen["loss"].add((x.shape[0], cu_bucket(x)))
        return torch.zeros((), requires_grad=True)

    model = tg.GPT(h)
    lines = []
    tg.eval_warmup(h, model, scorer, loss_fn, CPU, val, lambda m, console=True: lines.append(m))
    warm = dict(seen)
    seen = {"score": set(), "loss": set()}
    luts = (torch.ones(h.vocab_size, dtype=torch.int64), torch.zeros(h.vocab_size, dtype=torch.bool),
            torch.zeros(h.vocab_size, dtype=torch.bool))
    for stride in (h.eval_seq_len, h.eval_stride):
        tg.eval_windows(h, scorer, CPU, val, luts, stride)
    tg.eval_ttt(h, model, scorer, loss_fn, CPU, val, luts)
    assert seen["score"] <= warm["score"] and seen["loss"] <= warm["loss"], (seen, warm)
    assert warm["score"] == seen["score"] | {(48, k) for k in range(min(k for _, k in seen["score"]),
                                                                      max(k for _, k in seen["score"]) + 1)}
    assert len(warm["score"]) > 1 and warm["loss"] == {(3, 1), (5, 1)}  # chunks of 8 rows: steps of 5 and 3
    assert lines == ["varlen_warmup shape:3x64 buckets:1-1 source:val", "varlen_warmup shape:5x64 buckets:1-1 source:val",
                     f"varlen_warmup shape:48x64 buckets:{min(warm['score'])[1]}-{max(warm['score'])[1]} source:val"]


def test_training_warmup_logs_and_fills_the_reachable_buckets(dataset, monkeypatch):
    cuda_contract.install(tg, monkeypatch=monkeypatch)
    h = tiny(compile=False, warmup_steps=1, train_batch_tokens=8 * 3 * 64)
    filled = []
    real = tg.varlen_warmup_ids
    monkeypatch.setattr(tg, "varlen_warmup_ids", lambda x, gen, ks: filled.append(list(ks)) or real(x, gen, ks))
    lines = []
    torch.manual_seed(0)
    tr = tg.Trainer(h, CPU, lambda m, console=True: lines.append(m), tg.GPT(h), tg.shard_paths(str(dataset), "train"))
    tr.warmup()
    rate, disp = tg.bos_stats(tr.loader.shards[0], 64)
    want = tg.varlen_buckets(rate, disp, 3, 64)
    assert filled == [list(want)] * 2  # both loop modes
    assert lines[0] == f"varlen_warmup shape:3x64 buckets:{want.start}-{want.stop - 1} source:train bos_rate:{rate:.6f} dispersion:{disp:.2f}"
