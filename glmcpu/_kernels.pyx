# The hot loops behind glmcpu.ops. Built once per instruction set through one-line shims
# (_kernels_avx2.pyx: `include "_kernels.pyx"`); kernels.h picks its SIMD path from the
# compiler's ISA macros. Thin `def` wrappers check shapes once; the work runs without the GIL.
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int8_t, int16_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport sqrtf, expf, cos, sin, pow
import threading

import numpy as np

cdef extern from "kernels.h" nogil:
    const char *GLMCPU_ISA
    enum:       # the ggml type codes the kernels run, and glmcpu's repacked ones: defined in kernels.h only
        GT_F32, GT_F16, GT_Q4_0, GT_Q4_1, GT_Q5_0, GT_Q5_1, GT_Q8_0, GT_Q2_K, GT_Q3_K, GT_Q4_K, GT_Q5_K,
        GT_Q6_K, GT_IQ4_NL, GT_IQ4_XS, GT_BF16, GT_Q4_0X8, GT_Q5_0X8, GT_Q8_0X8, GT_Q4_KX8, GT_IQ4_NLX8,
        GT_IQ4_XSX8, GT_Q2_KX8, GT_Q5_1X8
    int QK
    void quantize_row_q8(int n, const float *x, int8_t *xq, float *xd, float *xs)
    float fp16_to_fp32(uint16_t h)
    long lrintf(float x)
    float fabsf(float x)
    void quantize_row_q8_K(int n, const float *x, int8_t *xq, float *xd, int16_t *xb)
    void gemm_rows(int type, int n, const uint8_t *w, size_t row_bytes, int r0, int r1,
                   int T, const float *x, const int8_t *xq, const float *xd, const float *xs,
                   float *out, int ldo)
    unsigned long long stream_xor(const uint8_t *p, size_t n)
    int ATTN_CHUNK
    Py_ssize_t kv_row_bytes(int t, int D)
    ctypedef struct attn_args:
        const float *q
        Py_ssize_t q_t, q_h
        const void *k
        const void *v
        Py_ssize_t k_h, k_p, v_h, v_p
        int kt, vt
        float *out
        Py_ssize_t o_t, o_h
        int T, Hkv, G, D, pos0
        float scale
    int attn_nchunks(const attn_args *a, int t)
    int attn_tile_tokens(int G)
    size_t attn_part_floats(const attn_args *a)
    size_t attn_qt_floats(const attn_args *a, int tt)
    size_t attn_scratch_floats(const attn_args *a)
    size_t attn_tile_floats(const attn_args *a)
    void attn_load_q(const attn_args *a, int t0, int t1, int j, float *qT)
    void attn_chunk(const attn_args *a, int t0, int t1, int j, int c, const float *qT, float *scratch,
                    float *const *part)
    void attn_merge(const attn_args *a, float *st, const float *pt)
    void attn_finish(const attn_args *a, int t, int j, const float *st)
    void attn_tile(const attn_args *a, int t0, int t1, int j, float *work)
    float exp_f32(float x)
    enum:       # iquants.h (included by kernels.h): llama.cpp's codebook types below 4 bits
        GT_IQ2_XXS, GT_IQ2_XS, GT_IQ2_S, GT_IQ3_XXS, GT_IQ3_S, GT_IQ1_S, GT_IQ1_M

ISA = GLMCPU_ISA.decode()

# Python names of kernels.h's type codes (tests check the ggml ones against gguf's)
TYPES = {"F32": GT_F32, "F16": GT_F16, "Q4_0": GT_Q4_0, "Q4_1": GT_Q4_1, "Q5_0": GT_Q5_0, "Q5_1": GT_Q5_1,
         "Q8_0": GT_Q8_0, "Q2_K": GT_Q2_K, "Q3_K": GT_Q3_K, "Q4_K": GT_Q4_K, "Q5_K": GT_Q5_K, "Q6_K": GT_Q6_K,
         "IQ4_NL": GT_IQ4_NL, "IQ4_XS": GT_IQ4_XS, "BF16": GT_BF16, "Q4_0X8": GT_Q4_0X8, "Q5_0X8": GT_Q5_0X8, "Q8_0X8": GT_Q8_0X8, "Q4_KX8": GT_Q4_KX8,
         "IQ4_NLX8": GT_IQ4_NLX8, "IQ4_XSX8": GT_IQ4_XSX8, "Q2_KX8": GT_Q2_KX8, "Q5_1X8": GT_Q5_1X8}
Q4_0X8 = GT_Q4_0X8  # Q4_0 repacked by repack_x8: one line of `w` per group of 8 rows
Q5_0X8 = GT_Q5_0X8  # Q5_0 likewise
Q8_0X8 = GT_Q8_0X8  # Q8_0 likewise
Q4_KX8 = GT_Q4_KX8  # Q4_K likewise (scales unpacked: 1184 bytes per 8 x 256 values)
IQ4_NLX8 = GT_IQ4_NLX8  # IQ4_NL likewise (Q4_0's layout)
IQ4_XSX8 = GT_IQ4_XSX8  # IQ4_XS likewise (scales unpacked, nibbles in Q4_K's order: 1104 bytes)
Q2_KX8 = GT_Q2_KX8  # Q2_K likewise (the file's bytes in another order: 672)
Q5_1X8 = GT_Q5_1X8  # Q5_1 likewise (Q5_0's layout after the 8 mins: 192)
# type -> (block size, bytes per block); a repacked "block" is 8 rows' blocks
TYPE_SIZES = {GT_F32: (1, 4), GT_F16: (1, 2), GT_Q4_0: (32, 18), GT_Q4_1: (32, 20), GT_Q5_0: (32, 22),
              GT_Q5_1: (32, 24), GT_Q8_0: (32, 34), GT_Q2_K: (256, 84), GT_Q3_K: (256, 110),
              GT_Q4_K: (256, 144), GT_Q5_K: (256, 176), GT_Q6_K: (256, 210), GT_BF16: (1, 2),
              GT_IQ4_NL: (32, 18), GT_IQ4_XS: (256, 136),
              Q4_0X8: (32, 144), Q5_0X8: (32, 176), Q8_0X8: (32, 272), Q4_KX8: (256, 1184),
              IQ4_NLX8: (32, 144), IQ4_XSX8: (256, 1104), Q2_KX8: (256, 672),
              Q5_1X8: (32, 192)}
K_TYPES = (GT_Q2_K, GT_Q3_K, GT_Q4_K, GT_Q5_K, GT_Q6_K, Q4_KX8, GT_IQ4_XS, IQ4_XSX8, Q2_KX8)   # activations as q8_K (quantize_q8_K)
INT_TYPES = (GT_Q4_0, GT_Q4_1, GT_Q5_0, GT_Q5_1, GT_Q8_0, Q4_0X8, Q5_0X8, Q8_0X8, GT_IQ4_NL, IQ4_NLX8, GT_IQ4_XS, Q5_1X8) + K_TYPES
GROUP = {Q4_0X8: 8, Q5_0X8: 8, Q8_0X8: 8, Q4_KX8: 8, IQ4_NLX8: 8, IQ4_XSX8: 8, Q2_KX8: 8, Q5_1X8: 8}   # rows per line of `w`
# ... and IQ1_S .. IQ3_S (iquants.h): super-blocks of 256 values, kept in the file's layout, q8_K activations
IQ_TYPES = {"IQ2_XXS": (GT_IQ2_XXS, 66), "IQ2_XS": (GT_IQ2_XS, 74), "IQ2_S": (GT_IQ2_S, 82),
            "IQ3_XXS": (GT_IQ3_XXS, 98), "IQ3_S": (GT_IQ3_S, 110), "IQ1_S": (GT_IQ1_S, 50), "IQ1_M": (GT_IQ1_M, 56)}
TYPES.update({name: t for name, (t, _) in IQ_TYPES.items()})
TYPE_SIZES.update({t: (256, size) for t, size in IQ_TYPES.values()})
K_TYPES += tuple(t for t, _ in IQ_TYPES.values())
INT_TYPES += tuple(t for t, _ in IQ_TYPES.values())

# Bytes each thread must have to read before a team pays for its fork and join: below this the
# caller's thread does the work alone. A team waits for its slowest member, and on a busy machine
# a descheduled member stalls the whole call for a time slice: matrices of a few hundred KB (the
# demo model's) ran 100x slower with 2 threads than with 1 beside two busy processes.
cdef enum:
    MIN_TEAM_BYTES = 1024 * 1024


cdef inline int team(int threads, double work_bytes) noexcept nogil:
    """Threads for a call that reads work_bytes: at most `threads`, one per MIN_TEAM_BYTES."""
    cdef double most = work_bytes / MIN_TEAM_BYTES
    if threads < 1:
        return 1
    if most < threads:
        return 1 if most < 1 else <int>most
    return threads


def wire_q8_scales(const float[:, ::1] x, out_arr):
    """out[t, b] = max |x[t, 32b..32b+32]| / 127 in float32 (NaN if the block holds one): a Q8_0
    wire block's scale before its fp16 rounding (net/wire.py; NumPy's abs().max() / 127)."""
    cdef float[:, ::1] out = out_arr
    cdef Py_ssize_t T = x.shape[0], nb = x.shape[1] // 32, t, b, j
    cdef float m, a
    if x.shape[1] % 32 or out.shape[0] != T or out.shape[1] != nb:
        raise ValueError(f"wire_q8_scales: x {tuple(x.shape)}, out {tuple(out.shape)}")
    with nogil:
        for t in range(T):
            for b in range(nb):
                m = 0
                for j in range(32):
                    a = fabsf(x[t, b * 32 + j])
                    if a != a:
                        m = a
                        break
                    if a > m:
                        m = a
                out[t, b] = m / 127
    return out_arr


def wire_q8_quantize(const float[:, ::1] x, const uint16_t[:, ::1] d, int8_t[:, ::1] q):
    """q = clip(rint(x / d), -127, 127) per 32-block with fp16 scales d (0 where d is not > 0):
    NumPy's x * (1 / d) rounded half to even, in float32, as net/wire.py's encode."""
    cdef Py_ssize_t T = x.shape[0], n = x.shape[1], t, b, j
    cdef float df, inv
    cdef long v
    if n % 32 or d.shape[0] != T or d.shape[1] != n // 32 or q.shape[0] != T or q.shape[1] != n:
        raise ValueError(f"wire_q8_quantize: x {tuple(x.shape)}, d {tuple(d.shape)}, q {tuple(q.shape)}")
    with nogil:
        for t in range(T):
            for b in range(n // 32):
                df = fp16_to_fp32(d[t, b])
                inv = 1.0 / df if df > 0 else 0
                for j in range(b * 32, b * 32 + 32):
                    v = lrintf(x[t, j] * inv)
                    q[t, j] = <int8_t>(127 if v > 127 else (-127 if v < -127 else v))


def wire_q8_dequantize(const int8_t[:, ::1] q, const uint16_t[:, ::1] d, out_arr):
    """out = q * d per 32-block, the product in float32 (as NumPy's decode), stored as double."""
    cdef double[:, ::1] out = out_arr
    cdef Py_ssize_t T = q.shape[0], n = q.shape[1], t, b, j
    cdef float df
    if n % 32 or d.shape[0] != T or d.shape[1] != n // 32 or out.shape[0] != T or out.shape[1] != n:
        raise ValueError(f"wire_q8_dequantize: q {tuple(q.shape)}, d {tuple(d.shape)}, out {tuple(out.shape)}")
    with nogil:
        for t in range(T):
            for b in range(n // 32):
                df = fp16_to_fp32(d[t, b])
                for j in range(b * 32, b * 32 + 32):
                    out[t, j] = <double>(<float>q[t, j] * df)
    return out_arr


def quantize_q8(const float[:, ::1] x, int threads=1):
    """[T, n] float32 -> (xq int8 [T, n], xd float32 [T, n/32], xs float32 [T, n/32])."""
    cdef int T = x.shape[0], n = x.shape[1], t
    if n % QK:
        raise ValueError(f"row length {n} is not a multiple of {QK}")
    xq = np.empty((T, n), np.int8)
    xd = np.empty((T, n // QK), np.float32)
    xs = np.empty((T, n // QK), np.float32)
    cdef int8_t[:, ::1] q = xq
    cdef float[:, ::1] d = xd, s = xs
    with nogil:
        for t in prange(T, num_threads=team(min(threads, T), 5.0 * T * n), schedule='static'):
            quantize_row_q8(n, &x[t, 0], &q[t, 0], &d[t, 0], &s[t, 0])
    return xq, xd, xs


def quantize_q8_K(const float[:, ::1] x, int threads=1):
    """[T, n] float32 -> (xq int8 [T, n], xd float32 [T, n/256], xs [T, n/32] float32 whose
    bytes are the int16 sums of every 16 xq, [T, n/16]), the activations of the K-quants."""
    cdef int T = x.shape[0], n = x.shape[1], t
    if n % 256:
        raise ValueError(f"row length {n} is not a multiple of 256")
    xq = np.empty((T, n), np.int8)
    xd = np.empty((T, n // 256), np.float32)
    xb = np.empty((T, n // 16), np.int16)
    cdef int8_t[:, ::1] q = xq
    cdef float[:, ::1] d = xd
    cdef int16_t[:, ::1] b = xb
    if n:
        with nogil:
            for t in prange(T, num_threads=team(min(threads, T), 5.0 * T * n), schedule='static'):
                quantize_row_q8_K(n, &x[t, 0], &q[t, 0], &d[t, 0], &b[t, 0])
    return xq, xd, xb.view(np.float32)


def quantize_act(x, int wtype, int threads=1):
    """The activations the kernels of weight type wtype read: (xq, xd, xs)."""
    return (quantize_q8_K if wtype in K_TYPES else quantize_q8)(x, threads)


def gemm(const uint8_t[:, ::1] w, int wtype, int n, const float[:, ::1] x, out_arr, int threads=1):
    """out[T, N] = x[T, n] @ W[N, n]^T for W stored as ggml type `wtype`, one row per line
    of `w` (bytes; one group of 8 rows per line for Q4_0X8). Q4_0/Q8_0 weights use x
    quantised to int8 blocks, as ggml does."""
    cdef float[:, ::1] out = out_arr
    cdef int grp = GROUP.get(wtype, 1)
    cdef int N = w.shape[0] * grp, T = x.shape[0], nchunks, c, r0, r1
    if wtype not in TYPE_SIZES:
        raise ValueError(f"unsupported ggml type {wtype}")
    bs, bb = TYPE_SIZES[wtype]
    if n % bs or w.shape[1] != n // bs * bb:
        raise ValueError(f"weight rows of {w.shape[1]} bytes do not hold {n} values of type {wtype}")
    if x.shape[1] != n or out.shape[0] != T or out.shape[1] != N:
        raise ValueError(f"shape mismatch: x [{x.shape[0]}, {x.shape[1]}], W [{N}, {n}], out [{out.shape[0]}, {out.shape[1]}]")
    if N == 0 or T == 0:
        return out_arr
    cdef const int8_t *pq = NULL
    cdef const float *pd = NULL
    cdef const float *ps = NULL
    cdef int8_t[:, ::1] xq
    cdef float[:, ::1] xd, xs
    if wtype in INT_TYPES:
        aq, ad, as_ = quantize_act(x, wtype, threads if x.shape[0] > 1 else 1)
        xq, xd, xs = aq, ad, as_
        pq, pd, ps = &xq[0, 0], &xd[0, 0], &xs[0, 0]
    threads = team(threads, <double>w.shape[0] * w.shape[1] * T)   # each weight byte meets T tokens
    nchunks = min(N // grp, threads * 4)
    with nogil:
        for c in prange(nchunks, num_threads=threads, schedule='static'):
            r0 = <int>((<long long>c * (N // grp)) // nchunks) * grp
            r1 = <int>((<long long>(c + 1) * (N // grp)) // nchunks) * grp
            gemm_rows(wtype, n, &w[0, 0], w.shape[1], r0, r1, T, &x[0, 0], pq, pd, ps,
                      &out[0, 0], N)
    return out_arr


cdef class Chunked:
    """A matrix kept as column chunks (each [rows or 8-row groups, bytes] of one ggml type), for
    gemm_chunked: their pointers, row strides, widths and column offsets, checked once at load."""
    cdef readonly object chunks
    cdef readonly int wtype, n, N, C
    cdef readonly double nbytes
    cdef size_t *wp
    cdef size_t *rb
    cdef int *nc
    cdef int *off

    def __cinit__(self, chunks, int wtype):
        cdef int c, grp = GROUP.get(wtype, 1)
        if not chunks or wtype not in TYPE_SIZES:
            raise ValueError("Chunked: no chunks, or an unsupported type")
        bs, bb = TYPE_SIZES[wtype]
        kept = []
        for w, n_c in chunks:
            w = np.asarray(w)
            if grp > 1 or w.ndim != 2 or w.dtype != np.uint8 or w.strides[1] != 1:
                w = np.ascontiguousarray(w, np.uint8)        # rows may be a strided view, 8-row groups not
            kept.append((w, int(n_c)))
        self.chunks, self.wtype, self.C = kept, wtype, len(kept)
        self.N = kept[0][0].shape[0] * grp
        self.wp = <size_t *>malloc(sizeof(size_t) * self.C)
        self.rb = <size_t *>malloc(sizeof(size_t) * self.C)
        self.nc = <int *>malloc(sizeof(int) * self.C)
        self.off = <int *>malloc(sizeof(int) * self.C)
        self.n = 0
        for c, (w, n_c) in enumerate(kept):
            if w.ndim != 2 or w.shape[0] * grp != self.N or n_c <= 0 or n_c % bs or w.shape[1] != n_c // bs * bb:
                raise ValueError(f"Chunked: chunk {c} is not {self.N} rows of {n_c} values of type {wtype}")
            self.wp[c], self.rb[c], self.nc[c], self.off[c] = w.ctypes.data, w.strides[0], n_c, self.n
            self.n += n_c
            self.nbytes += <double>w.shape[0] * w.shape[1]

    def __dealloc__(self):
        free(self.wp)
        free(self.rb)
        free(self.nc)
        free(self.off)


def gemm_chunked(Chunked m, const float[:, ::1] x, out_arr, int threads=1):
    """out[T, N] float64 = the sum, chunk by chunk in order, of x[:, chunk c's columns] @ W_c^T.
    Each chunk's dot products are the usual float32 kernels; the chunks add in double, where
    float32 values add exactly. So a node holding some of a matrix's chunks gets their sum as one
    process has it, and the partial sums of several nodes add up (in double) to one process's."""
    cdef double[:, ::1] out = out_arr
    cdef int T = x.shape[0], C = m.C, N = m.N, grp = GROUP.get(m.wtype, 1), wtype = m.wtype
    cdef int item, nitems, r0, r1, r, t, c, rows, maxrows, i, nc, qb
    cdef bint q = wtype in INT_TYPES, kq = wtype in K_TYPES
    cdef long long base
    if x.shape[1] != m.n or out.shape[0] != T or out.shape[1] != N:
        raise ValueError(f"gemm_chunked: x [{T}, {x.shape[1]}], W [{N}, {m.n}], out {tuple(out_arr.shape)}")
    if N == 0 or T == 0:
        return out_arr
    # activations chunk-major ([C][T][n_c]): the kernels read token t of a chunk at t * n_c
    xf = np.empty(1 if q else T * m.n, np.float32)        # float weights read x, the others its q8
    xq = np.empty(T * m.n if q else 1, np.int8)
    xd = np.empty(T * m.n // 32 + 1 if q else 1, np.float32)
    xs = np.empty(T * m.n // 32 + 1 if q else 1, np.float32)
    cdef float[::1] xfa = xf, xda = xd, xsa = xs
    cdef int8_t[::1] xqa = xq
    cdef float *tmp
    cdef double *acc
    qb = 256 if kq else 32                                   # values per activation scale
    threads = team(threads, m.nbytes * T)
    # a few row ranges per thread, small enough that a range's sums over all its tokens (T x rows
    # doubles and floats, <= ~200 KB) stay in L2 while the chunks pass
    nitems = max(1, min(N // grp, threads if T == 1 else max(threads * 4, (T * N) // 16384)))
    maxrows = ((N // grp + nitems - 1) // nitems) * grp
    with nogil:
        for i in prange(T * C, num_threads=threads if T > 1 else 1, schedule='static'):
            c, t = i // T, i % T
            nc = m.nc[c]
            base = <long long>T * m.off[c] + <long long>t * nc
            if not q:
                memcpy(&xfa[base], &x[t, m.off[c]], sizeof(float) * nc)
            elif kq:
                quantize_row_q8_K(nc, &x[t, m.off[c]], &xqa[base], &xda[base // 256],
                                  <int16_t *>&xsa[base // 32])
            elif q:
                quantize_row_q8(nc, &x[t, m.off[c]], &xqa[base], &xda[base // 32], &xsa[base // 32])
    with nogil, parallel(num_threads=threads):
        tmp = <float *>malloc(sizeof(float) * T * maxrows)
        acc = <double *>malloc(sizeof(double) * T * maxrows)
        for item in prange(nitems, schedule='static'):
            r0 = <int>((<long long>item * (N // grp)) // nitems) * grp
            r1 = <int>((<long long>(item + 1) * (N // grp)) // nitems) * grp
            rows = r1 - r0
            for i in range(T * rows):
                acc[i] = 0.0
            for c in range(C):
                base = <long long>T * m.off[c]
                # gemm_rows writes out[t * ldo + r] for r in r0..r1: point it at tmp
                gemm_rows(wtype, m.nc[c], <const uint8_t *>m.wp[c], m.rb[c], r0, r1, T, &xfa[0 if q else base],
                          &xqa[base if q else 0], &xda[base // qb if q else 0], &xsa[base // 32 if q else 0],
                          tmp - r0, rows)
                for i in range(T * rows):
                    acc[i] += tmp[i]
            for t in range(T):
                for r in range(rows):
                    out[t, r0 + r] = acc[t * rows + r]
        free(tmp)
        free(acc)
    return out_arr


def repack_x8(const uint8_t[:, ::1] w, int wtype, int threads=4, alloc=None):
    """Q4_0, IQ4_NL, Q5_0, Q5_1, Q8_0, Q2_K, Q4_K or IQ4_XS rows [N, row_bytes] (N a multiple of 8) -> 8-row
    groups laid out as groups.h's block_q4_0x8 (Q4_0 and IQ4_NL) / block_q5_0x8 / block_q5_1x8 / block_q8_0x8 /
    block_q2_Kx8 / block_q4_Kx8 / block_iq4_xsx8: [N/8, 8 * row_bytes] (Q4_K: 1184 bytes per 8 x 256
    values, IQ4_XS 1104). Returns (groups, its x8 type).
    alloc(shape, dtype) makes the output (np.empty by default)."""
    cdef Py_ssize_t N = w.shape[0], rb = w.shape[1], nb, G, g, b, r, k, i, bsz, nk, qs0, hd, mo = 0
    cdef uint32_t qh, h
    if wtype in (12, 23, 10):
        return _repack_kx8(w, wtype, threads, alloc or np.empty), {12: Q4_KX8, 23: IQ4_XSX8, 10: Q2_KX8}[wtype]
    if wtype == 2 or wtype == 20:
        bsz, nk, qs0, hd, ptype = 18, 4, 2, 0, (Q4_0X8 if wtype == 2 else IQ4_NLX8)
    elif wtype == 6:
        bsz, nk, qs0, hd, ptype = 22, 4, 6, 32, Q5_0X8
    elif wtype == 7:                                     # Q5_1: Q5_0's layout after 8 mins (mo)
        bsz, nk, qs0, hd, mo, ptype = 24, 4, 8, 32, 16, Q5_1X8
    elif wtype == 8:
        bsz, nk, qs0, hd, ptype = 34, 8, 2, 0, Q8_0X8
    else:
        raise ValueError(f"ggml type {wtype} has no 8-row layout")
    if N % 8 or rb % bsz:
        raise ValueError("repack_x8 needs whole groups of 8 rows of whole blocks")
    nb, G = rb // bsz, N // 8
    packed = (alloc or np.empty)((G, nb * 8 * bsz), np.uint8)
    cdef uint8_t[:, ::1] out = packed
    cdef const uint8_t *src
    cdef uint8_t *dst
    with nogil:
        for g in prange(G, num_threads=max(1, threads), schedule='static'):
            for b in range(nb):
                dst = &out[g, b * 8 * bsz]
                for r in range(8):
                    src = &w[g * 8 + r, b * bsz]
                    memcpy(dst + 2 * r, src, 2)                          # d[r]
                    if mo:                                               # m[r]
                        memcpy(dst + 16 + 2 * r, src + 2, 2)
                    for k in range(nk):                                  # qs[(k*8 + r)*4 + i]
                        memcpy(dst + 16 + mo + hd + (k * 8 + r) * 4, src + qs0 + 4 * k, 4)
                    if hd:                                               # Q5_0/Q5_1: h[r], see groups.h
                        memcpy(&qh, src + 2 + mo // 8, 4)
                        h = 0
                        for k in range(4):
                            for i in range(4):
                                h = h | (((qh >> (4 * k + i)) & 1) << (8 * i + k))
                                h = h | (((qh >> (16 + 4 * k + i)) & 1) << (8 * i + 4 + k))
                        memcpy(dst + 16 + mo + 4 * r, &h, 4)
    return packed, ptype


cdef void _kx8_row(int wtype, const uint8_t *src, uint8_t *dst, int r) noexcept nogil:
    """Row r's super-block src into its group's block dst (groups.h: block_q4_Kx8, block_iq4_xsx8,
    block_q2_Kx8)."""
    cdef int j, p, k, v, s, e, ls
    cdef uint8_t lo, hi
    if wtype == 12:                                              # Q4_K: d, dmin, scales[12], qs[128]
        memcpy(dst + 2 * r, src, 2)                              # d[r]
        memcpy(dst + 16 + 2 * r, src + 2, 2)                     # dmin[r]
        for j in range(4):                                       # sc[j][r], m[j][r] from the 12
            dst[32 + 8 * j + r] = src[4 + j] & 63                # packed bytes, as kquants.h's
            dst[96 + 8 * j + r] = src[8 + j] & 63                # scales_q4_K
            dst[32 + 8 * (j + 4) + r] = (src[12 + j] & 0x0f) | ((src[4 + j] >> 6) << 4)
            dst[96 + 8 * (j + 4) + r] = (src[12 + j] >> 4) | ((src[8 + j] >> 6) << 4)
        for p in range(4):                                       # qs[((p*8 + k)*8 + r)*4 + i]
            for k in range(8):
                memcpy(dst + 160 + ((p * 8 + k) * 8 + r) * 4, src + 16 + 32 * p + 4 * k, 4)
    elif wtype == 23:                                            # IQ4_XS: d, scales_h, scales_l[4], qs[128]
        memcpy(dst + 2 * r, src, 2)                              # d[r]
        for j in range(8):                                       # sc[j][r] = ls - 32
            ls = ((src[4 + j // 2] >> (4 * (j % 2))) & 0x0f) | (((src[2 + (j // 4)] >> (2 * (j % 4))) & 3) << 4)
            dst[16 + 8 * j + r] = <uint8_t>(<int8_t>(ls - 32))
        # byte l of piece p: value 64p + l's nibble (low), 64p + 32 + l's (high); value 32s + e of
        # the file is nibble e // 16 of qs[16s + e % 16]
        for v in range(128):
            s, e = (v // 32) * 2, v % 32                         # v = 32 * p + l
            lo = src[8 + 16 * s + e % 16] >> (4 * (e // 16)) & 0x0f
            hi = src[8 + 16 * (s + 1) + e % 16] >> (4 * (e // 16)) & 0x0f
            dst[80 + (((v // 32) * 8 + e // 4) * 8 + r) * 4 + e % 4] = lo | (hi << 4)
    else:                                                        # Q2_K: scales[16], qs[64], d, dmin
        memcpy(dst + 2 * r, src + 80, 2)                         # d[r]
        memcpy(dst + 16 + 2 * r, src + 82, 2)                    # dmin[r]
        for s in range(16):                                      # sc[s][r]
            dst[32 + 8 * s + r] = src[s]
        for p in range(2):                                       # qs[((h*8 + k)*8 + r)*4 + i]
            for k in range(8):
                memcpy(dst + 160 + ((p * 8 + k) * 8 + r) * 4, src + 16 + 32 * p + 4 * k, 4)


def _repack_kx8(const uint8_t[:, ::1] w, int wtype, int threads, alloc):
    """Q4_K, IQ4_XS or Q2_K rows -> 8-row groups of super-blocks (1184, 1104 or 672 bytes each)."""
    cdef Py_ssize_t N = w.shape[0], rb = w.shape[1], nb, G, g, b, r
    cdef int sb = {12: 144, 23: 136, 10: 84}[wtype], gb = {12: 1184, 23: 1104, 10: 672}[wtype]
    if N % 8 or rb % sb:
        raise ValueError("repack_x8 needs whole groups of 8 rows of whole blocks")
    nb, G = rb // sb, N // 8
    packed = alloc((G, nb * gb), np.uint8)
    cdef uint8_t[:, ::1] out = packed
    with nogil:
        for g in prange(G, num_threads=max(1, threads), schedule='static'):
            for b in range(nb):
                for r in range(8):
                    _kx8_row(wtype, &w[g * 8 + r, b * sb], &out[g, b * gb], r)
    return packed


def repack_q4_0x8(const uint8_t[:, ::1] w, int threads=4):
    return repack_x8(w, 2, threads)[0]


def stream_read(const uint8_t[::1] buf, int threads=1):
    """Read every byte of buf once across `threads` (a bandwidth probe); returns their XOR."""
    cdef Py_ssize_t n = buf.shape[0], c, per
    cdef int T = max(1, threads)
    cdef unsigned long long r = 0
    per = ((n + T - 1) // T + 4095) // 4096 * 4096      # slices start 4096-aligned
    with nogil:
        for c in prange(T, num_threads=T, schedule='static'):
            if c * per < n:
                r ^= stream_xor(&buf[c * per], min(per, n - c * per))
    return r


def rmsnorm(const float[:, ::1] x, const float[::1] w, float eps, out_arr):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, in float32 with a double accumulator."""
    cdef float[:, ::1] out = out_arr
    cdef int T = x.shape[0], D = x.shape[1], t, j
    cdef double ss
    cdef float r
    if w.shape[0] != D or out.shape[0] != T or out.shape[1] != D:
        raise ValueError("rmsnorm: shape mismatch")
    with nogil:
        for t in range(T):
            ss = 0
            for j in range(D):
                ss = ss + x[t, j] * x[t, j]
            r = 1.0 / sqrtf(<float>(ss / D) + eps)
            for j in range(D):
                out[t, j] = x[t, j] * r * w[j]
    return out_arr


def rope_table(int n_rot, double theta, int n):
    """(cos, sin) float32 [n, n_rot/2]: the rotation of pair i at position p, angle
    p * theta^(-2i/n_rot), computed in double once (ops.rope keeps the tables, as llama.cpp does)."""
    cdef int half = n_rot // 2, p, i
    cdef double ang
    cos_arr = np.empty((n, half), np.float32)
    sin_arr = np.empty((n, half), np.float32)
    cdef float[:, ::1] c = cos_arr, s = sin_arr
    with nogil:
        for p in range(n):
            for i in range(half):
                ang = p * pow(theta, -2.0 * i / n_rot)
                c[p, i] = <float>cos(ang)
                s[p, i] = <float>sin(ang)
    return cos_arr, sin_arr


def rope(x_arr, const int32_t[::1] pos, const float[:, ::1] cos_t, const float[:, ::1] sin_t, bint neox):
    """Rotate the first n_rot = 2 * cos_t.shape[1] dims of every head of x [T, H, D] in place, by
    the table rows of the positions. neox=False: pairs (2i, 2i+1) (GGUF chatglm/glm4); neox=True:
    pairs (i, i + n_rot/2)."""
    cdef float[:, :, ::1] x = x_arr
    cdef int T = x.shape[0], H = x.shape[1], D = x.shape[2], half = cos_t.shape[1], t, h, i, a, b, p
    cdef float c, s, x0, x1
    if 2 * half > D or pos.shape[0] != T or sin_t.shape[0] != cos_t.shape[0] or sin_t.shape[1] != half:
        raise ValueError("rope: bad table or positions")
    for t in range(T):
        if not 0 <= pos[t] < cos_t.shape[0]:
            raise ValueError(f"rope: position {pos[t]} is outside the table")
    with nogil:
        for t in range(T):
            p = pos[t]
            for i in range(half):
                c = cos_t[p, i]
                s = sin_t[p, i]
                if neox:
                    a = i
                    b = i + half
                else:
                    a = 2 * i
                    b = 2 * i + 1
                for h in range(H):
                    x0 = x[t, h, a]
                    x1 = x[t, h, b]
                    x[t, h, a] = x0 * c - x1 * s
                    x[t, h, b] = x1 * c + x0 * s
    return x_arr


def softmax(x_arr):
    """Row-wise softmax in place (float32, max-subtracted)."""
    cdef float[:, ::1] x = x_arr
    cdef int T = x.shape[0], N = x.shape[1], t, j
    cdef float mx, tot
    with nogil:
        for t in range(T):
            mx = x[t, 0]
            for j in range(N):
                if x[t, j] > mx:
                    mx = x[t, j]
            tot = 0
            for j in range(N):
                x[t, j] = expf(x[t, j] - mx)
                tot = tot + x[t, j]
            for j in range(N):
                x[t, j] = x[t, j] / tot
    return x_arr


def silu_mul(const float[:, ::1] gu, out_arr, int threads=1):
    """gu [T, 2F] = [gate | up] -> out [T, F] = silu(gate) * up."""
    cdef float[:, ::1] out = out_arr
    cdef int T = gu.shape[0], F = gu.shape[1] // 2, t, j
    cdef float g
    if gu.shape[1] != 2 * F or out.shape[0] != T or out.shape[1] != F:
        raise ValueError("silu_mul: shape mismatch")
    threads = team(min(threads, T), 12.0 * T * F)
    with nogil:
        for t in prange(T, num_threads=threads, schedule='static'):
            for j in range(F):
                g = gu[t, j]
                out[t, j] = g / (1.0 + expf(-g)) * gu[t, F + j]
    return out_arr


ATTENTION_CHUNK = ATTN_CHUNK     # positions per partial softmax (fixed: results never depend on threads)


def attention_exp(const float[::1] x, out_arr):
    """out = exp(x) by attention's polynomial (kernels.h av_exp), one lane at a time: for tests."""
    cdef float[::1] out = out_arr
    cdef Py_ssize_t i
    if out.shape[0] != x.shape[0]:
        raise ValueError("attention_exp: shape mismatch")
    for i in range(x.shape[0]):
        out[i] = exp_f32(x[i])
    return out_arr


_scratch = threading.local()


cdef inline size_t _lines(size_t floats) noexcept nogil:
    """floats rounded up to whole 64-byte lines"""
    return (floats + 15) // 16 * 16


cdef float *_scratch_floats(size_t n) except NULL:
    """n floats of this Python thread's scratch, kept from call to call: fresh pages would fault in
    on every call (~1 ms for a decode's 4 MB of partials)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = np.empty(n + n // 4 + 16, np.float32)
        _scratch.buf = buf
    cdef float[::1] view = buf
    return &view[(16 - (<size_t>&view[0] // 4) % 16) % 16]          # from a line's start


def kv_kind(dtype) -> int:
    """kernels.h's KV type of a cache array's dtype: float32 0, float16 1, uint16 (bfloat16 bits)
    2, Q8_0 blocks (34 bytes: "d" <f2, "qs" 32 x i1; a row of D values is D/32 of them) 3; -1 if
    none."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return 0
    if dtype == np.float16:
        return 1
    if dtype == np.uint16:
        return 2
    if dtype.itemsize == 34 and dtype.names == ("d", "qs"):
        return 3
    return -1


cdef const void *_kv_view(x, const char *name, int D, Py_ssize_t *strides, int *kind) except NULL:
    """Data pointer of a KV array [Hkv, S, D] (Q8_0: [Hkv, S, D/32] blocks) with rows contiguous,
    its head and position strides in bytes, and its KV type (kv_kind)."""
    cdef const uint8_t[:, :, :] xb
    x = np.asarray(x)
    kind[0] = kv_kind(x.dtype)
    if kind[0] < 0:
        raise TypeError(f"attention: {name.decode()} must be float32, float16, bfloat16 (uint16) or Q8_0 "
                        f"blocks, not {x.dtype}")
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[1] == 0 or x.strides[2] != x.itemsize \
            or x.shape[2] * x.itemsize != kv_row_bytes(kind[0], D) or (kind[0] == 3 and D % 32):
        raise ValueError(f"attention: {name.decode()} must be [Hkv, S, {D}] with rows contiguous"
                         f"{' (Q8_0: D/32 blocks)' if kind[0] == 3 else ''}, not {x.shape} strides {x.strides}")
    xb = x.view(np.uint8)
    strides[0], strides[1] = x.strides[0], x.strides[1]
    return &xb[0, 0, 0]


def attention(const float[:, :, ::1] q, kc, vc, int pos0, float scale, out_arr, int threads=1, split=None):
    """Causal grouped-query attention of q [T, Hq, D] float32 (token t at position pos0 + t, seeing
    positions 0..pos0+t) over the cache kc, vc [Hkv, S, D] (float32 or float16 each, rows
    contiguous, filled up to pos0+T); KV head j serves query heads j*G .. j*G+G-1, G = Hq/Hkv.
    Writes out [T, Hq, D] float32 and returns it.

    Each (token, KV head) runs its G heads together over chunks of ATTENTION_CHUNK positions
    (kernels.h attn_chunk), merged in chunk order: the same bytes for any `threads`, and a token
    alone gives what it gives inside a batch. A prompt runs (tile of <= 8 tokens, KV head) items, one
    per thread, a tile's scores from one pass over each chunk's keys; decode (few items) spreads
    the chunks of its items over the threads. split=True/False forces the one or the other (both
    give the same bytes); None chooses."""
    cdef float[:, :, ::1] out = out_arr
    cdef attn_args a
    cdef Py_ssize_t ks[2]
    cdef Py_ssize_t vs[2]
    cdef int T = q.shape[0], Hq = q.shape[1], D = q.shape[2], Hkv, S
    cdef int i, t, c, cc, u, nb, cb, items, ncmax, ntiles, nbatch, tile
    cdef size_t ps, ss, qs, ws
    cdef float *base
    cdef float *work
    cdef float *pp
    cdef float *parts
    cdef float *states
    cdef float *qts
    kc, vc = np.asarray(kc), np.asarray(vc)
    if D % 8:
        raise ValueError(f"attention: head_dim {D} is not a multiple of 8")
    a.k = _kv_view(kc, b"kc", D, ks, &a.kt)
    a.v = _kv_view(vc, b"vc", D, vs, &a.vt)
    Hkv, S = kc.shape[0], kc.shape[1]
    if Hq % Hkv or vc.shape[0] != Hkv or vc.shape[1] != S \
            or pos0 < 0 or pos0 + T > S or out.shape[0] != T or out.shape[1] != Hq or out.shape[2] != D:
        raise ValueError(f"attention: shape mismatch: q {(T, Hq, D)}, kc {kc.shape}, vc {vc.shape}, "
                         f"pos0 {pos0}, out {np.shape(out_arr)}")
    if T == 0 or Hq == 0:
        return out_arr
    a.q, a.q_t, a.q_h = &q[0, 0, 0], q.strides[0] // 4, q.strides[1] // 4
    a.k_h, a.k_p, a.v_h, a.v_p = ks[0], ks[1], vs[0], vs[1]
    a.out, a.o_t, a.o_h = &out[0, 0, 0], out.strides[0] // 4, out.strides[1] // 4
    a.T, a.Hkv, a.G, a.D, a.pos0, a.scale = T, Hkv, Hq // Hkv, D, pos0, scale
    ps, ss, qs = _lines(attn_part_floats(&a)), _lines(attn_scratch_floats(&a)), _lines(attn_qt_floats(&a, 1))
    # KV bytes read, weighted by the work each byte meets (G heads, T tokens)
    threads = team(threads, <double>Hkv * (pos0 + T) * (kv_row_bytes(a.kt, D) + kv_row_bytes(a.vt, D))
                   * (1.0 + T * a.G / 8.0))
    tile = attn_tile_tokens(a.G)
    ntiles = (T + tile - 1) // tile
    if split is None:
        split = ntiles * Hkv < 8 * threads
    if not split:                                        # a prompt: an item (tile of tokens, KV head) per thread
        ws = _lines(attn_tile_floats(&a))
        base = _scratch_floats(ws * threads)
        with nogil, parallel(num_threads=threads):
            work = base + ws * threadid()
            for i in prange(ntiles * Hkv, schedule='dynamic'):
                t = (ntiles - 1 - i // Hkv) * tile       # the longest tiles first
                attn_tile(&a, t, min(T, t + tile), i % Hkv, work)
        return out_arr
    # decode: every (token, KV head, chunk) partial in parallel, then each item merges its own in
    # chunk order; nbatch chunks at a time, so the partials take at most ~8 MB
    items, ncmax = T * Hkv, attn_nchunks(&a, T - 1)
    nbatch = max(1, min(ncmax, <int>((8 << 20) // (4 * ps * items))))
    base = _scratch_floats(ss * threads + (qs + ps + ps * nbatch) * items)
    qts, states = base + ss * threads, base + ss * threads + qs * items
    parts = states + ps * items
    with nogil:
        for i in range(items):
            attn_load_q(&a, i // Hkv, i // Hkv + 1, i % Hkv, qts + <size_t>i * qs)
        cb = 0
        while cb < ncmax:
            nb = min(nbatch, ncmax - cb)
            with parallel(num_threads=threads):
                work = base + ss * threadid()
                for u in prange(items * nb, schedule='dynamic', chunksize=8):
                    i = u // nb
                    t = i // Hkv
                    c = cb + u % nb
                    pp = parts + <size_t>u * ps
                    if c < attn_nchunks(&a, t):
                        attn_chunk(&a, t, t + 1, i % Hkv, c, qts + <size_t>i * qs, work, &pp)
            for i in prange(items, num_threads=min(threads, items), schedule='static'):
                for cc in range(nb):
                    c = cb + cc
                    if c == 0:
                        memcpy(states + <size_t>i * ps, parts + <size_t>(i * nb) * ps, sizeof(float) * ps)
                    elif c < attn_nchunks(&a, i // Hkv):
                        attn_merge(&a, states + <size_t>i * ps, parts + <size_t>(i * nb + cc) * ps)
            cb = cb + nb
        for i in prange(items, num_threads=min(threads, items), schedule='static'):
            attn_finish(&a, i // Hkv, i % Hkv, states + <size_t>i * ps)
    return out_arr


def _quantize_into(const float[:, ::1] x, int8_t[:, ::1] q, float[:, ::1] d, float[:, ::1] s, int threads):
    cdef int T = x.shape[0], n = x.shape[1], t
    with nogil:
        for t in prange(T, num_threads=threads, schedule='static'):
            quantize_row_q8(n, &x[t, 0], &q[t, 0], &d[t, 0], &s[t, 0])


cdef void _expert_gemm(int wtype, int n, const uint8_t[:, :, ::1] w, const long long[:, ::1] items,
                       const long long[::1] start, const float[:, ::1] x, const int8_t[:, ::1] xq,
                       const float[:, ::1] xd, const float[:, ::1] xs, bint quant, float[:, ::1] out,
                       int threads) noexcept nogil:
    """items[i] = (expert, row0, row1): rows of expert e against its tokens start[e]..start[e+1]."""
    cdef Py_ssize_t i
    cdef long long e, a, m
    cdef int rows = out.shape[1]
    for i in prange(items.shape[0], num_threads=threads, schedule='dynamic'):
        e = items[i, 0]
        a = start[e]
        m = start[e + 1] - a
        gemm_rows(wtype, n, &w[e, 0, 0], w.shape[2], <int>items[i, 1], <int>items[i, 2], <int>m,
                  &x[a, 0], &xq[a, 0] if quant else NULL, &xd[a, 0] if quant else NULL,
                  &xs[a, 0] if quant else NULL, &out[a, 0], rows)


def _work_items(counts, int rows, int threads, int min_rows=16):
    """(expert, row0, row1) pieces of the used experts, about 4 per thread in all; row0/row1
    are multiples of 8 (whole Q4_0X8 groups) when rows is."""
    used = np.nonzero(counts)[0]
    if len(used) == 0:
        return np.zeros((0, 3), np.int64)
    per = max(1, (threads * 4 + len(used) - 1) // len(used))
    step = max(min_rows, (rows + per - 1) // per)
    step = (step + 7) // 8 * 8
    edges = np.arange(0, rows, step)
    items = np.empty((len(used) * len(edges), 3), np.int64)
    items[:, 0] = np.repeat(used, len(edges))
    items[:, 1] = np.tile(edges, len(used))
    items[:, 2] = np.minimum(items[:, 1] + step, rows)
    return items


def moe(x, gate, up, down, int wtype_gu, int wtype_down, ids, weights, out, int threads=1, int wtype_up=-1):
    """Routed experts of one MoE layer for T tokens, in one call.

    x [T, n] float32; gate, up: [E, F, row_bytes] (ggml type wtype_gu; up's wtype_up where it
    differs, as in some GLM-4.5 files); down: [E, n, row_bytes];
    ids [T, k] int32 chosen experts (-1: skip); weights [T, k] float32 -> out [T, n] = sum_j weights[t, j] *
    down_e (silu(gate_e x) * up_e x). Tokens are grouped by expert, so each expert's rows are read
    once per call however many tokens chose it."""
    cdef int T = x.shape[0], n = x.shape[1], E = gate.shape[0], k = ids.shape[1]
    cdef int F = gate.shape[1] * GROUP.get(wtype_gu, 1)
    if wtype_up < 0:
        wtype_up = wtype_gu
    cdef bint q_gu = wtype_gu in INT_TYPES, q_dn = wtype_down in INT_TYPES, q_up = wtype_up in INT_TYPES
    if GROUP.get(wtype_up, 1) != GROUP.get(wtype_gu, 1):
        raise ValueError("moe: gate and up differ in row grouping")
    if up.shape[0] != E or up.shape[1] != gate.shape[1] or down.shape[0] != E \
            or down.shape[1] * GROUP.get(wtype_down, 1) != n:
        raise ValueError("moe: expert tensor shapes disagree")
    if wtype_gu not in TYPE_SIZES or wtype_down not in TYPE_SIZES or wtype_up not in TYPE_SIZES:
        raise ValueError("moe: unsupported ggml type")
    # every line must hold exactly its rows' values: nothing may be read past a buffer
    bs, bb = TYPE_SIZES[wtype_gu]
    if n % bs or gate.shape[2] != n // bs * bb:
        raise ValueError(f"moe: gate lines of {gate.shape[2]} bytes do not hold {n} values of type {wtype_gu}")
    bs, bb = TYPE_SIZES[wtype_up]
    if n % bs or up.shape[2] != n // bs * bb:
        raise ValueError(f"moe: up lines of {up.shape[2]} bytes do not hold {n} values of type {wtype_up}")
    bs, bb = TYPE_SIZES[wtype_down]
    if F % bs or down.shape[2] != F // bs * bb:
        raise ValueError(f"moe: down lines of {down.shape[2]} bytes do not hold {F} values of type {wtype_down}")
    if ids.shape[0] != T or weights.shape[0] != T or weights.shape[1] != k or out.shape[0] != T \
            or out.shape[1] != n:
        raise ValueError("moe: ids, weights, x and out disagree")
    flat = np.asarray(ids, np.int64).reshape(-1)                      # [T*k] assignment -> expert
    if flat.size and (flat.min() < -1 or flat.max() >= E):
        raise ValueError("moe: expert id out of range")
    live = np.nonzero(flat >= 0)[0]                                  # -1: an expert held elsewhere
    order = live[np.argsort(flat[live], kind="stable")]              # assignments grouped by expert
    counts = np.bincount(flat[live], minlength=E)
    threads = team(threads, <double>np.count_nonzero(counts) *       # the used experts' bytes
                   (2.0 * gate.shape[1] * gate.shape[2] + <double>down.shape[1] * down.shape[2]))
    start = np.zeros(E + 1, np.int64)
    np.cumsum(counts, out=start[1:])
    xs_sorted = np.ascontiguousarray(np.asarray(x, np.float32)[order // k])   # [T*k, n]
    A = xs_sorted.shape[0]
    dummy_q = np.zeros((max(A, 1), 32), np.int8)
    dummy_f = np.zeros((max(A, 1), 1), np.float32)

    def quantized(a, flag, wtype):
        if not flag:
            return dummy_q, dummy_f, dummy_f
        if wtype in K_TYPES:
            return quantize_q8_K(a, threads)
        rows, cols = a.shape
        q = np.empty((rows, cols), np.int8)
        d = np.empty((rows, cols // QK), np.float32)
        s = np.empty((rows, cols // QK), np.float32)
        _quantize_into(a, q, d, s, threads)
        return q, d, s

    if (q_gu and n % TYPE_SIZES[wtype_gu][0]) or (q_up and n % TYPE_SIZES[wtype_up][0]) \
            or (q_dn and F % TYPE_SIZES[wtype_down][0]):
        raise ValueError("moe: rows are not whole quantisation blocks")
    g = np.empty((A, F), np.float32)
    u = np.empty((A, F), np.float32)
    cdef const uint8_t[:, :, ::1] wg = gate, wu = up, wd = down
    cdef const long long[::1] st = start
    cdef const long long[:, ::1] it
    cdef const float[:, ::1] xa, da, sa
    cdef const int8_t[:, ::1] qa
    cdef float[:, ::1] ga = g, ua = u, ya
    xq, xd, xsum = quantized(xs_sorted, q_gu, wtype_gu)
    it, xa, qa, da, sa = _work_items(counts, F, threads), xs_sorted, xq, xd, xsum
    with nogil:
        _expert_gemm(wtype_gu, n, wg, it, st, xa, qa, da, sa, q_gu, ga, threads)
    if q_up != q_gu or (wtype_up in K_TYPES) != (wtype_gu in K_TYPES):     # other activation blocks
        xq, xd, xsum = quantized(xs_sorted, q_up, wtype_up)
        qa, da, sa = xq, xd, xsum
    with nogil:
        _expert_gemm(wtype_up, n, wu, it, st, xa, qa, da, sa, q_up, ua, threads)
    h = np.empty((A, F), np.float32)
    silu_mul(np.concatenate([g, u], 1), h, threads)
    hq, hd, hs = quantized(h, q_dn, wtype_down)
    y = np.empty((A, n), np.float32)
    it, xa, qa, da, sa, ya = _work_items(counts, n, threads), h, hq, hd, hs, y
    with nogil:
        _expert_gemm(wtype_down, F, wd, it, st, xa, qa, da, sa, q_dn, ya, threads)
    w_sorted = np.asarray(weights, np.float32).reshape(-1)[order]
    # back to [token, slot] (slots of experts held elsewhere stay 0), then the k slots add in
    # double: exact for float32 terms, so the experts of several nodes sum alike in any order
    # (np.add.at did the same scatter-add at ~2.5 ms for one token of GLM-4.5-Air: 8 x 4096)
    slots = np.zeros((T * k, n), np.float32)
    slots[order] = y * w_sorted[:, None]
    out[...] = slots.reshape(T, k, n).sum(1, dtype=np.float64)
    return out
