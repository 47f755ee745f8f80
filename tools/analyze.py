#!/usr/bin/env python3
"""What did a trained model's embedding and head learn? `python3 tools/analyze.py logs/<run_id>.ptz --log logs/<run_id>.txt`

Weight analysis of a trained model: the tables and plots of the embedding and head studies.

    python3 tools/analyze.py logs/<run_id>.ptz --log logs/<run_id>.txt --text "The capital of France is" \\
        --out analysis/<run_id>

Input: an artifact (`.ptz`) or a checkpoint (`torch.save(model.state_dict())`), and the config it
was trained with: the `hp name:value` dump of its log (--log), else the env vars as train_gpt.py
reads them; `--set KEY=VALUE` overrides single knobs. Writes to --out:
- report.md / report.json: per block the effective contribution of attention and MLP
  (||diag(scale) W_out||_F: output projection rows times the learned output scale), q_gain mean and
  std over heads, resid_mix weights of x and x0 (and of each extra embedding), the norm of the
  attention-output gate weights (ATTN_GATE; 0 = every head at its init gate); SmearGate lambda and
  gate-weight norm (SMEAR_GATE); per U-net skip its
  effective weight mean((1 - sigmoid(gate)) * w); per parallel lane block the residual and routing
  lambdas and the share of attention / MLP output energy written to lane 1 (the MLP lane);
  singular values of embed/head projections, rotations (of B A and of I + B A) and head matrices;
  the logit lens on --text; per-row embedding statistics by training-token frequency.
- profile.png: the per-block profile (effective contribution of attention and MLP per block).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

RANK_EDGES = (64, 256, 1024, 4096, 16384, 65536)  # frequency-rank buckets of the per-row statistics


def config_from_log(path: str) -> dict[str, str]:
    """`hp name:value` lines of a train_gpt.py log -> {NAME: value} as env vars."""
    env = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("hp ") and ":" in line:
            name, value = line[3:].split(":", 1)
            env[name.strip().upper()] = value
    if not env:
        raise tg.ConfigError(f"log {path} has no 'hp name:value' lines; pass the config as env vars or --set")
    return env


def load_model(path: str, h: tg.Hyperparameters) -> tuple[tg.GPT, dict | None, dict | None]:
    """(model in eval mode, raw artifact tensors, artifact meta); the last two are None for a checkpoint."""
    if not Path(path).is_file():
        raise tg.ConfigError(f"{path} not found; pass an artifact (.ptz) or a torch.save state dict")
    model = tg.GPT(h)
    data = Path(path).read_bytes()
    tensors = meta = None
    if data[:2] == b"PK":  # torch.save zip container
        state, looping = torch.load(path, map_location="cpu", weights_only=True), True
    else:
        state, looping = tg.load_artifact(path, h)
        tensors, meta = tg.decode_artifact(data)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise tg.ConfigError(f"{path} does not fit the config: {str(e).splitlines()[-1].strip()}") from None
    model.looping_active = looping
    return model.eval(), tensors, meta


def _f(t: torch.Tensor) -> float:
    return float(t.detach().double())


def block_profile(model: tg.GPT) -> list[dict]:
    rows = []  # norms in float64: a float32 sum over a matrix drifts ~1e-6 with the summation order
    for i, b in enumerate(model.blocks):
        attn = _f((b.attn_scale.detach().double()[:, None] * b.attn.proj.weight.detach().double()).norm())
        mlp = _f((b.mlp_scale.detach().double()[:, None] * b.mlp.proj.weight.detach().double()).norm())
        g = b.attn.q_gain.detach()
        row = dict(block=i, params=sum(p.numel() for p in b.parameters()), attn_eff=attn, mlp_eff=mlp,
                   total_eff=attn + mlp, q_gain_mean=_f(g.mean()), q_gain_std=_f(g.std(correction=0)))
        if b.attn.attn_gate_w is not None:
            row.update(attn_gate_norm=_f(b.attn.attn_gate_w.detach().norm()))
        if b.resid_mix is not None:
            mix = b.resid_mix.detach()
            row.update(x_weight=_f(mix[0].mean()), x0_weight=_f(mix[1].mean()))
            row.update({f"x0{j}_weight": _f(mix[1 + j].mean()) for j in range(1, mix.size(0) - 1)})
        rows.append(row)
    return rows


def smear_profile(model: tg.GPT) -> dict:
    """SmearGate: e_t += lambda * sigmoid(w . e_t[:window]) * e_{t-1}; lambda = 0 means off."""
    if not model.h.smear_gate:
        return {}
    return dict(smear_lambda=_f(model.smear_lambda.detach()[0]), smear_w_norm=_f(model.smear_gate.weight.detach().norm()))


def skip_profile(model: tg.GPT) -> list[dict]:
    """Effective skip weights at decoder position j: x <- sigmoid(g) x + (1 - sigmoid(g)) w skip."""
    sched = model.schedules[model.looping_active]
    rows = []
    for j in range(sched.n_skip):
        w = model.skip_weights.detach()[j]
        keep = torch.sigmoid(model.skip_gates.detach()[j]) if model.skip_gates is not None else torch.ones_like(w)
        skip_w = (1 - keep) * w if model.skip_gates is not None else w
        rows.append(dict(position=j, decoder_layer=sched.decoder[j], encoder_layer=sched.encoder[len(sched.encoder) - 1 - j],
                         skip_weight=_f(w.mean()), x_keep=_f(keep.mean()), effective_skip=_f(skip_w.mean())))
    return rows


def lane_profile(model: tg.GPT) -> list[dict]:
    """Lane lambdas of the two-lane blocks; post[src, dst] with src 0 attention / 1 MLP, dst = lane."""
    sched = model.schedules[model.looping_active]
    rows = []
    for i in sorted(set(sched.decoder[sched.parallel_from :])):
        r, p = model.parallel_resid_lambdas.detach()[i], model.parallel_post_lambdas.detach()[i]
        share = lambda v: _f(v[1] ** 2 / (v[0] ** 2 + v[1] ** 2).clamp_min(1e-30))  # noqa: E731
        rows.append(dict(block=i, lane0_resid=_f(r[0]), lane1_resid=_f(r[1]), attn_to_lane0=_f(p[0, 0]),
                         attn_to_lane1=_f(p[0, 1]), mlp_to_lane0=_f(p[1, 0]), mlp_to_lane1=_f(p[1, 1]),
                         attn_share_lane1=share(p[0]), mlp_share_lane1=share(p[1])))
    return rows


def spectra(model: tg.GPT) -> dict[str, list[float]]:
    """Singular values (descending) of the matrices at the ends of the network."""
    mats = {}
    for name in ("embed_proj", "head_proj", "head_down", "head_out", "head_gate"):
        mod = getattr(model, name, None)
        if mod is not None:
            mats[name] = mod.weight.detach().double()
    for name in ("in_rot", "out_rot"):
        rot = getattr(model, name)
        if rot is not None:
            ba = rot.b.weight.detach().double() @ rot.a.weight.detach().double()
            mats[f"{name} BA"], mats[f"{name} I+BA"] = ba, torch.eye(ba.size(0), dtype=ba.dtype) + ba
    return {k: torch.linalg.svdvals(v).tolist() for k, v in mats.items()}


def spectrum_summary(sv: list[float]) -> dict:
    s = np.asarray(sv)
    return dict(n=len(s), max=float(s.max()), min=float(s.min()), mean=float(s.mean()),
                within_0p2pct_of_1=float(np.mean(np.abs(s - 1) <= 0.002)))


@torch.no_grad()
def logit_lens(model: tg.GPT, ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-k next-token ids [T, k] per component, each decoded through the model's own head:
    the final residual (the model's prediction), the embedding x0 and each extra embedding."""
    ids = ids[None]
    e = model.tok_emb(ids)
    if model.h.smear_gate:
        e = model.smear(e, ids)
    if model.embed_proj is not None:
        e = model.embed_proj(e)
    if model.in_rot is not None:
        e = model.in_rot(e)
    comps = {"final": model.logits(ids), "x0": model.head_logits(model.head_input(tg.rms_norm(e)))}
    for j, t in enumerate(model.extra_embeds or [], 1):
        comps[f"x0{j}"] = model.head_logits(model.head_input(tg.rms_norm(t(ids))))
    return {name: z[0].topk(k, dim=-1).indices for name, z in comps.items()}


def token_counts(h: tg.Hyperparameters, max_tokens: int) -> np.ndarray:
    """Token counts over the first max_tokens tokens of the training shards."""
    counts, seen = np.zeros(h.vocab_size, dtype=np.int64), 0
    for p in tg.shard_paths(h.dataset_dir, "train"):
        toks = np.asarray(tg.read_shard(p)[: max_tokens - seen])
        counts += np.bincount(toks, minlength=h.vocab_size)[: h.vocab_size]
        seen += toks.size
        if seen >= max_tokens:
            break
    return counts


def embed_row_stats(model: tg.GPT, tensors: dict | None, meta: dict | None, counts: np.ndarray, h: tg.Hyperparameters) -> list[dict]:
    """Per frequency-rank bucket of the embedding rows: token share, row norm, stored bits, relative
    quantization step (row scale / row std) and the fraction of zeros."""
    w = model.tok_emb.weight.detach().double()
    order = np.argsort(-counts, kind="stable")
    m = (meta or {}).get("state", {}).get("tok_emb.weight", {})
    bits = step = None
    if tensors is not None and m.get("kind") == "int":
        bits = tensors["tok_emb.weight.bits"].double() if "tok_emb.weight.bits" in tensors else torch.full((w.size(0),), float(m["bits"]))
        step = tensors["tok_emb.weight.scale"].double() / w.std(dim=1, correction=1).clamp_min(1e-30)  # sdclip_scales' std
    rows, lo = [], 0
    for hi in [e for e in RANK_EDGES if e < h.vocab_size] + [h.vocab_size]:
        idx = torch.from_numpy(order[lo:hi].copy())
        row = dict(ranks=f"{lo}-{hi - 1}", rows=hi - lo, token_share=float(counts[order[lo:hi]].sum() / max(counts.sum(), 1)),
                   row_norm=_f(w[idx].norm(dim=1).mean()), zero_frac=_f((w[idx] == 0).double().mean()))
        if bits is not None:
            row.update(bits=_f(bits[idx].mean()), rel_step=_f(step[idx].mean()))
        rows.append(row)
        lo = hi
    return rows


def plot_profile(blocks: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(blocks))
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a0.bar(x, [b["attn_eff"] for b in blocks], label="attention", color="tab:blue")
    a0.bar(x, [b["mlp_eff"] for b in blocks], bottom=[b["attn_eff"] for b in blocks], label="MLP", color="tab:orange")
    a0.plot(x, [b["total_eff"] for b in blocks], "k.-", label="sum")
    a0.set_ylabel("||diag(scale) W_out||_F")
    a0.set_title("effective contribution per block")
    a0.legend()
    a1.plot(x, [b["q_gain_std"] for b in blocks], "o-", label="q_gain std")
    if "x0_weight" in blocks[0]:
        a1.plot(x, [b["x0_weight"] for b in blocks], "s-", label="x0 weight (resid_mix)")
    a1.axhline(0, color="grey", lw=0.5)
    a1.set_xlabel("physical block")
    a1.set_xticks(x)
    a1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict], fmt: str = "{:.4g}") -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    cell = lambda v: fmt.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]


def summary(blocks: list[dict]) -> dict:
    tot = [b["total_eff"] for b in blocks]
    ends = (0, len(blocks) - 1)
    return dict(peak_block=int(np.argmax(tot)), spread=max(tot) / max(min(tot), 1e-30),
                boundary_share=sum(tot[i] for i in ends) / sum(tot), boundary_params=sum(blocks[i]["params"] for i in ends))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="artifact (.ptz) or checkpoint (torch.save state dict)")
    ap.add_argument("--log", help="train_gpt.py log whose hp lines give the config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one knob")
    ap.add_argument("--text", default="", help="text for the logit lens")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--lens-positions", type=int, default=16, help="first N positions shown in the lens table")
    ap.add_argument("--max-tokens", type=int, default=50_000_000, help="training tokens counted for the row statistics")
    ap.add_argument("--out", default="analysis")
    a = ap.parse_args(argv)
    try:
        env = config_from_log(a.log) if a.log else dict(os.environ)
        for kv in a.set:
            k, _, v = kv.partition("=")
            env[k.strip().upper()] = v
        h = tg.Hyperparameters.from_env(env)
        model, tensors, meta = load_model(a.model, h)
    except (tg.ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = block_profile(model)
    rep = dict(model=a.model, params=tg.count_params(model), looping=model.looping_active, blocks=blocks,
               summary=summary(blocks), skips=skip_profile(model), lanes=lane_profile(model), spectra=spectra(model),
               smear=smear_profile(model))
    lines = [f"# Weight analysis of {a.model}", "",
             f"params:{rep['params']} looping:{int(model.looping_active)} head:{h.head_kind} "
             f"overrides: {' '.join(f'{k}={v}' for k, v in vars(h).items() if v != tg._DEFAULTS[k] and k not in ('run_id', 'data_path', 'tokenizer_path', 'log_dir')) or 'none'}",
             "", "## Blocks", "", "Effective contribution = ||diag(scale) W_out||_F (attention: proj x attn_scale; MLP: down x mlp_scale).",
             "", *_table(blocks), "",
             "peak block {peak_block}; spread max/min {spread:.2f}x; first+last blocks: {boundary_share:.1%} of the total "
             "with {boundary_params} params".format(**rep["summary"]), "", "![profile](profile.png)", "",
             *(["SmearGate " + " ".join(f"{k}:{v:.4g}" for k, v in rep["smear"].items()), ""] if rep["smear"] else []),
             "## U-net skips", "", *_table(rep["skips"]), "", "## Parallel lanes", "",
             "Share = post[src,1]^2 / (post[src,0]^2 + post[src,1]^2): output energy routed to lane 1 (the MLP lane).",
             "", *_table(rep["lanes"]), "", "## Singular values", ""]
    lines += _table([dict(matrix=k, **spectrum_summary(v)) for k, v in rep["spectra"].items()])
    if a.text:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=h.tokenizer_file)
        ids = torch.tensor([tg.BOS_ID] + sp.encode(a.text)[: h.eval_seq_len - 1])
        lens = logit_lens(model, ids, a.topk)
        rep["logit_lens"] = dict(tokens=ids.tolist(), topk={k: v.tolist() for k, v in lens.items()})
        piece = lambda i: sp.id_to_piece(int(i)).replace("|", "\\|")  # noqa: E731
        lines += ["", f"## Logit lens (top-{a.topk} next tokens)", "", "| pos | input | next | " + " | ".join(lens) + " |",
                  "|" + "---|" * (3 + len(lens))]
        for t in range(min(len(ids), a.lens_positions)):
            nxt = piece(ids[t + 1]) if t + 1 < len(ids) else ""
            lines.append(f"| {t} | {piece(ids[t])} | {nxt} | " + " | ".join(" ".join(piece(i) for i in v[t]) for v in lens.values()) + " |")
    try:
        counts = token_counts(h, a.max_tokens)
        rep["embed_rows"] = embed_row_stats(model, tensors, meta, counts, h)
        lines += ["", f"## Embedding rows by training-token frequency ({int(counts.sum())} tokens counted)", "",
                  *_table(rep["embed_rows"])]
    except tg.ConfigError as e:
        lines += ["", "## Embedding rows by training-token frequency", "", f"skipped: {e}"]
    plot_profile(blocks, out / "profile.png")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(rep, indent=1), encoding="utf-8")
    print(f"report:{out / 'report.md'} json:{out / 'report.json'} png:{out / 'profile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
