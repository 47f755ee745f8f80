#!/usr/bin/env bash
# ./run.sh           set up and run the main job: the record config on every visible GPU (torchrun),
#                    or the tiny smoke preset on CPU using ../shared/data. Env vars pass through.
# ./run.sh test ...  set up and run the test suite; extra args go to pytest.
# ./run.sh sweep FILE [...]  one main-job run per line of env overrides, then a summary table
#                    (tools/sweep.py --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ "${1:-}" == "test" ]]; then
    shift
    # An unpinned torch would pull a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
    if ! python3 -c "import torch" 2>/dev/null; then
        python3 -m pip install torch==2.13.0
    fi
    python3 -m pip install -r requirements.txt pytest
    exec python3 -m pytest -q tests "$@"
fi
if [[ "${1:-}" == "sweep" ]]; then
    shift
    if ! python3 -c "import torch, numpy, sentencepiece, brotli" 2>/dev/null; then
        python3 -m pip install -r requirements.txt
    fi
    repo=$PWD
    cd "$OLDPWD"  # FILE and --out are relative to where ./run.sh was called
    exec python3 "$repo/tools/sweep.py" "$@"
fi
if [[ $# -gt 0 ]]; then
    echo "usage: ./run.sh [test [pytest args...] | sweep FILE [options]]  (configure the main job with env vars)" >&2
    exit 2
fi

if ! python3 -c "import torch, numpy, sentencepiece, brotli" 2>/dev/null; then
    python3 -m pip install -r requirements.txt
fi
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" | tail -n 1)

if (( NGPU >= 1 )); then
    NPROC=$NGPU
    while (( 8 % NPROC != 0 )); do NPROC=$((NPROC - 1)); done  # grad accumulation is 8 / world size
    if (( NPROC != NGPU )); then
        echo "run.sh: $NGPU GPUs visible; the GPU count must divide 8, so using $NPROC" >&2
    fi
    exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py
fi

# No GPU: tiny smoke run on a dataset built once from the shared sample corpora.
SHARED=../shared/data
SMOKE=data/datasets/smoke_sp1024
TOKENIZER=$SHARED/tokenizers/fineweb_1024_bpe.model
if [[ -z "${DATA_PATH+set}" && ! -f "$SMOKE/fineweb_val_000000.bin" ]]; then
    if [[ ! -d "$SHARED" ]]; then
        echo "error: no GPU and no $SHARED (shared data beside the repo) to build the smoke dataset from" >&2
        exit 2
    fi
    python3 data/build_shards.py \
        --input "$SHARED/corpus/fineweb_docs_sample200.jsonl" "$SHARED/corpus/enwiki_2015_wikiextractor_sample.jsonl" \
        --tokenizer "$TOKENIZER" --out "$SMOKE" --val-docs 50 --max-docs 1200
fi
export PRESET="${PRESET-smoke}" DATA_PATH="${DATA_PATH-$SMOKE}" TOKENIZER_PATH="${TOKENIZER_PATH-$TOKENIZER}"
exec python3 train_gpt.py
