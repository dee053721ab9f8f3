"""GLM-4 dense models: GGUF `chatglm` (GLM-4-9B-chat; transformers GlmForCausalLM) and
`glm4` (GLM-4-0414; Glm4ForCausalLM, which adds the post-attention and post-MLP norms).

The whole forward pass is `Model.forward`; the math is ../shared/SPEC.md's."""
from dataclasses import dataclass

import numpy as np

from .. import ops
from ..gguf import GGUFFile, dequantize

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

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        d = int(f.require("embedding_length"))
        n_head = int(f.require("attention.head_count"))
        head_dim = int(f.arch_get("attention.key_length", d // n_head))
        return cls(
            arch=f.arch,
            n_layer=int(f.require("block_count")) - int(f.arch_get("nextn_predict_layers", 0)),
            d_model=d,
            n_ff=int(f.require("feed_forward_length")),
            n_head=n_head,
            n_head_kv=int(f.arch_get("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_rot=int(f.arch_get("rope.dimension_count", head_dim)),
            rope_theta=float(f.arch_get("rope.freq_base", 10000.0)),
            neox=False,
            eps=float(f.require("attention.layer_norm_rms_epsilon")),
            n_ctx_train=int(f.arch_get("context_length", 4096)),
            n_vocab=int(f.tensor("token_embd.weight").shape[1]),
        )


class Linear:
    """A weight as the kernels see it: rows of ggml-typed bytes, memory-mapped; optional bias.
    Q4_0/Q8_0 weights are repacked at load into 8-row groups (kernels.h: q4_0x8), which the kernels
    read about twice as fast; the file's pages of them are then given back to the OS."""

    def __init__(self, f: GGUFFile, name: str, bias: bool = False):
        self.name = name
        self.w, self.type, self.n_out, self.n_in = f.matrix(f"{name}.weight")  # w: [n_out, row_bytes]
        self.b = f.vector(f"{name}.bias") if bias and f.has(f"{name}.bias") else None
        file_rows = self.w
        self.w, self.type = ops.repack(self.w, self.type)        # Q4_0/Q8_0: [n_out/8, 8 * row_bytes]
        self.packed = self.type in (ops.Q4_0X8, ops.Q8_0X8)     # in 8-row groups
        self.in_ram = self.w is not file_rows                   # packed, or a K-quant's RAM copy
        if self.in_ram and not name.startswith("token_embd"):   # embedding rows are still read
            f.release(f"{name}.weight")

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
        new.w = np.concatenate([p.w for p in parts], 0)          # a copy: only of packed (RAM) weights
        new.type, new.n_in, new.packed, new.in_ram = first.type, first.n_in, first.packed, True
        new.n_out = sum(p.n_out for p in parts)
        new.b = None if first.b is None else np.concatenate([p.b for p in parts])
        return new

    def __call__(self, x, threads):            # x [T, n_in] -> [T, n_out]
        y = ops.linear(self.w, self.type, self.n_in, x, threads, self.n_out)
        if self.b is not None:
            y += self.b
        return y


class KVCache:
    def __init__(self, cfg: Config, n_ctx: int, allocate: bool = True):
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim) if allocate else (0, 0, 0, 0)
        self.k = np.zeros(shape, np.float32)      # [n_layer, n_head_kv, n_ctx, head_dim]
        self.v = np.zeros(shape, np.float32)      # [n_layer, n_head_kv, n_ctx, head_dim]
        self.n_ctx = n_ctx
        self.pos = 0                              # positions filled so far
        self.tokens = []                          # the ids at those positions (a cluster replays them)


def optional_vector(f: GGUFFile, name: str):
    return f.vector(name) if f.has(name) else None


class Attention:
    """Pre-normed causal GQA with biases, partial RoPE and a KV cache; optional per-head q/k norm."""

    def __init__(self, f: GGUFFile, p: str, cfg: Config):
        self.cfg = cfg
        if f.has(p + "attn_qkv.weight"):         # chatglm files may fuse Q, K, V (rows in that order)
            self.qkv = [Linear(f, p + "attn_qkv", bias=True)]
        else:
            self.qkv = [Linear(f, p + n, bias=True) for n in ("attn_q", "attn_k", "attn_v")]
            if self.qkv[0].in_ram:           # already copied into RAM: fuse into one matrix
                fused = Linear.fused(self.qkv)
                self.qkv = [fused] if fused is not None else self.qkv
        self.q_norm = optional_vector(f, p + "attn_q_norm.weight")       # [head_dim]
        self.k_norm = optional_vector(f, p + "attn_k_norm.weight")       # [head_dim]
        self.wo = Linear(f, p + "attn_output")
        self.scale = 1.0 / np.sqrt(cfg.head_dim)
        q_width = cfg.n_head * cfg.head_dim
        self.split = (q_width, q_width + cfg.n_head_kv * cfg.head_dim)   # fused qkv -> q | k | v

    def __call__(self, x, cache, l: int, pos, th):     # x [T, d_model] (normed) -> [T, d_model]
        c, T, pos0 = self.cfg, x.shape[0], cache.pos
        if len(self.qkv) == 1:
            qkv = self.qkv[0](x, th)
            q, k, v = qkv[:, :self.split[0]], qkv[:, self.split[0]:self.split[1]], qkv[:, self.split[1]:]
        else:
            q, k, v = (lin(x, th) for lin in self.qkv)
        q = np.ascontiguousarray(q).reshape(T, c.n_head, c.head_dim)
        k = np.ascontiguousarray(k).reshape(T, c.n_head_kv, c.head_dim)
        if self.q_norm is not None:
            q = head_norm(q, self.q_norm, c.eps)
            k = head_norm(k, self.k_norm, c.eps)
        K.rope(q, pos, c.n_rot, c.rope_theta, c.neox)
        K.rope(k, pos, c.n_rot, c.rope_theta, c.neox)
        cache.k[l, :, pos0:pos0 + T] = k.transpose(1, 0, 2)
        cache.v[l, :, pos0:pos0 + T] = v.reshape(T, c.n_head_kv, c.head_dim).transpose(1, 0, 2)
        a = K.attention(q, cache.k[l], cache.v[l], pos0, self.scale, np.empty_like(q), th)
        return self.wo(a.reshape(T, -1), th)


def head_norm(x, w, eps):
    """RMSNorm over each head's dims: x [T, H, D], w [D]."""
    T, H, D = x.shape
    return K.rmsnorm(x.reshape(T * H, D), w, eps, np.empty((T * H, D), np.float32)).reshape(T, H, D)


class DenseFFN:
    """silu(x Wg) * (x Wu) -> Wd, with gate and up fused in one [gate | up] tensor or apart."""

    def __init__(self, f: GGUFFile, p: str, suffix: str = ""):
        self.gate = Linear(f, p + "ffn_gate" + suffix) if f.has(p + "ffn_gate" + suffix + ".weight") else None
        self.up = Linear(f, p + "ffn_up" + suffix)
        self.down = Linear(f, p + "ffn_down" + suffix)
        if self.gate is not None and self.gate.in_ram:      # in RAM already: fuse to [gate | up]
            fused = Linear.fused([self.gate, self.up])
            if fused is not None:
                self.gate, self.up = None, fused

    def __call__(self, x, th):                           # x [T, d_model] -> [T, d_model]
        gu = self.up(x, th) if self.gate is None else np.concatenate([self.gate(x, th), self.up(x, th)], 1)
        return self.down(K.silu_mul(gu, np.empty((x.shape[0], gu.shape[1] // 2), np.float32), th), th)


class Layer:
    def __init__(self, f: GGUFFile, i: int, cfg: Config, factory=None):
        p = f"blk.{i}."
        self.attn_norm = f.vector(p + "attn_norm.weight")
        self.attn = factory(f, p, i, "attn") if factory else Attention(f, p, cfg)
        # glm4 only: norms of the attention and FFN outputs ("sandwich" norms)
        sandwich = cfg.arch == "glm4"
        self.post_attn_norm = f.vector(p + "post_attention_norm.weight") if sandwich else None
        self.ffn_norm = f.vector(p + "ffn_norm.weight")
        self.ffn = factory(f, p, i, "dense") if factory else DenseFFN(f, p)
        self.post_ffw_norm = f.vector(p + "post_ffw_norm.weight") if sandwich else None


class Model:
    config_class = Config

    def __init__(self, f: GGUFFile, threads: int, factory=None, progress=None):
        """factory(f, prefix, layer, "attn" | "dense" | "moe") builds those modules instead (the
        cluster uses it to build only this machine's share); progress(done, total) per layer."""
        self.cfg = cfg = self.config_class.from_gguf(f)
        self.threads = threads
        self.factory = factory
        self.runner = None
        self.embd = f.tensor("token_embd.weight")               # [n_vocab, d_model], any type
        self.layers = []
        for i in range(cfg.n_layer):
            self.layers.append(self.make_layer(f, i))
            if progress:
                progress(i + 1, cfg.n_layer)
        self.out_norm = f.vector("output_norm.weight")
        self.output = Linear(f, "output" if f.has("output.weight") else "token_embd")

    def make_layer(self, f, i):
        return Layer(f, i, self.cfg, self.factory)

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg, n_ctx, allocate=self.factory is None)   # a cluster's shares keep their own

    def rmsnorm(self, x, w):
        return K.rmsnorm(x, w, self.cfg.eps, np.empty_like(x))

    def forward(self, ids, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.pos.. and advance the cache.
        Returns logits [T, n_vocab] (all_logits) or [1, n_vocab] for the last token."""
        if self.runner is not None:           # a cluster: replays the sequence if a worker is lost
            return self.runner(self, ids, cache, all_logits)
        return self.run(ids, cache, all_logits)

    def run(self, ids, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        c, th, T = self.cfg, self.threads, len(ids)
        pos = np.arange(cache.pos, cache.pos + T, dtype=np.int32)
        h = dequantize(self.embd, np.asarray(ids)).reshape(T, c.d_model).copy()   # [T, d_model]
        for l, L in enumerate(self.layers):
            o = L.attn(self.rmsnorm(h, L.attn_norm), cache, l, pos, th)
            if L.post_attn_norm is not None:
                o = self.rmsnorm(o, L.post_attn_norm)
            h += o
            y = L.ffn(self.rmsnorm(h, L.ffn_norm), th)
            if L.post_ffw_norm is not None:
                y = self.rmsnorm(y, L.post_ffw_norm)
            h += y
        cache.pos += T
        cache.tokens += [int(i) for i in ids]
        if not all_logits:
            h = h[-1:]
        return self.output(self.rmsnorm(np.ascontiguousarray(h), self.out_norm), th)
