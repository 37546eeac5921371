#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (H100/H200): runs the CUDA kernel tests and
# the GPU benchmark from gpu-bundle/ (made by scripts/gpu_bundle.sh) and writes their output
# to ${OUT:-gpu-results}/. Finishes in a few minutes.
set -uo pipefail
cd "$(dirname "$0")"
[[ -x kernels_cuda_test ]] || cd ../gpu-bundle
out=${OUT:-gpu-results}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
timeout 240 ./kernels_cuda_test > "$out/kernels_cuda_test.txt" 2>&1
echo "kernels_cuda_test exit $?" | tee -a "$out/summary.txt"
timeout 240 ./fm-gpu-bench --json "$out/gpu_bench.json" > "$out/gpu_bench.txt" 2>&1
echo "fm-gpu-bench exit $?" | tee -a "$out/summary.txt"
tail -3 "$out/kernels_cuda_test.txt"; cat "$out/gpu_bench.txt"
