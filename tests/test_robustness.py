"""Hostile inputs and faults: each must end in one line and the right exit status, never in a wrong
score with exit 0, a traceback or a lost or mixed-up run."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import build_shards as bs
import train_gpt as tg
from conftest import FINEWEB, REPO, SP1024, SP8192, TINY, clean_environ, tiny_env

sys.path.insert(0, str(REPO / "tools"))
import runlog  # noqa: E402
import sweep  # noqa: E402

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-2000:]
    return lines[0]


def run_train(env_over: dict, tmp_path, **kw):
    env = {**clean_environ(), **env_over, "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, **kw)


# --- configuration ranges ------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("MATRIX_LR", "nan"), ("TTT_LR", "nan"), ("LOGIT_SOFTCAP", "inf"), ("MATRIX_LR", "-1"), ("EMA_DECAY", "1.5"),
    ("ITERATIONS", "-5"), ("SEED", "-1"), ("NUM_HEADS", "0"), ("BETA2", "1"), ("ADAM_EPS", "0"), ("LORA_LR", "-1e-4"),
    ("PHASED_MOMENTUM", "1.5"),
])
def test_out_of_range_values_are_refused_at_parse_time(key, value):
    with pytest.raises(tg.ConfigError) as e:
        tg.Hyperparameters.from_env({key: value})
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value)


def test_boundary_values_still_parse():
    h = tg.Hyperparameters.from_env({"SEED": "0", "EMA_DECAY": "0", "ITERATIONS": "0", "MATRIX_LR": "0", "MIN_LR": "1"})
    assert (h.seed, h.ema_decay, h.iterations) == (0, 0.0, 0)
    assert tg.Hyperparameters.from_env({"SEED": str(2**32 - 1)}).seed == 2**32 - 1


def test_nonfinite_score_is_an_error_not_a_result(tmp_path):
    log = tg.Logger(CPU, str(tmp_path / "r.txt"))
    with pytest.raises(tg.TrainingError, match="ttt.*val_bpb:nan"):
        tg.timed_eval("ttt", tiny(), CPU, log, lambda c: (tg.EvalResult(float("nan"), float("nan"), 10, 25), None))
    tg.timed_eval("quantized", tiny(), CPU, log, lambda c: (tg.EvalResult(2.0, 1.5, 10, 25), None))
    assert "final_ttt" not in (tmp_path / "r.txt").read_text() and "final_quantized" in (tmp_path / "r.txt").read_text()


# --- tokenizer and shards ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_1024(shared_data, tmp_path_factory):
    """Another 1024-piece BPE tokenizer, trained like the published one on different documents."""
    import train_tokenizer as tt

    texts = [json.loads(l)["text"] for l in FINEWEB.read_text(encoding="utf-8").splitlines()[100:]]
    path = tmp_path_factory.mktemp("tok") / "other_1024.model"
    path.write_bytes(tt.train_tokenizer(iter(texts), 1024))
    return path


@pytest.fixture(scope="module")
def no_meta(dataset, tmp_path_factory):
    """The shared dataset without the tokenizer record, as published shards come."""
    out = tmp_path_factory.mktemp("nometa") / "ds"
    shutil.copytree(dataset, out, ignore=shutil.ignore_patterns(tg.TOKENIZER_META))
    return out


def val_of(path) -> np.ndarray:
    return tg.load_val_tokens(str(path), 64).numpy()


def test_exporter_records_the_tokenizer(dataset):
    meta = json.loads((dataset / tg.TOKENIZER_META).read_text())
    assert meta["sha256"] == tg.file_sha256(str(SP1024)) and meta["vocab_size"] == 1024
    assert tg.check_tokenizer_built_shards(str(SP1024), str(dataset), val_of(dataset)) > 0


def test_same_size_tokenizer_is_caught_by_the_record(dataset, other_1024):
    with pytest.raises(tg.ConfigError, match="sha256.*TOKENIZER_PATH"):
        tg.check_tokenizer_built_shards(str(other_1024), str(dataset), val_of(dataset))


@pytest.mark.parametrize("which", ["other_1024", "sp8192"])
def test_wrong_tokenizer_is_caught_without_metadata(which, no_meta, other_1024):
    path = other_1024 if which == "other_1024" else SP8192
    assert tg.check_tokenizer_built_shards(str(SP1024), str(no_meta), val_of(no_meta)) > 0
    with pytest.raises(tg.ConfigError, match="re-encode"):
        tg.check_tokenizer_built_shards(str(path), str(no_meta), val_of(no_meta))


def test_tokenizer_without_byte_fallback_passes_its_own_shards(shared_data, tmp_path):
    """<unk> does not survive decode + encode; such documents are skipped, not counted as a mismatch."""
    nobf = shared_data / "tokenizers" / "alternates" / "sproos_fineweb_1024_bpe_nobytefallback.model"
    if not nobf.is_file():
        pytest.skip("alternate tokenizer not in shared data")
    bs.build_shards([FINEWEB], nobf, tmp_path / "ds", val_docs=60, max_docs=61)
    (tmp_path / "ds" / tg.TOKENIZER_META).unlink()  # the check that needs no record
    val = tg.load_val_tokens(str(tmp_path / "ds"), 64).numpy()
    assert 0 < tg.check_tokenizer_built_shards(str(nobf), str(tmp_path / "ds"), val) < 60
    with pytest.raises(tg.ConfigError, match="re-encode"):
        tg.check_tokenizer_built_shards(str(SP1024), str(tmp_path / "ds"), val)


def test_wrong_tokenizer_stops_the_run_before_training(no_meta, other_1024, tmp_path):
    r = run_train(tiny_env(data_path=str(no_meta), tokenizer_path=str(other_1024), run_id="tok", iterations=1), tmp_path)
    assert r.returncode == 2 and "re-encode" in one_line(r.stderr)
    log = (tmp_path / "logs" / "tok.txt").read_text()
    assert "final_" not in log and log.splitlines()[-1] == one_line(r.stderr)  # the error is in the log too


def test_tokenizer_that_is_not_a_model(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_text("not a model\n")
    with pytest.raises(tg.ConfigError, match="not a SentencePiece model"):
        tg.build_byte_luts(str(bad), 1024)


def test_training_ids_beyond_vocab_stop_before_training(dataset, tmp_path):
    bad = tmp_path / "ds"
    shutil.copytree(dataset, bad)
    shard = sorted(bad.glob("fineweb_train_*.bin"))[-1]
    tokens = np.asarray(tg.read_shard(str(shard))).copy()
    tokens[len(tokens) // 2] = 1500
    shard.unlink()
    bs.write_shard(shard, tokens)
    h = tiny(data_path=str(bad), tokenizer_path=str(SP1024), run_id="ids", log_dir=str(tmp_path / "logs"), iterations=2)
    with pytest.raises(tg.ConfigError, match=f"{shard}.*1500 >= VOCAB_SIZE=1024"):
        tg.train_and_eval(h, CPU)
    assert not (tmp_path / "logs" / "ids.ptz").exists()


# --- artifact ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    h = tiny()
    torch.manual_seed(0)
    tensors, meta = tg.quantize_state(tg.GPT(h), h, None)
    path = tmp_path_factory.mktemp("art") / "a.ptz"
    tg.write_artifact(str(path), tensors, meta, h, looping=True)
    return h, path, tensors, meta


@pytest.mark.parametrize("knob, value, hint", [
    ("ln_scale", False, "LN_SCALE=1"), ("xsa_last_n", 0, "XSA_LAST_N=4"), ("logit_softcap", 5.0, "LOGIT_SOFTCAP=30.0"),
    ("rope_dims", 4, "ROPE_DIMS=8"), ("rope_base", 100.0, "ROPE_BASE=10000.0"), ("doc_mask", False, "DOC_MASK=1"),
])
def test_artifact_refuses_other_forward_knobs(artifact, knob, value, hint):
    h, path, _, _ = artifact
    tg.load_artifact(str(path), h)
    with pytest.raises(tg.ConfigError, match=f"{knob.upper()}=.*set {hint}"):
        tg.load_artifact(str(path), dataclasses.replace(h, **{knob: value}))


def test_artifact_made_with_a_non_default_knob_needs_it(tmp_path):
    h = tiny(ln_scale=False, logit_softcap=20.0)
    tensors, meta = tg.quantize_state(tg.GPT(h), h, None)
    tg.write_artifact(str(tmp_path / "b.ptz"), tensors, meta, h, looping=False)
    tg.load_artifact(str(tmp_path / "b.ptz"), h)
    with pytest.raises(tg.ConfigError, match="set LN_SCALE=0"):
        tg.load_artifact(str(tmp_path / "b.ptz"), dataclasses.replace(h, ln_scale=True))


def test_corrupted_then_recompressed_artifact_is_refused(artifact, tmp_path):
    h, path, _, _ = artifact
    raw = bytearray(tg.decompress_artifact(path.read_bytes()))
    raw[-100] ^= 0x40  # one bit of a tensor; the container still parses
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(tg.compress_artifact(bytes(raw)))
    tg.deserialize_tensors(bytes(raw))
    with pytest.raises(tg.ConfigError, match=f"corrupt artifact {bad}: payload checksum"):
        tg.load_artifact(str(bad), h)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_full_disk_keeps_the_artifact_elsewhere(artifact, tmp_path, monkeypatch, code):
    h, _, tensors, meta = artifact
    dest, spare = tmp_path / "logs" / "run.ptz", tmp_path / "spare"
    spare.mkdir()
    real_open = open

    class FullDisk:  # writes half, then fails like a full disk or a file-size limit
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(tg, "open", lambda p, m="r", *a, **k: FullDisk(p, m) if str(p).startswith(str(dest)) else real_open(p, m, *a, **k),
                        raising=False)
    monkeypatch.setattr(tg.tempfile, "tempdir", str(spare))
    with pytest.raises(tg.TrainingError) as e:
        tg.write_artifact(str(dest), tensors, meta, h, looping=True)
    kept = next(spare.glob("run_*.ptz"))
    assert os.strerror(code) in str(e.value) and f"EVAL_ARTIFACT={kept}" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in dest.parent.iterdir()) == []  # no .ptz.tmp left behind
    state, looping = tg.load_artifact(str(kept), h)
    assert looping and all(torch.equal(state[k], v) for k, v in tg.dequantize_state(tensors, meta).items())
    # nowhere to keep it: said so in the same one line
    monkeypatch.setattr(tg.tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(tg.TrainingError, match="trained weights are lost"):
        tg.write_artifact(str(dest), tensors, meta, h, looping=True)


# --- the process: exit statuses, ranks, interrupts, RUN_ID -----------------------------------------


def test_config_error_prints_once_on_rank_zero_and_exits_2_everywhere(monkeypatch, capsys):
    monkeypatch.setenv("SEED", "-1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert tg.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: SEED=-1")


def test_reused_run_id_is_refused_and_loses_nothing(dataset, tmp_path, monkeypatch, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "same.ptz").write_bytes(b"earlier artifact")
    for k, v in {**tiny_env(data_path=str(dataset), tokenizer_path=str(SP1024), iterations=1), "RUN_ID": "same",
                 "LOG_DIR": str(logs)}.items():
        monkeypatch.setenv(k, v)
    assert tg.main() == 2
    assert "RUN_ID=same was already used" in one_line(capsys.readouterr().err)
    assert (logs / "same.ptz").read_bytes() == b"earlier artifact" and not (logs / "same.txt").exists()


def test_second_writer_on_a_log_is_refused(tmp_path):
    first = tg.Logger(CPU, str(tmp_path / "x.txt"))
    first("line")
    with pytest.raises(tg.ConfigError, match="being written by another process"):
        tg.Logger(CPU, str(tmp_path / "x.txt"))
    assert sweep.log_in_use(tmp_path / "x.txt")
    first.file.close()
    assert not sweep.log_in_use(tmp_path / "x.txt")


def wait_for(pred, timeout=300):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.2)


def test_ctrl_c_is_one_line_and_exit_130(dataset, tmp_path):
    env = {**clean_environ(), **tiny_env(data_path=str(dataset), tokenizer_path=str(SP1024), iterations=100000,
                                         train_log_every=1, run_id="int"), "LOG_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "int.txt").is_file() and "train_loss" in (tmp_path / "int.txt").read_text())
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted" in one_line(err)


# --- tools: runlog and sweep ---------------------------------------------------------------------


def synthetic_log(run_id: str, bpb: str) -> str:
    return "\n".join([
        f"run_id:{run_id}", "hp seed:1", "val_tokens:100 val_bytes:250", "train_steps:5 train_time:1000ms budget:0.0s",
        "final_pre_quant val_loss:3.0 val_bpb:1.70 eval_time:10ms",
        "artifact bytes_code:10 bytes_model:20 bytes_total:30 limit:16000000 headroom:1 code_packed:1 path:a.ptz",
        f"final_quantized val_loss:3.1 val_bpb:{bpb} eval_time:10ms",
        "eval_budget used:1.0s limit:600s stages:load+quantized",
    ]) + "\n"


def test_runlog_ranks_nan_and_missing_scores_last_and_marks_them(tmp_path):
    runs = [runlog.parse_log(synthetic_log(i, b), i) for i, b in (("a", "1.9"), ("n", "nan"), ("b", "1.8"))]
    runs.append(runlog.parse_log("run_id:m\n", "m"))
    header, rows = runlog.table_rows(runs, status={"n": "ok"})
    col = {h: i for i, h in enumerate(header)}
    assert [r[col["run_id"]] for r in rows] == ["b", "a", "n", "m"]
    assert [r[col["status"]] for r in rows] == ["ok", "ok", "ok (score nan)", "incomplete (no score)"]
    assert not runs[1].complete and "not a score" in runs[1].missing()[0]


def test_runlog_csv_into_a_missing_folder(tmp_path):
    (tmp_path / "a.txt").write_text(synthetic_log("a", "1.9"))
    out = tmp_path / "new" / "dir" / "t.csv"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "runlog.py"), str(tmp_path / "a.txt"), "--csv", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines()[1].split(",")[1] == "a"


def test_binary_sweep_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "grid.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert sweep.main([str(bad), "--out", str(tmp_path / "out"), "--nproc", "0"]) == 2
    assert "not text" in one_line(capsys.readouterr().err)


def test_stopping_a_sweep_stops_its_run_and_a_second_sweep_is_refused(dataset, tmp_path):
    (tmp_path / "long.txt").write_text("SEED=1\n")
    env = {**clean_environ(), **tiny_env(data_path=str(dataset), tokenizer_path=str(SP1024), iterations=100000,
                                         train_log_every=1, preset=""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tools" / "sweep.py"), "long.txt", "--out", "out", "--nproc", "0"]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        log = tmp_path / "out" / "long_1.txt"
        wait_for(lambda: log.is_file() and "train_loss" in log.read_text())
        second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another sweep" in one_line(second.stderr)
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
        child = int(out.split("pid:")[1].split()[0])
        assert first.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in one_line(err)
        size = log.stat().st_size
        time.sleep(1.0)
        assert log.stat().st_size == size and not sweep.log_in_use(log)
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:
        first.kill()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
