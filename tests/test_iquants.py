"""llama.cpp's codebook types below 4 bits (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S, IQ1_M;
glmcpu/iquants.h) in every variant this CPU runs, against gguf.quants' dequantisation; and a tiny
GLM-4 model holding them against the same model with those tensors dequantised to F32."""
import importlib.util
import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as GT
from gguf import quants

import glmcpu
from conftest import test_ids as make_ids
from glmcpu import ops
from glmcpu.gguf import RUNNABLE

VARIANTS = ops.available_variants()
IQ = [GT.IQ3_S, GT.IQ3_XXS, GT.IQ2_S, GT.IQ2_XS, GT.IQ2_XXS, GT.IQ1_S, GT.IQ1_M]
COLS = [256, 768, 4352]                # 1, 3 and 17 super-blocks
TOKENS = [1, 3, 5]                     # a single token, a pass of 3, a pass of 4 and 1
# relative to sum |w x|: the kernel's sums are exact integers per super-block, then a float32
# multiply and add per super-block (17 at most here): ~20 roundings of 6e-8
TIGHT = 2e-6
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(params=VARIANTS)
def K(request):
    return ops.load_variant(request.param)


def set_scale(raw, qtype, d):
    """Write fp16 super-block scales d [blocks] into raw blocks [blocks, bytes]: bytes 0-1, except
    IQ1_M, whose d is the top nibbles of its four uint16 scale words (bytes 48-55)."""
    bits = np.asarray(d, np.float16).view(np.uint16)
    if qtype != GT.IQ1_M:
        raw[:, :2] = bits.view(np.uint8).reshape(-1, 2)
        return
    words = raw[:, 48:56].copy().view(np.uint16) & np.uint16(0x0fff)
    for i in range(4):
        words[:, i] |= ((bits >> np.uint16(4 * i)) & np.uint16(0xf)) << np.uint16(12)
    raw[:, 48:56] = words.view(np.uint8)


def iq_blocks(rng, qtype, rows, cols, extreme=True, scale=0.02):
    """Valid blocks of `qtype` for a [rows, cols] matrix: random bits, finite fp16 scales of about
    `scale` -> (raw [rows, row_bytes], float32 values by gguf.quants). With `extreme`, some blocks
    are all zero and some scales are near the fp16 limits (huge, tiny, subnormal)."""
    bs, bb = GGML_QUANT_SIZES[qtype]
    nb = rows * (cols // bs)
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    d = rng.uniform(-scale, scale, nb)
    if extreme and nb > 4:
        d[1::7] = rng.choice([3000.0, -2048.0, 1e-4, 6e-8])
    set_scale(raw, qtype, d)
    if extreme:
        raw[2::5] = 0
    raw = raw.reshape(rows, -1)
    return raw, quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)


def q8_K(x):
    """The activations the kernels read, dequantised: int8 with one scale per 256 (quantize_row_q8_K,
    checked against this in test_kquant_kernels.py) -> (values [T, n] float64, scales [T, n/256])."""
    b = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    amax = np.abs(b).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(b * inv)
    return (q * (amax / np.float32(127))).astype(np.float64).reshape(x.shape), amax[..., 0].astype(np.float64)


def check(K, qtype, raw, deq, x):
    T, n = x.shape
    out = K.gemm(raw, int(qtype), n, x, np.empty((T, deq.shape[0]), np.float32), 2)
    xdq, amax = q8_K(x)
    w = deq.astype(np.float64)
    exact = xdq @ w.T
    scale = np.abs(xdq) @ np.abs(w).T
    assert np.all(np.abs(out - exact) <= TIGHT * scale + 1e-30), np.abs(out - exact).max()
    # against the float activations: each differs from its int8 value by at most amax / 254, so a
    # dot differs by at most sum over super-blocks of amax_b / 254 * sum |w| there
    wsum = np.abs(w).reshape(w.shape[0], -1, 256).sum(-1)                    # [rows, n/256]
    bound = (amax / 254) @ wsum.T
    ref = x.astype(np.float64) @ w.T
    assert np.all(np.abs(out - ref) <= bound * (1 + 1e-6) + TIGHT * scale + 1e-30)
    return out


@pytest.mark.parametrize("qtype", IQ, ids=lambda t: t.name)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_gemm_matches_gguf_dequantisation(K, qtype, cols, tokens):
    rng = np.random.default_rng(cols * 10 + tokens + 1000 * int(qtype))
    raw, deq = iq_blocks(rng, qtype, 7, cols)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    if cols > 256:
        x[:, 256:512] = 0.0                               # a zero activation super-block
        x[0, 512:] *= 1e3
    check(K, qtype, raw, deq, x)


@pytest.mark.parametrize("qtype", IQ, ids=lambda t: t.name)
def test_zero_activations_and_blocks(K, qtype):
    rng = np.random.default_rng(int(qtype))
    raw, deq = iq_blocks(rng, qtype, 5, 768)
    x = rng.standard_normal((3, 768)).astype(np.float32)
    x[2] = 0.0
    out = check(K, qtype, raw, deq, x)
    assert np.all(out[2] == 0.0)
    out = K.gemm(np.zeros_like(raw), int(qtype), 768, x, np.empty((3, 5), np.float32), 1)
    assert np.all(out == 0.0)


@pytest.mark.parametrize("qtype", IQ, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [3, 5, 9])
def test_batched_and_threaded_equal_single(K, qtype, T):
    """A token's result is the same bits whether it runs alone or in a pass of 2, 3 or 4 tokens,
    on one thread or two."""
    rng = np.random.default_rng(T)
    raw, _ = iq_blocks(rng, qtype, 19, 768)
    x = rng.standard_normal((T, 768)).astype(np.float32)
    batched = K.gemm(raw, int(qtype), 768, x, np.empty((T, 19), np.float32), 2)
    for t in range(T):
        one = K.gemm(raw, int(qtype), 768, x[t:t + 1], np.empty((1, 19), np.float32), 1)
        assert np.array_equal(one[0], batched[t])


def test_variants_agree_bit_for_bit():
    """The SIMD body (AVX2, also in the AVX-512 builds) and the scalar twin compute the same
    integer sums and the same scalar float steps (-std=c11: no FMA contraction)."""
    rng = np.random.default_rng(3)
    for qtype in IQ:
        raw, _ = iq_blocks(rng, qtype, 17, 1280)
        x = rng.standard_normal((5, 1280)).astype(np.float32)
        outs = [ops.load_variant(v).gemm(raw, int(qtype), 1280, x, np.empty((5, 17), np.float32), 1)
                for v in VARIANTS]
        for v, o in zip(VARIANTS[1:], outs[1:]):
            assert np.array_equal(o, outs[0]), (qtype.name, v, VARIANTS[0])


def test_chunked_equals_whole(K):
    """A matrix kept as column chunks (a cluster node's share) sums to the whole matrix's product."""
    rng = np.random.default_rng(11)
    for qtype in IQ:
        raw, deq = iq_blocks(rng, qtype, 9, 1024, extreme=False)
        bb = GGML_QUANT_SIZES[qtype][1]
        m = K.Chunked([(raw[:, :bb], 256), (raw[:, bb:], 768)], int(qtype))
        x = rng.standard_normal((3, 1024)).astype(np.float32)
        got = K.gemm_chunked(m, x, np.empty((3, 9), np.float64), 2)
        whole = K.gemm(raw, int(qtype), 1024, x, np.empty((3, 9), np.float32), 2)
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_moe_with_iq_experts(K):
    """Routed experts stored as these types (gate/up one type, down another) through the MoE kernel,
    against float64 on gguf's values (int8 activations twice: a loose bound, as test_moe_kernel's)."""
    rng = np.random.default_rng(5)
    E, F, n, k, T = 4, 256, 256, 2, 3
    for gu, dn in [(GT.IQ2_XXS, GT.IQ1_M), (GT.IQ3_S, GT.IQ2_S), (GT.IQ1_S, GT.IQ3_XXS), (GT.IQ2_XS, GT.IQ2_XS)]:
        g_raw, g = zip(*(iq_blocks(rng, gu, F, n, extreme=False, scale=0.05) for _ in range(E)))
        u_raw, u = zip(*(iq_blocks(rng, gu, F, n, extreme=False, scale=0.05) for _ in range(E)))
        d_raw, d = zip(*(iq_blocks(rng, dn, n, F, extreme=False, scale=0.05) for _ in range(E)))
        x = rng.standard_normal((T, n)).astype(np.float32)
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
        wts = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
        out = K.moe(x, np.stack(g_raw), np.stack(u_raw), np.stack(d_raw), int(gu), int(dn), ids, wts,
                    np.empty_like(x), 2)
        ref = np.zeros((T, n))
        for t in range(T):
            for j, e in enumerate(ids[t]):
                a, b = g[e].astype(np.float64) @ x[t], u[e].astype(np.float64) @ x[t]
                ref[t] += wts[t, j] * (d[e].astype(np.float64) @ (a / (1 + np.exp(-a)) * b))
        assert np.abs(out - ref).max() <= 3e-2 * np.abs(ref).max(), (gu.name, dn.name)


def test_type_tables_match_gguf():
    K = ops.K
    for qtype in IQ:
        code = K.TYPES[qtype.name]
        assert code == int(qtype) and qtype in RUNNABLE
        assert K.TYPE_SIZES[code] == GGML_QUANT_SIZES[qtype]
        assert code in K.K_TYPES and code in ops.IN_RAM


def test_committed_tables_are_generated():
    """glmcpu/iq_tables.h is what tools/gen_iq_tables.py writes from this gguf package's grids."""
    spec = importlib.util.spec_from_file_location("gen_iq_tables", os.path.join(ROOT, "tools", "gen_iq_tables.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(ROOT, "glmcpu", "iq_tables.h")) as f:
        assert f.read() == gen.render()


# ---- a model ------------------------------------------------------------------------------------
DENSE = dict(hidden=256, ffn=512, head_dim=64, layers=2)         # every width a multiple of 256
# every matrix of the model, each type several times; layer 1's q, k, v share one type (fused in RAM)
PLACES = {"output.weight": GT.IQ3_S, "token_embd.weight": GT.IQ2_XS,
          "blk.0.attn_q.weight": GT.IQ3_XXS, "blk.0.attn_k.weight": GT.IQ1_S, "blk.0.attn_v.weight": GT.IQ1_M,
          "blk.0.attn_output.weight": GT.IQ2_XXS, "blk.0.ffn_up.weight": GT.IQ2_S, "blk.0.ffn_down.weight": GT.IQ1_M,
          "blk.1.attn_q.weight": GT.IQ2_S, "blk.1.attn_k.weight": GT.IQ2_S, "blk.1.attn_v.weight": GT.IQ2_S,
          "blk.1.attn_output.weight": GT.IQ1_S, "blk.1.ffn_up.weight": GT.IQ3_S, "blk.1.ffn_down.weight": GT.IQ3_XXS}


def write_iq_model(src, dst_iq, dst_f32, seed=0, places=None):
    """Copy a GGUF twice: with the `places` tensors (default PLACES) replaced by random valid blocks of their type (each
    scaled to the replaced tensor's standard deviation), and with those blocks dequantised to F32
    by gguf.quants (the same values)."""
    rng = np.random.default_rng(seed)
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    writers = [GGUFWriter(dst_iq, arch), GGUFWriter(dst_f32, arch)]
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        for w in writers:
            if f.types[0] == GGUFValueType.ARRAY:
                w.add_key_value(k, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[-1])
            else:
                w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        data = np.array(t.data)
        qtype = (places or PLACES).get(t.name)
        if qtype is None:
            for w in writers:
                w.add_tensor(t.name, data)
            continue
        rows, cols = data.shape
        raw, unit = iq_blocks(rng, qtype, rows, cols, extreme=False, scale=1.0)
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        set_scale(blocks, qtype, data.std() / unit.std() * rng.uniform(0.5, 1.5, len(blocks)))
        raw = blocks.reshape(rows, -1)
        writers[0].add_tensor(t.name, raw, raw_dtype=qtype)
        writers[1].add_tensor(t.name, quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32))
    for w in writers:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def test_tiny_model_with_iq_tensors(tiny, tmp_path, monkeypatch):
    """A 2-layer GLM-4 whose every matrix (embedding and head too) is one of these types: its logits
    against the F32 file of the same values run by glmcpu's float kernels (checked against
    transformers at 2e-3), with each matrix's input rounded to q8_K there as the IQ kernels read it.
    What is left is float32 summation order, and the int8 roundings it flips downstream. The
    file's rows read in place (--repack none) give the same bits as their RAM copy."""
    _, f32, _ = tiny("glm4", "f32", **DENSE)
    iq, exact = str(tmp_path / "iq.gguf"), str(tmp_path / "exact.gguf")
    write_iq_model(f32, iq, exact)
    ids = make_ids(40, seed=3)
    m = glmcpu.load(iq, threads=2)
    assert {t.tensor_type for t in m.file.tensors.values() if len(t.shape) == 2} == set(IQ)
    assert [len(m.net.layers[i].attn.qkv) for i in (0, 1)] == [3, 1]      # layer 1's q|k|v fused
    got = m.logits(ids)
    assert np.array_equal(glmcpu.load(iq, threads=2, repack="none").logits(ids), got)

    linear, linear_chunked = ops.linear, ops.linear_chunked

    def rounded(x):
        return q8_K(np.ascontiguousarray(x, np.float32))[0].astype(np.float32)

    def q8_K_input(w, wtype, n, x, threads, n_out=None):
        assert wtype == int(GT.F32)
        return linear(w, wtype, n, rounded(x), threads, n_out)

    def q8_K_input_chunked(m, x, threads):              # attn_output and ffn_down (256-wide chunks)
        assert m.wtype == int(GT.F32) and all(n_c % 256 == 0 for _, n_c in m.chunks)
        return linear_chunked(m, rounded(x), threads)

    monkeypatch.setattr(ops, "linear", q8_K_input)
    monkeypatch.setattr(ops, "linear_chunked", q8_K_input_chunked)
    want = glmcpu.load(exact, threads=2).logits(ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"IQ model: max |logit difference| / max |logit| = {err:.2e}")
    assert err < 1e-3           # 2.5e-7 measured (AVX-512 VNNI build); an input not rounded to q8_K gives 6e-2
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
