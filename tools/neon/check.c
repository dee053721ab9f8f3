/* NEON kernels against their scalar twin on random data: run under qemu-aarch64 (or on arm64).
 * Prints one line per kernel (OK, or FAIL and how many results differ) and exits non-zero on any
 * mismatch. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DECL(p)                                                                              \
    const char *p##isa(void);                                                               \
    int p##dotprod(void);                                                                   \
    void p##quant(int, const float *, int8_t *, float *, float *);                          \
    void p##quant_K(int, const float *, int8_t *, float *, int16_t *);                      \
    float p##q4_0(int, const void *, const int8_t *, const float *, const float *);         \
    float p##q8_0(int, const void *, const int8_t *, const float *);                        \
    float p##f16(int, const void *, const float *);                                         \
    float p##bf16(int, const void *, const float *);                                        \
    float p##f32(int, const void *, const float *);                                         \
    void p##q4_0x4(int, const void *, const int8_t *, const float *, const float *, float *); \
    void p##rows(int, int, const void *, size_t, int, int, const int8_t *, const float *, const void *, float *);
void neon_attention(int, int, int, int, int, int, int, const float *, const void *, const void *, float *);
void scalar_attention(int, int, int, int, int, int, int, const float *, const void *, const void *, float *);
DECL(neon_)
DECL(scalar_)

/* per kernel: results compared, how many differ, the largest relative difference */
static struct { const char *name; long runs, fails; double maxrel; } tab[32];
static int ntab = 0, fails = 0;
static int entry(const char *name) {
    for (int i = 0; i < ntab; i++)
        if (!strcmp(tab[i].name, name)) return i;
    tab[ntab].name = name;
    return ntab++;
}
/* a tolerance for float reordering; tol 0 asks for equal bits */
static void compare(const char *what, int n, float a, float b, float tol) {
    int i = entry(what);
    double rel = fabs((double)a - b) / (fabs(b) + 1.0);
    tab[i].runs++;
    if (rel > tab[i].maxrel) tab[i].maxrel = rel;
    if (tol ? !(rel <= tol) : memcmp(&a, &b, sizeof a) != 0) {
        if (tab[i].fails++ < 3) printf("  mismatch %s n=%d: neon %.9g, scalar %.9g\n", what, n, a, b);
        fails++;
    }
}
static void check(const char *what, int n, float a, float b) { compare(what, n, a, b, 1e-4f); }
static float frand(void) { return (float)rand() / RAND_MAX * 2 - 1; }
/* a random positive or negative fp16 scale of 2^-7 .. 2^-3: sane, as a quantiser writes */
static void sane_f16(uint8_t *p) {
    p[0] = (uint8_t)rand();
    p[1] = (uint8_t)(0x20 | (rand() & 0x0f) | (rand() & 1) << 7);
}

static void check_q4_0_q8_0_f(void) {
    int sizes[] = {32, 96, 544, 4128};
    for (int si = 0; si < 4; si++) {
        int n = sizes[si], nb = n / 32;
        float *x = malloc(sizeof(float) * 4 * n);
        int8_t *q = malloc(4 * n);
        float *d = malloc(sizeof(float) * 4 * nb), *s = malloc(sizeof(float) * 4 * nb);
        uint8_t *w = malloc(34 * nb + 4 * n);
        for (int i = 0; i < 4 * n; i++) x[i] = frand();
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
}

/* quantize_row_q8_K: the same int8 values, scales and 16-sums, bit for bit (one block all zero) */
static void check_q8_K(void) {
    int sizes[] = {256, 768, 4352};
    for (int si = 0; si < 3; si++) {
        int n = sizes[si];
        float *x = malloc(sizeof(float) * n), d1[17], d2[17];
        int8_t *q1 = malloc(n), *q2 = malloc(n);
        int16_t *b1 = malloc(2 * (n / 16)), *b2 = malloc(2 * (n / 16));
        for (int i = 0; i < n; i++) x[i] = i < 256 && si == 1 ? 0.0f : frand() * (1 + si * 40);
        neon_quant_K(n, x, q1, d1, b1);
        scalar_quant_K(n, x, q2, d2, b2);
        for (int i = 0; i < n; i++) compare("q8_K", n, q1[i], q2[i], 0);
        for (int i = 0; i < n / 16; i++) compare("q8_K", n, b1[i], b2[i], 0);
        for (int i = 0; i < n / 256; i++) compare("q8_K", n, d1[i], d2[i], 0);
        free(x); free(q1); free(q2); free(b1); free(b2);
    }
}

/* Every row type through gemm_rows: 3 rows of random blocks (fp16 fields sane, one block all
 * zero) against 5 tokens (a chunk of 4 and a single one); then each token alone, which must give
 * the batched results bit for bit. */
static const struct { const char *name, *batched; int type, bsize, qk, f16[2]; } TYPES[] = {
    {"q4_0 rows", "q4_0 batched", 2, 18, 32, {0, -1}},    {"q8_0 rows", "q8_0 batched", 8, 34, 32, {0, -1}},
    {"q4_1", "q4_1 batched", 3, 20, 32, {0, 2}},          {"q5_0", "q5_0 batched", 6, 22, 32, {0, -1}},
    {"q5_1", "q5_1 batched", 7, 24, 32, {0, 2}},          {"iq4_nl", "iq4_nl batched", 20, 18, 32, {0, -1}},
    {"q2_K", "q2_K batched", 10, 84, 256, {80, 82}},      {"q3_K", "q3_K batched", 11, 110, 256, {108, -1}},
    {"q4_K", "q4_K batched", 12, 144, 256, {0, 2}},       {"q5_K", "q5_K batched", 13, 176, 256, {0, 2}},
    {"q6_K", "q6_K batched", 14, 210, 256, {208, -1}},    {"iq4_xs", "iq4_xs batched", 23, 136, 256, {0, -1}},
};

static void check_rows(void) {
    enum { R = 3, T = 5 };
    for (size_t ti = 0; ti < sizeof TYPES / sizeof TYPES[0]; ti++) {
        const int K = TYPES[ti].qk == 256;
        int sizes[2][4] = {{32, 96, 544, 4128}, {256, 768, 4352, 0}};
        for (int si = 0; si < 4 && sizes[K][si]; si++) {
            const int n = sizes[K][si], nb = n / TYPES[ti].qk;
            const size_t rb = (size_t)nb * TYPES[ti].bsize;
            uint8_t *w = malloc(R * rb);
            for (size_t i = 0; i < R * rb; i++) w[i] = (uint8_t)rand();
            for (int b = 0; b < R * nb; b++)
                for (int f = 0; f < 2; f++)
                    if (TYPES[ti].f16[f] >= 0) sane_f16(w + (size_t)b * TYPES[ti].bsize + TYPES[ti].f16[f]);
            memset(w + rb, 0, TYPES[ti].bsize);                 /* row 1 starts with a zero block */
            float *x = malloc(sizeof(float) * T * n), *xd = malloc(sizeof(float) * T * (n / 32));
            float *xs = malloc(sizeof(float) * T * (n / 32));   /* Q8_0's float sums, or q8_K's int16 */
            int8_t *xq = malloc(T * n);
            for (int i = 0; i < T * n; i++) x[i] = frand();
            memset(x + n, 0, sizeof(float) * TYPES[ti].qk);     /* token 1 starts with zeros */
            /* per token: xd one scale per 256 (K) or 32 values; xs n/32 floats (q8_K: n/16 int16) */
            const int nd = K ? n / 256 : n / 32, ns = n / 32;
            for (int t = 0; t < T; t++) {
                if (K) neon_quant_K(n, x + t * n, xq + t * n, xd + t * nd, (int16_t *)(xs + t * ns));
                else neon_quant(n, x + t * n, xq + t * n, xd + t * nd, xs + t * ns);
            }
            float o1[R * T], o2[R * T], o3[R * T];
            neon_rows(TYPES[ti].type, n, w, rb, R, T, xq, xd, xs, o1);
            scalar_rows(TYPES[ti].type, n, w, rb, R, T, xq, xd, xs, o2);
            for (int t = 0; t < T; t++)
                neon_rows(TYPES[ti].type, n, w, rb, R, 1, xq + t * n, xd + t * nd, xs + t * ns, o3 + t * R);
            for (int i = 0; i < R * T; i++) {
                check(TYPES[ti].name, n, o1[i], o2[i]);
                compare(TYPES[ti].batched, n, o1[i], o3[i], 0);
            }
            free(w); free(x); free(xd); free(xs); free(xq);
        }
    }
}

/* attention over each KV type (0 f32, 1 f16, 2 bf16, 3 q8_0): 12 and 16 heads per KV head */
static void check_attention(void) {
    int cases[][4] = {{1, 12, 300, 3}, {5, 16, 40, 0}, {3, 12, 600, 1}, {9, 16, 257, 2}};
    for (int ci = 0; ci < 4; ci++) {
        const int T = cases[ci][0], G = cases[ci][1], pos0 = cases[ci][2], Hkv = 2, D = 64, S = pos0 + T;
        float *q = malloc(sizeof(float) * T * Hkv * G * D), *o1 = malloc(sizeof(float) * T * Hkv * G * D);
        float *o2 = malloc(sizeof(float) * T * Hkv * G * D);
        for (int i = 0; i < T * Hkv * G * D; i++) q[i] = frand();
        for (int kt = 0; kt < 4; kt++) {
            const int vt = (kt + cases[ci][3]) % 4;
            size_t nk = (size_t)Hkv * S * (kt == 3 ? D / 32 * 34 : D * (kt ? 2 : 4));
            size_t nv = (size_t)Hkv * S * (vt == 3 ? D / 32 * 34 : D * (vt ? 2 : 4));
            uint8_t *kv[2] = {malloc(nk), malloc(nv)};
            int ty[2] = {kt, vt};
            size_t nn[2] = {nk, nv};
            for (int x = 0; x < 2; x++) {
                if (ty[x] == 0)
                    for (size_t i = 0; i < nn[x] / 4; i++) ((float *)kv[x])[i] = frand();
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
            for (int i = 0; i < T * Hkv * G * D; i++) check("attention", S, o1[i], o2[i]);
            free(kv[0]); free(kv[1]);
        }
        free(q); free(o1); free(o2);
    }
}

int main(void) {
    srand(1);
    check_q4_0_q8_0_f();
    check_q8_K();
    check_rows();
    check_attention();
    for (int i = 0; i < ntab; i++) {
        printf("%-15s %s", tab[i].name, tab[i].fails ? "FAIL" : "OK");
        if (tab[i].fails) printf("  %ld of %ld differ", tab[i].fails, tab[i].runs);
        printf("  (max rel diff %.1e)\n", tab[i].maxrel);
    }
    printf("%s%s vs %s: %s\n", neon_isa(), neon_dotprod() ? " (dotprod)" : " (no dotprod)", scalar_isa(),
           fails ? "MISMATCH" : "all kernels agree");
    return fails != 0;
}
