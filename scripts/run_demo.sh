#!/usr/bin/env bash
# The main job on the embedded default: installs dependencies, builds, starts the all-in-one
# server (decode worker, indexer and kvstore on one port; RocksDB under a temporary data
# directory) and runs the demo client against it: a generated 32K-token session decoded in
# dense and in sparse mode, side by side. Extra arguments go to `fmctl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
data=$(mktemp -d /tmp/flashmemory.XXXXXX)
ready="$data/ready"
build/bin/flashmemory --host 127.0.0.1 --port 0 --ready_file "$ready" --data_dir "$data" \
  --ram_bytes 2GiB --reserve_bytes 1GiB &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 300); do [[ -s "$ready" ]] && break; sleep 0.1; done
[[ -s "$ready" ]] || { echo "flashmemory did not start" >&2; exit 1; }
port=$(head -1 "$ready")
build/bin/fmctl demo --target "127.0.0.1:$port" "$@"
