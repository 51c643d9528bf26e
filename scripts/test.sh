#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: x86-64 tests in release
# mode (every kernel set this CPU has), then the kernel and model tests for
# aarch64 under qemu, with and without the dotprod extension.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
if [[ -x scripts/test-aarch64.sh ]]; then
  ./scripts/test-aarch64.sh
fi
