"""CUDA C kernels for NVIDIA GPUs, as source text compiled at run time by NVRTC (through CuPy).

The sources include no headers (the NVRTC wheel on PyPI ships none): they name their own integer
types and move halves as their 16 bits, converted with PTX's `cvt`. Weights stay in the GGUF
file's block layouts (../shared/SPEC.md, gguf-py's `gguf.quants`): a GPU holds no dequantised copy.
Decode-shaped products (a few tokens) quantise the activations to Q8_1-style blocks of 32 and
multiply with __dp4a; prefill dequantises tiles of a weight to half for cupy.matmul.

Kernel names carry their operand types in ggml order (`gemv_q4_0_q8_1`). The block decoders
(`PRELUDE` + `BLOCKS`) are plain C++ too: tests/test_gpu.py builds them with the host compiler and
checks them against gguf.quants, so a layout slip shows up without a GPU."""
from gguf import GGMLQuantizationType as GT

GEMV_MAX_T = 8          # tokens one gemv call multiplies (weights read once for all of them)
GEMV_WARPS = 4          # rows per gemv block: one warp per row
ATT_WARPS = 4           # warps sharing one attention head's positions
ATT_MAX_D = 256         # the largest head_dim the attention kernels take (a multiple of 32)
TILE_ROWS = 4096        # rows of a weight dequantised to half at a time for a prefill product
NVRTC_OPTIONS = ("-std=c++17",)

# the ggml types the kernels read: file type -> (name in kernel names, values per block, bytes per block)
TYPES = {
    GT.Q4_0: ("q4_0", 32, 18),
    GT.Q8_0: ("q8_0", 32, 34),
    GT.Q5_0: ("q5_0", 32, 22),
    GT.Q4_K: ("q4_K", 256, 144),
    GT.Q6_K: ("q6_K", 256, 210),
    GT.F16: ("f16", 1, 2),
    GT.F32: ("f32", 1, 4),
}
QUANTISED = tuple(t for t in TYPES if TYPES[t][1] > 1)     # multiplied with Q8_1 activations
Q8_1_BYTES = 40         # an activation block: float d, float s, 32 int8


PRELUDE = r"""
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

#if defined(__CUDACC__)
#define DEV __device__ __forceinline__
DEV float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
DEV u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#else   /* the host build of the block decoders, for tests without a GPU */
#define DEV inline
inline float h2f(u16 h) {
    u32 sign = (u32)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) { float f = man * (1.0f / 16777216.0f); return sign ? -f : f; }   /* subnormal: man * 2^-24 */
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
    float f; __builtin_memcpy(&f, &bits, 4); return f;
}
inline int __dp4a(int a, int b, int c) {          /* four signed byte products added to c */
    for (int i = 0; i < 4; i++) c += (int)(i8)(a >> 8 * i) * (int)(i8)(b >> 8 * i);
    return c;
}
#endif

/* 4 bytes at a 2-byte aligned address (blocks of 18, 22, 34 and 210 bytes sit at even addresses) */
DEV u32 load_u32(const u8* p) {
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}
"""

BLOCKS = r"""
/* Q4_0: 32 weights; weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble;
   w = (q - 8) * d */
struct block_q4_0 { u16 d; u8 qs[16]; };
static_assert(sizeof(block_q4_0) == 18, "Q4_0 block");
/* Q8_0: w = qs[j] * d */
struct block_q8_0 { u16 d; i8 qs[32]; };
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block");
/* Q5_0: the nibbles of Q4_0, and bit j of qh as bit 4 of weight j; w = (q - 16) * d */
struct block_q5_0 { u16 d; u8 qh[4]; u8 qs[16]; };
static_assert(sizeof(block_q5_0) == 22, "Q5_0 block");
/* Q4_K: 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and min packed in scales[12];
   bytes qs[32i .. 32i+31] hold sub-block 2i in their low nibbles, 2i+1 in their high ones;
   w = d * sc * q - dmin * m */
struct block_q4_K { u16 d; u16 dmin; u8 scales[12]; u8 qs[128]; };
static_assert(sizeof(block_q4_K) == 144, "Q4_K block");
/* Q6_K: 256 weights in 16 sub-blocks of 16 with int8 scales; the low 4 bits of q in ql, the high
   2 in qh (see value() for which); w = d * sc * (q - 32) */
struct block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; u16 d; };
static_assert(sizeof(block_q6_K) == 210, "Q6_K block");
/* activations, quantised per 32 on the GPU: x = qs * d; s = d * sum(qs) pays Q4_0's, Q5_0's and
   Q4_K's offsets in one multiply */
struct block_q8_1 { float d; float s; i8 qs[32]; };
static_assert(sizeof(block_q8_1) == 40, "Q8_1 block");

/* One struct per weight type: value(row, e) is weight e of a row (for dequantising), dot(row, g, x)
   the product of the row's weights 32g .. 32g+31 with the activation block x. */

struct Q4_0 {
    static const int QK = 32, BYTES = 18;
    static DEV float value(const u8* row, int e) {
        const block_q4_0* b = (const block_q4_0*)row + e / 32;
        const int j = e % 32, q = j < 16 ? b->qs[j] & 15 : b->qs[j - 16] >> 4;
        return (q - 8) * h2f(b->d);
    }
    static DEV float dot(const u8* row, int g, const block_q8_1* x) {
        const block_q4_0* b = (const block_q4_0*)row + g;
        const int* xq = (const int*)x->qs;
        int sumi = 0;
        for (int i = 0; i < 4; i++) {
            const u32 q = load_u32(b->qs + 4 * i);                          /* weights 4i.. and 16+4i.. */
            sumi = __dp4a((int)(q & 0x0F0F0F0F), xq[i], sumi);
            sumi = __dp4a((int)((q >> 4) & 0x0F0F0F0F), xq[4 + i], sumi);
        }
        return h2f(b->d) * (x->d * sumi - 8.0f * x->s);
    }
};

struct Q8_0 {
    static const int QK = 32, BYTES = 34;
    static DEV float value(const u8* row, int e) {
        const block_q8_0* b = (const block_q8_0*)row + e / 32;
        return b->qs[e % 32] * h2f(b->d);
    }
    static DEV float dot(const u8* row, int g, const block_q8_1* x) {
        const block_q8_0* b = (const block_q8_0*)row + g;
        const int* xq = (const int*)x->qs;
        int sumi = 0;
        for (int i = 0; i < 8; i++)
            sumi = __dp4a((int)load_u32((const u8*)b->qs + 4 * i), xq[i], sumi);
        return h2f(b->d) * x->d * sumi;
    }
};

/* bits 0..3 of b as bit 4 of each of four bytes */
DEV u32 spread4(u32 b) {
    return ((b & 1) << 4) | ((b & 2) << 11) | ((b & 4) << 18) | ((b & 8) << 25);
}

struct Q5_0 {
    static const int QK = 32, BYTES = 22;
    static DEV float value(const u8* row, int e) {
        const block_q5_0* b = (const block_q5_0*)row + e / 32;
        const int j = e % 32, lo = j < 16 ? b->qs[j] & 15 : b->qs[j - 16] >> 4;
        const int hi = (load_u32(b->qh) >> j) & 1;
        return ((lo | hi << 4) - 16) * h2f(b->d);
    }
    static DEV float dot(const u8* row, int g, const block_q8_1* x) {
        const block_q5_0* b = (const block_q5_0*)row + g;
        const int* xq = (const int*)x->qs;
        const u32 qh = load_u32(b->qh);
        int sumi = 0;
        for (int i = 0; i < 4; i++) {
            const u32 q = load_u32(b->qs + 4 * i);
            sumi = __dp4a((int)((q & 0x0F0F0F0F) | spread4(qh >> 4 * i)), xq[i], sumi);
            sumi = __dp4a((int)(((q >> 4) & 0x0F0F0F0F) | spread4(qh >> (16 + 4 * i))), xq[4 + i], sumi);
        }
        return h2f(b->d) * (x->d * sumi - 16.0f * x->s);
    }
};

/* scale and min of Q4_K sub-block j (ggml's get_scale_min_k4) */
DEV void scale_min_k4(int j, const u8* s, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

struct Q4_K {
    static const int QK = 256, BYTES = 144;
    static DEV float value(const u8* row, int e) {
        const block_q4_K* b = (const block_q4_K*)row + e / 256;
        const int i = e % 256, sub = i / 32;
        int sc, m;
        scale_min_k4(sub, b->scales, sc, m);
        const int q = (b->qs[32 * (sub / 2) + i % 32] >> 4 * (sub % 2)) & 15;
        return h2f(b->d) * sc * q - h2f(b->dmin) * m;
    }
    static DEV float dot(const u8* row, int g, const block_q8_1* x) {
        const block_q4_K* b = (const block_q4_K*)row + g / 8;
        const int sub = g % 8, shift = 4 * (sub % 2);
        const u8* qs = b->qs + 32 * (sub / 2);
        const int* xq = (const int*)x->qs;
        int sc, m, sumi = 0;
        scale_min_k4(sub, b->scales, sc, m);
        for (int i = 0; i < 8; i++)
            sumi = __dp4a((int)((load_u32(qs + 4 * i) >> shift) & 0x0F0F0F0F), xq[i], sumi);
        return h2f(b->d) * sc * x->d * sumi - h2f(b->dmin) * m * x->s;
    }
};

/* Q6_K weight i of a block: half h = i / 128 and quarter k = i % 128 / 32 of it, l = i % 32; the
   low bits are nibble k / 2 of ql[64h + 32(k % 2) + l], the high ones bits 2k, 2k+1 of qh[32h + l],
   the scale scales[8h + 2k + l / 16] */
struct Q6_K {
    static const int QK = 256, BYTES = 210;
    static DEV float value(const u8* row, int e) {
        const block_q6_K* b = (const block_q6_K*)row + e / 256;
        const int i = e % 256, h = i / 128, k = i % 128 / 32, l = i % 32;
        const int lo = (b->ql[64 * h + 32 * (k % 2) + l] >> 4 * (k / 2)) & 15;
        const int hi = (b->qh[32 * h + l] >> 2 * k) & 3;
        return h2f(b->d) * b->scales[8 * h + 2 * k + l / 16] * ((lo | hi << 4) - 32);
    }
    static DEV float dot(const u8* row, int g, const block_q8_1* x) {
        const block_q6_K* b = (const block_q6_K*)row + g / 8;
        const int h = g % 8 / 4, k = g % 4;                         /* 32 weights: quarter k of half h */
        const u8* ql = b->ql + 64 * h + 32 * (k % 2);
        const u8* qh = b->qh + 32 * h;
        const int* xq = (const int*)x->qs;
        int sum[2] = {0, 0};                                        /* the two sub-blocks of 16 */
        for (int i = 0; i < 8; i++) {
            const u32 q = ((load_u32(ql + 4 * i) >> 4 * (k / 2)) & 0x0F0F0F0F)
                        | (((load_u32(qh + 4 * i) >> 2 * k) & 0x03030303) << 4);   /* four q of 0..63 */
            sum[i / 4] += __dp4a((int)q, xq[i], 0) - 32 * __dp4a(0x01010101, xq[i], 0);
        }
        const i8* sc = b->scales + 8 * h + 2 * k;
        return h2f(b->d) * x->d * (sc[0] * sum[0] + sc[1] * sum[1]);
    }
};

struct F16 {
    static const int QK = 1, BYTES = 2;
    static DEV float value(const u8* row, int e) { return h2f(((const u16*)row)[e]); }
};

struct F32 {
    static const int QK = 1, BYTES = 4;
    static DEV float value(const u8* row, int e) { return ((const float*)row)[e]; }
};
"""

# everything below runs on the GPU only
DEVICE = f"""
#define GEMV_MAX_T {GEMV_MAX_T}
#define GEMV_WARPS {GEMV_WARPS}
#define ATT_WARPS {ATT_WARPS}
#define ATT_MAX_D {ATT_MAX_D}
""" + r"""
#define NEG_INF __int_as_float(0xff800000)

DEV float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
DEV int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
DEV float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
/* the sum of v over a block of up to 1024 threads, in every thread */
DEV float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();                    /* part[] may still be read by a previous call */
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x + 31) / 32 ? part[lane] : 0.0f;
    return warp_sum(v);
}
"""

MATVEC = r"""
/* x [n_blocks * 32] (rows whose length is a multiple of 32, back to back) -> Q8_1 blocks; one warp
   per block, blockDim 128 */
extern "C" __global__ void quantize_q8_1_f32(const float* x, block_q8_1* y, long long n_blocks) {
    const long long b = blockIdx.x * 4LL + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (b >= n_blocks) return;
    const float v = x[b * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : __float2int_rn(v / d);
    y[b].qs[lane] = (i8)q;
    const int s = warp_sum_int(q);
    if (lane == 0) {
        y[b].d = d;
        y[b].s = d * s;
    }
}

/* y[t, r] = W[r] . x[t] for t < T <= GEMV_MAX_T: w [n_out, row bytes] in W's blocks, x [T, n_in / 32]
   Q8_1 blocks, y [T, n_out]; one warp per row (blockDim 32 * GEMV_WARPS), lanes over its groups of 32 */
template <class W>
DEV void gemv_rows(const u8* w, const block_q8_1* x, float* y, int n_in, int n_out, int T) {
    const int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n_out) return;
    const int groups = n_in / 32;
    const u8* wr = w + (long long)row * (n_in / W::QK) * W::BYTES;
    float acc[GEMV_MAX_T] = {0};
    for (int g = lane; g < groups; g += 32) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; t++)
            if (t < T) acc[t] += W::dot(wr, g, x + (long long)t * groups + g);
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; t++) {
        const float s = warp_sum(acc[t]);
        if (t < T && lane == 0) y[(long long)t * n_out + row] = s;
    }
}

/* the same over float activations x [T, n_in], for F16 and F32 weights */
template <class W>
DEV void gemv_float_rows(const u8* w, const float* x, float* y, int n_in, int n_out, int T) {
    const int row = blockIdx.x * GEMV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n_out) return;
    const u8* wr = w + (long long)row * n_in * W::BYTES;
    float acc[GEMV_MAX_T] = {0};
    for (int e = lane; e < n_in; e += 32) {
        const float v = W::value(wr, e);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; t++)
            if (t < T) acc[t] += v * x[(long long)t * n_in + e];
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; t++) {
        const float s = warp_sum(acc[t]);
        if (t < T && lane == 0) y[(long long)t * n_out + row] = s;
    }
}

/* gemv of one token over experts: w [n_expert, n_out, row bytes]; slot r = blockIdx.y multiplies
   expert ids[r] with x + r * x_step (the slot's input) into y [slots, n_out] */
#define GEMV(name, W) \
extern "C" __global__ void gemv_##name##_q8_1(const u8* w, const block_q8_1* x, float* y, \
                                              int n_in, int n_out, int T) { \
    gemv_rows<W>(w, x, y, n_in, n_out, T); \
} \
extern "C" __global__ void gemv_experts_##name##_q8_1(const u8* w, const int* ids, const block_q8_1* x, \
                                                      int x_step, float* y, int n_in, int n_out) { \
    const long long expert = (long long)n_out * (n_in / W::QK) * W::BYTES; \
    gemv_rows<W>(w + ids[blockIdx.y] * expert, x + blockIdx.y * (long long)x_step, \
                 y + blockIdx.y * (long long)n_out, n_in, n_out, 1); \
}
#define GEMV_FLOAT(name, W) \
extern "C" __global__ void gemv_##name##_f32(const u8* w, const float* x, float* y, int n_in, int n_out, int T) { \
    gemv_float_rows<W>(w, x, y, n_in, n_out, T); \
} \
extern "C" __global__ void gemv_experts_##name##_f32(const u8* w, const int* ids, const float* x, \
                                                     int x_step, float* y, int n_in, int n_out) { \
    const long long expert = (long long)n_out * n_in * W::BYTES; \
    gemv_float_rows<W>(w + ids[blockIdx.y] * expert, x + blockIdx.y * (long long)x_step, \
                       y + blockIdx.y * (long long)n_out, n_in, n_out, 1); \
}
GEMV(q4_0, Q4_0)
GEMV(q8_0, Q8_0)
GEMV(q5_0, Q5_0)
GEMV(q4_K, Q4_K)
GEMV(q6_K, Q6_K)
GEMV_FLOAT(f16, F16)
GEMV_FLOAT(f32, F32)
"""

DEQUANT = r"""
/* n values (rows of n_in, back to back) of w to halves y [n]: a tile of a weight for cupy.matmul */
template <class W>
DEV void dequantize_rows(const u8* w, u16* y, int n_in, long long n) {
    const long long row_bytes = (long long)(n_in / W::QK) * W::BYTES;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = f2h(W::value(w + i / n_in * row_bytes, (int)(i % n_in)));
}
#define DEQUANTIZE(name, W) \
extern "C" __global__ void dequantize_##name##_f16(const u8* w, u16* y, int n_in, long long n) { \
    dequantize_rows<W>(w, y, n_in, n); \
}
DEQUANTIZE(q4_0, Q4_0)
DEQUANTIZE(q8_0, Q8_0)
DEQUANTIZE(q5_0, Q5_0)
DEQUANTIZE(q4_K, Q4_K)
DEQUANTIZE(q6_K, Q6_K)
DEQUANTIZE(f16, F16)
DEQUANTIZE(f32, F32)
"""

NORM_ROPE = r"""
/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r = blockIdx.x of n values (x, y [rows, n]) */
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* y, int n, float eps) {
    x += (long long)blockIdx.x * n;
    y += (long long)blockIdx.x * n;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) ss += x[j] * x[j];
    const float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) y[j] = x[j] * r * w[j];
}

/* RoPE in place on the first 2 * half dims of every head of x: token t's heads start at
   x + t * stride (q or k inside a fused q|k|v row), H heads of D; the angles come from the tables
   cos_t, sin_t [positions, half] at row pos[t] (the CPU's tables). One thread per rotated pair. */
template <bool NEOX>
DEV void rope(float* x, long long stride, const int* pos, const float* cos_t, const float* sin_t,
              int T, int H, int D, int half) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)T * H * half) return;
    const int i = idx % half, h = idx / half % H, t = idx / half / H;
    float* v = x + t * stride + (long long)h * D;
    const int a = NEOX ? i : 2 * i, b = NEOX ? i + half : 2 * i + 1;
    const float c = cos_t[(long long)pos[t] * half + i], s = sin_t[(long long)pos[t] * half + i];
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x1 * c + x0 * s;
}
/* chatglm, glm4: pairs (2i, 2i+1) */
extern "C" __global__ void rope_adjacent_f32(float* x, long long stride, const int* pos, const float* cos_t,
                                             const float* sin_t, int T, int H, int D, int half) {
    rope<false>(x, stride, pos, cos_t, sin_t, T, H, D, half);
}
/* glm4moe: pairs (i, i + half) */
extern "C" __global__ void rope_neox_f32(float* x, long long stride, const int* pos, const float* cos_t,
                                         const float* sin_t, int T, int H, int D, int half) {
    rope<true>(x, stride, pos, cos_t, sin_t, T, H, D, half);
}
"""

ATTENTION = r"""
/* out[D] = softmax(scale * q . k[p]) . v[p] over positions p < n_pos of one KV head (k, v
   [positions, D]); D a multiple of 32 up to ATT_MAX_D. One block of ATT_WARPS warps: each warp
   keeps an online softmax over every ATT_WARPS-th position, lane j holding dims j, j+32, ...;
   the warps' partial results are merged at the end. */
DEV void attend(const float* q, const float* k, const float* v, int n_pos, int D, float scale, float* out) {
    __shared__ float w_max[ATT_WARPS], w_sum[ATT_WARPS], w_acc[ATT_WARPS][ATT_MAX_D];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nd = D / 32;
    float qr[ATT_MAX_D / 32], acc[ATT_MAX_D / 32];
#pragma unroll
    for (int j = 0; j < ATT_MAX_D / 32; j++) {
        qr[j] = j < nd ? q[lane + 32 * j] * scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = warp; p < n_pos; p += ATT_WARPS) {
        const float* kp = k + (long long)p * D;
        const float* vp = v + (long long)p * D;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < ATT_MAX_D / 32; j++)
            if (j < nd) s += qr[j] * kp[lane + 32 * j];
        s = warp_sum(s);
        const float m_new = fmaxf(m, s), keep = expf(m - m_new), e = expf(s - m_new);
        l = l * keep + e;
#pragma unroll
        for (int j = 0; j < ATT_MAX_D / 32; j++)
            if (j < nd) acc[j] = acc[j] * keep + e * vp[lane + 32 * j];
        m = m_new;
    }
    if (lane == 0) {
        w_max[warp] = m;
        w_sum[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < ATT_MAX_D / 32; j++)
        if (j < nd) w_acc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float mx = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, w_max[w]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float total = 0.0f, o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            const float f = expf(w_max[w] - mx);        /* 0 for a warp that saw no position */
            total += w_sum[w] * f;
            o += w_acc[w][d] * f;
        }
        out[d] = o / total;
    }
}

/* one new token: q, out [Hq, D]; the layer's cache k, v [Hkv, n_ctx, D] filled up to n_pos;
   KV head j serves query heads j*G .. j*G+G-1. Grid Hq, blockDim 32 * ATT_WARPS. */
extern "C" __global__ void attention_decode_f32(const float* q, const float* k, const float* v, float* out,
                                                int n_pos, int Hq, int Hkv, int n_ctx, int D, float scale) {
    const int h = blockIdx.x, j = h / (Hq / Hkv);
    attend(q + (long long)h * D, k + (long long)j * n_ctx * D, v + (long long)j * n_ctx * D,
           n_pos, D, scale, out + (long long)h * D);
}

/* T tokens at positions pos0 .. pos0+T-1, each attending causally to positions <= its own: token t's
   q heads at q + t * q_stride (inside a fused q|k|v row), out [T, Hq, D]; the cache holds the T
   tokens' keys and values already. Grid (Hq, T), blockDim 32 * ATT_WARPS. */
extern "C" __global__ void attention_prefill_f32(const float* q, long long q_stride, const float* k,
                                                 const float* v, float* out, int pos0, int Hq, int Hkv,
                                                 int n_ctx, int D, float scale) {
    const int h = blockIdx.x, t = blockIdx.y, j = h / (Hq / Hkv);
    attend(q + t * q_stride + (long long)h * D, k + (long long)j * n_ctx * D, v + (long long)j * n_ctx * D,
           pos0 + t + 1, D, scale, out + ((long long)t * Hq + h) * D);
}
"""

FFN_MOE = r"""
/* y [T, F] = silu(gate) * up; token t's gate and up values start at gate + t * stride, up + t * stride
   (a fused [gate | up] row: up = gate + F, stride = 2F) */
extern "C" __global__ void silu_mul_f32(const float* gate, const float* up, long long stride, float* y,
                                        int T, int F) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= (long long)T * F) return;
    const long long t = i / F, j = i % F;
    const float g = gate[t * stride + j];
    y[i] = g / (1.0f + expf(-g)) * up[t * stride + j];
}

/* (value, index) of the warp's largest value; the lower index on a tie */
DEV void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffff, v, o);
        const int i2 = __shfl_xor_sync(0xffffffff, i, o);
        if (v2 > v || (v2 == v && i2 < i)) {
            v = v2;
            i = i2;
        }
    }
}

/* The GLM-4.5 router (SPEC.md "MoE router"): s = sigmoid(logits); the top k of s + bias choose
   (the bias only chooses); the weights are the chosen s, normalised to sum 1 if norm, times scale.
   logits [T, E], bias [E] (has_bias 0: none), ids and weights [T, k]. One warp per token (grid T,
   blockDim 32), 2 * E floats of dynamic shared memory. */
extern "C" __global__ void router_topk_f32(const float* logits, const float* bias, int has_bias, int* ids,
                                           float* weights, int E, int k, int norm, float scale) {
    extern __shared__ float smem[];
    float* s = smem;                    /* [E] sigmoid scores */
    float* choice = smem + E;           /* [E] s + bias; -inf once chosen */
    const int t = blockIdx.x, lane = threadIdx.x;
    for (int e = lane; e < E; e += 32) {
        s[e] = 1.0f / (1.0f + expf(-logits[(long long)t * E + e]));
        choice[e] = s[e] + (has_bias ? bias[e] : 0.0f);
    }
    __syncwarp();
    float total = 0.0f;
    for (int r = 0; r < k; r++) {
        float best = NEG_INF;
        int at = E;
        for (int e = lane; e < E; e += 32)
            if (choice[e] > best) {
                best = choice[e];
                at = e;
            }
        warp_argmax(best, at);
        total += s[at];
        __syncwarp();
        if (lane == 0) {
            ids[t * k + r] = at;
            choice[at] = NEG_INF;
        }
        __syncwarp();
    }
    if (lane == 0) {
        const float f = (norm ? 1.0f / (total + 1e-20f) : 1.0f) * scale;
        for (int r = 0; r < k; r++) weights[t * k + r] = s[ids[t * k + r]] * f;
    }
}
"""

_BODIES = {"matvec": MATVEC, "dequant": DEQUANT, "norm_rope": NORM_ROPE, "attention": ATTENTION,
           "ffn_moe": FFN_MOE}
UNITS = tuple(_BODIES)         # one NVRTC program (one CuPy RawModule) each

_names = [TYPES[t][0] for t in TYPES]
KERNELS = {
    "matvec": ["quantize_q8_1_f32"] + [f"gemv_{TYPES[t][0]}_q8_1" for t in QUANTISED]
              + [f"gemv_experts_{TYPES[t][0]}_q8_1" for t in QUANTISED]
              + [f"gemv_{n}_f32" for n in ("f16", "f32")] + [f"gemv_experts_{n}_f32" for n in ("f16", "f32")],
    "dequant": [f"dequantize_{n}_f16" for n in _names],
    "norm_rope": ["rmsnorm_f32", "rope_adjacent_f32", "rope_neox_f32"],
    "attention": ["attention_decode_f32", "attention_prefill_f32"],
    "ffn_moe": ["silu_mul_f32", "router_topk_f32"],
}


def source(unit: str) -> str:
    """The whole CUDA C text of one unit: the prelude, the block decoders, the device helpers, its kernels."""
    return PRELUDE + BLOCKS + DEVICE + _BODIES[unit]


def gemv_kernel(wtype) -> str:
    """The gemv kernel for a ggml type (quantised: over Q8_1 activations; F16/F32: over floats)."""
    name = TYPES[wtype][0]
    return f"gemv_{name}_q8_1" if wtype in QUANTISED else f"gemv_{name}_f32"


def row_bytes(wtype, n_in: int) -> int:
    """Bytes of one row of n_in values of a ggml type the kernels read."""
    _, qk, size = TYPES[wtype]
    if n_in % qk or n_in % 32:
        raise ValueError(f"rows of {n_in} values are not whole blocks of {qk} (and of 32) for {TYPES[wtype][0]}")
    return n_in // qk * size


def compile_ptx(unit: str, arch: str = "compute_90", options=NVRTC_OPTIONS) -> str:
    """PTX of one unit from NVRTC alone (CuPy's NVRTC binding): needs no GPU and no driver.
    Raises RuntimeError with the compiler's log when the source does not compile."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source(unit), f"glmcpu_{unit}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{unit}.cu does not compile for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx
