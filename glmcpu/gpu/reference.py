"""NumPy twins of the GPU kernels that glmcpu's CPU code has no twin for: the Q8_1 activation
blocks and the router's top-k in the kernels' order. tools/gpu_check.py checks the GPU against
these and against glmcpu's CPU kernels; tests/test_gpu.py checks these against the CPU engine."""
import numpy as np

from .kernels import Q8_1_BYTES

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
