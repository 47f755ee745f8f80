"""Every tool in tools/ fed malformed arguments and files (missing, a folder, empty, binary, JSON of the
wrong types, a garbage log or artifact): each must end in a one-line refusal or a usage message, never a
traceback. The tools run in-process through their main(argv)."""
import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, SP1024, clean_environ

sys.path.insert(0, str(REPO / "tools"))

TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py"))
KINDS = {
    "missing": None,
    "folder": "dir",
    "empty": b"",
    "binary": bytes(range(256)) * 8,
    "json_list": b'[1, "x", null]',
    "json_string": b'"seed_results"',
    "json_wrong_fields": b'{"seed_results": {"1": "x", "2": [1]}, "val_tokens": "many", "code": 5}',
    "garbage_log": b"run_id:x\nhp seed:abc\nfinal_ttt val_loss:x val_bpb:nan\nartifact bytes_total:z\nOVER_LIMIT by q bytes\n",
    "garbage_artifact": b"PGQ1\xff\xff\xff\x7f{" + bytes(64),
}
# The argument lists per tool; {F} is the malformed file. Nothing here may install, download or write
# into the repository (readme_knobs only checks; setup_env only parses).
CASES = {
    "ablate_artifact": [["--data", "{F}", "--tokenizer", "{F}", "--steps", "1", "--preset", "smoke"],
                        ["--data", "{F}", "--tokenizer", str(SP1024), "--set", "NOPE"]],
    "analyze": [["{F}", "--set", "PRESET=smoke"], ["{F}", "--log", "{F}"], [str(SP1024), "--set", "X"]],
    "bench": [["--compare", "{F}", "NUM_LAYERS=x"], ["--steps", "-1"]],
    "bench_memory": [["--rows", "1", "1"], ["--seq-lens", "7", "0", "--val-tokens", "-1"]],
    "bench_eval": [["--stages", "{F}"], ["--tokens", "-5", "--project"], ["--project", "--lengths", "{F}", "--orders", "1"],
                   ["--project", "--lengths", "{F}", "--check", "04-16"]],
    "bench_ngram": [["--corpus", "{F}", "--tokenizer", "{F}", "--cache", "", "--tokens", "1000"],
                    ["--tokens", "-5", "--corpus", "{F}", "--cache", ""]],
    "bench_export": [["--input", "{F}", "--tokenizer", "{F}"], ["--input", "{F}", "--tokenizer", str(SP1024), "--workers", "0"]],
    "causality_check": [["--artifact", "{F}"]],
    "comm_bytes": [["--world", "0"], ["--world", "{F}"], ["--world", "3"]],
    "compression_report": [["{F}"], ["{F}", "--by", "module"]],
    "gpu_check": [["--dry-run", "--data", "{F}", "--tokenizer", "{F}", "--out", "{F}"], ["--steps", "{F}", "--dry-run"]],
    "pack_code": [["--src", "{F}", "--out", "{F}"]],
    "plot_runs": [["{F}", "--out", "{F}"], ["{F}", "--out", "x.png"]],
    "readme_knobs": [["--check", "{F}"]],
    "records": [["pack", "{F}", "--name", "n", "--author", "a", "--github-id", "g", "--code", "{F}", "--records-dir", "{F}"],
                ["pack", "{F}", "--name", "n", "--author", "a", "--github-id", "g", "--reference", "{F}"], ["check", "{F}"]],
    "runlog": [["{F}"], ["{F}", "--csv", "{F}", "--md", "{F}"]],
    "setup_env": [["{F}"]],
    "significance": [["{F}", "--reference", "{F}"], ["{F}", "--reference-bpb", "1.0", "--json", "{F}"],
                     ["{F}", "--reference-seeds", "{F}"]],
    "sweep": [["{F}", "--out", "{F}", "--dry-run"], ["{F}", "--nproc", "0", "--out", "{F}"]],
    "tokenizer_check": [["--tokenizer", "{F}", "--input", "{F}"], ["--tokenizer", "{F}", "--shards", "{F}"],
                        ["--tokenizer", str(SP1024), "--shards", "{F}"], ["--tokenizer", str(SP1024), "--input", "{F}"]],
}


def test_every_tool_has_cases():
    assert sorted(CASES) == TOOLS


def make(tmp: Path, kind: str) -> str:
    p = tmp / f"in_{kind}"
    content = KINDS[kind]
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_bytes(content)
    return str(p)


@pytest.mark.parametrize("tool", TOOLS)
def test_malformed_input_never_gives_a_traceback(tool, tmp_path, monkeypatch):
    for k in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(k)  # our knobs from the caller's environment
    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(tool)
    for kind in KINDS:
        for i, args in enumerate(CASES[tool]):
            if kind != "missing" and not any("{F}" in a for a in args):
                continue  # no file in it: once is enough
            case = tmp_path / f"{kind}_{i}"
            case.mkdir()
            f = make(case, kind)
            argv = [a.replace("{F}", f) for a in args]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = mod.main(argv)
                except SystemExit as e:  # argparse usage errors, sys.exit("error: ...")
                    rc = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 2)
                except Exception as e:  # noqa: BLE001 (the point of the test)
                    pytest.fail(f"{tool} {args} ({kind}): {type(e).__name__}: {e}")
            text = err.getvalue().strip()
            assert "Traceback" not in text + out.getvalue(), f"{tool} {args} ({kind})"
            if rc:  # a refusal names the problem: an error line, or the tool's own report of what is missing/wrong
                last = text.splitlines()[-1] if text else out.getvalue().strip().splitlines()[-1]
                assert any(w in last for w in ("error:", "MISSING", "check:failed")), f"{tool} {args} ({kind}): {last!r}"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_runs_without_gpu_or_data_and_the_docstring_opens_with_its_question(tool, tmp_path):
    """`python3 tools/<tool>.py --help` from an empty folder, no GPU visible: usage, exit 0. The module
    docstring's first line says what the tool answers and the command that asks it."""
    import ast
    import subprocess

    env = {**clean_environ(), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-1000:]
    assert not any(tmp_path.iterdir())  # nothing written
    first = ast.get_docstring(ast.parse((REPO / "tools" / f"{tool}.py").read_text())).splitlines()[0]
    assert "? `" in first and f"{tool}.py" in first.split("? `", 1)[1], first
