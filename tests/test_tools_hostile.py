"""The tools, the data builder and run.sh on inputs that once gave a wrong result with exit 0, a
traceback or a loss: a resumed sweep whose file changed, OVER_LIMIT shown ok, NaN or negative inputs to
the significance test, plot/pack/report paths, the same input given twice to build_shards, an
interrupted CaseOps smoke build. Every refusal is one `error: ...` line and a non-zero exit."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import FINEWEB, REPO, SP1024

sys.path.insert(0, str(REPO / "tools"))
import compression_report  # noqa: E402
import pack_code  # noqa: E402
import plot_runs  # noqa: E402
import records  # noqa: E402
import runlog  # noqa: E402
import significance  # noqa: E402
import sweep  # noqa: E402


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run_log(run_id: str, bpb: str, hp: dict | None = None, over_limit: int = 0) -> str:
    """A complete train_gpt.py log with the hp dump of the given knobs (the rest at their defaults)."""
    h = tg.Hyperparameters(**(hp or {}))
    return "\n".join([f"run_id:{run_id}", *(f"hp {f.name}:{getattr(h, f.name)}" for f in tg.fields(h)),
                      "val_tokens:100 val_bytes:250", "train_steps:5 train_time:1000ms budget:0.0s",
                      "final_pre_quant val_loss:3.0 val_bpb:1.70 eval_time:10ms",
                      f"artifact counted_code_bytes:10 bytes_model:20 bytes_total:{16_000_000 + over_limit} limit:16000000 "
                      f"headroom:{-over_limit} code_packed:1 path:a.ptz",
                      f"final_quantized val_loss:3.1 val_bpb:{bpb} eval_time:10ms",
                      "eval_budget used:1.0s limit:600s stages:load+quantized"]
                     + ([f"OVER_LIMIT by {over_limit} bytes: raise MLP_/ATTN_/MATRIX_CLIP_SIGMAS"] if over_limit else [])) + "\n"


# --- sweep resume and OVER_LIMIT -------------------------------------------------------------------


def sweep_with_kept_log(tmp_path, monkeypatch, line: str, logged: dict, over_limit: int = 0):
    for k in [k for k in os.environ if k in {f.name.upper() for f in tg.fields(tg.Hyperparameters)}]:
        monkeypatch.delenv(k)
    (tmp_path / "g.txt").write_text(line + "\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {"LOG_DIR": str(out), "RUN_ID": "g_1", "DATA_PATH": str(tmp_path), "TOKENIZER_PATH": str(SP1024)}
    h = {k.lower(): v for k, v in env.items()} | logged
    (out / "g_1.txt").write_text(run_log("g_1", "1.5", h, over_limit))
    for k in ("DATA_PATH", "TOKENIZER_PATH"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(sweep, "run_child", lambda *a: pytest.fail("the kept run was run again"))
    return sweep.main([str(tmp_path / "g.txt"), "--out", str(out), "--nproc", "1"]), out


def test_sweep_resume_refuses_a_log_of_other_settings(tmp_path, monkeypatch, capsys):
    rc, out = sweep_with_kept_log(tmp_path, monkeypatch, "NUM_LAYERS=12", {"num_layers": 10})
    err = one_line(capsys)
    assert rc == 2 and "ran NUM_LAYERS=10 but the run now has NUM_LAYERS=12" in err and "move that log" in err
    assert (out / "g_1.txt").is_file() and not (out / "summary.md").exists()


def test_sweep_resume_keeps_a_log_of_the_same_settings(tmp_path, monkeypatch, capsys):
    rc, out = sweep_with_kept_log(tmp_path, monkeypatch, "NUM_LAYERS=12", {"num_layers": 12})
    assert rc == 0 and "| ok (kept) |" in (out / "summary.md").read_text()


def test_over_limit_is_never_shown_ok(tmp_path, monkeypatch, capsys):
    rc, out = sweep_with_kept_log(tmp_path, monkeypatch, "NUM_LAYERS=12", {"num_layers": 12}, over_limit=321)
    assert rc == 1 and "| OVER_LIMIT by 321 bytes (kept) |" in (out / "summary.md").read_text()
    assert runlog.main([str(out / "g_1.txt")]) == 0
    assert "| OVER_LIMIT by 321 bytes |" in capsys.readouterr().out


@pytest.mark.parametrize("out", ["file", "under_a_file"])
def test_sweep_out_that_cannot_be_a_folder(tmp_path, monkeypatch, capsys, out):
    (tmp_path / "f").write_text("keep")
    (tmp_path / "g.txt").write_text("NUM_LAYERS=12\n")
    monkeypatch.setenv("DATA_PATH", str(tmp_path))
    dest = tmp_path / "f" if out == "file" else tmp_path / "f" / "sub"
    assert sweep.main([str(tmp_path / "g.txt"), "--out", str(dest), "--nproc", "1"]) == 2
    assert "cannot use --out" in one_line(capsys) and (tmp_path / "f").read_text() == "keep"


# --- significance ----------------------------------------------------------------------------------


def folder(tmp_path, name, seed_results, **extra) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "submission.json").write_text(json.dumps({"seed_results": seed_results, **extra}))
    return str(d)


OURS = {"1": {"val_bpb": 1.00, "val_loss": 2.30}, "2": {"val_bpb": 1.001, "val_loss": 2.302}, "3": {"val_bpb": 0.999, "val_loss": 2.298}}


@pytest.mark.parametrize("bad", [{"val_bpb": "nan"}, {"val_bpb": float("nan")}, {"val_bpb": "1.2"}, {"val_bpb": None},
                                 {"val_bpb": 1.1, "val_loss": "x"}, {"val_bpb": -1.0}],
                         ids=["nan_string", "nan", "string", "null", "bad_loss", "negative"])
def test_a_seed_that_is_not_a_score_is_refused_by_name(tmp_path, capsys, bad):
    ref = folder(tmp_path, "ref", {"7": {"val_bpb": 1.10, "val_loss": 2.5}, "8": {"val_bpb": 1.2, "val_loss": 2.6},
                                   "9": bad})
    assert significance.main([folder(tmp_path, "ours", OURS), "--reference", ref]) == 2
    assert "seed 9" in one_line(capsys)


def test_reference_list_entry_that_is_not_an_object_is_refused(tmp_path, capsys):
    ref = folder(tmp_path, "ref", [{"seed": 1, "val_bpb": 1.1}, {"seed": 2, "val_bpb": 1.2}, "1.05"])
    assert significance.main([folder(tmp_path, "ours", OURS), "--reference", ref]) == 2
    assert "'1.05' is not an object" in one_line(capsys)


@pytest.mark.parametrize("args, msg", [(["--reference-bpb", "1.5", "--margin-nats", "-1"], "margin-nats -1.0 must be"),
                                       (["--reference-seeds", ","], "item '' is not a number"),
                                       (["--reference-seeds", "1.2,x"], "item 'x' is not a number"),
                                       (["--reference-seeds", "1.2,nan"], "positive numbers"),
                                       (["--reference-bpb", "nan"], "must be a positive number")])
def test_margin_and_reference_values(tmp_path, capsys, args, msg):
    assert significance.main([folder(tmp_path, "ours", OURS), *args]) == 2
    assert msg in one_line(capsys)


@pytest.mark.parametrize("val_tokens", [-100, "100", 1.5, True])
def test_val_counts_must_be_positive_integers(tmp_path, capsys, val_tokens):
    ours = folder(tmp_path, "ours", OURS, val_tokens=val_tokens, val_bytes=250)
    assert significance.main([ours, "--reference-bpb", "1.1"]) == 2
    assert "val_tokens" in one_line(capsys)


def test_json_into_a_missing_folder_is_written(tmp_path, capsys):
    dest = tmp_path / "new" / "dir" / "r.json"
    assert significance.main([folder(tmp_path, "ours", OURS), "--reference-bpb", "1.1", "--json", str(dest)]) == 0
    assert json.loads(dest.read_text())["bpb"]["clears_p_0_01"] is True
    (tmp_path / "file").write_text("")
    assert significance.main([folder(tmp_path, "o2", OURS), "--reference-bpb", "1.1", "--json", str(tmp_path / "file" / "x")]) == 2
    assert "cannot write --json" in capsys.readouterr().err.strip().splitlines()[-1]


def test_records_pack_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "recs").write_text("keep")
    log = tmp_path / "a.txt"
    log.write_text(run_log("a", "1.5"))
    assert records.main(["pack", str(log), "--name", "x", "--author", "a", "--github-id", "g",
                         "--records-dir", str(tmp_path / "recs")]) == 2
    assert "is a file, not a folder" in one_line(capsys) and (tmp_path / "recs").read_text() == "keep"
    assert records.main(["pack", str(log), "--name", "x", "--author", "a", "--github-id", "g", "--reference-seeds", ","]) == 2
    assert "is not a number" in one_line(capsys)


# --- plot, pack, report ------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["folder", "x.xyz", "noext"])
def test_plot_out_must_be_an_image_file(tmp_path, capsys, out):
    (tmp_path / "a.txt").write_text(run_log("a", "1.5"))
    (tmp_path / "folder").mkdir()
    assert plot_runs.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / out)]) == 2
    assert ".png" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "folder"] and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("case", ["packed_src", "missing_src", "folder_out"])
def test_pack_code_bad_paths(tmp_path, capsys, case, monkeypatch):
    for k in [k for k in os.environ if k in {f.name.upper() for f in tg.fields(tg.Hyperparameters)}]:
        monkeypatch.delenv(k)
    (tmp_path / "dir").mkdir()
    packed = tmp_path / "packed.py"
    packed.write_bytes(pack_code.PACK_HEADS[0] + b'abc"""' + pack_code.PACK_TAILS[0])
    src = {"packed_src": packed, "missing_src": tmp_path / "none.py", "folder_out": REPO / "train_gpt.py"}[case]
    out = tmp_path / ("dir" if case == "folder_out" else "o.py")
    if case == "folder_out":
        monkeypatch.setattr(pack_code, "pack_source", lambda *a: pytest.fail("packed before checking --out"))
    assert pack_code.main(["--src", str(src), "--out", str(out)]) == 2
    assert {"packed_src": "already packed", "missing_src": "is not a file", "folder_out": "is a folder"}[case] in one_line(capsys)
    assert not (tmp_path / "o.py").exists()


@pytest.mark.parametrize("content", [None, b"", b"garbage" * 50, b"PGC1\x05" + bytes(40), "dir", "valid_no_state", "over_bound"])
def test_compression_report_on_bad_artifacts(tmp_path, capsys, content, monkeypatch):
    path = tmp_path / "a.ptz"
    if content == "dir":
        path.mkdir()
    elif content == "valid_no_state":
        path.write_bytes(tg.compress_artifact(tg.serialize_tensors({}, {"state": [1]})))
    elif content == "over_bound":  # as /dev/zero would be: never read whole
        path.write_bytes(tg.compress_artifact(tg.serialize_tensors({}, {"state": {}})))
        assert compression_report.main([str(path)]) == 0
        monkeypatch.setattr(tg, "ARTIFACT_MAX_BYTES", path.stat().st_size - 1)
    elif content is not None:
        path.write_bytes(content)
    assert compression_report.main([str(path)]) == 2
    assert f"cannot read artifact {path}" in one_line(capsys)


# --- build_shards: the same documents in both splits ----------------------------------------------------


def test_build_shards_refuses_the_same_input_twice(shared_data, tmp_path):
    import build_shards as bs

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(FINEWEB.read_text().splitlines(keepends=True)[:30]))
    with pytest.raises(ValueError, match="given twice.*pass each --input once"):
        bs.build_shards([docs, docs], SP1024, tmp_path / "out", val_docs=20)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(docs, copy)  # another file with the same documents
    with pytest.raises(ValueError, match="training document 10 .*validation document 0"):
        bs.build_shards([docs, copy], SP1024, tmp_path / "out", val_docs=20)
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half-built is left


def test_build_shards_cli_refuses_the_same_input_twice(shared_data, tmp_path, capsys):
    import build_shards as bs

    assert bs.main(["--input", str(FINEWEB), str(FINEWEB), "--vocab-size", "300", "--out", str(tmp_path / "o"),
                    "--tokenizer-out", str(tmp_path / "t.model"), "--val-docs", "20"]) == 2
    assert "given twice" in one_line(capsys) and not (tmp_path / "t.model").exists()  # refused before training


# --- run.sh: an interrupted CaseOps smoke build ----------------------------------------------------------


STUB = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  tools/setup_env.py) echo "$0" ;;
  -c) echo 0 ;;
  data/build_shards.py)
    while [[ $# -gt 0 ]]; do case "$1" in --tokenizer-out) tok=$2; shift;; --out) out=$2; shift;; esac; shift; done
    mkdir -p "$out"; echo new > "$tok"; echo v > "$out/fineweb_val_000000.bin"
    [[ -n "${FAIL:-}" ]] && { echo "error: interrupted" >&2; exit 1; }
    echo s > "$out/fineweb_val_bytes_000000.bin" ;;
  train_gpt.py) echo "train data:$DATA_PATH tokenizer:$TOKENIZER_PATH" ;;
esac
"""


def test_caseops_smoke_build_is_atomic(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data" / "tokenizers").mkdir(parents=True)
    shutil.copy(REPO / "run.sh", repo / "run.sh")
    (tmp_path / "shared" / "data" / "corpus").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "python3").chmod(0o755)
    tok = repo / "data" / "tokenizers" / "smoke_caseops_1024_bpe.model"
    smoke = repo / "data" / "datasets" / "smoke_caseops_sp1024"
    tok.write_text("old")
    smoke.mkdir(parents=True)
    (smoke / "fineweb_val_000000.bin").write_text("half")  # an earlier build stopped before the sidecar
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CASEOPS": "1", "CALLS": str(tmp_path / "calls"), "HOME": str(tmp_path)}

    def run(**extra):
        return subprocess.run(["bash", str(repo / "run.sh")], env={**env, **extra}, capture_output=True, text=True, timeout=60)

    r = run(FAIL="1")
    assert r.returncode != 0 and "error: interrupted" in r.stderr
    assert tok.read_text() == "old" and sorted(p.name for p in smoke.iterdir()) == ["fineweb_val_000000.bin"]
    assert [p.name for p in (repo / "data" / "datasets").iterdir()] == ["smoke_caseops_sp1024"]  # no scratch left
    r = run()
    assert r.returncode == 0 and f"train data:data/datasets/smoke_caseops_sp1024 tokenizer:data/tokenizers/{tok.name}" in r.stdout
    assert tok.read_text() == "new\n" and (smoke / "fineweb_val_bytes_000000.bin").is_file()
    aside = [p for p in (repo / "data" / "datasets").iterdir() if ".incomplete." in p.name]
    assert len(aside) == 1 and (aside[0] / "fineweb_val_000000.bin").read_text() == "half"  # moved, not lost
    builds = (tmp_path / "calls").read_text().count("build_shards")
    assert run().returncode == 0 and (tmp_path / "calls").read_text().count("build_shards") == builds  # built once
