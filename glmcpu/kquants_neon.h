/* NEON bodies (arm64) of kquants.h's row kernels: the K-quants and IQ4_XS against q8_K activations,
 * Q4_1 / Q5_0 / Q5_1 / IQ4_NL against Q8_0 ones, and quantize_row_q8_K. Included by kquants.h
 * after the block layouts; each kernel there calls its body here from a `GLMCPU_NEON` branch.
 *
 * Every kernel takes TC (<= 4) tokens: a block's weights are unpacked once into registers and
 * used for each token. Integer sums per block are exact; the float step per block and token is
 * the scalar twin's own expression, in its order, so the results are the twin's (to the bit where
 * the compiler fuses no multiply-adds, as under -std=c11) and batched equals single-token.
 * vdotq_s32 where the target has it (-march=armv8.2-a+dotprod and later), widening multiplies
 * otherwise. Checked against the twin by tools/check_neon.sh (qemu-aarch64).
 */
#ifndef GLMCPU_KQUANTS_NEON_H
#define GLMCPU_KQUANTS_NEON_H
#if defined(GLMCPU_NEON)

/* inlined into the TC-specialised callers, so the unpacked weights stay in registers */
#define NEON_INLINE static inline __attribute__((always_inline))

/* acc + the products of 16 int8 pairs, in 4 int32 lanes (which lane holds which product differs
 * between the two paths; callers use only lane totals) */
static inline int32x4_t neon_dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));    /* |a * b| <= 2^14: int16 */
    return vpadalq_s16(acc, vmull_high_s8(a, b));
#endif
}

/* sum over i of a[i] * b[i], 8 int16 pairs */
static inline int neon_dot8_s16(int16x8_t a, int16x8_t b) {
    return vaddvq_s32(vmlal_high_s16(vmull_s16(vget_low_s16(a), vget_low_s16(b)), a, b));
}

/* `val` in each byte of v whose bit `bit` is set, else 0 */
static inline uint8x16_t neon_bit(uint8x16_t v, int bit, uint8_t val) {
    return vandq_u8(vtstq_u8(v, vdupq_n_u8((uint8_t)(1u << bit))), vdupq_n_u8(val));
}

/* One super-block's sum over its 16 pieces of 16 values: sc[i] * (q[i] . x[16i .. 16i + 15]).
 * Four pieces' totals are gathered into one vector by pairwise adds, then scaled at once. */
NEON_INLINE int neon_isum_K(const int8x16_t q[16], int8x16_t sc, const int8_t *x) {
    const int16x8_t s16[2] = {vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc)};
    int32x4_t acc = vdupq_n_s32(0);
    for (int g = 0; g < 4; g++) {
        int32x4_t p[4];
        for (int i = 0; i < 4; i++) p[i] = neon_dot16(vdupq_n_s32(0), q[4 * g + i], vld1q_s8(x + 64 * g + 16 * i));
        int32x4_t tot = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3]));   /* pieces 4g..4g+3 */
        int16x4_t scg = g & 1 ? vget_high_s16(s16[g / 2]) : vget_low_s16(s16[g / 2]);
        acc = vmlaq_s32(acc, tot, vmovl_s16(scg));
    }
    return vaddvq_s32(acc);
}

/* the 16 piece scales of a format with 8 sub-blocks of 32: each sub-block's scale twice */
static inline int8x16_t neon_twice(int8x8_t sc8) {
    int8x16_t v = vcombine_s8(sc8, sc8);
    return vzip1q_s8(v, v);
}

/* token t's q8_K activations of super-block b (quantize_row_q8_K's xq, xd, xb; tokens n apart):
 * its 256 int8, its scale, its 16 int16 sums */
#define NEON_X(t, b) (xq + (size_t)(t) * n + (size_t)(b) * QK_K)
#define NEON_XD(t, b) xd[(size_t)(t) * (n / QK_K) + (b)]
#define NEON_XB(t, b) (xb + (size_t)(t) * (n / 16) + 16 * (b))

/* ---- q8_K activations ------------------------------------------------------------------ */

static void neon_quantize_row_q8_K(int n, const float *x, int8_t *xq, float *xd, int16_t *xb) {
    for (int b = 0; b < n / QK_K; b++) {
        const float *v = x + b * QK_K;
        float32x4_t mx = vdupq_n_f32(0.0f);
        for (int j = 0; j < QK_K; j += 4)    /* maxnm skips a NaN, as the twin's > does */
            mx = vmaxnmq_f32(mx, vabsq_f32(vld1q_f32(v + j)));
        float amax = vmaxnmvq_f32(mx);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int s = 0; s < QK_K / 16; s++) {
            int32x4_t q[4];
            for (int i = 0; i < 4; i++)      /* round to nearest even, as lrintf in the default mode */
                q[i] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(v + 16 * s + 4 * i), id));
            int16x8_t lo = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
            int16x8_t hi = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
            vst1q_s8(xq + b * QK_K + 16 * s, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
            xb[b * 16 + s] = (int16_t)vaddvq_s32(vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])));
        }
        xd[b] = d;
    }
}

/* ---- K-quants and IQ4_XS . q8_K: each unpacks a super-block into q[i] = values 16i..16i+15
 * (int8) and the 16 piece scales, then runs neon_isum_K per token ---------------------------- */

/* Q4_K / Q5_K: the 8 6-bit scales (bytes 0..7) and mins (bytes 8..15) from their 12 packed
 * bytes, as scales_q4_K */
static inline uint8x16_t neon_scales_q4_K(const uint8_t *s) {
    uint32_t a, b, c;
    memcpy(&a, s, 4); memcpy(&b, s + 4, 4); memcpy(&c, s + 8, 4);
    const uint32_t u[4] = {a & 0x3f3f3f3f, (c & 0x0f0f0f0f) | ((a >> 2) & 0x30303030),
                           b & 0x3f3f3f3f, ((c >> 4) & 0x0f0f0f0f) | ((b >> 2) & 0x30303030)};
    return vreinterpretq_u8_u32(vld1q_u32(u));
}

/* sum over the 8 sub-blocks of min[j] * (their 32 activations' sum: two 16-sums, <= 4064) */
static inline int neon_mins_q4_K(uint8x8_t mins, const int16_t *xb) {
    int16x8_t sums = vpaddq_s16(vld1q_s16(xb), vld1q_s16(xb + 8));
    return neon_dot8_s16(sums, vreinterpretq_s16_u16(vmovl_u8(mins)));
}

/* One Q4_K / Q5_K super-block into each token's sum: sub-block 2p is the low nibbles of qs[32p..],
 * 2p + 1 the high ones; Q5_K's fifth bit of value 64p + l is bit 2p of qh[l], of 64p + 32 + l bit
 * 2p + 1 (qh is NULL for Q4_K) */
NEON_INLINE void neon_block_q45_K(uint16_t dh, uint16_t mh, const uint8_t *scales, const uint8_t *qs,
                                  const uint8_t *qh, int b, int n, const int TC, const int8_t *xq,
                                  const float *xd, const int16_t *xb, float sum[4]) {
    int8x16_t q[16];
    for (int p = 0; p < 4; p++)
        for (int h = 0; h < 2; h++) {
            uint8x16_t v = vld1q_u8(qs + 32 * p + 16 * h);
            uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(v, 4);
            if (qh) {
                uint8x16_t hb = vld1q_u8(qh + 16 * h);
                lo = vorrq_u8(lo, neon_bit(hb, 2 * p, 0x10));
                hi = vorrq_u8(hi, neon_bit(hb, 2 * p + 1, 0x10));
            }
            q[4 * p + h] = vreinterpretq_s8_u8(lo);
            q[4 * p + 2 + h] = vreinterpretq_s8_u8(hi);
        }
    uint8x16_t scm = neon_scales_q4_K(scales);
    int8x16_t sc = neon_twice(vreinterpret_s8_u8(vget_low_u8(scm)));
    float d = fp16_to_fp32(dh), dmin = fp16_to_fp32(mh);
    for (int t = 0; t < TC; t++) {
        int isum = neon_isum_K(q, sc, NEON_X(t, b));
        int msum = neon_mins_q4_K(vget_high_u8(scm), NEON_XB(t, b));
        sum[t] += NEON_XD(t, b) * (d * (float)isum - dmin * (float)msum);
    }
}

NEON_INLINE void neon_dot_q4_K(int n, const block_q4_K *w, const int TC, const int8_t *xq,
                               const float *xd, const int16_t *xb, float *res) {
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++)
        neon_block_q45_K(w[b].d, w[b].dmin, w[b].scales, w[b].qs, NULL, b, n, TC, xq, xd, xb, sum);
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

NEON_INLINE void neon_dot_q5_K(int n, const block_q5_K *w, const int TC, const int8_t *xq,
                               const float *xd, const int16_t *xb, float *res) {
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++)
        neon_block_q45_K(w[b].d, w[b].dmin, w[b].scales, w[b].qs, w[b].qh, b, n, TC, xq, xd, xb, sum);
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

/* Q6_K: piece 8h + 2k + u = values 128h + 32k + 16u + i: low 4 bits nibble k/2 of
 * ql[64h + 32(k%2) + 16u + i], high 2 bits bits 2k.. of qh[32h + 16u + i]; its "- 32" in the lanes */
NEON_INLINE void neon_dot_q6_K(int n, const block_q6_K *w, const int TC, const int8_t *xq,
                               const float *xd, float *res) {
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++) {
        int8x16_t q[16];
        for (int h = 0; h < 2; h++)
            for (int u = 0; u < 2; u++) {
                uint8x16_t l0 = vld1q_u8(w[b].ql + 64 * h + 16 * u), l1 = vld1q_u8(w[b].ql + 64 * h + 32 + 16 * u);
                uint8x16_t qh = vld1q_u8(w[b].qh + 32 * h + 16 * u);
                const uint8x16_t lo4[4] = {vandq_u8(l0, vdupq_n_u8(0x0f)), vandq_u8(l1, vdupq_n_u8(0x0f)),
                                           vshrq_n_u8(l0, 4), vshrq_n_u8(l1, 4)};
                /* bits 2k..2k+1 of qh moved to bits 4..5 (masked below) */
                const uint8x16_t hi2[4] = {vshlq_n_u8(qh, 4), vshlq_n_u8(qh, 2), qh, vshrq_n_u8(qh, 2)};
                for (int k = 0; k < 4; k++) {
                    uint8x16_t v = vorrq_u8(lo4[k], vandq_u8(hi2[k], vdupq_n_u8(0x30)));
                    q[8 * h + 2 * k + u] = vsubq_s8(vreinterpretq_s8_u8(v), vdupq_n_s8(32));
                }
            }
        int8x16_t sc = vld1q_s8(w[b].scales);
        float d = fp16_to_fp32(w[b].d);
        for (int t = 0; t < TC; t++)
            sum[t] += NEON_XD(t, b) * d * (float)neon_isum_K(q, sc, NEON_X(t, b));
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

/* Q2_K / Q3_K pieces: piece 8h + 2k + u = values 128h + 32k + 16u + i, bits 2k..2k+1 of
 * qs[32h + 16u + i]; Q3_K's third bit is bit 4h + k of hmask[16u + i], and its "- 4 where that
 * bit is clear" goes into the lanes (hmask is NULL for Q2_K) */
NEON_INLINE void neon_pieces_q23_K(const uint8_t *qs, const uint8_t *hmask, int8x16_t q[16]) {
    for (int h = 0; h < 2; h++)
        for (int u = 0; u < 2; u++) {
            uint8x16_t v = vld1q_u8(qs + 32 * h + 16 * u);
            for (int k = 0; k < 4; k++) {
                uint8x16_t q2 = vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * k))), vdupq_n_u8(3));
                int8x16_t s = vreinterpretq_s8_u8(q2);
                if (hmask) {
                    q2 = vorrq_u8(q2, neon_bit(vld1q_u8(hmask + 16 * u), 4 * h + k, 4));
                    s = vsubq_s8(vreinterpretq_s8_u8(q2), vdupq_n_s8(4));
                }
                q[8 * h + 2 * k + u] = s;
            }
        }
}

/* Q2_K: scale of sub-block s the low nibble of scales[s], min the high one */
NEON_INLINE void neon_dot_q2_K(int n, const block_q2_K *w, const int TC, const int8_t *xq,
                               const float *xd, const int16_t *xb, float *res) {
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++) {
        int8x16_t q[16];
        neon_pieces_q23_K(w[b].qs, NULL, q);
        uint8x16_t raw = vld1q_u8(w[b].scales);
        int8x16_t sc = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
        int16x8_t m0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(vshrq_n_u8(raw, 4))));
        int16x8_t m1 = vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(vshrq_n_u8(raw, 4))));
        float d = fp16_to_fp32(w[b].d), dmin = fp16_to_fp32(w[b].dmin);
        for (int t = 0; t < TC; t++) {
            const int16_t *bs = NEON_XB(t, b);
            int isum = neon_isum_K(q, sc, NEON_X(t, b));
            int msum = neon_dot8_s16(vld1q_s16(bs), m0) + neon_dot8_s16(vld1q_s16(bs + 8), m1);
            sum[t] += NEON_XD(t, b) * (d * (float)isum - dmin * (float)msum);
        }
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

/* Q3_K: scale s (6 bits, - 32) has its low 4 bits in nibble s / 8 of scales[s % 8], its high 2
 * in bits 2(s / 4).. of scales[8 + s % 4] (u32 lane s / 4 of the shifted copies below) */
NEON_INLINE void neon_dot_q3_K(int n, const block_q3_K *w, const int TC, const int8_t *xq,
                               const float *xd, float *res) {
    static const int32_t shifts[4] = {0, -2, -4, -6};
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++) {
        int8x16_t q[16];
        neon_pieces_q23_K(w[b].qs, w[b].hmask, q);
        uint8x8_t l8 = vld1_u8(w[b].scales);
        uint32_t h4;
        memcpy(&h4, w[b].scales + 8, 4);
        uint8x16_t lo = vcombine_u8(vand_u8(l8, vdup_n_u8(0x0f)), vshr_n_u8(l8, 4));
        uint32x4_t hi = vandq_u32(vshlq_u32(vdupq_n_u32(h4), vld1q_s32(shifts)), vdupq_n_u32(0x03030303));
        uint8x16_t s6 = vorrq_u8(lo, vshlq_n_u8(vreinterpretq_u8_u32(hi), 4));
        int8x16_t sc = vsubq_s8(vreinterpretq_s8_u8(s6), vdupq_n_s8(32));
        float d = fp16_to_fp32(w[b].d);
        for (int t = 0; t < TC; t++)
            sum[t] += NEON_XD(t, b) * d * (float)neon_isum_K(q, sc, NEON_X(t, b));
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

/* IQ4_XS: sub-block j's nibbles at qs[16j..] (value 32j + i low, 32j + 16 + i high), looked up in
 * the codebook; piece scales ls - 32 */
NEON_INLINE void neon_dot_iq4_xs(int n, const block_iq4_xs *w, const int TC, const int8_t *xq,
                                 const float *xd, float *res) {
    const int8x16_t table = vld1q_s8(KVALUES_IQ4);
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < n / QK_K; b++) {
        int8x16_t q[16];
        for (int j = 0; j < 8; j++) {
            uint8x16_t v = vld1q_u8(w[b].qs + 16 * j);
            q[2 * j] = vqtbl1q_s8(table, vandq_u8(v, vdupq_n_u8(0x0f)));
            q[2 * j + 1] = vqtbl1q_s8(table, vshrq_n_u8(v, 4));
        }
        uint32_t l;
        memcpy(&l, w[b].scales_l, 4);
        int8_t s8[8];
        for (int s = 0; s < 8; s++)          /* low 4 bits: nibble s of scales_l, high 2: bits 2s.. of scales_h */
            s8[s] = (int8_t)((((l >> (4 * s)) & 0x0f) | (((w[b].scales_h >> (2 * s)) & 3) << 4)) - 32);
        int8x16_t sc = neon_twice(vld1_s8(s8));
        float d = fp16_to_fp32(w[b].d);
        for (int t = 0; t < TC; t++)
            sum[t] += d * NEON_XD(t, b) * (float)neon_isum_K(q, sc, NEON_X(t, b));
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}
#undef NEON_X
#undef NEON_XD
#undef NEON_XB

/* ---- 32-blocks . Q8_0 activations (xq, xd, xs of kernels.h; token t at xq + t n, xd + t nb) -- */

/* 0x10 in byte j (0..15) where bit j of `bits` is set */
static inline uint8x16_t neon_bits16(uint32_t bits) {
    static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vandq_u8(vtstq_u8(v, vld1q_u8(sel)), vdupq_n_u8(0x10));
}

/* Q4_1 / Q5_0 / Q5_1 blocks by byte offsets (as vec_dot_q45_q8_0): value j = low nibble of qs[j],
 * value j + 16 its high nibble, bit 4 from bit j of the uint32 qh when there is one */
NEON_INLINE void neon_dot_q45_q8_0(int n, const uint8_t *w, size_t bsize, int qs_at, int qh_at, int m_at,
                                float off, const int TC, const int8_t *xq, const float *xd,
                                const float *xs, float *res) {
    const int nb = n / QK;
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bsize;
        uint8x16_t v = vld1q_u8(blk + qs_at);
        uint8x16_t lo = vandq_u8(v, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(v, 4);
        if (qh_at >= 0) {
            uint32_t h;
            memcpy(&h, blk + qh_at, 4);
            lo = vorrq_u8(lo, neon_bits16(h));
            hi = vorrq_u8(hi, neon_bits16(h >> 16));
        }
        uint16_t dh, mh = 0;
        memcpy(&dh, blk, 2);
        if (m_at >= 0) memcpy(&mh, blk + m_at, 2);
        float d = fp16_to_fp32(dh);
        for (int t = 0; t < TC; t++) {
            const int8_t *x = xq + (size_t)t * n + b * QK;
            int32x4_t p = neon_dot16(neon_dot16(vdupq_n_s32(0), vreinterpretq_s8_u8(lo), vld1q_s8(x)),
                                     vreinterpretq_s8_u8(hi), vld1q_s8(x + 16));
            float xdb = xd[(size_t)t * nb + b], xsb = xs[(size_t)t * nb + b];
            float v1 = d * (xdb * (float)vaddvq_s32(p) - off * xsb);
            if (m_at >= 0) v1 += fp16_to_fp32(mh) * xsb;
            sum[t] += v1;
        }
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

/* IQ4_NL: Q4_0's nibble order, each nibble looked up in the codebook */
NEON_INLINE void neon_dot_iq4_nl(int n, const block_iq4_nl *w, const int TC, const int8_t *xq,
                                 const float *xd, float *res) {
    const int nb = n / QK;
    const int8x16_t table = vld1q_s8(KVALUES_IQ4);
    float sum[4] = {0, 0, 0, 0};
    for (int b = 0; b < nb; b++) {
        uint8x16_t v = vld1q_u8(w[b].qs);
        int8x16_t lo = vqtbl1q_s8(table, vandq_u8(v, vdupq_n_u8(0x0f))), hi = vqtbl1q_s8(table, vshrq_n_u8(v, 4));
        float d = fp16_to_fp32(w[b].d);
        for (int t = 0; t < TC; t++) {
            const int8_t *x = xq + (size_t)t * n + b * QK;
            int32x4_t p = neon_dot16(neon_dot16(vdupq_n_s32(0), lo, vld1q_s8(x)), hi, vld1q_s8(x + 16));
            sum[t] += d * xd[(size_t)t * nb + b] * (float)vaddvq_s32(p);
        }
    }
    for (int t = 0; t < TC; t++) res[t] = sum[t];
}

#endif
#endif
