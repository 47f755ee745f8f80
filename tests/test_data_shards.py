"""Shard files as the trainer and the downloader read them: round trip, header checks, fingerprints."""
import hashlib
import json

import numpy as np
import pytest

from conftest import FINEWEB, SP1024, SP8192

import build_shards as bs
import download_fineweb as dl
import train_gpt as tg


def test_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[0, 1, 65535], rng.integers(0, 65536, size=5000)]).astype(np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    bs.write_shard(path, tokens)
    got = tg.read_shard(str(path))  # the trainer's reader
    np.testing.assert_array_equal(np.asarray(got), tokens)
    assert dl.verify_shard(path) == len(tokens)


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    bs.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert path.stat().st_size == 1024 and len(tg.read_shard(str(path))) == 0


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = (20240521).to_bytes(4, "little")
    elif how == "version":
        data[4:8] = (2).to_bytes(4, "little")
    elif how == "count":
        data[8:12] = (int.from_bytes(data[8:12], "little") + 1).to_bytes(4, "little")
    elif how == "truncated":
        data = data[:-2]
    elif how == "extra":
        data += b"\0\0"
    elif how == "short_header":
        data = data[:1000]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["magic", "version", "count", "truncated", "extra", "short_header"])
def test_header_checks_reject_corrupt_shards(tmp_path, how):
    path = tmp_path / "fineweb_val_000000.bin"
    bs.write_shard(path, np.arange(100, dtype=np.uint16))
    _corrupt(path, how)
    with pytest.raises(tg.ConfigError, match="corrupt shard"):
        tg.read_shard(str(path))
    item = dl.Item("x", path, "shard")
    assert not dl.is_complete(item, 1024)


def test_token_fingerprint_is_sha256_of_little_endian_tokens():
    chunks = [np.array([1, 2, 3], dtype=np.uint16), np.array([65535, 0], dtype=np.int64)]
    want = hashlib.sha256(np.array([1, 2, 3, 65535, 0], dtype="<u2").tobytes()).hexdigest()[:16]
    assert bs.token_fingerprint(chunks) == want
    # Split differently, same stream, same fingerprint.
    assert bs.token_fingerprint([np.array([1], dtype=np.uint16), np.array([2, 3, 65535, 0], dtype=np.uint16)]) == want


def test_text_fingerprint_separates_documents():
    assert bs.text_fingerprint(["ab", "c"]) != bs.text_fingerprint(["a", "bc"])
    assert bs.text_fingerprint(["ab", "c"]) == bs.text_fingerprint(iter(["ab", "c"]))


def test_val_fingerprint_is_stable_across_builds_shard_sizes_and_readers(shared_data, tmp_path):
    """The same documents give the same val fingerprint however the split is cut into files, and the
    downloader's check of stored shards recomputes it; the text fingerprint ignores the tokenizer."""
    summaries = []
    for i, (tok, shard_tokens) in enumerate([(SP1024, 100_000_000), (SP1024, 3000), (SP8192, 3000)]):
        out = tmp_path / f"b{i}"
        summaries.append(bs.build_shards([FINEWEB], tok, out, val_docs=12, shard_tokens=shard_tokens, max_docs=30))
        val_files = sorted(out.glob("fineweb_val_*.bin"))
        stored = dl.val_summary(val_files)
        assert stored["val_docs"] == 12
        assert stored["val_tokens"] == summaries[-1]["val_tokens"]
        assert stored["val_fingerprint"] == summaries[-1]["val_fingerprint"]
    a, b, c = summaries
    assert len(b["val_files"]) > 1 == len(a["val_files"])
    assert a["val_fingerprint"] == b["val_fingerprint"]
    assert c["val_fingerprint"] != a["val_fingerprint"]  # other tokenizer, other tokens
    assert a["val_text_fingerprint"] == b["val_text_fingerprint"] == c["val_text_fingerprint"]
    with open(FINEWEB, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(12), f)]
    assert a["val_text_fingerprint"] == bs.text_fingerprint(texts)
