"""Records: the log parser, Welch/one-sample tests, submission.json schema, pack/check and refusals,
plots. Real logs come from the tiny sweep in tests/test_sweep.py (run once per session)."""
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_sweep import tiny_sweep

sys.path.insert(0, str(REPO / "tools"))
import pack_code  # noqa: E402
import plot_runs  # noqa: E402
import records  # noqa: E402
import runlog  # noqa: E402
import significance as sig  # noqa: E402
import train_gpt as tg  # noqa: E402

META = {"name": "tiny_two_seeds", "author": "A. Golfer", "github_id": "agolfer", "track": "10min_16mb",
        "date": "2026-01-02", "summary": "Tiny CPU config, two seeds."}


@pytest.fixture(scope="module")
def logs(shared_data, tmp_path_factory) -> list[Path]:
    run = tiny_sweep(tmp_path_factory)
    assert run["res"].returncode == 0, run["res"].stdout[-3000:] + run["res"].stderr[-3000:]
    return run["logs"]


@pytest.fixture(scope="module")
def packed(logs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    return records.pack([str(p) for p in logs], REPO / "train_gpt.py", META, root,
                        ref={"desc": "seeds 4.5,4.6,4.55", "bpb": [4.5, 4.6, 4.55], "nats": None})


def edited(src: Path, dst: Path, fn) -> Path:
    dst.write_text(fn(src.read_text()))
    return dst


# --- parser ----------------------------------------------------------------------------------

def test_parse_complete_log(logs):
    text = logs[0].read_text()
    r = runlog.parse_log(text, str(logs[0]))
    finals = re.findall(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms$", text, re.M)
    assert [(s.name, s.val_loss, s.val_bpb, s.eval_time_s) for s in r.stages.values()] == \
        [(n, float(l), float(b), int(t) / 1000) for n, l, b, t in finals]
    assert r.score.name == finals[-1][0] == "ttt"
    assert r.complete and not r.bad_lines and r.runs_in_file == 1
    assert r.eval_stage_names == ["quantized", "sliding", "ttt"]
    assert r.train_steps == 6 and r.hp["num_layers"] == "4" and r.seed == 1
    assert [p[0] for p in r.train_points] == [1, 2, 4, 6] and [p[0] for p in r.val_points] == [3]
    art = re.search(r"^artifact counted_code_bytes:(\d+) bytes_model:(\d+) bytes_total:(\d+)", text, re.M).groups()
    assert (r.artifact["counted_code_bytes"], r.artifact["bytes_model"], r.bytes_total) == tuple(map(int, art))
    code = re.search(r"^code file_bytes:(\d+) sha256:(\w+)$", text, re.M).groups()
    assert (r.code_file_bytes, r.code_sha256) == (int(code[0]), code[1]) and not r.record_log
    assert r.ttt_progress[-1][0] == r.ttt_progress[-1][1]


def test_logged_bpb_is_nats_times_tokens_over_bytes_ln2(logs):
    """The conversion the significance test uses reproduces every logged stage."""
    r = runlog.read_log(logs[0])
    f = runlog.nats_to_bpb_factor(r.val_tokens, r.val_bytes)
    assert f == r.val_tokens / (r.val_bytes * math.log(2))
    for s in r.stages.values():
        assert s.val_loss * f == pytest.approx(s.val_bpb, abs=2e-8)


def test_every_truncation_is_incomplete(logs):
    lines = logs[0].read_text().splitlines(keepends=True)
    for k in range(len(lines)):
        r = runlog.parse_log("".join(lines[:k]))
        assert not r.complete, f"cut after {k} lines reads as complete"
    cut = runlog.parse_log("".join(lines)[:-12])  # the eval_budget line cut mid-write
    assert "no eval_budget line" in " ".join(cut.missing())


def test_missing_middle_stage_and_reused_run_id(logs):
    text = logs[0].read_text()
    no_sliding = "".join(l for l in text.splitlines(keepends=True) if not l.startswith("final_sliding"))
    assert runlog.parse_log(no_sliding).missing() == ["eval_budget lists sliding but there is no final_sliding line"]
    first_attempt = text[: text.index("final_pre_quant")]
    both = runlog.parse_log(first_attempt + text)
    assert both.runs_in_file == 2 and both.complete and both.score.val_bpb == runlog.parse_log(text).score.val_bpb
    assert runlog.parse_log(text + first_attempt).missing()[0] == "no final_pre_quant line"


def test_any_final_stage_name_and_its_position_decide_the_score():
    text = "\n".join([
        "run_id:x", "hp seed:3", "val_tokens:100 val_bytes:250", "train_steps:5 train_time:1000ms budget:0.0s",
        "final_pre_quant val_loss:3.0 val_bpb:1.70 eval_time:10ms",
        "artifact counted_code_bytes:10 bytes_model:20 bytes_total:30 limit:16000000 headroom:1 code_packed:1 path:a.ptz",
        "final_quantized val_loss:3.1 val_bpb:1.75 eval_time:10ms",
        "final_ngram_mix val_loss:2.9 val_bpb:1.60 eval_time:20ms",
        "final_lora_ttt val_loss:2.95 val_bpb:1.65 eval_time:30ms",
        "eval_budget used:1.0s limit:600s stages:load+quantized+ngram_mix+lora_ttt",
        "versions python:3 torch:2.9 cuda:12.8 device:cuda:0 gpu:NVIDIA H100 80GB HBM3 attention:fa3",
    ]) + "\n"
    r = runlog.parse_log(text)
    assert r.complete and r.score.name == "lora_ttt" and r.score.val_bpb == 1.65  # last, not lowest
    assert r.versions["gpu"] == "NVIDIA H100 80GB HBM3" and r.versions["device"] == "cuda:0"
    assert not runlog.parse_log(text.replace("final_lora_ttt", "final_lora_ttt_partial")).complete
    assert not runlog.parse_log(text[:-1]).complete  # last line without its newline: cut mid-write


def test_kv_and_num():
    assert runlog.kv("a:1 b:x y c:[1, 2]+[3]") == {"a": "1", "b": "x y", "c": "[1, 2]+[3]"}
    assert runlog.num("16541ms") == 16541 and runlog.num("+0.5e-3") == 0.0005
    with pytest.raises(ValueError):
        runlog.num("ms")


# --- statistics ------------------------------------------------------------------------------

def test_welch_hand_computed():
    """ref 4,5,6 vs ours 1,2,3 (+margin 1): t = (5-2-1)/sqrt(1/3+1/3) = sqrt(6), df = 4, and for 4 df
    P(T > t) = 1/2 - (3/8) u (1 - u^2/12 ... ) in closed form: F = 1/2 + (3/8)(t/sqrt(1+t^2/4))(1 - t^2/(12(1+t^2/4)))."""
    r = sig.welch_improvement([1, 2, 3], [4, 5, 6], 1.0)
    t = math.sqrt(6)
    assert r.t == pytest.approx(t, rel=1e-12) and r.df == pytest.approx(4, rel=1e-12)
    q = 1 + t * t / 4
    assert r.p == pytest.approx(0.5 - 0.375 * (t / math.sqrt(q)) * (1 - t * t / (12 * q)), abs=1e-13)
    assert r.p == pytest.approx(0.03524199845510996, abs=1e-12) and not r.clears


def test_one_sample_hand_computed():
    """ours 1,2,3 (+margin 0.5) against a fixed 4: t = (4-2-0.5)/(1/sqrt(3)) = 1.5 sqrt(3), df = 2, and for
    2 df P(T > t) = (1 - t/sqrt(2+t^2)) / 2."""
    r = sig.one_sample_improvement([1, 2, 3], 4.0, 0.5)
    t = 1.5 * math.sqrt(3)
    assert (r.t, r.df) == (pytest.approx(t, rel=1e-12), 2)
    assert r.p == pytest.approx((1 - t / math.sqrt(2 + t * t)) / 2, abs=1e-13)


@pytest.mark.parametrize("ours,ref,margin", [
    ([1.0801, 1.0803, 1.0806], [1.0870, 1.0862, 1.0875], 0.002),
    ([1.0801, 1.0803, 1.0806, 1.0799], [1.0821, 1.0815], 0.002),
    ([2.31944, 2.32240, 2.32424], [2.79180, 2.79242, 2.79281], 0.005),
    ([1.2, 1.1, 1.3], [1.0, 1.05, 0.95], 0.0),  # ours is worse: p near 1
])
def test_welch_and_one_sample_match_scipy(ours, ref, margin):
    from scipy import stats

    w = sig.welch_improvement(ours, ref, margin)
    s = stats.ttest_ind(ref, [x + margin for x in ours], equal_var=False, alternative="greater")
    assert (w.t, w.df, w.p) == pytest.approx((s.statistic, s.df, s.pvalue), rel=1e-9, abs=1e-15)
    m = statistics.mean(ref)
    o = sig.one_sample_improvement(ours, m, margin)
    s1 = stats.ttest_1samp([x + margin for x in ours], m, alternative="less")
    assert (o.t, o.df, o.p) == pytest.approx((-s1.statistic, s1.df, s1.pvalue), rel=1e-9, abs=1e-15)


def test_degenerate_inputs():
    assert sig.one_sample_improvement([1.0, 1.0], 2.0, 0.5).p == 0.0
    assert sig.one_sample_improvement([1.0, 1.0], 1.2, 0.5).p == 1.0
    with pytest.raises(ValueError, match="needs >= 2 seeds"):
        sig.one_sample_improvement([1.0], 2.0, 0.1)
    with pytest.raises(ValueError, match=">= 2 values on each side"):
        sig.welch_improvement([1.0, 1.1], [2.0], 0.1)


def test_compare_converts_the_margin_with_logged_counts():
    ours = sig.Scores("o", [1.00, 1.01, 1.02], [2.30, 2.32, 2.34], val_tokens=1000, val_bytes=3300)
    f = 1000 / (3300 * math.log(2))
    res = sig.compare(ours, 1.05, 0.005)
    assert res["margin_bpb"] == pytest.approx(0.005 * f, rel=1e-15) and res["bpb"]["test"] == "one_sample"
    assert res["nats"]["ref_mean"] == pytest.approx(1.05 / f) and res["reference_nats_converted"]
    nats = [2.40, 2.41, 2.42]
    ref = sig.Scores("r", [round(n * f, 8) for n in nats], nats)  # same tokenization: bpb/nats equals ours
    res = sig.compare(ours, ref, 0.005)
    assert res["bpb"]["test"] == res["nats"]["test"] == "welch" and not res["reference_nats_converted"]
    assert res["nats"]["ours_mean"] == pytest.approx(2.32) and res["nats"]["ref_mean"] == pytest.approx(2.41)
    other = sig.Scores("r", [1.05, 1.06, 1.04], [2.30, 2.31, 2.29])  # another tokenizer: 4% more bpb per nat
    res = sig.compare(ours, other, 0.005)
    assert res["reference_nats_converted"] and res["reference_bpb_per_nat"] == pytest.approx(3.15 / 6.90)
    assert res["nats"]["ref_mean"] == pytest.approx(1.05 / f)


# --- schema ----------------------------------------------------------------------------------

def test_schema_validator_catches_violations(packed):
    schema = records.load_schema()
    sub = json.loads((packed / "submission.json").read_text())
    assert records.schema_errors(sub, schema) == []
    bad = json.loads(json.dumps(sub))
    del bad["val_bpb"]
    bad["seeds"] = ["1"]
    bad["date"] = "2026/01/02"
    bad["seed_results"]["1"]["stages"]["ttt"]["val_bpb"] = "low"
    bad["compliance"]["extra"] = True
    bad["val_bpb_std"] = -1
    bad["compliant"] = 1
    errs = records.schema_errors(bad, schema)
    for needle in ("$: missing val_bpb", "$.seeds[0]: expected integer", "$.date: '2026/01/02' does not match",
                   "$.seed_results.1.stages.ttt.val_bpb: expected number", "$.compliance: unexpected key extra",
                   "$.val_bpb_std: -1 < 0", "$.compliant: expected boolean"):
        assert any(e.startswith(needle) for e in errs), (needle, errs)


def test_schema_against_jsonschema_when_installed(packed):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads((packed / "submission.json").read_text()), records.load_schema())


# --- pack ------------------------------------------------------------------------------------

def test_pack_numbers_come_from_the_logs(packed, logs):
    sub = json.loads((packed / "submission.json").read_text())
    finals = []
    for p in logs:
        text = p.read_text()
        finals.append(re.findall(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+)", text, re.M)[-1])
        seed = re.search(r"^hp seed:(\d+)", text, re.M).group(1)
        assert (packed / f"train_seed{seed}.log").read_text() == text
    bpb = [float(f[2]) for f in finals]
    assert sub["score_stage"] == "final_ttt" and sub["seeds"] == [1, 2]
    assert sub["val_bpb"] == pytest.approx(statistics.mean(bpb), abs=1e-15)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpb), abs=1e-15)
    assert sub["val_loss"] == pytest.approx(statistics.mean(float(f[1]) for f in finals), abs=1e-15)
    assert [s["val_bpb"] for s in sub["seed_results"].values()] == bpb
    totals = [int(re.search(r"bytes_total:(\d+)", p.read_text()).group(1)) for p in logs]
    assert [s["artifact_bytes"] for s in sub["seed_results"].values()] == totals and sub["bytes_total"] == max(totals)
    assert sub["hardware"] == "1xcpu" and sub["pytorch_version"].startswith("2.")
    c = sub["compliance"]
    assert c["train_under_600s"] and c["eval_under_600s"] and c["artifact_under_16mb"] and c["score_first_ttt"]
    assert c["three_seeds"] is False and sub["compliant"] is False  # two seeds
    assert c["calibration_on_train_data"] == ("calib_data:train" in logs[0].read_text())
    assert all(s["artifact_sha256"] for s in sub["seed_results"].values())


# the keys every accepted record's submission.json has (and that ours must have), per folder and per seed
ACCEPTED_KEYS = {"name", "author", "github_id", "date", "track", "val_bpb", "val_bpb_std", "seeds", "seed_results",
                 "hardware", "pytorch_version", "bytes_total", "compliance"}
ACCEPTED_SEED_KEYS = {"val_bpb", "val_loss", "artifact_bytes", "steps", "train_time_s", "eval_time_s"}


def test_packed_folder_has_the_accepted_shape_and_round_trips(packed, logs, tmp_path):
    sub = json.loads((packed / "submission.json").read_text())
    assert ACCEPTED_KEYS <= set(sub) and sub["track"] == "10min_16mb" and packed.parent.name == "track_10min_16mb"
    assert list(sub["seed_results"]) == [str(s) for s in sub["seeds"]] == ["1", "2"]
    assert all(ACCEPTED_SEED_KEYS <= set(e) for e in sub["seed_results"].values())
    runs = sorted((runlog.read_log(p) for p in logs), key=lambda r: r.seed)
    for r, e in zip(runs, sub["seed_results"].values()):
        assert (e["steps"], e["train_time_s"], e["eval_time_s"]) == (r.train_steps, r.train_time_s, r.eval_used_s)
    # as a reference, the folder gives back every seed's logged score
    ref = sig.scores_from_folder(str(packed))
    assert ref.seeds == [1, 2] and ref.bpb == [r.score.val_bpb for r in runs] and ref.nats == [r.score.val_loss for r in runs]
    out = tmp_path / "sig.json"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "significance.py"), *map(str, logs), "--reference",
                          str(packed), "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    f = runlog.nats_to_bpb_factor(runs[0].val_tokens, runs[0].val_bytes)
    direct = sig.welch_improvement(ref.bpb, ref.bpb, 0.005 * f)  # the same seeds on both sides
    assert got["bpb"]["p"] == pytest.approx(direct.p, rel=1e-12) and got["bpb"]["improvement"] == 0
    assert got["reference_nats_converted"] is False and got["nats"]["ref_mean"] == pytest.approx(statistics.mean(ref.nats))


def test_pack_ships_the_counted_code(packed, logs):
    shipped = (packed / "train_gpt.py").read_bytes()
    source = (REPO / "train_gpt.py").read_bytes()
    assert (packed / "train_gpt_readable.py").read_bytes() == source
    code = re.search(r"^code file_bytes:(\d+) sha256:(\w+)", logs[0].read_text(), re.M)
    assert int(code.group(1)) == len(source) and records.sha256(source).startswith(code.group(2))
    assert f"counted_code_bytes:{len(shipped)} " in logs[0].read_text()  # the size the artifact counted
    h = records.run_config(tg, [runlog.read_log(logs[0])])  # the config the run logged
    assert h.run_id and records.unpack_wrapper(shipped) == pack_code.shipped_source(source, h)


def test_readme_tables_and_exact_command(packed, logs):
    import train_gpt

    readme = (packed / "README.md").read_text()
    sub = json.loads((packed / "submission.json").read_text())
    for seed, s in sub["seed_results"].items():
        row = next(l for l in readme.splitlines() if l.startswith(f"| {seed} | {s['steps']} |"))
        assert f"{s['val_bpb']:.8f}" in row and f"{s['artifact_bytes']:,}" in row
    assert "| `NUM_LAYERS` | `4` | `11` |" in readme and "| `SEED`" not in readme
    assert "| score_first_ttt | yes |" in readme and "| three_seeds | **no** |" in readme and "## Significance" in readme
    cmd = next(l.strip() for l in readme.splitlines() if l.strip().startswith("SEED=$SEED"))
    words = shlex.split(cmd)
    settings = dict(t.split("=", 1) for t in words if re.match(r"[A-Z_]+=", t))
    assert words[-1].endswith("train_gpt.py") and words[-2] == "python3"  # one process: world_size 1
    for p, seed in zip(logs, (1, 2)):
        r = runlog.read_log(p)
        env = {**settings, "SEED": str(seed), "RUN_ID": r.run_id}
        h = train_gpt.Hyperparameters.from_env(env)
        assert {f.name: str(getattr(h, f.name)) for f in train_gpt.fields(h)} == r.hp


def test_significance_in_submission_matches_direct_test(packed, logs):
    s = json.loads((packed / "submission.json").read_text())["significance"]
    runs = [runlog.read_log(p) for p in logs]
    f = runlog.nats_to_bpb_factor(runs[0].val_tokens, runs[0].val_bytes)
    direct = sig.welch_improvement([r.score.val_bpb for r in runs], [4.5, 4.6, 4.55], 0.005 * f)
    assert s["bpb"]["p"] == pytest.approx(direct.p, rel=1e-12) and s["bpb"]["test"] == "welch"
    # the reference converted to nats: the same test up to the 8-decimal rounding of the logged values
    assert s["nats"]["p"] == pytest.approx(direct.p, rel=1e-6) and s["nats"]["margin"] == 0.005


def test_check_passes_then_catches_an_edit(packed, tmp_path):
    assert records.check(packed) == []
    copy = tmp_path / "rec"
    shutil.copytree(packed, copy)
    sub = json.loads((copy / "submission.json").read_text())
    sub["val_bpb"] -= 0.01
    sub["compliance"]["eval_under_600s"] = False
    (copy / "submission.json").write_text(json.dumps(sub))
    problems = records.check(copy)
    assert any(p.startswith("$.val_bpb:") for p in problems)
    assert any(p.startswith("$.compliance.eval_under_600s:") for p in problems)
    (copy / "train_gpt_readable.py").write_bytes(b"# edited\n")
    assert any("train_gpt_readable.py is missing or differs" in p for p in records.check(copy))
    shutil.copyfile(packed / "train_gpt_readable.py", copy / "train_gpt_readable.py")  # the wrapper holds stripped code
    (copy / "train_gpt.py").write_bytes((copy / "train_gpt.py").read_bytes() + b"\n")
    assert "has counted_code_bytes:" in records.check(copy)[0]


# --- refusals --------------------------------------------------------------------------------

def _refuse(log_paths, tmp_path, match, code=REPO / "train_gpt.py", meta=META):
    root = tmp_path / "records"
    with pytest.raises(records.PackError, match=match):
        records.pack([str(p) for p in log_paths], code, meta, root)
    assert not any(root.rglob("*")) if root.exists() else True  # nothing written


def test_refuses_incomplete_log(logs, tmp_path):
    text = logs[1].read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.index("final_ttt")])
    _refuse([logs[0], cut], tmp_path, r"log .*cut\.txt is incomplete: no eval_budget line")


def test_refuses_different_configs(logs, tmp_path):
    other = edited(logs[1], tmp_path / "other.txt", lambda t: t.replace("hp matrix_lr:0.03\n", "hp matrix_lr:0.02\n"))
    _refuse([logs[0], other], tmp_path, r"different configs: MATRIX_LR='0.03' in .* but '0.02' in .*other.txt")
    same_seed = edited(logs[1], tmp_path / "dup.txt", lambda t: t.replace("hp seed:2\n", "hp seed:1\n"))
    _refuse([logs[0], same_seed], tmp_path, r"seeds repeat across the logs: \[1, 1\]")


def test_refuses_code_that_did_not_produce_the_logs(logs, tmp_path):
    code = tmp_path / "train_gpt.py"
    code.write_bytes((REPO / "train_gpt.py").read_bytes() + b"# edited\n")
    _refuse(logs, tmp_path, r"was produced by code file_bytes:\d+ sha256:\w+ but .*; pass --code", code=code)


def test_logs_of_the_packed_wrapper_are_accepted(packed, logs, tmp_path):
    """A run launched from the packed train_gpt.py logs the wrapper's size and hash."""
    wrapper = (packed / "train_gpt.py").read_bytes()
    line = f"code file_bytes:{len(wrapper)} sha256:{records.sha256(wrapper)[:16]}"
    ran = [edited(p, tmp_path / p.name, lambda t: re.sub(r"^code file_bytes:.*$", line, t, flags=re.M)) for p in logs]
    out = records.pack([str(p) for p in ran], packed / "train_gpt.py", META, tmp_path / "rec")
    assert (out / "train_gpt.py").read_bytes() == wrapper
    assert "the hash of train_gpt.py, the file that ran" in (out / "README.md").read_text()


def test_significance_cli_on_a_records_folder(packed):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "significance.py"), str(packed),
                          "--reference-bpb", "4.6", "--margin-nats", "0.01"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    sub = json.loads((packed / "submission.json").read_text())
    direct = sig.one_sample_improvement([s["val_bpb"] for s in sub["seed_results"].values()], 4.6,
                                        0.01 * runlog.nats_to_bpb_factor(sub["val_tokens"], sub["val_bytes"]))
    line = next(l for l in res.stdout.splitlines() if l.startswith("bpb "))
    assert f"p:{direct.p:.3g} " in line and line.endswith("clears_p<0.01:" + ("yes" if direct.p < 0.01 else "no"))
    assert "one-sample" in res.stdout


def test_refuses_existing_folder(packed, logs, tmp_path):
    with pytest.raises(records.PackError, match="already exists"):
        records.pack([str(p) for p in logs], REPO / "train_gpt.py", META, packed.parent.parent)


def test_cli_refusal_is_one_line(logs, tmp_path):
    cut = tmp_path / "cut.txt"
    cut.write_text(logs[0].read_text()[:500])
    res = subprocess.run([sys.executable, str(REPO / "tools" / "records.py"), "pack", str(cut), "--name", "x",
                          "--author", "a", "--github-id", "g", "--records-dir", str(tmp_path / "rec")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: log ")
    assert not (tmp_path / "rec").exists()


# --- compliance from the log -----------------------------------------------------------------

@pytest.mark.parametrize("edit,key,expect", [
    (lambda t: t, "eval_under_600s", True),
    (lambda t: re.sub(r"eval_budget used:\S+", "eval_budget used:600.1s", t), "eval_under_600s", False),
    (lambda t: re.sub(r"^(eval_budget .*)$", r"\1 OVER_BUDGET", t, flags=re.M), "eval_under_600s", False),
    (lambda t: re.sub(r"^train_steps:(\d+) train_time:\d+ms", r"train_steps:\1 train_time:600001ms", t, flags=re.M),
     "train_under_600s", False),
    (lambda t: re.sub(r"gptq_hessian_end:\S+", "gptq_hessian_end:600.5s", t), "train_under_600s", False),
    (lambda t: re.sub(r"bytes_total:\d+", "bytes_total:16000001", t), "artifact_under_16mb", False),
    (lambda t: re.sub(r"^(gptq_hessian_end:.*)$", r"\1 calib_data:train", t, flags=re.M), "calibration_on_train_data", True),
    (lambda t: re.sub(r"^(gptq_hessian_end:.*)$", r"\1 calib_data:val", t, flags=re.M), "calibration_on_train_data", False),
    (lambda t: t.replace("method:gptq", "method:rtn"), "calibration_on_train_data", True),
    (lambda t: t, "score_first_ttt", True),
    (lambda t: re.sub(r"^ttt_progress.*\n", "", t, flags=re.M), "score_first_ttt", False),
    (lambda t: re.sub(r"^(ttt_progress chunk:)1/", r"\g<1>2/", t, flags=re.M), "score_first_ttt", False),
    (lambda t: re.sub(r"^final_ttt .*\n", "", t, flags=re.M).replace("+sliding+ttt", "+sliding"), "score_first_ttt", True),
])
def test_compliance_reads_the_log(logs, edit, key, expect):
    r = runlog.parse_log(edit(logs[0].read_text()))
    assert r.complete
    assert records.compliance(r)[key] is expect


# --- plots -----------------------------------------------------------------------------------

def test_plot_writes_png_of_the_logged_curves(logs, tmp_path):
    runs = [runlog.read_log(p) for p in logs]
    out = plot_runs.plot(runs, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    text = logs[0].read_text()
    c = plot_runs.curves(runs[0])
    train = re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", text, re.M)
    assert c["train"] == ([int(s) for s, _ in train], [float(v) for _, v in train])
    assert c["val"] == ([3], [float(re.search(r"^step:3/\d+ val_loss:\S+ val_bpb:(\S+)", text, re.M).group(1))])
    assert [f[0] for f in c["finals"]] == ["pre_quant", "quantized", "sliding", "ttt"]
    assert plot_runs.curves(runs[0], "time")["train"][0][-1] == runs[0].train_points[-1][2]


def test_a_copy_of_the_code_loaded_in_process_leaves_ours_working():
    """records loads the shipped code as a module: its custom ops must not take over this module's."""
    import torch

    x, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    ref = tg.softcap_cross_entropy(x, t, 30.0)
    copy = records.load_module((REPO / "train_gpt.py").read_bytes() + b"\n# a copy\n", "copy.py")
    assert torch.equal(copy.softcap_cross_entropy(x, t, 30.0), ref)
    del sys.modules[copy.__name__]
    copy.__dict__.clear()  # what module teardown does; calls routed to the copy would now fail
    assert torch.equal(tg.softcap_cross_entropy(x, t, 30.0), ref)
