"""GLM-4 dense models: GGUF `chatglm` (GLM-4-9B-chat; transformers GlmForCausalLM) and
`glm4` (GLM-4-0414; Glm4ForCausalLM, which adds the post-attention and post-MLP norms).

The whole forward pass is `Model.forward`; the math is ../shared/SPEC.md's."""
import re
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..device import CPU_DEVICE, ON_CPU
from ..errors import GlmcpuError, ModelFileError
from ..gguf import GGUFFile, dequantize
from ..plan import chunk_edges, local_edges, row_halves
from ..weights import FileWeights, ShareError, row_bytes

K = ops.K


@dataclass(frozen=True)
class Config:
    arch: str
    n_layer: int
    d_model: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int          # rotated dims at the start of each head; the rest pass through
    rope_theta: float
    neox: bool          # RoPE pairs (i, i + n_rot/2) instead of (2i, 2i+1)
    eps: float
    n_ctx_train: int
    n_vocab: int
    sandwich_norms: bool = False   # glm4: norms of the attention and FFN outputs
    n_expert: int = 0              # routed experts per MoE layer (0: a dense model)
    n_nextn: int = 0               # MTP blocks after the n_layer layers (GLM-4.5: 1)

    def kv_bytes(self, n_ctx: int, kv_type=("f32", "f32")) -> int:
        """Bytes of a KV cache of n_ctx positions (keys and values of every KV head, of kv_type)."""
        per = sum(ops.kv_bytes_per_value(t) for t in kv_type)
        return int(per * self.n_layer * self.n_head_kv * self.head_dim) * n_ctx

    def describe(self) -> str:
        """The sizes the tensors' shapes follow from, for error messages."""
        return (f"width {self.d_model}, {self.n_head} heads ({self.n_head_kv} KV) of {self.head_dim}, "
                f"FFN {self.n_ff}, vocabulary {self.n_vocab}")

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        d = f.number("embedding_length", maximum=1 << 20)
        n_head = f.number("attention.head_count", maximum=d)
        head_dim = f.number("attention.key_length", d // n_head, maximum=1 << 16)
        n_block = f.number("block_count", maximum=10000)
        n_nextn = f.number("nextn_predict_layers", 0, minimum=0, maximum=n_block - 1)
        cfg = cls(
            arch=f.arch,
            n_layer=n_block - n_nextn,
            n_nextn=n_nextn,
            d_model=d,
            n_ff=f.number("feed_forward_length", maximum=1 << 24),
            n_head=n_head,
            n_head_kv=f.number("attention.head_count_kv", n_head, maximum=n_head),
            head_dim=head_dim,
            n_rot=f.number("rope.dimension_count", head_dim, minimum=0, maximum=head_dim),
            rope_theta=f.number("rope.freq_base", 10000.0, kind=float, minimum=1e-3),
            neox=False,
            eps=f.number("attention.layer_norm_rms_epsilon", kind=float, minimum=0, maximum=1),
            n_ctx_train=f.number("context_length", 4096),
            n_vocab=int(f.tensor("token_embd.weight").shape[1]),
            sandwich_norms=f.arch == "glm4",
        )
        if n_head % cfg.n_head_kv or cfg.n_rot % 2:
            raise ModelFileError(f"{f.path}: " + (f"{n_head} query heads do not share {cfg.n_head_kv} KV heads "
                                                  "evenly" if n_head % cfg.n_head_kv else
                                                  f"{f.arch}.rope.dimension_count = {cfg.n_rot} is odd"))
        return cfg


class Linear:
    """A weight as the kernels see it: rows of ggml-typed bytes, memory-mapped; optional bias.
    rows=(a, b) takes output rows a..b (a share of a split layer), cols=(a, b) input columns a..b
    (whole quantisation blocks; the outputs are then partial sums). Q4_0/Q8_0 weights are repacked
    at load into 8-row groups (kernels.h: q4_0x8), which the kernels read about twice as fast; the
    file's pages of them are then given back to the OS."""

    def __init__(self, w, name: str, bias: bool = False, rows=None, cols=None, chunk=None, dev=None):
        """chunk: the column edges [0, ..., n_in] of the chunks of a matrix whose outputs nodes add
        up (Wo, FFN down; plan.chunk_edges): it is then run chunk by chunk, summed in double
        (ops.linear_chunked), and returns float64. dev: the device its input and output live on
        (glmcpu.device; the CPU by default); a weight type that device cannot read is multiplied
        by the CPU, its input and output crossing."""
        self.name = name
        self.dev = self.home = dev or CPU_DEVICE          # home: the device that multiplies
        if cols is not None:
            self.w, self.type, self.n_in = w.cols(f"{name}.weight", *cols)
        else:
            self.w, self.type, self.n_in = w.rows(f"{name}.weight", *(rows or (None, None)))
        self.n_out = self.w.shape[0]                              # w: [n_out, row_bytes]
        if self.w.ndim != 2 or self.w.shape[1] != row_bytes(self.type, self.n_in):
            raise ShareError(f"{name}: rows of {self.w.shape[-1]} bytes do not hold {self.n_in} values "
                             f"of ggml type {self.type}")
        self.b = None
        if bias and cols is None and w.has(f"{name}.bias"):       # a column share adds no bias
            self.b = w.vector(f"{name}.bias", *(rows or (None, None)))
            if self.b.shape != (self.n_out,):
                raise ShareError(f"{name}.bias has {self.b.shape[0]} values for {self.n_out} rows")
        if not self.dev.takes(self.type):
            self.home = CPU_DEVICE
        if self.home is not CPU_DEVICE:                    # the file's rows, as the device holds them
            self.w = self.home.weight(self.w, self.type, self.n_in)
            self.b = None if self.b is None else self.home.vector(self.b)
            self.chunks = self.halves = None
            self.in_ram = self.packed = False
            return
        file_rows = self.w
        self.chunks = self.halves = None
        if chunk:
            if chunk[0] != 0 or chunk[-1] != self.n_in or any(b <= a for a, b in zip(chunk, chunk[1:])):
                raise ShareError(f"{name}: chunk edges {chunk[:3]}...{chunk[-1:]} do not cover its {self.n_in} columns")
            offs = [row_bytes(self.type, e) for e in chunk]       # whole blocks (ValueError otherwise)
            parts = [ops.repack(self.w[:, a:b], self.type, pack=w.pack) for a, b in zip(offs, offs[1:])]
            self.type = parts[0][1]
            self.in_ram = not np.may_share_memory(parts[0][0], file_rows)
            lines = [p for p, _ in parts]
            if self.in_ram and len(lines) > 1:
                # the chunks side by side in one allocation on huge pages: chunks of 1-3 MB on
                # 4 KB pages read at 15 GB/s where the same bytes on huge pages read at 24
                # (decode, ffn_down Q5_0)
                buf = np.concatenate([p.ravel() for p in lines], out=ops.huge_empty(sum(p.size for p in lines)))
                offs = np.cumsum([0] + [p.size for p in lines])
                lines = [buf[offs[i]:offs[i + 1]].reshape(p.shape) for i, p in enumerate(lines)]
            widths = [b - a for a, b in zip(chunk, chunk[1:])]
            self.chunks = K.Chunked(list(zip(lines, widths)), self.type)
            # the same chunks over each half of the output rows (views, no copies): row_blocks
            grp = 8 if self.type in ops.PACKED else 1
            self.halves = [((a, b), K.Chunked([(ln[a // grp:b // grp], n) for ln, n in zip(lines, widths)], self.type))
                           for a, b in row_halves(self.n_out)] if self.n_out % 8 == 0 else None
            self.w = None
        else:
            self.w, self.type = ops.repack(self.w, self.type, pack=w.pack)    # Q4_0/Q8_0: [n_out/8, 8 * row_bytes]
            self.in_ram = self.w is not file_rows                # packed, or a K-quant's RAM copy
        self.packed = self.type in ops.PACKED                       # in 8-row groups
        if self.in_ram and not name.startswith("token_embd"):   # embedding rows are still read
            w.release(f"{name}.weight")

    @classmethod
    def fused(cls, parts):
        """One Linear of several with the same input (q|k|v, gate|up): one activation
        quantisation and one thread split instead of several; rows stacked in order. None if
        their layouts differ (or a fused row count would split an 8-row group)."""
        first = parts[0]
        if any(p.type != first.type or p.n_in != first.n_in for p in parts) or (
                first.packed and any(p.n_out % 8 for p in parts)):
            return None
        if any((p.b is None) != (first.b is None) for p in parts):
            return None
        new = cls.__new__(cls)
        new.name = "+".join(p.name for p in parts)
        new.w = np.concatenate([p.w for p in parts], 0, out=ops.huge_empty(          # a copy: only of packed
            (sum(p.w.shape[0] for p in parts),) + first.w.shape[1:], first.w.dtype))   # (RAM) weights
        new.type, new.n_in, new.packed, new.in_ram, new.chunks = first.type, first.n_in, first.packed, True, None
        new.halves = None
        new.dev, new.home = first.dev, first.home
        new.n_out = sum(p.n_out for p in parts)
        new.b = None if first.b is None else np.concatenate([p.b for p in parts])
        return new

    def row_blocks(self, x, threads):
        """A chunked matrix's output in halves of its rows, each as soon as it is computed:
        (a, b, [T, b - a] float64), the same bits as __call__'s columns a..b."""
        if self.halves is None:
            yield 0, self.n_out, self(x, threads)
            return
        for (a, b), m in self.halves:
            yield a, b, ops.linear_chunked(m, x, threads)

    def __call__(self, x, threads):            # x [T, n_in] -> [T, n_out] (float64 if chunked)
        if self.home is not self.dev:                       # the CPU multiplies for a device
            return self.dev.asarray(np.asarray(self.on_cpu(self.dev.to_host(x), threads), np.float32))
        if self.home is not CPU_DEVICE:
            y = self.home.linear(self.w, x)
            if self.b is not None:
                y += self.b
            return y
        return self.on_cpu(x, threads)

    def on_cpu(self, x, threads):
        if self.chunks is not None:
            return ops.linear_chunked(self.chunks, x, threads)
        y = ops.linear(self.w, self.type, self.n_in, x, threads, self.n_out)
        if self.b is not None:
            y += self.b
        return y


def linears(w, parts, bias=False, dev=None):
    """Linears of (tensor, (a, b) rows) parts with one input, fused into one where they can be
    (in RAM, one layout); a list of one or more."""
    lins = [Linear(w, name, bias=bias, rows=rng, dev=dev) for name, rng in parts]
    if len(lins) > 1 and lins[0].in_ram:
        fused = Linear.fused(lins)
        if fused is not None:
            return [fused]
    return lins


def run_parts(lins, x, th):
    """Outputs of linears() side by side: [T, sum of n_out]."""
    outs = [lin(x, th) for lin in lins]
    return outs[0] if len(outs) == 1 else lins[0].dev.xp.concatenate(outs, 1)


# element types of a KV cache (ops.KV_DTYPES): keys and values are stored in one of these when a
# position is written (rounded once); scores, softmax and sums stay float32 (kernels.h attention)
KV_TYPES = tuple(ops.KV_DTYPES)


def kv_type(k="f32", v=None, head_dim=None) -> tuple:
    """(key type, value type) of --kv-type-k / --kv-type-v (v defaults to k); one line if unknown
    or (given head_dim) if a head's values do not fill whole blocks of the type."""
    types = (k or "f32", v or k or "f32")
    for t in types:
        if t not in KV_TYPES:
            raise GlmcpuError(f"KV cache type {t!r}: use one of {', '.join(KV_TYPES)}")
        if head_dim is not None and head_dim % ops.KV_BLOCK[t]:
            raise GlmcpuError(f"KV cache type {t}: holds blocks of {ops.KV_BLOCK[t]} values, and this model's "
                              f"heads have {head_dim}")
    return types


def checked_kv_type(types, head_dim: int) -> tuple:
    return kv_type(*types, head_dim=head_dim)


class KVCache:
    """Keys and values of every layer's KV heads. The arrays are allocated as zero pages, so a
    node that computes only some heads holds in RAM only the heads it writes."""

    def __init__(self, cfg: Config, n_ctx: int, kv_type=("f32", "f32"), devices=None):
        """devices: {layer: device} of layers that run off the CPU: theirs are float32 arrays on
        that device (the GPU's attention reads float32), the host arrays' rows of them untouched."""
        kv_type = checked_kv_type(kv_type, cfg.head_dim)
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx)
        self.type = kv_type
        # [n_layer, n_head_kv, n_ctx, head_dim / block], in ops.KV_DTYPES
        self.k = np.zeros(shape + (cfg.head_dim // ops.KV_BLOCK[kv_type[0]],), ops.KV_DTYPES[kv_type[0]])
        self.v = np.zeros(shape + (cfg.head_dim // ops.KV_BLOCK[kv_type[1]],), ops.KV_DTYPES[kv_type[1]])
        self.n_ctx = n_ctx
        self.pos = 0                              # positions filled so far
        self.tokens = []                          # the ids at those positions (a cluster replays them)
        self.draft = None                         # a speculative draft's state kept beside it (draft.py)
        self.cfg = cfg
        shape = (cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.on_device = {l: (d, d.zeros(shape), d.zeros(shape)) for l, d in (devices or {}).items()}

    def layer(self, l: int):
        """(keys, values) of layer l: [n_head_kv, n_ctx, .], where that layer runs."""
        if l in self.on_device:
            return self.on_device[l][1:]
        return self.k[l], self.v[l]

    def to_host(self, n: int):
        """The device layers' positions 0..n-1 into the host arrays (in the cache's types): what
        is saved, copied or shifted is then all in self.k and self.v."""
        for l, (d, k, v) in self.on_device.items():
            self.k[l, :, :n] = ops.kv_encode(d.to_host(k[:, :n]), self.type[0])
            self.v[l, :, :n] = ops.kv_encode(d.to_host(v[:, :n]), self.type[1])

    def to_device(self, n: int):
        """The host arrays' positions 0..n-1 back to the device layers (after a restore or a shift)."""
        for l, (d, k, v) in self.on_device.items():
            k[:, :n] = d.asarray(ops.kv_decode(self.k[l, :, :n], self.type[0]))
            v[:, :n] = d.asarray(ops.kv_decode(self.v[l, :, :n], self.type[1]))

    def drop(self, a: int, d: int, m: int):
        """Forget positions a..a+d-1: the m positions after them move down to a.., their keys
        rotated back by d (values carry no position). What they attended to stays as it was
        computed, as in llama.cpp's context shift: cheaper than computing them again, not equal."""
        c, step = self.cfg, 1024
        self.to_host(a + d + m)
        for s in range(0, m, step):                     # in order: a destination never overtakes its source
            n = min(step, m - s)
            for l in range(c.n_layer):
                k = ops.kv_decode(self.k[l, :, a + d + s:a + d + s + n].transpose(1, 0, 2), self.type[0])
                ops.rope_by(k, -d, c.n_rot, c.rope_theta, c.neox)              # [n, n_head_kv, head_dim]
                self.k[l, :, a + s:a + s + n] = ops.kv_encode(k, self.type[0]).transpose(1, 0, 2)
                self.v[l, :, a + s:a + s + n] = self.v[l, :, a + d + s:a + d + s + n]
        self.tokens = self.tokens[:a] + self.tokens[a + d:a + d + m]
        self.pos = a + m
        self.to_device(a + m)


def commit(cache, ids):
    """The step's tokens join the cache only once all of it, the head included, has come back: a
    step that raises (a cluster that lost a worker) leaves the cache as it was, to be run again."""
    for c, a, b in segments(cache, len(ids)):
        c.pos += b - a
        c.tokens += [int(i) for i in ids[a:b]]


class Batch:
    """The tokens of several sequences in one forward pass (continuous batching): `parts` are
    (cache, n) in the order their tokens follow each other in the step's ids, each sequence's n
    tokens at its own positions cache.pos... The layers read every weight once for all of them;
    attention runs per sequence over its own cache (Attention.mix). The kernels give a row the
    same bits whatever rows share its batch, so each sequence computes what it would alone."""

    def __init__(self, parts):
        """parts: (cache, n) or (cache, n, logits wanted: False for a prompt's chunk before its last)."""
        self.caches = [p[0] for p in parts]
        if len({id(c) for c in self.caches}) != len(self.caches) or any(p[1] < 1 for p in parts):
            raise ValueError("a batch holds each cache once, with a token or more")
        edges = np.cumsum([0] + [int(p[1]) for p in parts])
        self.parts = [(c, int(a), int(b)) for c, a, b in zip(self.caches, edges, edges[1:])]
        # the row of each wanted sequence's last token: the logits forward returns, in this order
        self.lasts = [b - 1 for (_, _, b), p in zip(self.parts, parts) if len(p) < 3 or p[2]]

    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(c.pos, c.pos + b - a, dtype=np.int32) for c, a, b in self.parts])


def segments(cache, T: int) -> list:
    """[(cache, first row, end row)] of a step of T tokens: one sequence, or a Batch's."""
    return cache.parts if isinstance(cache, Batch) else [(cache, 0, T)]


def optional_vector(w, name: str):
    return w.vector(name) if w.has(name) else None


def check(ok: bool, what: str):
    if not ok:
        raise ShareError(what)


class Attention:
    """Pre-normed causal GQA with biases, partial RoPE and a KV cache; optional per-head q/k norm.
    heads=(q0, q1): only query heads q0..q1, the KV heads they read, and their columns of the
    output projection (whose output is then this share's partial sum)."""

    def __init__(self, w, p: str, cfg: Config, heads=None, dev=None):
        self.cfg, self.dev = cfg, dev or CPU_DEVICE
        dev = self.dev
        hd, G = cfg.head_dim, cfg.n_head // cfg.n_head_kv
        self.q0, self.q1 = q0, q1 = heads or (0, cfg.n_head)
        self.kv0, self.kv1 = kv0, kv1 = q0 // G, (q1 - 1) // G + 1
        check(0 <= q0 < q1 <= cfg.n_head, f"{p}: query heads {q0}..{q1} of {cfg.n_head}")
        self.nq, self.nkv = q1 - q0, kv1 - kv0
        q, kv = (q0 * hd, q1 * hd), (kv0 * hd, kv1 * hd)
        if w.has(p + "attn_qkv.weight"):         # chatglm files may fuse Q, K, V (rows in that order)
            if heads is None:
                self.qkv = [Linear(w, p + "attn_qkv", bias=True, dev=dev)]
            else:
                off_k, off_v = cfg.n_head * hd, (cfg.n_head + cfg.n_head_kv) * hd
                self.qkv = linears(w, [(p + "attn_qkv", q), (p + "attn_qkv", (off_k + kv[0], off_k + kv[1])),
                                       (p + "attn_qkv", (off_v + kv[0], off_v + kv[1]))], bias=True, dev=dev)
        else:
            whole = heads is None
            self.qkv = linears(w, [(p + "attn_q", None if whole else q), (p + "attn_k", None if whole else kv),
                                   (p + "attn_v", None if whole else kv)], bias=True, dev=dev)
        self.width = (self.nq + 2 * self.nkv) * hd                            # q | k | v outputs
        check(sum(lin.n_out for lin in self.qkv) == self.width and
              all(lin.n_in == cfg.d_model for lin in self.qkv), f"{p}: q/k/v shapes disagree with the config")
        self.q_norm = optional_vector(w, p + "attn_q_norm.weight")       # [head_dim]
        self.k_norm = optional_vector(w, p + "attn_k_norm.weight")       # [head_dim]
        check((self.q_norm is None or self.q_norm.shape == (hd,)) and (self.k_norm is None) == (self.q_norm is None)
              and (self.k_norm is None or self.k_norm.shape == (hd,)), f"{p}: q/k norms are not head_dim wide")
        self.wo = Linear(w, p + "attn_output", cols=None if heads is None else q, dev=dev,
                         chunk=local_edges(chunk_edges(cfg.n_head * hd, hd), q0 * hd, q0 * hd + self.nq * hd))
        check(self.wo.n_in == self.nq * hd and self.wo.n_out == cfg.d_model, f"{p}: attn_output shape")
        self.scale = 1.0 / np.sqrt(hd)
        # whole KV groups map local q head i to local kv head i // G; a slice of a group goes head by head
        self.groups = None if q0 % G == 0 and self.nq % G == 0 else [(q0 + i) // G - kv0 for i in range(self.nq)]
        if self.q_norm is not None:
            self.q_norm, self.k_norm = dev.vector(self.q_norm), dev.vector(self.k_norm)

    def __call__(self, x, cache, l: int, pos, th):     # x [T, d_model] (normed) -> [T, d_model] float64
        return self.wo(self.mix(x, cache, l, pos, th), th)

    def row_blocks(self, x, cache, l: int, pos, th):
        """__call__'s output in halves of its rows, each as soon as it is computed (Linear.row_blocks)."""
        yield from self.wo.row_blocks(self.mix(x, cache, l, pos, th), th)

    def mix(self, x, cache, l: int, pos, th):          # -> the heads' outputs [T, nq * head_dim]
        c, T, hd, d = self.cfg, x.shape[0], self.cfg.head_dim, self.dev
        qkv = run_parts(self.qkv, x, th)                                      # [T, width]
        q = d.xp.ascontiguousarray(qkv[:, :self.nq * hd]).reshape(T, self.nq, hd)
        k = d.xp.ascontiguousarray(qkv[:, self.nq * hd:(self.nq + self.nkv) * hd]).reshape(T, self.nkv, hd)
        v = qkv[:, (self.nq + self.nkv) * hd:].reshape(T, self.nkv, hd)
        if self.q_norm is not None:
            q = d.head_norm(q, self.q_norm, c.eps)
            k = d.head_norm(k, self.k_norm, c.eps)
        d.rope(q, pos, c)
        d.rope(k, pos, c)
        parts = segments(cache, T)
        outs = []
        for c, a, b in parts:                                              # each sequence over its own cache
            kc, vc = c.layer(l)
            kc, vc = kc[self.kv0:self.kv1], vc[self.kv0:self.kv1]            # [nkv, n_ctx, head_dim]
            d.kv_write(kc, vc, c.pos, k[a:b], v[a:b], c.type)
            outs.append(d.attention(q[a:b], kc, vc, c.pos, self.scale, th, self.groups))
        out = outs[0] if len(outs) == 1 else d.xp.concatenate(outs, 0)
        return out.reshape(T, -1)


class DenseFFN:
    """silu(x Wg) * (x Wu) -> Wd, with gate and up fused in one [gate | up] tensor or apart.
    cols=(a, b): only intermediate units a..b (rows of gate and up, columns of down)."""

    def __init__(self, w, p: str, n_ff: int, d_model: int, suffix: str = "", cols=None, split=True, dev=None):
        """split: nodes may share this FFN, so its down projection sums in chunks (float64 out)."""
        self.dev = dev = dev or CPU_DEVICE
        a, b = cols or (0, n_ff)
        check(0 <= a < b <= n_ff, f"{p}: FFN units {a}..{b} of {n_ff}")
        whole = cols is None
        if w.has(p + "ffn_gate" + suffix + ".weight"):
            parts = [(p + "ffn_gate" + suffix, None if whole else (a, b)),
                     (p + "ffn_up" + suffix, None if whole else (a, b))]
        elif whole:                                              # fused [gate | up] rows
            parts = [(p + "ffn_up" + suffix, None)]
        else:
            parts = [(p + "ffn_up" + suffix, (a, b)), (p + "ffn_up" + suffix, (n_ff + a, n_ff + b))]
        self.gate_up = linears(w, parts, dev=dev)
        self.down = Linear(w, p + "ffn_down" + suffix, cols=None if whole else (a, b), dev=dev,
                           chunk=local_edges(chunk_edges(n_ff), a, b) if split else None)
        check(sum(lin.n_out for lin in self.gate_up) == 2 * (b - a) and
              all(lin.n_in == d_model for lin in self.gate_up) and self.down.n_in == b - a
              and self.down.n_out == d_model, f"{p}: FFN{suffix} shapes disagree with the config")

    def __call__(self, x, th):                           # x [T, d_model] -> [T, d_model]
        return self.down(self.hidden(x, th), th)

    def row_blocks(self, x, th):
        """__call__'s output in halves of its rows, each as soon as it is computed (Linear.row_blocks)."""
        yield from self.down.row_blocks(self.hidden(x, th), th)

    def hidden(self, x, th):                             # -> silu(gate) * up [T, units]
        return self.dev.silu_mul(run_parts(self.gate_up, x, th), th)      # [T, 2 * units]: gate | up


class Norms:
    """What every node of a mesh holds whole beside its shares (cluster/: each node runs the layer
    loop itself): a layer's norms (layer -1: the output norm), and in a MoE layer its router."""

    def __init__(self, w, cfg: Config, layer: int, ffn_norm_name: str):
        if layer < 0:
            self.out_norm = w.vector("output_norm.weight")
            return
        p = f"blk.{layer}."
        self.attn_norm = w.vector(p + "attn_norm.weight")
        self.post_attn_norm = w.vector(p + "post_attention_norm.weight") if cfg.sandwich_norms else None
        self.ffn_norm = w.vector(p + ffn_norm_name)
        self.post_ffw_norm = w.vector(p + "post_ffw_norm.weight") if cfg.sandwich_norms else None
        self.router = None


class Layer:
    def __init__(self, model, w, i: int, ranges):
        cfg, p = model.cfg, f"blk.{i}."
        self.dev = dev = model.placement.layer(i)        # where it runs (glmcpu.device)
        self.attn_norm = dev.vector(w.vector(p + "attn_norm.weight"))
        self.attn = model.build(w, cfg, "attn", i, ranges("attn", i), dev=dev)
        self.post_attn_norm = dev.vector(w.vector(p + "post_attention_norm.weight")) if cfg.sandwich_norms else None
        self.ffn_norm = dev.vector(w.vector(p + model.ffn_norm_name))
        kind = model.ffn_kind(i)
        if kind == "ffn":
            self.ffn = model.build(w, cfg, "ffn", i, ranges("ffn", i), dev=dev)
        else:
            self.ffn = model.moe_class(w, p, cfg, lambda: model.build(
                w, cfg, "moe", i, ranges("moe", i), model.repack, dev=model.placement.experts(i)), dev=dev)
        self.post_ffw_norm = dev.vector(w.vector(p + "post_ffw_norm.weight")) if cfg.sandwich_norms else None

    @classmethod
    def of(cls, norms: Norms, attn, ffn) -> "Layer":
        """A layer put together from parts built apart (a mesh node's norms and wrapped shares)."""
        L = cls.__new__(cls)
        L.attn_norm, L.post_attn_norm = norms.attn_norm, norms.post_attn_norm
        L.ffn_norm, L.post_ffw_norm = norms.ffn_norm, norms.post_ffw_norm
        L.attn, L.ffn = attn, ffn
        L.dev = CPU_DEVICE
        return L


def whole(kind, layer):
    return None


class Model:
    """The whole forward pass. ranges(kind, layer) -> (a, b), None (all of it) or () (none of
    it) picks this node's share of each split module: kind "attn" (query heads), "ffn" (FFN
    units), "moe" (routed experts) or "head" (vocabulary rows of the output)."""
    config_class = Config
    layer_class = Layer
    ffn_norm_name = "ffn_norm.weight"

    def __init__(self, f: GGUFFile, threads: int, ranges=whole, progress=None, packing=None, kv_type=("f32", "f32"),
                 placement=None):
        """progress(done, total) per layer; packing: what to copy into RAM (ops.plan_packing);
        kv_type: (keys, values) element types of the caches it makes (KV_TYPES); placement: which
        device runs each layer, the experts and the head (glmcpu.device.place; all on the CPU by default)."""
        self.cfg = cfg = self.config_class.from_gguf(f)
        self.placement = placement or ON_CPU
        self.threads = threads
        self.kv_type = kv_type
        self.packing = packing or ops.plan_packing(f)
        w = FileWeights(f, pack=self.packing.dense)
        self.repack = self.packing.experts
        self.embd = f.tensor("token_embd.weight")               # [n_vocab, d_model], any type
        self.layers = []
        for i in range(cfg.n_layer):
            self.layers.append(Layer(self, w, i, ranges))
            if progress:
                progress(i + 1, cfg.n_layer)
        self.out_norm = w.vector("output_norm.weight")
        self.head_dev = self.placement.head()
        self.output = self.build(w, cfg, "head", None, ranges("head", None), dev=self.head_dev)
        self.out_norm_dev = self.head_dev.vector(self.out_norm)     # where the head runs
        self.file, self.weights = f, w      # for modules built later (a draft head)

    def draft_head(self):
        """The file's own draft model (GLM-4.5's MTP block), built on first use; None if none."""
        return None

    @classmethod
    def tensor_shapes(cls, cfg) -> dict:
        """The ggml shapes (row length first) the config gives the tensors this family reads:
        {name, or "blk.*." + the name in each layer: [allowed shapes]}."""
        d, hd, ff = cfg.d_model, cfg.head_dim, cfg.n_ff
        q, kv = cfg.n_head * hd, cfg.n_head_kv * hd
        layer = {"attn_q.weight": (d, q), "attn_k.weight": (d, kv), "attn_v.weight": (d, kv),
                 "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                 "attn_qkv.weight": (d, q + 2 * kv), "attn_qkv.bias": (q + 2 * kv,),
                 "attn_output.weight": (q, d), "attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,),
                 "attn_norm.weight": (d,), "ffn_norm.weight": (d,), "post_attention_norm.weight": (d,),
                 "post_ffw_norm.weight": (d,), "ffn_gate.weight": (d, ff), "ffn_down.weight": (ff, d)}
        shapes = {"blk.*." + k: [v] for k, v in layer.items()}
        shapes["blk.*.ffn_up.weight"] = [(d, ff), (d, 2 * ff)]        # apart from ffn_gate, or fused
        shapes.update({"token_embd.weight": [(d, cfg.n_vocab)], "output.weight": [(d, cfg.n_vocab)],
                       "output_norm.weight": [(d,)]})
        return shapes

    @classmethod
    def check_tensors(cls, f, cfg):
        """Every tensor this family reads has the shape its config says (one line naming the
        first that does not): a file whose metadata and tensors disagree stops here, at open."""
        shapes = cls.tensor_shapes(cfg)
        for name, t in f.tensors.items():
            key = name if name in shapes else re.sub(r"^blk\.\d+\.", "blk.*.", name)
            want = shapes.get(key)
            got = tuple(int(x) for x in t.shape)
            if want is not None and got not in want:
                raise ModelFileError(f"{f.path}: tensor {name} has shape {got} (ggml order); its metadata "
                                     f"({cfg.describe()}) says {' or '.join(map(str, want))}")

    def ffn_kind(self, i) -> str:
        return "ffn"

    @classmethod
    def build(cls, w, cfg, kind, layer, rng, repack=False, dev=None):
        """One module of this family over a range (see ranges) on device dev (the CPU by default);
        None for an empty range. Workers build their shares with this too: the math is the same code
        on every node."""
        if rng == ():
            return None
        p = f"blk.{layer}."
        if kind == "norms":
            return Norms(w, cfg, layer, cls.ffn_norm_name)
        if kind == "attn":
            return Attention(w, p, cfg, heads=rng, dev=dev)
        if kind == "ffn":
            return DenseFFN(w, p, cfg.n_ff, cfg.d_model, cols=rng, dev=dev)
        if kind == "head":
            head = Linear(w, "output" if w.has("output.weight") else "token_embd", rows=rng, dev=dev)
            check(head.n_in == cfg.d_model and head.n_out == (cfg.n_vocab if rng is None else rng[1] - rng[0]),
                  "output: shape disagrees with the config")
            return head
        raise ShareError(f"{cfg.arch} models have no {kind!r} modules")

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg, n_ctx, self.kv_type,
                       {l: L.dev for l, L in enumerate(self.layers) if L.dev is not CPU_DEVICE})

    def begin(self, cache):
        """Called before each request on the kept cache (a cluster checks its workers here)."""

    def status(self) -> dict:
        """Figures for --stats and the chat's status line ({} for one process)."""
        return {}

    def expert_stats(self) -> dict:
        """{layer: hits per expert [n_expert]} for the MoE layers since load."""
        return {i: L.ffn.hits.copy() for i, L in enumerate(self.layers) if hasattr(L.ffn, "hits")}

    def rmsnorm(self, x, w):
        return CPU_DEVICE.rmsnorm(x, w, self.cfg.eps)

    @staticmethod
    def embed(embd, ids) -> np.ndarray:
        """float32 rows [T, d_model] of an embedding tensor (any ggml type)."""
        return dequantize(embd, np.asarray(ids)).reshape(len(ids), -1).copy()

    def run_layer(self, L: Layer, h, cache, l: int, pos):
        """One decoder layer on the residual stream h [T, d_model] in place; its keys and values
        go to layer l of the cache, at slots cache.pos.. (rotated for positions pos)."""
        th, d, eps = self.threads, L.dev, self.cfg.eps
        o = L.attn(d.rmsnorm(h, L.attn_norm, eps), cache, l, pos, th)
        if L.post_attn_norm is not None:
            o = d.rmsnorm(o.astype(np.float32), L.post_attn_norm, eps)
        h += o
        y = L.ffn(d.rmsnorm(h, L.ffn_norm, eps), th)
        if L.post_ffw_norm is not None:
            y = d.rmsnorm(y.astype(np.float32), L.post_ffw_norm, eps)
        h += y

    def forward(self, ids, cache: KVCache, all_logits: bool = False, hidden: bool = False):
        """Run tokens `ids` at positions cache.pos.. and advance the cache (or the caches of a Batch,
        each its own tokens at its own positions). Returns logits [T, n_vocab] (all_logits) or
        [1, n_vocab] for the last token (a Batch: [sequences, n_vocab], each one's last); with
        hidden=True also the final-normed hidden states of every token, [T, d_model] (what
        GLM-4.5's MTP draft head reads)."""
        T = len(ids)
        pos = cache.positions() if isinstance(cache, Batch) else np.arange(cache.pos, cache.pos + T, dtype=np.int32)
        h = self.embed(self.embd, ids)                                   # [T, d_model]
        on = CPU_DEVICE                                                  # where h is
        for l, L in enumerate(self.layers):
            if L.dev is not on:                                          # a crossing (CPU <-> GPU)
                h, on = L.dev.asarray(on.to_host(h)), L.dev
            self.run_layer(L, h, cache, l, pos)
        lasts = cache.lasts if isinstance(cache, Batch) else [T - 1]
        if not (lasts or all_logits or hidden):                          # prompt chunks, none at its end
            commit(cache, ids)
            return np.zeros((0, self.cfg.n_vocab), np.float32)
        if not (all_logits or hidden):
            h = h[lasts]
        d = self.head_dev
        if d is not on:
            h, on = d.asarray(on.to_host(h)), d
        normed = d.rmsnorm(d.xp.ascontiguousarray(h), self.out_norm_dev, self.cfg.eps)   # rows are independent
        rows = d.xp.ascontiguousarray(normed[lasts]) if hidden and not all_logits else normed  # h kept whole for hidden
        logits = self.output(rows, self.threads)
        commit(cache, ids)
        logits = d.to_host(logits)
        return (logits, d.to_host(normed)) if hidden else logits
