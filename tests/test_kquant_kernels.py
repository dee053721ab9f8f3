"""The legacy Q4_1/Q5_0/Q5_1, K-quant (Q2_K..Q6_K) and IQ4_NL/IQ4_XS kernels of every variant this
CPU runs, against gguf.quants' dequantisation."""
import numpy as np
import pytest
from conftest import random_blocks
from gguf import GGMLQuantizationType as GT
from gguf import quants

from glmcpu import ops

VARIANTS = ops.available_variants()
K_TYPES = [GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K]
LEGACY = [GT.Q4_1, GT.Q5_0, GT.Q5_1]
IQ = [GT.IQ4_NL, GT.IQ4_XS]             # codebook types: IQ4_NL meets Q8_0 activations, IQ4_XS q8_K
WIDE = K_TYPES + [GT.IQ4_XS]             # rows of 256-value super-blocks, q8_K activations
ROWS = [1, 3, 17, 33]
KCOLS = [256, 512, 4096]               # 1, 2 and 16 super-blocks
LCOLS = [32, 96, 544, 4128]            # 1, 3, 17 and 129 blocks
TIGHT = 1e-5                           # relative to sum |w x|: only float summation order differs
Q8_TOL = 1.2e-2                        # int8 activations: |x - dq(q(x))| <= d/2 per element


@pytest.fixture(params=VARIANTS)
def K(request):
    return ops.load_variant(request.param)


def q8_reference(x, block):
    """NumPy twin of the activation quantisers: int8, one float scale per `block` values
    (32: quantize_row_q8, 256: quantize_row_q8_K)."""
    b = x.reshape(x.shape[0], -1, block).astype(np.float32)
    amax = np.abs(b).max(-1, keepdims=True)
    d = amax / np.float32(127)
    if block == 32:
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    else:                                          # q8_K: 127 / amax, as llama.cpp rounds
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv).astype(np.int8)
    return q, d[..., 0]


def weights(rng, qtype, rows, cols):
    if qtype in LEGACY and rng.integers(2):        # also real quantiser output where gguf has one
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        w[:, :32] = 0.0
        raw = quants.quantize(w, qtype)
        return raw, quants.dequantize(raw, qtype).astype(np.float32)
    return random_blocks(rng, qtype, rows, cols)


def check(K, qtype, raw, deq, x, threads=2):
    T, cols = x.shape
    out = np.empty((T, deq.shape[0]), np.float32)
    K.gemm(raw, int(qtype), cols, x, out, threads)
    q, d = q8_reference(x, 256 if qtype in WIDE else 32)
    xdq = (q.astype(np.float64) * d[..., None]).reshape(T, cols)
    exact = xdq @ deq.astype(np.float64).T
    scale = np.abs(xdq) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(out - exact) <= TIGHT * scale + 1e-6), np.abs(out - exact).max()
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    assert np.all(np.abs(out - ref) <= Q8_TOL * scale + 1e-5)
    return out


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY + IQ)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("tokens", [1, 5])
def test_gemm_matches_gguf_dequantisation(K, qtype, rows, tokens):
    for cols in KCOLS if qtype in WIDE else LCOLS:
        rng = np.random.default_rng(rows * 1000 + cols + tokens + int(qtype))
        raw, deq = weights(rng, qtype, rows, cols)
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        x[:, 256:288] = 0.0                        # a zero activation block
        check(K, qtype, raw, deq, x)


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY + IQ)
def test_extreme_activations(K, qtype):
    rng = np.random.default_rng(int(qtype))
    cols = 512
    raw, deq = random_blocks(rng, qtype, 9, cols)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    x[0] *= 1e4
    x[1, :256] *= 1e-6
    x[2] = 0.0
    out = check(K, qtype, raw, deq, x)
    assert np.all(out[2] == 0.0)


@pytest.mark.parametrize("qtype", K_TYPES + LEGACY + IQ)
@pytest.mark.parametrize("T", [2, 3, 7, 9])
def test_batched_and_threaded_equal_single(K, qtype, T):
    """Each token's result does not depend on the others in the batch (passes of 4, 3, 2 and 1
    tokens) or on the thread split."""
    rng = np.random.default_rng(7)
    cols = 512 if qtype in WIDE else 544
    raw, _ = random_blocks(rng, qtype, 33, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    batched = np.empty((T, 33), np.float32)
    K.gemm(raw, int(qtype), cols, x, batched, 2)
    for t in range(T):
        one = np.empty((1, 33), np.float32)
        K.gemm(raw, int(qtype), cols, x[t:t + 1], one, 1)
        assert np.array_equal(one[0], batched[t])


def test_variants_agree():
    """The SIMD bodies and the scalar twin compute the same integer sums."""
    rng = np.random.default_rng(3)
    for qtype in K_TYPES + LEGACY + IQ:
        cols = 1024
        raw, _ = random_blocks(rng, qtype, 17, cols)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        outs = []
        for v in VARIANTS:
            out = np.empty((2, 17), np.float32)
            ops.load_variant(v).gemm(raw, int(qtype), cols, x, out, 1)
            outs.append(out)
        for o in outs[1:]:
            np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())


def test_quantize_q8_K_matches_reference(K):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 768)).astype(np.float32)
    x[1, 256:512] = 0.0
    xq, xd, xs = K.quantize_q8_K(x)
    q, d = q8_reference(x, 256)
    assert np.array_equal(xq, q.reshape(3, 768))
    np.testing.assert_array_equal(xd, d)
    sums = xs.view(np.int16)                       # [T, n/16] sums of every 16 xq
    np.testing.assert_array_equal(sums, q.reshape(3, -1, 16).astype(np.int32).sum(-1))


def test_k_quants_need_whole_super_blocks(K):
    raw, _ = random_blocks(np.random.default_rng(0), GT.Q4_K, 2, 256)
    with pytest.raises(ValueError):
        K.gemm(raw, int(GT.Q4_K), 128, np.zeros((1, 128), np.float32), np.empty((1, 2), np.float32))


@pytest.mark.parametrize("ram_copy", [True, False])
def test_q5_0_repacks_to_q5_0x8(ram_copy):
    """Q5_0 matrices (llama.cpp's fallback for widths that are not multiples of 256) run in
    8-row groups of the file's 22 bytes per block (not a 34-byte Q8_0 copy): routed experts too
    (ram_copy=False)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 544)).astype(np.float32)
    raw = quants.quantize(w, GT.Q5_0)
    packed, ptype = ops.repack(raw, int(GT.Q5_0), ram_copy=ram_copy)
    x = rng.standard_normal((5, 544)).astype(np.float32)
    want = ops.linear(raw, int(GT.Q5_0), 544, x, 2)
    got = ops.linear(packed, ptype, 544, x, 2, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if ops.VARIANT in ("avx2", "avx512", "avx512vnni") and ops.repack_mode() != "none":
        assert ptype == ops.Q5_0X8 and packed.nbytes == raw.nbytes




X8 = {GT.Q4_K: ("Q4_KX8", 256, 1184), GT.IQ4_XS: ("IQ4_XSX8", 256, 1104), GT.IQ4_NL: ("IQ4_NLX8", 32, 144),
      GT.Q2_K: ("Q2_KX8", 256, 672), GT.Q5_1: ("Q5_1X8", 32, 192)}


@pytest.mark.parametrize("qtype", list(X8))
@pytest.mark.parametrize("rows,cols,T", [(8, 256, 1), (16, 512, 5), (24, 4096, 9), (64, 4096, 4), (8, 768, 13),
                                        (16, 4096, 2), (8, 512, 3), (8, 768, 7), (16, 4352, 8)])
def test_in_8_row_groups(K, qtype, rows, cols, T):
    """Q4_K, IQ4_XS, Q2_K, IQ4_NL and Q5_1 repacked into 8-row groups (groups.h: the layout these tensors run in
    on x86): the file rows' sums (float order aside), and a batch equals its tokens one at a time
    bit for bit (8+ tokens: AVX-512's two-group pass for IQ4_NL)."""
    name, block, nbytes = X8[qtype]
    rng = np.random.default_rng(rows * cols + T)
    raw, deq = random_blocks(rng, qtype, rows, cols, extreme=False)
    packed, ptype = K.repack_x8(raw, int(qtype))
    assert ptype == K.TYPES[name] and packed.shape == (rows // 8, cols // block * nbytes)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    out = K.gemm(packed, ptype, cols, x, np.empty((T, rows), np.float32), 2)
    q, d = q8_reference(x, 256 if qtype in WIDE else 32)
    xdq = (q.astype(np.float64) * d[..., None]).reshape(T, cols)
    exact = xdq @ deq.astype(np.float64).T
    scale = np.abs(xdq) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(out - exact) <= TIGHT * scale + 1e-6), np.abs(out - exact).max()
    single = np.concatenate([K.gemm(packed, ptype, cols, x[i:i + 1], np.empty((1, rows), np.float32), 1)
                             for i in range(T)])
    np.testing.assert_array_equal(out, single)
    # scales near the fp16 limits and zero blocks: the file rows' kernel, float rounding aside
    raw, _ = random_blocks(rng, qtype, rows, cols)
    packed, ptype = K.repack_x8(raw, int(qtype))
    out = K.gemm(packed, ptype, cols, x, np.empty((T, rows), np.float32), 2)
    want = K.gemm(raw, int(qtype), cols, x, np.empty((T, rows), np.float32), 2)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError):
        K.repack_x8(raw[:rows - 1], int(qtype))
