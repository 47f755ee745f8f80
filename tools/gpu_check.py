#!/usr/bin/env python3
"""Does train_gpt.py work on one GPU within a time cap (report.md + raw logs to --out)? `python3 tools/gpu_check.py --out gpu_report`

    python3 tools/gpu_check.py --prepare                 # once, any machine (CPU): the data of steps 4-6
    python3 tools/gpu_check.py --dry-run --out gpu_report  # the plan; checks every input exists
    python3 tools/gpu_check.py --out gpu_report          # on one GPU, at most --cap seconds (default 560)
    python3 tools/gpu_check.py --cpu-sized --out DIR --data D --tokenizer T   # the same steps, tiny, on CPU

Steps, each in its own process with its own time limit; a failed or timed-out step is recorded and
the next one still runs (only a step that needs an earlier one's output is skipped). On a GPU steps
1, 2, 4 and 5 run by default (their caps sum to the 560 s cap); steps 3 and 6 run by themselves
(--steps 3,6: 155 s):
  1 versions: torch, CUDA, GPU, FA3 (or its import error) / Triton / brotli, the attention path chosen;
  2 compile: every graph the record eval compiles, each with its time, at step 4's shapes so step 4
    finds them in Inductor's caches: the scorer (plain stage), the phased global SGD's loss on its
    TTT_BATCH_SEQS rows, the LoRA AdamW update and the packed LoRA step (lora_warmup: one lane and
    the dynamic lane count); at --cpu-sized also the training step of both loop modes;
  3 bench: tools/bench.py on the default config (98,304 tokens per micro-step on one GPU) for both
    loop modes (at --cpu-sized also tools/bench.py --compare of the speed switches in COMPARES);
  4 pipeline: train_gpt.py on real shards (sp8192) with MAX_WALLCLOCK_SECONDS=20 and 8-row batches
    (one or two cu_seqlens buckets to compile): training, GPTQ, artifact written and re-read, the size
    line, the record eval stages: final_quantized and final_lora_ttt (LoRA at the record's 64 rows,
    rank and chunk; the phased SGD on a prefix of PHASED_PREFIX_DOCS of the ~100 validation documents
    in TTT_CHUNK_TOKENS chunks small enough to train on), with the lora_ttt_work line. Windowed stages
    are projected to the full validation split on 8 GPUs; the LoRA stage is not (on 100 documents one
    long document's chunks set its step count and the phased SGD's prefix is not to scale): its
    measured time is reported, its projection is `python3 tools/bench_eval.py --project`;
  5 causality: tools/causality_check.py on the artifact of step 4 for the stages the record config
    runs, plain and lora_ttt (CPU float32, deterministic; LoRA at small rows, rank and window);
  6 losses: the first 20 training losses of the record model on the GPU (bf16 autocast, eager, 1,024
    tokens per step to keep the CPU side short) next to a CPU float32 run of the same steps and data.
The plan (and --dry-run) lists the graphs each step compiles, counted from the steps' env and the
data with train_gpt's bucket rules, and projects each step's seconds (COMPILE_S, WARM, FIXED_S); a dry
run exits 2 when a projection exceeds its step's cap. A rerun first removes the previous run's
step logs, report and work files (RUN_ID=gpu_check is refused while its log exists).
Knob env vars of the caller are dropped: every step runs the sizes written in SIZES, so two reports
compare. report.md is rewritten after each step, so a killed run still leaves one.
--prepare builds the shards from ../shared/data (FineWeb sample for validation, then the FineWeb
and enwiki samples for training) and copies the tokenizer, all into data/gpu_check/ (ignored by
git, about 30 MiB), so the data travels with a copy of the working tree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CHECK_DIR = REPO / "data" / "gpu_check"
DEFAULT_DATA = CHECK_DIR / "sp8192"
DEFAULT_TOKENIZER = CHECK_DIR / "fineweb_8192_bpe.model"
FULL_VAL_TOKENS = 40_540_160  # scored targets of the published sp8192 val split (2026-04-09 record log: val_tokens)
EVAL_WORLD = 8  # eval times are projected to the 8-GPU submission setting
# Step 6 verdict: same init and data, so only bf16 rounding separates the runs. At step 1 that is a
# few 1e-3 nats; a gap that grows past these bounds within 20 steps points at a bf16-path bug.
LOSS_TOL_FIRST, LOSS_TOL_ANY = 0.02, 0.10
# (label, env of config A, env of config B) for bench.py --compare: the heaviest speed switches.
COMPARES = [("compile", "", "COMPILE=0")]

# The eval stages the record config runs: final_quantized and final_lora_ttt (the score).
RECORD_STAGES = ("plain", "lora_ttt")

# Env of each step, by size. "gpu": the record config; "cpu": a tiny config that runs in seconds.
SIZES = {
    "gpu": dict(
        base={},
        # Steps 2 and 4 share these shapes, so step 4 finds step 2's graphs in Inductor's caches; 8 rows
        # a micro-step and 8 eval windows keep the cu_seqlens buckets their batches reach to one or two;
        # the phased SGD's loss takes 4 rows a step. The LoRA step keeps the record's rows, rank and chunk.
        shapes=dict(TRAIN_BATCH_TOKENS="131072", VAL_BATCH_TOKENS="16384", TTT_BATCH_SEQS="4"),
        compile=["--eval-only"],  # steps 3 and 4 compile both training loop modes
        bench=["--warmup", "1", "--steps", "2"], compare=None,  # --compare: bench.py by hand, it compiles twice more
        # The record's phased SGD pauses at 1/3..3/3 of 2,500 of 50,000 documents in 32,768-token chunks;
        # here 6 of the ~100 prepared ones (pauses after documents 2, 4 and 6) in 8,192-token chunks (4
        # rows: one SGD step each), so every phase trains on at least one chunk.
        pipeline=dict(MAX_WALLCLOCK_SECONDS="20", WARMUP_STEPS="1", PHASED_PREFIX_DOCS="6", TTT_CHUNK_TOKENS="10240"),
        # Short windows (4 a batch: a batch is padded to VAL_BATCH_TOKENS), 2 LoRA rows of rank 8 and
        # 256-target chunks keep 8 CPU evals of the record model within seconds; legality depends on
        # none of them. Points: target 1,024 (a LoRA chunk boundary) and the one after it
        # (TTT_CHUNK_TOKENS); a document start and the phase bound after document 1 where --tokens
        # reaches them (the prepared stream's first document is longer).
        causality_env=dict(EVAL_SEQ_LEN="512", VAL_BATCH_TOKENS="2048", TTT_CHUNK_TOKENS="1024", LORA_BATCH_DOCS="2",
                           LORA_RANK="8", LORA_CHUNK_TOKENS="256", PHASED_PREFIX_DOCS="1", PHASED_NUM_PHASES="1"),
        causality=["--tokens", "2048", "--positions", "1", "--stage", *RECORD_STAGES],
        # 1,024 tokens per step (8 micro-steps of one 128-token row) keep 20 CPU float32 steps of the
        # record model near half a minute; eager on the GPU so no new shapes are compiled.
        losses=dict(TRAIN_SEQ_LEN="128", TRAIN_BATCH_TOKENS="1024", COMPILE="0", ITERATIONS="20"),
        # 1, 2, 4 and 5 sum to the 560 s cap. The LoRA stage's five graphs (~130 s cold in step 2, ~45 s
        # warm in step 4) left no room for step 3: it and step 6 run by themselves (--steps 3,6).
        caps={1: 10, 2: 205, 3: 95, 4: 320, 5: 25, 6: 60},
        default_steps=[1, 2, 4, 5],
    ),
    "cpu": dict(
        base=dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", ROPE_DIMS="8", XSA_LAST_N="4",
                  LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_RESIDUAL_START="2", TRAIN_SEQ_LEN="64",
                  TRAIN_BATCH_TOKENS="1024", EVAL_SEQ_LEN="64", VAL_BATCH_TOKENS="2048", MAX_WALLCLOCK_SECONDS="0",
                  GPTQ_RESERVE_SECONDS="0", MUON_MOMENTUM_WARMUP_STEPS="10", EVAL_STRIDE="32",
                  TTT_CHUNK_TOKENS="512", TTT_EPOCHS="1", TTT_BATCH_SEQS="8", GPTQ_CALIBRATION_BATCHES="2",
                  LORA_RANK="8", LORA_CHUNK_TOKENS="16", LORA_BATCH_DOCS="4", PHASED_PREFIX_DOCS="1", PHASED_NUM_PHASES="1"),
        shapes={}, compile=[],
        bench=["--warmup", "0", "--steps", "1"], compare=["--warmup", "0", "--steps", "1", "--rounds", "1"],
        pipeline=dict(ITERATIONS="3", WARMUP_STEPS="1", TRAIN_LOG_EVERY="1"),
        # 2,048 targets reach the second document of a two-document stream and its phase bound.
        causality_env={}, causality=["--tokens", "2048", "--positions", "1", "--stage", *RECORD_STAGES],
        losses=dict(ITERATIONS="4"),
        caps={n: 600 for n in range(1, 7)},  # only against hangs: a busy CPU machine is slow
        default_steps=[1, 2, 3, 4, 5, 6],
    ),
}


@dataclass
class Cmd:
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    step: int
    name: str
    status: str = "not run"
    seconds: float = 0.0
    logs: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # key lines for the report


def internal(name: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--internal", name, *extra]


# --- the steps: each returns the commands it runs ------------------------------------------------


def cmds_versions(ctx) -> list[Cmd]:
    out = [Cmd("versions", internal("versions"))]
    if shutil.which("nvidia-smi"):
        out.append(Cmd("nvidia-smi", ["nvidia-smi"]))
    return out


def cmds_compile(ctx) -> list[Cmd]:
    return [Cmd("compile", internal("compile", *ctx.size["compile"]), dict(ctx.size["shapes"]))]


def cmds_bench(ctx) -> list[Cmd]:
    bench = [sys.executable, str(REPO / "tools" / "bench.py")]
    out = [Cmd("bench", bench + ctx.size["bench"])]
    for label, a, b in COMPARES if ctx.size["compare"] else []:
        out.append(Cmd(f"compare_{label}", bench + ctx.size["compare"] + ["--compare", a, b]))
    return out


def cmds_pipeline(ctx) -> list[Cmd]:
    env = dict(ctx.size["shapes"], **ctx.size["pipeline"], RUN_ID="gpu_check", LOG_DIR=str(ctx.work), ARTIFACT_PATH=str(ctx.artifact))
    return [Cmd("train_gpt", [sys.executable, str(REPO / "train_gpt.py")], env)]


def cmds_causality(ctx) -> list[Cmd]:
    return [Cmd("causality", [sys.executable, str(REPO / "tools" / "causality_check.py"), "--artifact", str(ctx.artifact),
                              *ctx.size["causality"]], dict(ctx.size["causality_env"]))]


def cmds_losses(ctx) -> list[Cmd]:
    env = dict(ctx.size["losses"], WARMUP_STEPS="0", TRAIN_LOG_EVERY="1",
               MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0")
    return [Cmd("device", internal("losses", "--device", ctx.device), env),
            Cmd("cpu_fp32", internal("losses", "--device", "cpu"), env)]


# (number, name, title, commands, keep: regex of the lines that go into the report, needs artifact)
STEPS = [
    (1, "versions", "versions and attention path", cmds_versions, r"^(python|device|fa3|attention|torch)", False),
    (2, "compile", "compile of the eval graphs: scorer, SGD loss, LoRA AdamW and step (and both loop modes at --cpu-sized; "
     "steps 3-4 compile them on a GPU)", cmds_compile, r"^compile ", False),
    (3, "bench", "tools/bench.py: both loop modes (and --compare at --cpu-sized)", cmds_bench, r"^(device:|model_params|mode:|compare )", False),
    (4, "pipeline", "train_gpt.py end to end", cmds_pipeline,
     r"^(model_params|warmup_steps|train_clock|looping:on|train_steps|gptq_hessian_end|quantized |artifact |eval_warmup|"
     r"final_|quant_gap|eval_budget|val_tokens|lora_ttt_(work|phase)|OVER_)", False),
    (5, "causality", "causality check of the step-4 artifact", cmds_causality, r"^(stage:|causality )", True),
    (6, "losses", "the first training losses (20 on a GPU): device vs CPU float32", cmds_losses, r"^loss ", False),
]


class Ctx:
    def __init__(self, args):
        self.args = args
        self.size = SIZES["cpu" if args.cpu_sized else "gpu"]
        self.device = "cpu" if args.cpu_sized else "cuda"
        self.out = Path(args.out).absolute()
        self.work = Path(args.work).absolute() if args.work else REPO / "logs" / "gpu_check"
        self.artifact = self.work / "gpu_check.ptz"
        self.data, self.tokenizer = Path(args.data).absolute(), Path(args.tokenizer).absolute()
        self.projected: dict[int, tuple[dict, float]] = {}

    def env(self) -> dict[str, str]:
        """Environment of every step: the caller's minus any of our knobs, plus the data and the size."""
        known = set(knob_names())
        env = {k: v for k, v in os.environ.items() if k not in known}
        env.update(self.size["base"], DATA_PATH=str(self.data), TOKENIZER_PATH=str(self.tokenizer),
                   VOCAB_SIZE=str(vocab_size(self.tokenizer)))
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def knob_names() -> list[str]:
    sys.path.insert(0, str(REPO))
    import train_gpt as tg
    return [f.name.upper() for f in tg.fields(tg.Hyperparameters)]


def vocab_size(tokenizer: Path) -> int:
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()


def run_cmd(cmd: Cmd, env: dict, log_path: Path, timeout: float) -> tuple[str, str]:
    """Run one command into log_path; (status, output). The whole process group goes on timeout."""
    with open(log_path, "w") as f:
        f.write(f"$ {' '.join(f'{k}={v}' for k, v in cmd.env.items())} {shlex.join(cmd.argv)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd.argv, env={**env, **cmd.env}, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            return f"failed (could not start: {e})", ""
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # compile workers and torchrun children are in its group
            proc.wait()
            status = f"timeout ({timeout:.0f}s)"
            f.write(f"\n[gpu_check] killed after {timeout:.0f}s\n")
    return status, log_path.read_text(errors="replace")


def run_step(ctx, number, name, cmds_fn, keep, needs_artifact, deadline: float) -> Result:
    res = Result(number, name)
    if needs_artifact and not ctx.artifact.is_file():
        res.status = "skipped (no artifact: step 4 did not write one)"
        return res
    cap = ctx.size["caps"][number]
    step_end = min(time.monotonic() + cap, deadline)
    t0 = time.monotonic()
    statuses, cmds = [], cmds_fn(ctx)
    for cmd in cmds:
        left = step_end - time.monotonic()
        log = ctx.out / f"{number}_{name}_{cmd.label}.log"
        if left < 1:
            statuses.append(f"{cmd.label}: not run (time cap)")
            continue
        status, output = run_cmd(cmd, ctx.env(), log, left)
        res.logs.append(log.name)
        statuses.append(f"{cmd.label}: {status}")
        tag = f"[{cmd.label}] " if len(cmds) > 1 else ""
        res.lines += [tag + l for l in output.splitlines() if re.search(keep, l)]
        if status != "ok":  # the error is usually in the last lines
            res.lines += [f"{tag}{l}" for l in output.strip().splitlines()[-3:]]
    res.seconds = time.monotonic() - t0
    ok = all(s.endswith(": ok") for s in statuses)
    res.status = "ok" if ok else "; ".join(s for s in statuses if not s.endswith(": ok"))
    return res


# --- derived figures -----------------------------------------------------------------------------


def kv(line: str) -> dict[str, str]:
    return dict(w.split(":", 1) for w in line.split() if ":" in w)


def eval_projection(lines: list[str]) -> list[str]:
    """Each windowed eval stage's time scaled to the full sp8192 validation split on EVAL_WORLD GPUs
    (linear). The LoRA stage's time is not linear in the targets (on a few documents the longest one
    sets the step count; the phased SGD's prefix is fixed in documents): its line names the projection
    that models both."""
    val = next((int(kv(l)["val_tokens"]) for l in lines if l.startswith("val_tokens:")), 0)
    out = []
    for l in lines:
        if l.startswith("final_") and "eval_time" in l and val > 0:
            stage, sec = l.split()[0], float(kv(l)["eval_time"].rstrip("ms")) / 1000
            if stage == "final_lora_ttt":
                out.append(f"projected {stage} measured:{sec:.2f}s on {val} targets, not scaled: "
                           f"python3 tools/bench_eval.py --project --stages plain lora_ttt")
                continue
            scale = FULL_VAL_TOKENS / val / EVAL_WORLD
            out.append(f"projected {stage} measured:{sec:.2f}s on {val} targets -> "
                       f"{sec * scale:.1f}s on {FULL_VAL_TOKENS} targets over {EVAL_WORLD} GPUs")
    return out


def loss_table(lines: list[str], expected: int) -> tuple[list[str], str]:
    """Markdown rows (step, device, cpu, |diff|) and a verdict from the step-6 `loss` lines."""
    runs: dict[str, dict[int, float]] = {}
    for l in lines:
        label, _, rest = l.partition("] ")
        d = kv(rest)
        runs.setdefault(label.strip("["), {})[int(d["step"])] = float(d["value"])
    dev, cpu = runs.get("device", {}), runs.get("cpu_fp32", {})
    steps = sorted(set(dev) & set(cpu))
    if not steps:
        return [], "no losses to compare"
    rows = ["| step | device | cpu fp32 | abs diff |", "|---:|---:|---:|---:|"]
    rows += [f"| {s} | {dev[s]:.4f} | {cpu[s]:.4f} | {abs(dev[s] - cpu[s]):.4f} |" for s in steps]
    first, worst = abs(dev[steps[0]] - cpu[steps[0]]), max(abs(dev[s] - cpu[s]) for s in steps)
    ok = first <= LOSS_TOL_FIRST and worst <= LOSS_TOL_ANY and len(steps) == expected
    return rows, (f"steps_compared:{len(steps)} first_abs_diff:{first:.4f} max_abs_diff:{worst:.4f} "
                  f"verdict:{'ok' if ok else 'CHECK'} (bounds {LOSS_TOL_FIRST}/{LOSS_TOL_ANY})")


def figures(results: list[Result], loss_verdict: str) -> list[str]:
    """The headline numbers, one bullet each, from the steps' key lines."""
    out = []
    lines = {r.name: r.lines for r in results}
    for l in lines.get("compile", []):
        if l.startswith("compile target:"):
            f = kv(l)
            out.append(f"- compile {f['target']} looping:{f['looping']}: {f['compile_s']}s")
    for l in lines.get("bench", []):
        if l.startswith("[bench] mode:"):
            f = kv(l[len("[bench] "):])
            out.append(f"- {f['mode']}: {f['tokens/s_per_gpu']} tokens/s per GPU, {f['ms/step']} ms/step, "
                       f"peak {f['peak_mem_mib']} MiB, MFU {f['mfu']}")
        elif " compare mode:" in l:
            out.append(f"- {l}")
    pipe = lines.get("pipeline", [])
    out += [f"- {l}" for l in pipe if l.startswith(("train_steps:", "final_", "lora_ttt_work ", "artifact "))]
    out += [f"- {l}" for l in eval_projection(pipe)]
    out += [f"- {l}" for l in lines.get("causality", []) if l.startswith("causality ")]
    if loss_verdict:
        out.append(f"- losses {loss_verdict}")
    return out


def write_report(ctx, results: list[Result], started: float, done: bool) -> None:
    total = time.monotonic() - started
    md = ["# GPU check report", "",
          f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
          f"- size: {'cpu-sized (tiny config)' if ctx.args.cpu_sized else 'record config, one GPU'}; "
          f"data: `{ctx.data}`; tokenizer: `{ctx.tokenizer}`",
          f"- wall time: {total:.0f}s of a {ctx.args.cap:.0f}s cap{'' if done else ' (still running)'}",
          *(["- projected: " + ", ".join(f"step {n} {sec:.0f}s ({' '.join(f'{k}={v}' for k, v in c.items()) or 'no'} compiles)"
                                          for n, (c, sec) in ctx.projected.items())] if ctx.projected else []), "",
          "| step | what | status | seconds |", "|---:|---|---|---:|"]
    md += [f"| {r.step} | {r.name} | {r.status} | {r.seconds:.0f} |" for r in results]
    loss_lines = [l for r in results if r.name == "losses" for l in r.lines if "loss step:" in l]
    rows, verdict = loss_table(loss_lines, int(ctx.size["losses"]["ITERATIONS"]))
    md += ["", "## Figures", "", *(figures(results, verdict if rows else "") or ["(none yet)"])]
    for r in results:
        md += ["", f"## {r.step} {r.name}", "", f"status: {r.status}; logs: " + (", ".join(f"`{x}`" for x in r.logs) or "none")]
        body = list(r.lines)
        if r.name == "pipeline":
            body += eval_projection(r.lines)
        if r.name == "losses":
            md += ["", verdict, ""] + rows
            body = [l for l in body if "loss step:" not in l]
        if body:
            md += ["", "```", *body, "```"]
    (ctx.out / "report.md").write_text("\n".join(md) + "\n")


# --- plan, inputs, prepare ----------------------------------------------------------------------


def check_inputs(ctx) -> list[str]:
    """Every missing input as 'what: fix'."""
    missing = []
    for p in ("train_gpt.py", "tools/bench.py", "tools/causality_check.py"):
        if not (REPO / p).is_file():
            missing.append(f"{p}: the repository is incomplete")
    if not ctx.tokenizer.is_file():
        missing.append(f"tokenizer {ctx.tokenizer}: run python3 tools/gpu_check.py --prepare (or pass --tokenizer)")
    for split in ("val", "train"):
        if not sorted(ctx.data.glob(f"fineweb_{split}_*.bin")):
            missing.append(f"{split} shards in {ctx.data}: run python3 tools/gpu_check.py --prepare (or pass --data)")
    import importlib.util
    for mod in ("torch", "numpy", "sentencepiece", "brotli"):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"python module {mod}: pip install -r requirements.txt")
    return missing


def plan(ctx) -> list[str]:
    out = [f"gpu_check plan: size:{'cpu' if ctx.args.cpu_sized else 'gpu'} cap:{ctx.args.cap:.0f}s out:{ctx.out} work:{ctx.work}",
           f"data:{ctx.data} tokenizer:{ctx.tokenizer}",
           "env of every step: " + (" ".join(f"{k}={v}" for k, v in ctx.size["base"].items()) or "the record config,")
           + " DATA_PATH TOKENIZER_PATH VOCAB_SIZE (from the tokenizer)"]
    for number, name, title, cmds_fn, _, _ in STEPS:
        if number in ctx.steps:
            out.append(f"step {number} {name} (cap {ctx.size['caps'][number]}s): {title}")
            if not ctx.args.cpu_sized and number in ctx.projected:
                n, sec = ctx.projected[number]
                out.append(f"  compiles:{' '.join(f'{k}={v}' for k, v in n.items()) or 'none'} projected:{sec:.0f}s")
            for c in cmds_fn(ctx):
                env = " ".join(f"{k}={v}" for k, v in c.env.items())
                out.append(f"  {c.label}: {env + ' ' if env else ''}{shlex.join(Path(a).name if a == sys.executable else a for a in c.argv)}")
    return out


# Seconds per torch.compile of one graph on one H100/H200, cold: estimates, which step 2's measured
# compile_s lines check. The 04-13 record log compiled 8 training graphs (2 loop modes x 4 cu_seqlens
# buckets) in 322 s; an eval graph is the forward only (score) or a loss forward+backward (loss: the
# phased SGD's); a LoRA step graph is a forward+backward with the adapters' grouped matmuls (the 04-22
# record log: its LoRA TTT compile warmup took 87.4 s), the AdamW update one elementwise kernel. A
# graph an earlier step compiled at the same shapes costs WARM of that: Inductor's FX-graph and
# AOTAutograd caches persist across processes (Dynamo still traces).
COMPILE_S = {"train": 40.0, "score": 15.0, "loss": 30.0, "lora": 40.0, "adamw": 5.0}
WARM = 0.35
# The rest of each step at gpu size (estimates): start-up, model build, the timed work. Step 4: 10 load
# and scan, 5 warmup steps, 20 training, 15 GPTQ, 70 brotli of the 16 MB artifact (#1868's log: 67 s),
# 20 reload, 30 pre-quant, quantized and LoRA TTT stages on the ~100 validation documents (~1,200
# packed LoRA steps, 810 of them one 38,846-token document's, at ~20 ms). Step 5: 4 CPU evals of the
# LoRA stage and 4 plain ones on 2,048 targets (~20 s on 16 cores).
FIXED_S = {1: 8, 2: 12, 3: 12, 4: 170, 5: 20, 6: 45}


def lora_keys(h, final: bool) -> list[tuple]:
    """The graphs of lora_warmup: the LoRA step for one row, several rows in one lane and several lanes
    (row and lane counts dynamic), and AdamW for one row and for several."""
    if not h.lora_ttt_enabled:
        return []
    shape = (h.lora_batch_docs, h.lora_chunk_tokens, h.lora_rank, h.lora_targets, h.ngram_tilt)
    return [("lora", final, k, shape) for k in (1, 2, 3)] + [("adamw", k, shape[:3]) for k in (1, 2)]


def planned_compiles(ctx) -> dict[int, list[tuple]]:
    """Step -> the graphs it compiles on a GPU with FA3 (key: kind, loop mode, rows, bucket), from the
    steps' env and the data, with train_gpt's own bucket rules."""
    import numpy as np
    tg = tg_module()
    d = tg.Dist(0, 1, 0, tg.torch.device("cpu"))
    out = {}
    for number, _, _, cmds_fn, _, _ in STEPS:
        for c in cmds_fn(ctx) if number in ctx.steps else []:
            h = tg.Hyperparameters.from_env({**ctx.env(), **c.env})
            modes = [False, True] if h.looping_enabled else [False]
            final = h.looping_enabled
            B, hints = tg.eval_batch_windows(h, 1), [False, True] if h.ngram_tilt else [False]
            keys = []
            if number == 2:  # random tokens: BOS at 1/vocab, one bucket
                keys += [("train", m, h.train_batch_tokens // h.train_seq_len // 8, 1) for m in modes if "--eval-only" not in c.argv]
                keys += [("score", final, B, 1, t) for t in hints] + [("loss", final, n, 1) for n in tg.ttt_loss_rows(h, d)]
                keys += lora_keys(h, final)
            elif number == 3 and c.label == "bench":  # synthetic tokens hold no BOS: B segments
                rows = h.train_batch_tokens // h.train_seq_len // 8
                keys += [("train", m, rows, rows // tg.CU_BUCKET + 1) for m in modes]
            elif number == 4:
                rows = h.train_batch_tokens // h.train_seq_len // 8
                rate, disp = tg.bos_stats(tg.read_shard(tg.shard_paths(str(ctx.data), "train")[0]), h.train_seq_len)
                keys += [("train", m, rows, k) for m in modes for k in tg.varlen_buckets(rate, disp, rows, h.train_seq_len)]
                val = tg.load_val_tokens(str(ctx.data), h.eval_seq_len).numpy() == tg.BOS_ID
                for n, ks in sorted(tg.eval_varlen_buckets(h, d, np.asarray(val)).items()):
                    keys += [("score", final, n, k, t) for k in ks for t in hints] if n == B else []
                    keys += [("loss", final, n, k) for k in ks] if n in tg.ttt_loss_rows(h, d) else []
                keys += lora_keys(h, final)
            out.setdefault(number, []).extend(keys)
    return out


def projection(ctx) -> dict[int, tuple[dict, float]]:
    """Step -> ({kind: compiles}, projected seconds): FIXED_S plus each compile, WARM when an earlier
    step compiled the same graph."""
    seen, out = set(), {}
    plans = planned_compiles(ctx)
    for number in ctx.steps:
        keys = plans.get(number, [])
        counts = {k: sum(1 for x in keys if x[0] == k) for k in COMPILE_S if any(x[0] == k for x in keys)}
        sec = FIXED_S[number] + sum(COMPILE_S[k[0]] * (WARM if k in seen else 1.0) for k in keys)
        seen.update(keys)
        out[number] = counts, sec
    return out


def over_cap(ctx, proj) -> list[str]:
    """'step N: ...' for each step whose projected seconds exceed its cap, and the total over --cap."""
    caps = ctx.size["caps"]
    out = [f"step {n}: projected {sec:.0f}s > cap {caps[n]}s ({counts})" for n, (counts, sec) in proj.items() if sec > caps[n]]
    if sum(caps[n] for n in proj) > ctx.args.cap:
        out.append(f"steps {','.join(map(str, proj))}: caps sum to {sum(caps[n] for n in proj)}s > --cap {ctx.args.cap:.0f}s")
    return out


def prepare(args) -> int:
    """Shards of ../shared/data with the sp8192 tokenizer, and the tokenizer, into data/gpu_check."""
    sys.path.insert(0, str(REPO / "data"))
    import build_shards
    shared = Path(args.shared)
    inputs = [shared / "corpus" / "fineweb_docs_sample200.jsonl", shared / "corpus" / "enwiki_2015_wikiextractor_sample.jsonl"]
    tok = shared / "tokenizers" / "fineweb_8192_bpe.model"
    for p in [*inputs, tok]:
        if not p.is_file():
            print(f"error: {p} not found; pass --shared DIR holding corpus/ and tokenizers/", file=sys.stderr)
            return 2
    if sorted(DEFAULT_DATA.glob("fineweb_*.bin")):
        print(f"{DEFAULT_DATA} already holds shards; delete it to rebuild")
        return 0
    CHECK_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tok, DEFAULT_TOKENIZER)
    info = build_shards.build_shards(inputs, tok, DEFAULT_DATA, val_docs=args.val_docs, max_docs=args.max_docs,
                                     log=lambda line: print(line, flush=True))
    size = sum(p.stat().st_size for p in CHECK_DIR.rglob("*") if p.is_file())
    print(f"prepared {DEFAULT_DATA} bytes:{size} " + json.dumps(info, default=str)[:300])
    return 0


# --- internal steps (run in their own process) --------------------------------------------------


def tg_module():
    sys.path.insert(0, str(REPO))
    import train_gpt as tg
    return tg


def internal_versions() -> int:
    import platform
    import torch
    tg = tg_module()
    cuda = torch.cuda.is_available()
    nccl = None
    if cuda:
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else v
        except Exception as e:  # a build without NCCL still gets its report
            nccl = f"unavailable({type(e).__name__})"
    print(f"python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} "
          f"cudnn:{torch.backends.cudnn.version() if cuda else None} nccl:{nccl} cpus:{os.cpu_count()}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"device:cuda count:{torch.cuda.device_count()} gpu:{p.name.replace(' ', '_')} capability:{p.major}.{p.minor} "
              f"memory_gib:{p.total_memory / 2**30:.1f} bf16:{int(torch.cuda.is_bf16_supported())}")
    else:
        print("device:cpu")
    found = {}
    for mod in ("triton", "brotli"):
        try:
            found[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            found[mod] = "absent"
    print(f"fa3:{'present' if tg._fa3_func is not None else 'absent'} triton:{found['triton']} brotli:{found['brotli']}")
    print(f"attention:{'fa3' if tg._fa3_func is not None and cuda else 'sdpa'} compile:{'inductor' if cuda else 'off (cpu)'}")
    return 0


def internal_compile(eval_only: bool = False) -> int:
    """First and second call of the real training step per loop mode (unless eval_only), then of each
    graph eval_warmup compiles for the enabled stages, in its order: the scorer, the TTT / phased SGD
    loss per row count (ttt_loss_rows), the LoRA AdamW update and the LoRA step (lora_warmup). A
    line per graph group: first_s - second_s is its compile time."""
    import torch
    tg = tg_module()
    h = tg.Hyperparameters.from_env()
    d = tg.setup_distributed()
    cuda = d.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(d.device)
    trainer = tg.Trainer(h, d, tg.Logger(d, None), model, tg.shard_paths(h.dataset_dir, "train"))
    mode = f"fullgraph:1 compile:{int(h.compile and cuda)}"

    def timed(target: str, fn, shape: str) -> None:
        times = []
        for _ in range(2):
            t0 = trainer.sync_time()
            fn()
            times.append(trainer.sync_time() - t0)
        print(f"compile target:{target} looping:{int(model.looping_active)} {mode} first_s:{times[0]:.2f} "
              f"second_s:{times[1]:.3f} compile_s:{times[0] - times[1]:.2f} {shape}", flush=True)

    for looping in ([False, True] if h.looping_enabled and not eval_only else [] if eval_only else [False]):
        tg.set_looping(model, looping)
        timed("train_step", lambda: trainer.train_step(0, 1.0), f"micro_batch:{trainer.seqs_per_micro}x{h.train_seq_len}")
    tg.set_looping(model, h.looping_enabled)  # the artifact keeps the loop mode training ends in
    if h.ttt_enabled:  # as load_eval_model: TTT set-up first, then the eval callables
        tg.prepare_ttt(model, h)
    scorer, loss_fn = tg.eval_callables(h, model, d)
    n, ns = tg.eval_batch_windows(h, d.world_size), tg.ttt_loss_rows(h, d)
    x, y = torch.randint(0, h.vocab_size, (2, max([n] + ns), h.eval_seq_len)).to(d.device)

    def score(hints):
        with torch.no_grad(), tg.autocast_ctx(d.device):
            scorer(x[:n], y[:n], hints=y[:n] if hints else None)

    timed("eval_scorer", lambda: score(False), f"batch:{n}x{h.eval_seq_len}")
    if h.ngram_tilt:
        timed("eval_scorer_hints", lambda: score(True), f"batch:{n}x{h.eval_seq_len}")
    for k in ns:  # the TTT stage's SGD steps and the LoRA stage's phased global SGD
        def sgd_step():
            with tg.autocast_ctx(d.device):
                loss_fn(x[:k], y[:k]).backward()
            model.zero_grad(set_to_none=True)
        timed("sgd_loss", sgd_step, f"batch:{k}x{h.eval_seq_len}")
    if h.lora_ttt_enabled:
        grad = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # as eval_warmup and the stage run it: the graphs guard on it
        lora = tg.DocLoRA(h, model, h.lora_batch_docs, d.device)
        rows = torch.arange(h.lora_batch_docs, device=d.device)
        more = torch.ones(h.lora_batch_docs, dtype=torch.bool, device=d.device)

        def adamw():  # every row gathered: the graph with the row count dynamic (lora_warmup adds one row's)
            p = lora.gather(rows)
            p.grad = torch.zeros_like(p)
            lora.step(rows, p, more)

        timed("lora_adamw", adamw, f"rows:{h.lora_batch_docs}x{lora.p.size(1)}")
        timed("lora_step", lambda: tg.lora_warmup(h, model, d, h.ngram_tilt),
              f"one-row+one-lane+lanes rows:{h.lora_batch_docs} chunk:{h.lora_chunk_tokens} rank:{h.lora_rank}")
        for p, g in zip(model.parameters(), grad):
            p.requires_grad_(g)
    if cuda:
        print(f"compile peak_mem_mib:{torch.cuda.max_memory_allocated() / 2**20:.0f}")
    return 0


def internal_losses(device: str) -> int:
    """The Trainer's first ITERATIONS steps on DATA_PATH from the seed's init; one `loss` line per step."""
    import torch
    tg = tg_module()
    h = tg.Hyperparameters.from_env()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = True  # as train_gpt.py runs on CUDA
        torch.backends.cudnn.allow_tf32 = True
    d = tg.Dist(0, 1, 0, dev)
    torch.manual_seed(h.seed)
    model = tg.GPT(h).to(dev)  # built on the CPU first: the same initial weights on every device
    lines = []
    trainer = tg.Trainer(h, d, lambda msg, console=True: lines.append(msg), model, tg.shard_paths(h.dataset_dir, "train"))
    trainer.run(lambda m: None)
    for line in lines:
        if "train_loss:" in line:
            f = kv(line)
            print(f"loss step:{f['step'].split('/')[0]} value:{f['train_loss']} device:{device} "
                  f"autocast:{'bf16' if dev.type == 'cuda' else 'off'} compile:{int(h.compile and dev.type == 'cuda')}")
    return 0


# --- main ----------------------------------------------------------------------------------------


def parse_steps(spec: str) -> list[int]:
    out = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    if not out <= {s[0] for s in STEPS}:
        raise argparse.ArgumentTypeError(f"steps must lie in 1-{len(STEPS)}, got {spec!r}")
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="report folder (report.md + raw logs); created")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, check the inputs, run nothing")
    ap.add_argument("--prepare", action="store_true", help="build the step-4 data into data/gpu_check (CPU)")
    ap.add_argument("--cpu-sized", action="store_true", help="tiny config on CPU (what the tests run)")
    ap.add_argument("--cap", type=float, default=560.0, help="total seconds for all steps (default 560)")
    ap.add_argument("--steps", type=parse_steps, help="e.g. 3,6 or 1,4 (default: 1,2,4,5 on a GPU, all at --cpu-sized)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="shard folder (default: data/gpu_check/sp8192)")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="SentencePiece model of --data")
    ap.add_argument("--work", help="scratch for the step-4 log and artifact (default: logs/gpu_check)")
    ap.add_argument("--shared", default=str(SHARED), help="with --prepare: folder holding corpus/ and tokenizers/")
    ap.add_argument("--val-docs", type=int, default=100, help="with --prepare: FineWeb documents for validation")
    ap.add_argument("--max-docs", type=int, default=None, help="with --prepare: documents in total (default: all)")
    ap.add_argument("--internal", choices=["versions", "compile", "losses"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--eval-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.internal:
        return {"versions": internal_versions, "compile": lambda: internal_compile(args.eval_only),
                "losses": lambda: internal_losses(args.device)}[args.internal]()
    if args.prepare:
        return prepare(args)
    if not args.out:
        ap.error("--out is required (the report folder)")
    if not 0 < args.cap <= 560 and not args.cpu_sized:
        ap.error("--cap must be in (0, 560] seconds: the check is sized for a 9.5-minute slot")
    ctx = Ctx(args)
    ctx.steps = args.steps or ctx.size["default_steps"]
    missing = check_inputs(ctx)
    ctx.projected = {} if missing or args.cpu_sized else projection(ctx)
    if args.dry_run:
        for line in plan(ctx):
            print(line)
        for m in missing:
            print(f"missing: {m}")
        over = over_cap(ctx, ctx.projected) if ctx.projected else []
        for o in over:
            print(f"OVER_CAP {o}")
        print(f"inputs:{'ok' if not missing else 'MISSING'} budget:{'OVER' if over else 'ok' if not missing else 'unknown'}")
        return 2 if missing or over else 0
    if missing:
        print(f"error: missing {missing[0]}", file=sys.stderr)
        return 2
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    for p in [*ctx.work.glob("gpu_check*"), *ctx.out.glob("[1-6]_*"), ctx.out / "report.md"]:
        p.unlink(missing_ok=True)  # a rerun: RUN_ID=gpu_check is refused while its log exists; step 5 must read this run's artifact
    (ctx.out / "plan.txt").write_text("\n".join(plan(ctx)) + "\n")
    started = time.monotonic()
    deadline = started + args.cap
    results = [Result(n, name) for n, name, *_ in STEPS if n in ctx.steps]
    for i, (number, name, title, cmds_fn, keep, needs) in enumerate(s for s in STEPS if s[0] in ctx.steps):
        if deadline - time.monotonic() < 1:
            results[i].status = "not run (time cap)"
            continue
        print(f"gpu_check step:{number} {name}: {title}", flush=True)
        results[i] = run_step(ctx, number, name, cmds_fn, keep, needs, deadline)
        print(f"gpu_check step:{number} status:{results[i].status} seconds:{results[i].seconds:.0f}", flush=True)
        write_report(ctx, results, started, done=False)
    for p in ctx.work.glob("gpu_check*.txt"):  # the run log beside the report; the 16 MB artifact stays in --work
        shutil.copy2(p, ctx.out / f"4_pipeline_{p.name}")
    write_report(ctx, results, started, done=True)
    bad = [r for r in results if r.status != "ok"]
    print(f"gpu_check report:{ctx.out / 'report.md'} steps_ok:{len(results) - len(bad)}/{len(results)} "
          f"seconds:{time.monotonic() - started:.0f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
