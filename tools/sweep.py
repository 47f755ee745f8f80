"""How do runs of train_gpt.py over lines of env overrides compare? `./run.sh sweep FILE` (`python3 tools/sweep.py FILE`)

Run train_gpt.py once per line of env overrides and tabulate the runs from their logs.

    ./run.sh sweep FILE [--steps N] [--out DIR] [--nproc N] [--dry-run] [--plot]

FILE has one run per line: `KEY=VALUE` settings (shell quoting works), `#` comments, blank lines
skipped. Grid: a value written `{a,b,c}` expands its line into one run per value, and several such
values give every combination (the first varies slowest), so `NUM_LAYERS={10,11} SEED={1,2,3}` is
six runs. Precedence: your environment < --steps N (ITERATIONS=N MAX_WALLCLOCK_SECONDS=0, fixed-step
mode) < the line. Every run is checked with Hyperparameters.from_env before the first one starts.

Run i gets RUN_ID=<file stem>_<i> (zero-padded to the run count) unless its line sets RUN_ID, logs to DIR (default
logs/sweeps/<file stem>/, i.e. LOG_DIR) and writes its console output to DIR/<RUN_ID>.out. A run
whose complete log already exists is skipped, so rerunning a sweep resumes it; an incomplete log is
first moved aside to <RUN_ID>.txt.<n>.partial. After each run DIR/summary.md and DIR/summary.csv are
rewritten: all runs sorted by the val_bpb of their last final_<stage> line.

Stopping the sweep (Ctrl-C, SIGTERM, SIGHUP) stops the running training process group too and exits
with 128 + the signal number. DIR/.sweep.lock keeps a second sweep out of DIR while one runs, and a
log still held by a running train_gpt.py is never moved aside (both locks die with their process).

Launch as ./run.sh does: torchrun on the largest divisor of 8 not above the visible GPU count;
without a GPU python3 with PRESET=smoke, DATA_PATH=data/datasets/smoke_sp1024 and the shared 1024
tokenizer, each only where you have not set it.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))
import runlog  # noqa: E402

SMOKE_DATA = "data/datasets/smoke_sp1024"
SMOKE_TOKENIZER = "../shared/data/tokenizers/fineweb_1024_bpe.model"
_SETTING = re.compile(r"([A-Z][A-Z0-9_]*)=(.*)", re.S)
_BRACES = re.compile(r"\{[^{}]*\}")  # spaces inside a grid are dropped: {1, 2} == {1,2}


class SweepError(ValueError):
    """Bad sweep file or settings; printed as one line before anything runs."""


@dataclass
class Run:
    run_id: str
    overrides: dict[str, str]  # from the line (after grid expansion)
    env: dict[str, str]  # full environment of the process
    log: Path
    line: int

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items() if k != "RUN_ID")


def parse_sweep(text: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, overrides) per run, grids expanded."""
    runs = []
    for n, raw in enumerate(text.splitlines(), 1):
        try:
            tokens = shlex.split(_BRACES.sub(lambda m: re.sub(r"\s+", "", m.group(0)), raw), comments=True)
        except ValueError as e:
            raise SweepError(f"line {n}: {e}") from None
        if not tokens:
            continue
        axes = []
        for tok in tokens:
            m = _SETTING.fullmatch(tok)
            if not m:
                raise SweepError(f"line {n}: {tok!r} is not KEY=VALUE (upper-case env var name)")
            key, value = m.groups()
            if any(key == k for k, _ in axes):
                raise SweepError(f"line {n}: {key} is set twice")
            if value.startswith("{") and value.endswith("}"):
                values = [v.strip() for v in value[1:-1].split(",")]
                if not all(values):
                    raise SweepError(f"line {n}: empty value in grid {key}={value}")
            else:
                values = [value]
            axes.append((key, values))
        for combo in itertools.product(*(vals for _, vals in axes)):
            runs.append((n, {k: v for (k, _), v in zip(axes, combo)}))
    return runs


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def nproc_for(ngpu: int) -> int:
    """Largest divisor of 8 not above ngpu (grad accumulation is 8 / world size); 0 without GPUs."""
    return max((n for n in (1, 2, 4, 8) if n <= ngpu), default=0)


def launcher(nproc: int, script: Path) -> list[str]:
    if nproc >= 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return [sys.executable, str(script)]


def cpu_defaults(env: dict[str, str]) -> dict[str, str]:
    """run.sh's no-GPU settings, for the ones the environment leaves unset."""
    out = dict(env)
    for k, v in (("PRESET", "smoke"), ("DATA_PATH", SMOKE_DATA), ("TOKENIZER_PATH", SMOKE_TOKENIZER)):
        out.setdefault(k, v)
    return out


def plan(specs: list[tuple[int, dict[str, str]]], base_env: dict[str, str], stem: str, out_dir: Path,
         steps: int | None) -> list[Run]:
    """Full environments, run ids and log paths; every config validated by train_gpt itself."""
    import train_gpt

    fixed = {"ITERATIONS": str(steps), "MAX_WALLCLOCK_SECONDS": "0"} if steps else {}
    width = len(str(len(specs)))
    runs, seen = [], {}
    for i, (line, over) in enumerate(specs, 1):
        env = {**base_env, "LOG_DIR": str(out_dir), **fixed, "RUN_ID": f"{stem}_{i:0{width}d}", **over}
        try:
            h = train_gpt.Hyperparameters.from_env(env)
        except train_gpt.ConfigError as e:
            raise SweepError(f"line {line}: {e}") from None
        if h.run_id in seen:
            raise SweepError(f"line {line}: RUN_ID {h.run_id} is also used on line {seen[h.run_id]}")
        seen[h.run_id] = line
        runs.append(Run(h.run_id, over, env, Path(h.log_dir) / f"{h.run_id}.txt", line))
    return runs


def log_in_use(path: Path) -> bool:
    """True while a train_gpt.py process holds its log (the lock dies with that process)."""
    import fcntl

    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def lock_out_dir(out_dir: Path):
    """Hold DIR/.sweep.lock for this sweep's lifetime; a second sweep on the same DIR is refused."""
    import fcntl

    f = open(out_dir / ".sweep.lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        f.close()
        raise SweepError(f"another sweep is writing to {out_dir}; wait for it or stop it first") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Stopped(Exception):
    """SIGTERM/SIGHUP/SIGINT reached the sweep: stop the running child, then exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def run_child(cmd: list[str], env: dict[str, str], out) -> int:
    """Run one training process in its own process group; if the sweep is stopped, stop the group too
    (torchrun and its workers included), so nothing keeps writing after the sweep is gone."""
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    print(f"  pid:{proc.pid}", flush=True)
    try:
        return proc.wait()
    except BaseException:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise


def set_aside(path: Path) -> Path:
    """Move an unfinished run's file out of the way without overwriting anything."""
    n = 1
    while path.with_name(f"{path.name}.{n}.partial").exists():
        n += 1
    dest = path.with_name(f"{path.name}.{n}.partial")
    path.rename(dest)
    return dest


def write_summary(runs: list[Run], status: dict[str, str], out_dir: Path) -> str:
    parsed = [runlog.read_log(r.log) for r in runs if r.log.is_file()]
    labels = {str(r.log): r.label for r in runs}
    header, rows = runlog.table_rows(parsed, labels, status)
    md = runlog.render_markdown(header, rows)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "summary.csv").write_text(runlog.render_csv(header, rows), encoding="utf-8")
    return md


def check_resume(runs: list[Run]) -> None:
    """A complete log is kept only if it ran the settings its line gives now: after an edit of the
    sweep file the summary would put the new values next to the old run's score."""
    import train_gpt

    for run in runs:
        if not run.log.is_file():
            continue
        r = runlog.read_log(run.log)
        if not r.complete:
            continue
        h = train_gpt.Hyperparameters.from_env(run.env)
        for f in train_gpt.fields(h):
            logged, want = r.hp.get(f.name), str(getattr(h, f.name))
            if logged != want and not (logged is None and getattr(h, f.name) == f.default):  # a knob added since
                raise SweepError(f"line {run.line}: the complete log {run.log} ran {f.name.upper()}={logged} but the run "
                                 f"now has {f.name.upper()}={want}; move that log (and its .ptz) away or restore the line, "
                                 f"then run the sweep again")


def execute(runs: list[Run], cmd: list[str], out_dir: Path) -> dict[str, str]:
    """Run each in turn; status per log path ('ok', 'skipped (done)', 'failed rc=N', ...)."""
    status = {}
    for i, run in enumerate(runs, 1):
        print(f"sweep run:{i}/{len(runs)} run_id:{run.run_id} {run.label}", flush=True)
        if run.log.is_file():
            kept = runlog.read_log(run.log)
            if kept.complete:
                status[str(run.log)] = "ok (kept)" if kept.over_limit is None else f"OVER_LIMIT by {kept.over_limit} bytes (kept)"
                print(f"  status:skipped (complete log exists){'' if kept.over_limit is None else ' OVER_LIMIT'}", flush=True)
                write_summary(runs, status, out_dir)
                continue
            if log_in_use(run.log):
                raise SweepError(f"{run.log} is still being written by a running process (an earlier sweep's run?); "
                                 "stop it, then run the sweep again")
            print(f"  moved incomplete log to {set_aside(run.log)}", flush=True)
            artifact = Path(run.env.get("ARTIFACT_PATH") or run.log.with_suffix(".ptz"))
            if artifact.exists():  # train_gpt.py refuses a RUN_ID whose artifact exists
                print(f"  moved its artifact to {set_aside(artifact)}", flush=True)
        out = out_dir / f"{run.run_id}.out"
        if out.exists():
            set_aside(out)
        t0 = time.perf_counter()
        with open(out, "w", encoding="utf-8") as f:
            rc = run_child(cmd, run.env, f)
        r = runlog.read_log(run.log) if run.log.is_file() else None
        st = "ok" if rc == 0 and r is not None and r.complete else f"failed rc={rc}"
        status[str(run.log)] = st
        sc = r.score if r else None
        tail = ""
        if st != "ok":
            lines = out.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = f" last:{lines[-1][:160]!r}" if lines else ""
        print(f"  status:{st} " + (f"score:final_{sc.name} val_bpb:{sc.val_bpb:.8f} " if sc else "")
              + f"wall:{time.perf_counter() - t0:.0f}s log:{run.log}{tail}", flush=True)
        write_summary(runs, status, out_dir)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="sweep file: one run per line of KEY=VALUE settings; {a,b} grids")
    ap.add_argument("--steps", type=int, help="fixed-step mode: ITERATIONS=N MAX_WALLCLOCK_SECONDS=0 for every run")
    ap.add_argument("--out", help="directory for logs and the summary (default logs/sweeps/<file stem>)")
    ap.add_argument("--nproc", type=int, help="processes per run (0: python3 without torchrun); default from the GPU count")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    ap.add_argument("--plot", action="store_true", help="also write DIR/curves.png (tools/plot_runs.py)")
    a = ap.parse_args(argv)
    path = Path(a.file)
    try:
        if not path.is_file():
            raise SweepError(f"sweep file {path} not found")
        if a.steps is not None and a.steps <= 0:
            raise SweepError(f"--steps {a.steps} must be positive")
        try:
            specs = parse_sweep(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SweepError(f"sweep file {path} is not text (byte {e.start} is not UTF-8); "
                             "give a text file of KEY=VALUE lines") from None
        if not specs:
            raise SweepError(f"{path} has no runs (one line of KEY=VALUE settings per run)")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
        out_dir = Path(a.out) if a.out else REPO / "logs" / "sweeps" / stem
        nproc = nproc_for(visible_gpus()) if a.nproc is None else a.nproc
        base = dict(os.environ) if nproc >= 1 else cpu_defaults(dict(os.environ))
        runs = plan(specs, base, stem, out_dir.resolve(), a.steps)
        if nproc == 0 and not Path(REPO / runs[0].env["DATA_PATH"]).is_dir():
            raise SweepError(f"no GPU and no dataset at {runs[0].env['DATA_PATH']}; run ./run.sh once to build the "
                             "smoke dataset, or set DATA_PATH/TOKENIZER_PATH")
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = launcher(nproc, REPO / "train_gpt.py")
    print(f"sweep file:{path} runs:{len(runs)} out:{out_dir} launch:{shlex.join(cmd)}", flush=True)
    if a.dry_run:
        for r in runs:
            print(f"run_id:{r.run_id} line:{r.line} {r.label}")
        return 0
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot use --out {out_dir} as the sweep's folder ({e.strerror}); give a folder path you can write",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    try:
        lock = lock_out_dir(out_dir)  # noqa: F841 (held until exit)
        check_resume(runs)
        status = execute(runs, cmd, out_dir)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"error: sweep stopped by {name}; its running training process was stopped too; "
              f"run the same command again to resume", file=sys.stderr, flush=True)
        return 128 + e.signum
    print(write_summary(runs, status, out_dir), end="")
    print(f"summary:{out_dir / 'summary.md'} csv:{out_dir / 'summary.csv'}")
    if a.plot:
        import plot_runs

        logs = [r.log for r in runs if r.log.is_file()]
        if logs:
            plot_runs.plot([runlog.read_log(p) for p in logs], out_dir / "curves.png")
            print(f"plot:{out_dir / 'curves.png'}")
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
