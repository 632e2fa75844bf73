#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one device run, most wanted first, each under its own time limit
# so that one slow part cannot starve the others. Prepare once here: `bash scripts/device_wheels.sh`; then run
# on the lent machine with the device tool: command `bash benchmarks/gpu_checks.sh`, carry [".whl"],
# timeout_s 600. Each part's output lands in $OUT/<part>.txt. The parts' limits add up to 555 s (575 s with vLLM), under
# the 600 s of one call with the wheels' install; a part that runs out of time is cut and the next one starts.
#   TINY=1 bash benchmarks/gpu_checks.sh      # every part at tiny size on the CPU: checks this script
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
if ! python3 -c "import relax_pl.callbacks" 2>/dev/null; then  # callbacks/ installs as relax_pl.callbacks
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/relax_pl . \
    && export PYTHONPATH=/tmp/relax_pl${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v -e Warning -e warn -e 'it/s' "$OUT/$name.txt" | tail -n 14
  echo "== $name: exit $rc after $((SECONDS - start))s"
}

# vLLM: the lent GPU image has none and cannot fetch one (and its wheels are far above what the device tool carries),
# so this part runs only where `pip install vllm` was possible; elsewhere it says so.
if python3 -c "import vllm" 2>/dev/null; then VLLM_FLAG=--vllm ROLLOUT_S=150; else
  VLLM_FLAG="" ROLLOUT_S=130
  echo "== vLLM is not installed here: the rollout part measures HFGenerate only (README, Rollout engines)"
fi

if [ "${TINY:-0}" = 1 ]; then
  part rollout 120 python3 benchmarks/rollout_gpu.py --tiny $VLLM_FLAG
  part plugins 300 python3 benchmarks/plugins_gpu.py --tiny
  part dsd 300 python3 benchmarks/dsd_overhead.py --tokens 2x32 --m 8 --repeats 1 --fit-trajectories 8 --fit-steps 3
  part vl 120 python3 benchmarks/vl_gpu.py --tiny --relax --steps 2
  part setups 300 python3 benchmarks/setups_gpu.py --tiny
else
  part rollout $ROLLOUT_S python3 benchmarks/rollout_gpu.py $VLLM_FLAG
  # the loss plug-ins, LoRA and (with vLLM) the weight-sync check: each runs, moves the weights, is caught when stale
  part plugins 120 python3 benchmarks/plugins_gpu.py
  part dsd 45 python3 benchmarks/dsd_overhead.py --model qwen2.5-1.5b-shape --tokens 16x2048 --device cuda
  part vl 90 python3 benchmarks/vl_gpu.py --relax --steps 3
  part setups 170 python3 benchmarks/setups_gpu.py
fi
