#!/usr/bin/env bash
# The CUDA checks for a machine with an NVIDIA GPU: the CUDA kernel tests at full size on the real
# device (bit-identity with the reference and with the CPU optimizers, torch tensors, torch's
# current stream, checkpoints moved between devices), then the GPU benchmarks (quantizers;
# optimizer steps with float32 and bfloat16 parameters). Needs torch with CUDA, numba (or numba-cuda), pytest and hypothesis; no install step,
# so it also runs where nothing can be fetched. Results go to ${1:-results/gpu_check}.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-results/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 QUANTLAB_GPU_TESTS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, numba; print('torch', torch.__version__, 'numba', numba.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest tests/cuda -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
python3 -m experiments.bench.quantize --device cuda --n $((1 << 26)) --out "$out" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
for dtype in float32 bfloat16; do
  python3 -m experiments.bench.optim --device cuda --dtype $dtype --cases single resnet18 --no-torchao \
    --out "$out/optim_$dtype" 2>&1 | tee "$out/bench_optim_$dtype.log"
  bench=$(( bench || PIPESTATUS[0] ))
done
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
