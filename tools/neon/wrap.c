/* Exposes kernels.h under a prefix, so one binary holds the NEON build and its scalar twin. */
#include <stdlib.h>
#include "kernels.h"
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
const char *CAT(PFX, isa)(void) { return GLMCPU_ISA; }
void CAT(PFX, quant)(int n, const float *x, int8_t *q, float *d, float *s) { quantize_row_q8(n, x, q, d, s); }
float CAT(PFX, q4_0)(int n, const void *w, const int8_t *q, const float *d, const float *s) {
    return vec_dot_q4_0_q8_0(n, w, q, d, s);
}
float CAT(PFX, q8_0)(int n, const void *w, const int8_t *q, const float *d) { return vec_dot_q8_0_q8_0(n, w, q, d); }
float CAT(PFX, f16)(int n, const void *w, const float *x) { return vec_dot_float(GT_F16, n, w, x); }
float CAT(PFX, bf16)(int n, const void *w, const float *x) { return vec_dot_float(GT_BF16, n, w, x); }
float CAT(PFX, f32)(int n, const void *w, const float *x) { return vec_dot_float(GT_F32, n, w, x); }
void CAT(PFX, q4_0x4)(int n, const void *w, const int8_t *q, const float *d, const float *s, float *r) {
    vec_dot4_q4_0_q8_0(n, w, q, d, s, r);
}
/* 1 where the vdotq_s32 path is compiled in */
int CAT(PFX, dotprod)(void) {
#if defined(__ARM_FEATURE_DOTPROD)
    return 1;
#else
    return 0;
#endif
}
void CAT(PFX, quant_K)(int n, const float *x, int8_t *q, float *d, int16_t *b) { quantize_row_q8_K(n, x, q, d, b); }
/* R rows of any type against T tokens through the engine's own dispatch (gemm_rows: 4-token
 * chunks, then the rest), out[t*R + r]; xs is the int16 sums of q8_K for the K-quants */
void CAT(PFX, rows)(int type, int n, const void *w, size_t row_bytes, int R, int T, const int8_t *xq,
                    const float *xd, const void *xs, float *out) {
    gemm_rows(type, n, w, row_bytes, 0, R, T, NULL, xq, xd, xs, out, R);
}
/* Attention of q [T][Hkv*G][D] over KV rows of types kt, vt ([Hkv][S] rows, S = pos0 + T), one
 * thread: every (tile of tokens, KV head) by attn_tile. */
void CAT(PFX, attention)(int T, int Hkv, int G, int D, int pos0, int kt, int vt, const float *q, const void *k,
                        const void *v, float *out) {
    attn_args a;
    const int S = pos0 + T;
    a.q = q; a.q_t = (ptrdiff_t)Hkv * G * D; a.q_h = D;
    a.k = k; a.v = v; a.kt = kt; a.vt = vt;
    a.k_p = kv_row_bytes(kt, D); a.k_h = a.k_p * S; a.v_p = kv_row_bytes(vt, D); a.v_h = a.v_p * S;
    a.out = out; a.o_t = a.q_t; a.o_h = D;
    a.T = T; a.Hkv = Hkv; a.G = G; a.D = D; a.pos0 = pos0; a.scale = 0.125f;
    float *work = malloc(sizeof(float) * (attn_tile_floats(&a) + 64));
    const int tile = attn_tile_tokens(G);
    for (int t = 0; t < T; t += tile)
        for (int j = 0; j < Hkv; j++) attn_tile(&a, t, t + tile < T ? t + tile : T, j, work);
    free(work);
}
