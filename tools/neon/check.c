/* NEON kernels against their scalar twin on random data: run under qemu-aarch64 (or on arm64). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DECL(p)                                                                              \
    const char *p##isa(void);                                                               \
    void p##quant(int, const float *, int8_t *, float *, float *);                          \
    float p##q4_0(int, const void *, const int8_t *, const float *, const float *);         \
    float p##q8_0(int, const void *, const int8_t *, const float *);                        \
    float p##f16(int, const void *, const float *);                                         \
    float p##bf16(int, const void *, const float *);                                        \
    float p##f32(int, const void *, const float *);                                         \
    void p##q4_0x4(int, const void *, const int8_t *, const float *, const float *, float *);
DECL(neon_)
DECL(scalar_)

static int fails = 0;
static void check(const char *what, int n, float a, float b) {
    if (!(fabsf(a - b) <= 1e-4f * (fabsf(b) + 1.0f))) {
        printf("FAIL %s n=%d neon=%g scalar=%g\n", what, n, a, b);
        fails++;
    }
}

int main(void) {
    srand(1);
    int sizes[] = {32, 96, 544, 4128};
    for (int si = 0; si < 4; si++) {
        int n = sizes[si], nb = n / 32;
        float *x = malloc(sizeof(float) * 4 * n);
        int8_t *q = malloc(4 * n);
        float *d = malloc(sizeof(float) * 4 * nb), *s = malloc(sizeof(float) * 4 * nb);
        uint8_t *w = malloc(34 * nb + 4 * n);
        for (int i = 0; i < 4 * n; i++) x[i] = (float)rand() / RAND_MAX * 2 - 1;
        for (int i = 0; i < 34 * nb + 4 * n; i++) w[i] = (uint8_t)rand();
        for (int b = 0; b < nb; b++) {          /* sane fp16 scales: 0x2000..0x2fff */
            w[18 * b] = (uint8_t)rand(); w[18 * b + 1] = 0x20 | (rand() & 0x0f);
        }
        for (int t = 0; t < 4; t++) neon_quant(n, x + t * n, q + t * n, d + t * nb, s + t * nb);
        check("q4_0", n, neon_q4_0(n, w, q, d, s), scalar_q4_0(n, w, q, d, s));
        float r4[4];
        neon_q4_0x4(n, w, q, d, s, r4);
        for (int t = 0; t < 4; t++)
            check("q4_0x4", n, r4[t], scalar_q4_0(n, w, q + t * n, d + t * nb, s + t * nb));
        for (int b = 0; b < nb; b++) { w[34 * b] = (uint8_t)rand(); w[34 * b + 1] = 0x20 | (rand() & 0x0f); }
        check("q8_0", n, neon_q8_0(n, w, q, d), scalar_q8_0(n, w, q, d));
        uint16_t *h = (uint16_t *)(w);
        for (int i = 0; i < n; i++) h[i] = 0x3000 | (rand() & 0x0fff);
        check("f16", n, neon_f16(n, w, x), scalar_f16(n, w, x));
        for (int i = 0; i < n; i++) h[i] = 0x3e00 | (rand() & 0x01ff);
        check("bf16", n, neon_bf16(n, w, x), scalar_bf16(n, w, x));
        check("f32", n, neon_f32(n, x + n, x), scalar_f32(n, x + n, x));
        free(x); free(q); free(d); free(s); free(w);
    }
    printf("%s vs %s: %s\n", neon_isa(), scalar_isa(), fails ? "MISMATCH" : "all kernels agree");
    return fails != 0;
}
