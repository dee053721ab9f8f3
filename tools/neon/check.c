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
void neon_attention(int, int, int, int, int, int, int, const float *, const void *, const void *, float *);
void scalar_attention(int, int, int, int, int, int, int, const float *, const void *, const void *, float *);
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
    /* attention over each KV type (0 f32, 1 f16, 2 bf16, 3 q8_0): 12 and 16 heads per KV head */
    int cases[][4] = {{1, 12, 300, 3}, {5, 16, 40, 0}, {3, 12, 600, 1}, {9, 16, 257, 2}};
    for (int ci = 0; ci < 4; ci++) {
        const int T = cases[ci][0], G = cases[ci][1], pos0 = cases[ci][2], Hkv = 2, D = 64, S = pos0 + T;
        float *q = malloc(sizeof(float) * T * Hkv * G * D), *o1 = malloc(sizeof(float) * T * Hkv * G * D);
        float *o2 = malloc(sizeof(float) * T * Hkv * G * D);
        for (int i = 0; i < T * Hkv * G * D; i++) q[i] = (float)rand() / RAND_MAX * 2 - 1;
        for (int kt = 0; kt < 4; kt++) {
            const int vt = (kt + cases[ci][3]) % 4;
            size_t nk = (size_t)Hkv * S * (kt == 3 ? D / 32 * 34 : D * (kt ? 2 : 4));
            size_t nv = (size_t)Hkv * S * (vt == 3 ? D / 32 * 34 : D * (vt ? 2 : 4));
            uint8_t *kv[2] = {malloc(nk), malloc(nv)};
            int ty[2] = {kt, vt};
            size_t nn[2] = {nk, nv};
            for (int x = 0; x < 2; x++) {
                if (ty[x] == 0)
                    for (size_t i = 0; i < nn[x] / 4; i++) ((float *)kv[x])[i] = (float)rand() / RAND_MAX * 2 - 1;
                else if (ty[x] == 1)
                    for (size_t i = 0; i < nn[x] / 2; i++) ((uint16_t *)kv[x])[i] = (uint16_t)(0x3000 | (rand() & 0x0fff) | (rand() & 1) << 15);
                else if (ty[x] == 2)
                    for (size_t i = 0; i < nn[x] / 2; i++) ((uint16_t *)kv[x])[i] = (uint16_t)(0x3e00 | (rand() & 0x01ff) | (rand() & 1) << 15);
                else
                    for (size_t b = 0; b < nn[x] / 34; b++) {
                        kv[x][34 * b] = (uint8_t)rand(); kv[x][34 * b + 1] = 0x20 | (rand() & 0x0f);
                        for (int e = 2; e < 34; e++) kv[x][34 * b + e] = (uint8_t)rand();
                    }
            }
            neon_attention(T, Hkv, G, D, pos0, kt, vt, q, kv[0], kv[1], o1);
            scalar_attention(T, Hkv, G, D, pos0, kt, vt, q, kv[0], kv[1], o2);
            char what[32];
            snprintf(what, sizeof what, "attention k%d v%d", kt, vt);
            for (int i = 0; i < T * Hkv * G * D; i++) check(what, S, o1[i], o2[i]);
            free(kv[0]); free(kv[1]);
        }
        free(q); free(o1); free(o2);
    }
    printf("%s vs %s: %s\n", neon_isa(), scalar_isa(), fails ? "MISMATCH" : "all kernels agree");
    return fails != 0;
}
