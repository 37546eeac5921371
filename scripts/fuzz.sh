#!/usr/bin/env bash
# Builds the libFuzzer targets of the parsers of untrusted bytes with Debian's clang (ASan +
# UBSan + libFuzzer, the parsers' sources instrumented) into build-fuzz/, and runs each for
# SECONDS (default 60) from its seed corpus in fuzz/corpus/<target>/. Fails on any crash.
#
#   bash scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
if ! command -v "${CXX:-clang++}" > /dev/null; then  # Debian's clang carries libFuzzer
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends clang libclang-rt-14-dev
fi
out=build-fuzz
mkdir -p "$out"
CXX=${CXX:-clang++}
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I.)
absl=(-labsl_statusor -labsl_status -labsl_strings -labsl_str_format_internal -labsl_cord
      -labsl_cord_internal -labsl_cordz_info -labsl_cordz_handle -labsl_cordz_functions
      -labsl_synchronization -labsl_time -labsl_int128 -labsl_raw_logging_internal
      -labsl_throw_delegate -labsl_strings_internal -labsl_base -labsl_spinlock_wait
      -labsl_exponential_biased)
# Only the libraries this system has (the list differs between abseil versions).
libs=()
for l in "${absl[@]}"; do
  n=${l#-l}
  if ls /usr/lib/x86_64-linux-gnu/lib"$n".so* > /dev/null 2>&1; then libs+=("$l"); fi
done
build() {  # target sources...
  local t=$1; shift
  "$CXX" "${flags[@]}" "fuzz/$t.cc" "$@" -o "$out/$t" -lxxhash "${libs[@]}"
}
build page_record_fuzz common/page_format.cc common/checksum.cc common/model_spec.cc common/codecs.cc
build safetensors_fuzz common/safetensors.cc common/codecs.cc
for t in page_record_fuzz safetensors_fuzz; do
  mkdir -p "$out/corpus-$t"
  echo "== $t, ${secs} s"
  "$out/$t" -max_total_time="$secs" -print_final_stats=1 "$out/corpus-$t" "fuzz/corpus/${t%_fuzz}" \
    2>&1 | grep -E "^#[0-9]+ *DONE|stat::number_of_executed_units|ERROR|SUMMARY|cov:" | tail -4
done
