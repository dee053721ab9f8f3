/* This machine's float multiply-add peak per core, for the attention figures in the README
 * (tools/bench_attention.py divides by it). 12 independent FMA chains, 256- and 512-bit:
 *
 *     gcc -O2 -mavx512f tools/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak      # AVX-512 machines
 *     gcc -O2 -mavx2 -mfma -DNO_AVX512 tools/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Run one copy per core at once (`/tmp/fma_peak & /tmp/fma_peak; wait`) for the all-core figure. */
#include <stdio.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

#define FMA12(R, A, B) \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "0\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "1\n\t" \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "2\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "3\n\t" \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "4\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "5\n\t" \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "6\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "7\n\t" \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "8\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "9\n\t" \
    "vfmadd231ps %%" R A ", %%" R B ", %%" R "10\n\tvfmadd231ps %%" R A ", %%" R B ", %%" R "11\n\t"
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"

int main(void) {
    const long n = 200000000;
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(FMA12("ymm", "14", "15") ::: CLOBBER);
    double s = now() - t;
    printf("256-bit: %.2f FMA/ns = %.0f GFLOP/s per core\n", 12.0 * n / s / 1e9, 12.0 * n * 16 / s / 1e9);
#ifndef NO_AVX512
    t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(FMA12("zmm", "30", "31") ::: CLOBBER);
    s = now() - t;
    printf("512-bit: %.2f FMA/ns = %.0f GFLOP/s per core\n", 12.0 * n / s / 1e9, 12.0 * n * 32 / s / 1e9);
#endif
    return 0;
}
