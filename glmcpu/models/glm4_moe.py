"""GLM-4.5 / GLM-4.5-Air / INTELLECT-3: GGUF `glm4moe`, transformers Glm4MoeForCausalLM.

The dense GLM-4 layer with three changes: NeoX (half-split) RoPE, optional per-head q/k norm, and
from layer `leading_dense_block_count` on a mixture of experts in place of the FFN: a sigmoid
router whose correction bias only chooses, top-k routed experts weighted by their normalised,
scaled scores, plus one always-on shared expert. The MTP ("nextn") block is not run."""
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ModelFileError, UnsupportedArchitecture
from .. import ops
from ..gguf import GGUFFile
from . import glm4
from .glm4 import K, Attention, DenseFFN, Linear, optional_vector


@dataclass(frozen=True)
class Config(glm4.Config):
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0
    n_dense_lead: int = 0
    expert_scale: float = 1.0       # routed_scaling_factor
    expert_norm: bool = True        # normalise the top-k weights to sum to 1

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> "Config":
        base = asdict(glm4.Config.from_gguf(f))
        gating = int(f.arch_get("expert_gating_func", 2))
        if gating != 2:
            raise UnsupportedArchitecture(f"{f.path}: expert_gating_func {gating}; GLM-4.5 routers are sigmoid (2)")
        if int(f.arch_get("expert_group_count", 1) or 1) > 1:
            raise UnsupportedArchitecture(f"{f.path}: grouped expert routing (n_group > 1) is not supported")
        base["neox"] = True
        return cls(**base,
                   n_expert=int(f.require("expert_count")),
                   n_expert_used=int(f.require("expert_used_count")),
                   n_expert_shared=int(f.arch_get("expert_shared_count", 0)),
                   n_ff_exp=int(f.require("expert_feed_forward_length")),
                   n_dense_lead=int(f.arch_get("leading_dense_block_count", 0)),
                   expert_scale=float(f.arch_get("expert_weights_scale", 1.0)),
                   expert_norm=bool(f.arch_get("expert_weights_norm", True)))


def expert_tensor(f: GGUFFile, name: str, rows: int, cols: int, cfg: Config, repack=False):
    """A stacked expert tensor as [n_expert, rows, row_bytes] bytes + its ggml type, shape-checked;
    with repack, Q4_0/Q8_0 (and Q5_0, as Q8_0) experts are copied into RAM as [n_expert, rows/8, ...]
    8-row groups."""
    t = f.tensor(name)
    want = (cols, rows, cfg.n_expert)
    if tuple(int(d) for d in t.shape) != want:
        raise ModelFileError(f"{f.path}: tensor {name} has shape {tuple(int(d) for d in t.shape)} (ggml order) "
                             f"but the metadata says {want} ({cfg.n_expert} experts of {rows} x {cols})")
    w, wtype, _, _ = f.matrix(name)               # validates the type
    if repack:
        packed, ptype = ops.repack(w, wtype, ram_copy=False)
        if ptype != wtype:
            f.release(name)
            return packed.reshape(cfg.n_expert, rows // 8, -1), ptype
    return w.reshape(cfg.n_expert, rows, -1), wtype


class Router:
    """Sigmoid scores; the correction bias only chooses; top-k weights normalised and scaled."""

    def __init__(self, f: GGUFFile, p: str, cfg: Config):
        self.cfg = cfg
        self.gate = Linear(f, p + "ffn_gate_inp")                         # [n_expert, d_model]
        if self.gate.n_out != cfg.n_expert:
            raise ModelFileError(f"{f.path}: tensor {p}ffn_gate_inp.weight routes to {self.gate.n_out} "
                                 f"experts, the metadata says {cfg.n_expert}")
        self.bias = optional_vector(f, p + "exp_probs_b.bias")            # [n_expert], choice only

    def __call__(self, x, th):
        """x [T, d] -> expert ids [T, k] int32, weights [T, k] float32 (SPEC: 'MoE router')."""
        c = self.cfg
        s = 1.0 / (1.0 + np.exp(-self.gate(x, th)))                        # [T, n_expert]
        choice = s + self.bias if self.bias is not None else s
        idx = np.argpartition(-choice, c.n_expert_used - 1, axis=1)[:, :c.n_expert_used]
        w = np.take_along_axis(s, idx, 1)
        if c.expert_norm:
            w = w / (w.sum(1, keepdims=True) + 1e-20)
        return idx.astype(np.int32), (w * c.expert_scale).astype(np.float32)


class MoE:
    def __init__(self, f: GGUFFile, p: str, cfg: Config, repack: bool):
        self.cfg = cfg
        self.route = Router(f, p, cfg)
        d, ff = cfg.d_model, cfg.n_ff_exp
        self.gate, tg = expert_tensor(f, p + "ffn_gate_exps.weight", ff, d, cfg, repack)  # [E, ff, bytes]
        self.up, tu = expert_tensor(f, p + "ffn_up_exps.weight", ff, d, cfg, repack)      # [E, ff, bytes]
        self.down, self.down_type = expert_tensor(f, p + "ffn_down_exps.weight", d, ff, cfg, repack)
        if tg != tu:
            raise ModelFileError(f"{f.path}: {p}ffn_gate_exps and ffn_up_exps differ in type")
        self.gu_type = tg
        self.shared = DenseFFN(f, p, "_shexp") if cfg.n_expert_shared else None
        self.hits = np.zeros(cfg.n_expert, np.int64)                      # tokens routed to each expert

    def __call__(self, x, th):
        idx, w = self.route(x, th)
        self.hits += np.bincount(idx.reshape(-1), minlength=self.cfg.n_expert)
        y = K.moe(x, self.gate, self.up, self.down, self.gu_type, self.down_type, idx, w,
                  np.empty_like(x), th)
        if self.shared is not None:
            y += self.shared(x, th)
        return y


class Layer:
    def __init__(self, f: GGUFFile, i: int, cfg: Config, repack: bool, factory=None):
        p = f"blk.{i}."
        self.attn_norm = f.vector(p + "attn_norm.weight")
        self.attn = factory(f, p, i, "attn") if factory else Attention(f, p, cfg)
        self.post_attn_norm = None
        self.ffn_norm = f.vector(p + "post_attention_norm.weight")       # the pre-FFN norm here
        kind = "dense" if i < cfg.n_dense_lead else "moe"
        if factory:
            self.ffn = factory(f, p, i, kind)
        else:
            self.ffn = DenseFFN(f, p) if kind == "dense" else MoE(f, p, cfg, repack)
        self.post_ffw_norm = None


class Model(glm4.Model):
    config_class = Config

    def make_layer(self, f, i):
        if i == 0:
            self.repack_experts = ops.repack_experts(f.size)
        return Layer(f, i, self.cfg, self.repack_experts, self.factory)

    def expert_stats(self) -> dict:
        """{layer: hits per expert [n_expert]} for the MoE layers since load."""
        return {i: L.ffn.hits.copy() for i, L in enumerate(self.layers) if hasattr(L.ffn, "hits")}
