/* Exposes kernels.h under a prefix, so one binary holds the NEON build and its scalar twin. */
#include "kernels.h"
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
const char *CAT(PFX, isa)(void) { return GLMCPU_ISA; }
void CAT(PFX, quant)(int n, const float *x, int8_t *q, float *d, float *s) { quantize_row_q8(n, x, q, d, s); }
float CAT(PFX, q4_0)(int n, const void *w, const int8_t *q, const float *d, const float *s) {
    return vec_dot_q4_0_q8_0(n, w, q, d, s);
}
float CAT(PFX, q8_0)(int n, const void *w, const int8_t *q, const float *d) { return vec_dot_q8_0_q8_0(n, w, q, d); }
float CAT(PFX, f16)(int n, const void *w, const float *x) { return vec_dot_f16_f32(n, w, x); }
float CAT(PFX, bf16)(int n, const void *w, const float *x) { return vec_dot_bf16_f32(n, w, x); }
float CAT(PFX, f32)(int n, const void *w, const float *x) { return vec_dot_f32_f32(n, w, x); }
void CAT(PFX, q4_0x4)(int n, const void *w, const int8_t *q, const float *d, const float *s, float *r) {
    vec_dot4_q4_0_q8_0(n, w, q, d, s, r);
}
