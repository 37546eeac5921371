#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (unit + integration).
# Exits non-zero on any failure. GPU tests carry the "gpu" label and skip without a device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
export UCX_NET_DEVICES=lo
ctest --test-dir build --output-on-failure -j "${JOBS:-2}" --timeout 300
