#!/usr/bin/env bash
# The wheels that the lent GPU machine's image (Python 3.12, torch, transformers, lightning, peft, tensorboard,
# torchmetrics; no internet) lacks, downloaded into .whl/ (git-ignored) for `benchmarks/gpu_checks.sh`.
# About 44 MB, most of it bitsandbytes (QLoRA); the device tool carries at most 64 MiB with the working tree.
#   bash scripts/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl \
  "jsonargparse==4.53.0" "docstring-parser==0.18.0" "typeshed-client==2.15.0" \
  "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" "antlr4-python3-runtime==4.13.2" \
  "bitsandbytes==0.50.2"
du -sh .whl
