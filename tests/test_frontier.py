"""The frontier training stack: document-masked attention, SmearGate, the attention-output gate,
Polar Express, fused softcapped CE, and the compiled graph; each against an independent reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import TINY

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
BOS = tg.BOS_ID


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def docs_row(lengths, gen, vocab=1024) -> torch.Tensor:
    """One row of documents [BOS] + body, bodies drawn without BOS; lengths include the BOS."""
    parts = []
    for n in lengths:
        body = torch.randint(2, vocab, (n - 1,), generator=gen)
        parts.append(torch.cat([torch.tensor([BOS]), body]))
    return torch.cat(parts)


def perturbed_model(h, seed=0) -> tg.GPT:
    """Off the zero/identity init so that every gate, smear and lane carries signal."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# --- document-masked attention --------------------------------------------------------------------


def reference_segments(ids):
    """(row, start, end) of each segment: a row start or a BOS opens one."""
    out = []
    for b, row in enumerate(ids.tolist()):
        starts = sorted({0} | {t for t, v in enumerate(row) if v == BOS})
        out += [(b, s, e) for s, e in zip(starts, starts[1:] + [len(row)])]
    return out


def per_segment_attention(q, k, v, segs):
    """Each segment attended alone with plain causal SDPA: the independent reference."""
    y = torch.zeros_like(q)
    for b, s, e in segs:
        t = lambda z: z[b : b + 1, s:e].transpose(1, 2)  # noqa: E731
        y[b, s:e] = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True).transpose(1, 2)[0]
    return y


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """CPU stand-in for FA3 flash_attn_varlen_func, written from its contract (packed [N,H,D])."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    cu = cu_q.tolist()
    y = torch.zeros_like(q)
    for s, e in zip(cu, cu[1:]):
        if e > s:
            assert e - s <= max_q
            t = lambda z: z[None, s:e].transpose(1, 2)  # noqa: E731
            y[s:e] = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True).transpose(1, 2)[0]
    return y


def test_doc_attention_equals_each_segment_alone(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.cat([torch.randint(2, 1024, (5,), generator=gen), docs_row([20, 9, 30], gen)]),
                       docs_row([1, 40, 23], gen), torch.randint(2, 1024, (64,), generator=gen)])
    q, k, v = torch.randn(3, 64, 4, 16, generator=gen), torch.randn(3, 64, 2, 16, generator=gen), torch.randn(3, 64, 2, 16, generator=gen)
    ref = per_segment_attention(q, k, v, reference_segments(ids))
    torch.testing.assert_close(tg.attention(q, k, v, tg.doc_layout(ids, varlen=False)), ref, rtol=1e-5, atol=1e-6)
    # the FA3 varlen path: boundary list = segment starts of the flattened batch, padded to a bucket
    layout = tg.doc_layout(ids, varlen=True)
    starts = [b * 64 + s for b, s, _ in reference_segments(ids)]
    cu = layout.cu_seqlens.tolist()
    assert layout.mask is None and len(cu) % tg.CU_BUCKET == 0
    assert cu[: len(starts)] == starts and set(cu[len(starts):]) == {3 * 64}
    monkeypatch.setattr(tg, "_fa3_varlen", fake_varlen)
    torch.testing.assert_close(tg.attention(q, k, v, layout), ref, rtol=1e-5, atol=1e-6)
    # off: exactly the plain causal call of before
    plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    assert torch.equal(tg.attention(q, k, v, None), plain.transpose(1, 2))


def doc_stream(gen, lengths):
    return docs_row(lengths, gen)


@pytest.mark.parametrize("looping", [False, True])
def test_earlier_documents_cannot_change_later_nll(looping):
    """Replacing every token of the documents before document k leaves each NLL of document k
    bit-identical; scoring document k alone gives the same NLL (RoPE sees only offsets)."""
    h = tiny()
    model = perturbed_model(h)
    model.looping_active = looping
    gen = torch.Generator().manual_seed(1)
    row = doc_stream(gen, [17, 22, 26])  # 65 tokens: x = row[:-1], y = row[1:]
    x, y = row[None, :-1], row[None, 1:]
    base = model.token_nll(x, y)
    k0 = 17 + 22  # document 3 starts here; its targets are positions k0.. (x[k0] = BOS predicts its first token)
    alt = row.clone()
    alt[1:17] = torch.randint(2, 1024, (16,), generator=gen)
    alt[18:k0] = torch.randint(2, 1024, (k0 - 18,), generator=gen)
    nll = model.token_nll(alt[None, :-1], alt[None, 1:])
    assert torch.equal(nll[0, k0:], base[0, k0:])
    assert not torch.equal(nll[0, 17:k0], base[0, 17:k0])  # document 2 itself was changed
    alone = model.token_nll(row[None, k0:-1], row[None, k0 + 1 :])
    torch.testing.assert_close(alone[0], base[0, k0:], rtol=1e-5, atol=1e-5)
    # the training loss is the mean of these same per-target NLLs
    torch.testing.assert_close(model(x, y), base.mean(), rtol=1e-6, atol=1e-6)
    # negative control: without document masking the earlier documents do leak in
    model.h = tiny(doc_mask=False)
    assert not torch.equal(model.token_nll(alt[None, :-1], alt[None, 1:])[0, k0:], model.token_nll(x, y)[0, k0:])


def stream_and_luts(gen, n_docs=12):
    lengths = [int(n) for n in torch.randint(20, 90, (n_docs,), generator=gen)]
    tokens = doc_stream(gen, lengths)
    luts = (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    return tokens, luts, np.cumsum([0] + lengths)


@pytest.mark.parametrize("stage", ["plain", "sliding", "ttt"])
def test_eval_stages_keep_documents_apart(stage):
    """Every eval stage: targets of a document never depend on earlier documents' tokens (for TTT,
    within the first chunk, before any weight was trained on earlier tokens)."""
    h = tiny(ttt_epochs=1, ttt_chunk_tokens=256, eval_stride=16)
    gen = torch.Generator().manual_seed(2)
    tokens, luts, starts = stream_and_luts(gen)
    alt = tokens.clone()
    k = int(np.searchsorted(starts, 150))  # documents before starts[k] get replaced
    for s, e in zip(starts[:k], starts[1 : k + 1]):
        alt[s + 1 : e] = torch.randint(2, 1024, (e - s - 1,), generator=gen)

    def nll(tok):
        model = perturbed_model(h)
        if stage == "ttt":
            return tg.eval_ttt(h, model, model.token_nll, model, CPU, tok, luts, collect=True)[1]
        stride = h.eval_seq_len if stage == "plain" else h.eval_stride
        return tg.eval_windows(h, model.token_nll, CPU, tok, luts, stride, collect=True)[1]

    a, b = nll(tokens), nll(alt)
    lo, hi = int(starts[k]), (h.ttt_chunk_tokens if stage == "ttt" else tokens.numel() - 1)
    assert torch.equal(a[lo:hi], b[lo:hi]) and not torch.equal(a[:lo], b[:lo])


def test_data_without_bos_is_a_one_line_error():
    h = tiny()
    toks = np.arange(2, 5000) % 1000 + 2
    for what in ("validation", "training"):
        with pytest.raises(tg.ConfigError) as e:
            tg.require_doc_starts(toks, what, h)
        assert "DOC_MASK=0" in str(e.value) and "\n" not in str(e.value)
    tg.require_doc_starts(toks, "validation", tiny(doc_mask=False))
    tg.require_doc_starts(np.concatenate([[BOS], toks]), "validation", h)
