"""tools/gpu_check.py: the dry run, every step at CPU size, and the step runner's failure handling."""
import argparse
import re
import subprocess
import sys

import pytest

from conftest import REPO, SP1024, clean_environ, short_docs_dataset

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

SCRIPT = REPO / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def small_data(shared_data, tmp_path_factory):
    """2 validation documents cut to 4,000 characters (~3.3k tokens: more than the record's EVAL_SEQ_LEN 2560,
    which the dry run's compile plan reads the validation split at) and 28 training documents, sp1024."""
    return short_docs_dataset(tmp_path_factory.mktemp("gpu_check") / "sp1024", 30, 2, 4000)


def run_check(*args, timeout=900):
    env = {**clean_environ(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_dry_run_prints_the_plan_and_checks_inputs(small_data, tmp_path):
    res = run_check("--dry-run", "--out", tmp_path / "rep", "--data", small_data, "--tokenizer", SP1024)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for n, name, *_ in gpu_check.STEPS:  # 1, 2, 4, 5 by default on a GPU; bench and losses by themselves
        assert (f"step {n} {name} " in out) == (n in (1, 2, 4, 5)), n
    assert "MAX_WALLCLOCK_SECONDS=20" in out and "--compare ''" not in out and out.rstrip().endswith("inputs:ok budget:ok")
    projected = [int(m) for m in re.findall(r"projected:(\d+)s", out)]
    assert len(projected) == 4 and sum(projected) <= 560
    # the record eval's graphs: the scorer (with and without n-gram hints), the phased SGD loss, the LoRA step, AdamW
    step2, step4 = out.split("step 2 ")[1].split("step 4 ")
    assert "compiles:score=2 loss=1 lora=3 adamw=2 " in step2 and "--stage plain lora_ttt" in step4
    assert "compiles:train=2 " in step4 and " lora=3 adamw=2 " in step4 and "PHASED_PREFIX_DOCS=6" in step4
    assert not (tmp_path / "rep").exists()  # a dry run writes nothing
    missing = run_check("--dry-run", "--out", tmp_path / "rep", "--data", tmp_path / "nothing", "--tokenizer", SP1024)
    assert missing.returncode == 2
    assert f"missing: val shards in {tmp_path / 'nothing'}: run python3 tools/gpu_check.py --prepare" in missing.stdout
    assert missing.stdout.rstrip().endswith("inputs:MISSING budget:unknown")


def test_cpu_sized_check_runs_steps_1_to_5(small_data, tmp_path):
    out, work = tmp_path / "rep", tmp_path / "work"
    res = run_check("--cpu-sized", "--steps", "1-5", "--cap", 3000, "--out", out, "--work", work, "--data", small_data,
                    "--tokenizer", SP1024, timeout=3000)
    report = (out / "report.md").read_text()
    assert res.returncode == 0, report + res.stderr[-2000:]
    for n, name, *_ in gpu_check.STEPS[:5]:
        assert f"| {n} | {name} | ok |" in report
    assert not re.search(r"^\| 6 \|", report, re.M)  # no step-6 row (a duration of 6 s is no row)
    assert "attention:sdpa" in report and "compile target:train_step looping:1" in report
    for target in ("eval_scorer", "sgd_loss", "lora_adamw", "lora_step"):
        assert f"compile target:{target} " in report, target
    assert "[compare_compile] compare mode:looping_on" in report
    for label in ("train_clock:", "artifact counted_code_bytes:", "final_quantized", "final_lora_ttt", "lora_ttt_phase 1/1 ",
                  "projected final_lora_ttt", "result:ok"):
        assert label in report, label
    assert "final_sliding" not in report and "final_ttt" not in report  # not record stages
    figures = report.split("## Figures")[1].split("\n## ")[0]
    for label in ("- compile train_step looping:1:", "- compile lora_step looping:1:", "- looping_on: ", "tokens/s per GPU",
                  "- final_lora_ttt ", "- lora_ttt_work positions_per_target:", "- artifact counted_code_bytes:",
                  "- projected final_quantized", "tools/bench_eval.py --project", "- causality targets:"):
        assert label in figures, label
    assert " stages:plain+lora_ttt " in figures and "result:ok" in figures.split("- causality targets:")[1]
    # the phased SGD trained before the second document, and causality checked the targets around its start
    assert re.search(r"^lora_ttt_phase 1/1 docs:1 targets:\d+ sgd_chunks:[1-9]", report, re.M)
    tg = gpu_check.tg_module()
    second = int(tg.doc_spans(tg.load_val_tokens(str(small_data), 64))[0][1])
    for p in (second - 1, second, second + 1):
        assert re.search(rf"^stage:lora_ttt tilt:1 p:{p} .* causal:1$", report, re.M), p
    logs = {p.name for p in out.iterdir()}
    assert {"1_versions_versions.log", "3_bench_compare_compile.log", "4_pipeline_gpu_check.txt",
            "5_causality_causality.log", "plan.txt"} <= logs
    assert not list(out.glob("*.ptz"))  # the artifact stays in --work


def test_loss_step_on_cpu_twice_is_bit_identical(small_data, tmp_path, monkeypatch, capsys):
    """Step 6's runner (in-process, CPU as both sides): same init and data -> identical losses."""
    args = argparse.Namespace(cpu_sized=True, out=str(tmp_path), work=None, data=str(small_data), tokenizer=str(SP1024))
    ctx = gpu_check.Ctx(args)
    device_cmd, cpu_cmd = gpu_check.cmds_losses(ctx)
    assert device_cmd.argv[-2:] == ["--device", "cpu"] and cpu_cmd.argv[-2:] == ["--device", "cpu"]
    for k, v in {**ctx.env(), **cpu_cmd.env}.items():
        monkeypatch.setenv(k, v)
    runs = []
    for label in ("device", "cpu_fp32"):
        assert gpu_check.internal_losses("cpu") == 0
        runs += [f"[{label}] {l}" for l in capsys.readouterr().out.splitlines()]
    assert len(runs) == 8 and runs[0].startswith("[device] loss step:1 value:")
    rows, verdict = gpu_check.loss_table(runs, 4)
    assert verdict.startswith("steps_compared:4 first_abs_diff:0.0000 max_abs_diff:0.0000 verdict:ok"), verdict


def fake_step(n, name, argv, needs=False):
    return (n, name, name, lambda ctx: [gpu_check.Cmd(name, argv)], r"^out", needs)


def test_failed_and_timed_out_steps_do_not_stop_the_rest(monkeypatch, small_data, tmp_path):
    py = sys.executable
    monkeypatch.setattr(gpu_check, "STEPS", [
        fake_step(1, "crash", [py, "-c", "print('out 1'); raise SystemExit(3)"]),
        fake_step(2, "hang", [py, "-c", "import time; print('out 2', flush=True); time.sleep(60)"]),
        fake_step(3, "fine", [py, "-c", "print('out 3')"]),
        fake_step(5, "needs_artifact", [py, "-c", "print('out 5')"], needs=True),
    ])
    monkeypatch.setitem(gpu_check.SIZES["cpu"], "caps", {1: 30, 2: 2, 3: 30, 5: 30})
    rc = gpu_check.main(["--cpu-sized", "--out", str(tmp_path / "rep"), "--work", str(tmp_path / "w"),
                         "--data", str(small_data), "--tokenizer", str(SP1024), "--steps", "1-3,5"])
    report = (tmp_path / "rep" / "report.md").read_text()
    assert rc == 1
    assert "| 1 | crash | crash: failed (exit 3) |" in report
    assert "| 2 | hang | hang: timeout (2s) |" in report and "out 2" in report
    assert "| 3 | fine | ok |" in report and "out 3" in report
    assert "| 5 | needs_artifact | skipped (no artifact: step 4 did not write one) |" in report


def test_loss_table_verdict():
    lines = [f"[{lab}] loss step:{s} value:{v + (0.001 * s if lab == 'device' else 0):.4f}"
             for s, v in ((1, 9.0), (2, 8.5), (3, 8.0)) for lab in ("device", "cpu_fp32")]
    rows, verdict = gpu_check.loss_table(lines, 3)
    assert rows[2] == "| 1 | 9.0010 | 9.0000 | 0.0010 |" and verdict.endswith("verdict:ok (bounds 0.02/0.1)")
    assert "verdict:CHECK" in gpu_check.loss_table(lines, 20)[1]  # steps missing
    bad = lines + ["[device] loss step:4 value:7.5", "[cpu_fp32] loss step:4 value:7.3"]
    assert "max_abs_diff:0.2000 verdict:CHECK" in gpu_check.loss_table(bad, 4)[1]


def test_eval_projection_scales_to_full_split_on_8_gpus():
    lines = ["val_tokens:100000 val_bytes:1", "final_quantized val_loss:1 val_bpb:1 eval_time:2000ms",
             "final_lora_ttt val_loss:1 val_bpb:1 eval_time:30000ms"]
    plain, lora = gpu_check.eval_projection(lines)
    assert plain.endswith(f"-> {2.0 * 40_540_160 / 100_000 / 8:.1f}s on 40540160 targets over 8 GPUs")
    # the LoRA stage is not linear in the targets: measured time and the projection that models it
    assert lora.startswith("projected final_lora_ttt measured:30.00s on 100000 targets, not scaled")
    assert lora.endswith("tools/bench_eval.py --project --stages plain lora_ttt") and "->" not in lora


def test_dry_run_fails_when_a_step_is_projected_over_its_cap(small_data, tmp_path, monkeypatch, capsys):
    """Planned compiles x seconds each + the rest of the step against each cap: a slower compile
    than the budget assumes (or more buckets) makes the dry run exit 2 and name the step."""
    args = ["--dry-run", "--out", str(tmp_path / "rep"), "--data", str(small_data), "--tokenizer", str(SP1024)]
    assert gpu_check.main(args) == 0
    before = dict(re.findall(r"^step (\d) .*\n  compiles:.* projected:(\d+)s", capsys.readouterr().out, re.M))
    monkeypatch.setitem(gpu_check.COMPILE_S, "train", 70.0)
    assert gpu_check.main(args + ["--steps", "3"]) == 2
    out = capsys.readouterr().out
    assert "OVER_CAP step 3: projected 152s > cap 95s" in out and out.rstrip().endswith("budget:OVER")
    # 30 s more per LoRA step graph: step 2 compiles all three cold, step 4 finds them warm
    monkeypatch.setitem(gpu_check.COMPILE_S, "train", 40.0)
    monkeypatch.setitem(gpu_check.COMPILE_S, "lora", 70.0)
    assert gpu_check.main(args) == 2
    out = capsys.readouterr().out
    after = dict(re.findall(r"^step (\d) .*\n  compiles:.* projected:(\d+)s", out, re.M))
    assert int(after["2"]) - int(before["2"]) == 90 and int(after["4"]) - int(before["4"]) in (31, 32, 33)
    assert f"OVER_CAP step 2: projected {after['2']}s > cap 205s" in out and "OVER_CAP step 4" in out


def test_rerun_removes_the_previous_runs_logs(small_data, tmp_path, monkeypatch):
    """A second run on the same machine: the step-4 log of the first (RUN_ID=gpu_check refuses to run
    over it), its artifact and its step logs are gone before the steps start."""
    work, out = tmp_path / "w", tmp_path / "rep"
    work.mkdir()
    out.mkdir()
    for p in (work / "gpu_check.txt", work / "gpu_check.ptz", out / "4_pipeline_train_gpt.log"):
        p.write_text("first run")
    probe = f"import os, sys; left = [p for p in os.listdir({str(work)!r}) if p.startswith('gpu_check')]; print('out', left); sys.exit(bool(left))"
    monkeypatch.setattr(gpu_check, "STEPS", [fake_step(4, "pipeline", [sys.executable, "-c", probe])])
    rc = gpu_check.main(["--cpu-sized", "--out", str(out), "--work", str(work), "--data", str(small_data),
                         "--tokenizer", str(SP1024), "--steps", "4"])
    assert rc == 0, (out / "report.md").read_text()
    assert (out / "4_pipeline_pipeline.log").is_file() and not (out / "4_pipeline_train_gpt.log").exists()
