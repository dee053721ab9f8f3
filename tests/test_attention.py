"""K.attention (kernels.h attn_*) on every kernel variant this CPU runs: against a float64 NumPy
reference, and the same bytes whatever the threads, the batch, the head group or the view."""
import numpy as np
import pytest

from glmcpu import ops

VARIANTS = ops.available_variants()
# max |error| / max |v| <= SCORE_TOL * (1 + max |score|): a float32 score s carries an error of a
# few ulp of s, and exp(s) moves by as much (measured <= 8e-8 * (1 + max |s|))
SCORE_TOL = 2e-7
EXP_TOL = 2.5e-7     # relative error of attention's exp (~2 ulp of float32)
F16 = np.float16


@pytest.fixture(params=VARIANTS)
def K(request):
    return ops.load_variant(request.param)


def reference(q, kc, vc, pos0, scale):
    """float64 causal GQA: token t at pos0 + t sees positions 0..pos0+t (f16 caches exactly).
    Returns (out [T, Hq, D], max |score|)."""
    T, Hq, D = q.shape
    Hkv = kc.shape[0]
    G = Hq // Hkv
    k, v = kc.astype(np.float64), vc.astype(np.float64)
    out, smax = np.empty((T, Hq, D)), 0.0
    for t in range(T):
        n = pos0 + t + 1
        s = np.einsum("jgd,jpd->jgp", q[t].astype(np.float64).reshape(Hkv, G, D), k[:, :n]) * scale
        smax = max(smax, np.abs(s).max())
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("jgp,jpd->jgd", p, v[:, :n]) / p.sum(-1)[..., None]
        out[t] = o.reshape(Hq, D)
    return out, smax


def error(out, q, kc, vc, pos0, scale):
    """max |out - reference| / max |v|, over the tolerance SCORE_TOL * (1 + max |score|): <= 1 passes."""
    ref, smax = reference(q, kc, vc, pos0, scale)
    vmax = np.abs(vc[:, :pos0 + q.shape[0]].astype(np.float32)).max()
    return np.abs(out - ref).max() / vmax / (SCORE_TOL * (1 + smax))


def make(rng, n, T, Hkv, G, D, ktype=np.float32, vtype=np.float32, qscale=1.0, extra=3):
    """q [T, Hkv*G, D], caches [Hkv, n + extra, D] filled to n = pos0 + T (the rest is garbage)."""
    q = (rng.standard_normal((T, Hkv * G, D)) * qscale).astype(np.float32)
    kc = rng.standard_normal((Hkv, n + extra, D)).astype(ktype)
    vc = rng.standard_normal((Hkv, n + extra, D)).astype(vtype)
    kc[:, n:] = np.nan                      # positions past the last token are never read
    vc[:, n:] = np.nan
    return q, kc, vc, n - T


CASES = [  # n = pos0 + T, T, Hkv, G, D, key type, value type, q scale (a peakier softmax)
    (1, 1, 2, 12, 64, np.float32, np.float32, 1),
    (3, 3, 2, 16, 16, F16, F16, 1),
    (17, 7, 1, 2, 128, np.float32, F16, 3),
    (33, 3, 2, 1, 16, F16, np.float32, 1),
    (33, 1, 4, 2, 64, np.float32, np.float32, 3),
    (257, 7, 2, 12, 64, F16, np.float32, 3),     # tokens on both sides of a chunk edge
    (511, 1, 2, 12, 128, F16, F16, 1),
    (511, 7, 1, 16, 64, np.float32, np.float32, 3),
    (4097, 1, 8, 12, 128, F16, F16, 3),          # GLM-4.5-Air's decode, short
    (4097, 3, 2, 16, 128, np.float32, np.float32, 1),   # GLM-4-9B's
    (4097, 7, 1, 12, 16, np.float32, F16, 3),
]


@pytest.mark.parametrize("n,T,Hkv,G,D,kt,vt,qs", CASES)
def test_matches_float64(K, n, T, Hkv, G, D, kt, vt, qs):
    rng = np.random.default_rng(n * 7 + T)
    q, kc, vc, pos0 = make(rng, n, T, Hkv, G, D, kt, vt, qs)
    scale = 1 / np.sqrt(D)
    out = K.attention(q, kc, vc, pos0, scale, np.empty_like(q), 2)
    assert error(out, q, kc, vc, pos0, scale) <= 1


def encoded(rng, n, T, Hkv, G, D, kt, vt, qs=1.0):
    """make()'s inputs with the caches in KV types kt, vt (ops.KV_DTYPES names), and their floats."""
    q, kc, vc, pos0 = make(rng, n, T, Hkv, G, D, np.float32, np.float32, qs, extra=0)
    ke, ve = ops.kv_encode(kc, kt), ops.kv_encode(vc, vt)
    return q, ke, ve, ops.kv_decode(ke, kt), ops.kv_decode(ve, vt), pos0


@pytest.mark.parametrize("n,T,G,kt,vt", [
    (1, 1, 12, "q8_0", "q8_0"), (3, 3, 16, "bf16", "bf16"), (17, 1, 12, "q8_0", "f16"),
    (33, 7, 16, "f16", "q8_0"), (511, 1, 16, "q8_0", "q8_0"), (511, 9, 12, "bf16", "q8_0"),
    (4097, 1, 12, "q8_0", "q8_0"), (4097, 3, 16, "q8_0", "bf16"), (4097, 1, 16, "f32", "q8_0")])
def test_quantised_caches_read_as_their_floats(K, n, T, G, kt, vt):
    """A bf16 or Q8_0 cache gives the bytes of its values as a float32 cache (every value is
    exact in float32), so it meets the float64 reference as float32 does."""
    rng = np.random.default_rng(n + T + G)
    q, ke, ve, kf, vf, pos0 = encoded(rng, n, T, 2, G, 64, kt, vt, 2)
    got = K.attention(q, ke, ve, pos0, 0.125, np.empty_like(q), 2)
    want = K.attention(q, kf, vf, pos0, 0.125, np.empty_like(q), 2)
    assert got.tobytes() == want.tobytes()
    assert error(got, q, kf, vf, pos0, 0.125) <= 1
    for threads, split in ((1, None), (3, True), (2, False)):
        again = K.attention(q, ke, ve, pos0, 0.125, np.empty_like(q), threads, split=split)
        assert again.tobytes() == got.tobytes(), (threads, split)


def test_q8_0_cache_needs_whole_blocks(K):
    q = np.zeros((1, 4, 48), np.float32)
    kv = np.zeros((2, 8, 1), ops.Q8_0_BLOCK)
    with pytest.raises(ValueError):
        K.attention(q, kv, kv, 0, 1.0, np.empty_like(q))                  # 48 values are 1.5 blocks
    with pytest.raises(ValueError):
        K.attention(np.zeros((1, 4, 64), np.float32), kv, kv, 0, 1.0, np.empty((1, 4, 64), np.float32))


def test_same_bytes_for_any_threads_and_split(K):
    rng = np.random.default_rng(1)
    q, kc, vc, pos0 = make(rng, 4097, 3, 2, 12, 64, F16, np.float32, 3)
    want = K.attention(q, kc, vc, pos0, 0.125, np.empty_like(q), 1)
    for threads in (1, 2, 3, 4):
        for split in (None, True, False):
            got = K.attention(q, kc, vc, pos0, 0.125, np.empty_like(q), threads, split=split)
            assert got.tobytes() == want.tobytes(), (threads, split)


@pytest.mark.parametrize("pos0,T,Hkv,G,split", [(250, 7, 2, 12, None), (250, 19, 2, 12, False), (1020, 7, 8, 12, True),
                                                (3, 7, 1, 12, None), (40, 5, 1, 48, False)])
def test_batch_equals_each_token_alone(K, pos0, T, Hkv, G, split):
    """Prompts run in tiles of 8 tokens (fewer for wide groups) whose scores share one pass over
    the keys; each token's bytes are still its own."""
    rng = np.random.default_rng(pos0)
    q, kc, vc, _ = make(rng, pos0 + T, T, Hkv, G, 32, F16, F16, 3)
    batch = K.attention(q, kc, vc, pos0, 0.2, np.empty_like(q), 2, split=split)
    for t in range(T):
        one = K.attention(np.ascontiguousarray(q[t:t + 1]), kc, vc, pos0 + t, 0.2, np.empty_like(q[:1]), 2)
        assert one.tobytes() == batch[t:t + 1].tobytes(), t


def test_decode_partials_in_several_batches():
    """split=True keeps at most ~8 MB of chunk partials, merging them batch by batch: 64 tokens of
    16 heads x 128 over 17 chunks take two batches (the batching is the wrapper's, one ISA will do)."""
    K = ops.load_variant(VARIANTS[0])
    rng = np.random.default_rng(11)
    q, kc, vc, pos0 = make(rng, 4097, 64, 1, 16, 128, F16, np.float32, 3)
    split = K.attention(q, kc, vc, pos0, 0.09, np.empty_like(q), 2, split=True)
    whole = K.attention(q, kc, vc, pos0, 0.09, np.empty_like(q), 2, split=False)
    assert split.tobytes() == whole.tobytes()
    assert error(split[-2:], q[-2:], kc, vc, pos0 + 62, 0.09) <= 1


def test_head_alone_equals_head_in_its_group(K):
    """A node holding some query heads of a group computes them as one process does."""
    rng = np.random.default_rng(5)
    G = 12
    q, kc, vc, pos0 = make(rng, 600, 3, 2, G, 64, np.float32, F16, 3)
    whole = K.attention(q, kc, vc, pos0, 0.125, np.empty_like(q), 2)
    for h in (0, 5, 11, 12, 23):
        j = h // G
        one = K.attention(np.ascontiguousarray(q[:, h:h + 1]), kc[j:j + 1], vc[j:j + 1], pos0, 0.125,
                          np.empty((3, 1, 64), np.float32), 2)
        assert one.tobytes() == whole[:, h:h + 1].tobytes(), h


@pytest.mark.parametrize("ktype,vtype", [(np.float32, np.float32), (F16, F16), (F16, np.float32)])
def test_cache_views(K, ktype, vtype):
    """kc/vc as a layer's heads sliced out of a [n_layer, n_kv_head, n_ctx, D] cache, as models pass them."""
    rng = np.random.default_rng(9)
    n_ctx, D, T, pos0 = 300, 32, 2, 280
    big_k = rng.standard_normal((3, 6, n_ctx, D)).astype(ktype)
    big_v = rng.standard_normal((3, 6, n_ctx, D)).astype(vtype)
    q = rng.standard_normal((T, 2 * 4, D)).astype(np.float32)
    for kc, vc in ((big_k[1, 2:4], big_v[1, 2:4]),              # contiguous heads
                   (big_k[2, 1::3], big_v[2, 1::3]),            # every third head
                   (big_k[0, 4:, :pos0 + T], big_v[0, 4:, :pos0 + T])):   # S cut to the filled positions
        got = K.attention(q, kc, vc, pos0, 0.17, np.empty_like(q), 2)
        want = K.attention(q, np.ascontiguousarray(kc), np.ascontiguousarray(vc), pos0, 0.17, np.empty_like(q), 2)
        assert got.tobytes() == want.tobytes()
        assert error(got, q, kc, vc, pos0, 0.17) <= 1


def test_rejects_what_it_cannot_read(K):
    q = np.zeros((1, 4, 16), np.float32)
    kv = np.zeros((2, 8, 16), np.float32)
    with pytest.raises(TypeError):
        K.attention(q, kv.astype(np.float64), kv, 0, 1.0, np.empty_like(q))
    with pytest.raises(ValueError):
        K.attention(q, kv, kv, 8, 1.0, np.empty_like(q))                  # position past the cache
    with pytest.raises(ValueError):
        K.attention(np.zeros((1, 3, 16), np.float32), kv, kv, 0, 1.0, np.empty((1, 3, 16), np.float32))
    with pytest.raises(ValueError):
        K.attention(np.zeros((1, 4, 12), np.float32), kv[..., :12].copy(), kv[..., :12].copy(), 0, 1.0,
                    np.empty((1, 4, 12), np.float32))                     # head_dim not a multiple of 8
    with pytest.raises(ValueError):
        K.attention(q, kv, np.zeros((2, 8, 16), np.float16)[:, :7], 0, 1.0, np.empty_like(q))
    assert K.attention(q[:0], kv, kv, 0, 1.0, np.empty_like(q[:0])).shape == (0, 4, 16)


def test_exp_accuracy_and_same_bits_everywhere(K):
    x = np.concatenate([np.linspace(-87.3, 88.0, 200001), -np.logspace(-8, 1.9, 5001),
                        [0.0, -0.5 * np.log(2), 0.5 * np.log(2)]]).astype(np.float32)
    got = K.attention_exp(x, np.empty_like(x))
    want = np.exp(x.astype(np.float64))
    assert np.abs(got / want - 1).max() <= EXP_TOL
    assert got[x == 0][0] == 1.0                       # exp(0) = 1: a chunk merged into itself keeps its bytes
    assert not K.attention_exp(np.float32([-87.4, -1e4, -np.inf]), np.empty(3, np.float32)).any()   # 0 below -87.3
    generic = ops.load_variant("generic").attention_exp(x, np.empty_like(x))
    assert got.tobytes() == generic.tobytes()          # plain multiplies and adds: no ISA differs
