"""NumPy twins of the GPU kernels that glmcpu's CPU code has no twin for: the Q8_1 activation
blocks and the router's top-k in the kernels' order; and random weights in the kernels' block
types. tools/gpu_check.py checks the GPU against these and against glmcpu's CPU kernels;
tests/test_gpu.py checks these against gguf.quants and the CPU engine."""
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT

from .kernels import Q8_1_BYTES

SCALE_FIELDS = {GT.Q4_0: (0,), GT.Q8_0: (0,), GT.Q5_0: (0,), GT.Q4_K: (0, 2), GT.Q6_K: (208,)}  # fp16 d (, dmin)

Q8_1 = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
assert Q8_1.itemsize == Q8_1_BYTES


def quantize_q8_1(x) -> np.ndarray:
    """x [T, n] (n a multiple of 32) -> Q8_1 blocks [T, n / 32] exactly as quantize_q8_1_f32 makes
    them: d = max|x| / 127, qs = round-half-even(x / d) (0 where d is 0), s = d * sum(qs)."""
    x = np.ascontiguousarray(x, np.float32)
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[..., None] == 0, 0, np.rint(b / d[..., None])).astype(np.int8)
    out = np.empty(b.shape[:2], Q8_1)
    out["d"], out["qs"] = d, q
    out["s"] = d * q.sum(-1, dtype=np.int32).astype(np.float32)
    return out


def dequantize_q8_1(blocks) -> np.ndarray:
    """Q8_1 blocks [T, n / 32] -> float32 x [T, n] (qs * d)."""
    return (blocks["qs"].astype(np.float32) * blocks["d"][..., None]).reshape(blocks.shape[0], -1)


def router(logits, bias, k: int, norm: bool, scale: float):
    """SPEC.md's MoE router as router_topk_f32 computes it: ids [T, k] int32 in the order chosen
    (largest s + bias first, the lower id on a tie), weights [T, k] float32."""
    logits = np.asarray(logits, np.float32)
    s = (np.float32(1) / (np.float32(1) + np.exp(-logits))).astype(np.float32)
    choice = s + (np.asarray(bias, np.float32) if bias is not None else np.float32(0))
    ids = np.argsort(-choice, axis=1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(s, ids, 1)
    if norm:
        w = w / (w.sum(1, keepdims=True) + np.float32(1e-20))
    return ids, (w * np.float32(scale)).astype(np.float32)


def random_blocks(rng, wtype, rows: int, n: int, zero_block: bool = True) -> np.ndarray:
    """uint8 [rows, row bytes] of random blocks of a ggml type: random bytes (every nibble, bit and
    6-bit scale pattern) with finite fp16 scales of about 1e-2, and the first block of row 0 all
    zeros; F16/F32 rows hold standard normal values."""
    if wtype in (GT.F16, GT.F32):
        x = rng.standard_normal((rows, n)).astype(np.float16 if wtype == GT.F16 else np.float32)
        return x.view(np.uint8).reshape(rows, -1)
    qk, size = GGML_QUANT_SIZES[wtype]
    b = rng.integers(0, 256, (rows, n // qk, size), dtype=np.uint8)
    for off in SCALE_FIELDS[wtype]:
        b[..., off:off + 2] = (rng.uniform(0.2, 2, (rows, n // qk, 1)) * 1e-2).astype(np.float16).view(np.uint8)
    if zero_block:
        b[0, 0] = 0
    return b.reshape(rows, -1)
