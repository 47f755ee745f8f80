"""Is a records/ submission complete and consistent with its run logs? `python3 tools/records.py pack|check ...`

Build and check records/ submissions from finished run logs.

    python tools/records.py pack --name NAME --author A --github-id G [--track T] [--date D]
        [--code train_gpt.py] [--summary TEXT] [--reference ... | --reference-bpb X | --reference-seeds a,b]
        LOG [LOG ...]
    python tools/records.py check records/track_<track>/<date>_<name>

pack writes records/track_<track>/<date>_<name>/: README.md, submission.json, train_seed<seed>.log
per log, train_gpt.py (the counted code, packed for the logged config when the run counted it packed) and
train_gpt_readable.py. submission.json has the keys the accepted records use (seed_results keyed by
seed, val_bpb mean and sample std, seeds, name, author, github_id, date, track, hardware,
pytorch_version, bytes_total, compliance) plus our own (tools/submission.schema.json describes all).
Every number comes from the logs. It refuses (one line, nothing written) when a log is incomplete
or not a train_gpt.py log, when seeds differ in any setting other than SEED/RUN_ID, or when a log's
`code file_bytes:<n> sha256:<hex>` does not match the code being shipped. check re-derives
submission.json from the folder's logs and code and reports any difference.
"""
from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import lzma
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import pack_code  # noqa: E402
import runlog  # noqa: E402
import significance  # noqa: E402

SCHEMA_PATH = TOOLS / "submission.schema.json"
SIZE_LIMIT = 16_000_000
TIME_LIMIT_S = 600.0
PER_SEED_KNOBS = {"seed", "run_id"}  # the only settings allowed to differ between a record's seeds
DEFAULT_TRACK = "10min_16mb"  # the accepted records' `track`; their folders live in records/track_<track>/


class PackError(ValueError):
    """A reason not to pack; printed as one line."""


# --- JSON Schema (the subset submission.schema.json uses) -----------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, _TYPES[t])


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """Violations of a JSON Schema subset: type, enum, required, properties, additionalProperties
    (bool or schema), items, minItems, minimum, minLength, pattern. Empty list: valid."""
    errs = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(value, t) for t in types):
            return [f"{where}: expected {'/'.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        errs += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += schema_errors(v, props[k], f"{where}.{k}")
            elif extra is False:
                errs.append(f"{where}: unexpected key {k}")
            elif isinstance(extra, dict):
                errs += schema_errors(v, extra, f"{where}.{k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{where}: fewer than {schema['minItems']} items")
        for i, v in enumerate(value):
            errs += schema_errors(v, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errs.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _is_type(value, "number") and "minimum" in schema and value < schema["minimum"]:
        errs.append(f"{where}: {value} < {schema['minimum']}")
    return errs


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# --- code ------------------------------------------------------------------------------------

@dataclass
class Code:
    readable: bytes  # the source
    counted: bytes  # what the artifact counts: the packed wrapper (code_packed:1)
    ran_packed: bool  # the logs hash the packed wrapper (it was launched) rather than the source
    module: object  # the code loaded as a module: Hyperparameters, PRESETS


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def unpack_wrapper(src: bytes) -> bytes | None:
    """The source inside a self-extracting wrapper (tools/pack_code.py: the shipped source), else None.
    Reads today's latin-1 literal wrapper and the older base85 one."""
    m = re.match(rb'#coding:l1\nimport (lzma|brotli)[^"]*"""(.*)"""\.encode', src, re.S)  # the last close: the body may end in \"
    if m:
        kind, raw = m.group(1), ast.literal_eval('"""' + m.group(2).decode("latin-1") + '"""').encode("latin-1")
    else:
        m = re.match(rb'import (lzma|brotli),base64;exec\(\1\.decompress\(base64\.b85decode\(b"([^"]*)"\)', src)
        if not m:
            return None
        kind, raw = m.group(1), base64.b85decode(m.group(2))
    if kind == b"brotli":
        import brotli

        return brotli.decompress(raw)
    return lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])


def load_module(source: bytes, origin: str):
    """Import source text as a fresh module (train_gpt is import-safe)."""
    name = f"_shipped_train_gpt_{sha256(source)[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_loader(name, loader=None, origin=origin)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = origin
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    try:
        exec(compile(source, origin, "exec"), mod.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise PackError(f"{origin} does not import: {type(e).__name__}: {e}") from None
    return mod


def run_config(module, runs: list[runlog.RunLog]):
    """The config the first run logged (its `hp` lines) as the module's Hyperparameters: what the
    shipped code was packed for (tools/pack_code.py prunes by it)."""
    hp = runs[0].hp if runs else {}
    return module.Hyperparameters(**{f.name: module.parse_env_value(f.name.upper(), hp[f.name], f.type)
                                     for f in dataclasses.fields(module.Hyperparameters) if f.name in hp})


def match_code(path: Path, runs: list[runlog.RunLog], readable_path: Path | None = None) -> Code:
    """The code the runs logged, or PackError. A log hashes the file it ran (source or wrapper).
    A wrapper holds the stripped source; readable_path names the full source it was packed from."""
    if not path.is_file():
        raise PackError(f"code file {path} not found; pass --code <the train_gpt.py that produced the logs>")
    given = path.read_bytes()
    readable = unpack_wrapper(given) or given
    if readable is not given and readable_path is not None and readable_path.is_file():
        full = readable_path.read_bytes()
        mod = load_module(full, str(readable_path))
        if hasattr(mod, "FREE_KNOBS") and unpack_wrapper(packer(mod)(full, run_config(mod, runs))) == readable:
            readable = full
    module = load_module(readable, str(path))
    if readable is given and not hasattr(module, "FREE_KNOBS"):
        raise PackError(f"{path} cannot be packed (no FREE_KNOBS: an older train_gpt.py); pass --code with the packed "
                        f"train_gpt.py that ran")
    packed = given if readable is not given else packer(module)(readable, run_config(module, runs))
    for r in runs:
        if r.code_file_bytes is None:
            raise PackError(f"log {r.path} has no `code file_bytes:<n> sha256:<hex>` line; cannot tell which code produced it")
        ran = next((c for c in (readable, packed) if len(c) == r.code_file_bytes and sha256(c).startswith(r.code_sha256)), None)
        if ran is None:
            raise PackError(f"log {r.path} was produced by code file_bytes:{r.code_file_bytes} sha256:{r.code_sha256} but "
                            f"{path} is file_bytes:{len(readable)} sha256:{sha256(readable)[:16]}; pass --code with the file that ran")
        if r.artifact.get("code_packed", "1") != "1":
            raise PackError(f"log {r.path} counts an estimate of its code (code_packed:0: train_gpt.py ran without "
                            f"tools/pack_code.py beside it); rerun from the repository")
        if len(packed) != r.artifact["counted_code_bytes"]:
            raise PackError(f"log {r.path} has counted_code_bytes:{r.artifact['counted_code_bytes']} but the code packs to "
                            f"{len(packed)} bytes here (different lzma?); pack on the machine that ran")
    return Code(readable, packed, ran is not readable, module)


def packer(module):
    """What packs a readable source: its own pack_source (a train_gpt.py from before tools/pack_code.py), else ours."""
    return getattr(module, "pack_source", None) or pack_code.pack_source


# --- compliance ------------------------------------------------------------------------------

def ttt_single_pass(r: runlog.RunLog) -> bool:
    """The TTT stage logged one sequential pass: chunk counters strictly increase to n/n and the last
    running val_bpb is the stage's score. True when the run had no TTT stage."""
    ttt = [s for s in r.stages if s.startswith("ttt")]
    if not ttt:
        return True
    p = r.ttt_progress
    if not p or len({n for _, n, _ in p}) != 1:
        return False
    chunks = [c for c, _, _ in p]
    return (all(a < b for a, b in zip(chunks, chunks[1:])) and chunks[-1] == p[-1][1]
            and abs(p[-1][2] - r.stages[ttt[-1]].val_bpb) <= 1e-6)


def compliance(r: runlog.RunLog) -> dict[str, bool]:
    """The challenge's limits, from one log (names as in the accepted records' compliance blocks):
    the training data is read only inside 600 s (training loop and the GPTQ Hessian pass), evaluation
    inside 600 s, artifact inside 16,000,000 bytes, TTT scores before it adapts, and quantizer
    calibration uses training data (or there is none: RTN)."""
    train_end = max(r.train_time_s, r.hessian_end_s or 0.0)
    rtn = r.quantized.get("method") == "rtn"
    return {
        "train_under_600s": train_end <= TIME_LIMIT_S,
        "eval_under_600s": r.eval_used_s <= TIME_LIMIT_S and not r.eval_budget.get("over_budget"),
        "artifact_under_16mb": r.bytes_total <= SIZE_LIMIT and r.over_limit is None,
        "score_first_ttt": ttt_single_pass(r),
        "calibration_on_train_data": rtn or r.calib_data == "train",
    }


# --- checks across seeds ---------------------------------------------------------------------

def hardware(r: runlog.RunLog) -> str:
    return f"{r.derived.get('world_size', '?')}x{r.versions.get('gpu') or r.versions.get('device', '?')}"


def check_runs(runs: list[runlog.RunLog]) -> None:
    """PackError unless the logs are finished runs of one config on distinct seeds."""
    if not runs:
        raise PackError("no logs given")
    for r in runs:
        if r.record_log:
            raise PackError(f"log {r.path} is not a train_gpt.py log (no run_id line); pack takes this script's logs")
        if r.runs_in_file > 1:
            raise PackError(f"log {r.path} holds {r.runs_in_file} runs (a reused RUN_ID appends); keep only the last run")
        miss = r.missing()
        if miss:
            raise PackError(f"log {r.path} is incomplete: {miss[0]}")
        if r.bad_lines:
            raise PackError(f"log {r.path} has an unreadable line: {r.bad_lines[0][:80]!r}")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise PackError(f"seeds repeat across the logs: {seeds}")
    first = runs[0]
    for r in runs[1:]:
        keys = sorted((set(first.hp) | set(r.hp)) - PER_SEED_KNOBS)
        diff = [k for k in keys if first.hp.get(k) != r.hp.get(k)]
        if diff:
            k = diff[0]
            raise PackError(f"seeds used different configs: {k.upper()}={first.hp.get(k)!r} in {first.path} but "
                            f"{r.hp.get(k)!r} in {r.path} (only SEED and RUN_ID may differ)")
        for what, f in (("validation set (val_tokens, val_bytes)", lambda x: (x.val_tokens, x.val_bytes)),
                        ("code", lambda x: f"file_bytes:{x.code_file_bytes} sha256:{x.code_sha256}"),
                        ("hardware", hardware), ("torch version", lambda x: x.versions.get("torch")),
                        ("score stage", lambda x: x.score.name)):
            if f(first) != f(r):
                raise PackError(f"seeds differ in {what}: {f(first)} in {first.path} but {f(r)} in {r.path}")


# --- config diff and the command -------------------------------------------------------------

def _env_value(v: str) -> str:
    return {"True": "1", "False": "0"}.get(v, v)


def config_diff(hp: dict[str, str], module) -> list[tuple[str, str, str]]:
    """(field, logged value, default) for every hp that differs from the shipped code's defaults."""
    defaults = module.Hyperparameters()
    return [(k, v, str(getattr(defaults, k))) for k, v in sorted(hp.items())
            if k not in PER_SEED_KNOBS and hasattr(defaults, k) and v != str(getattr(defaults, k))]


def env_for_command(hp: dict[str, str], module) -> list[str]:
    """KEY=value settings that reproduce hp: PRESET plus what differs from the preset's values."""
    base = module.Hyperparameters(**getattr(module, "PRESETS", {}).get(hp.get("preset", ""), {}))
    out = [f"PRESET={hp['preset']}"] if hp.get("preset") else []
    for k, v in sorted(hp.items()):
        if k not in PER_SEED_KNOBS | {"preset"} and hasattr(base, k) and v != str(getattr(base, k)):
            out.append(f"{k.upper()}={shlex.quote(_env_value(v))}")
    return out


def launch(world_size: int, script: str) -> str:
    return f"torchrun --standalone --nproc_per_node={world_size} {script}" if world_size > 1 else f"python3 {script}"


# --- the submission --------------------------------------------------------------------------

def find_artifact(r: runlog.RunLog) -> Path | None:
    logged = Path(r.artifact.get("path", ""))
    for p in (logged, Path(r.path).parent / logged.name):
        if p.name and p.is_file():
            return p
    return None


def seed_entry(r: runlog.RunLog, artifact_sha: str | None) -> dict:
    """One seed_results value: the accepted records' keys first, then ours."""
    return {
        "val_bpb": r.score.val_bpb, "val_loss": r.score.val_loss, "artifact_bytes": r.artifact["bytes_total"],
        "steps": r.train_steps, "train_time_s": r.train_time_s, "eval_time_s": r.eval_used_s,
        "run_id": r.run_id, "log": f"train_seed{r.seed}.log", "counted_code_bytes": r.artifact["counted_code_bytes"],
        "bytes_model": r.artifact["bytes_model"], "gptq_hessian_end_s": r.hessian_end_s,
        "stages": {s.name: {"val_bpb": s.val_bpb, "val_loss": s.val_loss, "eval_time_s": s.eval_time_s}
                   for s in r.stages.values()},
        "artifact_sha256": artifact_sha,
    }


def build_submission(runs: list[runlog.RunLog], code: Code, meta: dict, artifact_shas: dict,
                     sig: dict | None) -> dict:
    """submission.json in the accepted records' shape (their keys first), with our evidence after."""
    runs = sorted(runs, key=lambda r: r.seed)
    bpb, nats = [r.score.val_bpb for r in runs], [r.score.val_loss for r in runs]
    comp = {k: all(compliance(r)[k] for r in runs) for k in compliance(runs[0])}
    comp["three_seeds"] = len(runs) >= 3
    (mb, sb), (ml, sl) = significance.mean_std(bpb), significance.mean_std(nats)
    return {
        "name": meta["name"], "author": meta["author"], "github_id": meta["github_id"],
        "date": meta["date"], "track": meta["track"], "val_bpb": mb, "val_bpb_std": sb, "val_loss": ml,
        "val_loss_std": sl, "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): seed_entry(r, artifact_shas.get(r.path)) for r in runs},
        "hardware": hardware(runs[0]), "pytorch_version": runs[0].versions.get("torch", ""),
        "bytes_total": max(r.artifact["bytes_total"] for r in runs),
        "technique_summary": meta.get("summary", ""), "compliance": comp, "compliant": all(comp.values()),
        "score_stage": f"final_{runs[0].score.name}", "val_tokens": runs[0].val_tokens, "val_bytes": runs[0].val_bytes,
        "python_version": runs[0].versions.get("python", ""),
        "code": {"file": "train_gpt.py", "bytes": len(code.counted), "sha256": sha256(code.counted),
                 "readable_file": "train_gpt_readable.py", "readable_sha256": sha256(code.readable),
                 "logged_sha256": runs[0].code_sha256},
        "significance": sig,
    }


def significance_block(runs: list[runlog.RunLog], ref: dict | None, margin_nats: float) -> dict | None:
    """compare() of our seeds against ref = {'desc', 'bpb': [..] or mean, 'nats': [..] or None}."""
    if ref is None:
        return None
    ours = significance.Scores("ours", [r.score.val_bpb for r in runs], [r.score.val_loss for r in runs],
                               runs[0].val_tokens, runs[0].val_bytes)
    target = (significance.Scores(ref["desc"], ref["bpb"], ref.get("nats")) if isinstance(ref["bpb"], list)
              else ref["bpb"])
    try:
        return {"reference": ref, **significance.compare(ours, target, margin_nats)}
    except ValueError as e:
        raise PackError(f"significance: {e}") from None


def _f(x: float | None, d: int = 1) -> str:
    return "" if x is None else f"{x:.{d}f}"


def render_readme(sub: dict, runs: list[runlog.RunLog], code: Code, folder_rel: str) -> str:
    runs = sorted(runs, key=lambda r: r.seed)
    stages = list(runs[0].stages)
    n = len(runs)
    std = f" ± {sub['val_bpb_std']:.5f} (sample std)" if n > 1 else ""
    lines = [f"# {sub['name']}", "",
             f"**val_bpb {sub['val_bpb']:.8f}**{std}, {n} seed{'s' * (n > 1)}, score stage `{sub['score_stage']}`; "
             f"val_loss {sub['val_loss']:.8f} nats/token. Largest artifact {sub['bytes_total']:,} bytes. "
             f"{sub['hardware']}, torch {sub['pytorch_version']}. Author {sub['author']} (@{sub['github_id']}), {sub['date']}.",
             ""]
    if sub["technique_summary"]:
        lines += [sub["technique_summary"], ""]
    lines += ["## Results", "", "Every number is read from the logs in this folder (`tools/records.py pack`).", "",
              "| seed | steps | train (s) | " + " | ".join(f"{s} val_bpb" for s in stages)
              + " | " + " | ".join(f"{s} eval (s)" for s in stages) + " | eval total (s) | bytes_total |",
              "|" + "---|" * (5 + 2 * len(stages))]
    for r in runs:
        lines.append(f"| {r.seed} | {r.train_steps} | {_f(r.train_time_s)} | "
                     + " | ".join(f"{r.stages[s].val_bpb:.8f}" for s in stages) + " | "
                     + " | ".join(_f(r.stages[s].eval_time_s) for s in stages)
                     + f" | {_f(r.eval_used_s)} | {r.bytes_total:,} |")
    if n > 1:
        for label, fn in (("mean", lambda xs: significance.mean_std(xs)[0]), ("std", lambda xs: significance.mean_std(xs)[1])):
            lines.append(f"| {label} | | | " + " | ".join(f"{fn([r.stages[s].val_bpb for r in runs]):.8f}" for s in stages)
                         + " |" * (len(stages) + 2) + " |")
    c = sub["compliance"]
    evidence = {
        "train_under_600s": "max over seeds of the timed training loop and the GPTQ Hessian pass end: "
                            + _f(max(max(r.train_time_s, r.hessian_end_s or 0) for r in runs)) + " s",
        "eval_under_600s": f"largest `eval_budget used`: {_f(max(r.eval_used_s for r in runs))} s",
        "artifact_under_16mb": f"largest bytes_total: {sub['bytes_total']:,} (limit 16,000,000)",
        "score_first_ttt": "TTT logged one sequential scored pass (ttt_progress to n/n equals final_ttt), or no TTT",
        "calibration_on_train_data": "GPTQ Hessians logged `calib_data:train`, or RTN (no calibration)",
        "three_seeds": f"{n} seed{'s' * (n > 1)}",
    }
    lines += ["", "## Compliance", "", "| check | ok | evidence |", "|---|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} | {evidence[k]} |" for k, v in c.items()]
    sig = sub["significance"]
    if sig:
        b, t = sig["bpb"], sig["nats"]
        kind = "Welch one-sided" if b["test"] == "welch" else "one-sample one-sided (reference mean only)"
        lines += ["", "## Significance", "",
                  f"Reference: {sig['reference']['desc']}. Test: {kind}, H1: reference − ours > margin.", "",
                  "| unit | margin | ours mean | reference mean | t | df | p | p < 0.01 |", "|---|---|---|---|---|---|---|---|"]
        for unit, r, m in (("bpb", b, sig["margin_bpb"]), ("nats", t, sig["margin_nats"])):
            lines.append(f"| {unit} | {m:.6f} | {r['ours_mean']:.8f} | {r['ref_mean']:.8f} | {r['t']:.3f} | {r['df']:.2f} "
                         f"| {r['p']:.3g} | {'yes' if r['clears_p_0_01'] else 'no'} |")
        lines += ["", f"BPB per nat = val_tokens / (val_bytes · ln 2) = {sig['bpb_per_nat']:.8f} "
                      f"(val_tokens {sig['val_tokens']}, val_bytes {sig['val_bytes']})."]
    diff = config_diff(runs[0].hp, code.module)
    lines += ["", "## Configuration", "", "Settings that differ from `Hyperparameters()` defaults in the shipped code:", ""]
    if diff:
        lines += ["| knob | value | default |", "|---|---|---|"] + [f"| `{k.upper()}` | `{v}` | `{d}` |" for k, v, d in diff]
    else:
        lines.append("none (the record config).")
    env = " ".join(env_for_command(runs[0].hp, code.module))
    ws = int(runs[0].derived.get("world_size", "1"))
    script = f"{folder_rel}/train_gpt.py"
    seeds = " ".join(str(r.seed) for r in runs)
    lines += ["", "## Reproduce", "", "From the repository root, with the data the logs name:", "", "```bash",
              f"for SEED in {seeds}; do",
              f"  SEED=$SEED RUN_ID={sub['name']}_seed$SEED {env + ' ' if env else ''}{launch(ws, script)}",
              "done", "```", "",
              f"`train_gpt.py` is the counted code ({len(code.counted):,} bytes, the logged `counted_code_bytes`); "
              f"`train_gpt_readable.py` is its source. The logs print `code sha256:{runs[0].code_sha256}`, the hash of "
              f"{'train_gpt.py' if code.ran_packed else 'train_gpt_readable.py'}, "
              "the file that ran."]
    return "\n".join(lines) + "\n"


# --- pack / check ----------------------------------------------------------------------------

def prepare(log_paths: list[str], code_path: Path, meta: dict, ref: dict | None, margin_nats: float,
            artifact_shas: dict | None = None, readable_path: Path | None = None):
    """Parse and check everything; (runs, code, submission). Raises PackError."""
    try:
        runs = [runlog.read_log(p) for p in log_paths]
    except FileNotFoundError as e:
        raise PackError(str(e)) from None
    check_runs(runs)
    code = match_code(code_path, runs, readable_path)
    if artifact_shas is None:
        artifact_shas = {}
        for r in runs:
            p = find_artifact(r)
            if p is not None:
                if p.stat().st_size != r.artifact["bytes_model"]:
                    raise PackError(f"artifact {p} is {p.stat().st_size} bytes but log {r.path} wrote bytes_model:"
                                    f"{r.artifact['bytes_model']}; it was overwritten since")
                artifact_shas[r.path] = sha256(p.read_bytes())
    sub = build_submission(runs, code, meta, artifact_shas, significance_block(runs, ref, margin_nats))
    errs = schema_errors(sub, load_schema())
    if errs:
        raise PackError(f"submission.json would not match its schema: {errs[0]}")
    return runs, code, sub


def pack(log_paths: list[str], code_path: Path, meta: dict, records_dir: Path, ref: dict | None = None,
         margin_nats: float = significance.DEFAULT_MARGIN_NATS) -> Path:
    """Write the record folder (staged, then renamed, so a failure leaves nothing behind)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", meta["name"]):
        raise PackError(f"--name {meta['name']!r} must be letters, digits, '_', '.', '-'")
    meta = {**meta, "track": meta["track"].removeprefix("track_")}
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", meta["track"]):
        raise PackError(f"--track {meta['track']!r} must be letters, digits, '_', '.', '-' (e.g. {DEFAULT_TRACK})")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["date"]):
        raise PackError(f"--date {meta['date']!r} must be YYYY-MM-DD")
    if any(p.exists() and not p.is_dir() for p in (records_dir, records_dir / f"track_{meta['track']}")):
        raise PackError(f"--records-dir {records_dir} (or its track_{meta['track']}) is a file, not a folder; "
                        f"give the folder that holds track_<track>/")
    runs, code, sub = prepare(log_paths, code_path, meta, ref, margin_nats)
    parent = records_dir / f"track_{meta['track']}"
    final = parent / f"{meta['date']}_{meta['name']}"
    if final.exists():
        raise PackError(f"{final} already exists; choose another --name or remove it")
    try:
        rel = final.resolve().relative_to(REPO)
    except ValueError:
        rel = final
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    try:
        for r in runs:
            shutil.copyfile(r.path, stage / f"train_seed{r.seed}.log")
        (stage / "train_gpt.py").write_bytes(code.counted)
        (stage / "train_gpt_readable.py").write_bytes(code.readable)
        (stage / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (stage / "README.md").write_text(render_readme(sub, runs, code, str(rel)), encoding="utf-8")
        os.rename(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def _differences(a, b, where: str = "$") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: submission.json has {a!r}, the logs give {b!r}"]


def check(folder: Path) -> list[str]:
    """Problems with a record folder: schema violations and values the logs/code do not reproduce."""
    p = folder / "submission.json"
    if not p.is_file():
        return [f"{p} not found"]
    try:
        sub = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{p} is not JSON: {e}"]
    errs = schema_errors(sub, load_schema())
    if errs:
        return errs
    readable = folder / sub["code"]["readable_file"]
    if not readable.is_file() or sha256(readable.read_bytes()) != sub["code"]["readable_sha256"]:
        errs.append(f"{readable} is missing or differs from the code's readable_sha256")
    meta = {k: sub[k] for k in ("name", "author", "github_id", "date", "track")} | {"summary": sub["technique_summary"]}
    seeds = sub["seed_results"].values()
    logs = [str(folder / s["log"]) for s in seeds]
    shas = {str(folder / s["log"]): s["artifact_sha256"] for s in seeds}
    sig = sub["significance"]
    try:
        _, _, again = prepare(logs, folder / sub["code"]["file"], meta, sig and sig["reference"],
                              sig["margin_nats"] if sig else significance.DEFAULT_MARGIN_NATS, shas, readable)
    except PackError as e:
        return errs + [str(e)]
    return errs + _differences(sub, again)


def reference_from_args(a) -> dict | None:
    if a.reference:
        s = significance.load_scores([a.reference])
        return {"desc": a.reference, "bpb": s.bpb, "nats": s.nats}
    if a.reference_seeds:
        vals = significance.parse_seeds(a.reference_seeds)
        return {"desc": f"seeds {a.reference_seeds}", "bpb": vals, "nats": None}
    if a.reference_bpb is not None:
        return {"desc": f"mean {a.reference_bpb}", "bpb": a.reference_bpb, "nats": None}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write records/<track>/<date>_<name>/ from run logs")
    p.add_argument("logs", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--track", default=DEFAULT_TRACK, help="the submission's track; the folder is records/track_<track>/")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--code", default=str(REPO / "train_gpt.py"), help="the train_gpt.py (or packed wrapper) that ran")
    p.add_argument("--summary", default="", help="technique summary (one paragraph)")
    p.add_argument("--records-dir", default=str(REPO / "records"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reference", help="reference records folder for the significance test")
    g.add_argument("--reference-seeds", help="comma-separated reference val_bpb per seed")
    g.add_argument("--reference-bpb", type=float, help="reference mean val_bpb")
    p.add_argument("--margin-nats", type=float, default=significance.DEFAULT_MARGIN_NATS)
    c = sub.add_parser("check", help="re-derive a record folder's submission.json from its logs")
    c.add_argument("folder")
    a = ap.parse_args(argv)
    if a.cmd == "check":
        problems = check(Path(a.folder))
        for line in problems:
            print(f"mismatch: {line}")
        print(f"check:{'ok' if not problems else 'failed'} folder:{a.folder}")
        return 1 if problems else 0
    meta = {"name": a.name, "author": a.author, "github_id": a.github_id, "track": a.track, "date": a.date,
            "summary": a.summary}
    try:
        ref = reference_from_args(a)
        out = pack(a.logs, Path(a.code), meta, Path(a.records_dir), ref, a.margin_nats)
    except (PackError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    print(f"packed:{out} seeds:{len(s['seeds'])} val_bpb:{s['val_bpb']:.8f} std:{s['val_bpb_std']:.8f} "
          f"bytes_total:{s['bytes_total']} compliant:{int(s['compliant'])}")
    for k, v in s["compliance"].items():
        if not v:
            print(f"warning: {k} is false", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
