"""glmcpu's GPU kernels as functions of CuPy arrays; the one module of glmcpu.gpu that imports
CuPy (check glmcpu.gpu.available() first). Shapes follow the CPU's (glmcpu.ops, glmcpu._kernels):
activations float32 [T, n]; a weight as uint8 rows [n_out, row bytes] in the file's block layout
(routed experts [n_expert, n_out, row bytes]); a layer's KV cache float32 [n_head_kv, n_ctx, head_dim].
Each function checks shapes and dtypes once, then launches; nothing here synchronises."""
import functools

import cupy as cp
import numpy as np

from .kernels import (ATT_MAX_D, ATT_WARPS, GEMV_MAX_T, GEMV_WARPS, KERNELS, NVRTC_OPTIONS, Q8_1_BYTES,
                      QUANTISED, TILE_ROWS, TYPES, UNITS, gemv_kernel, row_bytes, source)


class Kernels:
    """Every unit compiled by NVRTC for the current device (CuPy picks -arch), kernels by name."""

    def __init__(self):
        modules = {u: cp.RawModule(code=source(u), options=NVRTC_OPTIONS) for u in UNITS}
        self.fn = {name: modules[u].get_function(name) for u, names in KERNELS.items() for name in names}

    def __getitem__(self, name):
        return self.fn[name]


@functools.lru_cache(maxsize=None)
def kernels(device_id: int = 0) -> Kernels:
    with cp.cuda.Device(device_id):
        return Kernels()


def _check(ok: bool, what: str):
    if not ok:
        raise ValueError(what)


def _f32(x, what):
    _check(isinstance(x, cp.ndarray) and x.dtype == cp.float32 and x.flags.c_contiguous,
           f"{what}: a C-contiguous float32 CuPy array is needed")
    return x


def _weight(w, wtype, n_in):
    _check(wtype in TYPES, f"ggml type {wtype} has no GPU kernel (the GPU reads {', '.join(v[0] for v in TYPES.values())})")
    _check(isinstance(w, cp.ndarray) and w.dtype == cp.uint8 and w.flags.c_contiguous and
           w.shape[-1] == row_bytes(wtype, n_in), f"weight: uint8 rows of {row_bytes(wtype, n_in)} bytes are needed")


def _grid(n, per):
    return ((n + per - 1) // per,)


def quantize_q8_1(x):
    """x [T, n] float32 (n a multiple of 32) -> Q8_1 blocks uint8 [T, n / 32, 40]."""
    T, n = _f32(x, "quantize_q8_1").shape
    _check(n % 32 == 0, f"quantize_q8_1: rows of {n} values are not whole blocks of 32")
    y = cp.empty((T, n // 32, Q8_1_BYTES), cp.uint8)
    nb = T * n // 32
    kernels()["quantize_q8_1_f32"](_grid(nb, 4), (128,), (x, y, np.int64(nb)))
    return y


def matvec(w, wtype, n_in: int, x):
    """x [T, n_in] @ W^T -> float32 [T, n_out] for T <= GEMV_MAX_T: each weight byte read from memory once
    (a warp decodes a block again for each further token, from L1)."""
    _weight(w, wtype, n_in)
    T = _f32(x, "matvec").shape[0]
    _check(x.shape[1] == n_in and 0 < T <= GEMV_MAX_T, f"matvec: x must be [1..{GEMV_MAX_T}, {n_in}]")
    n_out = w.shape[0]
    y = cp.empty((T, n_out), cp.float32)
    arg = quantize_q8_1(x) if wtype in QUANTISED else x
    kernels()[gemv_kernel(wtype)](_grid(n_out, GEMV_WARPS), (32 * GEMV_WARPS,),
                                  (w, arg, y, np.int32(n_in), np.int32(n_out), np.int32(T)))
    return y


def experts_matvec(w, wtype, n_in: int, ids, x):
    """One token through chosen experts: w [n_expert, n_out, row bytes], ids int32 [k] (on the GPU),
    x [1, n_in] (the same input for every slot: gate, up) or [k, n_in] (one per slot: down)
    -> float32 [k, n_out]."""
    _weight(w, wtype, n_in)
    _check(w.ndim == 3 and isinstance(ids, cp.ndarray) and ids.dtype == cp.int32 and ids.ndim == 1,
           "experts_matvec: w [n_expert, n_out, row bytes] and int32 ids [k] are needed")
    k, n_out = ids.shape[0], w.shape[1]
    _check(_f32(x, "experts_matvec").shape[1] == n_in and x.shape[0] in (1, k),
           f"experts_matvec: x must be [1 or {k}, {n_in}]")
    y = cp.empty((k, n_out), cp.float32)
    if wtype in QUANTISED:
        arg, step = quantize_q8_1(x), (n_in // 32 if x.shape[0] == k else 0)
        name = f"gemv_experts_{TYPES[wtype][0]}_q8_1"
    else:
        arg, step = x, (n_in if x.shape[0] == k else 0)
        name = f"gemv_experts_{TYPES[wtype][0]}_f32"
    kernels()[name](_grid(n_out, GEMV_WARPS) + (k,), (32 * GEMV_WARPS,),
                    (w, ids, arg, np.int32(step), y, np.int32(n_in), np.int32(n_out)))
    return y


def dequantize(w, wtype, n_in: int):
    """Rows of a weight -> float16 [rows, n_in] (a tile for cupy.matmul)."""
    _weight(w, wtype, n_in)
    rows = w.shape[0]
    y = cp.empty((rows, n_in), cp.float16)
    n = rows * n_in
    kernels()[f"dequantize_{TYPES[wtype][0]}_f16"]((min((n + 255) // 256, 1 << 20),), (256,),
                                                    (w, y, np.int32(n_in), np.int64(n)))
    return y


def matmul_f16(xh, tile):
    """xh [T, n] float16 @ tile [rows, n]^T -> float32 [T, rows]: cuBLAS with float32 accumulation
    and a float32 result (cupy.matmul would round the result to half)."""
    from cupy_backends.cuda.libs import cublas
    from cupy.cuda import runtime

    T, n = xh.shape
    rows = tile.shape[0]
    out = cp.empty((T, rows), cp.float32)
    handle = cp.cuda.device.get_cublas_handle()
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)      # in order with the kernels (and a graph capture)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:   # column-major: out^T [rows, T] = tile [rows, n] @ xh^T [n, T]
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, rows, T, n,
                      one.ctypes.data, tile.data.ptr, runtime.CUDA_R_16F, n,
                      xh.data.ptr, runtime.CUDA_R_16F, n,
                      zero.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, rows,
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, mode)
    return out


def linear(w, wtype, n_in: int, x, tile_rows: int = TILE_ROWS):
    """x [T, n_in] @ W^T -> float32 [T, n_out]: gemv for a few tokens; for more, the weight tile
    by tile dequantised to half and multiplied by cuBLAS (activations rounded to half)."""
    T = _f32(x, "linear").shape[0]
    if T <= GEMV_MAX_T:
        return matvec(w, wtype, n_in, x)
    _weight(w, wtype, n_in)
    xh = x.astype(cp.float16)
    y = cp.empty((T, w.shape[0]), cp.float32)
    for r0 in range(0, w.shape[0], tile_rows):
        y[:, r0:r0 + tile_rows] = matmul_f16(xh, dequantize(w[r0:r0 + tile_rows], wtype, n_in))
    return y


def rmsnorm(x, w, eps: float):
    """x [rows, n] -> x / sqrt(mean(x^2) + eps) * w, row by row."""
    rows, n = _f32(x, "rmsnorm").shape
    _check(_f32(w, "rmsnorm weight").shape == (n,), f"rmsnorm: weight of {n} values needed")
    y = cp.empty_like(x)
    kernels()["rmsnorm_f32"]((rows,), (256,), (x, w, y, np.int32(n), np.float32(eps)))
    return y


def rope(x, pos, cos_t, sin_t, neox: bool, n_head: int, head_dim: int):
    """RoPE in place on the first 2 * cos_t.shape[1] dims of each of n_head heads at the start of
    every row of x [T, >= n_head * head_dim] (q, or k inside a fused q|k|v row); pos int32 [T] on
    the GPU; cos_t, sin_t [positions, n_rot / 2] the CPU's tables (glmcpu.ops.rope_table)."""
    T, width = x.shape
    _check(x.dtype == cp.float32 and x.strides[1] == 4 and width >= n_head * head_dim and pos.shape == (T,)
           and pos.dtype == cp.int32 and 2 * cos_t.shape[1] <= head_dim, "rope: bad shapes or dtypes")
    half = cos_t.shape[1]
    n = T * n_head * half
    kernels()["rope_neox_f32" if neox else "rope_adjacent_f32"](
        _grid(n, 256), (256,), (x, np.int64(x.strides[0] // 4), pos, _f32(cos_t, "cos"), _f32(sin_t, "sin"),
                                np.int32(T), np.int32(n_head), np.int32(head_dim), np.int32(half)))
    return x


def _attention_checks(k, v, D):
    _check(_f32(k, "k cache").ndim == 3 and k.shape == _f32(v, "v cache").shape and k.shape[2] == D
           and D % 32 == 0 and D <= ATT_MAX_D, f"attention: caches [n_head_kv, n_ctx, {D}] with head_dim a "
           f"multiple of 32 up to {ATT_MAX_D} are needed")


def attention_decode(q, k, v, n_pos: int, scale: float):
    """One token: q [Hq, D] over the cache k, v [Hkv, n_ctx, D] filled up to n_pos -> [Hq, D]."""
    Hq, D = _f32(q, "q").shape
    _attention_checks(k, v, D)
    Hkv, n_ctx = k.shape[:2]
    _check(Hq % Hkv == 0 and 0 < n_pos <= n_ctx, "attention_decode: heads or positions out of range")
    out = cp.empty_like(q)
    kernels()["attention_decode_f32"]((Hq,), (32 * ATT_WARPS,), (q, k, v, out, np.int32(n_pos), np.int32(Hq),
                                                                  np.int32(Hkv), np.int32(n_ctx), np.int32(D),
                                                                  np.float32(scale)))
    return out


def attention_prefill(q, n_head: int, k, v, pos0: int, scale: float):
    """T tokens at positions pos0.. attending causally: query heads at the start of each row of
    q [T, >= n_head * D] (q, or a fused q|k|v row) -> [T, n_head, D]; the cache already holds them."""
    T = q.shape[0]
    D = k.shape[2]
    _check(q.dtype == cp.float32 and q.strides[1] == 4 and q.shape[1] >= n_head * D, "attention_prefill: bad q")
    _attention_checks(k, v, D)
    Hkv, n_ctx = k.shape[:2]
    _check(n_head % Hkv == 0 and 0 <= pos0 and pos0 + T <= n_ctx, "attention_prefill: heads or positions out of range")
    out = cp.empty((T, n_head, D), cp.float32)
    kernels()["attention_prefill_f32"]((n_head, T), (32 * ATT_WARPS,),
                                       (q, np.int64(q.strides[0] // 4), k, v, out, np.int32(pos0), np.int32(n_head),
                                        np.int32(Hkv), np.int32(n_ctx), np.int32(D), np.float32(scale)))
    return out


def silu_mul(gate_up, up=None):
    """silu(gate) * up -> [T, F]: gate_up a fused [T, 2F] = [gate | up], or the gate [T, F] with up [T, F]."""
    T = _f32(gate_up, "gate").shape[0]
    if up is None:
        F = gate_up.shape[1] // 2
        gate, up, stride = gate_up, gate_up[:, F:], gate_up.shape[1]
    else:
        F = gate_up.shape[1]
        _check(_f32(up, "up").shape == gate_up.shape, "silu_mul: gate and up differ in shape")
        gate, stride = gate_up, F
    y = cp.empty((T, F), cp.float32)
    kernels()["silu_mul_f32"](_grid(T * F, 256), (256,), (gate, up, np.int64(stride), y, np.int32(T), np.int32(F)))
    return y


def router(logits, bias, k: int, norm: bool, scale: float):
    """The sigmoid router's top k (SPEC.md): logits [T, E], bias [E] or None -> ids int32 [T, k]
    (in the order chosen) and weights float32 [T, k], both on the GPU."""
    T, E = _f32(logits, "router logits").shape
    _check(0 < k <= E and (bias is None or _f32(bias, "router bias").shape == (E,)), "router: bad k or bias")
    ids = cp.empty((T, k), cp.int32)
    w = cp.empty((T, k), cp.float32)
    kernels()["router_topk_f32"]((T,), (32,), (logits, bias if bias is not None else logits, np.int32(bias is not None),
                                               ids, w, np.int32(E), np.int32(k), np.int32(bool(norm)),
                                               np.float32(scale)), shared_mem=8 * E)
    return ids, w
