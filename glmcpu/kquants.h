/* glmcpu kernels for the other ggml block formats found in downloaded GGUF files:
 * the legacy Q4_1 / Q5_0 / Q5_1 (blocks of 32, dotted with the Q8_0 activations of kernels.h)
 * and the K-quants Q2_K .. Q6_K (super-blocks of 256, dotted with "q8_K" activations below).
 * Included by kernels.h; each kernel has one SIMD body (AVX2 and AVX-512 builds) falling
 * through to the scalar twin, which is all the generic and NEON builds run.
 *
 * Layouts are learnt from gguf-py's NumPy dequantisers (gguf.quants), the test reference.
 * "value i" is the i-th weight of the block, in row order.
 */
#ifndef GLMCPU_KQUANTS_H
#define GLMCPU_KQUANTS_H

#define QK_K 256

/* Q4_1: value j (0..15) = LOW nibble of qs[j], value j+16 = HIGH nibble; value = q * d + m. */
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;
/* Q5_0: nibbles as Q4_0, plus bit j of the little-endian uint32 qh as bit 4 of value j;
 * value = (q - 16) * d. */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
/* Q5_1: as Q5_0 with a min: value = q * d + m. */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
/* Q2_K: 16 sub-blocks of 16. scales[s]: low nibble scale, high nibble min of sub-block s;
 * value i = 128h + 32k + l (h 0..1, k 0..3, l 0..31) is bits 2k..2k+1 of qs[32h + l];
 * value = d * sc * q - dmin * m. */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } block_q2_K;
/* Q3_K: 16 sub-blocks of 16 with signed 6-bit scales (packed: low 4 bits of scale s in
 * scales[s % 8] (nibble s / 8), high 2 bits in scales[8 + s % 4] bits 2(s/4)..); low 2 bits of
 * value i as for Q2_K, bit 2 of value 32b + l is bit b of hmask[l]; value = d * (sc - 32) *
 * (q - 4 * !hbit). */
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } block_q3_K;
/* Q4_K: 8 sub-blocks of 32 with 6-bit scale and min (see scales_q4_K); value i = 64p + 32s + l
 * (p 0..3, s 0..1) is nibble s (0 low) of qs[32p + l]; value = d * sc * q - dmin * m. */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
/* Q5_K: Q4_K's nibbles plus bit 4 of value 32b + l = bit b of qh[l]. */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
/* Q6_K: 16 sub-blocks of 16 with int8 scales. Value i = 128h + 64s + m (h, s 0..1, m 0..63):
 * low 4 bits = nibble s of ql[64h + m]; value i = 128h + 32k + l: high 2 bits = bits 2k..2k+1
 * of qh[32h + l]; value = d * sc * (q - 32). */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;
BLOCK_BYTES(block_q4_1, 20) BLOCK_BYTES(block_q5_0, 22) BLOCK_BYTES(block_q5_1, 24) BLOCK_BYTES(block_q2_K, 84)
BLOCK_BYTES(block_q3_K, 110) BLOCK_BYTES(block_q4_K, 144) BLOCK_BYTES(block_q5_K, 176) BLOCK_BYTES(block_q6_K, 210)
/* IQ4_NL: one block of 32 = an fp16 scale and Q4_0's nibble layout (value j: LOW nibble of qs[j],
 * value j+16: HIGH nibble); value = d * KVALUES_IQ4[q], llama.cpp's kvalues_iq4nl codebook.
 * IQ4_XS: a super-block of 256 = fp16 d, then 8 sub-blocks of 32, each IQ4_NL's nibbles
 * (qs[16 s ..]) under a 6-bit scale ls (low 4 bits: nibble s % 2 of scales_l[s / 2]; high 2 bits:
 * bits 2s, 2s+1 of scales_h); value = d * (ls - 32) * KVALUES_IQ4[q]. */
typedef struct { uint16_t d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { uint16_t d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
BLOCK_BYTES(block_iq4_nl, 18) BLOCK_BYTES(block_iq4_xs, 136)
static const int8_t KVALUES_IQ4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

#include "kquants_neon.h"      /* the NEON bodies of the kernels below (arm64 builds only) */

/* ---- activations for the K-quants ("q8_K") ------------------------------------------
 * int8 xq[n], one float scale xd[b] per 256 and int16 xb[n/16]: the sum of each 16 xq, which
 * carries the mins and the offsets (Q6_K's - 32) without touching the weights. */
static void quantize_row_q8_K(int n, const float *x, int8_t *xq, float *xd, int16_t *xb) {
#if defined(GLMCPU_NEON)
    neon_quantize_row_q8_K(n, x, xq, xd, xb);
    return;
#endif
    for (int b = 0; b < n / QK_K; b++) {
        const float *v = x + b * QK_K;
        float amax = 0.0f;
        for (int j = 0; j < QK_K; j++) { float a = fabsf(v[j]); amax = a > amax ? a : amax; }
        /* 127 / amax rather than 1 / d: the rounding llama.cpp's q8_K makes, so both engines
         * see the same int8 activations on the same file */
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int s = 0; s < QK_K / 16; s++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                int q = (int)lrintf(v[16 * s + j] * id);
                xq[b * QK_K + 16 * s + j] = (int8_t)q; sum += q;
            }
            xb[b * 16 + s] = (int16_t)sum;
        }
        xd[b] = d;
    }
}

/* Q4_K / Q5_K 6-bit scales and mins of the 8 sub-blocks from their 12 packed bytes. */
static inline void scales_q4_K(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* acc (int32 lanes) += sum of pairs of (u8 q) * (s8 x), times the int16 scale sc in every lane; W: 256 or 512 */
#if defined(GLMCPU_VNNI)
#define DOT_SCALED(W, acc, q, x, sc) _mm##W##_dpwssd_epi32(acc, _mm##W##_maddubs_epi16(q, x), sc)
#else
#define DOT_SCALED(W, acc, q, x, sc) _mm##W##_add_epi32(acc, _mm##W##_madd_epi16(_mm##W##_maddubs_epi16(q, x), sc))
#endif
static inline __m256i dot_scaled(__m256i acc, __m256i q, __m256i x, __m256i sc) { return DOT_SCALED(256, acc, q, x, sc); }
static inline int hsum_i32_256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
/* bit 4 of 32 values from 32 packed bits (bit j -> byte j): 0x10 or 0 */
static inline __m256i bits_to_0x10(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}
#endif

/* ---- K-quant rows . q8_K activations: the scalar twin ----------------------------------
 * Each type's super-block decoded into one form: unsigned values q[v], a scale sc[s] and an
 * offset m[s] per 16 values, so that row . x = dx * (d * sum_s sc[s] (q . x)_s - dmin * sum_s m[s] xb[s])
 * (Q4_K/Q5_K/Q2_K: their mins; Q6_K's "- 32" and Q3_K's "- 4 where the high bit is clear" are
 * offsets of sc[s] * 32 and sc[s] * 4 with dmin = d). Integer sums per super-block are exact, so
 * the SIMD kernels (vec_dot4_*) and this agree up to the order of the float additions. */
/* the 8 sub-block factors ls - 32 of an IQ4_XS super-block */
static inline void scales_iq4_xs(const block_iq4_xs *x, int16_t *sc) {
    for (int s = 0; s < 8; s++)
        sc[s] = (int16_t)((((x->scales_l[s / 2] >> (4 * (s % 2))) & 0x0f) | (((x->scales_h >> (2 * s)) & 3) << 4)) - 32);
}

typedef struct { uint8_t q[QK_K]; int sc[16], m[16]; float d, dmin; } kblock;

static void decode_k(int type, const uint8_t *blk, kblock *k) {
    if (type == GT_Q4_K || type == GT_Q5_K) {
        const block_q4_K *w4 = (const block_q4_K *)blk;
        const block_q5_K *w5 = (const block_q5_K *)blk;
        const uint8_t *qs = type == GT_Q4_K ? w4->qs : w5->qs;
        uint8_t sc[8], m[8];
        scales_q4_K(type == GT_Q4_K ? w4->scales : w5->scales, sc, m);
        for (int s = 0; s < 16; s++) { k->sc[s] = sc[s / 2]; k->m[s] = m[s / 2]; }
        for (int p = 0; p < 4; p++)
            for (int l = 0; l < 32; l++) {      /* bit 2p (2p + 1) of qh[l]: bit 4 of value 64p + l (+ 32) */
                const int hb = type == GT_Q5_K ? w5->qh[l] >> (2 * p) : 0;
                k->q[64 * p + l] = (qs[32 * p + l] & 0x0f) | ((hb & 1) << 4);
                k->q[64 * p + 32 + l] = (qs[32 * p + l] >> 4) | ((hb & 2) << 3);
            }
        k->d = fp16_to_fp32(type == GT_Q4_K ? w4->d : w5->d);
        k->dmin = fp16_to_fp32(type == GT_Q4_K ? w4->dmin : w5->dmin);
    } else if (type == GT_Q6_K) {
        const block_q6_K *w = (const block_q6_K *)blk;
        for (int s = 0; s < 16; s++) { k->sc[s] = w->scales[s]; k->m[s] = 32 * w->scales[s]; }
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 4; c++)
                for (int l = 0; l < 32; l++) {
                    const int lo = w->ql[64 * h + 32 * (c & 1) + l] >> (c & 2 ? 4 : 0);
                    k->q[128 * h + 32 * c + l] = (lo & 0x0f) | (((w->qh[32 * h + l] >> (2 * c)) & 3) << 4);
                }
        k->d = k->dmin = fp16_to_fp32(w->d);
    } else if (type == GT_Q2_K) {
        const block_q2_K *w = (const block_q2_K *)blk;
        for (int s = 0; s < 16; s++) { k->sc[s] = w->scales[s] & 0x0f; k->m[s] = w->scales[s] >> 4; }
        for (int v = 0; v < QK_K; v++) k->q[v] = (w->qs[32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3;
        k->d = fp16_to_fp32(w->d);
        k->dmin = fp16_to_fp32(w->dmin);
    } else if (type == GT_IQ4_XS) {              /* codebook + 128, offsets 128 * sc */
        const block_iq4_xs *w = (const block_iq4_xs *)blk;
        int16_t s16[8];
        scales_iq4_xs(w, s16);
        for (int s = 0; s < 16; s++) { k->sc[s] = s16[s / 2]; k->m[s] = 128 * s16[s / 2]; }
        for (int v = 0; v < QK_K; v++)          /* value 32j + i: nibble i % 16 of qs[16j + i % 16], low for i < 16 */
            k->q[v] = (uint8_t)(KVALUES_IQ4[(w->qs[16 * (v / 32) + v % 16] >> (4 * ((v % 32) / 16))) & 0x0f] + 128);
        k->d = k->dmin = fp16_to_fp32(w->d);
    } else {                                    /* Q3_K */
        const block_q3_K *w = (const block_q3_K *)blk;
        for (int s = 0; s < 16; s++) {
            const int lo = (w->scales[s % 8] >> (4 * (s / 8))) & 0x0f, hi = (w->scales[8 + s % 4] >> (2 * (s / 4))) & 3;
            k->sc[s] = (lo | (hi << 4)) - 32;
            k->m[s] = 4 * k->sc[s];
        }
        for (int v = 0; v < QK_K; v++)          /* bit 2 of value 32c + l: bit c of hmask[l] */
            k->q[v] = ((w->qs[32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3) | (((w->hmask[v % 32] >> (v / 32)) & 1) << 2);
        k->d = k->dmin = fp16_to_fp32(w->d);
    }
}

static float vec_dot_k_q8_K(int type, int n, const uint8_t *w, size_t bsize, const int8_t *xq, const float *xd,
                            const int16_t *xb) {
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; b++) {
        kblock k;
        decode_k(type, w + (size_t)b * bsize, &k);
        int isum = 0, msum = 0;
        for (int s = 0; s < 16; s++) {
            int dot = 0;
            for (int l = 0; l < 16; l++) dot += k.q[16 * s + l] * xq[b * QK_K + 16 * s + l];
            isum += k.sc[s] * dot;
            msum += k.m[s] * xb[16 * b + s];
        }
        sum += xd[b] * (k.d * (float)isum - k.dmin * (float)msum);
    }
    return sum;
}

/* ---- K-quant rows . TC tokens (TC <= 4), the SIMD kernels ---------------------------------
 * res[t] = row . token t. Each block's weights are unpacked once and used for every token; each
 * token's sums run in the same order whatever TC is, so batched and single-token results are
 * bit-identical. Scales are applied in integer (int16 x int16 pairs, VNNI dpwssd where there is
 * one), mins and offsets through the activation sums, then one float multiply per super-block. */
#define KX(t) (xq + (size_t)(t) * n)                 /* token t's int8 activations */
#define KD(t) (xd + (size_t)(t) * (n / QK_K))        /* its scales */
#define KB(t) (xb + (size_t)(t) * (n / 16))          /* its 16-sums */

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* int16 lane j (0..7) of a 128-bit row of 8, in every lane of a 256-bit register */
static inline __m256i lane16(__m256i both, int j) {
    return _mm256_shuffle_epi8(both, _mm256_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j))));
}
/* Q4_K/Q5_K scales (8 int16, broadcast to both halves) and mins duplicated per 16-sum
 * ([m0 m0 m1 m1 .. m7 m7], pairs with the 16 sums of xb) */
static inline void scales_q4_K_simd(const uint8_t *s, __m256i *sc, __m256i *mdup) {
    uint32_t a, b, c;
    memcpy(&a, s, 4); memcpy(&b, s + 4, 4); memcpy(&c, s + 8, 4);
    /* built in registers: four scalar stores read back as one vector would stall the load */
    __m128i v = _mm_set_epi32((int)(((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030)),  /* m 4..7 */
                              (int)(b & 0x3f3f3f3f),                                       /* m 0..3 */
                              (int)((c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030)),           /* sc 4..7 */
                              (int)(a & 0x3f3f3f3f));                                      /* sc 0..3 */
    __m128i m = _mm_cvtepu8_epi16(_mm_srli_si128(v, 8));
    *sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(v));
    *mdup = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
}
/* One super-block of 8 unpacked 32-value pieces q (scales sc, int16) into each token's sum:
 * d*dx * sum(sc * q.x) - (mins or offsets) * 16-sums of x, integer until the multiplies. mins (int16
 * per 16-sum) are Q4_K/Q5_K/Q2_K's mins, times dm (shift < 0), or Q3_K/Q6_K's offsets, times
 * 2^shift in integer (the "- 4" and "- 32" of their values, as multiples of their scales). sgn: the
 * pieces are signed (IQ4_XS's codebook values, never 0), taken as |q| against x with q's sign. */
GLMCPU_INLINE void add_block_k(const __m256i q[8], const __m256i sc[8], __m256i mins, int shift, float d, float dm,
                               int sgn, int b, int n, int TC, const int8_t *xq, const float *xd, const int16_t *xb,
                               __m256 acc[4]) {
    /* piece outer, each token's running sum in a register (AVX2's 16 hold no more: the pieces
     * and scales of a block wait in L1) */
    __m256i ai[4];
    for (int t = 0; t < TC; t++) ai[t] = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const __m256i qa = sgn ? _mm256_sign_epi8(q[j], q[j]) : q[j];     /* signed pieces: |q| . (x, q's sign) */
        for (int t = 0; t < TC; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(KX(t) + b * QK_K + 32 * j));
            ai[t] = dot_scaled(ai[t], qa, sgn ? _mm256_sign_epi8(x, q[j]) : x, sc[j]);
            IN_REG(ai[t]);
        }
    }
    for (int t = 0; t < TC; t++) {
        __m256i mi = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(KB(t) + 16 * b)), mins);
        float dx = KD(t)[b];
        if (shift >= 0) ai[t] = _mm256_sub_epi32(ai[t], _mm256_slli_epi32(mi, shift));
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(ai[t]), acc[t]);
        if (shift < 0) acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dm * dx), _mm256_cvtepi32_ps(mi), acc[t]);
    }
}
#endif

/* the rows are read once, front to back: ask for a few super-blocks ahead (a hint; reading
 * past the row's end is harmless for a prefetch) */
#define KPREFETCH(p, size) do { const char *pf_ = (const char *)(p); \
    for (size_t o_ = 0; o_ < (size); o_ += 64) _mm_prefetch(pf_ + o_, _MM_HINT_T0); } while (0)
/* the 8-row group kernels: a block PFD bytes ahead, on the first pass over a group (later token
 * chunks find it in cache). With 2+ tokens a block's arithmetic outlasts
 * the hardware prefetcher's lead (a 2-token pass over a 151k x 4096 Q4_0 head: 12-15 ms -> 10-12,
 * one token unchanged; tools/bench_draft.py) */
#define PFD 1024
/* the row kernels: the bytes PFD ahead of super-block (or block) b, as it is reached. Rows lie
 * back to back, so this runs into the next row too. 4 super-blocks ahead (336 bytes of Q2_K) left a
 * 40-layer Q2_K decode at 12 GB/s, 1 KB ahead gives 23 (2 threads, gate|up 27392 x 4096). */
#define KAHEAD(blk) KPREFETCH((const char *)(blk) + PFD, sizeof(*(blk)))

#if defined(GLMCPU_AVX512)
static inline __m512i dot_scaled512(__m512i acc, __m512i q, __m512i x, __m512i sc) { return DOT_SCALED(512, acc, q, x, sc); }
#endif
#if defined(GLMCPU_AVX512)
/* add_block_k with two pieces per 512-bit step (AVX-512 Q6_K, where it paid off); the
 * mins go to accm */
GLMCPU_INLINE void add_block_k512(const __m256i q[8], const __m256i sc[8], __m256i mins, int shift, float d, float dm,
                                  int b, int n, int TC, const int8_t *xq, const float *xd, const int16_t *xb,
                                  __m512 acc[4], __m256 accm[4]) {
    __m512i q2[4], s2[4];
    for (int m = 0; m < 4; m++) {
        q2[m] = _mm512_inserti64x4(_mm512_castsi256_si512(q[2 * m]), q[2 * m + 1], 1);
        s2[m] = _mm512_inserti64x4(_mm512_castsi256_si512(sc[2 * m]), sc[2 * m + 1], 1);
    }
    for (int t = 0; t < TC; t++) {
        __m512i ai = _mm512_setzero_si512();
        for (int m = 0; m < 4; m++)
            ai = dot_scaled512(ai, q2[m], _mm512_loadu_si512((const void *)(KX(t) + b * QK_K + 64 * m)), s2[m]);
        __m256i mi = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(KB(t) + 16 * b)), mins);
        float dx = KD(t)[b];
        if (shift >= 0) ai = _mm512_sub_epi32(ai, _mm512_zextsi256_si512(_mm256_slli_epi32(mi, shift)));
        acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(ai), acc[t]);
        if (shift < 0) accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(dm * dx), _mm256_cvtepi32_ps(mi), accm[t]);
    }
}
#endif

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* scale vector of piece i (32 values = sub-blocks 2i, 2i+1 of 16) from 16 int16 scales */
static inline __m256i piece_scales(__m256i sc16, int i) {
    __m256i half = _mm256_broadcastsi128_si256(i >= 4 ? _mm256_extracti128_si256(sc16, 1)
                                                      : _mm256_castsi256_si128(sc16));
    int k = i & 3;
    return _mm256_shuffle_epi8(half, _mm256_set_m128i(_mm_set1_epi16((short)(((4 * k + 3) << 8) | (4 * k + 2))),
                                                      _mm_set1_epi16((short)(((4 * k + 1) << 8) | (4 * k)))));
}
#endif


#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* the 32 signed codebook values of a block's 16 nibble bytes (value j in byte j) */
static inline __m256i values_iq4(const uint8_t *qs, __m256i table) {
    return _mm256_shuffle_epi8(table, unpack_q4_0(qs));
}
#endif


#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* A super-block of Q4_K, Q5_K, Q6_K, Q2_K or Q3_K unpacked: 8 pieces of 32 unsigned values
 * (piece i = values 32i..32i+31), their int16 scales per 16 (sc[i]: sub-blocks 2i, 2i+1 of 16, or
 * sub-block i of 32 twice), and the int16 mins or offsets per 16-sum for add_block_k. Returns the
 * offsets' shift (-1: mins, in float times *dm). */
GLMCPU_INLINE int unpack_k(const int type, const uint8_t *blk, __m256i q[8], __m256i sc[8], __m256i *mins,
                           float *d, float *dm) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    if (type == GT_Q4_K || type == GT_Q5_K) {
        const block_q4_K *w4 = (const block_q4_K *)blk;
        const block_q5_K *w5 = (const block_q5_K *)blk;
        __m256i scv;
        scales_q4_K_simd(type == GT_Q4_K ? w4->scales : w5->scales, &scv, mins);
        /* Q5_K: bit 2p of qh[l] is bit 4 of value 64p + l, bit 2p + 1 of value 64p + 32 + l; the
         * 16-bit shifts leak bits across bytes only above the two bits read */
        __m256i hb = type == GT_Q5_K ? _mm256_loadu_si256((const __m256i *)w5->qh) : _mm256_setzero_si256();
        const __m256i b4 = _mm256_set1_epi8(0x10);
        for (int p = 0; p < 4; p++) {       /* sub-block j = 2p + s holds values 32j..32j+31 */
            __m256i v = _mm256_loadu_si256((const __m256i *)((type == GT_Q4_K ? w4->qs : w5->qs) + 32 * p));
            q[2 * p] = _mm256_and_si256(v, m4);
            q[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (type == GT_Q5_K) {
                q[2 * p] = _mm256_or_si256(q[2 * p], _mm256_and_si256(_mm256_slli_epi16(hb, 4), b4));
                q[2 * p + 1] = _mm256_or_si256(q[2 * p + 1], _mm256_and_si256(_mm256_slli_epi16(hb, 3), b4));
                hb = _mm256_srli_epi16(hb, 2);
            }
        }
        for (int j = 0; j < 8; j++) sc[j] = lane16(scv, j);
        *d = fp16_to_fp32(type == GT_Q4_K ? w4->d : w5->d);
        *dm = fp16_to_fp32(type == GT_Q4_K ? w4->dmin : w5->dmin);
        return -1;
    }
    if (type == GT_IQ4_XS) {                 /* signed codebook values, sub-block j = piece j */
        const block_iq4_xs *w = (const block_iq4_xs *)blk;
        const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4));
        int16_t s16[8];
        scales_iq4_xs(w, s16);
        for (int j = 0; j < 8; j++) {
            q[j] = values_iq4(w->qs + 16 * j, table);
            sc[j] = _mm256_set1_epi16(s16[j]);
        }
        *mins = _mm256_setzero_si256();
        *d = *dm = fp16_to_fp32(w->d);
        return 0;
    }
    __m256i sc16;
    if (type == GT_Q6_K) {                  /* piece 4h + k: k = 0 low nibbles of ql[64h..], 1 of
                                             * ql[64h + 32..], 2 and 3 their high nibbles; its high 2
                                             * bits are bits 2k, 2k+1 of qh[32h + l] */
        const block_q6_K *w = (const block_q6_K *)blk;
        const __m256i m3 = _mm256_set1_epi8(0x30);
        sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales));
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
            q[4 * h] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m3));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m3));
            q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m3));
            q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi16(hb, 2), m3));
        }
        *d = *dm = fp16_to_fp32(w->d);
    } else if (type == GT_Q2_K) {            /* piece 4h + k holds bits 2k..2k+1 of qs[32h + l] */
        const block_q2_K *w = (const block_q2_K *)blk;
        __m128i raw = _mm_loadu_si128((const __m128i *)w->scales);
        sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0f)));
        *mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0f)));
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));
            for (int k = 0; k < 4; k++) q[4 * h + k] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m2);
        }
        *d = fp16_to_fp32(w->d);
        *dm = fp16_to_fp32(w->dmin);
    } else {                                /* Q3_K: bit 2 of value 32c + l is bit c of hmask[l]; the
                                             * "- 4 when that bit is clear" is taken as "- 4" off
                                             * q + 4 * bit, through the activation sums */
        const block_q3_K *w = (const block_q3_K *)blk;
        /* the 16 6-bit scales in registers (scalar stores read back as a vector stalled the load,
         * and their 96 scalar ops outweighed the dot products: 5.6 GB/s): low 4 bits of scale s are
         * nibble s / 8 of scales[s % 8], high 2 bits are bits 2(s / 4).. of scales[8 + s % 4] */
        uint64_t l8;
        uint32_t h4;
        memcpy(&l8, w->scales, 8);
        memcpy(&h4, w->scales + 8, 4);
        __m128i lo = _mm_set_epi64x((long long)((l8 >> 4) & 0x0f0f0f0f0f0f0f0fULL), (long long)(l8 & 0x0f0f0f0f0f0f0f0fULL));
        __m128i hi = _mm_set_epi32((int)((h4 >> 6) & 0x03030303), (int)((h4 >> 4) & 0x03030303),
                                   (int)((h4 >> 2) & 0x03030303), (int)(h4 & 0x03030303));
        sc16 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32)));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)w->hmask), b2 = _mm256_set1_epi8(4);
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));
            for (int k = 0; k < 4; k++) {
                __m256i hb = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hm, 4 * h + k), 2), b2);
                q[4 * h + k] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m2), hb);
            }
        }
        *d = *dm = fp16_to_fp32(w->d);
    }
    for (int i = 0; i < 8; i++) sc[i] = piece_scales(sc16, i);
    if (type == GT_Q2_K) return -1;
    *mins = sc16;
    return type == GT_Q6_K ? 5 : 2;
}
#endif

/* Rows of Q4_K, Q5_K, Q6_K, Q2_K, Q3_K or IQ4_XS against TC tokens (<= 4) of q8_K activations. */
GLMCPU_INLINE void vec_dot4_k(const int type, int n, const uint8_t *w, const int TC, const int8_t *xq,
                              const float *xd, const int16_t *xb, float *res) {
    const size_t bsize = type == GT_Q4_K ? sizeof(block_q4_K) : type == GT_Q5_K ? sizeof(block_q5_K)
                       : type == GT_Q6_K ? sizeof(block_q6_K) : type == GT_Q2_K ? sizeof(block_q2_K)
                       : type == GT_IQ4_XS ? sizeof(block_iq4_xs) : sizeof(block_q3_K);
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
#if defined(GLMCPU_AVX512)
    const int wide = type == GT_Q6_K;   /* two pieces per 512-bit step: Q6_K 7% faster, Q4_K 10% slower */
#endif
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#if defined(GLMCPU_AVX512)
    __m256 accm[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m512 acc2[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#endif
    for (int b = 0; b < n / QK_K; b++) {
        const uint8_t *blk = w + (size_t)b * bsize;
        __m256i q[8], sc[8], mins;
        float d, dm;
        KPREFETCH(blk + PFD, bsize);
        const int shift = unpack_k(type, blk, q, sc, &mins, &d, &dm);
#if defined(GLMCPU_AVX512)
        if (wide) add_block_k512(q, sc, mins, shift, d, dm, b, n, TC, xq, xd, xb, acc2, accm);
        else
#endif
        add_block_k(q, sc, mins, shift, d, dm, type == GT_IQ4_XS, b, n, TC, xq, xd, xb, acc);
    }
    for (int t = 0; t < TC; t++) {
#if defined(GLMCPU_AVX512)
        if (wide) { res[t] = _mm512_reduce_add_ps(acc2[t]) - hsum256(accm[t]); continue; }
#endif
        res[t] = hsum256(acc[t]);
    }
#elif defined(GLMCPU_NEON)
    switch (type) {
    case GT_Q4_K: neon_dot_q4_K(n, (const block_q4_K *)w, TC, xq, xd, xb, res); break;
    case GT_Q5_K: neon_dot_q5_K(n, (const block_q5_K *)w, TC, xq, xd, xb, res); break;
    case GT_Q6_K: neon_dot_q6_K(n, (const block_q6_K *)w, TC, xq, xd, res); break;
    case GT_Q2_K: neon_dot_q2_K(n, (const block_q2_K *)w, TC, xq, xd, xb, res); break;
    case GT_IQ4_XS: neon_dot_iq4_xs(n, (const block_iq4_xs *)w, TC, xq, xd, res); break;
    default: neon_dot_q3_K(n, (const block_q3_K *)w, TC, xq, xd, res); break;
    }
#else
    for (int t = 0; t < TC; t++) res[t] = vec_dot_k_q8_K(type, n, w, bsize, KX(t), KD(t), KB(t));
#endif
}

/* Prefill tiles: KROWS rows against 4 tokens at a time, so the 4 tokens' activations stay in L1
 * while the rows pass, instead of every row streaming all T tokens from L2/L3. */
#define KROWS 16

/* ---- IQ4_NL and IQ4_XS --------------------------------------------------------------------
 * 4-bit indices into a fixed non-linear codebook of 16 signed values (layouts at the top of this file):
 * the rows llama.cpp writes where a width is not a multiple of 256 (GLM-4.5-Air's 1408-wide expert
 * down rows, GLM-4-9B's 13696) in its IQ mixes, and the IQ4_XS file type.
 * IQ4_NL is dotted with Q8_0 activations (as Q4_0), IQ4_XS with q8_K activations (as the K-quants,
 * and as llama.cpp does): integer sums scaled in integer, one float multiply per super-block and
 * token. */


/* integer dot of one 32-value codebook block (16 nibble bytes) with 32 int8 activations */
static inline int dot_iq4_block(const uint8_t *qs, const int8_t *x) {
    int isum = 0;
    for (int j = 0; j < 16; j++) isum += KVALUES_IQ4[qs[j] & 0x0f] * x[j] + KVALUES_IQ4[qs[j] >> 4] * x[j + 16];
    return isum;
}


/* TC tokens (<= 4) of Q8_0 activations at once, each block's values looked up once. */
GLMCPU_INLINE void vec_dot4_iq4_nl_q8_0(int n, const block_iq4_nl *w, const int TC, const int8_t *xq,
                                        const float *xd, float *res) {
    int nb = n / QK;
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)KVALUES_IQ4));
#if !defined(GLMCPU_VNNI)
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int b = 0; b < nb; b++) {
        KAHEAD(w + b);
        float d = fp16_to_fp32(w[b].d);
        __m256i v = values_iq4(w[b].qs, table);
        __m256i av = _mm256_sign_epi8(v, v);                   /* |value| as u8 (the codebook has no 0) */
        for (int t = 0; t < TC; t++) {
            __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + (size_t)t * n + b * QK)), v);
#if defined(GLMCPU_VNNI)
            __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), av, x);
#else
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(av, x), ones);   /* pairs <= 2 * 127 * 127 */
#endif
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[(size_t)t * nb + b]), _mm256_cvtepi32_ps(p), acc[t]);
        }
    }
    for (int t = 0; t < TC; t++) res[t] = hsum256(acc[t]);
#elif defined(GLMCPU_NEON)
    (void)nb;
    neon_dot_iq4_nl(n, w, TC, xq, xd, res);
#else
    for (int t = 0; t < TC; t++) {
        float sum = 0.0f;
        for (int b = 0; b < nb; b++)
            sum += fp16_to_fp32(w[b].d) * xd[(size_t)t * nb + b] * (float)dot_iq4_block(w[b].qs, xq + (size_t)t * n + b * QK);
        res[t] = sum;
    }
#endif
}

#include "iquants.h"       /* IQ1_S .. IQ3_S rows, also dispatched by gemm_rows_k */

/* Rows r0..r1 of a K-quant matrix against T tokens of q8_K activations: out[t*ldo + r]. */
static void gemm_rows_k(int type, int n, const uint8_t *w, size_t row_bytes, int r0, int r1, int T,
                        const int8_t *xq, const float *xd, const int16_t *xb, float *out, int ldo) {
    for (int rb = r0; rb < r1; rb += KROWS)
    FOR_TC(t, tc, T, 4) {
        for (int r = rb; r < r1 && r < rb + KROWS; r++) {
            const uint8_t *row = w + (size_t)r * row_bytes;
            float res[4];
            const int8_t *q = KX(t);
            const float *d = KD(t);
            const int16_t *s = KB(t);
#define KCASE(tp, name, blk, TC) case tp: name(n, (const blk *)row, TC, q, d, s, res); break
#define KKCASE(tp, TC) case tp: vec_dot4_k(tp, n, row, TC, q, d, s, res); break
#define KTYPES(TC) switch (type) { \
            KKCASE(GT_Q2_K, TC); KKCASE(GT_Q3_K, TC); KKCASE(GT_Q4_K, TC); KKCASE(GT_Q5_K, TC); \
            KKCASE(GT_IQ4_XS, TC); \
            IQ_KCASES(KCASE, TC); \
            default: vec_dot4_k(GT_Q6_K, n, row, TC, q, d, s, res); }
            TC_CONST(tc, KTYPES);
#undef KTYPES
#undef KCASE
#undef KKCASE
            for (int j = 0; j < tc; j++) out[(size_t)(t + j) * ldo + r] = res[j];
        }
    }
}
#undef KX
#undef KD
#undef KB

/* ---- legacy 32-blocks . Q8_0 activations (xq, xd, xs of kernels.h) --------------------- */

/* 5-bit (or 4-bit when qh is NULL) values of one block as 32 bytes, in element order */
static inline void unpack_q5(const uint8_t *qs, const uint8_t *qh, uint8_t *q) {
    uint32_t h = 0;
    if (qh) memcpy(&h, qh, 4);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0x0f) | (((h >> j) & 1) << 4);
        q[j + 16] = (qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4);
    }
}

/* sum over blocks of d * xd * dot(q, x) (+ m * xs for mins, - off * d * xs for offsets) */
static inline float vec_dot_q45_q8_0(int nb, const uint8_t *w, size_t bsize, int qs_at, int qh_at,
                                     int m_at, float off, const int8_t *xq, const float *xd,
                                     const float *xs) {
    float sum = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bsize;
        uint16_t dh;
        memcpy(&dh, blk, 2);
        float d = fp16_to_fp32(dh);
        int isum = 0;
        uint8_t q[32];
        unpack_q5(blk + qs_at, qh_at >= 0 ? blk + qh_at : NULL, q);
        for (int j = 0; j < 32; j++) isum += q[j] * xq[b * QK + j];
        float v = d * (xd[b] * (float)isum - off * xs[b]);
        if (m_at >= 0) {
            uint16_t mh;
            memcpy(&mh, blk + m_at, 2);
            v += fp16_to_fp32(mh) * xs[b];
        }
        sum += v;
    }
    return sum;
}

/* TC tokens (<= 4) at once, weights unpacked once per block: res[t] = row . token t, for the
 * legacy 32-blocks; float accumulation in vector lanes, the mins/offsets in a scalar per token. */
GLMCPU_INLINE void vec_dot4_q45_q8_0(int n, const uint8_t *w, size_t bsize, int qs_at, int qh_at,
                                     int m_at, float off, const int TC, const int8_t *xq,
                                     const float *xd, const float *xs, float *res) {
    int nb = n / QK;
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float corr[4] = {0, 0, 0, 0};
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bsize;
        KPREFETCH(blk + PFD, bsize);
        uint16_t dh, mh = 0;
        memcpy(&dh, blk, 2);
        if (m_at >= 0) memcpy(&mh, blk + m_at, 2);
        float d = fp16_to_fp32(dh), c = (m_at >= 0 ? fp16_to_fp32(mh) : 0.0f) - off * d;
        __m256i q = unpack_q4_0(blk + qs_at);
        if (qh_at >= 0) {
            uint32_t h;
            memcpy(&h, blk + qh_at, 4);
            q = _mm256_or_si256(q, bits_to_0x10(h));
        }
        for (int t = 0; t < TC; t++) {
            const int8_t *x = xq + (size_t)t * n + b * QK;
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x)), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[(size_t)t * nb + b]), _mm256_cvtepi32_ps(p), acc[t]);
            corr[t] += c * xs[(size_t)t * nb + b];
        }
    }
    for (int t = 0; t < TC; t++) res[t] = hsum256(acc[t]) + corr[t];
#elif defined(GLMCPU_NEON)
    (void)nb;
    neon_dot_q45_q8_0(n, w, bsize, qs_at, qh_at, m_at, off, TC, xq, xd, xs, res);
#else
    for (int t = 0; t < TC; t++)
        res[t] = vec_dot_q45_q8_0(nb, w, bsize, qs_at, qh_at, m_at, off, xq + (size_t)t * n,
                                  xd + (size_t)t * nb, xs + (size_t)t * nb);
#endif
}

/* Rows r0..r1 of a Q4_1 / Q5_0 / Q5_1 / IQ4_NL matrix against T tokens of Q8_0 activations. */
static void gemm_rows_legacy(int type, int n, const uint8_t *w, size_t row_bytes, int r0, int r1, int T,
                             const int8_t *xq, const float *xd, const float *xs, float *out, int ldo) {
    int nb = n / QK;
    for (int rb = r0; rb < r1; rb += KROWS)
    FOR_TC(t, tc, T, 4) {
        for (int r = rb; r < r1 && r < rb + KROWS; r++) {
            const uint8_t *row = w + (size_t)r * row_bytes;
            float res[4];
            const int8_t *q = xq + (size_t)t * n;
            const float *d = xd + (size_t)t * nb, *s = xs + (size_t)t * nb;
#define LCASE(tp, bsize, qs_at, qh_at, m_at, off, TC) case tp: \
            vec_dot4_q45_q8_0(n, row, bsize, qs_at, qh_at, m_at, off, TC, q, d, s, res); break
#define LTYPES(TC) switch (type) {              /* byte offsets of qs, qh, m in the block */ \
            LCASE(GT_Q4_1, sizeof(block_q4_1), 4, -1, 2, 0.0f, TC); \
            LCASE(GT_Q5_0, sizeof(block_q5_0), 6, 2, -1, 16.0f, TC); \
            case GT_IQ4_NL: vec_dot4_iq4_nl_q8_0(n, (const block_iq4_nl *)row, TC, q, d, res); break; \
            default: LCASE(GT_Q5_1, sizeof(block_q5_1), 8, 4, 2, 0.0f, TC); }
            TC_CONST(tc, LTYPES);
#undef LTYPES
#undef LCASE
            for (int j = 0; j < tc; j++) out[(size_t)(t + j) * ldo + r] = res[j];
        }
    }
}

#endif
