"""The GPU code paths on CPU under the GPU's rules (tests/cuda_contract.py): bf16 autocast through
autocast_ctx, FA3 stand-ins that refuse what FA3 refuses, torch >= 2.12's fp32 rms_norm policy,
and the whole pipeline through main() in that mode."""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import cuda_contract as cc
import train_gpt as tg
from conftest import REPO, SP1024, TINY, clean_environ, short_docs_dataset, tiny_env

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def qkv(B=2, T=32, H=4, Hkv=2, D=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, n, D, generator=g).to(dtype) for n in (H, Hkv, Hkv)]


def test_standins_refuse_what_fa3_refuses():
    q, k, v = qkv()
    cc.fa3_func(q, k, v, causal=True)  # the accepted case
    bad = {
        "fp32 q/k/v": (q.float(), k.float(), v.float()),
        "mixed dtypes": (q.float(), k, v),
        "strided last dim": (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
        "heads not a multiple of kv heads": (q[:, :, :3], k, v),
        "head dim not a multiple of 8": (q[..., :12], k[..., :12], v[..., :12]),
    }
    for what, args in bad.items():
        with pytest.raises(cc.ContractError):
            cc.fa3_func(*args, causal=True)
        print("refused:", what)
    B, T = q.shape[:2]
    flat = [t.reshape(B * T, t.size(2), t.size(3)) for t in (q, k, v)]
    cu = torch.tensor([0, 10, T, B * T], dtype=torch.int32)
    cc.fa3_varlen(*flat, cu, cu, T, T, causal=True)
    for what, args in {"int64 cu_seqlens": (cu.long(), cu.long(), T, T),
                       "segment longer than max_seqlen": (cu, cu, 16, 16),
                       "cu_seqlens not ending at total": (cu[:-1], cu[:-1], T, T)}.items():
        with pytest.raises(cc.ContractError):
            cc.fa3_varlen(*flat, *args, causal=True)
        print("refused:", what)
    with pytest.raises(cc.ContractError):  # (B, T, H, D) is not the varlen layout
        cc.fa3_varlen(q, k, v, cu, cu, T, T, causal=True)


@pytest.mark.parametrize("tuple_return", [False, True])
def test_attention_through_standins_equals_the_sdpa_path(monkeypatch, tuple_return):
    """The stand-ins compute what SDPA computes, so a contract run scores like the GPU would; both
    FA3 return conventions (out, or (out, lse)) are read."""
    q, k, v = qkv(T=64)
    ids = torch.randint(2, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    ids[0, [9, 30]] = tg.BOS_ID
    ids[1, 40] = tg.BOS_ID
    ref_doc = tg.attention(q.float(), k.float(), v.float(), tg.doc_layout(ids, varlen=False))
    ref_causal = tg.attention(q.float(), k.float(), v.float(), None)
    cc.install(tg, tuple_return=tuple_return, monkeypatch=monkeypatch)
    docs = tg.doc_layout(ids)
    assert docs.cu_seqlens is not None and docs.cu_seqlens.dtype == torch.int32
    assert docs.cu_seqlens.numel() % tg.CU_BUCKET == 0
    out_doc, out_causal = tg.attention(q, k, v, docs), tg.attention(q, k, v, None)
    assert out_doc.dtype == out_causal.dtype == torch.bfloat16
    assert torch.allclose(out_doc.float(), ref_doc, atol=2e-2)
    assert torch.allclose(out_causal.float(), ref_causal, atol=2e-2)


def doc_model(seed=0):
    h = tg.Hyperparameters(**{**TINY, "doc_mask": True})
    torch.manual_seed(seed)
    return h, tg.GPT(h)


def val_stream(n_docs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat([torch.tensor([tg.BOS_ID]), torch.randint(2, 1024, (int(n),), generator=g)])
             for n in torch.randint(20, 150, (n_docs,), generator=g)]
    return torch.cat(parts)


def test_every_scorer_runs_under_autocast(monkeypatch):
    """Plain, sliding and document evals hand FA3 bf16 q/k/v: the scorers run under autocast_ctx
    (before, the fp32 weights reached FA3 as fp32 and the run died at its first validation)."""
    h, model = doc_model()
    tokens = val_stream()
    luts = tg.build_byte_luts(str(SP1024), 1024)
    cc.install(tg, monkeypatch=monkeypatch)
    before = cc.CALLS["varlen"]
    for stride in (h.eval_seq_len, h.eval_stride):
        r, _ = tg.eval_windows(h, model.token_nll, CPU, tokens, luts, stride)
        assert math.isfinite(r.val_bpb)
        r, _ = tg.eval_doc_windows(h, model.token_nll, CPU, tokens, luts, stride)
        assert math.isfinite(r.val_bpb)
    assert cc.CALLS["varlen"] > before  # the cu_seqlens path ran


@pytest.mark.parametrize("rms_fp32", [False, True])
def test_packed_lora_stage_meets_fa3_and_grouped_mm_contracts(monkeypatch, rms_fp32):
    """The LoRA stage's packed steps on the GPU paths: cu_seqlens from the host plan into FA3, bf16
    operands into grouped_mm (under fp32 rms_norm too), and the same scores as fp32 to bf16 accuracy."""
    h = tg.Hyperparameters(**{**TINY, "doc_mask": True, "lora_ttt_enabled": True, "lora_rank": 8, "lora_chunk_tokens": 16,
                              "lora_batch_docs": 3, "phased_prefix_docs": 2, "phased_num_phases": 1, "ttt_chunk_tokens": 128,
                              "lora_warm_start_a": False, "compile": False})
    tokens, luts = val_stream(8, seed=2), tg.build_byte_luts(str(SP1024), 1024)
    torch.manual_seed(0)
    ref = tg.eval_lora_ttt(h, *(2 * [tg.GPT(h)]), CPU, tokens, luts)[0]
    cc.install(tg, rms_fp32=rms_fp32, monkeypatch=monkeypatch)
    before = dict(cc.CALLS)
    torch.manual_seed(0)
    r = tg.eval_lora_ttt(h, *(2 * [tg.GPT(h)]), CPU, tokens, luts)[0]
    assert cc.CALLS["varlen"] > before["varlen"] and cc.CALLS["grouped_mm"] > before["grouped_mm"]
    assert r.val_bpb == pytest.approx(ref.val_bpb, rel=2e-2) and (r.tokens, r.bytes) == (ref.tokens, ref.bytes)


@pytest.mark.parametrize("rms_fp32", [False, True])
def test_training_step_meets_fa3_with_one_dtype(monkeypatch, rms_fp32):
    """Under torch >= 2.12's autocast policy rms_norm returns fp32, so q and k leave the QK norm fp32
    while v is bf16: the attention casts them at the kernel boundary (before, FA3 raised at step 1)."""
    h, model = doc_model()
    cc.install(tg, rms_fp32=rms_fp32, monkeypatch=monkeypatch)
    x = val_stream(seed=1)[: 2 * 64].view(2, 64)
    with tg.autocast_ctx(torch.device("cpu")):
        loss = model(x, x.roll(-1, 1))
    loss.backward()
    assert math.isfinite(loss.item()) and model.blocks[0].attn.c_q.weight.grad is not None
    if rms_fp32:  # the simulated policy is in force
        with tg.autocast_ctx(torch.device("cpu")):
            assert tg.rms_norm(torch.randn(2, 8).bfloat16()).dtype == torch.float32


def test_autocast_ctx_follows_the_gpu_paths(monkeypatch):
    cpu = torch.device("cpu")
    with tg.autocast_ctx(cpu):
        assert not torch.is_autocast_enabled("cpu")  # a plain CPU run stays fp32
    monkeypatch.setattr(tg, "CUDA_CONTRACT", True)
    with tg.autocast_ctx(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# --- The whole pipeline through main() under the contract ---------------------------------------


@pytest.fixture(scope="module")
def contract_data(shared_data, tmp_path_factory):
    return short_docs_dataset(tmp_path_factory.mktemp("contract") / "sp1024", 40, 3, 2500, shard_tokens=300_000)


def run_contract(env: dict, tmp, *flags):
    env = {**clean_environ(), **env, "LOG_DIR": str(tmp / "logs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tests" / "cuda_contract.py"), *flags], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp)


def test_pipeline_runs_under_the_cuda_contract(contract_data, tmp_path):
    """Training in both loop modes (with its warmup) and in-training validation, GPTQ, the artifact and
    every eval stage, all on the GPU paths: bf16 autocast, FA3 varlen stand-ins. Eager; the compiled
    graphs are the next test's."""
    env = tiny_env(iterations=6, warmup_steps=1, val_loss_every=3, enable_looping_at=0.5, data_path=str(contract_data),
                   tokenizer_path=str(SP1024), run_id="cc", sliding_window_enabled=1, ttt_enabled=1,
                   doc_eval_enabled=1, lora_ttt_enabled=1, lora_rank=8, lora_chunk_tokens=64, lora_batch_docs=2,
                   lora_warm_start_a=0, phased_prefix_docs=1, phased_num_phases=1, val_batch_tokens=8 * 64,
                   ttt_chunk_tokens=1024, compile=0)
    res = run_contract(env, tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "attention:fa3_varlen" in out and "looping:on" in out and "warmup_steps:1 " in out
    assert "step:3/6 val_loss:" in out and "artifact_write bytes:" in out
    for stage in ("pre_quant", "quantized", "sliding", "doc_quantized", "doc_sliding", "ttt", "lora_ttt"):
        assert f"final_{stage} val_loss:" in out, stage


def test_compiled_pipeline_under_fp32_rms_norm_and_tuple_returns(contract_data, tmp_path):
    """Second contract, compiled: rms_norm in fp32 under autocast (torch >= 2.12) and FA3's older
    (out, lse) return; graphs traced whole (fullgraph, AOTAutograd) for both loop modes, the eval
    warmup, the scorer and the LoRA step (Inductor itself is the compile test's)."""
    env = tiny_env(iterations=2, enable_looping_at=0.5, data_path=str(contract_data), tokenizer_path=str(SP1024),
                   run_id="cc2", val_batch_tokens=8 * 64, compile=1, lora_ttt_enabled=1, lora_chunk_tokens=32,
                   lora_batch_docs=4, phased_prefix_docs=2, phased_num_phases=1, ttt_chunk_tokens=1024)
    res = run_contract(env, tmp_path, "--rms-norm-fp32", "--tuple-return", "--compile-backend", "aot_eager")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "attention:fa3_varlen" in out and "looping:on" in out and "final_quantized val_loss:" in out
    assert "final_lora_ttt val_loss:" in out and "lora_ttt_work positions_per_target:" in out  # the compiled LoRA step
    warm = next(l for l in out.splitlines() if l.startswith("eval_warmup "))
    assert float(warm.split("time:")[1].split("s")[0]) > 0  # the compile warmup ran


def test_lora_rank_grouped_mm_cannot_take_is_refused_before_training(monkeypatch):
    """torch._grouped_mm on CUDA needs 16-byte rows: a LoRA rank not a multiple of 8 stops the run
    before training (fa3_refusal, checked first in train_and_eval), not at the score after it."""
    cc.install(tg, monkeypatch=monkeypatch)
    cpu = torch.device("cpu")
    bad = tg.Hyperparameters(**{**TINY, "lora_ttt_enabled": True, "lora_rank": 4})
    assert "LORA_RANK=4" in tg.fa3_refusal(bad, cpu) and "multiple of 8" in tg.fa3_refusal(bad, cpu)
    assert tg.fa3_refusal(dataclasses.replace(bad, lora_rank=8), cpu) == ""
    assert tg.fa3_refusal(dataclasses.replace(bad, lora_ttt_enabled=False), cpu) == ""
