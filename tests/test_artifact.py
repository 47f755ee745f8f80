"""Frontier artifact: per-group clips, int8 gate rows, LQER, AWQ-lite, the pergroup container and its
codecs, the stripped shipped code; with every switch off (and the earlier population row std) the
artifact is the earlier one, byte for byte."""
import collections
import dataclasses
import hashlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import train_gpt as tg
from conftest import REPO, TINY

# Every switch of the artifact at its earlier value.
LEGACY = dict(embed_bits=8, embed_clip_sigmas=20.0, mlp_clip_sigmas=0.0, attn_clip_sigmas=0.0, quant_gate=False,
              lqer_top_n=0, awq_lite=False, compressor="brotli", row_reorder=False)
SMALL = dict(vocab_size=1024, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=8, xsa_last_n=4,
             loop_start=1, loop_end=2, num_loops=1, parallel_residual_start=2)
# sha256 of serialize_tensors(tensors, {"state": meta}) for legacy_fixture(), computed with the code before
# these switches existed (the quantizer's output alone: the artifact's other metadata may grow).
LEGACY_PAYLOAD_SHA256 = "e4f659a70da780c4a20b3279136b120615d8dea52d46be4cbf5966ddb2d55f07"


def legacy_fixture(**over):
    """Fixed-seed model with perturbed weights; one GPTQ'd matrix (small, so fp32 paths cannot flip a code)."""
    h = tg.Hyperparameters(**SMALL, gptq_enabled=False, **{**LEGACY, **over})
    torch.manual_seed(0)
    m = tg.GPT(h)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    return h, m, {"blocks.0.attn.c_k.weight": (x.T @ x).float()}


def population_std_scales(w, bits, clip_sigmas):
    """The earlier SDClip step, k * population row std / R (the records' is the unbiased std)."""
    scale = clip_sigmas * w.float().std(dim=1, correction=0) / tg.qmax(bits)
    return scale.clamp(torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max).half()


def test_all_switches_off_reproduce_the_earlier_artifact(tmp_path, monkeypatch):
    h, m, hess = legacy_fixture()
    # The row std is the one change of the quantizer since the hash was taken: with the earlier std
    # back, every switch off still gives the earlier payload byte for byte; with the records' std the
    # codes move (so the hash pins the std too).
    tensors, meta = tg.quantize_state(m, h, hess)
    assert hashlib.sha256(tg.serialize_tensors(tensors, dict(state=meta))).hexdigest() != LEGACY_PAYLOAD_SHA256
    monkeypatch.setattr(tg, "sdclip_scales", population_std_scales)
    tensors, meta = tg.quantize_state(m, h, hess)
    assert hashlib.sha256(tg.serialize_tensors(tensors, dict(state=meta))).hexdigest() == LEGACY_PAYLOAD_SHA256
    path = str(tmp_path / "a.ptz")
    tg.write_artifact(path, tensors, meta, h, looping=False)
    blob = open(path, "rb").read()
    payload = tg.decompress_artifact(blob)
    import brotli  # the earlier container: brotli-11 over the byte-shuffled payload

    assert blob == brotli.compress(tg.byte_shuffle(payload), quality=11)
    back, info = tg.deserialize_tensors(payload)
    assert info["state"] == meta and payload == tg.serialize_tensors(tensors, info)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("over", [dict(embed_bits=7, embed_clip_sigmas=14.0), dict(lqer_top_n=3), dict(awq_lite=True),
                                  dict(compressor="pergroup"), dict(compressor="pergroup", row_reorder=True),
                                  dict(LEGACY, embed_bits=7, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0, lqer_top_n=2,
                                       awq_lite=True, compressor="pergroup", row_reorder=True)])
def test_round_trip_of_every_encoding_is_exact(over, tmp_path):
    h, m, hess = legacy_fixture(**over)
    tensors, meta = tg.quantize_state(m, h, hess)
    path = str(tmp_path / "a.ptz")
    tg.write_artifact(path, tensors, meta, h, looping=True)
    back, meta2 = tg.decode_artifact(open(path, "rb").read())
    assert meta2["state"] == meta
    assert_same(back, tensors)
    state, _ = tg.load_artifact(path, h)
    expect = tg.dequantize_state(tensors, meta)
    assert all(torch.equal(state[k], expect[k]) for k in expect)
    if h.embed_bits == 7:
        assert int(tensors["tok_emb.weight.q"].abs().max()) <= 63 and meta["tok_emb.weight"]["bits"] == 7


@pytest.mark.parametrize("codec", tg.CODECS)
def test_each_codec_round_trips_and_refuses_damage(codec, monkeypatch, tmp_path):
    fns = tg.codec_fns(codec)
    if fns is None:
        pytest.skip(f"{codec} package not installed")
    real = tg.codec_fns
    monkeypatch.setattr(tg, "codec_fns", lambda name: real(name) if name == codec else None)
    h, m, hess = legacy_fixture(compressor="pergroup", lqer_top_n=1, row_reorder=True)
    tensors, meta = tg.quantize_state(m, h, hess)
    blob = tg.encode_artifact(tensors, meta, h)
    n = blob[4]
    assert n > 2 and all(blob[5 + 9 * i] == tg.CODECS.index(codec) for i in range(n))
    back, meta2 = tg.decode_artifact(blob)
    assert meta2 == meta
    assert_same(back, tensors)
    bad = tmp_path / "bad.ptz"
    sizes = [int.from_bytes(blob[6 + 9 * i : 10 + 9 * i], "little") for i in range(n)]
    starts = [5 + 9 * n + sum(sizes[:i]) for i in range(n)]
    damaged = [blob[:cut] for cut in (3, 5, 20, starts[1], len(blob) - 1)]
    damaged += [blob[:s + sz // 2] + bytes([blob[s + sz // 2] ^ 0x5A]) + blob[s + sz // 2 + 1 :] for s, sz in zip(starts, sizes)]
    for data in damaged:
        bad.write_bytes(data)
        with pytest.raises(tg.ConfigError, match=f"^corrupt artifact {bad}: [^\n]+$"):
            tg.load_artifact(str(bad), h)


def test_missing_optional_codec_is_a_one_line_error(monkeypatch, tmp_path):
    h, m, hess = legacy_fixture(compressor="pergroup")
    tensors, meta = tg.quantize_state(m, h, hess)
    blob = bytearray(tg.encode_artifact(tensors, meta, h))
    real = tg.codec_fns
    monkeypatch.setattr(tg, "codec_fns", lambda name: None if name == "zstd" else real(name))
    assert tg.decode_artifact(bytes(blob))[1] == meta  # brotli/lzma streams need nothing optional
    blob[5] = tg.CODECS.index("zstd")  # pretend the rest stream was zstd
    (tmp_path / "z.ptz").write_bytes(bytes(blob))
    with pytest.raises(tg.ConfigError, match="zstd stream but its package is missing; pip install zstandard"):
        tg.load_artifact(str(tmp_path / "z.ptz"), h)


def test_per_group_clips_and_gate_rows():
    # Default knobs are the record's (PR #1855, unchanged in #2135): every quantized tensor of a real
    # model, by group; embedding_dim < model_dim adds embed_proj/head_proj, the "other" matrices.
    h = tg.Hyperparameters(**{**TINY, "embedding_dim": 32})
    want = {"mlp": (6, 11.5), "attn": (6, 13.0), "embed": (7, 14.0), "other": (6, 12.85), "gate": (8, 0.0)}
    seen = collections.Counter()
    for name, p in tg.GPT(h).state_dict().items():
        spec = tg.quant_spec(name, p, h)
        if spec is not None:
            kind = ("gate" if "attn_gate" in name else "embed" if name == "tok_emb.weight" else
                    "mlp" if ".mlp." in name else "attn" if ".attn." in name else "other")
            assert spec == want[kind], name
            seen[kind] += 1
    assert set(seen) == set(want) and seen["other"] == 2 and seen["mlp"] == 2 * h.num_layers
    w = torch.zeros(512, 512)
    zero = tg.Hyperparameters(mlp_clip_sigmas=0.0, attn_clip_sigmas=0.0, matrix_clip_sigmas=9.0)
    assert tg.quant_spec("blocks.3.mlp.fc.weight", w, zero) == (6, 9.0)  # 0: MATRIX_CLIP_SIGMAS
    assert tg.quant_spec("blocks.3.attn.c_q.weight", w, zero) == (6, 9.0)
    h = tg.Hyperparameters()
    gate = torch.randn(8, 12)
    assert tg.quant_spec("blocks.0.attn.attn_gate_w", gate, h) == (8, 0.0)
    off = None if tg.param_group("blocks.0.attn.attn_gate_w", gate) == "scalar" else (6, 13.0)  # the rule without it
    assert tg.quant_spec("blocks.0.attn.attn_gate_w", gate, dataclasses.replace(h, quant_gate=False)) == off
    assert tg.quant_spec("blocks.0.attn.attn_gate_w", torch.randn(4, 4), h) != (8, 0.0)  # < 32 elements: the usual rule

    class Gated(nn.Module):  # a block with the record's gate weight and a control tensor
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.attn_gate_w = nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(0)))
            self.attn_scale = nn.Parameter(torch.rand(12))

    mod = nn.Module()
    mod.blocks = nn.ModuleList([Gated()])
    tensors, meta = tg.quantize_state(mod, h, None)
    w = mod.blocks[0].attn.attn_gate_w.detach()
    q, s = tensors["blocks.0.attn.attn_gate_w.q"], tensors["blocks.0.attn.attn_gate_w.scale"]
    assert meta["blocks.0.attn.attn_gate_w"]["bits"] == 8 and q.dtype == torch.int8
    torch.testing.assert_close(s.float(), (w.abs().amax(1) / 127).half().float())
    assert int(q.abs().max()) == 127
    assert torch.all((tg.dequantize(q, s) - w).abs() <= s.float()[:, None] / 2 + 1e-6)
    assert meta["blocks.0.attn_scale"]["kind"] == "fp16"


@pytest.mark.parametrize("bits,group", [(2, 0), (4, 64), (3, 8), (8, 16)])
def test_asymmetric_factor_codes(bits, group):
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(bits))
    q, s = tg.quantize_asym(x, bits, group or x.numel())
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi and s.numel() == x.numel() // (group or x.numel())
    g = x.reshape(-1, group or x.numel())
    torch.testing.assert_close(s.float(), (g.abs().amax(1) / (hi + 0.5)).half().float())
    err = (tg.dequantize_asym(q, s) - x).reshape(g.shape).abs()
    inside = g <= (hi * s.float()[:, None])  # above hi*step the top code clips
    assert torch.all(err[inside] <= s.float()[:, None].expand_as(g)[inside] / 2 + 1e-6)


def test_awq_group_is_kept_at_int8():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    hess = torch.diag(torch.rand(256, generator=g))
    q, s = tg.gptq_quantize(w, hess, 4, 4.0, keep=[128])  # diagonal H: GPTQ = RTN per column
    s8 = tg.awq_scales(s, 4)
    assert torch.equal(q[:, 128:192], tg.quantize_rtn(w[:, 128:192], s8, 8))
    assert torch.equal(q[:, :128], tg.quantize_rtn(w[:, :128], s, 4))
    assert int(q[:, 128:192].abs().max()) > 7  # uses the int8 range
    deq = tg.dequantize_int({"w.q": q, "w.scale": s}, "w", dict(bits=4, awq=[128]))
    assert torch.equal(deq[:, 128:192], tg.dequantize(q[:, 128:192], s8))


# --- the shipped code ---------------------------------------------------------------------------


def test_compression_report_per_group_and_codec(tmp_path):
    h, m, hess = legacy_fixture(compressor="pergroup", lqer_top_n=1)
    tensors, meta = tg.quantize_state(m, h, hess)
    path = tmp_path / "a.ptz"
    tg.write_artifact(str(path), tensors, meta, h, looping=False)
    rep = subprocess.run([sys.executable, str(REPO / "tools" / "compression_report.py"), str(path), "--by", "role"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert rep[0] == f"artifact_bytes:{path.stat().st_size} container:pergroup"
    rows = {l.split()[0][len("group:"):]: dict(t.split(":", 1) for t in l.split()[1:]) for l in rep[1:]}
    fc = rows["mlp.fc.weight.q"]
    codes = b"".join(tensors[f"blocks.{i}.mlp.fc.weight.q"].T.contiguous().numpy().tobytes() for i in range(4))
    assert int(fc["tensors"]) == 4 and int(fc["raw_bytes"]) == len(codes)
    for c in tg.CODECS:
        if tg.codec_fns(c):
            assert int(fc[f"{c}_bytes"]) == len(tg.codec_fns(c)[0](codes))
    assert fc["best"] == min((c for c in tg.CODECS if tg.codec_fns(c)), key=lambda c: int(fc[f"{c}_bytes"]))
    assert float(fc["entropy_bytes"]) <= min(int(fc[f"{c}_bytes"]) for c in tg.CODECS if tg.codec_fns(c))
