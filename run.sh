#!/usr/bin/env bash
# ./run.sh           set up and run the main job: the record config on every visible GPU (torchrun) on the
#                    published CaseOps export (lossless case transform, val_bpb on the original bytes
#                    through the byte sidecar), downloading it first if missing, or without a GPU the tiny
#                    smoke preset on CPU, on data found on this machine (no network needed). Env vars pass
#                    through. CASEOPS=0 ./run.sh: the plain sp8192 export on GPUs; CASEOPS=1 ./run.sh
#                    without a GPU: a CaseOps corpus built from ../shared/data.
# ./run.sh test ...  set up and run the test suite; extra args go to pytest.
# ./run.sh sweep FILE [...]  one main-job run per line of env overrides, then a summary table
#                    (tools/sweep.py --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

MODE=main
if [[ "${1:-}" == "test" || "${1:-}" == "sweep" ]]; then
    MODE=$1
    shift
elif [[ $# -gt 0 ]]; then
    echo "usage: ./run.sh [test [pytest args...] | sweep FILE [options]]  (configure the main job with env vars)" >&2
    exit 2
fi
# The Python to use, with what MODE needs installed: python3, or the project's .venv where python3
# refuses pip installs (PEP 668); torch's CPU build when no NVIDIA GPU is visible (tools/setup_env.py).
PY=$(python3 tools/setup_env.py "$MODE") || exit $?
if [[ $MODE == test ]]; then
    exec "$PY" -m pytest -q tests "$@"
fi
if [[ $MODE == sweep ]]; then
    repo=$PWD
    cd "$OLDPWD"  # FILE and --out are relative to where ./run.sh was called
    exec "$PY" "$repo/tools/sweep.py" "$@"
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" | tail -n 1)
if (( NGPU == 0 )) && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    echo "run.sh: nvidia-smi lists a GPU but this torch ($("$PY" -c "import torch; print(torch.__version__)")) cannot use it; install a CUDA build of torch to train on it" >&2
fi
if [[ -n "${CASEOPS+set}" && "${CASEOPS}" != 0 && "${CASEOPS}" != 1 ]]; then
    echo "error: CASEOPS=$CASEOPS; use CASEOPS=1 for CaseOps data (default on GPUs) or 0 for the plain data" >&2
    exit 2
fi

if (( NGPU >= 1 )); then
    if [[ -z "${DATA_PATH+set}" ]]; then
        # Download the published data for the paths train_gpt.py will read (preset and env applied: the
        # CaseOps export unless CASEOPS=0) when the validation split, its byte sidecar or the tokenizer is
        # missing, or TRAIN_SHARDS asks for a number of shards; then the tokenizer the download names.
        PATHS=$("$PY" -c 'import sys, train_gpt as t
try: h = t.Hyperparameters.from_env()
except t.ConfigError as e: sys.exit(f"error: {e}")
print(f"sp{h.vocab_size}{t.CASEOPS_SUFFIX * h.caseops}", int(h.caseops), h.dataset_dir, h.tokenizer_file, sep="\n")')
        { read -r VARIANT; read -r SIDECAR; read -r DATASET; read -r TOKENIZER; } <<< "$PATHS"
        if [[ -n "${TRAIN_SHARDS:-}" || ! -f "$DATASET/fineweb_val_000000.bin" || ! -f "$TOKENIZER" \
              || ( $SIDECAR == 1 && ! -f "$DATASET/fineweb_val_bytes_000000.bin" ) ]]; then
            OUT=$("$PY" data/download_fineweb.py --variant "$VARIANT" --train-shards "${TRAIN_SHARDS:-80}" --data-dir "${DATA_DIR:-./data}" | tee /dev/stderr)
            export TOKENIZER_PATH=${TOKENIZER_PATH-$(sed -n 's/^tokenizer://p' <<< "$OUT")}
        fi
    fi
    NPROC=$NGPU
    while (( 8 % NPROC != 0 )); do NPROC=$((NPROC - 1)); done  # grad accumulation is 8 / world size
    if (( NPROC != NGPU )); then
        echo "run.sh: $NGPU GPUs visible; the GPU count must divide 8, so using $NPROC" >&2
    fi
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_gpt.py  # = torchrun
fi

# No GPU: the tiny smoke preset on CPU. Data, first found: DATA_PATH (+ TOKENIZER_PATH) if set; the
# sample corpora in ../shared/data beside the repo; else a corpus built once, offline, from the
# documentation of this Python installation (LOCAL_CORPUS_DOCS=N limits it to N documents).
SHARED=../shared/data
if [[ -n "${DATA_PATH+set}" ]]; then
    SMOKE=$DATA_PATH
    TOKENIZER=${TOKENIZER_PATH-}
elif [[ "${CASEOPS:-0}" == 1 && -d "$SHARED/corpus" ]]; then
    # The same documents as the plain smoke corpus, transformed, with a 1024-piece CaseOps tokenizer trained on them.
    SMOKE=data/datasets/smoke_caseops_sp1024
    TOKENIZER=data/tokenizers/smoke_caseops_1024_bpe.model
    echo "corpus source:$SHARED/corpus (FineWeb sample + enwiki sample, CaseOps) tokenizer:$TOKENIZER dataset:$SMOKE"
    if [[ ! -f "$SMOKE/fineweb_val_bytes_000000.bin" || ! -f "$TOKENIZER" ]]; then
        # Tokenizer and shards are built together in a scratch folder and moved in only when both are whole:
        # an interrupted build leaves nothing behind and removes nothing; a half-built dataset is moved aside.
        mkdir -p "$(dirname "$SMOKE")" "$(dirname "$TOKENIZER")"
        BUILD=$(mktemp -d "$(dirname "$SMOKE")/.smoke_caseops_build.XXXXXX")
        trap 'rm -rf "$BUILD"' EXIT
        "$PY" data/build_shards.py \
            --input "$SHARED/corpus/fineweb_docs_sample200.jsonl" "$SHARED/corpus/enwiki_2015_wikiextractor_sample.jsonl" \
            --vocab-size 1024 --caseops --tokenizer-out "$BUILD/$(basename "$TOKENIZER")" --out "$BUILD/data" \
            --val-docs 50 --max-docs 1200
        for OLD in "$SMOKE" "$TOKENIZER"; do
            if [[ -e "$OLD" ]]; then
                mv "$OLD" "$OLD.incomplete.$(date +%s)" && echo "run.sh: moved the incomplete $OLD aside to $OLD.incomplete.*" >&2
            fi
        done
        mv "$BUILD/$(basename "$TOKENIZER")" "$TOKENIZER"
        mv "$BUILD/data" "$SMOKE"
        rm -rf "$BUILD"
        trap - EXIT
    fi
elif [[ "${CASEOPS:-0}" == 1 ]]; then
    echo "error: CASEOPS=1 without a GPU needs the sample corpora in $SHARED/corpus (or DATA_PATH to a CaseOps export)" >&2
    exit 2
elif [[ -d "$SHARED/corpus" && -f "$SHARED/tokenizers/fineweb_1024_bpe.model" ]]; then
    SMOKE=data/datasets/smoke_sp1024
    TOKENIZER=$SHARED/tokenizers/fineweb_1024_bpe.model
    echo "corpus source:$SHARED/corpus (FineWeb sample + enwiki sample) tokenizer:$TOKENIZER dataset:$SMOKE"
    if [[ ! -f "$SMOKE/fineweb_val_000000.bin" ]]; then
        "$PY" data/build_shards.py \
            --input "$SHARED/corpus/fineweb_docs_sample200.jsonl" "$SHARED/corpus/enwiki_2015_wikiextractor_sample.jsonl" \
            --tokenizer "$TOKENIZER" --out "$SMOKE" --val-docs 50 --max-docs 1200
    fi
else
    SUFFIX=${LOCAL_CORPUS_DOCS:+_docs$LOCAL_CORPUS_DOCS}
    SMOKE=data/datasets/pydocs_sp1024$SUFFIX
    TOKENIZER=data/tokenizers/pydocs_1024_bpe$SUFFIX.model
    "$PY" data/local_corpus.py --vocab-size 1024 --out "$SMOKE" --tokenizer "$TOKENIZER" \
        ${LOCAL_CORPUS_DOCS:+--max-docs "$LOCAL_CORPUS_DOCS"}
fi
unset LOCAL_CORPUS_DOCS
export PRESET="${PRESET-smoke}" DATA_PATH="$SMOKE" TOKENIZER_PATH="${TOKENIZER_PATH-$TOKENIZER}"
exec "$PY" train_gpt.py
