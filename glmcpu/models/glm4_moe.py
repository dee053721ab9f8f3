"""GLM-4.5 / GLM-4.5-Air / INTELLECT-3: GGUF `glm4moe`, transformers Glm4MoeForCausalLM.

The dense GLM-4 layer with three changes: NeoX (half-split) RoPE, optional per-head q/k norm, and
from layer `leading_dense_block_count` on a mixture of experts in place of the FFN: a sigmoid
router whose correction bias only chooses, top-k routed experts weighted by their normalised,
scaled scores, plus one always-on shared expert. The MTP ("nextn") block is not run."""
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import ModelFileError, UnsupportedArchitecture
from .. import ops
from ..device import CPU_DEVICE
from ..gguf import GGUFFile
from ..weights import row_bytes
from . import glm4
from .glm4 import K, DenseFFN, Linear, check, optional_vector


@dataclass(frozen=True)
class Config(glm4.Config):
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0
    n_dense_lead: int = 0
    expert_scale: float = 1.0       # routed_scaling_factor
    expert_norm: bool = True        # normalise the top-k weights to sum to 1

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        base = asdict(glm4.Config.from_gguf(f))
        gating = f.number("expert_gating_func", 2)
        if gating != 2:
            raise UnsupportedArchitecture(f"{f.path}: expert_gating_func {gating}; GLM-4.5 routers are sigmoid (2)")
        if f.number("expert_group_count", 1, minimum=0) > 1:
            raise UnsupportedArchitecture(f"{f.path}: grouped expert routing (n_group > 1) is not supported")
        base["neox"] = True
        base["n_expert"] = n_expert = f.number("expert_count")
        return cls(**base,
                   n_expert_used=f.number("expert_used_count", maximum=n_expert),
                   n_expert_shared=f.number("expert_shared_count", 0, minimum=0),
                   n_ff_exp=f.number("expert_feed_forward_length"),
                   n_dense_lead=f.number("leading_dense_block_count", 0, minimum=0),
                   expert_scale=f.number("expert_weights_scale", 1.0, kind=float, minimum=None),
                   expert_norm=f.number("expert_weights_norm", True, kind=bool, minimum=None))

    def describe(self) -> str:
        return (super().describe() + f", {self.n_expert} experts ({self.n_expert_used} used, "
                f"{self.n_expert_shared} shared) of {self.n_ff_exp}")


class Router:
    """Sigmoid scores; the correction bias only chooses; top-k weights normalised and scaled."""

    def __init__(self, w, p: str, cfg: Config, dev=None):
        self.cfg, self.dev = cfg, dev or CPU_DEVICE
        self.gate = Linear(w, p + "ffn_gate_inp", dev=self.dev)           # [n_expert, d_model]
        if self.gate.n_out != cfg.n_expert:
            raise ModelFileError(f"tensor {p}ffn_gate_inp.weight routes to {self.gate.n_out} "
                                 f"experts, the metadata says {cfg.n_expert}")
        self.bias = optional_vector(w, p + "exp_probs_b.bias")            # [n_expert], choice only
        if self.bias is not None:
            self.bias = self.dev.vector(self.bias)

    def __call__(self, x, th):
        """x [T, d] -> expert ids [T, k] int32, weights [T, k] float32 (SPEC: 'MoE router')."""
        c = self.cfg
        return self.dev.route(self.gate(x, th), self.bias, c.n_expert_used, c.expert_norm, c.expert_scale)


class Experts:
    """Routed experts e0..e1 of one MoE layer (all of them by default): the stacked tensors as
    [experts, rows, row_bytes] lines, read from the memory map or, with repack, copied into RAM
    as 8-row groups (Q4_0/Q8_0, and Q5_0 as Q8_0)."""

    def __init__(self, w, p: str, cfg: Config, experts=None, repack=False, dev=None):
        self.cfg, self.dev = cfg, dev or CPU_DEVICE
        self.e0, self.e1 = e0, e1 = experts or (0, cfg.n_expert)
        check(0 <= e0 < e1 <= cfg.n_expert, f"{p}: experts {e0}..{e1} of {cfg.n_expert}")
        d, ff = cfg.d_model, cfg.n_ff_exp
        raw = []
        for name, rows, cols in (("gate", ff, d), ("up", ff, d), ("down", d, ff)):
            t, wtype = w.experts(f"{p}ffn_{name}_exps.weight", rows, cols, cfg.n_expert, e0, e1)
            check(t.ndim == 3 and t.shape[:2] == (e1 - e0, rows) and t.shape[2] == row_bytes(wtype, cols),
                  f"{p}ffn_{name}_exps: experts of {t.shape[1:]} lines disagree with the config")
            raw.append((name, rows, cols, t, wtype))
        if not all(self.dev.takes(wtype) for *_, wtype in raw):
            self.dev = CPU_DEVICE                 # a type the device cannot read: these experts stay on the CPU
        # gate and up run in one kernel call: both in 8-row groups, or neither (GLM-4.5 files whose
        # gate and up types differ may pair a packable type with one that is not)
        pack_gu = (raw[0][4] in ops.PACKABLE) == (raw[1][4] in ops.PACKABLE)
        mats = []
        for name, rows, cols, t, wtype in raw:
            if self.dev is not CPU_DEVICE:          # the file's rows, as the device holds them
                t = self.dev.weight(t, wtype, cols)
            elif repack and (pack_gu or name == "down"):
                packed, ptype = ops.repack(t.reshape((e1 - e0) * rows, -1), wtype, ram_copy=False)
                if ptype != wtype:
                    w.release(f"{p}ffn_{name}_exps.weight")
                    t, wtype = packed.reshape(e1 - e0, rows // 8, -1), ptype
            mats.append((t, wtype))
        (self.gate, self.gu_type), (self.up, self.up_type), (self.down, self.down_type) = mats   # [E, ff, bytes] ...

    def __call__(self, x, ids, weights, th, shared=None):
        """x [T, d], ids [T, k] (global expert ids), weights [T, k] -> this range's sum [T, d] float64
        (experts add in double, so the ranges of several nodes add up to one process's sum), plus
        the shared expert's output where given (one node of a cluster adds it to its part)."""
        local = ids if (self.e0, self.e1) == (0, self.cfg.n_expert) else \
            np.where((ids >= self.e0) & (ids < self.e1), ids - self.e0, -1).astype(np.int32)
        if self.dev is not CPU_DEVICE:
            y = self.dev.experts(self.gate, self.up, self.down, x, local, weights)
            return y if shared is None else y + shared(x, th)
        y = K.moe(x, self.gate, self.up, self.down, self.gu_type, self.down_type, local,
                  np.ascontiguousarray(weights, np.float32), np.empty(x.shape, np.float64), th, self.up_type)
        if shared is not None:
            y += shared(x, th)
        return y


class MoE:
    """Router, routed experts (or this node's range of them; None: none here) and the shared expert.
    make_experts() builds the routed experts, after the router (whose shape errors come first)."""

    def __init__(self, w, p: str, cfg: Config, make_experts, dev=None):
        self.cfg, self.dev = cfg, dev or CPU_DEVICE
        self.route = Router(w, p, cfg, self.dev)
        self.experts = make_experts()
        self.shared = (DenseFFN(w, p, cfg.n_ff_exp * cfg.n_expert_shared, cfg.d_model, "_shexp", split=False,
                                dev=self.dev) if cfg.n_expert_shared else None)
        self.hits = np.zeros(cfg.n_expert, np.int64)                      # tokens routed to each expert

    @classmethod
    def of(cls, cfg, route, experts, shared=None) -> "MoE":
        """A MoE layer put together from parts built apart (a mesh node's router and wrapped share)."""
        m = cls.__new__(cls)
        m.cfg, m.route, m.experts, m.shared = cfg, route, experts, shared
        m.dev = CPU_DEVICE
        m.hits = np.zeros(cfg.n_expert, np.int64)
        return m

    def __call__(self, x, th):
        d = self.dev
        idx, w = self.route(x, th)
        self.hits += np.bincount(d.to_host(idx).reshape(-1), minlength=self.cfg.n_expert)
        if getattr(self.experts, "dev", d) is d:
            return self.experts(x, idx, w, th, self.shared)     # the shared expert is added to the sum there
        # the hybrid (--cpu-moe): the shared expert here (a GPU runs it while the CPU computes the
        # routed experts: its kernels are queued first), the routed experts on the CPU
        s = self.shared(x, th) if self.shared is not None else None
        y = d.asarray(self.experts(d.to_host(x), d.to_host(idx), d.to_host(w), th).astype(np.float32))
        return y if s is None else y + s


class MTP:
    """GLM-4.5's multi-token-prediction ("nextn") block as a draft model: the token after next
    from the main model's final-normed hidden state h at position p-1 and the token at p:
    eh_proj(cat(enorm(embed(token)), hnorm(h))) -> one MoE decoder layer, the model's own Layer
    with its own KV cache -> shared_head_norm -> the head (the block's own, else the model's).
    Its KV cache slot s holds position s + 1: position 0 has no h before it."""

    def __init__(self, model, index: int):
        f, w, p = model.file, model.weights, f"blk.{index}."
        self.model = model
        self.enorm = w.vector(p + "nextn.enorm.weight")
        self.hnorm = w.vector(p + "nextn.hnorm.weight")
        self.eh_proj = Linear(w, p + "nextn.eh_proj")                       # [d, 2d]
        self.layer = glm4.Layer(model, w, index, glm4.whole)
        self.norm = w.vector(p + "nextn.shared_head_norm.weight")
        own = p + "nextn.shared_head_head"
        self.head_name = own if w.has(own + ".weight") else "output" if w.has("output.weight") else "token_embd"
        self.head = Linear(w, own) if self.head_name == own else \
            model.output if model.head_dev is CPU_DEVICE else Linear(w, self.head_name)
        self.vocab = None
        self.embd = f.tensor(p + "nextn.embed_tokens.weight") if f.has(p + "nextn.embed_tokens.weight") \
            else model.embd

    def limit_vocab(self, n):
        """Guess among token ids 0..n-1 only (None: all): the head's rows read per guess drop to
        n of n_vocab. BPE vocabularies list their tokens roughly by frequency (merge order), so
        the first ids are the likely ones; the check stays exact (a guess is only a guess)."""
        n = None if not n or n >= self.model.cfg.n_vocab else int(n)
        if n != self.vocab:
            self.head = Linear(self.model.weights, self.head_name, rows=None if n is None else (0, n))
            self.vocab = n

    def new_cache(self, n_ctx: int) -> glm4.KVCache:
        return glm4.KVCache(replace(self.model.cfg, n_layer=1), n_ctx, self.model.kv_type)

    def forward(self, ids, hidden, cache, all_logits=False):
        """ids: tokens at positions cache.pos + 1.., hidden [T, d]: the main model's normed hidden
        states at the positions before them. -> (logits [T or 1, n_vocab], own normed hidden [T, d])."""
        m = self.model
        pos = np.arange(cache.pos + 1, cache.pos + 1 + len(ids), dtype=np.int32)
        x = np.concatenate([m.rmsnorm(m.embed(self.embd, ids), self.enorm),
                            m.rmsnorm(np.ascontiguousarray(hidden, np.float32), self.hnorm)], 1)
        h = self.eh_proj(x, m.threads)
        m.run_layer(self.layer, h, cache, 0, pos)
        normed = m.rmsnorm(h, self.norm)
        logits = self.head(normed if all_logits else np.ascontiguousarray(normed[-1:]), m.threads)
        glm4.commit(cache, ids)
        return logits, normed


class Model(glm4.Model):
    config_class = Config
    moe_class = MoE
    ffn_norm_name = "post_attention_norm.weight"       # the pre-FFN norm here
    _mtp = None

    def draft_head(self):
        if self._mtp is None and self.cfg.n_nextn and self.file.has(f"blk.{self.cfg.n_layer}.nextn.eh_proj.weight"):
            self._mtp = MTP(self, self.cfg.n_layer)
        return self._mtp

    @classmethod
    def tensor_shapes(cls, cfg) -> dict:
        d, E, fe = cfg.d_model, cfg.n_expert, cfg.n_ff_exp
        shared = fe * cfg.n_expert_shared
        shapes = super().tensor_shapes(cfg)
        shapes.update({"blk.*." + k: [v] for k, v in {
            "ffn_gate_inp.weight": (d, E), "exp_probs_b.bias": (E,),
            "ffn_gate_exps.weight": (d, fe, E), "ffn_up_exps.weight": (d, fe, E), "ffn_down_exps.weight": (fe, d, E),
            "ffn_gate_shexp.weight": (d, shared), "ffn_up_shexp.weight": (d, shared),
            "ffn_down_shexp.weight": (shared, d),
            "nextn.eh_proj.weight": (2 * d, d), "nextn.enorm.weight": (d,), "nextn.hnorm.weight": (d,),
            "nextn.shared_head_norm.weight": (d,), "nextn.embed_tokens.weight": (d, cfg.n_vocab),
            "nextn.shared_head_head.weight": (d, cfg.n_vocab)}.items()})
        return shapes

    def ffn_kind(self, i) -> str:
        return "ffn" if i < self.cfg.n_dense_lead else "moe"

    @classmethod
    def build(cls, w, cfg, kind, layer, rng, repack=False, dev=None):
        if kind == "moe" and rng != ():
            return Experts(w, f"blk.{layer}.", cfg, experts=rng, repack=repack, dev=dev)
        out = super().build(w, cfg, kind, layer, rng, repack, dev)
        if kind == "norms" and layer >= cfg.n_dense_lead:
            out.router = Router(w, f"blk.{layer}.", cfg)
        return out
