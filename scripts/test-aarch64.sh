#!/usr/bin/env bash
# Cross-builds nibble's kernel tests, the library's unit tests and the runtime's golden tests
# (tests/tiny_golden.rs: logits and greedy continuations against transformers) for
# aarch64-unknown-linux-gnu and runs them under qemu-user twice: on a
# Cortex-A53 (plain NEON, no dotprod) and on qemu's "max" CPU (dotprod), so
# both NEON paths are checked against the scalar reference.
#
# Needs (apt): qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross.
# The linker and runner come from .cargo/config.toml.
# Env: PROPTEST_CASES (default 24: qemu is ~10-50x slower than native).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target add "$target" >/dev/null
export PROPTEST_CASES=${PROPTEST_CASES:-24}

cargo test --target "$target" --lib --test kernels --test tiny_golden --no-run

run() {
  local cpu=$1 expect=$2
  echo "== QEMU_CPU=$cpu (expect kernel sets: $expect)"
  QEMU_CPU=$cpu NIBBLE_EXPECT_KERNELS=$expect \
    cargo test --target "$target" --lib --test kernels --test tiny_golden -- --test-threads 2
}
run cortex-a53 scalar,neon
run max scalar,neon,neon-dotprod
