"""Inputs that once gave a wrong result with exit 0, a traceback or a hang in train_gpt.py: two runs on one
artifact path, an artifact path equal to the log, another tokenizer than the artifact's, the code counted
for the wrong knobs, edited artifact headers, a FIFO as EVAL_ARTIFACT, misnamed knobs, a tokenizer check
with nothing to check. Each case must end in one line naming the problem and the fix."""
import json
import os
import threading

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import SP1024, SHARED_DATA, TINY, clean_environ, short_docs_dataset, tiny_env

CPU = tg.Dist(0, 1, 0, torch.device("cpu"))
FOREIGN_1024 = SHARED_DATA / "tokenizers" / "alternates" / "sproos_fineweb_1024_bpe_nobytefallback.model"


def tiny(**over) -> tg.Hyperparameters:
    return tg.Hyperparameters(**{**TINY, **over})


def run_main(monkeypatch, capsys, **env) -> tuple[int, str]:
    for k in list(os.environ):
        if k not in clean_environ():
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    rc = tg.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return rc, err[0]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    """Random ids with a BOS every 50 tokens; byte tables and the tokenizer check stubbed by the tests."""
    import build_shards

    out = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for split, n in (("val", 64 * 8 + 1), ("train", 40_000)):
        toks = rng.integers(2, 1024, n)
        toks[::50] = tg.BOS_ID
        build_shards.write_shard(out / f"fineweb_{split}_000000.bin", toks.astype(np.uint16))
    return out


def synthetic_tokenizer(monkeypatch, code_bytes=lambda h, log=None: (1000 + 7 * (h.compressor == "pergroup") + 13 * h.lqer_top_n, True)):
    vocab = torch.arange(1024)
    boundary = (vocab % 7 == 0) | (vocab == tg.BOS_ID)
    monkeypatch.setattr(tg, "build_byte_luts", lambda path, v, *r: (torch.where(boundary, 0, vocab % 5 + 1), vocab % 3 == 0, boundary))
    monkeypatch.setattr(tg, "check_tokenizer_built_shards", lambda *a, **k: 0)
    monkeypatch.setattr(tg, "counted_code_bytes", code_bytes)  # packing takes seconds; the config it gets is what matters


def hparams(data, log_dir, run_id, **over) -> tg.Hyperparameters:
    return tiny(**{"iterations": 2, "data_path": str(data), "tokenizer_path": "synthetic", "run_id": run_id,
                   "log_dir": str(log_dir), "gptq_calibration_batches": 1, "ttt_enabled": False, **over})


def logged(log_path, head: str) -> str:
    return next(line for line in open(log_path).read().splitlines() if line.startswith(head))


# --- artifacts -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pergroup_lqer(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg")
    with pytest.MonkeyPatch.context() as mp:
        synthetic_tokenizer(mp)
        h = hparams(synth_data, tmp, "pg", compressor="pergroup", lqer_top_n=1)
        assert tg.train_and_eval(h, CPU) == 0
    return h, tmp / "pg.ptz"


def test_eval_only_counts_the_code_for_the_artifacts_knobs(pergroup_lqer, synth_data, tmp_path, monkeypatch):
    h, artifact = pergroup_lqer
    assert logged(artifact.with_suffix(".txt"), "artifact counted_code_bytes:1020 ")  # pergroup (+7) and one LQER tensor (+13)
    synthetic_tokenizer(monkeypatch)
    ev = hparams(synth_data, tmp_path, "ev", eval_artifact=str(artifact))  # brotli, no LQER: its code is smaller
    assert tg.train_and_eval(ev, CPU) == 0
    assert logged(tmp_path / "ev.txt", "artifact counted_code_bytes:1020 ")
    c = tg.code_config(ev, {"compressor": "pergroup", "lqer_top_n": 1, "ttt_enabled": True, "run_id": "x"})
    assert (c.compressor, c.lqer_top_n, c.ttt_enabled, c.run_id) == ("pergroup", 1, False, "ev")  # evals stay this run's


def test_a_run_scores_only_the_bytes_it_wrote(synth_data, tmp_path, monkeypatch):
    """Another run writing the same path between our write and our read-back: refused, not scored."""
    synthetic_tokenizer(monkeypatch)
    make = tg.make_artifact

    def make_then_overwritten(h, *a):
        digest = make(h, *a)
        tensors, info = tg.decode_artifact(open(h.artifact_file, "rb").read())
        info.pop("checksum")
        tensors["tok_emb.weight.scale"] = tensors["tok_emb.weight.scale"] * 2  # another run's weights
        tg.write_artifact(h.artifact_file, tensors, info["state"], h, info["looping"])
        return digest

    monkeypatch.setattr(tg, "make_artifact", make_then_overwritten)
    with pytest.raises(tg.TrainingError, match="not the one this run wrote.*own ARTIFACT_PATH"):
        tg.train_and_eval(hparams(synth_data, tmp_path, "rb"), CPU)
    assert "final_quantized" not in (tmp_path / "rb.txt").read_text()


def test_artifact_path_in_use_by_a_live_run_is_refused(tmp_path, monkeypatch, capsys):
    path = tmp_path / "shared.ptz"
    held, msg = tg.lock_artifact(str(path))
    assert held is not None and msg == ""
    try:
        rc, err = run_main(monkeypatch, capsys, **tiny_env(data_path=str(tmp_path / "nodata"), tokenizer_path=str(SP1024)),
                           RUN_ID="second", LOG_DIR=str(tmp_path), ARTIFACT_PATH=str(path))
    finally:
        held.close()
    assert rc == 2 and "in use by a live run" in err and "ARTIFACT_PATH" in err
    assert not (tmp_path / "second.txt").exists() and not path.exists()
    assert tg.lock_artifact(str(path))[1] == ""  # free again once the holder is gone


def test_artifact_path_equal_to_the_log_is_refused(tmp_path, monkeypatch, capsys):
    rc, err = run_main(monkeypatch, capsys, **tiny_env(data_path=str(tmp_path / "nodata"), tokenizer_path=str(SP1024)),
                       RUN_ID="same", LOG_DIR=str(tmp_path), ARTIFACT_PATH=str(tmp_path / "same.txt"))
    assert rc == 2 and "is this run's log file" in err and not (tmp_path / "same.txt").exists()


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    h = tiny(tokenizer_path=str(SP1024))
    torch.manual_seed(0)
    tensors, meta = tg.quantize_state(tg.GPT(h), h, None)
    path = tmp_path_factory.mktemp("art") / "a.ptz"
    tg.write_artifact(str(path), tensors, meta, h, looping=False)
    return h, path


def test_artifact_records_its_tokenizer(small_artifact, tmp_path):
    h, path = small_artifact
    tg.load_artifact(str(path), h)
    other = tmp_path / "other.model"
    other.write_bytes(SP1024.read_bytes() + b"\0")  # any other file: another tokenizer
    with pytest.raises(tg.ConfigError, match="another tokenizer .*set TOKENIZER_PATH") as e:
        tg.load_artifact(str(path), tiny(tokenizer_path=str(other)))
    assert "\n" not in str(e.value)


def recompressed(path, edit) -> bytes:
    raw = tg.decompress_artifact(open(path, "rb").read())
    n = int.from_bytes(raw[4:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    return tg.compress_artifact(raw[:4] + len(new).to_bytes(4, "little") + new + raw[8 + n :])


def negative_shape(header):
    e = next(e for e in header["tensors"] if len(e["shape"]) == 2)
    e["shape"] = [-e["shape"][0], -e["shape"][1]]


@pytest.mark.parametrize("edit", [negative_shape, lambda hd: hd.update(meta=[1, 2]), lambda hd: hd.update(meta="x"),
                                  lambda hd: hd["tensors"][0].update(offset=-4), lambda hd: hd["tensors"][0].update(shape=[1.5])],
                         ids=["negative_shape", "meta_list", "meta_string", "negative_offset", "float_shape"])
def test_edited_header_is_refused_before_the_checksum(small_artifact, tmp_path, edit):
    h, path = small_artifact
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(recompressed(path, edit))
    with pytest.raises(tg.ConfigError, match=f"^corrupt artifact {bad}: [^\n]+$"):
        tg.load_artifact(str(bad), h)


def test_eval_artifact_must_be_a_regular_file_of_bounded_size(small_artifact, tmp_path, monkeypatch):
    h, path = small_artifact
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = []

    def load():
        try:
            tg.load_artifact(str(fifo), h)
        except tg.ConfigError as e:
            out.append(str(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_artifact blocked on a FIFO")
    assert out and "not a regular file" in out[0] and "EVAL_ARTIFACT" in out[0]
    with pytest.raises(tg.ConfigError, match="not a regular file"):
        tg.load_artifact("/dev/null", h)  # a device, like /dev/zero, which never ends
    monkeypatch.setattr(tg, "ARTIFACT_MAX_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(tg.ConfigError, match="at most"):
        tg.load_artifact(str(path), h)


# --- knobs -------------------------------------------------------------------------------------------


MISNAMED = ["SLIDING_WINDOW", "KV_HEADS", "WEIGHT_DECAY", "LR", "BATCH_SIZE", "HEAD_DIM", "WARMUP_ITERS", "MAX_STEPS",
            "RANDOM_SEED", "EMBED_DIM", "SEQ_LEN", "GRAD_ACCUM_STEPS", "TTT_STEPS", "QK_GAIN", "EVAL_EVERY", "VAL_EVERY",
            "TOKENIZER", "ROPE_THETA", "WARMUP", "EMA", "SEQ_LENGTH", "NUM_EPOCHS", "CLIP", "LORA_DROPOUT", "MOMENTUM",
            "GPTQ_BITS", "EMBED_BITS_TIER", "XSA_LAYERS", "TTT_EPOCH_COUNT"]
SYSTEM = ["OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCH_COMPILE_DEBUG", "TORCHINDUCTOR_MAX_AUTOTUNE", "NCCL_IB_DISABLE",
          "PYTHONHASHSEED", "LD_LIBRARY_PATH", "MASTER_ADDR", "GROUP_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
          "TF_CPP_MIN_LOG_LEVEL", "MAX_JOBS", "XDG_DATA_DIRS", "SLURM_JOB_NUM_NODES", "HOME", "PATH", "SSL_CERT_DIR",
          "MKL_NUM_THREADS", "TRITON_CACHE_DIR", "HF_HOME", "PYTEST_CURRENT_TEST", "LOG_LEVEL",
          "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"]  # set by Inductor in a process that compiled: its children inherit it


@pytest.mark.parametrize("name", MISNAMED)
def test_a_name_sharing_a_word_with_a_knob_is_refused(name):
    with pytest.raises(tg.ConfigError, match=f"^unknown setting {name}=.*(closest knobs: |did you mean )[A-Z_]+.*unset it") as e:
        tg.Hyperparameters.from_env({name: "1"})
    assert "\n" not in str(e.value)


def test_variables_of_the_software_around_a_run_pass():
    h = tg.Hyperparameters.from_env(dict.fromkeys(SYSTEM, "1"))
    assert h == tg.Hyperparameters()
    with pytest.raises(tg.ConfigError, match="closest knobs: NUM_KV_HEADS, NUM_HEADS"):
        tg.Hyperparameters.from_env({"KV_HEADS": "2"})


# --- tokenizer check with nothing whole to re-encode ---------------------------------------------------


@pytest.fixture(scope="module")
def one_doc(shared_data, tmp_path_factory):
    out = short_docs_dataset(tmp_path_factory.mktemp("onedoc"), 8, 1, 3000)
    (out / tg.TOKENIZER_META).unlink()  # published shards come without it
    return out, tg.load_val_tokens(str(out), 64).numpy()


@pytest.mark.parametrize("bos", [True, False], ids=["one_document", "no_bos"])
def test_tokenizer_check_without_two_documents_still_checks(one_doc, bos):
    if not FOREIGN_1024.is_file():
        pytest.skip("alternate tokenizer not in shared data")
    out, val = one_doc
    assert (val == tg.BOS_ID).sum() == 1
    val = val if bos else val[val != tg.BOS_ID]
    assert tg.check_tokenizer_built_shards(str(SP1024), str(out), val) == 1
    with pytest.raises(tg.ConfigError, match="re-encode.*set TOKENIZER_PATH"):
        tg.check_tokenizer_built_shards(str(FOREIGN_1024), str(out), val)
