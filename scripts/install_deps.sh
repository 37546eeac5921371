#!/usr/bin/env bash
# Installs every build and test dependency of FlashMemory from Debian's packages.
# Idempotent: re-running it on a machine that has them is a no-op apart from apt's checks.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev librocksdb-dev libucx-dev
  libgtest-dev libgmock-dev libhwy-dev
  libcli11-dev libxxhash-dev libcpp-httplib-dev nlohmann-json3-dev
  openssl  # scripts/make_dev_certs.sh (the security tests' certificates)
  python3-numpy python3-torch python3-grpcio python3-protobuf python3-matplotlib
  libopenblas0-pthread  # Debian's torch calls the system BLAS: 20x faster matmul than the reference BLAS
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
