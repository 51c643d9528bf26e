#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: x86-64 tests optimized
# (every kernel set this CPU has), then the kernel and model tests for
# aarch64 under qemu, with and without the dotprod extension.
#
# The `fasttest` profile (Cargo.toml) is the release profile without LTO:
# the same optimized code paths, but each of the ~20 test binaries links in
# seconds instead of paying a whole-program LTO link.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests that need ../shared (the real SmolLM2 checkpoint) skip in a bare
# clone; here its absence is a failure.
export NIBBLE_REQUIRE_SHARED=1
cargo test --workspace --profile fasttest
# The runtime's golden tests once more on every other x86 kernel set: the
# scalar reference, AVX2 where the run above used AVX-512 or AVX-VNNI, and
# AVX-VNNI where the run above used AVX-512.
NIBBLE_KERNELS=scalar cargo test --profile fasttest --test tiny_golden
if grep -qw 'avx512_vnni\|avx_vnni' /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo; then
  NIBBLE_KERNELS=avx2 cargo test --profile fasttest --test tiny_golden
fi
if grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null && grep -qw avx_vnni /proc/cpuinfo; then
  NIBBLE_KERNELS=avxvnni cargo test --profile fasttest --test tiny_golden
fi
if [[ -x scripts/test-aarch64.sh ]]; then
  ./scripts/test-aarch64.sh
fi
