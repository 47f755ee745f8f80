"""Sweeps: the sweep-file grammar, run planning, and `./run.sh sweep` on two tiny CPU runs.

tiny_sweep() runs once per session and its logs are shared with tests/test_records.py."""
import csv
import io
import re
import subprocess
import sys

import pytest

from conftest import FINEWEB, REPO, SP1024, clean_environ, tiny_env

sys.path.insert(0, str(REPO / "tools"))
import runlog  # noqa: E402
import sweep  # noqa: E402

STEPS = 6
_CACHE = {}


def tiny_sweep(tmp_path_factory) -> dict:
    """`./run.sh sweep` of SEED={1,2} on a tiny config with every eval stage (pre_quant, quantized,
    sliding, TTT) in fixed-step mode. The validation set is FineWeb docs 2-3 (~4k tokens; doc 1 alone
    is 21k), which keeps each run to a few seconds of CPU."""
    if "run" not in _CACHE:
        import build_shards

        tmp = tmp_path_factory.mktemp("sweep")
        data, corpus = tmp / "data", tmp / "docs.jsonl"
        corpus.write_text("".join(FINEWEB.read_text(encoding="utf-8").splitlines(keepends=True)[1:61]), encoding="utf-8")
        build_shards.build_shards([corpus], SP1024, data, val_docs=2, shard_tokens=300_000)
        (tmp / "seeds.txt").write_text("# two seeds of one config\nSEED={1,2}  # grid\n")
        env = {**clean_environ(), **tiny_env(
            data_path=str(data), tokenizer_path=str(SP1024), preset="", train_log_every=2, val_loss_every=3,
            sliding_window_enabled=1, eval_stride=32, ttt_enabled=1, ttt_epochs=1, ttt_chunk_tokens=1024,
            gptq_calibration_batches=2), "OMP_NUM_THREADS": "1"}
        res = subprocess.run(["bash", str(REPO / "run.sh"), "sweep", "seeds.txt", "--steps", str(STEPS),
                              "--out", "out", "--nproc", "0"],
                             env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
        _CACHE["run"] = {"tmp": tmp, "out": tmp / "out", "env": env, "res": res,
                         "logs": [tmp / "out" / "seeds_1.txt", tmp / "out" / "seeds_2.txt"]}
    return _CACHE["run"]


@pytest.fixture(scope="module")
def swept(shared_data, tmp_path_factory):
    run = tiny_sweep(tmp_path_factory)
    assert run["res"].returncode == 0, run["res"].stdout[-3000:] + run["res"].stderr[-3000:]
    return run


# --- grammar and planning --------------------------------------------------------------------

def test_lines_comments_quoting_and_grid_product():
    text = ("# comment\n\nNUM_LAYERS=10 MATRIX_LR=0.02\n"
            "TTT_ENABLED=0 RUN_ID='a b'  # trailing\n"
            "NUM_LAYERS={10,11} SEED={1, 2,3}\n")
    runs = sweep.parse_sweep(text)
    assert runs[0] == (3, {"NUM_LAYERS": "10", "MATRIX_LR": "0.02"})
    assert runs[1] == (4, {"TTT_ENABLED": "0", "RUN_ID": "a b"})
    assert [r[1] for r in runs[2:]] == [{"NUM_LAYERS": a, "SEED": b} for a in ("10", "11") for b in ("1", "2", "3")]
    assert all(line == 5 for line, _ in runs[2:])


@pytest.mark.parametrize("text,msg", [
    ("NUM_LAYERS=10\nnum_layers=3\n", "line 2: 'num_layers=3' is not KEY=VALUE"),
    ("SEED=1 SEED=2\n", "line 1: SEED is set twice"),
    ("SEED={1,,2}\n", "line 1: empty value in grid"),
    ("RUN_ID='open\n", "line 1: No closing quotation"),
])
def test_bad_lines_name_the_line(text, msg):
    with pytest.raises(sweep.SweepError, match=re.escape(msg)):
        sweep.parse_sweep(text)


def test_plan_ids_precedence_and_validation(tmp_path):
    base = {**clean_environ(), "PRESET": "smoke", "ITERATIONS": "99"}
    runs = sweep.plan(sweep.parse_sweep("SEED=1\nSEED=2 ITERATIONS=3\n"), base, "lr", tmp_path, steps=7)
    assert [r.run_id for r in runs] == ["lr_1", "lr_2"]
    assert runs[0].env["ITERATIONS"] == "7" and runs[0].env["MAX_WALLCLOCK_SECONDS"] == "0"  # --steps beats env
    assert runs[1].env["ITERATIONS"] == "3"  # the line beats --steps
    assert runs[0].log == tmp_path / "lr_1.txt" and runs[1].label == "SEED=2 ITERATIONS=3"
    with pytest.raises(sweep.SweepError, match=r"line 2: .*NUM_LAYER.*did you mean NUM_LAYERS"):
        sweep.plan(sweep.parse_sweep("SEED=1\nNUM_LAYER=3\n"), base, "x", tmp_path, None)
    with pytest.raises(sweep.SweepError, match=r"line 1: MATRIX_LR='fast' is not a valid float"):
        sweep.plan(sweep.parse_sweep("MATRIX_LR=fast\n"), base, "x", tmp_path, None)
    with pytest.raises(sweep.SweepError, match="line 2: RUN_ID a is also used on line 1"):
        sweep.plan(sweep.parse_sweep("RUN_ID=a\nRUN_ID=a SEED=3\n"), base, "x", tmp_path, None)


@pytest.mark.parametrize("ngpu,nproc", [(0, 0), (1, 1), (2, 2), (3, 2), (5, 4), (7, 4), (8, 8), (16, 8)])
def test_nproc_divides_eight(ngpu, nproc):
    assert sweep.nproc_for(ngpu) == nproc


def test_launcher_and_cpu_defaults():
    script = REPO / "train_gpt.py"
    assert sweep.launcher(0, script) == [sys.executable, str(script)]
    assert sweep.launcher(8, script)[-2:] == ["--nproc_per_node=8", str(script)]
    env = sweep.cpu_defaults({"DATA_PATH": "mine"})
    assert env == {"DATA_PATH": "mine", "PRESET": "smoke", "TOKENIZER_PATH": sweep.SMOKE_TOKENIZER}


def test_set_aside_never_overwrites(tmp_path):
    f = tmp_path / "r.txt"
    for text in ("first", "second"):
        f.write_text(text)
        sweep.set_aside(f)
    assert not f.exists()
    assert (tmp_path / "r.txt.1.partial").read_text() == "first"
    assert (tmp_path / "r.txt.2.partial").read_text() == "second"


def test_bad_sweep_file_is_one_line_and_runs_nothing(tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_text("SEED=1\nMODEL_DIM=100 NUM_HEADS=8\n")
    assert sweep.main([str(f), "--out", str(tmp_path / "out"), "--nproc", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: line 2: MODEL_DIM=100 must be divisible by NUM_HEADS=8")
    assert not (tmp_path / "out").exists()


# --- two real runs ---------------------------------------------------------------------------

def final_lines(text: str) -> dict:
    """stage -> val_bpb straight from the log text."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^final_(\w+) val_loss:\S+ val_bpb:(\S+)", text, re.M)}


def test_sweep_runs_each_line_and_tabulates_by_score(swept):
    out = swept["out"]
    scores = {}
    for seed, log in zip((1, 2), swept["logs"]):
        text = log.read_text()
        assert f"hp seed:{seed}\n" in text and f"hp iterations:{STEPS}\n" in text and "hp max_wallclock_seconds:0.0\n" in text
        assert f"train_steps:{STEPS} " in text
        finals = final_lines(text)
        assert list(finals) == ["pre_quant", "quantized", "sliding", "ttt"]
        scores[log.stem] = finals["ttt"]  # the last stage is the score
        assert (out / f"{log.stem}.out").is_file() and (out / f"{log.stem}.ptz").is_file()
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [r["run_id"] for r in rows] == sorted(scores, key=scores.get)
    for r in rows:
        assert float(r["score_bpb"]) == scores[r["run_id"]] and r["score_stage"] == "ttt" and r["status"] == "ok"
        assert r["overrides"] == f"SEED={r['seed']}" and r["steps"] == str(STEPS)
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| rank | run_id | overrides |") and len(md) == 2 + len(rows)
    assert "summary:" in swept["res"].stdout


def test_rerun_keeps_complete_runs(swept):
    before = [p.read_bytes() for p in swept["logs"]]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "sweep.py"), "seeds.txt", "--steps", str(STEPS),
                          "--out", "out", "--nproc", "0"], env=swept["env"], cwd=swept["tmp"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("status:skipped (complete log exists)") == 2
    assert [p.read_bytes() for p in swept["logs"]] == before


def test_runlog_table_cli_matches_summary(swept):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "runlog.py"), *map(str, swept["logs"])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    ids = [line.split("|")[2].strip() for line in res.stdout.splitlines()[2:]]
    summary = list(csv.DictReader(io.StringIO((swept["out"] / "summary.csv").read_text())))
    assert ids == [r["run_id"] for r in summary]
    assert runlog.read_log(swept["logs"][0]).complete
