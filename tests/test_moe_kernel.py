"""The one-call MoE kernel against a NumPy reference, for every variant and weight type."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from conftest import random_blocks

from glmcpu import ops

VARIANTS = ops.available_variants()


def stored(rng, shape, qtype):
    w = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    if qtype == GT.F32:
        return w.view(np.uint8).reshape(*shape[:-1], -1), w
    if qtype == GT.F16:
        h = w.astype(np.float16)
        return h.view(np.uint8).reshape(*shape[:-1], -1), h.astype(np.float32)
    raw = quants.quantize(w, qtype)
    return raw, quants.dequantize(raw, qtype)


def reference(x, gate, up, down, ids, wts):
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            g, u = gate[e] @ x[t], up[e] @ x[t]
            out[t] += wts[t, j] * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qtype", [GT.F32, GT.F16, GT.Q8_0, GT.Q4_0])
@pytest.mark.parametrize("T", [1, 5, 9])
def test_moe_matches_reference(variant, qtype, T):
    K = ops.load_variant(variant)
    rng = np.random.default_rng(T)
    E, F, n, k = 6, 96, 64, 3
    g_raw, g = stored(rng, (E, F, n), qtype)
    u_raw, u = stored(rng, (E, F, n), qtype)
    d_raw, d = stored(rng, (E, n, F), qtype)
    x = rng.standard_normal((T, n)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    out = K.moe(x, g_raw, u_raw, d_raw, int(qtype), int(qtype), ids, wts, np.empty_like(x), 2)
    ref = reference(x.astype(np.float64), g, u, d, ids, wts)
    tol = 1e-4 if qtype in (GT.F32, GT.F16) else 3e-2
    assert np.abs(out - ref).max() <= tol * np.abs(ref).max()


def test_moe_bad_ids():
    K = ops.K
    z = np.zeros((2, 32, 32 * 4), np.uint8)
    with pytest.raises(ValueError):
        K.moe(np.zeros((1, 32), np.float32), z, z, z, 0, 0, np.array([[5]], np.int32),
              np.ones((1, 1), np.float32), np.zeros((1, 32), np.float32), 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 6])
def test_moe_with_repacked_experts(variant, T):
    """Q4_0 experts repacked into 8-row groups give the same answer as the file's layout."""
    K = ops.load_variant(variant)
    rng = np.random.default_rng(10 + T)
    E, F, n, k = 4, 64, 96, 2
    g_raw, g = stored(rng, (E, F, n), GT.Q4_0)
    u_raw, u = stored(rng, (E, F, n), GT.Q4_0)
    d_raw, d = stored(rng, (E, n, F), GT.Q4_0)

    def pack(raw, rows):
        return K.repack_q4_0x8(raw.reshape(E * rows, -1)).reshape(E, rows // 8, -1)
    x = rng.standard_normal((T, n)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    plain = K.moe(x, g_raw, u_raw, d_raw, int(GT.Q4_0), int(GT.Q4_0), ids, wts, np.empty_like(x), 2)
    packed = K.moe(x, pack(g_raw, F), pack(u_raw, F), pack(d_raw, n), K.Q4_0X8, K.Q4_0X8, ids, wts,
                   np.empty_like(x), 2)
    np.testing.assert_allclose(packed, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    ref = reference(x.astype(np.float64), g, u, d, ids, wts)
    assert np.abs(packed - ref).max() <= 3e-2 * np.abs(ref).max()


def test_moe_skips_experts_held_elsewhere():
    """ids of -1 are skipped: two halves of the experts, computed apart, sum to the whole."""
    K = ops.K
    rng = np.random.default_rng(3)
    E, F, n, k, T = 6, 64, 64, 3, 5
    g_raw, g = stored(rng, (E, F, n), GT.Q8_0)
    u_raw, u = stored(rng, (E, F, n), GT.Q8_0)
    d_raw, d = stored(rng, (E, n, F), GT.Q8_0)
    x = rng.standard_normal((T, n)).astype(np.float32)
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    whole = K.moe(x, g_raw, u_raw, d_raw, 8, 8, ids, wts, np.empty_like(x), 2)
    lo = K.moe(x, g_raw[:3], u_raw[:3], d_raw[:3], 8, 8, np.where(ids < 3, ids, -1).astype(np.int32), wts,
               np.empty_like(x), 2)
    hi = K.moe(x, g_raw[3:], u_raw[3:], d_raw[3:], 8, 8, np.where(ids >= 3, ids - 3, -1).astype(np.int32),
               wts, np.empty_like(x), 2)
    np.testing.assert_allclose(lo + hi, whole, rtol=1e-5, atol=1e-5)
    none = K.moe(x, g_raw, u_raw, d_raw, 8, 8, np.full_like(ids, -1), wts, np.empty_like(x), 2)
    assert not none.any()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gu,dn", [(GT.Q4_K, GT.Q6_K), (GT.Q5_K, GT.Q5_0), (GT.Q3_K, GT.Q2_K)])
@pytest.mark.parametrize("T", [1, 6])
def test_moe_k_quant_experts(variant, gu, dn, T):
    """GLM-4.5 Q4_K_M files: Q4_K gate/up experts with Q6_K down (and other mixes)."""
    K = ops.load_variant(variant)
    rng = np.random.default_rng(T + int(gu))
    E, F, n, k = 4, 256, 512, 2

    def experts(qtype, rows, cols):
        raw, deq = random_blocks(rng, qtype, E * rows, cols, extreme=False)
        return raw.reshape(E, rows, -1), deq.reshape(E, rows, cols)

    (g_raw, g), (u_raw, u), (d_raw, d) = experts(gu, F, n), experts(gu, F, n), experts(dn, n, F)
    x = rng.standard_normal((T, n)).astype(np.float32) * 0.05
    ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    out = K.moe(x, g_raw, u_raw, d_raw, int(gu), int(dn), ids, wts, np.empty_like(x), 2)
    ref = reference(x.astype(np.float64), g, u, d, ids, wts)
    # two int8-quantised activations through random 2-6 bit experts: a few % (the tight checks
    # of each kernel are in test_kquant_kernels.py; a wrong activation format is off by ~100%)
    assert np.abs(out - ref).max() <= 6e-2 * np.abs(ref).max()
