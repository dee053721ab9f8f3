#!/usr/bin/env bash
# Cross-compile the kernels for arm64 (NEON and the scalar twin) and, where qemu-aarch64 (or an
# arm64 host) can run the result, compare them on random data.
# Needs: apt-get install gcc-aarch64-linux-gnu qemu-user-static   (or run natively on arm64)
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-aarch64-linux-gnu-gcc}
[ "$(uname -m)" = aarch64 ] && CC=${CC_NATIVE:-gcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="-O2 -std=c11 -Wall -Wextra -Wno-unused-function -Wno-unused-parameter -Iglmcpu"
$CC $flags -DPFX=neon_ -c tools/neon/wrap.c -o "$out/neon.o"
$CC $flags -DPFX=scalar_ -DGLMCPU_SCALAR -c tools/neon/wrap.c -o "$out/scalar.o"
$CC $flags tools/neon/check.c "$out/neon.o" "$out/scalar.o" -lm -static -o "$out/check"
echo "compiled for arm64: OK"
if [ "$(uname -m)" = aarch64 ]; then "$out/check"
elif command -v qemu-aarch64-static >/dev/null; then qemu-aarch64-static "$out/check"
elif command -v qemu-aarch64 >/dev/null; then qemu-aarch64 "$out/check"
else echo "no qemu-aarch64: compiled only"; fi
