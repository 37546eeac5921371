#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (unit + integration).
# Exits non-zero on any failure. GPU tests carry the "gpu" label and skip without a device.
#
# SANITIZE=address runs the whole suite under ASan + UBSan (build-asan/), SANITIZE=thread the
# decode and kvstore tests under TSan (build-tsan/); any report fails the test that made it.
# TSan sees absl::Mutex only when abseil itself is built with TSan (Debian's is not): against
# Debian's it reports every absl::Mutex-guarded access (docs/reliability.md).
# FUZZ=SECONDS also runs each libFuzzer target that long (scripts/fuzz.sh; needs clang).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
BUILD=$(bash scripts/build_dir.sh)
export UCX_NET_DEVICES=lo
args=()
case "${SANITIZE:-}" in
  address)
    # UCX's memory hooks and gRPC's leak-free shutdown are outside the suite: leaks are not
    # checked, every other report aborts the process that made it.
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    export UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none
    ;;
  thread)
    export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
    export UCX_MEM_MALLOC_HOOKS=no UCX_MEM_MMAP_HOOK_MODE=none
    args=(-R "DecodeCore|Decode|KvStore|Kv|RamTier")
    ;;
esac
ctest --test-dir "$BUILD" --output-on-failure -j "${JOBS:-2}" --timeout "${TEST_TIMEOUT:-300}" "${args[@]}"
if [[ -n "${FUZZ:-}" ]]; then
  bash scripts/fuzz.sh "$FUZZ"
fi
