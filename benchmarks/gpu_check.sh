#!/usr/bin/env bash
# The device checks of a session lent a GPU, as the one prepared command the device tool's
# `run` takes (it starts in the repository root with an empty $OUT whose files come back):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#
# On the device machine python3 has a CUDA torch, Triton, pytest and pytest-benchmark and there
# is no network (no pip). The script
#   1. builds mtlfast._C in place with the CUDA kernels (setup.py adds them when torch has CUDA
#      and nvcc is found; without nvcc the build is C++ only and the cuda backend's tests fail,
#      as MTLFAST_REQUIRE_BACKENDS makes them: a broken build must not pass as skips);
#   2. runs the test suite's GPU tests (marked `gpu`: the cuda and triton backends on CUDA
#      tensors against the reference, gradients, opcheck);
#   3. runs the op suites' CUDA cases (fused backends against eager PyTorch and torch.compile)
#      as pytest-benchmark JSON.
# $OUT then holds build.log, tests.log and bench_<suite>.json (the device tool returns at most
# 8 files). Copy the JSON to benchmarks/results/h200/ (or the machine's name) and say in the
# results README which machine, torch and CUDA they came from. Each step has its own time limit,
# so that a slow one leaves the next its time; the whole takes about 8 minutes of the 10 a
# command may run. Without a CUDA device the script says so and exits 2 before building.
set -u -o pipefail
OUT=${OUT:-/tmp/mtlfast_gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here: nothing to check"
  exit 2
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
  command -v nvcc && nvcc --version | tail -2
} > "$OUT/build.log" 2>&1

echo "== build"
if ! timeout 300 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
  echo "gpu_check: the build failed (last lines of build.log):"
  tail -30 "$OUT/build.log"
  exit 1
fi
$PY -c "from mtlfast.ops import available_backends; print('backends on cuda:',
available_backends('cuda'))" 2>&1 | tee -a "$OUT/build.log"

echo "== GPU tests"
timeout 180 env MTLFAST_REQUIRE_BACKENDS=cuda,triton \
  $PY -m pytest tests -m gpu -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc $?"
tail -5 "$OUT/tests.log"

echo "== op suites, CUDA cases"
for suite in attention_distill skip_fusion task_se; do
  timeout 90 $PY -m pytest "benchmarks/bench_$suite.py" -q -p no:cacheprovider -k cuda \
    --benchmark-json="$OUT/bench_$suite.json" > "$OUT/bench_$suite.log" 2>&1
  echo "$suite rc $? ($(tail -1 "$OUT/bench_$suite.log"))"
  rm -f "$OUT/bench_$suite.log"
done
