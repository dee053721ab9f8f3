"""What a GPU holds: the offload plan and its memory budget. Host logic only (no CuPy), a pure
function of the file's tensor sizes, the model's config and the card's free memory.

The GPU keeps weights in the file's block layouts (its kernels read them; no dequantised copy),
the KV cache of the layers it runs, and a workspace. It runs the LAST layers and the output head,
so a token's hidden state crosses to the GPU once and only logits come back; the layers before
them run on the CPU. With cpu_moe the routed experts (`*_exps.*`) of every layer stay on the CPU
and the GPU holds everything else of its layers: attention, the dense FFN, the router and the
shared expert. The token embedding stays on the CPU (one row per token is read), unless the file
ties it to the head."""
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import GlmcpuError
from .kernels import TILE_ROWS

GB = 2**30                      # "GB" as the rest of glmcpu prints it
KV_BYTES = 4                    # per cached value: the attention kernels read float32 keys and values
WORKSPACE_FIXED = 512 * 2**20   # cuBLAS's workspace, CuPy's pool slack, the compiled kernels
WORKSPACE_SHARE = 0.01          # of the free memory, kept back for fragmentation
LAYER = re.compile(r"^blk\.(\d+)\.")


class GpuMemoryError(GlmcpuError):
    """A GPU layer count asked for (--gpu-layers) does not fit in the card's free memory."""


class TensorInfo(NamedTuple):
    name: str
    tensor_type: int
    shape: tuple        # ggml order: shape[0] is the row length
    n_bytes: int


def tensor_list(tensors) -> list:
    """TensorInfo of a GGUFFile's tensors, or of any iterable of (name, type, shape, n_bytes)."""
    items = tensors.tensors.values() if hasattr(tensors, "tensors") else tensors
    return [TensorInfo(str(t[0]), int(t[1]), tuple(int(x) for x in t[2]), int(t[3])) for t in items]


def role(name: str, n_layer: int, tied: bool):
    """(group, layer) of a tensor: "layer" or "experts" with its layer, "head", "embedding",
    "unused" (blocks past n_layer: the MTP layer, not run) or "other"."""
    m = LAYER.match(name)
    if m:
        layer = int(m.group(1))
        if layer >= n_layer:
            return "unused", layer
        return ("experts" if "_exps." in name else "layer"), layer
    if name in ("output.weight", "output_norm.weight") or (tied and name == "token_embd.weight"):
        return "head", None
    if name == "token_embd.weight":
        return "embedding", None
    return "other", None


def workspace_bytes(cfg, widest_in: int, widest_out: int, n_batch: int) -> int:
    """Scratch memory for a prefill batch of n_batch tokens: float32 activations (the hidden state,
    its norm, the residual and attention output: ~6 rows of d_model; the widest product and its
    SiLU), the half copy of the batch and one dequantised tile of the widest weight, logits, and a
    fixed reserve."""
    act = 4 * n_batch * (6 * cfg.d_model + 2 * widest_out)
    half = 2 * n_batch * widest_in + 2 * TILE_ROWS * widest_in
    return act + half + 4 * n_batch * cfg.n_vocab + WORKSPACE_FIXED


@dataclass(frozen=True)
class GpuPlan:
    n_layer: int
    first: int              # layers first .. n_layer-1 run on the GPU (first == n_layer: none)
    head: bool              # the output norm and matrix on the GPU
    cpu_moe: bool           # routed experts stay on the CPU
    n_ctx: int
    weights: int            # bytes of weights on the GPU, in the file's block layouts
    kv: int                 # bytes of the GPU layers' KV cache
    workspace: int
    free: int               # the card's free memory the plan was made for
    cpu_weights: int        # bytes of weights the CPU computes with (embedding rows included)
    expert_bytes: int       # of those, routed experts of GPU layers (cpu_moe)
    gpu_tensors: frozenset  # names of the tensors the GPU holds

    @property
    def n_gpu(self) -> int:
        return self.n_layer - self.first

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace

    def on_gpu(self, name: str) -> bool:
        return name in self.gpu_tensors

    def layer_on_gpu(self, layer: int) -> bool:
        return layer >= self.first

    def describe(self) -> str:
        """One line for `glmcpu info` and the start of a run."""
        if self.n_gpu == 0 and not self.head:
            return (f"GPU: nothing ({self.free / GB:.1f} GB free holds not even the output head and the "
                    f"workspace); all {self.n_layer} layers on the CPU")
        line = (f"GPU: {self.n_gpu}/{self.n_layer} layers{' and the output head' if self.head else ''}, "
                f"{self.total / GB:.1f} GB of {self.free / GB:.1f} GB free (weights {self.weights / GB:.1f}, "
                f"KV cache {self.kv / GB:.1f} for {self.n_ctx} positions, workspace {self.workspace / GB:.1f})")
        if self.cpu_moe and self.expert_bytes:
            line += f"; experts on the CPU ({self.expert_bytes / GB:.1f} GB)"
        if self.first > 0:
            line += f"; layers {'0' if self.first == 1 else f'0-{self.first - 1}'} on the CPU"
        return line


def plan_offload(tensors, cfg, free: int, n_ctx: int, cpu_moe: bool = False, gpu_layers=None,
                 n_batch: int = 512) -> GpuPlan:
    """The plan for a card with `free` bytes free: tensors a GGUFFile or (name, type, shape,
    n_bytes) rows; cfg the model's config (n_layer, n_head_kv, head_dim, d_model, n_vocab).
    gpu_layers None: the output head if it fits, then as many of the last layers as fit;
    0: nothing on the GPU; k: the last k layers and the head, or GpuMemoryError if they do not fit."""
    ts = tensor_list(tensors)
    n = cfg.n_layer
    tied = not any(t.name == "output.weight" for t in ts)
    layer_bytes = [0] * n
    expert_bytes = [0] * n
    head = embedding = other = 0
    widest_in = widest_out = 0
    for t in ts:
        group, layer = role(t.name, n, tied)
        if group == "experts":
            expert_bytes[layer] += t.n_bytes
            if cpu_moe:
                continue
        if group in ("layer", "experts"):
            layer_bytes[layer] += t.n_bytes
        elif group == "head":
            head += t.n_bytes
        elif group == "embedding":
            embedding += t.n_bytes
        elif group == "other":
            other += t.n_bytes
        if group in ("layer", "experts") and len(t.shape) >= 2:    # a matrix the GPU multiplies in a prefill
            widest_in, widest_out = max(widest_in, t.shape[0]), max(widest_out, t.shape[1])
    kv_layer = 2 * cfg.n_head_kv * cfg.head_dim * n_ctx * KV_BYTES
    workspace = workspace_bytes(cfg, widest_in or cfg.d_model, widest_out or cfg.d_model, n_batch) \
        + int(WORKSPACE_SHARE * free)
    budget = free - workspace

    def need(k):                                     # GPU bytes of the last k layers and the head
        return head + sum(layer_bytes[n - k:]) + k * kv_layer if k else head

    if gpu_layers is None:
        k = 0
        on_head = need(0) <= budget
        while on_head and k < n and need(k + 1) <= budget:
            k += 1
    else:
        k = max(0, min(int(gpu_layers), n))
        on_head = k > 0
        if on_head and need(k) > budget:
            fit = 0
            while fit < n and need(fit + 1) <= budget:
                fit += 1
            raise GpuMemoryError(
                f"{k} layers on the GPU need {(need(k) + workspace) / GB:.1f} GB with the output head, KV cache "
                f"({n_ctx} positions) and workspace; the GPU has {free / GB:.1f} GB free, enough for "
                f"{fit} layers: use --gpu-layers {fit}{'' if cpu_moe else ' or --cpu-moe'}, or a smaller context")
    first = n - k
    gpu = set()
    for t in ts:
        group, layer = role(t.name, n, tied)
        if (group == "layer" or (group == "experts" and not cpu_moe)) and layer >= first:
            gpu.add(t.name)
        elif group == "head" and on_head:
            gpu.add(t.name)
    weights = need(k) - k * kv_layer if on_head else 0
    total_weights = sum(layer_bytes) + sum(expert_bytes) * cpu_moe + head + embedding + other
    return GpuPlan(n_layer=n, first=first, head=on_head, cpu_moe=cpu_moe, n_ctx=n_ctx, weights=weights,
                   kv=k * kv_layer, workspace=workspace if on_head else 0, free=free,
                   cpu_weights=total_weights - weights, expert_bytes=sum(expert_bytes[first:]) * cpu_moe,
                   gpu_tensors=frozenset(gpu))
