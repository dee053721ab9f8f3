"""Every kernel variant this CPU runs, against NumPy references and gguf.quants."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from glmcpu import ops

VARIANTS = ops.available_variants()
SIZES = [1, 3, 17, 33, 4097]          # awkward column counts for the float types
QSIZES = [32, 96, 544, 4096 + 32]     # block multiples for the integer types (1, 3, 17, 129 blocks)
FLOAT_TOL = 2e-5                      # relative to sum |w x|: float kernels differ only by summation order
Q8_TOL = 1.2e-2                       # int8 activations: |x - dq(q(x))| <= d/2 per element


@pytest.fixture(params=VARIANTS)
def K(request):
    return ops.load_variant(request.param)


def make_weights(rng, rows, cols, qtype):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if cols >= 64:
        w[:, 32:64] = 0.0                       # a zero block
    if qtype == GT.F32:
        return w.view(np.uint8), w
    if qtype == GT.F16:
        h = w.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float32)
    if qtype == GT.BF16:
        raw = quants.quantize(w, GT.BF16)
        return raw, quants.dequantize(raw, GT.BF16)
    raw = quants.quantize(w, qtype)
    return raw, quants.dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", [GT.F32, GT.F16, GT.BF16])
@pytest.mark.parametrize("cols", SIZES)
def test_gemm_float_types(K, qtype, cols):
    rng = np.random.default_rng(cols)
    raw, deq = make_weights(rng, 7, cols, qtype)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    out = np.empty((3, 7), np.float32)
    K.gemm(raw, int(qtype), cols, x, out, 2)
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(out - ref) <= FLOAT_TOL * scale + 1e-6)


def q8_reference(x):
    """NumPy twin of the kernels' activation quantiser (same rule as ggml's Q8_0, float scale)."""
    b = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(b * inv).astype(np.int8)
    return q, d[..., 0]


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q8_0])
@pytest.mark.parametrize("cols", QSIZES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_gemm_int_types(K, qtype, cols, tokens):
    rng = np.random.default_rng(cols + tokens)
    raw, deq = make_weights(rng, 9, cols, qtype)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    out = np.empty((tokens, 9), np.float32)
    K.gemm(raw, int(qtype), cols, x, out, 2)
    # tight: against the exact math of the kernel (gguf's dequantised weights x our int8 activations)
    q, d = q8_reference(x)
    xdq = (q.astype(np.float64) * d[..., None]).reshape(tokens, cols)
    exact = xdq @ deq.astype(np.float64).T
    scale = np.abs(xdq) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(out - exact) <= 1e-5 * scale + 1e-6)
    # loose: against float64 with unquantised activations
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    assert np.all(np.abs(out - ref) <= Q8_TOL * scale + 1e-5)


def test_quantize_q8_matches_reference(K):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    x[1, :32] = 0
    xq, xd, xs = K.quantize_q8(x)
    q, d = q8_reference(x)
    assert np.array_equal(xq.reshape(q.shape), q)
    np.testing.assert_allclose(xd, d, rtol=1e-7)
    np.testing.assert_allclose(xs, d * q.sum(-1), rtol=1e-6)


def test_type_codes_are_ggml_s(K):
    """kernels.h defines the type codes once; the ggml ones are gguf's, the repacked ones distinct."""
    from gguf import GGML_QUANT_SIZES
    for name, code in K.TYPES.items():
        if name.endswith("X8"):
            assert code not in set(GT) and K.TYPE_SIZES[code][0] == GGML_QUANT_SIZES[GT[name[:-2]]][0]
        else:
            assert code == GT[name] and K.TYPE_SIZES[code] == GGML_QUANT_SIZES[GT[name]]


def test_gemm_rejects_bad_shapes(K):
    w = np.zeros((4, 18), np.uint8)
    with pytest.raises(ValueError):
        K.gemm(w, int(GT.Q4_0), 64, np.zeros((1, 64), np.float32), np.zeros((1, 4), np.float32), 1)
    with pytest.raises(ValueError):
        K.gemm(w, 99, 32, np.zeros((1, 32), np.float32), np.zeros((1, 4), np.float32), 1)


def test_rmsnorm(K):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    w = rng.standard_normal(33).astype(np.float32)
    out = K.rmsnorm(x, w, 1e-5, np.empty_like(x))
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def rope_reference(x, pos, n_rot, theta, neox):
    x = x.astype(np.float64).copy()
    half = n_rot // 2
    inv = theta ** (-2.0 * np.arange(half) / n_rot)
    ang = pos[:, None] * inv[None]                          # [T, half]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]       # [T, 1, half]
    if neox:
        a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
        x[..., :half], x[..., half:n_rot] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * c - b * s, b * c + a * s
    return x


@pytest.mark.parametrize("neox", [False, True])
def test_rope(K, neox):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 3000], np.int32)
    ref = rope_reference(x, pos, 8, 5e5, neox)
    out = K.rope(x.copy(), pos, *K.rope_table(8, 5e5, int(pos.max()) + 1), neox)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    assert np.array_equal(np.asarray(out)[..., 8:], x[..., 8:])  # dims past n_rot pass through


def test_rope_tables_grow_and_bound_positions(K):
    """ops.rope keeps one table per (n_rot, theta), grown past 4096 positions when asked; a
    position outside a table is refused, never read out of bounds."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    pos = np.array([5, 4095, 70000], np.int32)
    np.testing.assert_allclose(ops.rope(x.copy(), pos, 16, 1e4, False), rope_reference(x, pos, 16, 1e4, False),
                               rtol=1e-5, atol=2e-5)
    assert ops.rope_table(16, 1e4, 1 << 17)[0].shape == (1 << 17, 8)
    with pytest.raises(ValueError, match="outside the table"):
        K.rope(x.copy(), pos, *K.rope_table(16, 1e4, 4096), False)


def test_softmax_and_silu(K):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 17)) * 10).astype(np.float32)
    ref = np.exp(x - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(K.softmax(x.copy()), ref, rtol=1e-5, atol=1e-7)
    gu = rng.standard_normal((3, 34)).astype(np.float32)
    g, u = gu[:, :17], gu[:, 17:]
    np.testing.assert_allclose(K.silu_mul(gu, np.empty((3, 17), np.float32)),
                               g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def attention_reference(q, kc, vc, pos0):
    T, Hq, D = q.shape
    G = Hq // kc.shape[0]
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(T):
        n = pos0 + t + 1
        for h in range(Hq):
            s = kc[h // G, :n] @ q[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vc[h // G, :n]
    return out


@pytest.mark.parametrize("pos0,T", [(0, 1), (0, 6), (9, 1), (4, 3)])
def test_attention_gqa(K, pos0, T):
    rng = np.random.default_rng(4 + pos0)
    Hq, Hkv, D, S = 6, 2, 16, 20
    q = rng.standard_normal((T, Hq, D)).astype(np.float32)
    kc = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    vc = rng.standard_normal((Hkv, S, D)).astype(np.float32)
    out = K.attention(q, kc, vc, pos0, 1 / np.sqrt(D), np.empty_like(q), 2)
    np.testing.assert_allclose(out, attention_reference(q, kc, vc, pos0), rtol=1e-4, atol=1e-5)


def test_variant_override(monkeypatch):
    from glmcpu.errors import GlmcpuError
    with pytest.raises(GlmcpuError):
        ops.load_variant("sse9")
    assert ops.load_variant("generic").ISA == "generic"


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q8_0])
@pytest.mark.parametrize("cols", QSIZES)
def test_batched_rows_equal_single_rows(K, qtype, cols):
    """The 4-token prefill path sums in the same order as the 1-token path: bit-identical, so a
    near-tie in a MoE router cannot flip between prefill and decode."""
    rng = np.random.default_rng(cols)
    raw, _ = make_weights(rng, 5, cols, qtype)
    x = rng.standard_normal((9, cols)).astype(np.float32)
    batch = K.gemm(raw, int(qtype), cols, x, np.empty((9, 5), np.float32), 2)
    single = np.concatenate([K.gemm(raw, int(qtype), cols, x[i:i + 1], np.empty((1, 5), np.float32), 1)
                             for i in range(9)])
    assert np.array_equal(batch, single)


@pytest.mark.parametrize("qtype", [GT.Q4_0, GT.Q5_0, GT.Q8_0])
@pytest.mark.parametrize("rows,cols,tokens", [(8, 32, 1), (16, 96, 5), (24, 544, 3), (64, 4128, 9),
                                             (64, 4128, 2), (32, 4128, 3), (16, 96, 6), (16, 4128, 7)])
def test_repacked_x8_gemm(K, qtype, rows, cols, tokens):
    """8-row groups (q4_0x8 / q5_0x8 / q8_0x8): same bytes in another order, same sums."""
    rng = np.random.default_rng(rows + cols)
    raw, deq = make_weights(rng, rows, cols, qtype)
    packed, ptype = K.repack_x8(raw, int(qtype))
    assert packed.nbytes == raw.nbytes and ptype == {GT.Q4_0: K.Q4_0X8, GT.Q5_0: K.Q5_0X8, GT.Q8_0: K.Q8_0X8}[qtype]
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    got = K.gemm(packed, ptype, cols, x, np.empty((tokens, rows), np.float32), 2)
    q, d = q8_reference(x)
    xdq = (q.astype(np.float64) * d[..., None]).reshape(tokens, cols)
    exact = xdq @ deq.astype(np.float64).T
    scale = np.abs(xdq) @ np.abs(deq).astype(np.float64).T
    assert np.all(np.abs(got - exact) <= 1e-5 * scale + 1e-6)
    single = np.concatenate([K.gemm(packed, ptype, cols, x[i:i + 1], np.empty((1, rows), np.float32), 1)
                             for i in range(tokens)])
    assert np.array_equal(got, single)
    with pytest.raises(ValueError):
        K.repack_x8(raw[:rows - 1], int(qtype))


@pytest.mark.parametrize("n", [1, 7, 4096, 4096 * 3 + 5])
def test_stream_read_reads_every_byte(K, n):
    buf = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    words = np.frombuffer(buf[: n // 8 * 8].tobytes(), np.uint64)
    want = int(np.bitwise_xor.reduce(words)) if len(words) else 0
    for b in buf[n // 8 * 8:]:
        want ^= int(b)
    for threads in (1, 2, 3):
        assert K.stream_read(buf, threads) == want


def chunked(K, raw, qtype, cols, width, repack):
    """raw [rows, bytes] as K.Chunked of `width`-column chunks (repacked into 8-row groups if asked)."""
    from glmcpu.weights import row_bytes
    per = row_bytes(int(qtype), width)
    parts = []
    for c in range(0, raw.shape[1], per):
        lines, t = np.ascontiguousarray(raw[:, c:c + per]), int(qtype)
        if repack and qtype in (GT.Q4_0, GT.Q8_0, GT.Q4_K):
            lines, t = K.repack_x8(lines, int(qtype))
        parts.append((lines, min(width, cols - c // per * width)))
    return K.Chunked(parts, t), parts, t


@pytest.mark.parametrize("qtype,cols,width", [(GT.Q4_0, 4096 + 96, 1024), (GT.Q8_0, 544, 96),
                                              (GT.Q4_K, 1024, 256), (GT.Q6_K, 2048, 512),
                                              (GT.F16, 96, 32), (GT.F32, 64, 32)])
@pytest.mark.parametrize("repack", [False, True])
@pytest.mark.parametrize("T", [1, 5])
def test_gemm_chunked_sums_like_one_matrix(K, qtype, cols, width, repack, T):
    """Chunk sums added in double: near the float64 reference, equal for a batch and token by
    token, and the partial sums of any split at chunk edges add up (in double) to the whole."""
    rng = np.random.default_rng(cols + T)
    if qtype in (GT.Q4_K, GT.Q6_K):
        from conftest import random_blocks
        raw, deq = random_blocks(rng, qtype, 16, cols, extreme=False)
    else:
        raw, deq = make_weights(rng, 16, cols, qtype)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    m, parts, t = chunked(K, raw, qtype, cols, width, repack)
    whole = K.gemm_chunked(m, x, np.empty((T, 16), np.float64), 2)
    ref = x.astype(np.float64) @ deq.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(deq).astype(np.float64).T
    tol = FLOAT_TOL if qtype in (GT.F16, GT.F32) else Q8_TOL
    assert np.all(np.abs(whole - ref) <= tol * scale + 1e-6)
    steps = np.concatenate([K.gemm_chunked(m, x[i:i + 1], np.empty((1, 16), np.float64), 1) for i in range(T)])
    np.testing.assert_array_equal(whole, steps)
    for cut in range(1, len(parts)):
        a = K.gemm_chunked(K.Chunked(parts[:cut], t), np.ascontiguousarray(x[:, :cut * width]),
                           np.empty((T, 16), np.float64), 2)
        b = K.gemm_chunked(K.Chunked(parts[cut:], t), np.ascontiguousarray(x[:, cut * width:]),
                           np.empty((T, 16), np.float64), 2)
        np.testing.assert_array_equal((a + b).astype(np.float32), whole.astype(np.float32))
    with pytest.raises(ValueError):
        K.gemm_chunked(m, np.zeros((T, cols + 32), np.float32), np.empty((T, 16), np.float64), 1)


def test_huge_empty_is_aligned_private_and_outlives_its_maker():
    """Weights read at every token start on a 2 MB boundary in private memory (shared anonymous
    memory is shmem, which gets no transparent huge pages), and the array keeps its mapping."""
    import gc
    import mmap
    a = ops.huge_empty((3 * 1024, 1024 + 7), np.float32)
    assert a.shape == (3072, 1031) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    if hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS"):
        assert a.ctypes.data % ops.HUGE_PAGE == 0
        with open("/proc/self/maps") as fh:
            lo = a.ctypes.data
            perms = [ln.split()[1] for ln in fh if int(ln.split("-")[0], 16) <= lo < int(ln.split()[0].split("-")[1], 16)]
        assert perms and perms[0].endswith("p"), perms          # private, not shared
    a[:] = 1.5
    b = a[10:20]                       # a view: the mapping lives as long as any view of it
    del a
    gc.collect()
    b += 1
    assert (b == 2.5).all()
    small = ops.huge_empty((4, 4), np.int8)
    assert small.shape == (4, 4) and small.dtype == np.int8
