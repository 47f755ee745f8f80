"""Shared fixtures: a small real-text dataset built from ../shared/data and a tiny model config."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FINEWEB = SHARED_DATA / "corpus" / "fineweb_docs_sample200.jsonl"
SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
SP8192 = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

# Tiny config exercising every feature of the record config: recurrence, U-net skips with gates,
# two parallel lanes, XSA, partial RoPE, GQA.
TINY = dict(
    vocab_size=1024, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
    xsa_last_n=4, loop_start=1, loop_end=2, num_loops=1, parallel_residual_start=2,
    train_batch_tokens=8 * 2 * 64, train_seq_len=64, eval_seq_len=64, val_batch_tokens=32 * 64,
    iterations=30, max_wallclock_seconds=0.0, gptq_reserve_seconds=0.0, warmup_steps=0,
    muon_momentum_warmup_steps=10, train_log_every=10, val_loss_every=0, ema_decay=0.9,
    matrix_lr=0.03, tied_embed_lr=0.05, sliding_window_enabled=False, ttt_enabled=False, lora_ttt_enabled=False, ngram_tilt=False,
    eval_stride=16,
    ttt_chunk_tokens=512,
)


def tiny_env(**over) -> dict:
    """TINY as env vars (for subprocess runs), plus overrides."""
    env = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in {**TINY, **over}.items()}
    return env


def clean_environ() -> dict:
    """The current environment minus anything that could be read as one of our knobs."""
    import train_gpt

    known = {f.name.upper() for f in train_gpt.fields(train_gpt.Hyperparameters)}
    return {k: v for k, v in os.environ.items() if k not in known}


def short_docs_dataset(out: Path, n_docs: int, val_docs: int, chars: int, **kw) -> Path:
    """sp1024 shards in out of the first n_docs FineWeb docs, the val_docs validation ones cut to
    chars characters (short eval runs); kw goes to build_shards."""
    import json

    import build_shards

    docs = [json.loads(l) for l in FINEWEB.read_text(encoding="utf-8").splitlines()[:n_docs]]
    for doc in docs[:val_docs]:
        doc["text"] = doc["text"][:chars]
    out.mkdir(parents=True, exist_ok=True)
    (out / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    build_shards.build_shards([out / "docs.jsonl"], SP1024, out, val_docs=val_docs, **kw)
    return out


@pytest.fixture(scope="session")
def shared_data():
    if not (FINEWEB.is_file() and SP1024.is_file()):
        pytest.skip(f"shared data not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dataset(shared_data, tmp_path_factory) -> Path:
    """20 FineWeb docs of validation, 180 of training, sp1024, two train shards."""
    import build_shards

    out = tmp_path_factory.mktemp("sp1024")
    build_shards.build_shards([FINEWEB], SP1024, out, val_docs=20, shard_tokens=300_000)
    return out
