#!/usr/bin/env bash
# Configures and builds FlashMemory into ./build (Release-with-debug-info, Ninja, ccache).
# SANITIZE=address (ASan + UBSan) or SANITIZE=thread (TSan) builds into ./build-asan or
# ./build-tsan instead, without the CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
BUILD=$(bash scripts/build_dir.sh)
if [[ ! -f $BUILD/build.ninja ]]; then
  extra=()
  case "${SANITIZE:-}" in
    "") ;;
    address|thread) extra=(-DFM_SANITIZE="$SANITIZE" -DFM_ENABLE_CUDA=OFF) ;;
    *) echo "SANITIZE must be address or thread, got '$SANITIZE'" >&2; exit 2 ;;
  esac
  cmake -S . -B "$BUILD" -G Ninja "${extra[@]}" ${FM_CMAKE_ARGS:-}
fi
cmake --build "$BUILD" -j "$JOBS"
