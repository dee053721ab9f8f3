#!/usr/bin/env bash
# Cross-compile the kernels for arm64 (NEON and the scalar twin) and, where qemu-aarch64 (or an
# arm64 host) can run the result, compare them on random data (tools/neon/check.c: every row
# type, quantize_row_q8_K, batched == single token, attention). Built twice: for armv8.2-a+dotprod
# (the vdotq_s32 path) and plain armv8-a (the widening-multiply path).
# Needs: apt-get install gcc-aarch64-linux-gnu qemu-user   (or run natively on arm64)
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-aarch64-linux-gnu-gcc}
[ "$(uname -m)" = aarch64 ] && CC=${CC_NATIVE:-gcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="-O2 -std=c11 -Wall -Wextra -Wno-unused-function -Wno-unused-parameter -Iglmcpu"
run=none                                  # how to start an arm64 program here
if [ "$(uname -m)" = aarch64 ]; then run=
elif command -v qemu-aarch64-static >/dev/null; then run="qemu-aarch64-static -cpu max"
elif command -v qemu-aarch64 >/dev/null; then run="qemu-aarch64 -cpu max"; fi
rc=0
for march in armv8.2-a+dotprod armv8-a; do
    if [ -z "$run" ] && [ "$march" != armv8-a ] && ! grep -qw asimddp /proc/cpuinfo; then
        echo "== -march=$march: this CPU has no dot product instructions, skipped"; continue
    fi
    echo "== -march=$march"
    $CC $flags -march=$march -DPFX=neon_ -c tools/neon/wrap.c -o "$out/neon.o"
    $CC $flags -march=$march -DPFX=scalar_ -DGLMCPU_SCALAR -c tools/neon/wrap.c -o "$out/scalar.o"
    $CC $flags -march=$march tools/neon/check.c "$out/neon.o" "$out/scalar.o" -lm -static -o "$out/check"
    echo "compiled for arm64: OK"
    if [ "$run" = none ]; then echo "no qemu-aarch64: compiled only"; continue; fi
    $run "$out/check" || rc=1
done
exit $rc
