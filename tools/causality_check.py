"""Does any eval stage's score of a token depend on later tokens (perturbation check)? `python3 tools/causality_check.py --artifact logs/run.ptz`

Perturbation check of causality for every eval stage, on a saved artifact.

For a prefix of the validation stream, score every target with a stage; then replace every token
after stream position p with a different random token and score again. A causal stage gives every
target at or before p (target i is token i+1, so i < p) a bit-identical NLL. TTT stages start from
a fresh copy of the artifact on each run, so their weight updates are part of what is checked.
The document stages (doc_plain, doc_sliding, lora_ttt) score documents in stream order, so the same
check covers them; the points include document starts and the LoRA stage's phase boundaries.
With NGRAM_TILT=1 every stage is scored tilted, with the n-gram hints recomputed from each
(perturbed) stream, and the hints of targets 0..p are compared too: target p's hint may not read
its own target (token p+1), which the scores alone cannot show (every NLL reads its target).

    python3 tools/causality_check.py --artifact logs/run.ptz [--stage plain sliding ttt] \
        [--tokens 20000] [--positions 3] [--seed 0]   # --stage also doc_plain doc_sliding lora_ttt

The model config comes from the same env vars as the run that wrote the artifact (PRESET,
VOCAB_SIZE, ..., DATA_PATH, TOKENIZER_PATH, EVAL_STRIDE, TTT_*, NGRAM_*). Runs on CPU in float32, where
every kernel is deterministic. Exit status 1 when any stage leaks, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
STAGES = ("plain", "sliding", "ttt", "doc_plain", "doc_sliding", "lora_ttt")


def stage_nll(h: tg.Hyperparameters, make_model, tokens: torch.Tensor, luts, stage: str, scorer=None) -> torch.Tensor:
    """Per-target NLL of one stage on a fresh model; scorer overrides model.token_nll (for controls).
    NGRAM_TILT=1: tilted by the hints of this stream, computed here as the run computes them."""
    model, tilt = make_model(), tg.tilt_plan(h, tokens)
    if stage == "lora_ttt":
        return tg.eval_lora_ttt(h, model, model, CPU, tokens, luts, collect=True, tilt=tilt)[1]
    if stage.startswith("doc_"):
        stride = h.eval_seq_len if stage == "doc_plain" else h.eval_stride
        return tg.eval_doc_windows(h, scorer or model.token_nll, CPU, tokens, luts, stride, collect=True, tilt=tilt)[1]
    if stage == "ttt":
        tg.prepare_ttt(model, h)
        return tg.eval_ttt(h, model, scorer or model.token_nll, model, CPU, tokens, luts, collect=True, tilt=tilt)[1]
    stride = h.eval_seq_len if stage == "plain" else h.eval_stride
    return tg.eval_windows(h, scorer or model.token_nll, CPU, tokens, luts, stride, collect=True, tilt=tilt)[1]


def perturb_after(tokens: torch.Tensor, p: int, vocab: int, seed: int) -> torch.Tensor:
    """Copy with every token at stream position > p replaced by a different token."""
    g = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    shift = torch.randint(1, vocab, (tokens.numel() - p - 1,), generator=g)
    out[p + 1 :] = (tokens[p + 1 :] + shift) % vocab
    return out


def check_causality(h, make_model, tokens, luts, stage: str, p: int, seed: int = 0, scorer=None) -> dict:
    """Compare a stage's NLL (and hints) before/after perturbing tokens after p. Causal: mismatches ==
    hint_mismatches == 0."""
    moved = perturb_after(tokens, p, h.vocab_size, seed)
    a = stage_nll(h, make_model, tokens, luts, stage, scorer)
    b = stage_nll(h, make_model, moved, luts, stage, scorer)
    bad = (a[:p] != b[:p]).nonzero().flatten()
    hints = [tg.tilt_plan(h, t) for t in (tokens, moved)]
    return dict(stage=stage, tilt=int(h.ngram_tilt), p=p, checked=p, mismatches=int(bad.numel()),
                first_mismatch=int(bad[0]) if bad.numel() else -1,
                hint_mismatches=int((hints[0][0][: p + 1] != hints[1][0][: p + 1]).sum()) if hints[0] else 0,
                changed_after=int((a[p:] != b[p:]).sum()))


def boundary_points(h: tg.Hyperparameters, tokens: torch.Tensor) -> set[int]:
    """Around the second document start and around the first target after each phase of lora_ttt."""
    starts, _ = tg.doc_spans(tokens)
    n, out = tokens.numel() - 1, set()
    marks = [int(starts[1])] if len(starts) > 1 else []
    marks += [int(starts[b]) for b in tg.phase_bounds(h, len(starts)) if b < len(starts)]
    for m in marks:
        out |= {p for p in (m - 1, m, m + 1) if 0 < p < n}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True, help="artifact (.ptz) written by train_gpt.py")
    ap.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--tokens", type=int, default=20_000, help="validation targets to evaluate")
    ap.add_argument("--positions", type=int, default=3, help="perturbation points, spread over the stream")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        h = tg.Hyperparameters.from_env()
        state, looping = tg.load_artifact(args.artifact, h)
        luts = tg.build_byte_luts(h.tokenizer_file, h.vocab_size)
        tokens = tg.load_val_tokens(h.dataset_dir, h.eval_seq_len)[: args.tokens + 1]
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def make_model():
        m = tg.GPT(h)
        m.load_state_dict(state, strict=True)
        tg.set_looping(m, looping)
        return m

    n = tokens.numel() - 1
    # Spread points, including ones right at and after a TTT chunk boundary when the stream has one.
    points = sorted({int(n * (k + 1) / (args.positions + 1)) for k in range(args.positions)}
                    | ({h.ttt_chunk_tokens, h.ttt_chunk_tokens + 1} if h.ttt_chunk_tokens + 1 < n else set())
                    | boundary_points(h, tokens))
    leaks = 0
    for stage in args.stage:
        for p in points:
            r = check_causality(h, make_model, tokens, luts, stage, p, args.seed)
            ok = r["mismatches"] == r["hint_mismatches"] == 0
            leaks += not ok
            print(" ".join(f"{k}:{v}" for k, v in r.items()) + f" causal:{int(ok)}", flush=True)
    print(f"causality targets:{n} stages:{'+'.join(args.stage)} tilt:{int(h.ngram_tilt)} points:{len(points)} result:{'LEAK' if leaks else 'ok'}")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
