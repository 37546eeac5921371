#!/usr/bin/env bash
# The build directory of this configuration: build, or build-asan / build-tsan (SANITIZE).
case "${SANITIZE:-}" in
  "") echo build ;;
  address) echo build-asan ;;
  thread) echo build-tsan ;;
  *) echo "SANITIZE must be address or thread, got '$SANITIZE'" >&2; exit 2 ;;
esac
