#!/usr/bin/env bash
# Configures and builds FlashMemory into ./build (Release-with-debug-info, Ninja, ccache).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
if [[ ! -f build/build.ninja ]]; then
  cmake -S . -B build -G Ninja ${FM_CMAKE_ARGS:-}
fi
cmake --build build -j "$JOBS"
