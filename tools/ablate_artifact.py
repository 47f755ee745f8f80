"""What does each artifact technique save, alone and together? `python3 tools/ablate_artifact.py --data DIR --tokenizer SP.model`

Artifact techniques one at a time and together: model bytes saved and quantization-gap change.

    python3 tools/ablate_artifact.py --data DIR --tokenizer SP.model [--preset smoke] [--steps 300]
        [--set KEY=VALUE ...] [--val-tokens 32768] [--calib 8] [--variants baseline,clips,...]

Trains one model (Trainer on CPU, EMA applied), collects the GPTQ Hessians once, then for each
variant quantizes, encodes, decodes, reloads and scores the truncated validation set. The baseline
is the pipeline before these techniques (int8 embedding k=20, one clip, one brotli stream); each
row prints the variant's `key:value`s: bytes_model, saved (vs baseline), gap (quantized minus
pre-quant val_bpb), dgap (vs baseline), encode and decode seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

BASELINE = dict(embed_bits=8, embed_clip_sigmas=20.0, mlp_clip_sigmas=0.0, attn_clip_sigmas=0.0, quant_gate=False,
                lqer_top_n=0, awq_lite=False, compressor="brotli", row_reorder=False)
RECORD = dict(embed_bits=7, embed_clip_sigmas=14.0, mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0, quant_gate=True,
              lqer_top_n=3, awq_lite=True, compressor="pergroup")
VARIANTS = {
    "baseline": {},
    "clips": dict(mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0),
    "int7_embed": dict(embed_bits=7, embed_clip_sigmas=14.0),
    "quant_gate": dict(quant_gate=True),
    "lqer": dict(lqer_top_n=3),
    "awq_lite": dict(awq_lite=True),
    "pergroup": dict(compressor="pergroup"),
    "pergroup_reorder": dict(compressor="pergroup", row_reorder=True),
    "all": RECORD,
    "all_reorder": dict(RECORD, row_reorder=True),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset dir with fineweb_{train,val}_*.bin")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--preset", default="", help="'' (full-size default model) or smoke")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE Hyperparameters override")
    ap.add_argument("--val-tokens", type=int, default=32768)
    ap.add_argument("--calib", type=int, default=8, help="GPTQ calibration micro-batches")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        return run(a)
    except (tg.ConfigError, OSError, ValueError) as e:  # bad --data/--tokenizer/--set: one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def run(a) -> int:
    env = {"PRESET": a.preset, "ITERATIONS": str(a.steps), "MAX_WALLCLOCK_SECONDS": "0", "GPTQ_RESERVE_SECONDS": "0",
           "WARMUP_STEPS": "0", "GPTQ_CALIBRATION_BATCHES": str(a.calib), "VAL_LOSS_EVERY": "0",
           "DATA_PATH": a.data, "TOKENIZER_PATH": a.tokenizer, **dict(kv.split("=", 1) for kv in a.set)}
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items() if v != ""})
    h = dataclasses.replace(h, **BASELINE)
    cpu = tg.Dist(0, 1, 0, torch.device("cpu"))
    log = tg.Logger(cpu, None)
    torch.manual_seed(a.seed)
    model = tg.GPT(h)
    tr = tg.Trainer(h, cpu, log, model, tg.shard_paths(h.dataset_dir, "train"))
    t0 = time.perf_counter()
    tr.run(lambda m: None)
    tr.apply_ema()
    print(f"trained steps:{h.iterations} time:{time.perf_counter() - t0:.0f}s params:{tg.count_params(model)}", flush=True)
    luts = tg.build_byte_luts(h.tokenizer_file, h.vocab_size)
    n = a.val_tokens // h.eval_seq_len * h.eval_seq_len
    val = tg.load_val_tokens(h.dataset_dir, h.eval_seq_len)[: n + 1]
    pre = tg.eval_val(h, model, cpu, val, luts).val_bpb
    t0 = time.perf_counter()
    hess = tg.collect_hessians(model, tr.calibration_batches(), h)
    print(f"pre_quant val_bpb:{pre:.6f} val_tokens:{n} hessian_time:{time.perf_counter() - t0:.1f}s", flush=True)
    base, cache = None, {}
    for name in a.variants.split(","):
        hv = dataclasses.replace(h, **VARIANTS[name])
        key = dataclasses.replace(hv, compressor="brotli", row_reorder=False)  # the container does not change the codes
        t0 = time.perf_counter()
        if key not in cache:
            cache[key] = tg.quantize_state(model, hv, hess)
        tensors, meta = cache[key]
        tq = time.perf_counter() - t0
        meta = dict(state=meta, config={}, looping=model.looping_active)
        t0 = time.perf_counter()
        blob = tg.encode_artifact(tensors, meta, hv)
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        back, meta2 = tg.decode_artifact(blob)
        state = tg.dequantize_state(back, meta2["state"])
        td = time.perf_counter() - t0
        q = tg.GPT(hv)
        q.load_state_dict(state, strict=True)
        q.looping_active = model.looping_active
        gap = tg.eval_val(hv, q, cpu, val, luts).val_bpb - pre
        base = base or (len(blob), gap)
        print(f"variant:{name} bytes_model:{len(blob)} saved:{base[0] - len(blob)} gap:{gap:+.6f} dgap:{gap - base[1]:+.6f} "
              f"quant_time:{tq:.1f}s encode_time:{te:.1f}s decode_time:{td:.2f}s", flush=True)
        for line in tg.quant_report(tensors, meta["state"], hv)[1:]:
            print(f"  {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
