"""The challenge's own formats: accepted record folders (submission.json + logs) read as references and
plotted next to ours, and the env names of the public record scripts refused with a pointer.
Samples: ../shared/data/upstream_records (one log and the submission.json of each accepted folder)."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "tools"))
import plot_runs  # noqa: E402
import runlog  # noqa: E402
import significance as sig  # noqa: E402
import train_gpt as tg  # noqa: E402

UPSTREAM = SHARED_DATA / "upstream_records"
FOLDERS = sorted(p for p in UPSTREAM.iterdir() if p.is_dir()) if UPSTREAM.is_dir() else []
LOGS = [f for d in FOLDERS for f in sorted(d.iterdir()) if f.suffix in (".log", ".txt")]
needs_samples = pytest.mark.skipif(not FOLDERS, reason=f"no sample record folders under {UPSTREAM}")
STAMP = re.compile(r"^\d{9,}(?:\.\d+)? ")


def _lines(path):
    return [STAMP.sub("", l, count=1) for l in path.read_text(errors="replace").splitlines()]


def _folder(date: str):
    return next(d for d in FOLDERS if d.name.startswith(date))


# --- record folders as references ------------------------------------------------------------

@needs_samples
@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name[:10])
def test_every_sample_folder_parses(folder):
    sub = json.loads((folder / "submission.json").read_text())
    s = sig.scores_from_folder(str(folder))
    assert [str(x) for x in s.seeds] == list(sub["seed_results"])
    assert sorted(s.seeds) == sorted(int(x) for x in sub["seeds"])
    assert s.bpb == [e["val_bpb"] for e in sub["seed_results"].values()]
    has_loss = all("val_loss" in e for e in sub["seed_results"].values())
    assert s.nats == ([e["val_loss"] for e in sub["seed_results"].values()] if has_loss else None)
    assert s.bpb_per_nat is not None  # from per-seed val_loss or from the folder's log


@needs_samples
@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.parent.name[:10])
def test_every_sample_log_gives_a_curve_and_its_last_score_line(log):
    lines = _lines(log)
    steps = [re.match(r"^(?:step:)?(\d+)/\d+ train_loss:\s*(\S+)", l) for l in lines]
    steps = [(int(m.group(1)), float(m.group(2))) for m in steps if m]
    vals = [re.match(r"^(\d+)/\d+ val_loss:\s*\S+ val_bpb:\s*(\S+)$", l) for l in lines]
    vals = [(int(m.group(1)), float(m.group(2))) for m in vals if m]
    scores = [re.match(r"^(\S.*?) val_loss:(\S+) val_bpb:(\S+)", l) for l in lines]
    last = [m for m in scores if m and not re.match(r"^\d+/\d+$", m.group(1))][-1]
    r = runlog.read_log(log)
    assert r.record_log and r.complete and not r.missing()
    assert [(s, l) for s, l, _ in r.train_points] == steps and len(steps) >= 10
    assert [(s, b) for s, _, b, _ in r.val_points] == vals and vals
    assert (r.score.val_bpb, r.score.val_loss) == (float(last.group(3)), float(last.group(2)))
    assert r.score.name == re.sub(r"\s+", "_", last.group(1))
    assert r.seed == int(re.search(r"^\s+seed: (\d+)$", "\n".join(lines), re.M).group(1))
    for x in ("step", "time"):
        c = plot_runs.curves(r, x)
        assert len(c["train"][0]) == len(steps) and len(c["val"][0]) == len(vals)
    # step lines say train_time in tenths of a minute; validation points take the time of the step lines
    t = dict((s, tt) for s, _, tt in r.train_points)
    assert all(tt == pytest.approx(t[s]) for s, _, _, tt in r.val_points if s in t)
    stop = re.search(r"stopping_early: .*train_time: (\d+)ms step: (\d+)/", "\n".join(lines))
    assert (r.train_steps, r.train_time_s) == (int(stop.group(2)), int(stop.group(1)) / 1000)
    assert plot_runs.curves(r, "time")["val"][0][-1] == r.train_time_s  # the last val point is at the stop


@needs_samples
def test_run_table_ranks_record_logs_by_their_score():
    runs = [runlog.read_log(f) for f in LOGS]
    header, rows = runlog.table_rows(runs)
    col = {h: i for i, h in enumerate(header)}
    assert [r[col["status"]] for r in rows] == ["ok"] * len(runs)
    scores = [r[col["score_bpb"]] for r in rows]
    assert scores == sorted(r.score.val_bpb for r in runs) and all(r[col["steps"]] > 4000 for r in rows)


def test_record_log_variants():
    """The baseline's format (`step:N/M ... train_time:Tms`, `final_..._exact` after its rounded twin),
    timestamped lines, and a repeated stage name: the score is the last line with a val_bpb."""
    text = "\n".join([
        "1776142360.538 Hyperparameters:", "1776142360.538   seed: 7", "1776142360.539 train_shards: 3",
        "step:0/200 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.01ms",
        "step:1/200 train_loss:6.9370 train_time:24ms step_avg:24.34ms",
        "step:200/200 train_loss:2.5 train_time:6000ms step_avg:30.0ms",
        "step:200/200 val_loss:2.1 val_bpb:1.25 train_time:6000ms step_avg:30.0ms",
        "quantized val_loss:2.3 val_bpb:1.31 eval_time:5ms",
        "final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1423ms",
        "final_int8_zlib_roundtrip_exact val_loss:2.07269 val_bpb:1.22436",
        "quantized val_loss:2.2 val_bpb:1.3 eval_time:10ms",
        "ttt_progress: batch 1/9 batch_loss:3.1 batch_bpb:1.2 running_loss:2.7 running_bpb:1.07",
    ]) + "\n"
    r = runlog.parse_log(text, "x/train.log")
    assert r.record_log and r.seed == 7 and r.complete
    assert r.train_points == [(1, 6.937, 0.024), (200, 2.5, 6.0)] and r.val_points[-1] == (200, 2.1, 1.25, 6.0)
    assert r.score.name == "quantized" and r.score.val_bpb == 1.3  # last line with a val_bpb, not the lowest
    assert r.stages["final_int8_zlib_roundtrip_exact"].eval_time_s is None
    assert runlog.parse_log(text.replace("quantized val_loss:2.2 val_bpb:1.3 eval_time:10ms\n", "")).score.val_bpb == 1.22436
    assert not runlog.parse_log("Hyperparameters:\n  seed: 1\n1/10 train_loss: 3.0 train_time: 0.1m\n").complete


@needs_samples
def test_a_later_record_beats_an_earlier_one_and_not_the_reverse():
    older, newer = sig.scores_from_folder(str(_folder("2026-04-09"))), sig.scores_from_folder(str(_folder("2026-04-22")))
    fwd, back = sig.compare(newer, older), sig.compare(older, newer)
    assert fwd["bpb"]["improvement"] > fwd["margin_bpb"] and fwd["bpb"]["p"] < 0.01 and fwd["nats"]["p"] < 0.01
    assert back["bpb"]["p"] > 0.99 and back["nats"]["p"] > 0.99
    # 04-22 scores CaseOps tokens: its nats are in other units, so the reference's are converted
    assert back["reference_nats_converted"] and "reference_bpb_per_nat" in back
    # 04-13 is 0.0006 BPB better than 04-10: less than the 0.005-nat margin, so not a record
    close = sig.compare(sig.scores_from_folder(str(_folder("2026-04-13"))), sig.scores_from_folder(str(_folder("2026-04-10"))))
    assert 0 < close["bpb"]["improvement"] < close["margin_bpb"] and not close["bpb"]["clears_p_0_01"]


@needs_samples
def test_cli_against_an_accepted_folder():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "significance.py"), str(_folder("2026-04-22")),
                          "--reference", str(_folder("2026-04-09"))], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^bpb .* clears_p<0\.01:yes$", res.stdout, re.M) and "n:5" in res.stdout and "n:3" in res.stdout


@needs_samples
def test_folder_without_seed_results_falls_back_to_its_logs(tmp_path):
    d = tmp_path / "rec"
    shutil.copytree(_folder("2026-04-09"), d)
    sub = json.loads((d / "submission.json").read_text())
    del sub["seed_results"]
    (d / "submission.json").write_text(json.dumps(sub))
    log = next(d.glob("*.log"))
    last = [l for l in _lines(log) if l.startswith("quantized_ttt ")][-1]
    s = sig.scores_from_folder(str(d))
    assert s.seeds == [314] and s.bpb == [float(re.search(r"val_bpb:(\S+)", last).group(1))]
    log.unlink()
    with pytest.raises(ValueError, match=r"no per-seed val_bpb found \(looked for seed_results in submission\.json") as e:
        sig.scores_from_folder(str(d))
    assert "\n" not in str(e.value)


def test_seed_results_variants():
    """A mapping seed -> {val_bpb, ...} or seed -> number, a list of {seed, val_bpb}, our older per_seed list."""
    assert sig.seed_scores({"seed_results": {"42": {"val_bpb": 1.08, "val_loss": 2.79}, "7": {"val_bpb": 1.09}}}) == \
        [(42, 1.08, 2.79), (7, 1.09, None)]
    assert sig.seed_scores({"seed_results": {"1": 1.07, "2": 1.071}}) == [(1, 1.07, None), (2, 1.071, None)]
    assert sig.seed_scores({"seed_results": [{"seed": 3, "val_bpb": 1.1, "val_loss": 2.8}]}) == [(3, 1.1, 2.8)]
    assert sig.seed_scores({"per_seed": [{"seed": 5, "val_bpb": 1.2, "val_loss": 2.9}]}) == [(5, 1.2, 2.9)]
    assert sig.seed_scores({"val_bpb": 1.2}) == []
    with pytest.raises(ValueError, match="seed 1: val_bpb None"):  # a seed without a score is refused, not dropped
        sig.seed_scores({"seed_results": {"1": {"bpb": 1}}})


# --- env names of the record scripts -----------------------------------------------------------

# What each name the issue names should point to (written out here, not read from train_gpt.RECORD_ENV).
POINTERS = {"WARMDOWN_ITERS": "WARMDOWN_FRAC", "VAL_BATCH_SIZE": "VAL_BATCH_TOKENS", "TIE_EMBEDDINGS": "HEAD_KIND",
            "EMBED_LR": "TIED_EMBED_LR", "HEAD_LR": "TIED_EMBED_LR", "PARALLEL_START_LAYER": "PARALLEL_RESIDUAL_START"}


@pytest.mark.parametrize("name,ours", POINTERS.items())
def test_record_env_names_point_to_our_knob(name, ours):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env({name: "1"})
    msg = str(e.value)
    assert msg.startswith(f"{name} is a setting of other record scripts") and f"use {ours}" in msg and "\n" not in msg


def test_record_env_names_without_equivalent_and_our_fields_win():
    for name, ours in (("TTT_LORA_RANK", "LORA_"), ("PHASED_TTT_PREFIX_DOCS", "PHASED_"), ("GATED_ATTN_INIT_STD", "ATTN_GATE")):
        with pytest.raises(tg.ConfigError, match=f"^{name} is a setting of other record scripts.*use .*{ours}"):
            tg.Hyperparameters.from_env({name: "1"})
    for name in ("ETLB_LR", "ROPE_YARN"):
        with pytest.raises(tg.ConfigError, match=f"^{name} is a setting of other record scripts.*no equivalent here"):
            tg.Hyperparameters.from_env({name: "1"})
    known = {f.name.upper() for f in tg.fields(tg.Hyperparameters)}
    for ours in {v.split()[0] for v in tg.RECORD_ENV.values() if v}:  # every pointer names a knob we have
        assert ours in known, ours
    assert not known & set(tg.RECORD_ENV)
    assert tg.Hyperparameters.from_env({"WARMDOWN_FRAC": "0.5", "NUM_LAYERS": "11"}).warmdown_frac == 0.5


# Values the record scripts compute (paths, distributed state) rather than read from the environment.
DERIVED = {"DISTRIBUTED", "IS_MAIN_PROCESS", "GRAD_ACCUM_STEPS", "LOGFILE", "MODEL_PATH", "QUANTIZED_MODEL_PATH",
           "DATASETS_DIR", "TRAIN_FILES", "VAL_FILES", "VAL_BYTES_FILES", "RANK", "WORLD_SIZE", "LOCAL_RANK"}


@needs_samples
def test_no_hyperparameter_of_the_sample_logs_is_silently_ignored():
    known = {f.name.upper() for f in tg.fields(tg.Hyperparameters)}
    names = {k.upper() for f in LOGS for k in runlog.read_log(f).hp}
    assert len(names) > 80
    ignored = []
    for name in sorted(names - known - DERIVED):
        try:
            tg.Hyperparameters.from_env({name: "1"})
            ignored.append(name)
        except tg.ConfigError:
            pass
    assert not ignored
