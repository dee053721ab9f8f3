/* glmcpu hot loops: dot products of one weight row against float32 activations.
 *
 * One header, compiled once per instruction set (see setup.py): each function has
 * an AVX-512 / AVX2 / NEON body that falls through to the shared scalar tail, and a
 * build with none of those macros is the portable scalar twin.  No model knowledge here.
 */
#ifndef GLMCPU_KERNELS_H
#define GLMCPU_KERNELS_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(GLMCPU_SCALAR)
static const char GLMCPU_ISA[] = "generic";   /* the portable twin every SIMD path is tested against */
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define GLMCPU_AVX512 1
#if defined(__AVX512VNNI__)
#define GLMCPU_VNNI 1          /* u8 x s8 dot products of 4 accumulated into int32 in one instruction */
static const char GLMCPU_ISA[] = "avx512vnni";
#else
static const char GLMCPU_ISA[] = "avx512";
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GLMCPU_AVX2 1
static const char GLMCPU_ISA[] = "avx2";
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define GLMCPU_NEON 1
static const char GLMCPU_ISA[] = "neon";
#else
static const char GLMCPU_ISA[] = "generic";
#endif

/* ggml tensor types we run (values of ggml_type / gguf.GGMLQuantizationType). */
enum { GT_F32 = 0, GT_F16 = 1, GT_Q4_0 = 2, GT_Q4_1 = 3, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8,
       GT_Q2_K = 10, GT_Q3_K = 11, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14, GT_IQ4_NL = 20, GT_IQ4_XS = 23,
       GT_BF16 = 30,
       /* glmcpu's own: a ggml type repacked in 8-row groups (groups.h), 1000 + its code */
       GT_Q4_0X8 = 1002, GT_Q5_0X8 = 1006, GT_Q5_1X8 = 1007, GT_Q8_0X8 = 1008, GT_Q2_KX8 = 1010, GT_Q4_KX8 = 1012, GT_IQ4_NLX8 = 1020,
       GT_IQ4_XSX8 = 1023 };

#define QK 32
/* a block layout's size, checked at compile time against ggml's */
#define BLOCK_BYTES(T, n) _Static_assert(sizeof(T) == (n), #T " is " #n " bytes");

/* kernels specialised at each call on a constant (a type, a token count) */
#if defined(__GNUC__)
#define GLMCPU_INLINE static inline __attribute__((always_inline))
#else
#define GLMCPU_INLINE static inline
#endif

/* CALL(TC) with TC the constant 1..4 equal to tc, so each inlined kernel is specialised for its
 * token count: a pass of 2 or 3 tokens (a draft check) reads the weights once, not once a token */
#define TC_CONST(tc, CALL) do { switch (tc) { case 4: CALL(4); break; case 3: CALL(3); break; \
                                              case 2: CALL(2); break; default: CALL(1); } } while (0)
/* the token chunks of a T-token pass: t = 0, 4, 8, ..., tc = the chunk's size (<= 4) */
#define FOR_TC(t, tc, T, CHUNK) for (int t = 0, tc; tc = (T) - t < (CHUNK) ? (T) - t : (CHUNK), t < (T); t += (CHUNK))

/* Q4_0: 32 weights in 18 bytes; fp16 scale d, then 16 bytes: weight j (0..15) is the LOW
 * nibble of qs[j], weight j+16 the HIGH nibble; value = (nibble - 8) * d. */
typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;
/* Q8_0: 32 weights in 34 bytes; fp16 scale d, then 32 int8; value = q * d. */
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;
_Static_assert(sizeof(block_q4_0) == 18, "Q4_0 block is 18 bytes");
_Static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");

/* Activations quantised for the integer kernels: int8 values xq[n], one float scale xd[b]
 * per block of 32 and xs[b] = xd[b] * sum(xq of block b) (lets Q4_0 skip the "- 8"). */

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__) && !defined(GLMCPU_SCALAR)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {                                 /* subnormal: renormalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f;
}

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 32 Q4_0 nibbles -> 32 unsigned bytes in element order. */
static inline __m256i unpack_q4_0(const uint8_t *qs) {
    __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
#endif

#if defined(GLMCPU_NEON)
/* 32 int8 products of a (two halves of 16) with x[0..31], as 4 int32 lanes: int16 pairs (|127 * 127 * 2|
 * fits) widened, no dotprod needed */
static inline int32x4_t neon_dot32(int8x16_t a0, int8x16_t a1, const int8_t *x) {
    int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
    int16x8_t p0 = vmlal_s8(vmull_s8(vget_low_s8(a0), vget_low_s8(x0)), vget_high_s8(a0), vget_high_s8(x0));
    int16x8_t p1 = vmlal_s8(vmull_s8(vget_low_s8(a1), vget_low_s8(x1)), vget_high_s8(a1), vget_high_s8(x1));
    return vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1));
}
#endif

/* ---- activations -> int8 blocks -------------------------------------------------- */

static void quantize_row_q8(int n, const float *x, int8_t *xq, float *xd, float *xs) {
    for (int b = 0; b < n / QK; b++) {
        const float *v = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) { float a = fabsf(v[j]); amax = a > amax ? a : amax; }
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(v[j] * id);
            xq[b * QK + j] = (int8_t)q; sum += q;
        }
        xd[b] = d; xs[b] = d * (float)sum;
    }
}

/* ---- one weight row . activations ----------------------------------------------- */

static float vec_dot_q4_0_q8_0(int n, const block_q4_0 *w, const int8_t *xq, const float *xd,
                               const float *xs) {
    int nb = n / QK, b = 0;
    float sum = 0.0f, corr = 0.0f;
#if defined(GLMCPU_AVX512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi16(1);
    for (; b + 1 < nb; b += 2) {
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(unpack_q4_0(w[b].qs)),
                                       unpack_q4_0(w[b + 1].qs), 1);
        __m512i x = _mm512_loadu_si512((const void *)(xq + b * QK));
        __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(q, x), ones);
        __m512 d = _mm512_insertf32x8(_mm512_set1_ps(fp16_to_fp32(w[b].d) * xd[b]),
                                      _mm256_set1_ps(fp16_to_fp32(w[b + 1].d) * xd[b + 1]), 1);
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
        corr += fp16_to_fp32(w[b].d) * xs[b] + fp16_to_fp32(w[b + 1].d) * xs[b + 1];
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(GLMCPU_AVX2)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        __m256i q = unpack_q4_0(w[b].qs);
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
        float dw = fp16_to_fp32(w[b].d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[b]), _mm256_cvtepi32_ps(p), acc);
        corr += dw * xs[b];
    }
    sum = hsum256(acc);
#elif defined(GLMCPU_NEON)
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (; b < nb; b++) {
        uint8x16_t raw = vld1q_u8(w[b].qs);
        int32x4_t p = neon_dot32(vreinterpretq_s8_u8(vandq_u8(raw, m4)), vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)),
                                 xq + b * QK);
        float dw = fp16_to_fp32(w[b].d);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), dw * xd[b]);
        corr += dw * xs[b];
    }
    sum = vaddvq_f32(acc);
#endif
    for (; b < nb; b++) {                       /* scalar twin / tail */
        int isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += (w[b].qs[j] & 0x0f) * xq[b * QK + j];
            isum += (w[b].qs[j] >> 4) * xq[b * QK + j + QK / 2];
        }
        float dw = fp16_to_fp32(w[b].d);
        sum += dw * xd[b] * (float)isum;
        corr += dw * xs[b];
    }
    return sum - 8.0f * corr;
}

static float vec_dot_q8_0_q8_0(int n, const block_q8_0 *w, const int8_t *xq, const float *xd) {
    int nb = n / QK, b = 0;
    float sum = 0.0f;
#if defined(GLMCPU_AVX512)
    __m512 acc = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
    for (; b + 1 < nb; b += 2) {
        __m512i q = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w[b].qs)),
            _mm256_loadu_si256((const __m256i *)w[b + 1].qs), 1);
        __m512i x = _mm512_loadu_si512((const void *)(xq + b * QK));
        /* maddubs wants unsigned x signed: move the weight's sign onto x */
        __mmask64 neg = _mm512_movepi8_mask(q);
        __m512i sx = _mm512_mask_sub_epi8(x, neg, zero, x);
        __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(q), sx), ones);
        __m512 d = _mm512_insertf32x8(_mm512_set1_ps(fp16_to_fp32(w[b].d) * xd[b]),
                                      _mm256_set1_ps(fp16_to_fp32(w[b + 1].d) * xd[b + 1]), 1);
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(GLMCPU_AVX2)
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256i p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(fp16_to_fp32(w[b].d) * xd[b]),
                              _mm256_cvtepi32_ps(p), acc);
    }
    sum = hsum256(acc);
#elif defined(GLMCPU_NEON)
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (; b < nb; b++) {
        int32x4_t p = neon_dot32(vld1q_s8(w[b].qs), vld1q_s8(w[b].qs + 16), xq + b * QK);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), fp16_to_fp32(w[b].d) * xd[b]);
    }
    sum = vaddvq_f32(acc);
#endif
    for (; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += w[b].qs[j] * xq[b * QK + j];
        sum += fp16_to_fp32(w[b].d) * xd[b] * (float)isum;
    }
    return sum;
}

/* Float weights (F32, F16, BF16) against float activations: one body, a loader per width that
 * turns a type's weights into floats. */
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
#if defined(GLMCPU_AVX512)
#define FWB 512                                    /* register width; the 16-bit weights' load is half */
#define FW_HALF(p) _mm256_loadu_si256((const __m256i *)(p))
#define FW_SUM(v) _mm512_reduce_add_ps(v)
#else
#define FWB 256
#define FW_HALF(p) _mm_loadu_si128((const __m128i *)(p))
#define FW_SUM(v) hsum256(v)
#endif
#define FW_CAT_(a, b, c) a##b##c
#define FW_CAT(a, b, c) FW_CAT_(a, b, c)
#define FWN(op) FW_CAT(_mm, FWB, _##op)
#define FW (FWB / 32)
typedef FW_CAT(__m, FWB, ) fvec;
static inline fvec fw_load(int type, const void *w, int j) {
    const uint16_t *h = (const uint16_t *)w + j;
    if (type == GT_F16) return FWN(cvtph_ps)(FW_HALF(h));
    if (type == GT_BF16) return FW_CAT(FWN(castsi), FWB, _ps)(FWN(slli_epi32)(FWN(cvtepu16_epi32)(FW_HALF(h)), 16));
    return FWN(loadu_ps)((const float *)w + j);
}
static inline fvec fw_fma(fvec a, const float *x, fvec acc) { return FWN(fmadd_ps)(a, FWN(loadu_ps)(x), acc); }
static inline float fw_sum(fvec acc) { return FW_SUM(acc); }
#define FW_ZERO FWN(setzero_ps)()
#elif defined(GLMCPU_NEON)
#define FW 4
typedef float32x4_t fvec;
static inline fvec fw_load(int type, const void *w, int j) {
    const uint16_t *h = (const uint16_t *)w + j;
    if (type == GT_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
    if (type == GT_BF16) return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h), 16));
    return vld1q_f32((const float *)w + j);
}
static inline fvec fw_fma(fvec a, const float *x, fvec acc) { return vfmaq_f32(acc, a, vld1q_f32(x)); }
static inline float fw_sum(fvec acc) { return vaddvq_f32(acc); }
#define FW_ZERO vdupq_n_f32(0.0f)
#endif

GLMCPU_INLINE float vec_dot_float(const int type, int n, const void *w, const float *x) {
    int j = 0;
    float sum = 0.0f;
#if defined(FW)
    fvec acc = FW_ZERO;
    for (; j + FW <= n; j += FW) acc = fw_fma(fw_load(type, w, j), x + j, acc);
    sum = fw_sum(acc);
#endif
    for (; j < n; j++) {
        const uint16_t h = type == GT_F32 ? 0 : ((const uint16_t *)w)[j];
        sum += (type == GT_F16 ? fp16_to_fp32(h) : type == GT_BF16 ? bf16_to_fp32(h) : ((const float *)w)[j]) * x[j];
    }
    return sum;
}

/* Prefill: one weight row against 4 activation rows at once, so each block is unpacked once
 * and used 4 times (xq rows n apart, xd/xs rows n/32 apart). res[t] as vec_dot would give. */
static void vec_dot4_q4_0_q8_0(int n, const block_q4_0 *w, const int8_t *xq, const float *xd,
                               const float *xs, float *res) {
    int nb = n / QK, b = 0;
    float sum[4] = {0, 0, 0, 0}, corr[4] = {0, 0, 0, 0};
    /* same accumulation order as vec_dot_q4_0_q8_0, so a prompt gives bit-identical logits
     * whether it is fed in one batch or token by token */
#if defined(GLMCPU_AVX512)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i ones = _mm512_set1_epi16(1);
    for (; b + 1 < nb; b += 2) {
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(unpack_q4_0(w[b].qs)),
                                       unpack_q4_0(w[b + 1].qs), 1);
        float d0 = fp16_to_fp32(w[b].d), d1 = fp16_to_fp32(w[b + 1].d);
        for (int t = 0; t < 4; t++) {
            const float *td = xd + t * nb, *ts = xs + t * nb;
            __m512i x = _mm512_loadu_si512((const void *)(xq + (size_t)t * n + b * QK));
            __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(q, x), ones);
            __m512 d = _mm512_insertf32x8(_mm512_set1_ps(d0 * td[b]), _mm256_set1_ps(d1 * td[b + 1]), 1);
            acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[t]);
            corr[t] += d0 * ts[b] + d1 * ts[b + 1];
        }
    }
    for (int t = 0; t < 4; t++) sum[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(GLMCPU_AVX2)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        __m256i q = unpack_q4_0(w[b].qs);
        float dw = fp16_to_fp32(w[b].d);
        for (int t = 0; t < 4; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * n + b * QK));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[t * nb + b]), _mm256_cvtepi32_ps(p), acc[t]);
            corr[t] += dw * xs[t * nb + b];
        }
    }
    for (int t = 0; t < 4; t++) sum[t] = hsum256(acc[t]);
#else
    for (int t = 0; t < 4; t++)
        res[t] = vec_dot_q4_0_q8_0(n, w, xq + (size_t)t * n, xd + t * nb, xs + t * nb);
    return;
#endif
    for (int t = 0; t < 4; t++) {
        const int8_t *x = xq + (size_t)t * n;
        for (int bb = b; bb < nb; bb++) {            /* the scalar tail of vec_dot_q4_0_q8_0 */
            int isum = 0;
            for (int j = 0; j < QK / 2; j++) {
                isum += (w[bb].qs[j] & 0x0f) * x[bb * QK + j];
                isum += (w[bb].qs[j] >> 4) * x[bb * QK + j + QK / 2];
            }
            float dw = fp16_to_fp32(w[bb].d);
            sum[t] += dw * xd[t * nb + bb] * (float)isum;
            corr[t] += dw * xs[t * nb + bb];
        }
        res[t] = sum[t] - 8.0f * corr[t];
    }
}

static void vec_dot4_q8_0_q8_0(int n, const block_q8_0 *w, const int8_t *xq, const float *xd,
                               float *res) {
    int nb = n / QK, b = 0;
    float sum[4] = {0, 0, 0, 0};
#if defined(GLMCPU_AVX512)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
    for (; b + 1 < nb; b += 2) {
        __m512i q = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w[b].qs)),
            _mm256_loadu_si256((const __m256i *)w[b + 1].qs), 1);
        __mmask64 neg = _mm512_movepi8_mask(q);
        __m512i aq = _mm512_abs_epi8(q);
        float d0 = fp16_to_fp32(w[b].d), d1 = fp16_to_fp32(w[b + 1].d);
        for (int t = 0; t < 4; t++) {
            const float *td = xd + t * nb;
            __m512i x = _mm512_loadu_si512((const void *)(xq + (size_t)t * n + b * QK));
            __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(aq, _mm512_mask_sub_epi8(x, neg, zero, x)), ones);
            __m512 d = _mm512_insertf32x8(_mm512_set1_ps(d0 * td[b]), _mm256_set1_ps(d1 * td[b + 1]), 1);
            acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[t]);
        }
    }
    for (int t = 0; t < 4; t++) sum[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(GLMCPU_AVX2)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i ones = _mm256_set1_epi16(1);
    for (; b < nb; b++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)w[b].qs);
        __m256i aq = _mm256_sign_epi8(q, q);
        float dw = fp16_to_fp32(w[b].d);
        for (int t = 0; t < 4; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * n + b * QK));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(x, q)), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[t * nb + b]), _mm256_cvtepi32_ps(p), acc[t]);
        }
    }
    for (int t = 0; t < 4; t++) sum[t] = hsum256(acc[t]);
#else
    for (int t = 0; t < 4; t++) res[t] = vec_dot_q8_0_q8_0(n, w, xq + (size_t)t * n, xd + t * nb);
    return;
#endif
    for (int t = 0; t < 4; t++) {
        const int8_t *x = xq + (size_t)t * n;
        for (int bb = b; bb < nb; bb++) {
            int isum = 0;
            for (int j = 0; j < QK; j++) isum += w[bb].qs[j] * x[bb * QK + j];
            sum[t] += fp16_to_fp32(w[bb].d) * xd[t * nb + bb] * (float)isum;
        }
        res[t] = sum[t];
    }
}

/* v stays one running sum in a register: without it GCC reassociates the unrolled integer adds
 * and parks every product on the stack (AVX2: 16 registers) */
#if defined(__GNUC__)
#define IN_REG(v) __asm__("" : "+x"(v))
#else
#define IN_REG(v) ((void)0)
#endif
#include "kquants.h"

#include "groups.h"

/* Rows r0..r1 of W (row_bytes apart) against T activation rows: out[t*ldo + r].
 * Integer types read xq/xd/xs (quantised once per call); float types read x. The K-quants read
 * q8_K activations: xd one scale per 256 (n/256 per token) and xs holding the int16 sums of
 * quantize_row_q8_K (n/16 per token: the same bytes per token as the n/32 floats of Q8_0); so does
 * IQ4_XS. */
static void gemm_rows(int type, int n, const uint8_t *w, size_t row_bytes, int r0, int r1,
                      int T, const float *x, const int8_t *xq, const float *xd, const float *xs,
                      float *out, int ldo) {
    int nb = n / QK;
    if (type >= GT_Q4_0X8) {            /* r0, r1 are multiples of 8; row_bytes is unused */
        gemm_groups(type, n, w, r0, r1, T, xq, xd, xs, out, ldo);
        return;
    }
    if (type == GT_Q4_1 || type == GT_Q5_0 || type == GT_Q5_1 || type == GT_IQ4_NL) {
        gemm_rows_legacy(type, n, w, row_bytes, r0, r1, T, xq, xd, xs, out, ldo);
        return;
    }
    if ((type >= GT_Q2_K && type <= GT_Q6_K) || type == GT_IQ4_XS || is_iq_q8_K(type)) {
        gemm_rows_k(type, n, w, row_bytes, r0, r1, T, xq, xd, (const int16_t *)xs, out, ldo);
        return;
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * row_bytes;
        int t = 0;
        if (type == GT_Q4_0 || type == GT_Q8_0) {
            for (; t + 4 <= T; t += 4) {
                float res[4];
                if (type == GT_Q4_0)
                    vec_dot4_q4_0_q8_0(n, (const block_q4_0 *)row, xq + (size_t)t * n,
                                       xd + (size_t)t * nb, xs + (size_t)t * nb, res);
                else
                    vec_dot4_q8_0_q8_0(n, (const block_q8_0 *)row, xq + (size_t)t * n,
                                       xd + (size_t)t * nb, res);
                for (int j = 0; j < 4; j++) out[(size_t)(t + j) * ldo + r] = res[j];
            }
        }
        for (; t < T; t++) {
            float v;
            switch (type) {
            case GT_Q4_0:
                v = vec_dot_q4_0_q8_0(n, (const block_q4_0 *)row, xq + (size_t)t * n,
                                      xd + (size_t)t * nb, xs + (size_t)t * nb);
                break;
            case GT_Q8_0:
                v = vec_dot_q8_0_q8_0(n, (const block_q8_0 *)row, xq + (size_t)t * n,
                                      xd + (size_t)t * nb);
                break;
            case GT_F16: v = vec_dot_float(GT_F16, n, row, x + (size_t)t * n); break;
            case GT_BF16: v = vec_dot_float(GT_BF16, n, row, x + (size_t)t * n); break;
            default: v = vec_dot_float(GT_F32, n, row, x + (size_t)t * n); break;
            }
            out[(size_t)t * ldo + r] = v;
        }
    }
}

/* Memory read bandwidth probe (tools/membw.py): XOR of every 64-bit word, 4 chains. */
static uint64_t stream_xor(const uint8_t *p, size_t n) {
    size_t i = 0;
    uint64_t r = 0;
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)     /* 256-bit loads read DRAM as fast as 512-bit ones */
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)));
    for (int j = 0; j < 4; j++) r ^= t[j];
#endif
    for (; i + 8 <= n; i += 8) { uint64_t v; memcpy(&v, p + i, 8); r ^= v; }
    for (; i < n; i++) r ^= p[i];
    return r;
}

/* ---- attention: one KV head's query group at a time, over fixed chunks of positions -------
 * Query heads j*G .. j*G+G-1 share KV head j. For one (token t, KV head j), the positions
 * [c*ATTN_CHUNK, (c+1)*ATTN_CHUNK) of chunk c give each head a partial softmax: m = the max score,
 * l = sum exp(s - m), acc[D] = sum exp(s - m) v, reading each key and value row once for all G
 * heads. The partials merge in chunk order (online softmax), then out = acc / l. The chunk size is
 * fixed and a chunk's arithmetic is the same whoever computes it, so the output is the same bytes
 * whatever the thread count, and a token alone equals the same token inside a batch. */
#define ATTN_CHUNK 256
#define ATTN_TILE 8     /* tokens of a prompt whose scores come from one pass over a chunk's keys */
#define ATTN_LANES 128  /* ... at most this many query heads in all (a wide group takes fewer tokens) */

#if defined(__GNUC__)
#define ATTN_INLINE static inline __attribute__((always_inline))
#define ATTN_NOINLINE static __attribute__((noinline))
#else
#define ATTN_INLINE static inline
#define ATTN_NOINLINE static
#endif

/* The few vector operations attention needs, AV_N float lanes wide; with AV_N = 1 they are plain
 * C, and the same source below is the scalar twin (the same order of sums in every lane). */
/* the element-wise operations of each width, one line each */
#define AV_BINOP(name, f) static inline av_f32 av_##name(av_f32 a, av_f32 b) { return f(a, b); }
#define AV_X86_OPS(P) AV_BINOP(mul, P##_mul_ps) AV_BINOP(add, P##_add_ps) AV_BINOP(sub, P##_sub_ps) \
    AV_BINOP(div, P##_div_ps) AV_BINOP(max, P##_max_ps) AV_BINOP(min, P##_min_ps)
#define AV_SCALAR_OP(name, op) static inline av_f32 av_##name(av_f32 a, av_f32 b) { return a op b; }
#if defined(GLMCPU_AVX512)
#define AV_N 16
typedef __m512 av_f32;
typedef __mmask16 av_mask;            /* lanes of a D tile: D may end half way into a 16-lane tile */
static inline av_mask av_mask_n(int n) { return n >= 16 ? (av_mask)0xffff : (av_mask)((1u << n) - 1); }
static inline av_f32 av_zero(void) { return _mm512_setzero_ps(); }
static inline av_f32 av_set1(float x) { return _mm512_set1_ps(x); }
static inline av_f32 av_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void av_store(float *p, av_f32 x) { _mm512_storeu_ps(p, x); }
static inline av_f32 av_load_m(const float *p, av_mask m) { return _mm512_maskz_loadu_ps(m, p); }
static inline av_f32 av_load_hm(const uint16_t *p, av_mask m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
static inline av_f32 av_load_bm(const uint16_t *p, av_mask m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline av_f32 av_load_q8(const int8_t *q, float d) {      /* 16 int8 times d (a whole tile) */
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))),
                         _mm512_set1_ps(d));
}
static inline void av_store_m(float *p, av_f32 x, av_mask m) { _mm512_mask_storeu_ps(p, m, x); }
static inline av_f32 av_fma(av_f32 a, av_f32 b, av_f32 c) { return _mm512_fmadd_ps(a, b, c); }
AV_X86_OPS(_mm512)     /* max: a > b ? a : b, min: a < b ? a : b */
static inline av_f32 av_keep_ge(av_f32 x, av_f32 lo, av_f32 r) {     /* x >= lo ? r : 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), r);
}
static inline av_f32 av_pow2i(av_f32 n) {       /* 2^n for integral n in [-126, 127] */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif defined(GLMCPU_AVX2)
#define AV_N 8
typedef __m256 av_f32;
typedef int av_mask;                  /* D is a multiple of 8: every tile is whole */
static inline av_mask av_mask_n(int n) { (void)n; return 0; }
static inline av_f32 av_zero(void) { return _mm256_setzero_ps(); }
static inline av_f32 av_set1(float x) { return _mm256_set1_ps(x); }
static inline av_f32 av_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void av_store(float *p, av_f32 x) { _mm256_storeu_ps(p, x); }
static inline av_f32 av_load_m(const float *p, av_mask m) { (void)m; return _mm256_loadu_ps(p); }
static inline av_f32 av_load_hm(const uint16_t *p, av_mask m) {
    (void)m; return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline av_f32 av_load_bm(const uint16_t *p, av_mask m) {
    (void)m; return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline av_f32 av_load_q8(const int8_t *q, float d) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))),
                         _mm256_set1_ps(d));
}
static inline void av_store_m(float *p, av_f32 x, av_mask m) { (void)m; _mm256_storeu_ps(p, x); }
static inline av_f32 av_fma(av_f32 a, av_f32 b, av_f32 c) { return _mm256_fmadd_ps(a, b, c); }
AV_X86_OPS(_mm256)
static inline av_f32 av_keep_ge(av_f32 x, av_f32 lo, av_f32 r) {
    return _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), r);
}
static inline av_f32 av_pow2i(av_f32 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#elif defined(GLMCPU_NEON)
#define AV_N 4
typedef float32x4_t av_f32;
typedef int av_mask;
static inline av_mask av_mask_n(int n) { (void)n; return 0; }
static inline av_f32 av_zero(void) { return vdupq_n_f32(0.0f); }
static inline av_f32 av_set1(float x) { return vdupq_n_f32(x); }
static inline av_f32 av_load(const float *p) { return vld1q_f32(p); }
static inline void av_store(float *p, av_f32 x) { vst1q_f32(p, x); }
static inline av_f32 av_load_m(const float *p, av_mask m) { (void)m; return vld1q_f32(p); }
static inline av_f32 av_load_hm(const uint16_t *p, av_mask m) {
    (void)m; return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static inline av_f32 av_load_bm(const uint16_t *p, av_mask m) {
    (void)m; return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}
static inline av_f32 av_load_q8(const int8_t *q, float d) {
    int32_t w; memcpy(&w, q, 4);                                  /* 4 bytes, any alignment */
    int8x8_t b = vreinterpret_s8_s32(vdup_n_s32(w));
    return vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b)))), d);
}
static inline void av_store_m(float *p, av_f32 x, av_mask m) { (void)m; vst1q_f32(p, x); }
static inline av_f32 av_fma(av_f32 a, av_f32 b, av_f32 c) { return vfmaq_f32(c, a, b); }
AV_BINOP(mul, vmulq_f32) AV_BINOP(add, vaddq_f32) AV_BINOP(sub, vsubq_f32) AV_BINOP(div, vdivq_f32)
/* as x86's max/min (the second operand where either is NaN), so the clamp in av_exp agrees */
static inline av_f32 av_max(av_f32 a, av_f32 b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
static inline av_f32 av_min(av_f32 a, av_f32 b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
static inline av_f32 av_keep_ge(av_f32 x, av_f32 lo, av_f32 r) {
    return vreinterpretq_f32_u32(vandq_u32(vcgeq_f32(x, lo), vreinterpretq_u32_f32(r)));
}
static inline av_f32 av_pow2i(av_f32 n) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
#else
#define AV_N 1
typedef float av_f32;
typedef int av_mask;
static inline av_mask av_mask_n(int n) { (void)n; return 0; }
static inline av_f32 av_zero(void) { return 0.0f; }
static inline av_f32 av_set1(float x) { return x; }
static inline av_f32 av_load(const float *p) { return *p; }
static inline void av_store(float *p, av_f32 x) { *p = x; }
static inline av_f32 av_load_m(const float *p, av_mask m) { (void)m; return *p; }
static inline av_f32 av_load_hm(const uint16_t *p, av_mask m) { (void)m; return fp16_to_fp32(*p); }
static inline av_f32 av_load_bm(const uint16_t *p, av_mask m) {
    (void)m; uint32_t b = (uint32_t)*p << 16; float f; memcpy(&f, &b, 4); return f;
}
static inline av_f32 av_load_q8(const int8_t *q, float d) { return (float)*q * d; }
static inline void av_store_m(float *p, av_f32 x, av_mask m) { (void)m; *p = x; }
static inline av_f32 av_fma(av_f32 a, av_f32 b, av_f32 c) { return a * b + c; }   /* two roundings */
AV_SCALAR_OP(mul, *) AV_SCALAR_OP(add, +) AV_SCALAR_OP(sub, -) AV_SCALAR_OP(div, /)
static inline av_f32 av_max(av_f32 a, av_f32 b) { return a > b ? a : b; }
static inline av_f32 av_min(av_f32 a, av_f32 b) { return a < b ? a : b; }
static inline av_f32 av_keep_ge(av_f32 x, av_f32 lo, av_f32 r) { return x >= lo ? r : 0.0f; }
static inline av_f32 av_pow2i(av_f32 n) {
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; float f; memcpy(&f, &bits, 4); return f;
}
#endif

/* exp(x) in every lane, Cephes expf's method: x = n ln2 + r (ln2 in two parts), a degree-7
 * polynomial for exp(r) on |r| <= ln2/2, times 2^n. Within 1 ulp of exp on [-87.3, 88] (measured
 * 0.97); 0 below -87.3 (exp(-inf) = 0: a masked score adds nothing), exp(88) above 88. Plain
 * multiplies and adds, no FMA: every ISA and the scalar twin give the same bits. */
#define EXPF_LO (-87.3f)
#define EXPF_HI 88.0f
ATTN_INLINE av_f32 av_exp(av_f32 x0) {
    const av_f32 round = av_set1(0x1.8p23f);            /* adding it rounds |v| < 2^22 to an integer */
    const av_f32 lo = av_set1(EXPF_LO);
    av_f32 x = av_min(av_max(x0, lo), av_set1(EXPF_HI));
    av_f32 n = av_sub(av_add(av_mul(x, av_set1(1.44269504088896341f)), round), round);
    av_f32 r = av_sub(av_sub(x, av_mul(n, av_set1(0.693359375f))), av_mul(n, av_set1(-2.12194440e-4f)));
    av_f32 y = av_add(av_mul(av_set1(1.9875691500e-4f), r), av_set1(1.3981999507e-3f));
    y = av_add(av_mul(y, r), av_set1(8.3334519073e-3f));
    y = av_add(av_mul(y, r), av_set1(4.1665795894e-2f));
    y = av_add(av_mul(y, r), av_set1(1.6666665459e-1f));
    y = av_add(av_mul(y, r), av_set1(5.0000001201e-1f));
    y = av_add(av_add(av_mul(y, av_mul(r, r)), r), av_set1(1.0f));
    return av_keep_ge(x0, lo, av_mul(y, av_pow2i(n)));
}

static float exp_f32(float x) {          /* one lane of av_exp (tests and tools) */
#if AV_N == 1
    return av_exp(x);
#else
    float v[AV_N];
    av_store(v, av_exp(av_set1(x)));
    return v[0];
#endif
}

/* The element types of a KV cache. Each is read exactly as a float (a half, a bfloat16 and a
 * Q8_0 value q * d are all exact in float32), so a cache of any type gives the bytes its values
 * give as floats. Q8_0 rows are D/32 blocks of 34 bytes (block_q8_0; D a multiple of 32). */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8_0 = 3 };
static inline ptrdiff_t kv_row_bytes(int t, int D) {
    return t == KV_Q8_0 ? (ptrdiff_t)D / QK * (ptrdiff_t)sizeof(block_q8_0) : (ptrdiff_t)D * (t == KV_F32 ? 4 : 2);
}

/* What attention reads and writes. Strides of q and out are in floats; of k and v in bytes. */
typedef struct {
    const float *q; ptrdiff_t q_t, q_h;        /* q[t, h, :] at q + t*q_t + h*q_h, h = j*G + g */
    const void *k, *v;                         /* rows of KV type kt / vt */
    ptrdiff_t k_h, k_p, v_h, v_p;              /* key j, position p at k + j*k_h + p*k_p (bytes) */
    int kt, vt;
    float *out; ptrdiff_t o_t, o_h;            /* out[t, h, :] */
    int T, Hkv, G, D, pos0;                    /* token t is at position pos0 + t */
    float scale;
} attn_args;

static inline int attn_round(int x, int s) { return (x + s - 1) / s * s; }
/* Lanes of the query heads of a tile of tt tokens: lane i*G + g is head g of the tile's token i;
 * whole vectors, and room for attn_pv's passes of 4 heads. One token: its G heads, padded. */
static inline int attn_lanes(int G, int tt) {
    return attn_round((tt - 1) * G + attn_round(G, 4), AV_N < 4 ? 4 : AV_N);
}
static inline int attn_gpad(int G) { return attn_lanes(G, 1); }
/* Tokens in a prompt's tile: ATTN_TILE, or fewer where G is wide. */
static inline int attn_tile_tokens(int G) {
    return G * ATTN_TILE <= ATTN_LANES ? ATTN_TILE : G >= ATTN_LANES ? 1 : ATTN_LANES / G;
}
static inline int attn_nchunks(const attn_args *a, int t) { return (a->pos0 + t + ATTN_CHUNK) / ATTN_CHUNK; }
/* A partial, and a running state, of one token: m [Gp], l [Gp], acc [Gp][D] (floats). */
static size_t attn_part_floats(const attn_args *a) {
    size_t gp = attn_gpad(a->G); return 2 * gp + gp * a->D;
}
/* The queries of a tile of tt tokens, transposed: qT [D][attn_lanes(G, tt)] (attn_load_q). */
static size_t attn_qt_floats(const attn_args *a, int tt) { return (size_t)a->D * attn_lanes(a->G, tt); }
/* attn_chunk's scratch: kbuf [8][D] (half keys as floats), S [ATTN_CHUNK][L], max and sum [L],
 * L the lanes of a whole tile. */
static size_t attn_scratch_floats(const attn_args *a) {
    size_t L = attn_lanes(a->G, attn_tile_tokens(a->G)); return 8 * (size_t)a->D + (ATTN_CHUNK + 2) * L;
}

static void attn_load_q(const attn_args *a, int t0, int t1, int j, float *qT) {
    const int D = a->D, G = a->G, L = attn_lanes(G, t1 - t0);
    for (int d = 0; d < D; d++) {
        float *row = qT + (size_t)d * L;
        for (int x = 0; x < L; x++) row[x] = 0.0f;
        for (int i = 0; i < t1 - t0; i++) {
            const float *q = a->q + (t0 + i) * a->q_t + (ptrdiff_t)j * G * a->q_h + d;
            for (int g = 0; g < G; g++) row[i * G + g] = q[g * a->q_h];
        }
    }
}

static inline void f16_to_f32_row(int n, const uint16_t *h, float *f) {     /* n a multiple of 8 */
    for (int i = 0; i < n; i += 8) {
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
        _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#elif defined(GLMCPU_NEON)
        vst1q_f32(f + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
        vst1q_f32(f + i + 4, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i + 4))));
#else
        for (int e = 0; e < 8; e++) f[i + e] = fp16_to_fp32(h[i + e]);
#endif
    }
}

static inline void bf16_to_f32_row(int n, const uint16_t *h, float *f) {    /* n a multiple of 8 */
    for (int i = 0; i < n; i += 8) {
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
        __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
        _mm256_storeu_ps(f + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
#elif defined(GLMCPU_NEON)
        vst1q_f32(f + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h + i), 16)));
        vst1q_f32(f + i + 4, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h + i + 4), 16)));
#else
        for (int e = 0; e < 8; e++) { uint32_t b = (uint32_t)h[i + e] << 16; memcpy(f + i + e, &b, 4); }
#endif
    }
}

static inline void q8_0_to_f32_row(int n, const block_q8_0 *x, float *f) {   /* n a multiple of 32 */
    for (int b = 0; b < n / QK; b++, f += QK) {
        const float d = fp16_to_fp32(x[b].d);
        const int8_t *q = x[b].qs;
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
        const __m256 vd = _mm256_set1_ps(d);
        for (int e = 0; e < QK; e += 8)
            _mm256_storeu_ps(f + e, _mm256_mul_ps(_mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + e)))), vd));
#elif defined(GLMCPU_NEON)
        for (int e = 0; e < QK; e += 8) {
            int16x8_t w = vmovl_s8(vld1_s8(q + e));
            vst1q_f32(f + e, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), d));
            vst1q_f32(f + e + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(w))), d));
        }
#else
        for (int e = 0; e < QK; e++) f[e] = (float)q[e] * d;
#endif
    }
}

/* One KV row of type t as D floats in buf; f32 rows are read where they lie. */
static inline const float *kv_row_f32(const int t, int D, const char *row, float *buf) {
    switch (t) {
    case KV_F16: f16_to_f32_row(D, (const uint16_t *)row, buf); return buf;
    case KV_BF16: bf16_to_f32_row(D, (const uint16_t *)row, buf); return buf;
    case KV_Q8_0: q8_0_to_f32_row(D, (const block_q8_0 *)row, buf); return buf;
    default: return (const float *)row;
    }
}

/* AV_N values d0.. of a KV row of type t as floats (lanes past mask m: 0) */
ATTN_INLINE av_f32 av_load_kv(const int t, const char *row, int d0, av_mask m) {
    if (t == KV_F16) return av_load_hm((const uint16_t *)row + d0, m);
    if (t == KV_BF16) return av_load_bm((const uint16_t *)row + d0, m);
    if (t == KV_Q8_0) {
        const block_q8_0 *b = (const block_q8_0 *)row + d0 / QK;
        return av_load_q8(b->qs + d0 % QK, fp16_to_fp32(b->d));
    }
    return av_load_m((const float *)row + d0, m);
}

#if defined(__GNUC__)
#define ATTN_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#else
#define ATTN_PREFETCH(p) ((void)(p))
#endif

/* S[i][lanes] = scale * q.k_i for PB key rows kr[i] and NV vectors of AV_N query lanes, qT [D][ldq]
 * holding the queries transposed: each key value is broadcast once for all the lanes; each lane
 * sums over d in order (the same bytes in any block), so no horizontal sums. */
ATTN_INLINE void attn_scores(const int NV, const int PB, int D, const float *qT, int ldq,
                             const float *const *kr, av_f32 scale, float *S, int ldS, const char *pf, int npf) {
    av_f32 s[4][8];
    for (int u = 0; u < NV; u++)
        for (int i = 0; i < PB; i++) s[u][i] = av_zero();
    for (int d = 0; d < D; d++) {
        if (d < npf) ATTN_PREFETCH(pf + (size_t)64 * d);      /* npf <= D lines, one per step */
        av_f32 qv[4];
        for (int u = 0; u < NV; u++) qv[u] = av_load(qT + (size_t)d * ldq + u * AV_N);
        for (int i = 0; i < PB; i++) {
            av_f32 kb = av_set1(kr[i][d]);
            for (int u = 0; u < NV; u++) s[u][i] = av_fma(qv[u], kb, s[u][i]);
        }
    }
    for (int i = 0; i < PB; i++)
        for (int u = 0; u < NV; u++) av_store(S + (size_t)i * ldS + u * AV_N, av_mul(s[u][i], scale));
}

/* Scores of PB positions (keys of type KT from k, k_p bytes apart) for all L query lanes: S [PB][L], in blocks of
 * up to 16 sums in registers (8 on AVX2). Meanwhile the same positions' value rows (vrow bytes,
 * v_p apart) are fetched towards L2, a line per step of the first block where they lie in one
 * piece: attn_pv reads them a column at a time, a stride the hardware prefetchers do not follow. */
ATTN_INLINE void attn_score_rows(const int PB, const int KT, int D, const char *k, ptrdiff_t k_p,
                                 const char *v, ptrdiff_t v_p, int vrow, const float *qT, int L,
                                 float *kbuf, av_f32 scale, float *S) {
    const float *kr[8];
    int npf = v_p == vrow ? PB * vrow / 64 : 0;
    if (!npf)
        for (int i = 0; i < PB; i++)
            for (int off = 0; off < vrow; off += 64) ATTN_PREFETCH(v + i * v_p + off);
    for (int i = 0; i < PB; i++) kr[i] = kv_row_f32(KT, D, k + i * k_p, kbuf + (size_t)i * D);
    const int H = PB == 8 ? 4 : PB;      /* 4 vectors x 8 rows would be 32 sums: two halves */
    int x = 0;
#define SC(NV, P, R, X) do { attn_scores(NV, P, D, qT + (X), L, kr + (R), scale, S + (size_t)(R) * L + (X), L, v, npf); \
                             npf = 0; } while (0)
    if (AV_N != 8)
        for (; x + 4 * AV_N <= L; x += 4 * AV_N) {
            SC(4, H, 0, x);
            if (PB == 8) SC(4, H, H, x);
        }
    for (; x + 2 * AV_N <= L; x += 2 * AV_N) {
        if (AV_N == 8) {
            SC(2, H, 0, x);
            if (PB == 8) SC(2, H, H, x);
        } else {
            SC(2, PB, 0, x);
        }
    }
    if (x < L) SC(1, PB, 0, x);
#undef SC
}

#define ATTN_NREG (AV_N == 8 ? 16 : 32)     /* vector registers */
#define ATTN_HN 12     /* heads per attn_pv pass: sums in registers (x2 D tiles on AVX-512 and NEON) */

/* acc[g][:] = sum over the np positions of P[p][g] v_p (rows of type VT, v_p bytes apart), for HN heads whose sums stay in registers
 * (two D tiles at a time where they fit, reusing each P broadcast); every lane sums over p in
 * order. Each step also fetches 2 lines of [*pf, pfe) towards L2 (the next chunk's keys). */
ATTN_INLINE void attn_pv(const int HN, const int VT, int np, int D, const float *P, int ldp,
                         const char *v, ptrdiff_t v_p, float *acc, const char **pf, const char *pfe) {
    const char *pc = *pf;
    int dt = 0;
    if (AV_N > 1 && 2 * HN + 4 <= ATTN_NREG)
        for (; dt + 2 * AV_N <= D; dt += 2 * AV_N) {
            const av_mask all = av_mask_n(AV_N);
            av_f32 s0[16], s1[16];
            for (int g = 0; g < HN; g++) { s0[g] = av_zero(); s1[g] = av_zero(); }
            for (int p = 0; p < np; p++) {
                if (pc < pfe) { ATTN_PREFETCH(pc); ATTN_PREFETCH(pc + 64); pc += 128; }
                av_f32 x0 = av_load_kv(VT, v + p * v_p, dt, all), x1 = av_load_kv(VT, v + p * v_p, dt + AV_N, all);
                const float *e = P + (size_t)p * ldp;
                for (int g = 0; g < HN; g++) {
                    av_f32 b = av_set1(e[g]);
                    s0[g] = av_fma(b, x0, s0[g]);
                    s1[g] = av_fma(b, x1, s1[g]);
                }
            }
            for (int g = 0; g < HN; g++) {
                av_store(acc + (size_t)g * D + dt, s0[g]);
                av_store(acc + (size_t)g * D + dt + AV_N, s1[g]);
            }
        }
    for (; dt < D; dt += AV_N) {
        av_mask mk = av_mask_n(D - dt);
        av_f32 s[16];
        for (int g = 0; g < HN; g++) s[g] = av_zero();
        for (int p = 0; p < np; p++) {
            if (pc < pfe) { ATTN_PREFETCH(pc); ATTN_PREFETCH(pc + 64); pc += 128; }
            av_f32 x = av_load_kv(VT, v + p * v_p, dt, mk);
            const float *e = P + (size_t)p * ldp;
            for (int g = 0; g < HN; g++) s[g] = av_fma(av_set1(e[g]), x, s[g]);
        }
        for (int g = 0; g < HN; g++) av_store_m(acc + (size_t)g * D + dt, s[g], mk);
    }
    *pf = pc;
}

/* attn_score_rows and attn_pv for each constant they are built for, each a function of its own:
 * inlined into the chunk function, GCC 12 kept their row pointers on the stack. */
typedef void (*attn_rows_fn)(int D, const char *k, ptrdiff_t k_p, const char *v, ptrdiff_t v_p, int vrow,
                             const float *qT, int L, float *kbuf, av_f32 scale, float *S);
typedef void (*attn_pv_fn)(int np, int D, const float *P, int ldp, const char *v, ptrdiff_t v_p, float *acc,
                           const char **pf, const char *pfe);
#define ATTN_ROWS(PB, KT) \
    ATTN_NOINLINE void attn_rows_##PB##_##KT(int D, const char *k, ptrdiff_t k_p, const char *v, ptrdiff_t v_p, \
                                            int vrow, const float *qT, int L, float *kbuf, av_f32 scale, float *S) { \
        attn_score_rows(PB, KT, D, k, k_p, v, v_p, vrow, qT, L, kbuf, scale, S); \
    }
#define ATTN_PV(HN, VT) \
    ATTN_NOINLINE void attn_pv_##HN##_##VT(int np, int D, const float *P, int ldp, const char *v, ptrdiff_t v_p, \
                                          float *acc, const char **pf, const char *pfe) { \
        attn_pv(HN, VT, np, D, P, ldp, v, v_p, acc, pf, pfe); \
    }
#define ATTN_TYPE(T) ATTN_ROWS(8, T) ATTN_ROWS(4, T) ATTN_ROWS(1, T) ATTN_PV(4, T) ATTN_PV(8, T) ATTN_PV(12, T)
ATTN_TYPE(0) ATTN_TYPE(1) ATTN_TYPE(2) ATTN_TYPE(3)
/* [KV type][8, 4 or 1 rows] and [KV type][4, 8 or 12 heads] */
static const attn_rows_fn attn_rows_of[4][3] = {
    {attn_rows_8_0, attn_rows_4_0, attn_rows_1_0}, {attn_rows_8_1, attn_rows_4_1, attn_rows_1_1},
    {attn_rows_8_2, attn_rows_4_2, attn_rows_1_2}, {attn_rows_8_3, attn_rows_4_3, attn_rows_1_3}};
static const attn_pv_fn attn_pv_of[4][3] = {
    {attn_pv_4_0, attn_pv_8_0, attn_pv_12_0}, {attn_pv_4_1, attn_pv_8_1, attn_pv_12_1},
    {attn_pv_4_2, attn_pv_8_2, attn_pv_12_2}, {attn_pv_4_3, attn_pv_8_3, attn_pv_12_3}};
#undef ATTN_TYPE
#undef ATTN_ROWS
#undef ATTN_PV

/* The partials of chunk c for tokens t0..t1-1 on KV head j, whose queries qT holds (attn_load_q):
 * part[i] for token t0+i, for each token that reaches the chunk. The tile's scores come from one
 * pass over the chunk's keys, up to the last token's positions; each token's lanes then see only
 * its own positions (-inf past them: exp gives 0, the max and the sums are as without them), so
 * a token gets the bytes it gets alone. */
static void attn_chunk(const attn_args *a, int t0, int t1, int j, int c, const float *qT, float *scratch,
                       float *const *part) {
    const int D = a->D, G = a->G, Gp = attn_gpad(G), tt = t1 - t0, L = attn_lanes(G, tt);
    const int p0 = c * ATTN_CHUNK, last = a->pos0 + t1 - p0;        /* positions the last token sees */
    const int np = last < ATTN_CHUNK ? last : ATTN_CHUNK;
    const int Lmax = attn_lanes(G, attn_tile_tokens(G));
    float *kbuf = scratch, *S = kbuf + 8 * (size_t)D, *M = S + (size_t)ATTN_CHUNK * Lmax, *Ls = M + Lmax;
    const char *k = (const char *)a->k + j * a->k_h + (ptrdiff_t)p0 * a->k_p;
    const char *v = (const char *)a->v + j * a->v_h + (ptrdiff_t)p0 * a->v_p;
    const int vrow = (int)kv_row_bytes(a->vt, D);
    const attn_rows_fn *rows = attn_rows_of[a->kt];
    const attn_pv_fn *pvs = attn_pv_of[a->vt];
    const av_f32 scale = av_set1(a->scale);
    int p = 0;
#define ROWS(I) rows[I](D, k + p * a->k_p, a->k_p, v + p * a->v_p, a->v_p, vrow, qT, L, kbuf, scale, S + (size_t)p * L)
    for (; p + 8 <= np; p += 8) ROWS(0);
    for (; p + 4 <= np; p += 4) ROWS(1);
    for (; p < np; p++) ROWS(2);
#undef ROWS
    for (int i = 0; i < tt - 1; i++) {                    /* each token's positions only */
        const int own = a->pos0 + t0 + i + 1 - p0;
        for (p = own < 0 ? 0 : own; p < np; p++)
            for (int g = 0; g < G; g++) S[(size_t)p * L + i * G + g] = -INFINITY;
    }
    for (int x = 0; x < L; x += AV_N) {                   /* softmax of each lane over the chunk */
        av_f32 mx = av_load(S + x), sum = av_zero();
        for (p = 1; p < np; p++) mx = av_max(mx, av_load(S + (size_t)p * L + x));
        for (p = 0; p < np; p++) {
            av_f32 e = av_exp(av_sub(av_load(S + (size_t)p * L + x), mx));
            av_store(S + (size_t)p * L + x, e);
            sum = av_add(sum, e);
        }
        av_store(M + x, mx);
        av_store(Ls + x, sum);
    }
    /* the next chunk's keys, if the tile sees it, are fetched while the values are summed */
    const char *pf = k + ATTN_CHUNK * a->k_p, *pfe = pf;
    if (last > ATTN_CHUNK)
        pfe += (ptrdiff_t)((last - ATTN_CHUNK < ATTN_CHUNK ? last - ATTN_CHUNK : ATTN_CHUNK) - 1) * a->k_p
               + kv_row_bytes(a->kt, D);
    for (int i = 0; i < tt; i++) {
        const int own = a->pos0 + t0 + i + 1 - p0, npi = own < np ? own : np;
        if (npi <= 0) continue;
        float *m = part[i], *l = m + Gp, *acc = m + 2 * Gp;
        for (int g = 0; g < Gp; g++) {
            m[g] = g < G ? M[i * G + g] : 0.0f;
            l[g] = g < G ? Ls[i * G + g] : 1.0f;
        }
        for (int g = 0; g < G;) {                          /* a pass may run padded heads, g < Gp */
            int hn = G - g > ATTN_HN ? ATTN_HN : (G - g + 3) / 4 * 4;
            const float *P = S + i * G + g;
            float *ag = acc + (size_t)g * D;
            pvs[hn == 4 ? 0 : hn == 8 ? 1 : 2](npi, D, P, L, v, a->v_p, ag, &pf, pfe);
            g += hn;
        }
    }
}

/* state <- state merged with the next chunk's partial: M = max(M, m), each side rescaled by
 * exp(its max - M). */
static void attn_merge(const attn_args *a, float *st, const float *pt) {
    const int D = a->D, G = a->G, Gp = attn_gpad(G);
    float fa[AV_N], fb[AV_N];
    for (int g0 = 0; g0 < Gp; g0 += AV_N) {
        av_f32 M = av_load(st + g0), m = av_load(pt + g0), M2 = av_max(M, m);
        av_f32 ea = av_exp(av_sub(M, M2)), eb = av_exp(av_sub(m, M2));
        av_store(st + Gp + g0, av_add(av_mul(av_load(st + Gp + g0), ea), av_mul(av_load(pt + Gp + g0), eb)));
        av_store(st + g0, M2);
        av_store(fa, ea);
        av_store(fb, eb);
        for (int g = g0; g < G && g < g0 + AV_N; g++) {
            float *A = st + 2 * Gp + (size_t)g * D;
            const float *P = pt + 2 * Gp + (size_t)g * D;
            av_f32 va = av_set1(fa[g - g0]), vb = av_set1(fb[g - g0]);
            for (int d = 0; d < D; d += AV_N) {
                av_mask mk = av_mask_n(D - d);
                av_store_m(A + d, av_add(av_mul(av_load_m(A + d, mk), va), av_mul(av_load_m(P + d, mk), vb)), mk);
            }
        }
    }
}

/* out[t, j*G + g, :] = acc[g] / l[g] */
static void attn_finish(const attn_args *a, int t, int j, const float *st) {
    const int D = a->D, G = a->G, Gp = attn_gpad(G);
    for (int g = 0; g < G; g++) {
        const float *A = st + 2 * Gp + (size_t)g * D;
        float *o = a->out + t * a->o_t + ((ptrdiff_t)j * G + g) * a->o_h;
        av_f32 l = av_set1(st[Gp + g]);
        for (int d = 0; d < D; d += AV_N) {
            av_mask mk = av_mask_n(D - d);
            av_store_m(o + d, av_div(av_load_m(A + d, mk), l), mk);
        }
    }
}

/* attn_tile's work floats */
static size_t attn_tile_floats(const attn_args *a) {
    const int tt = attn_tile_tokens(a->G);
    return attn_qt_floats(a, tt) + attn_scratch_floats(a) + 2 * (size_t)tt * attn_part_floats(a);
}

/* Tokens t0..t1-1 (at most attn_tile_tokens) on KV head j, whole: chunk by chunk, each token's
 * partials merged in chunk order. work: attn_tile_floats. */
static void attn_tile(const attn_args *a, int t0, int t1, int j, float *work) {
    const size_t ps = attn_part_floats(a);
    const int tt = attn_tile_tokens(a->G);
    float *qT = work, *scratch = qT + attn_qt_floats(a, tt);
    float *st = scratch + attn_scratch_floats(a), *pt = st + tt * ps;
    float *parts[ATTN_TILE];
    const int nc = attn_nchunks(a, t1 - 1);
    attn_load_q(a, t0, t1, j, qT);
    for (int c = 0; c < nc; c++) {
        for (int i = 0; i < t1 - t0; i++) parts[i] = (c == 0 ? st : pt) + i * ps;
        attn_chunk(a, t0, t1, j, c, qT, scratch, parts);
        for (int i = 0; c > 0 && i < t1 - t0; i++)
            if (c < attn_nchunks(a, t0 + i)) attn_merge(a, st + i * ps, pt + i * ps);
    }
    for (int i = 0; i < t1 - t0; i++) attn_finish(a, t0 + i, j, st + i * ps);
}

#endif
