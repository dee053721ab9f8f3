/* ---- Rows repacked 8 at a time ("x8" layouts) -----------------------------------------------
 * For each block column of a group of 8 rows, one 32-byte load holds 4 consecutive values'
 * bytes of all 8 rows, so a broadcast of 4 activation bytes meets 8 rows at once and the per-row
 * sums need no horizontal adds. Two kernel bodies, one per block shape, each taking a `kind`
 * (a constant at every call, so each kind's code is specialised):
 *  - 32-value blocks under one fp16 scale: Q4_0, IQ4_NL (the same bytes, other values), Q5_0, Q5_1,
 *    Q8_0 (groups_body.h, in 256-bit and, on AVX-512, 512-bit registers);
 *  - 256-value super-blocks under 8 sub-block scales: Q4_K, IQ4_XS (gemv_k_x8).
 * How each block's bytes become values is all that differs between the kinds of a shape. */

/* block_q4_0x8 (Q4_0 and IQ4_NL): d[r] is row r's scale and qs[(k*8 + r)*4 + i] = row r's
 * qs[4k + i] (k, i = 0..3): low nibbles are values 4k..4k+3, high nibbles 16+4k..16+4k+3.
 * Same bytes as 8 file blocks, in another order. */
typedef struct { uint16_t d[8]; uint8_t qs[128]; } block_q4_0x8;
_Static_assert(sizeof(block_q4_0x8) == 144, "q4_0x8 block is 144 bytes");
/* block_q5_0x8: Q5_0 is what llama.cpp's K-quant mixes fall back to for widths that are not
 * multiples of 256 (GLM-4-9B's FFN down, 13696 wide). d[r]; h[r], row r's 32 fifth bits
 * rearranged for the SIMD loads; qs as block_q4_0x8. Bit 8i+k of h[r] is the fifth bit of value
 * 4k+i, bit 8i+4+k that of value 16+4k+i (i, k = 0..3), so (h << (4-k)) & 0x10 and (h >> k) & 0x10
 * in each byte are the fifth bits of load k's low and high nibbles. 22 bytes per 32 weights. */
typedef struct { uint16_t d[8]; uint32_t h[8]; uint8_t qs[128]; } block_q5_0x8;
_Static_assert(sizeof(block_q5_0x8) == 176, "q5_0x8 block is 176 bytes");
/* block_q8_0x8: d[r], then qs[(k*8 + r)*4 + i] = row r's qs[4k + i] (k = 0..7). */
typedef struct { uint16_t d[8]; int8_t qs[256]; } block_q8_0x8;
/* block_q5_1x8: Q5_1 (Q5_0 with a min: value = d * q + m, q 0..31; llama.cpp's fallback for Q5_K
 * where rows are not whole 256-blocks): d[r], m[r], then h and qs as block_q5_0x8. */
typedef struct { uint16_t d[8], m[8]; uint32_t h[8]; uint8_t qs[128]; } block_q5_1x8;
BLOCK_BYTES(block_q5_1x8, 192)
_Static_assert(sizeof(block_q8_0x8) == 272, "q8_0x8 block is 272 bytes");

/* tokens per pass over a block column (4 accumulators: tried 8 on AVX-512, no faster) */
#define TCMAX 4

enum { X8_Q4_0, X8_IQ4_NL, X8_Q5_0, X8_Q8_0, X8_Q4_K, X8_IQ4_XS, X8_Q2_K, X8_Q5_1 };

/* the codebook + 128, as unsigned bytes for VNNI's u8 x s8 products (1..241) */
static const uint8_t KVALUES_IQ4_U[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

static inline int x8_bytes(int kind) {
    return kind == X8_Q5_0 ? (int)sizeof(block_q5_0x8) : kind == X8_Q8_0 ? (int)sizeof(block_q8_0x8)
         : kind == X8_Q5_1 ? (int)sizeof(block_q5_1x8)
         : (int)sizeof(block_q4_0x8);
}
/* values used as signed bytes (the u8 x s8 products take |w| and x with w's sign), else as
 * unsigned bytes with an offset taken off through the activations' sums: IQ4_NL's codebook is
 * unsigned + 128 with VNNI (whose int32 sums cannot overflow), signed without (int16 pairs) */
static inline int x8_signed(int kind) {
#if defined(GLMCPU_VNNI)
    return kind == X8_Q8_0;
#else
    return kind == X8_Q8_0 || kind == X8_IQ4_NL || kind == X8_IQ4_XS;
#endif
}
static inline float x8_offset(int kind) {
    return x8_signed(kind) || kind == X8_Q5_1 ? 0.0f : kind == X8_Q4_0 ? 8.0f : kind == X8_Q5_0 ? 16.0f : 128.0f;
}
/* where a 32-block kind's fifth bits (h) and nibbles (qs) lie in its block; Q5_1's mins at 16 */
static inline int x8_h(int kind) { return kind == X8_Q5_1 ? 32 : 16; }
static inline int x8_qs(int kind) { return kind == X8_Q5_0 ? 48 : kind == X8_Q5_1 ? 64 : 16; }
static inline int x8_five(int kind) { return kind == X8_Q5_0 || kind == X8_Q5_1; }
/* Q4_0 without VNNI: all 8 int16 pair sums of a block (|15 * 127 * 2| each) fit one register */
static inline int x8_one_chain(int kind) { return kind == X8_Q4_0; }

/* value i (0..31) of row r in a 32-block group (the scalar twin's reading of the layouts) */
static inline int x8_value(int kind, const uint8_t *B, int r, int i) {
    const int k = (i % 16) / 4, j = i % 4;
    if (kind == X8_Q8_0) return ((const int8_t *)B)[16 + ((i / 4) * 8 + r) * 4 + j];
    const uint8_t q = B[x8_qs(kind) + (k * 8 + r) * 4 + j];
    const int nib = i < 16 ? q & 0x0f : q >> 4;
    if (kind == X8_IQ4_NL) return KVALUES_IQ4[nib];
    if (kind == X8_Q4_0) return nib - 8;
    uint32_t h;
    memcpy(&h, B + x8_h(kind) + 4 * r, 4);
    return (nib | (int)((h >> (8 * j + (i < 16 ? 0 : 4) + k)) & 1) << 4) - (kind == X8_Q5_0 ? 16 : 0);
}

/* ---- 256-value super-blocks in 8-row groups: Q4_K and IQ4_XS ----------------------------------
 * As Q4_0's groups: one 32-byte load holds 4 nibble bytes of 8 rows. Per super-block of 8 rows:
 * d[r] (Q4_K: and dmin[r]); the 6-bit scale of sub-block j of row r at sc[j][r] (Q4_K unsigned,
 * with its min at m[j][r]; IQ4_XS signed, ls - 32), unpacked at load; then
 * qs[((p*8 + k)*8 + r)*4 + i] = the nibbles of row r's values 64p + 4k + i (low) and
 * 64p + 32 + 4k + i (high): Q4_K's own order (its qs[32p + 4k + i]); IQ4_XS's nibbles are moved
 * there at load. Each sub-block's integer sum is scaled in integer, Q4_K's mins (and IQ4_XS's
 * +128 offset with VNNI) go through the activations' 16-sums, and one float multiply per
 * super-block and token. */
typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t sc[8][8], m[8][8];
    uint8_t qs[1024];
} block_q4_Kx8;
_Static_assert(sizeof(block_q4_Kx8) == 1184, "q4_Kx8 block is 1184 bytes");
typedef struct {
    uint16_t d[8];
    int8_t sc[8][8];
    uint8_t qs[1024];
} block_iq4_xsx8;
/* Q2_K (16 sub-blocks of 16 under 4-bit scales and mins): d[r], dmin[r]; sc[s][r] = row r's
 * scales[s] (scale low nibble, min high), and qs[((h*8 + k)*8 + r)*4 + i] = row r's qs[32h + 4k + i],
 * whose bits 2c, 2c+1 are value 128h + 32c + 4k + i (sub-block 8h + 2c + k / 4). The file's bytes
 * in another order (672 per 8 x 256 values). */
typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t sc[16][8];
    uint8_t qs[512];
} block_q2_Kx8;
_Static_assert(sizeof(block_q2_Kx8) == 672, "q2_Kx8 block is 672 bytes");
_Static_assert(sizeof(block_iq4_xsx8) == 1104, "iq4_xsx8 block is 1104 bytes");

/* tokens sharing one unpacking of the nibbles (AVX2: 2 sums per token, 4 tokens, the unpacked
 * pair and the mask take 11 of the 16 registers); and groups per pass of a token chunk, so the
 * chunk's activations stay in L1 while 4 groups' weights (L2) pass (AVX2, 27392 x 4096, 512
 * tokens: 1 token a pass 178 GOP/s, 4 tokens 223, + IN_REG 300, + 4 groups 318) */
#define KX8TC 4
#define KX8G 4

/* where a kind's fields lie in its block */
static inline int kx8_bytes(int kind) {
    return kind == X8_Q4_K ? (int)sizeof(block_q4_Kx8) : kind == X8_Q2_K ? (int)sizeof(block_q2_Kx8)
         : (int)sizeof(block_iq4_xsx8);
}
static inline int kx8_sc(int kind) { return kind == X8_Q4_K ? 32 : 16; }
static inline int kx8_qs(int kind) { return kind == X8_Q4_K ? 160 : 80; }

#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
#define XBITS 256           /* one group */
#define XLOAD(o) _mm256_loadu_si256((const __m256i *)(B0 + (o)))
#define XLOAD8(o) _mm_loadl_epi64((const __m128i *)(B0 + (o)))
#define XSCALES(o) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(B0 + (o))))
#define XSIGN(x, v) _mm256_sign_epi8(x, v)
#include "groups_body.h"
#endif

#if defined(GLMCPU_AVX512)
/* AVX-512 has no sign_epi8: negate where v < 0 (v = 0 meets |v| = 0 anyway) */
static inline __m512i sign512(__m512i x, __m512i v) {
    return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(v), _mm512_setzero_si512(), x);
}
#define XBITS 512           /* two adjacent groups, one per 256-bit half */
#define XLOAD(o) _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(B0 + (o)))), \
                                    _mm256_loadu_si256((const __m256i *)(B1 + (o))), 1)
#define XLOAD8(o) _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(B0 + (o))), \
                                    _mm_loadl_epi64((const __m128i *)(B1 + (o))))
#define XSCALES(o) _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(B0 + (o))))), \
                                      _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(B1 + (o)))), 1)
#define XSIGN(x, v) sign512(x, v)
#include "groups_body.h"
#endif

/* 8 rows x TC tokens (TC <= TCMAX) of one 32-block group: out[t*ldo + r]. Each token's sums run
 * in the same order whatever TC is, so batched and single-token results are bit-identical. */
GLMCPU_INLINE void gemv_x8(const int kind, int n, const uint8_t *w, const int TC, const int8_t *xq,
                           const float *xd, const float *xs, float *out, int ldo, int pf) {
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
    gemv_x8_256(kind, n, w, w, TC, xq, xd, xs, out, ldo, pf);
#else
    const int nb = n / QK, bytes = x8_bytes(kind);
    (void)pf;
    for (int t = 0; t < TC; t++)
        for (int r = 0; r < 8; r++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *B = w + (size_t)b * bytes;
                int isum = 0;
                for (int i = 0; i < QK; i++) isum += x8_value(kind, B, r, i) * xq[(size_t)t * n + b * QK + i];
                uint16_t d, m;
                memcpy(&d, B + 2 * r, 2);
                memcpy(&m, B + 16 + 2 * r, 2);
                acc += fp16_to_fp32(d) * xd[t * nb + b] * (float)isum;
                if (kind == X8_Q5_1) acc += fp16_to_fp32(m) * xs[t * nb + b];       /* the min times sum(x) */
            }
            out[(size_t)t * ldo + r] = acc;
        }
#endif
}

/* Groups g0..g1 (row group g = rows 8g..8g+7) of a 32-block x8 matrix against T tokens. */
GLMCPU_INLINE void gemm_x8_groups(const int kind, int n, const uint8_t *w, int g0, int g1, int T,
                                  const int8_t *xq, const float *xd, const float *xs, float *out, int ldo) {
    const size_t line = (size_t)(n / QK) * x8_bytes(kind);
    int g = g0;
#if defined(GLMCPU_AVX512)
    /* two groups per 512-bit register pay off for prompts (8+ tokens, or long rows); one token
     * reads as fast one group at a time, and short rows (the column chunks of gemm_chunked)
     * much faster so (same per-lane arithmetic either way: the same bits). Q8_0 keeps one group. */
    for (; kind != X8_Q8_0 && T > 1 && (n / QK > 64 || T >= 8) && g + 2 <= g1; g += 2) {
        const uint8_t *a = w + (size_t)g * line;
        FOR_TC(t, tc, T, TCMAX) {
#define GO(TC) gemv_x8_512(kind, n, a, a + line, TC, xq + (size_t)t * n, xd + (size_t)t * (n / QK), \
                           xs + (size_t)t * (n / QK), out + (size_t)t * ldo + 8 * g, ldo, t == 0)
            TC_CONST(tc, GO);
#undef GO
        }
    }
#endif
    for (; g < g1; g++) {
        const uint8_t *grp = w + (size_t)g * line;
        FOR_TC(t, tc, T, TCMAX) {
#define GO(TC) gemv_x8(kind, n, grp, TC, xq + (size_t)t * n, xd + (size_t)t * (n / QK), xs + (size_t)t * (n / QK), \
                       out + (size_t)t * ldo + 8 * g, ldo, t == 0)
            TC_CONST(tc, GO);
#undef GO
        }
    }
}

GLMCPU_INLINE void gemv_k_x8(const int kind, int n, const uint8_t *w, const int TC, const int8_t *xq,
                             const float *xd, const int16_t *xb, float *out, int ldo, int pf) {
#if defined(GLMCPU_AVX2) || defined(GLMCPU_AVX512)
    gemv_k_x8_256(kind, n, w, w, TC, xq, xd, xb, out, ldo, pf);
#else
    const int nb = n / QK_K, bytes = kx8_bytes(kind), q4k = kind == X8_Q4_K;
    if (kind == X8_Q2_K) {
        (void)pf;
        for (int t = 0; t < TC; t++)
            for (int r = 0; r < 8; r++) {
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    const block_q2_Kx8 *B = (const block_q2_Kx8 *)(w + (size_t)b * bytes);
                    int is = 0, im = 0;
                    for (int v = 0; v < QK_K; v++) {
                        const int h = v / 128, c = (v % 128) / 32, l = v % 32, s = v / 16;
                        const int q = (B->qs[((h * 8 + l / 4) * 8 + r) * 4 + l % 4] >> (2 * c)) & 3;
                        is += (B->sc[s][r] & 0x0f) * q * xq[(size_t)t * n + b * QK_K + v];
                    }
                    for (int s = 0; s < 16; s++) im += (B->sc[s][r] >> 4) * xb[(size_t)t * (n / 16) + 16 * b + s];
                    const float dx = xd[(size_t)t * nb + b];
                    acc += fp16_to_fp32(B->d[r]) * dx * (float)is - fp16_to_fp32(B->dmin[r]) * dx * (float)im;
                }
                out[(size_t)t * ldo + r] = acc;
            }
        return;
    }
    (void)pf;
    for (int t = 0; t < TC; t++) {
        const int8_t *xt = xq + (size_t)t * n;
        const int16_t *bt = xb + (size_t)t * (n / 16);
        for (int r = 0; r < 8; r++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *B = w + (size_t)b * bytes;
                int is = 0, im = 0;
                for (int j = 0; j < 8; j++) {
                    int p = j / 2, s = 0;
                    for (int k = 0; k < 8; k++)
                        for (int i = 0; i < 4; i++) {
                            uint8_t q = B[kx8_qs(kind) + ((p * 8 + k) * 8 + r) * 4 + i];
                            int nib = (j & 1) ? q >> 4 : q & 0x0f;
                            s += (q4k ? nib : KVALUES_IQ4[nib]) * xt[b * QK_K + 32 * j + 4 * k + i];
                        }
                    const int sc = q4k ? B[32 + 8 * j + r] : ((const int8_t *)B)[16 + 8 * j + r];
                    is += sc * s;
                    if (q4k) im += B[96 + 8 * j + r] * (bt[16 * b + 2 * j] + bt[16 * b + 2 * j + 1]);
                }
                uint16_t d, dm = 0;
                memcpy(&d, B + 2 * r, 2);
                if (q4k) memcpy(&dm, B + 16 + 2 * r, 2);
                float dx = xd[(size_t)t * nb + b];
                acc += fp16_to_fp32(d) * dx * (float)is - fp16_to_fp32(dm) * dx * (float)im;
            }
            out[(size_t)t * ldo + r] = acc;
        }
    }
#endif
}

/* Groups g0..g1 of a Q4_K / IQ4_XS x8 matrix against T tokens of q8_K activations (AVX-512, 2+
 * tokens: two groups per 512-bit pass, the same bits as one at a time). */
GLMCPU_INLINE void gemm_k_x8_groups(const int kind, int n, const uint8_t *w, int g0, int g1, int T,
                                    const int8_t *xq, const float *xd, const int16_t *xb, float *out, int ldo) {
    const int nb = n / QK_K;
    const size_t line = (size_t)nb * kx8_bytes(kind);
    for (int gb = g0; gb < g1; gb += KX8G)
    FOR_TC(t, tc, T, KX8TC)
    for (int g = gb; g < g1 && g < gb + KX8G; g++) {
        const uint8_t *a = w + (size_t)g * line;
#if defined(GLMCPU_AVX512)
        if (T > 1 && g + 1 < g1 && g + 1 < gb + KX8G) {
#define GO(TC) gemv_k_x8_512(kind, n, a, a + line, TC, xq + (size_t)t * n, xd + (size_t)t * nb, \
                             xb + (size_t)t * (n / 16), out + (size_t)t * ldo + 8 * g, ldo, t == 0)
            TC_CONST(tc, GO);
#undef GO
            g++;
            continue;
        }
#endif
#define GO(TC) gemv_k_x8(kind, n, a, TC, xq + (size_t)t * n, xd + (size_t)t * nb, \
                         xb + (size_t)t * (n / 16), out + (size_t)t * ldo + 8 * g, ldo, t == 0)
        TC_CONST(tc, GO);
#undef GO
    }
}

/* The x8 types' rows r0..r1 (multiples of 8) against T tokens: out[t*ldo + r]. */
static void gemm_groups(int type, int n, const uint8_t *w, int r0, int r1, int T, const int8_t *xq,
                        const float *xd, const float *xs, float *out, int ldo) {
    const int g0 = r0 / 8, g1 = r1 / 8;
    const int16_t *xb = (const int16_t *)xs;         /* the q8_K kinds' 16-sums */
    switch (type) {
    case GT_Q4_0X8: gemm_x8_groups(X8_Q4_0, n, w, g0, g1, T, xq, xd, xs, out, ldo); break;
    case GT_IQ4_NLX8: gemm_x8_groups(X8_IQ4_NL, n, w, g0, g1, T, xq, xd, xs, out, ldo); break;
    case GT_Q5_0X8: gemm_x8_groups(X8_Q5_0, n, w, g0, g1, T, xq, xd, xs, out, ldo); break;
    case GT_Q5_1X8: gemm_x8_groups(X8_Q5_1, n, w, g0, g1, T, xq, xd, xs, out, ldo); break;
    case GT_Q8_0X8: gemm_x8_groups(X8_Q8_0, n, w, g0, g1, T, xq, xd, xs, out, ldo); break;
    case GT_Q4_KX8: gemm_k_x8_groups(X8_Q4_K, n, w, g0, g1, T, xq, xd, xb, out, ldo); break;
    case GT_Q2_KX8: gemm_k_x8_groups(X8_Q2_K, n, w, g0, g1, T, xq, xd, xb, out, ldo); break;
    default: gemm_k_x8_groups(X8_IQ4_XS, n, w, g0, g1, T, xq, xd, xb, out, ldo); break;
    }
}
