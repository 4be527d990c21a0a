#!/usr/bin/env bash
# bench.py's stages at real size on a lent GPU, within a wall-clock budget (README, "Speed").
#
#   ./bench_gpu.sh prepare     here, with network: the wheels the GPU image lacks, into .wheels/,
#                              and the tiny model and synthetic data, into .cache/
#   ./bench_gpu.sh [FLAGS]     on the GPU machine, no network: the device tool's run with carry
#                              [".wheels", ".cache/tiny-qwen2-vl", ".cache/synthetic-omnimedvqa"]
#                              and this command. Installs the wheels into /tmp/site unless the
#                              pinned versions are there, then runs the stages.
#   ./bench_gpu.sh dry-run     the same stages on the tiny model on this CPU (tests/test_bench.py)
#
# FLAGS go to bench.py after ours, so they win: --budget_s 300, --stages step,trl, ... Each
# result is printed as it is measured, and appended to $OUT/bench_gpu.jsonl when OUT is set.
# The device image brings its own torch (a CUDA build) and most of what transformers and TRL
# need; the wheels are transformers at requirements.txt's pin, TRL at bench.py's, and what TRL
# needs beyond the image: datasets and its dill, multiprocess and fsspec, at versions it accepts
# (datasets 4.8.5 asks for pyarrow >= 21, as TRL does; the image's pyarrow is not known here).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TRANSFORMERS=$(sed -n 's/^transformers==//p' requirements.txt)
TRL=1.16.0
WHEELS="transformers==$TRANSFORMERS trl==$TRL datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
        fsspec==2026.2.0"
PINNED="import transformers, trl
assert (transformers.__version__, trl.__version__) == ('$TRANSFORMERS', '$TRL')"

if [ "${1:-}" = prepare ]; then
    rm -rf .wheels  # two versions of one package would stop the install there
    # All pure Python; multiprocess's wheel is tagged py312, hence the version.
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .wheels $WHEELS
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
    "$PYTHON" -c 'import tiny
tiny.build_tiny(".cache/tiny-qwen2-vl", tiny.make_synthetic(".cache/synthetic-omnimedvqa"))'
    ls .wheels
    du -sh .wheels .cache/tiny-qwen2-vl .cache/synthetic-omnimedvqa
    exit
fi

if [ "${1:-}" = dry-run ]; then
    shift
    # Dynamo's eager backend, not inductor's C++ build, behind the graph decoder: the dry run
    # checks the stages and their records, not the compiler (and takes seconds, not minutes).
    export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:eager"
    SIZES="--prompts 2 --generations 2 --completion_tokens 4 --warmup 0 --decode_rows 2,4
           --decoders dynamic,graph"
else
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ! "$PYTHON" -c "$PINNED" 2>/dev/null; then
        [ -d .wheels ] || { echo "no .wheels/: run ./bench_gpu.sh prepare, and carry it"; exit 1; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .wheels/*.whl
    fi
    SIZES="--device cuda --dtype bf16 --model qwen2-vl-2b --lora_model qwen2.5-vl-3b
           --image_size 384 --prompts 8 --generations 8 --completion_tokens 256 --warmup 1
           --grad_checkpointing true --decoders dynamic,static,graph --decode_rows 16,64"
fi
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # SIZES is a list of flags
exec "$PYTHON" bench.py $SIZES --steps 1 --stages cuda_tests,decode,step,trl,lora,logprob_gap \
    --budget_s 480 --json "${OUT:+$OUT/bench_gpu.jsonl}" "$@"
