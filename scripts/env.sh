# Sourced by scripts/train.sh and scripts/test.sh: find or make a Python environment that runs this project,
# install what is missing, and set PYTHON to its interpreter.
#
# Which interpreter (what is missing is installed into it):
#   1. $LLAMA_PYTHON when set (an interpreter of your own);
#   2. else the virtual environment $LLAMA_VENV when that is set (created when it does not exist);
#   3. else the activated virtual environment ($VIRTUAL_ENV);
#   4. else .venv in the repository, when it exists;
#   5. else `python3` when it already finds torch and every package this project needs (a managed machine, a CI
#      image with everything installed), so nothing is created;
#   6. else a new virtual environment, .venv in the repository.
# What is installed when missing: torch pinned to constraints.txt's version (the CPU build where `nvidia-smi`
# finds no GPU, PyPI's CUDA build where it does; $TORCH_INDEX_URL overrides the CPU index), then this project
# with its test extra, always with `-c constraints.txt` so nothing can pull another torch.
# shellcheck shell=bash

_llama_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_llama_modules="torch deepspeed sentencepiece numpy safetensors transformers tokenizers google.protobuf tqdm yaml \
matplotlib tensorboard psutil jinja2 httpx fastapi uvicorn httptools gguf pytest peft openai selenium gradio"

_llama_missing() {  # print the modules of $_llama_modules that interpreter $1 cannot find; fail if it cannot run
    "$1" - $_llama_modules <<'EOF'
import importlib.util, sys
missing = []
for name in sys.argv[1:]:
    try:
        if importlib.util.find_spec(name) is None:
            missing.append(name)
    except (ImportError, ValueError):
        missing.append(name)
print(" ".join(missing))
EOF
}

_llama_install() {  # install torch (pinned) and this project into interpreter $1
    local py="$1" torch_pin index=()
    torch_pin="$(grep -E '^torch==' "$_llama_root/constraints.txt" | head -n 1)"
    [[ -n "$torch_pin" ]] || { echo "error: constraints.txt pins no torch version" >&2; return 1; }
    if ! "$py" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
            echo "== installing $torch_pin (CUDA build: nvidia-smi sees a GPU)" >&2
        else
            local url="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
            # PyPI's Linux wheel is the CUDA build (GBs of CUDA libraries): take the CPU one from PyTorch's index.
            # A machine that cannot reach that index (an offline mirror, a local wheel house) gets torch from
            # pip's own configuration instead, rather than a retry storm per package.
            if "$py" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$url/" \
                    >/dev/null 2>&1; then
                index=(--extra-index-url "$url")
            fi
            echo "== installing $torch_pin (CPU build: no GPU found by nvidia-smi)" >&2
        fi
        "$py" -m pip install -q --disable-pip-version-check ${index[@]+"${index[@]}"} "$torch_pin" || return 1
    fi
    echo "== installing this project and its test extra (pip install -c constraints.txt -e .[test])" >&2
    "$py" -m pip install -q --disable-pip-version-check -c "$_llama_root/constraints.txt" -e "$_llama_root[test]"
}

llama_env() {
    local venv="${LLAMA_VENV:-$_llama_root/.venv}" py
    if [[ -n "${LLAMA_PYTHON:-}" ]]; then
        py="$LLAMA_PYTHON"
    elif [[ -x "$venv/bin/python" ]]; then
        py="$venv/bin/python"
    elif [[ -z "${LLAMA_VENV:-}" && -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        py="$VIRTUAL_ENV/bin/python"
    elif [[ -z "${LLAMA_VENV:-}" ]] && command -v python3 >/dev/null 2>&1 \
            && [[ -z "$(_llama_missing python3 2>/dev/null || echo x)" ]]; then
        py="$(command -v python3)"
    else
        command -v python3 >/dev/null 2>&1 || { echo "error: python3 not found; install Python 3.10 or newer" >&2
                                               return 1; }
        echo "== creating a virtual environment in $venv (set LLAMA_PYTHON to use your own)" >&2
        python3 -m venv "$venv" || { echo "error: could not create $venv; install the python3-venv package or" \
                                          "set LLAMA_PYTHON to an interpreter of your own" >&2; return 1; }
        py="$venv/bin/python"
    fi
    local missing
    missing="$(_llama_missing "$py")" || { echo "error: $py does not run" >&2; return 1; }
    if [[ -n "$missing" ]]; then
        echo "== $py lacks: $missing" >&2
        _llama_install "$py" || { echo "error: installing into $py failed (see above)" >&2; return 1; }
    fi
    PYTHON="$py"
    # The deepspeed launcher and console scripts live beside the interpreter.
    PATH="$(dirname "$py"):$PATH"
    export PYTHON PATH
}
