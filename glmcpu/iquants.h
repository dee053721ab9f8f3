/* glmcpu kernels for llama.cpp's codebook ("i-quant") types below 4 bits: IQ3_S, IQ3_XXS,
 * IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S, IQ1_M. Included by kquants.h (after the K-quants' helpers, before
 * gemm_rows_k, which dispatches to them); the codebooks are in iq_tables.h, generated from gguf-py.
 *
 * All are super-blocks of 256 values dotted with q8_K activations, as llama.cpp does. A super-block
 * is first decoded once (whatever the token count) into 256 int8 values q and 16 integer scales
 * sc (one per 16 values), with
 *     value i = (d / den) * sc[i / 16] * q[i]                                  (den a power of 2),
 * then each token's sum(sc * q.x) is exact integer arithmetic and one float multiply per
 * super-block. The integer sums are the same in every build and the float steps are the same scalar
 * code, so the SIMD body (AVX2, also in the AVX-512 builds) and the scalar twin give equal bits,
 * and so do batched and single tokens.
 *
 * Layouts, as gguf-py's dequantisers read them ("group g": values 8g..8g+7; grids: iq_tables.h):
 * IQ2_XXS  d; qs = 8 pairs of u32 (a0, a1), one per 32 values: group l of the pair is
 *          IQ2XXS_GRID[byte l of a0] with signs KSIGNS[(a1 >> 7l) & 127]; scale 2 * (a1 >> 28) + 1;
 *          den 8 (d * (0.5 + s) / 4).
 * IQ2_XS   d; qs[32] u16, one per group: IQ2XS_GRID[q & 511], signs KSIGNS[q >> 9]; scales[8]:
 *          nibble h of byte s scales values 32s + 16h..; 2 * s + 1, den 8.
 * IQ2_S    d; qs[32] grid index low bytes, then signs[32] (bit j of byte g: value j of group g
 *          negative); qh[8]: bits 2 (g % 4).. of qh[g / 4] are index bits 8-9; scales as IQ2_XS.
 * IQ3_XXS  d; qs[64] IQ3XXS_GRID indices of 4 values; then 8 u32 (a): signs of group l of
 *          32-value block s from KSIGNS[(a >> 7l) & 127], scale 2 * (a >> 28) + 1, den 4.
 * IQ3_S    d; qs[64] index low bytes, qh[8] (bit i % 8 of qh[i / 8]: index bit 8), signs[32]
 *          (as IQ2_S), scales[4]: nibble s % 2 of byte s / 2 scales block s; 2 * s + 1, den 1.
 * IQ1_S    d; qs[32] index low bytes; qh[8] u16, one per 32 values: bits 3l..3l+2 index bits 8-10
 *          of group 4s + l, bits 12-14 scale (2 s + 1), bit 15 delta's sign; value = d * scale *
 *          (grid + delta), delta = +-1/8: q = 8 grid +- 1, den 8.
 * IQ1_M    qs[32] index low bytes; qh[16]: nibble g % 2 of qh[g / 2] holds index bits 8-10 and
 *          (bit 3) delta's sign of group g; scales as 4 u16: 3-bit scale k (values 16k..) is bits
 *          3 (k % 4).. of u16 k / 4, and d (fp16) is their four top nibbles, u16 0's lowest. */
#ifndef GLMCPU_IQUANTS_H
#define GLMCPU_IQUANTS_H

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#error "iq_tables.h holds the grids as little-endian words"
#endif
#include "iq_tables.h"

/* ggml type codes (gguf.GGMLQuantizationType) */
enum { GT_IQ2_XXS = 16, GT_IQ2_XS = 17, GT_IQ3_XXS = 18, GT_IQ1_S = 19, GT_IQ3_S = 21, GT_IQ2_S = 22,
       GT_IQ1_M = 29 };

typedef struct { uint16_t d; uint16_t qs[32]; } block_iq2_xxs;
typedef struct { uint16_t d; uint16_t qs[32]; uint8_t scales[8]; } block_iq2_xs;
typedef struct { uint16_t d; uint8_t qs[32]; uint8_t signs[32]; uint8_t qh[8]; uint8_t scales[8]; } block_iq2_s;
typedef struct { uint16_t d; uint8_t qs[64]; uint8_t scales_signs[32]; } block_iq3_xxs;  /* 8 u32, unaligned */
typedef struct { uint16_t d; uint8_t qs[64]; uint8_t qh[8]; uint8_t signs[32]; uint8_t scales[4]; } block_iq3_s;
typedef struct { uint16_t d; uint8_t qs[32]; uint16_t qh[8]; } block_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint8_t scales[8]; } block_iq1_m;
BLOCK_BYTES(block_iq2_xxs, 66) BLOCK_BYTES(block_iq2_xs, 74) BLOCK_BYTES(block_iq2_s, 82) BLOCK_BYTES(block_iq3_xxs, 98)
BLOCK_BYTES(block_iq3_s, 110) BLOCK_BYTES(block_iq1_s, 50) BLOCK_BYTES(block_iq1_m, 56)

/* the types that run through iq_rows below */
static inline int is_iq_q8_K(int type) {
    return type == GT_IQ2_XXS || type == GT_IQ2_XS || type == GT_IQ2_S || type == GT_IQ3_XXS ||
           type == GT_IQ3_S || type == GT_IQ1_S || type == GT_IQ1_M;
}

#define IQ_LO7 0x7f7f7f7f7f7f7f7fULL
#define IQ_ONES 0x0101010101010101ULL
/* 8 grid bytes (all 1..127) negated where the byte mask m is 0xff: -g = (g ^ 0xff) + 1 = 256 - g,
 * which never carries into the next byte because g > 0 */
static inline uint64_t iq_signed8(uint64_t g, uint64_t m) { return (g ^ m) + (m & IQ_ONES); }
/* bytewise a + b mod 256, no carries between bytes */
static inline uint64_t iq_add8(uint64_t a, uint64_t b) {
    return ((a & IQ_LO7) + (b & IQ_LO7)) ^ ((a ^ b) & ~IQ_LO7);
}
/* IQ1 values of one group: 8 * grid (bytes -1, 0, 1 -> 0xf8, 0, 8) + delta (IQ_ONES or all 0xff) */
static inline uint64_t iq1_group(uint64_t g, uint64_t delta) {
    return iq_add8((g << 3) & 0xf8f8f8f8f8f8f8f8ULL, delta);
}
static inline uint32_t iq_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void iq_put8(int8_t *q, uint64_t v) { memcpy(q, &v, 8); }

/* ---- decoders: q[256], sc[16] and the factor d / den of one super-block ----------------------- */
static inline float unpack_iq2_xxs(const block_iq2_xxs *x, int8_t *q, int16_t *sc) {
    const uint8_t *qs = (const uint8_t *)x->qs;
    for (int s = 0; s < 8; s++) {
        uint32_t a0 = iq_u32(qs + 8 * s), a1 = iq_u32(qs + 8 * s + 4);
        sc[2 * s] = sc[2 * s + 1] = (int16_t)(2 * (a1 >> 28) + 1);
        for (int l = 0; l < 4; l++)
            iq_put8(q + 32 * s + 8 * l, iq_signed8(IQ2XXS_GRID[(a0 >> 8 * l) & 255],
                                                   SIGN_MASK8[KSIGNS_IQ2XS[(a1 >> 7 * l) & 127]]));
    }
    return fp16_to_fp32(x->d) * 0.125f;
}

static inline void scales_iq2_xs(const uint8_t *scales, int16_t *sc) {
    for (int s = 0; s < 8; s++) {
        sc[2 * s] = (int16_t)(2 * (scales[s] & 15) + 1);
        sc[2 * s + 1] = (int16_t)(2 * (scales[s] >> 4) + 1);
    }
}

static inline float unpack_iq2_xs(const block_iq2_xs *x, int8_t *q, int16_t *sc) {
    for (int g = 0; g < 32; g++) {
        uint16_t v = x->qs[g];
        iq_put8(q + 8 * g, iq_signed8(IQ2XS_GRID[v & 511], SIGN_MASK8[KSIGNS_IQ2XS[v >> 9]]));
    }
    scales_iq2_xs(x->scales, sc);
    return fp16_to_fp32(x->d) * 0.125f;
}

static inline float unpack_iq2_s(const block_iq2_s *x, int8_t *q, int16_t *sc) {
    for (int g = 0; g < 32; g++) {
        int idx = x->qs[g] | (((x->qh[g / 4] >> 2 * (g % 4)) & 3) << 8);
        iq_put8(q + 8 * g, iq_signed8(IQ2S_GRID[idx], SIGN_MASK8[x->signs[g]]));
    }
    scales_iq2_xs(x->scales, sc);
    return fp16_to_fp32(x->d) * 0.125f;
}

static inline float unpack_iq3_xxs(const block_iq3_xxs *x, int8_t *q, int16_t *sc) {
    for (int s = 0; s < 8; s++) {
        uint32_t a = iq_u32(x->scales_signs + 4 * s);
        sc[2 * s] = sc[2 * s + 1] = (int16_t)(2 * (a >> 28) + 1);
        for (int l = 0; l < 4; l++) {
            const uint8_t *i = x->qs + 8 * s + 2 * l;
            uint64_t g = IQ3XXS_GRID[i[0]] | ((uint64_t)IQ3XXS_GRID[i[1]] << 32);
            iq_put8(q + 32 * s + 8 * l, iq_signed8(g, SIGN_MASK8[KSIGNS_IQ2XS[(a >> 7 * l) & 127]]));
        }
    }
    return fp16_to_fp32(x->d) * 0.25f;
}

static inline float unpack_iq3_s(const block_iq3_s *x, int8_t *q, int16_t *sc) {
    for (int g = 0; g < 32; g++) {
        int i0 = x->qs[2 * g] | (((x->qh[g / 4] >> (2 * g % 8)) & 1) << 8);
        int i1 = x->qs[2 * g + 1] | (((x->qh[g / 4] >> (2 * g % 8 + 1)) & 1) << 8);
        uint64_t v = IQ3S_GRID[i0] | ((uint64_t)IQ3S_GRID[i1] << 32);
        iq_put8(q + 8 * g, iq_signed8(v, SIGN_MASK8[x->signs[g]]));
    }
    for (int s = 0; s < 8; s++)
        sc[2 * s] = sc[2 * s + 1] = (int16_t)(2 * ((x->scales[s / 2] >> 4 * (s % 2)) & 15) + 1);
    return fp16_to_fp32(x->d);
}

static inline float unpack_iq1_s(const block_iq1_s *x, int8_t *q, int16_t *sc) {
    for (int s = 0; s < 8; s++) {
        uint16_t h = x->qh[s];
        uint64_t delta = (h & 0x8000) ? ~0ULL : IQ_ONES;
        sc[2 * s] = sc[2 * s + 1] = (int16_t)(2 * ((h >> 12) & 7) + 1);
        for (int l = 0; l < 4; l++)
            iq_put8(q + 32 * s + 8 * l, iq1_group(IQ1S_GRID[x->qs[4 * s + l] | (((h >> 3 * l) & 7) << 8)], delta));
    }
    return fp16_to_fp32(x->d) * 0.125f;
}

static inline float unpack_iq1_m(const block_iq1_m *x, int8_t *q, int16_t *sc) {
    uint16_t s16[4];
    memcpy(s16, x->scales, 8);
    uint16_t d = (uint16_t)((s16[0] >> 12) | ((s16[1] >> 8) & 0x00f0) | ((s16[2] >> 4) & 0x0f00) | (s16[3] & 0xf000));
    for (int k = 0; k < 16; k++) sc[k] = (int16_t)(2 * ((s16[k / 4] >> 3 * (k % 4)) & 7) + 1);
    for (int g = 0; g < 32; g++) {
        int h = (x->qh[g / 2] >> 4 * (g % 2)) & 15;
        iq_put8(q + 8 * g, iq1_group(IQ1S_GRID[x->qs[g] | ((h & 7) << 8)], (h & 8) ? ~0ULL : IQ_ONES));
    }
    return fp16_to_fp32(d) * 0.125f;
}

/* ---- one decoded super-block . q8_K activations ------------------------------------------------ */
/* sum over the 16 groups of 16 of sc[k] * (q . x), exactly: |q| <= 62, so |sum| < 2^26 */
static inline int dot_iq_q8_K(const int8_t *q, const int16_t *sc, const int8_t *x) {
    int isum = 0;
    for (int k = 0; k < 16; k++) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += q[16 * k + j] * x[16 * k + j];
        isum += sc[k] * s;
    }
    return isum;
}

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
/* The super-block in registers: |q| as u8, q (for the signs) and the two scales of each 32 values
 * (int16 lanes 0-7 of a maddubs result come from values 0-15, lanes 8-15 from 16-31). */
typedef struct { __m256i aq[8], q[8], sc[8]; } iq_regs;
static inline void iq_load(iq_regs *r, const int8_t *q, const int16_t *sc) {
    for (int j = 0; j < 8; j++) {
        r->q[j] = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
        r->aq[j] = _mm256_sign_epi8(r->q[j], r->q[j]);
        r->sc[j] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
    }
}
/* the same sum as dot_iq_q8_K: |q| x (x with q's sign), pairs <= 2 * 62 * 127 (no int16 saturation) */
static inline int dot_iq_q8_K_simd(const iq_regs *r, const int8_t *x) {
    __m256i ai = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++)
        ai = dot_scaled(ai, r->aq[j], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + 32 * j)), r->q[j]), r->sc[j]);
    return hsum_i32_256(ai);
}
#define IQ_PREPARE(regs, q, sc) iq_load(&regs, q, sc)
#define IQ_DOT(regs, q, sc, x) dot_iq_q8_K_simd(&regs, x)
#define IQ_AHEAD(blk) KAHEAD(blk)
#else
typedef struct { int unused; } iq_regs;
#define IQ_PREPARE(regs, q, sc) ((void)sizeof(regs))
#define IQ_DOT(regs, q, sc, x) dot_iq_q8_K(q, sc, x)
#define IQ_AHEAD(blk) ((void)0)
#endif

/* vec_dot4_<t>_q8_K: TC tokens (<= 4), each super-block decoded once; res[t] = row . token t.
 * xb (the 16-sums) is unused: IQ1's delta is folded into q. vec_dot_<t>_q8_K: one token. */
#define IQ_ROW_KERNELS(tp, blk)                                                                          \
GLMCPU_INLINE void vec_dot4_##tp##_q8_K(int n, const blk *w, const int TC, const int8_t *xq,              \
                                       const float *xd, const int16_t *xb, float *res) {                \
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                             \
    int8_t q[QK_K];                                                                                      \
    int16_t sc[16];                                                                                      \
    iq_regs regs;                                                                                        \
    (void)xb;                                                                                            \
    for (int b = 0; b < n / QK_K; b++) {                                                                 \
        IQ_AHEAD(w + b);                                                                                 \
        float d = unpack_##tp(w + b, q, sc);                                                              \
        IQ_PREPARE(regs, q, sc);                                                                         \
        for (int t = 0; t < TC; t++)                                                                     \
            sum[t] += d * KD(t)[b] * (float)IQ_DOT(regs, q, sc, KX(t) + b * QK_K);                       \
    }                                                                                                    \
    for (int t = 0; t < TC; t++) res[t] = sum[t];                                                        \
}                                                                                                        \
static inline float vec_dot_##tp##_q8_K(int n, const blk *w, const int8_t *xq, const float *xd,          \
                                       const int16_t *xb) {                                             \
    float r;                                                                                             \
    vec_dot4_##tp##_q8_K(n, w, 1, xq, xd, xb, &r);                                                        \
    return r;                                                                                            \
}
IQ_ROW_KERNELS(iq2_xxs, block_iq2_xxs)
IQ_ROW_KERNELS(iq2_xs, block_iq2_xs)
IQ_ROW_KERNELS(iq2_s, block_iq2_s)
IQ_ROW_KERNELS(iq3_xxs, block_iq3_xxs)
IQ_ROW_KERNELS(iq3_s, block_iq3_s)
IQ_ROW_KERNELS(iq1_s, block_iq1_s)
IQ_ROW_KERNELS(iq1_m, block_iq1_m)
#undef IQ_ROW_KERNELS

/* the KCASE lines of gemm_rows_k's switch (kquants.h) for these types */
#define IQ_KCASES(KCASE, TC)                                        \
    KCASE(GT_IQ2_XXS, vec_dot4_iq2_xxs_q8_K, block_iq2_xxs, TC);    \
    KCASE(GT_IQ2_XS, vec_dot4_iq2_xs_q8_K, block_iq2_xs, TC);       \
    KCASE(GT_IQ2_S, vec_dot4_iq2_s_q8_K, block_iq2_s, TC);          \
    KCASE(GT_IQ3_XXS, vec_dot4_iq3_xxs_q8_K, block_iq3_xxs, TC);    \
    KCASE(GT_IQ3_S, vec_dot4_iq3_s_q8_K, block_iq3_s, TC);          \
    KCASE(GT_IQ1_S, vec_dot4_iq1_s_q8_K, block_iq1_s, TC);          \
    KCASE(GT_IQ1_M, vec_dot4_iq1_m_q8_K, block_iq1_m, TC)

#endif
