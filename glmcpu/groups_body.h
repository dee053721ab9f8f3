/* The group kernels (32-value blocks, 256-value super-blocks), written once and included by groups.h for each register
 * width XBITS: 256 (one group of 8 rows) and, on AVX-512, 512 (two adjacent groups, 16 rows).
 * Every lane does the same arithmetic in either width, so two groups in one 512-bit pass equal
 * two 256-bit passes bit for bit. groups.h defines, per width:
 *   XLOAD(o)      32 bytes at offset o of the block column of each group (B0, B1)
 *   XLOAD8(o)     8 bytes at offset o of each group, in one 128-bit register
 *   XSCALES(o)    the groups' 8 (16) fp16 row scales at offset o as floats
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
/* B0, B1: block column b of each group, prefetched PFD bytes ahead on a group's first pass (pf) */
#define XBLOCK(b, bytes) \
    const uint8_t *B0 = w0 + (size_t)(b) * (bytes), *B1 = w1 + (size_t)(b) * (bytes); \
    (void)B1; \
    if (pf) { KPREFETCH(B0 + PFD, (size_t)(bytes)); if (XW == 2) KPREFETCH(B1 + PFD, (size_t)(bytes)); }
#define XKFN XCAT(gemv_k_x8_, XBITS, )

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
        XBLOCK(b, bytes);
        const XI h = x8_five(kind) ? XLOAD(x8_h(kind)) : XSI(setzero)();
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
                const XI v = XLOAD(x8_qs(kind) + 32 * k);
                v0 = XSI(and)(v, m4);
                v1 = XSI(and)(XN(srli_epi16)(v, 4), m4);
                if (x8_five(kind)) {        /* fifth bits, as block_q5_0x8 lays them out */
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
        const XF dw = XSCALES(0), mw = kind == X8_Q5_1 ? XSCALES(16) : dw;    /* Q5_1's mins */
        (void)mw;
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
            if (kind == X8_Q5_1) acc[t] = XN(fmadd_ps)(mw, XN(set1_ps)(xs[t * nb + b]), acc[t]);   /* m * sum(x) */
        }
    }
    for (int t = 0; t < TC; t++) XN(storeu_ps)(out + (size_t)t * ldo, acc[t]);
}



/* Q4_K / IQ4_XS / Q2_K super-blocks of one (two) groups: gemv_k_x8 in groups.h says what it computes */
GLMCPU_INLINE void XKFN(const int kind, int n, const uint8_t *w0, const uint8_t *w1, const int TC,
                        const int8_t *xq, const float *xd, const int16_t *xb, float *out, int ldo, int pf) {
    const int nb = n / QK_K, bytes = kx8_bytes(kind), q4k = kind == X8_Q4_K, sgn = x8_signed(kind);
    const int q2k = kind == X8_Q2_K, dmin = kind != X8_IQ4_XS;       /* mins in float under dmin */
    const XI m2 = XN(set1_epi8)(3), m4s = XN(set1_epi32)(0x0f);
    XF acc[KX8TC];
    for (int t = 0; t < KX8TC; t++) acc[t] = XN(setzero_ps)();
    const XI m4 = XN(set1_epi8)(0x0f), lo16 = XN(set1_epi32)(0xffff);
    const XI table = XBCAST16(sgn ? (const void *)KVALUES_IQ4 : (const void *)KVALUES_IQ4_U);
    (void)w1; (void)lo16; (void)m2; (void)m4s;
    for (int b = 0; b < nb; b++) {
        XBLOCK(b, bytes);
        XI isum[KX8TC];
        for (int t = 0; t < KX8TC; t++) isum[t] = XSI(setzero)();
        if (q2k) {                          /* 16 sub-blocks of 16: each load's 4 crumbs meet 4 slices of x */
            for (int h = 0; h < 2; h++)
                for (int c = 0; c < 4; c++)
                    for (int half = 0; half < 2; half++) {
                        const int sub = 8 * h + 2 * c + half;
                        XI s[KX8TC];
                        for (int t = 0; t < KX8TC; t++) s[t] = XSI(setzero)();
                        for (int k = 4 * half; k < 4 * half + 4; k++) {
                            const XI q = XSI(and)(XN(srli_epi16)(XLOAD(160 + (h * 8 + k) * 32), 2 * c), m2);
                            for (int t = 0; t < TC; t++) {
                                int32_t x4;
                                memcpy(&x4, xq + (size_t)t * n + b * QK_K + 128 * h + 32 * c + 4 * k, 4);
    #if defined(GLMCPU_VNNI)
                                s[t] = XN(dpbusd_epi32)(s[t], q, XN(set1_epi32)(x4));
    #else                       /* 4 pair sums of |3 * 127 * 2| fit int16 */
                                s[t] = XN(add_epi16)(s[t], XN(maddubs_epi16)(q, XN(set1_epi32)(x4)));
    #endif
                                IN_REG(s[t]);
                            }
                        }
                        XI sc = XSI(and)(XN(cvtepu8_epi32)(XLOAD8(32 + 8 * sub)), m4s);
    #if defined(GLMCPU_VNNI)
                        for (int t = 0; t < TC; t++) isum[t] = XN(add_epi32)(isum[t], XN(mullo_epi32)(s[t], sc));
    #else
                        sc = XSI(or)(sc, XN(slli_epi32)(sc, 16));      /* in both int16 halves */
                        for (int t = 0; t < TC; t++) isum[t] = XN(add_epi32)(isum[t], XN(madd_epi16)(s[t], sc));
    #endif
                    }
        } else
        for (int p = 0; p < 4; p++) {
            /* scales of sub-blocks 2p and 2p+1, one per row lane */
            const __m128i r0 = XLOAD8(kx8_sc(kind) + 16 * p), r1 = XLOAD8(kx8_sc(kind) + 16 * p + 8);
            XI sclo = q4k ? XN(cvtepu8_epi32)(r0) : XN(cvtepi8_epi32)(r0);
            XI schi = q4k ? XN(cvtepu8_epi32)(r1) : XN(cvtepi8_epi32)(r1);
#if !defined(GLMCPU_VNNI)
            /* the scale in both int16 halves of its lane, for madd_epi16 */
            sclo = XSI(or)(XSI(and)(sclo, lo16), XN(slli_epi32)(sclo, 16));
            schi = XSI(or)(XSI(and)(schi, lo16), XN(slli_epi32)(schi, 16));
#endif
            XI slo[KX8TC], shi[KX8TC];          /* sub-blocks 2p and 2p+1, per row */
            for (int t = 0; t < KX8TC; t++) slo[t] = shi[t] = XSI(setzero)();
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 4; k++) {      /* one 32-byte load per group, unpacked once for every token */
                    XI v = XLOAD(kx8_qs(kind) + (p * 8 + 4 * h + k) * 32);
                    XI lo = XSI(and)(v, m4), hi = XSI(and)(XN(srli_epi16)(v, 4), m4);
                    if (!q4k) {
                        lo = XN(shuffle_epi8)(table, lo);
                        hi = XN(shuffle_epi8)(table, hi);
                    }
                    const XI alo = sgn ? XN(abs_epi8)(lo) : lo, ahi = sgn ? XN(abs_epi8)(hi) : hi;
                    for (int t = 0; t < TC; t++) {
                        const int8_t *x = xq + (size_t)t * n + b * QK_K + 64 * p + 16 * h + 4 * k;
                        int32_t xl, xh;
                        memcpy(&xl, x, 4);
                        memcpy(&xh, x + 32, 4);
                        const XI bl = XN(set1_epi32)(xl), bh = XN(set1_epi32)(xh);
#if defined(GLMCPU_VNNI)
                        slo[t] = XN(dpbusd_epi32)(slo[t], alo, bl);
                        shi[t] = XN(dpbusd_epi32)(shi[t], ahi, bh);
#else
                        if (sgn) {      /* int16 pairs <= 2 * 127 * 127, scaled into int32 at once */
                            slo[t] = XN(add_epi32)(slo[t], XN(madd_epi16)(XN(maddubs_epi16)(alo, XSIGN(bl, lo)), sclo));
                            shi[t] = XN(add_epi32)(shi[t], XN(madd_epi16)(XN(maddubs_epi16)(ahi, XSIGN(bh, hi)), schi));
                        } else {        /* 8 pair sums of |15 * 128 * 2| fit int16 */
                            slo[t] = XN(add_epi16)(slo[t], XN(maddubs_epi16)(alo, bl));
                            shi[t] = XN(add_epi16)(shi[t], XN(maddubs_epi16)(ahi, bh));
                        }
#endif
                        IN_REG(slo[t]);
                        IN_REG(shi[t]);
                    }
                }
            for (int t = 0; t < TC; t++) {
#if defined(GLMCPU_VNNI)
                isum[t] = XN(add_epi32)(isum[t], XN(add_epi32)(XN(mullo_epi32)(slo[t], sclo), XN(mullo_epi32)(shi[t], schi)));
#else
                isum[t] = XN(add_epi32)(isum[t], sgn ? XN(add_epi32)(slo[t], shi[t])
                                        : XN(add_epi32)(XN(madd_epi16)(slo[t], sclo), XN(madd_epi16)(shi[t], schi)));
#endif
            }
        }
        /* Q4_K's and Q2_K's mins, or IQ4_XS's offset (128 * its scales), through the 16-sums of the
         * activations: sum over sub-blocks j of c[j][r] * (sum of j's activations), as int16 pairs
         * of sub-blocks 2i, 2i+1 (Q2_K: 16 sub-blocks of 16, the others 8 of 32) */
        const int npair = q2k ? 8 : 4, per = q2k ? 1 : 2;
        XI mv[8];
        for (int i = 0; i < npair && !sgn; i++) {
            XI c[2];
            for (int h = 0; h < 2; h++) {
                const __m128i r = XLOAD8((q2k ? 32 : q4k ? 96 : kx8_sc(kind)) + 8 * (2 * i + h));
                c[h] = q2k ? XN(srli_epi32)(XN(cvtepu8_epi32)(r), 4) : q4k ? XN(cvtepu8_epi32)(r)
                     : XSI(and)(XN(cvtepi8_epi32)(r), lo16);
            }
            mv[i] = XSI(or)(c[0], XN(slli_epi32)(c[1], 16));
        }
        const XF dw = XSCALES(0), dmw = dmin ? XSCALES(16) : dw;
        for (int t = 0; t < TC; t++) {
            const XF dx = XN(set1_ps)(xd[(size_t)t * nb + b]);
            XI s = isum[t];
            if (!sgn) {
                const int16_t *bs = xb + (size_t)t * (n / 16) + 16 * b;
                XI mi = XSI(setzero)();
                for (int i = 0; i < npair; i++) {
                    const int lo = per == 1 ? bs[2 * i] : bs[4 * i] + bs[4 * i + 1];
                    const int hi = per == 1 ? bs[2 * i + 1] : bs[4 * i + 2] + bs[4 * i + 3];
                    const uint32_t pair = (uint16_t)lo | ((uint32_t)(uint16_t)hi << 16);
                    mi = XN(add_epi32)(mi, XN(madd_epi16)(mv[i], XN(set1_epi32)((int32_t)pair)));
                }
                if (dmin) acc[t] = XN(fnmadd_ps)(XN(mul_ps)(dmw, dx), XN(cvtepi32_ps)(mi), acc[t]);
                else s = XN(sub_epi32)(s, XN(slli_epi32)(mi, 7));
            }
            acc[t] = XN(fmadd_ps)(XN(mul_ps)(dw, dx), XN(cvtepi32_ps)(s), acc[t]);
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
#undef XBLOCK
#undef XKFN
#undef XLOAD8
#undef XBITS
#undef XLOAD
#undef XSCALES
#undef XSIGN
