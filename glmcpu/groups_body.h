/* The 32-value-block group kernel, written once and included by groups.h for each register
 * width XBITS: 256 (one group of 8 rows) and, on AVX-512, 512 (two adjacent groups, 16 rows).
 * Every lane does the same arithmetic in either width, so two groups in one 512-bit pass equal
 * two 256-bit passes bit for bit. groups.h defines, per width:
 *   XLOAD(o)      32 bytes at offset o of the block column of each group (B0, B1)
 *   XSCALES()     the groups' 8 (16) fp16 row scales as floats
 *   XSIGN(x, v)   x negated where v < 0 (AVX2's sign_epi8; v is never 0 where it matters)
 * and the rest follows from the width's intrinsic names. */
#define XCAT_(a, b, c) a##b##c
#define XCAT(a, b, c) XCAT_(a, b, c)
#define XW (XBITS / 256)                          /* groups per register */
#define XI XCAT(__m, XBITS, i)
#define XF XCAT(__m, XBITS, )
#define XN(op) XCAT(_mm, XBITS, _##op)            /* _mm256_op / _mm512_op */
#if XBITS == 256
#define XSI(op) _mm256_##op##_si256                /* and, or, setzero */
#define XBCAST16(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p)))
#else
#define XSI(op) _mm512_##op##_si512
#define XBCAST16(p) _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p)))
#endif
#define XFN XCAT(gemv_x8_, XBITS, )

GLMCPU_INLINE void XFN(const int kind, int n, const uint8_t *w0, const uint8_t *w1, const int TC,
                       const int8_t *xq, const float *xd, const float *xs, float *out, int ldo, int pf) {
    const int nb = n / QK, bytes = x8_bytes(kind), sgn = x8_signed(kind), one_chain = x8_one_chain(kind);
    const float off = x8_offset(kind);
    const XI m4 = XN(set1_epi8)(0x0f), m5 = XN(set1_epi8)(0x10), ones = XN(set1_epi16)(1);
    const XI table = XBCAST16(sgn ? (const void *)KVALUES_IQ4 : (const void *)KVALUES_IQ4_U);
    XF acc[TCMAX];
    for (int t = 0; t < TCMAX; t++) acc[t] = XN(setzero_ps)();
    (void)w1; (void)ones; (void)m5; (void)table; (void)one_chain;
    for (int b = 0; b < nb; b++) {
        const uint8_t *B0 = w0 + (size_t)b * bytes, *B1 = w1 + (size_t)b * bytes;
        (void)B1;
        if (pf) {
            KPREFETCH(B0 + PFD, (size_t)bytes);
            if (XW == 2) KPREFETCH(B1 + PFD, (size_t)bytes);
        }
        const XI h = kind == X8_Q5_0 ? XLOAD(16) : XSI(setzero)();
        /* k outer, each token's sums in registers: sa takes the values meeting activations 4k..4k+3,
         * sb those meeting 16+4k..16+4k+3 (in int16 without VNNI where they fit, see x8_one_chain) */
        XI sa[TCMAX], sb[TCMAX];
        for (int t = 0; t < TC; t++) sa[t] = sb[t] = XSI(setzero)();
        for (int k = 0; k < 4; k++) {
            XI v0, v1;
            if (kind == X8_Q8_0) {
                v0 = XLOAD(16 + 32 * k);
                v1 = XLOAD(16 + 32 * (k + 4));
            } else {
                const XI v = XLOAD(16 + (kind == X8_Q5_0 ? 32 : 0) + 32 * k);
                v0 = XSI(and)(v, m4);
                v1 = XSI(and)(XN(srli_epi16)(v, 4), m4);
                if (kind == X8_Q5_0) {      /* fifth bits, as block_q5_0x8 lays them out */
                    v0 = XSI(or)(v0, XSI(and)(XN(slli_epi32)(h, 4 - k), m5));
                    v1 = XSI(or)(v1, XSI(and)(XN(srli_epi32)(h, k), m5));
                }
                if (kind == X8_IQ4_NL) {
                    v0 = XN(shuffle_epi8)(table, v0);
                    v1 = XN(shuffle_epi8)(table, v1);
                }
            }
            const XI a0 = sgn ? XN(abs_epi8)(v0) : v0, a1 = sgn ? XN(abs_epi8)(v1) : v1;
            for (int t = 0; t < TC; t++) {
                const int8_t *x = xq + (size_t)t * n + b * QK;
                int32_t xl, xh;
                memcpy(&xl, x + 4 * k, 4);
                memcpy(&xh, x + 16 + 4 * k, 4);
                XI bl = XN(set1_epi32)(xl), bh = XN(set1_epi32)(xh);
                if (sgn) {                  /* |w| . (x with w's sign): the u8 x s8 products */
                    bl = XSIGN(bl, v0);
                    bh = XSIGN(bh, v1);
                }
#if defined(GLMCPU_VNNI)
                sa[t] = XN(dpbusd_epi32)(sa[t], a0, bl);
                sb[t] = XN(dpbusd_epi32)(sb[t], a1, bh);
#else
                if (sgn) {                  /* pairs of |127 * 127 * 2| fit int16, two of them not */
                    sa[t] = XN(add_epi32)(sa[t], XN(madd_epi16)(XN(maddubs_epi16)(a0, bl), ones));
                    sb[t] = XN(add_epi32)(sb[t], XN(madd_epi16)(XN(maddubs_epi16)(a1, bh), ones));
                } else if (one_chain) {
                    sa[t] = XN(add_epi16)(sa[t], XN(maddubs_epi16)(a0, bl));
                    sa[t] = XN(add_epi16)(sa[t], XN(maddubs_epi16)(a1, bh));
                } else {
                    sa[t] = XN(add_epi16)(sa[t], XN(maddubs_epi16)(a0, bl));
                    sb[t] = XN(add_epi16)(sb[t], XN(maddubs_epi16)(a1, bh));
                }
#endif
                IN_REG(sa[t]);
                IN_REG(sb[t]);
            }
        }
        const XF dw = XSCALES();
        for (int t = 0; t < TC; t++) {
            XI s32;
#if defined(GLMCPU_VNNI)
            s32 = XN(add_epi32)(sa[t], sb[t]);
#else
            s32 = sgn ? XN(add_epi32)(sa[t], sb[t])
                : one_chain ? XN(madd_epi16)(sa[t], ones)
                : XN(add_epi32)(XN(madd_epi16)(sa[t], ones), XN(madd_epi16)(sb[t], ones));
#endif
            /* unsigned values carry an offset: the sum of (q - off) x = sum(q x) - off * sum(x) */
            const XF v = XN(fmsub_ps)(XN(set1_ps)(xd[t * nb + b]), XN(cvtepi32_ps)(s32),
                                      XN(set1_ps)(off * xs[t * nb + b]));
            acc[t] = XN(fmadd_ps)(dw, v, acc[t]);
        }
    }
    for (int t = 0; t < TC; t++) XN(storeu_ps)(out + (size_t)t * ldo, acc[t]);
}

#undef XCAT_
#undef XCAT
#undef XW
#undef XI
#undef XF
#undef XN
#undef XSI
#undef XBCAST16
#undef XFN
#undef XBITS
#undef XLOAD
#undef XSCALES
#undef XSIGN
