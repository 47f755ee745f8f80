"""What did these runs score, as one table? `python3 tools/runlog.py logs/*.txt`

Parse a train_gpt.py log (logs/<RUN_ID>.txt) or an accepted record's log into numbers; render run tables.

    python tools/runlog.py logs/*.txt [--csv out.csv] [--md out.md]   # table sorted by score
    python tools/runlog.py logs/mine.txt records/track_10min_16mb/<record>/train_seed42.log

The score of a run is its LAST `final_<stage>` line (final_lora_ttt in the record config; final_ttt,
final_sliding or final_quantized when the later stages are off); any stage name is accepted. A run is complete when its `eval_budget` line
(written after the last eval stage) is present, every stage it lists has its final_<stage> line and
the last line is whole. A log file that holds several runs (a reused RUN_ID appends) is read as its
last run.

A log without a `run_id:` line is read as a record script's log (see parse_record_log): its score
is the last line that carries a val_bpb and is not a periodic `N/M val_loss ... val_bpb` line,
whatever the stage is called (quantized_ttt, quantized_ttt_phased, final_int6_sliding_window_exact, ...).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# key:value pairs; a value runs to the next " key:" so values may hold spaces (gpu names, lists).
_KEY = re.compile(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*):")
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
NON_EVAL_TIMES = ("load", "warmup")  # eval_budget stages that are not final_<stage> lines


def kv(line: str) -> dict[str, str]:
    """`a:1 b:x y c:[1, 2]` -> {'a': '1', 'b': 'x y', 'c': '[1, 2]'}."""
    keys = list(_KEY.finditer(line))
    return {m.group(1): line[m.end():(keys[i + 1].start() if i + 1 < len(keys) else len(line))].strip()
            for i, m in enumerate(keys)}


def num(s: str) -> float:
    """Leading number of a value such as '16541ms', '24.5s' or '+0.0005'; ValueError otherwise."""
    m = _NUM.match(s.strip())
    if not m:
        raise ValueError(f"not a number: {s!r}")
    return float(m.group(0))


@dataclass
class Stage:
    name: str
    val_loss: float | None  # nats per token
    val_bpb: float
    eval_time_s: float | None  # None when the line has no eval_time


@dataclass
class RunLog:
    path: str = ""
    runs_in_file: int = 0
    run_id: str = ""
    hp: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    code_file_bytes: int | None = None  # size of the file that ran (source or packed wrapper), as on disk
    code_sha256: str = ""  # hex prefix as logged
    val_tokens: int | None = None
    val_bytes: int | None = None
    model_params: int | None = None
    train_points: list[tuple[int, float, float]] = field(default_factory=list)  # step, train_loss, train_time_s
    val_points: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, val_loss, val_bpb, train_time_s
    looping_step: int | None = None
    train_steps: int | None = None
    train_time_s: float | None = None
    train_budget_s: float | None = None
    hessian_end_s: float | None = None  # training clock + GPTQ Hessian pass (reads training data)
    hessian_cap_s: float | None = None
    calib_data: str = ""  # gptq_hessian_end ... calib_data:<source>, when logged
    quantized: dict[str, str] = field(default_factory=dict)
    artifact: dict = field(default_factory=dict)  # counted_code_bytes/bytes_model/bytes_total as int, path, ...
    stages: dict[str, Stage] = field(default_factory=dict)  # in log order
    ttt_progress: list[tuple[int, int, float]] = field(default_factory=list)  # chunk, n_chunks, running val_bpb
    eval_budget: dict = field(default_factory=dict)  # used, limit, stages (as logged), over_budget
    over_limit: int | None = None
    bad_lines: list[str] = field(default_factory=list)
    cut_line: str | None = None  # a last line without its newline: the writer stopped mid-line
    record_log: bool = False  # written by a record script of the challenge, not by train_gpt.py

    @property
    def seed(self) -> int | None:
        return int(self.hp["seed"]) if self.hp.get("seed", "").isdigit() else None

    @property
    def score(self) -> Stage | None:
        """The last final_<stage> in the log: what the run is ranked and submitted by."""
        return list(self.stages.values())[-1] if self.stages else None

    @property
    def eval_used_s(self) -> float | None:
        return num(self.eval_budget["used"]) if "used" in self.eval_budget else None

    @property
    def bytes_total(self) -> int | None:
        return self.artifact.get("bytes_total")

    @property
    def eval_stage_names(self) -> list[str]:
        """Stages the eval_budget line says ran (without load/warmup)."""
        return [s for s in self.eval_budget.get("stages", "").split("+") if s and s not in NON_EVAL_TIMES]

    def missing(self, need_training: bool = True) -> list[str]:
        """Why this log is not a finished run; empty when it is."""
        if self.record_log:  # a record's log: finished when it has a score and ends with a whole line
            out = ["no line with a val_bpb after training (no score)"] if self.score is None else []
            return out + ([f"the last line stops mid-line: {self.cut_line[:60]!r}"] if self.cut_line is not None else [])
        out = []
        if not self.run_id:
            return ["no run_id line (not a train_gpt.py log)"]
        if not self.hp:
            out.append("no hp dump")
        if self.val_tokens is None:
            out.append("no val_tokens line")
        if need_training:
            if self.train_steps is None:
                out.append("no train_steps line (training did not finish, or an EVAL_ARTIFACT run)")
            if "pre_quant" not in self.stages:
                out.append("no final_pre_quant line")
        if not self.artifact:
            out.append("no artifact line")
        if not self.eval_budget:
            out.append("no eval_budget line (the evaluation did not finish)")
        for s in self.eval_stage_names:
            if s not in self.stages:
                out.append(f"eval_budget lists {s} but there is no final_{s} line")
        if self.cut_line is not None:
            out.append(f"the last line stops mid-line: {self.cut_line[:60]!r}")
        if self.score is not None and not math.isfinite(self.score.val_bpb):
            out.append(f"final_{self.score.name} val_bpb is {self.score.val_bpb}, not a score")
        return out

    @property
    def complete(self) -> bool:
        return not self.missing()


def _parse_line(r: RunLog, line: str) -> None:
    head = line.split(" ", 1)[0]
    f = kv(line)
    if head.startswith("run_id:"):
        r.run_id = f["run_id"]
    elif head == "hp":
        name, _, value = line[3:].partition(":")
        r.hp[name] = value
    elif head == "derived":
        r.derived = f
    elif head == "versions":
        r.versions = f
    elif head == "code":  # `bytes:` in logs written before the counted/file names were split
        r.code_file_bytes, r.code_sha256 = int(f.get("file_bytes") or f["bytes"]), f["sha256"]
    elif head.startswith("val_tokens:"):
        r.val_tokens, r.val_bytes = int(f["val_tokens"]), int(f["val_bytes"])
    elif head.startswith("model_params:"):
        r.model_params = int(f["model_params"])
    elif head.startswith("step:") and "train_loss" in f:
        r.train_points.append((int(f["step"].split("/")[0]), float(f["train_loss"]), num(f["train_time"]) / 1000))
    elif head.startswith("step:") and "val_bpb" in f:
        r.val_points.append((int(f["step"].split("/")[0]), float(f["val_loss"]), float(f["val_bpb"]),
                             num(f["train_time"]) / 1000))
    elif head == "looping:on":
        r.looping_step = int(f["step"])
    elif head.startswith("train_steps:"):
        r.train_steps, r.train_time_s = int(f["train_steps"]), num(f["train_time"]) / 1000
        r.train_budget_s = num(f["budget"])
    elif head.startswith("gptq_hessian_end:"):
        r.hessian_end_s, r.hessian_cap_s = num(f["gptq_hessian_end"]), num(f["cap"])
        r.calib_data = f.get("calib_data", "")
    elif head == "quantized":
        r.quantized = f
    elif head == "artifact":  # `bytes_code:` in logs written before counted_code_bytes
        f["counted_code_bytes"] = f.pop("counted_code_bytes", None) or f.pop("bytes_code")
        r.artifact = {**f, **{k: int(f[k]) for k in ("counted_code_bytes", "bytes_model", "bytes_total")}}
    elif head.startswith("final_") and "val_bpb" in f:
        name = head[len("final_"):]
        r.stages[name] = Stage(name, float(f["val_loss"]), float(f["val_bpb"]), num(f["eval_time"]) / 1000)
    elif head == "ttt_progress":
        c, n = f["chunk"].split("/")
        r.ttt_progress.append((int(c), int(n), float(f["val_bpb"])))
    elif head == "eval_budget":
        num(f["used"])
        r.eval_budget = {**f, "stages": f.get("stages", "").split(" ")[0], "over_budget": "OVER_BUDGET" in line.split()}
    elif head == "OVER_LIMIT":
        r.over_limit = int(line.split()[2])


def parse_log(text: str, path: str = "") -> RunLog:
    """Parse the last run in a log's text. Lines that do not parse are kept in bad_lines and otherwise
    ignored; so is a last line without its newline (cut off mid-write: every log line ends in one)."""
    lines = text.splitlines()
    partial = lines.pop() if lines and not text.endswith("\n") else None
    starts = [i for i, l in enumerate(lines) if l.startswith("run_id:")]
    if not starts and lines:
        r = parse_record_log(lines, path)
        r.cut_line = partial
        return r
    r = RunLog(path=path, runs_in_file=len(starts))
    r.cut_line = partial
    for line in lines[starts[-1] if starts else 0:]:
        try:
            _parse_line(r, line.rstrip("\n"))
        except (KeyError, ValueError, IndexError):
            r.bad_lines.append(line)
    return r


# --- logs of the challenge's record scripts ---------------------------------------------------------
# Their formats, as published in records/track_10min_16mb/: a `Hyperparameters:` block of indented
# `key: value` lines; step lines `N/M train_loss: X train_time: 9.7m tok/s: ...` (the baseline's:
# `step:N/M train_loss:X train_time:Tms step_avg:...`); periodic validation `N/M val_loss: X val_bpb: Y`;
# `stopping_early: ... train_time: Tms step: N/M`; stage lines `<name> val_loss:X val_bpb:Y eval_time:Tms`
# named differently by every record. Some prefix each line with a unix timestamp.

_STAMP = re.compile(r"^\d{9,}(?:\.\d+)? ")
_FIELD = re.compile(r"([A-Za-z_]+)[:=]\s*([^\s,]+)")
_STEP = re.compile(r"^(?:step:\s*)?(\d+)/(\d+)$")
_SCORE_KEY = re.compile(r"\b(?:val_loss|val_bpb)[:=]")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def seconds(v: str) -> float:
    """'588119ms', '9.7m', '24.5s' -> seconds; a number without a unit is milliseconds."""
    m = _NUM.match(v.strip())
    if not m:
        raise ValueError(f"not a time: {v!r}")
    return float(m.group(0)) * _UNIT_S.get(v.strip()[m.end():], 1e-3)


def _time_at(points: list[tuple[int, float]], step: int) -> float | None:
    """Training time at a step, linear between the logged (step, seconds) points; None outside them."""
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return points[0][1] if len(points) == 1 and points[0][0] == step else None


def parse_record_log(lines: list[str], path: str = "") -> RunLog:
    """A record script's log: hyperparameters, the training curve, periodic val_bpb and every stage line.
    Validation lines carry no training time; it is interpolated from the step lines (same step, or
    between two). The run is labelled <folder>/<file> (record folders hold one log per seed)."""
    p = Path(path)
    r = RunLog(path=path, runs_in_file=1, record_log=True)
    in_hp, stop = False, None
    for raw in lines:
        line = _STAMP.sub("", raw, count=1)
        if in_hp:
            m = re.match(r"^\s+(\w+):\s?(.*)$", line)
            if m:
                r.hp[m.group(1)] = m.group(2).strip()
                continue
            in_hp = False
        if line.startswith("Hyperparameters:"):
            in_hp = True
            continue
        f = dict(_FIELD.findall(line))
        try:
            sk = _SCORE_KEY.search(line)
            if sk and "val_bpb" in f:
                name = line[:sk.start()].strip().rstrip(":").strip()
                step = _STEP.match(name)
                if step:
                    t = f.get("train_time")
                    r.val_points.append((int(step.group(1)), float(f["val_loss"]), float(f["val_bpb"]),
                                         seconds(t) if t else None))
                else:
                    name = re.sub(r"\s+", "_", name) or "score"
                    r.stages.pop(name, None)  # a repeated name moves to the end: the last line is the score
                    r.stages[name] = Stage(name, float(f["val_loss"]) if "val_loss" in f else None, float(f["val_bpb"]),
                                           seconds(f["eval_time"]) if "eval_time" in f else None)
                continue
            head = line.split(" ", 1)[0]
            step = _STEP.match(head)
            if step and "train_loss" in f:
                r.train_points.append((int(step.group(1)), float(f["train_loss"]), seconds(f["train_time"])))
            elif head.startswith("stopping_early") and "step" in f:
                stop = (int(f["step"].split("/")[0]), seconds(f["train_time"]))
            elif head.startswith("val_tokens"):
                r.val_tokens = int(f["val_tokens"])
            elif head.startswith("model_params"):
                r.model_params = int(f["model_params"])
            elif line.startswith("Total submission size"):
                r.artifact["bytes_total"] = int(_NUM.search(line.split(":", 1)[1]).group(0))
        except (KeyError, ValueError, IndexError, AttributeError):
            continue  # record logs hold much else (tracebacks, warnings, progress); only these lines are read
    r.run_id = f"{p.parent.name}/{p.stem}" if path else r.hp.get("run_id", "")
    if stop:
        r.train_steps, r.train_time_s = stop
    elif r.train_points:
        r.train_steps, r.train_time_s = r.train_points[-1][0], r.train_points[-1][2]
    clock = sorted({(0, 0.0), *((s, t) for s, _, t in r.train_points), *([stop] if stop else [])})
    r.val_points = [(s, l, b, t if t is not None else _time_at(clock, s)) for s, l, b, t in r.val_points]
    return r


def read_log(path: str | Path) -> RunLog:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"log {p} not found (or not a file); give the path of a run's .txt log")
    return parse_log(p.read_text(encoding="utf-8", errors="replace"), str(p))


def nats_to_bpb_factor(val_tokens: int, val_bytes: int) -> float:
    """bpb = nats_per_token * tokens / (bytes * ln 2): the factor multiplying nats per token."""
    return val_tokens / (val_bytes * math.log(2))


# --- tables ------------------------------------------------------------------------------------

def _fmt(v, digits: int = 6) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_rows(runs: list[RunLog], labels: dict[str, str] | None = None,
               status: dict[str, str] | None = None) -> tuple[list[str], list[list]]:
    """Header and rows (raw values) sorted by the score's val_bpb; runs without a score go last.
    labels: run path -> overrides text; status: run path -> status override (e.g. 'failed rc=3')."""
    labels, status = labels or {}, status or {}
    stage_names = []
    for r in runs:
        stage_names += [s for s in r.stages if s not in stage_names]
    header = (["rank", "run_id", "overrides", "status", "seed", "steps", "train_s"]
              + [f"{s}_bpb" for s in stage_names] + ["score_stage", "score_bpb", "score_loss", "bytes_total", "eval_s"])
    def scored(r: RunLog) -> bool:
        return r.score is not None and math.isfinite(r.score.val_bpb)

    # NaN compares false both ways and would scramble the order: runs without a finite score go last.
    key = lambda r: (not scored(r) or not r.complete, r.score.val_bpb if scored(r) else math.inf)  # noqa: E731
    rows = []
    for i, r in enumerate(sorted(runs, key=key), 1):
        st = status.get(r.path) or ("ok" if r.complete else "incomplete")
        if r.over_limit is not None and st.startswith("ok"):  # scored, but it cannot be submitted
            st = f"OVER_LIMIT by {r.over_limit} bytes" + st[2:]
        if not scored(r):  # marked whatever the caller's status says
            st = f"{st} (score {r.score.val_bpb})" if r.score else f"{st} (no score)"
        sc = r.score
        rows.append([i, r.run_id or Path(r.path).stem, labels.get(r.path, ""), st, r.seed, r.train_steps, r.train_time_s]
                    + [r.stages[s].val_bpb if s in r.stages else None for s in stage_names]
                    + [sc.name if sc else None, sc.val_bpb if sc else None, sc.val_loss if sc else None,
                       r.bytes_total, r.eval_used_s])
    return header, rows


def render_markdown(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(v, 8 if h.endswith(("_bpb", "_loss")) else 1).replace("|", "\\|")
                                     for h, v in zip(header, row)) + " |")
    return "\n".join(out) + "\n"


def render_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--csv", help="also write the table as CSV here")
    ap.add_argument("--md", help="also write the markdown table here")
    a = ap.parse_args(argv)
    try:
        runs = [read_log(p) for p in a.logs]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header, rows = table_rows(runs)
    md = render_markdown(header, rows)
    print(md, end="")
    try:
        for dest, text in ((a.md, md), (a.csv, render_csv(header, rows) if a.csv else "")):
            if dest:
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                Path(dest).write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}; choose another --csv/--md path", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
