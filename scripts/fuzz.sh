#!/usr/bin/env bash
# Builds the libFuzzer targets of the parsers of untrusted bytes with Debian's clang (ASan +
# UBSan + libFuzzer; FM_SANITIZE=fuzzer, the whole code instrumented) into build-fuzz/, and
# runs each for SECONDS (default 60) from its seed corpus in fuzz/corpus/<name>/. Fails on
# any crash. The targets:
#   page_record_fuzz       a page record and its header (from a peer or RocksDB)
#   safetensors_fuzz       weights and traces files
#   decode_state_fuzz      a session's saved decode state, as a resume reads it
#   service_requests_fuzz  any request to any RPC of the decode, indexer and kvstore services
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] &&
  targets=(page_record_fuzz safetensors_fuzz decode_state_fuzz service_requests_fuzz)
if ! command -v clang++ > /dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a > /dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"  # Debian's clang carries libFuzzer
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends clang libclang-rt-14-dev
fi
out=build-fuzz
if [[ ! -f $out/build.ninja ]]; then
  CC=clang CXX=clang++ cmake -S . -B "$out" -G Ninja -DFM_SANITIZE=fuzzer -DFM_ENABLE_CUDA=OFF
fi
cmake --build "$out" -j "${JOBS:-2}" --target "${targets[@]}"
export UCX_NET_DEVICES=lo ASAN_OPTIONS=detect_leaks=0:${ASAN_OPTIONS:-}
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus-$t"
  echo "== $t, ${secs} s"
  log="$out/$t.log"
  if ! "$out/fuzz/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=30 \
      "$out/corpus-$t" "fuzz/corpus/${t%_fuzz}" > "$log" 2>&1; then
    grep -E "ERROR|SUMMARY|==[0-9]+==" "$log" | head -20
    echo "fuzz: $t failed; the input is in $(pwd) (crash-*), the log in $log" >&2
    exit 1
  fi
  grep -E "^#[0-9]+ *DONE|stat::number_of_executed_units|cov:" "$log" | tail -3
done
