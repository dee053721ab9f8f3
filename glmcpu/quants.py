"""NumPy quantisers for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL / IQ4_XS in ggml's block
layout.

gguf-py reads these formats (gguf.quants.dequantize) but cannot write them; it does write
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, which `quantize` hands to it. Every quantiser here works on all blocks
of a tensor at once: each search step is a few whole-array NumPy passes, not a Python loop over
blocks.

The idea (as in llama.cpp's make_qkx2_quants / make_qx_quants, written afresh): per sub-block,
try a small grid of scales around the one that maps the range onto the integer grid, refit scale
(and min) by least squares for each candidate's integer codes, and keep the one with the least
squared error. The per-sub-block scales are then themselves quantised (4-bit for Q2_K, 6-bit for
Q3_K/Q4_K/Q5_K, int8 for Q6_K) against one f16 super-block scale, and the codes recomputed with
those exact scales.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants as gguf_quants

QK_K = 256                      # values per super-block (every K-quant)
F16_MAX = 65504.0               # super-block scales are f16: clamp so huge weights stay finite
F16_TINY = 2.0 ** -24           # and floor them at f16's smallest step so tiny ones are not zeroed
CHUNK_BLOCKS = 8192             # super-blocks per NumPy pass: bounds the temporaries (~16 MiB)

# --- block layouts -------------------------------------------------------------------------------
# Q4_K: 8 sub-blocks of 32; value = d * sc[j] * q - dmin * m[j], q in 0..15, sc/m 6-bit.
#   scales[12] packs sc[0..7] and m[0..7]: bytes 0-3 hold sc[0..3] in bits 0-5, bytes 4-7 hold
#   m[0..3] in bits 0-5; sc[4..7] = low nibble of bytes 8-11 | (bits 6-7 of bytes 0-3) << 4, and
#   m[4..7] = high nibble of bytes 8-11 | (bits 6-7 of bytes 4-7) << 4.
#   qs[128]: 4 runs of 32 bytes; run r holds sub-block 2r in the low nibbles and 2r+1 in the high.
Q4_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
# Q5_K: as Q4_K with q in 0..31; the 5th bit of value l of sub-block j is bit j of qh[l].
Q5_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                       ("qs", "u1", 128)])
# Q6_K: 16 sub-blocks of 16; value = d * sc[j] * (q - 32), q in 0..63, sc int8.
#   The 256 values are two halves of 128. In half h, ql[64h + l] holds value l (low nibble) and
#   value 64 + l (high nibble), l < 64; qh[32h + l] holds the top 2 bits of values l, 32 + l,
#   64 + l, 96 + l in its bit pairs 0-1, 2-3, 4-5, 6-7.
Q6_K_BLOCK = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
# Q2_K: 16 sub-blocks of 16; value = d * sc[j] * q - dmin * m[j], q in 0..3; scales[j] holds
#   sc[j] in the low nibble and m[j] in the high one. The 256 values are two halves of 128: in half
#   h, bit pair k (bits 2k, 2k+1) of qs[32h + l] is value 32k + l.
Q2_K_BLOCK = np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])
# Q3_K: 16 sub-blocks of 16; value = d * (sc[j] - 32) * (q - 4), q in 0..7, sc 6-bit.
#   The low 2 bits of q are packed as Q2_K's qs; bit b of hmask[l] is q's 3rd bit for value
#   32b + l. scales[12]: bytes 0-7 hold the low 4 bits of sc[0..7] (low nibbles) and of sc[8..15]
#   (high nibbles); bit pair k of byte 8 + i holds the top 2 bits of sc[4k + i].
Q3_K_BLOCK = np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])
assert (Q4_K_BLOCK.itemsize, Q5_K_BLOCK.itemsize, Q6_K_BLOCK.itemsize) == (144, 176, 210)
assert (Q2_K_BLOCK.itemsize, Q3_K_BLOCK.itemsize) == (84, 110)

# scale grids searched per sub-block: offsets added to the number of integer steps
ASYM_STEPS = {3: np.arange(-0.5, 1.05, 0.1), 15: np.arange(-1.0, 1.05, 0.1),
              31: np.arange(-0.5, 1.05, 0.1)}
SYM_STEPS = np.arange(-0.9, 0.95, 0.1)


def fit_scale_min(x, nmax):
    """Per row of x [n, m]: (scale [n], offset [n]) with x ~ scale * q + offset, q in 0..nmax,
    offset <= 0 (the format stores -offset as an unsigned min), by least squares over a grid."""
    n, m = x.shape
    lo = np.minimum(x.min(1), 0)                               # [n]
    span = x.max(1) - lo
    span = np.where(span > 0, span, 1)
    sx, sx2 = x.sum(1), (x * x).sum(1)
    best = (np.full(n, np.inf, np.float32), np.zeros(n, np.float32), lo.copy())   # err, scale, offset
    xs = x - lo[:, None]                                       # [n, m], >= 0
    q = np.empty_like(x)                                       # [n, m], the codes being tried
    for step in ASYM_STEPS[nmax]:
        np.multiply(xs, ((nmax + step) / span)[:, None], out=q)
        np.minimum(np.rint(q, out=q), nmax, out=q)             # xs >= 0: no lower clip needed
        sq, sq2, sxq = q.sum(1), np.einsum("ij,ij->i", q, q), np.einsum("ij,ij->i", x, q)
        det = m * sq2 - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1)
        a = np.where(ok, (m * sxq - sq * sx) / det, 0)
        b = np.where(ok, (sq2 * sx - sq * sxq) / det, 0)
        # constant codes, or a positive offset the format cannot hold: fit the scale alone
        alone = ~ok | (b > 0)
        a = np.where(alone, np.where(sq2 > 0, sxq / np.where(sq2 > 0, sq2, 1), 0), a)
        b = np.where(alone, np.where(sq2 > 0, 0, np.minimum(sx / m, 0)), b)
        a = np.maximum(a, 0)
        err = a * a * sq2 + 2 * a * b * sq + m * b * b - 2 * a * sxq - 2 * b * sx + sx2
        better = err < best[0]
        for arr, new in zip(best, (err, a, b)):
            arr[better] = new[better]
    return best[1], best[2]


def fit_scale_sym(x, nneg, npos):
    """Per row of x [n, m]: scale [n] with x ~ scale * q, q in -nneg..npos, by least squares over
    a grid; the largest-magnitude value is tried at both ends of the range."""
    n = x.shape[0]
    peak = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]   # [n], signed
    peak = np.where(peak != 0, peak, 1)
    best_gain, best_scale = np.full(n, -1.0, np.float32), np.zeros(n, np.float32)
    q = np.empty_like(x)                                       # [n, m], the codes being tried
    for ends in (-nneg, npos):
        for step in SYM_STEPS:
            inv = (ends + np.copysign(step, ends)) / peak                  # [n]
            np.multiply(x, inv[:, None], out=q)
            np.clip(np.rint(q, out=q), -nneg, npos, out=q)
            sq2, sxq = np.einsum("ij,ij->i", q, q), np.einsum("ij,ij->i", x, q)
            sq2 = np.where(sq2 > 0, sq2, 1)
            gain = sxq * sxq / sq2          # squared error = sum x^2 - gain at the best scale
            better = gain > best_gain
            best_gain[better], best_scale[better] = gain[better], (sxq / sq2)[better]
    return best_scale


def to_f16(v):
    """f16 super-block scales: finite, and non-zero wherever v is (the integer scales absorb the
    difference)."""
    mag = np.where(v != 0, np.clip(np.abs(v), F16_TINY, F16_MAX), 0)
    return np.copysign(mag, v).astype(np.float16)


def super_scale(s, levels):
    """Quantise per-sub-block scales s [n, k] >= 0 to integers 0..levels against one f16 scale
    per row: (d f16 [n], integer scales uint8 [n, k])."""
    d = to_f16(s.max(1) / levels)
    d32 = d.astype(np.float32)[:, None]
    safe = np.where(d32 > 0, d32, 1)
    return d, np.where(d32 > 0, np.clip(np.rint(s / safe), 0, levels), 0).astype(np.uint8)


def codes(x, scale, offset, lo, hi):
    """Integer codes of x [n, k, m] for the final (quantised) scale and offset [n, k]."""
    safe = np.where(scale > 0, scale, 1)[..., None]
    q = np.rint((x - offset[..., None]) / safe)
    return np.where(scale[..., None] > 0, np.clip(q, lo, hi), 0).astype(np.int16)


def pack_scales_k4(sc, mn):
    """sc, mn [n, 8] 6-bit -> the 12-byte scales field of Q4_K/Q5_K (layout above)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def quantize_k_min(x, nmax, block_dtype):
    """Q4_K (nmax 15) or Q5_K (nmax 31) blocks of x [n, 256]."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, offset = fit_scale_min(sub, nmax)
    d, sc = super_scale(scale.reshape(n, 8), 63)
    dmin, mn = super_scale(-offset.reshape(n, 8), 63)
    eff_scale = d.astype(np.float32)[:, None] * sc                            # [n, 8]
    eff_min = dmin.astype(np.float32)[:, None] * mn
    q = codes(x.reshape(n, 8, 32), eff_scale, -eff_min, 0, nmax).astype(np.uint8)   # [n, 8, 32]
    out = np.empty(n, block_dtype)
    out["d"], out["dmin"] = d, dmin
    out["scales"] = pack_scales_k4(sc, mn)
    low = q & 0xF
    out["qs"] = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
    if nmax == 31:
        bits = (q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]       # [n, 8, 32]
        out["qh"] = np.bitwise_or.reduce(bits, axis=1)
    return out


def quantize_sym(x, nneg, npos, sc_neg):
    """Symmetric K blocks of x [n, 256] in 16 sub-blocks of 16: (d f16 [n], signed integer scales
    [n, 16] in -sc_neg..sc_neg-1, codes [n, 16, 16] in -nneg..npos)."""
    n = x.shape[0]
    scale = fit_scale_sym(x.reshape(n * 16, 16), nneg, npos).reshape(n, 16)
    peak = np.take_along_axis(scale, np.abs(scale).argmax(1)[:, None], 1)    # [n, 1], signed
    d = to_f16(-peak[:, 0] / sc_neg)        # the largest scale lands on the far negative end
    d32 = d.astype(np.float32)[:, None]
    safe = np.where(d32 != 0, d32, 1)
    sc = np.where(d32 != 0, np.clip(np.rint(scale / safe), -sc_neg, sc_neg - 1), 0)   # [n, 16]
    eff = d32 * sc
    safe = np.where(eff != 0, eff, 1)[..., None]
    q = np.where(eff[..., None] != 0, np.clip(np.rint(x.reshape(n, 16, 16) / safe), -nneg, npos), 0)
    return d, sc, q


PAIR_SHIFTS = np.array([0, 2, 4, 6], np.uint8)         # the four 2-bit fields of a byte


def pack_2bit(q):
    """q [n, 256] in 0..3 -> [n, 64] bytes: Q2_K / Q3_K's qs layout (above)."""
    q = q.reshape(-1, 2, 4, 32)                                               # [n, half, pair, 32]
    return (q << PAIR_SHIFTS[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)


def quantize_q2_k(x):
    """Q2_K blocks of x [n, 256]."""
    n = x.shape[0]
    scale, offset = fit_scale_min(x.reshape(n * 16, 16), 3)
    d, sc = super_scale(scale.reshape(n, 16), 15)
    dmin, mn = super_scale(-offset.reshape(n, 16), 15)
    eff_scale = d.astype(np.float32)[:, None] * sc                            # [n, 16]
    eff_min = dmin.astype(np.float32)[:, None] * mn
    q = codes(x.reshape(n, 16, 16), eff_scale, -eff_min, 0, 3).astype(np.uint8)
    out = np.empty(n, Q2_K_BLOCK)
    out["scales"] = sc | (mn << 4)
    out["qs"] = pack_2bit(q)
    out["d"], out["dmin"] = d, dmin
    return out


def quantize_q3_k(x):
    """Q3_K blocks of x [n, 256]."""
    n = x.shape[0]
    d, sc, q = quantize_sym(x, 4, 3, 32)
    q = (q + 4).astype(np.uint8).reshape(n, 256)                              # 0..7
    s6 = (sc + 32).astype(np.uint8)                                           # [n, 16], 0..63
    out = np.empty(n, Q3_K_BLOCK)
    high = (q.reshape(n, 8, 32) >> 2) << np.arange(8, dtype=np.uint8)[None, :, None]   # [n, bit, 32]
    out["hmask"] = high.sum(1, dtype=np.uint8)
    out["qs"] = pack_2bit(q & 3)
    packed = np.empty((n, 12), np.uint8)
    packed[:, :8] = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
    top = (s6 >> 4).reshape(n, 4, 4)                                          # [n, k, i]: sc[4k + i]
    packed[:, 8:] = (top << PAIR_SHIFTS[None, :, None]).sum(1, dtype=np.uint8)
    out["scales"], out["d"] = packed, d
    return out


def quantize_q6_k(x):
    """Q6_K blocks of x [n, 256]."""
    n = x.shape[0]
    d, sc, q = quantize_sym(x, 32, 31, 128)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)                       # [n, half, quarter, 32]
    out = np.empty(n, Q6_K_BLOCK)
    out["ql"] = ((q[:, :, 0:2] & 0xF) | ((q[:, :, 2:4] & 0xF) << 4)).reshape(n, 128)
    out["qh"] = ((q >> 4) << PAIR_SHIFTS[None, None, :, None]).sum(2, dtype=np.uint8).reshape(n, 64)
    out["scales"], out["d"] = sc.astype(np.int8), d
    return out


# --- IQ4_NL / IQ4_XS: 4-bit indices into llama.cpp's non-linear codebook -----------------------
# IQ4_NL: blocks of 32, value = d * IQ4_VALUES[q]; qs[16] as Q4_0 (value j low nibble of qs[j],
#   value j + 16 the high one). IQ4_XS: super-blocks of 256 = 8 such blocks under 6-bit scales
#   ls (value = d * (ls - 32) * IQ4_VALUES[q]): low 4 bits of ls_j in nibble j % 2 of scales_l[j / 2],
#   high 2 bits in bits 2j, 2j + 1 of scales_h.
IQ4_NL_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
IQ4_XS_BLOCK = np.dtype([("d", "<f2"), ("scales_h", "<u2"), ("scales_l", "u1", 4), ("qs", "u1", 128)])
assert (IQ4_NL_BLOCK.itemsize, IQ4_XS_BLOCK.itemsize) == (18, 136)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
IQ4_EDGES = (IQ4_VALUES[1:] + IQ4_VALUES[:-1]) / 2
IQ4_TRIES = 7                   # llama.cpp's ntry: scales mapping the peak to -127 + t, |t| <= 7


def iq4_index(a):
    """The nearest codebook entry of each value (a tie goes up, as llama.cpp's best_index_int8)."""
    return np.searchsorted(IQ4_EDGES, a, side="right").astype(np.uint8)


def fit_iq4(x):
    """Per 32-value row of x [n, 32]: the scale d with x ~ d * IQ4_VALUES[index], weighted by x^2:
    llama.cpp's search without an importance matrix (a first guess mapping the peak to +127, then
    15 mapping it to -127 + t, each refitted by least squares; the largest gain wins)."""
    w = x * x
    peak = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]   # [n], signed
    live = np.abs(peak) >= 1e-15
    peak = np.where(live, peak, 1)

    def fit(inv):
        v = IQ4_VALUES[iq4_index(x * inv[:, None])]
        return np.einsum("ij,ij->i", w * v, x), np.einsum("ij,ij->i", w * v, v)

    sqx, sq2 = fit(-IQ4_VALUES[0] / peak)
    d = np.where(sq2 > 0, sqx / np.where(sq2 > 0, sq2, 1), 0)
    best = d * sqx
    for t in range(-IQ4_TRIES, IQ4_TRIES + 1):
        sqx, sq2 = fit((t + IQ4_VALUES[0]) / peak)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = np.where(better, sqx / np.where(sq2 > 0, sq2, 1), d)
        best = np.where(better, d * sqx, best)
    return np.where(live, d, 0).astype(np.float32)


def pack_iq4(x, scale):
    """qs [n, 16] of 32-value rows x [n, 32] for their final scales [n]."""
    inv = np.where(scale != 0, 1 / np.where(scale != 0, scale, 1), 0)
    idx = iq4_index(x * inv[:, None])
    return idx[:, :16] | (idx[:, 16:] << 4)


def quantize_iq4_nl(x):
    """IQ4_NL blocks of x [n, 32]."""
    d = to_f16(fit_iq4(x))
    out = np.empty(len(x), IQ4_NL_BLOCK)
    out["d"] = d
    out["qs"] = pack_iq4(x, d.astype(np.float32))       # the codes of the scale as stored
    return out


def quantize_iq4_xs(x):
    """IQ4_XS blocks of x [n, 256]: each 32-value block's scale as llama.cpp fits it, then 6-bit
    signed scales against d = -(the largest-magnitude one) / 32."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    s = fit_iq4(sub).reshape(n, 8)
    top = np.take_along_axis(s, np.abs(s).argmax(1)[:, None], 1)[:, 0]
    d = to_f16(-top / 32).astype(np.float32)          # as stored
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    r = inv[:, None] * s
    ls = np.rint(r)
    ls = np.where((ls == 0) & (r != 0), np.sign(r), ls)    # a live block keeps a step (llama.cpp zeroes it)
    ls = np.clip(ls, -32, 31).astype(np.int16)                                # [n, 8]
    out = np.empty(n, IQ4_XS_BLOCK)
    out["d"] = d
    out["qs"] = pack_iq4(sub, (d[:, None] * ls).reshape(-1).astype(np.float32)).reshape(n, 128)
    u = (ls + 32).astype(np.uint16)
    out["scales_l"] = (u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)
    out["scales_h"] = ((u >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(1, dtype=np.uint16)
    return out


K_QUANTS = {GT.Q2_K: quantize_q2_k, GT.Q3_K: quantize_q3_k,
            GT.Q4_K: lambda x: quantize_k_min(x, 15, Q4_K_BLOCK),
            GT.Q5_K: lambda x: quantize_k_min(x, 31, Q5_K_BLOCK),
            GT.Q6_K: quantize_q6_k, GT.IQ4_XS: quantize_iq4_xs}


def quantize(data, qtype, threads=None):
    """float array [..., n_cols] -> uint8 array [..., bytes per row] of ggml type qtype, as
    gguf.quants.quantize returns (and GGUFWriter takes with raw_dtype). K-quants run on `threads`
    threads (default: every CPU)."""
    if qtype == GT.IQ4_NL:
        run, bs = quantize_iq4_nl, 32
    elif qtype in K_QUANTS:
        run, bs = K_QUANTS[qtype], QK_K
    else:
        return gguf_quants.quantize(np.asarray(data, np.float32), qtype)
    data = np.asarray(data, np.float32)
    if data.shape[-1] % bs:
        raise ValueError(f"rows of {data.shape[-1]} values are not whole {bs}-blocks")
    blocks = data.reshape(-1, bs)                                             # [n_blocks, bs]
    chunks = [blocks[i:i + CHUNK_BLOCKS] for i in range(0, len(blocks), CHUNK_BLOCKS)]
    threads = threads or os.cpu_count() or 1
    if threads > 1 and len(chunks) > 1:       # NumPy drops the GIL inside each whole-array pass
        with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
            parts = list(pool.map(run, chunks))
    else:
        parts = [run(c) for c in chunks]
    out = np.concatenate(parts).view(np.uint8)
    return out.reshape(*data.shape[:-1], -1)
