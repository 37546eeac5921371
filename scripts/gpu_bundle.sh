#!/usr/bin/env bash
# Builds the CUDA path here (the GPU machine has none of the Debian packages and no network)
# and gathers what the GPU check needs into gpu-bundle/: the CUDA kernel tests, the GPU
# benchmark and the shared libraries they load that a CUDA image may lack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
rm -rf gpu-bundle && mkdir -p gpu-bundle/lib
cp build/tests/kernels_cuda_test build/bin/fm-gpu-bench gpu-bundle/
for bin in gpu-bundle/kernels_cuda_test gpu-bundle/fm-gpu-bench; do
  ldd "$bin" | awk '/=> \// {print $3}' | grep -E "libhwy|libcudart" | xargs -r -I{} cp -L {} gpu-bundle/lib/
done
cp scripts/gpu_check.sh gpu-bundle/
du -sh gpu-bundle
