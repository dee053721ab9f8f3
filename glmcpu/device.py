"""Where a module of the model runs, and the ops it calls there (project issue 25).

The model's own modules (models/glm4.py, glm4_moe.py) call these ops instead of inline NumPy, so one
body of math runs on each device:

  CPU   glmcpu's kernels (_kernels.pyx): what every module ran before devices existed, unchanged.
  GPU   an NVIDIA card through CuPy and glmcpu.gpu's NVRTC kernels (gpu/ops.py). Weights stay in the
        file's block layouts; the layers it runs keep a float32 KV cache on the card.
  twin  the GPU's NumPy twin: the same ops as the GPU kernels compute them (activations rounded to
        Q8_1 blocks for a quantised weight's gemv, to half for a prefill's cuBLAS tiles; the router's
        top-k in the kernels' order; a float32 KV cache), on host arrays. CI checks the GPU path's
        wiring and numerics with it, where no GPU is.

A device holds weights as handles (`weight`), makes arrays (`asarray`, `zeros`), and brings them
back (`to_host`). Nothing here knows a model: modules pass shapes and the config's numbers."""
import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants

from . import ops
from .errors import GlmcpuError

K = ops.K

GPU_TYPES = (GT.Q4_0, GT.Q8_0, GT.Q5_0, GT.Q4_K, GT.Q6_K, GT.F16, GT.F32)   # gpu/kernels.py TYPES
GEMV_MAX_T = 8          # gpu/kernels.py: tokens one gemv multiplies; more go through half tiles


class NoGpu(GlmcpuError):
    """--gpu asked for, and no GPU can be used (why in one line)."""


class CPU:
    """glmcpu's kernels on host arrays (the code each module ran before devices)."""
    name = "cpu"
    xp = np

    def takes(self, wtype) -> bool:
        return True

    def asarray(self, x):
        return x

    def to_host(self, x):
        return x

    def vector(self, v):
        return v

    def zeros(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype)

    def rmsnorm(self, x, w, eps):
        return K.rmsnorm(x, w, eps, np.empty_like(x))

    def head_norm(self, x, w, eps):                     # RMSNorm over each head's dims: x [T, H, D], w [D]
        T, H, D = x.shape
        return K.rmsnorm(x.reshape(T * H, D), w, eps, np.empty((T * H, D), np.float32)).reshape(T, H, D)

    def rope(self, x, pos, cfg):                        # in place on x [T, H, D]
        ops.rope(x, pos, cfg.n_rot, cfg.rope_theta, cfg.neox)

    def kv_write(self, kc, vc, pos0, k, v, types):     # k, v [T, nkv, D] -> caches [nkv, n_ctx, .]
        T = k.shape[0]
        kc[:, pos0:pos0 + T] = ops.kv_encode(k, types[0]).transpose(1, 0, 2)
        vc[:, pos0:pos0 + T] = ops.kv_encode(v, types[1]).transpose(1, 0, 2)

    def attention(self, q, kc, vc, pos0, scale, th, groups):
        """q [T, nq, D] over caches [nkv, n_ctx, .] filled to pos0 + T -> [T, nq, D]; groups: the
        cache head each query head reads (None: whole GQA groups in order)."""
        out = np.empty_like(q)
        if groups is None:
            return K.attention(q, kc, vc, pos0, scale, out, th)
        T, _, D = q.shape
        for i, j in enumerate(groups):                  # a slice of a group: head by head
            out[:, i:i + 1] = K.attention(np.ascontiguousarray(q[:, i:i + 1]), kc[j:j + 1], vc[j:j + 1],
                                          pos0, scale, np.empty((T, 1, D), np.float32), th)
        return out

    def silu_mul(self, gu, th):                         # [T, 2F] = gate | up -> silu(gate) * up
        return K.silu_mul(gu, np.empty((gu.shape[0], gu.shape[1] // 2), np.float32), th)

    def route(self, logits, bias, k: int, norm: bool, scale: float):
        """SPEC.md's sigmoid router: ids [T, k] int32 (in no particular order), weights [T, k]."""
        s = 1.0 / (1.0 + np.exp(-logits))
        choice = s + bias if bias is not None else s
        idx = np.argpartition(-choice, k - 1, axis=1)[:, :k]
        w = np.take_along_axis(s, idx, 1)
        if norm:
            w = w / (w.sum(1, keepdims=True) + 1e-20)
        return idx.astype(np.int32), (w * scale).astype(np.float32)


CPU_DEVICE = CPU()


def dequantize_rows(rows, wtype, n_in: int) -> np.ndarray:
    """float32 [rows, n_in] of rows of ggml-typed bytes (gguf's reference code)."""
    rows = np.ascontiguousarray(rows)
    if wtype == GT.F32:
        return rows.view(np.float32).reshape(rows.shape[0], n_in)
    if wtype == GT.F16:
        return rows.view(np.float16).reshape(rows.shape[0], n_in).astype(np.float32)
    return quants.dequantize(rows, GT(wtype)).reshape(rows.shape[0], n_in).astype(np.float32, copy=False)


def rotate(x, pos, cos, sin, neox: bool):
    """RoPE in place on the first 2 * cos.shape[1] dims of each head of x [T, H, D] at positions pos,
    from tables [positions, n_rot / 2]: pairs (i, i + half) with neox, else (2i, 2i + 1)."""
    half = cos.shape[1]
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]              # [T, 1, half]
    ia, ib = (slice(0, half), slice(half, 2 * half)) if neox else (slice(0, 2 * half, 2), slice(1, 2 * half, 2))
    a, b = x[..., ia].copy(), x[..., ib].copy()
    x[..., ia], x[..., ib] = a * c - b * s, a * s + b * c


class TwinWeight:
    """A weight as the GPU holds it (the file's rows, [n_out, row bytes] or experts [E, n_out, row
    bytes]); its float32 values made on first use and kept (the twin runs tiny models)."""

    def __init__(self, rows, wtype, n_in):
        self.rows, self.type, self.n_in = rows, int(wtype), n_in
        self.shape = rows.shape
        self._f = {}

    def values(self, e=None) -> np.ndarray:
        if e not in self._f:
            rows = self.rows if e is None else self.rows[e]
            self._f[e] = dequantize_rows(rows, self.type, self.n_in)
        return self._f[e]


class Twin(CPU):
    """The GPU kernels' NumPy twin (gpu/reference.py for the Q8_1 blocks and the router)."""
    name = "twin"

    def takes(self, wtype) -> bool:
        return wtype in GPU_TYPES

    def weight(self, rows, wtype, n_in):
        return TwinWeight(rows, wtype, n_in)

    def _gemv_input(self, x, wtype):
        from .gpu.reference import dequantize_q8_1, quantize_q8_1
        if int(wtype) in (int(GT.F16), int(GT.F32)):
            return x.astype(np.float64)
        return dequantize_q8_1(quantize_q8_1(x)).astype(np.float64)

    def linear(self, w, x, e=None):
        """x [T, n_in] @ W^T -> float32 [T, n_out]: gemv (T <= 8: Q8_1-rounded activations for a
        quantised weight) or half tiles with float32 sums (cuBLAS) for a prefill."""
        W = w.values(e)
        if x.shape[0] <= GEMV_MAX_T:
            return (self._gemv_input(np.ascontiguousarray(x, np.float32), w.type) @ W.T.astype(np.float64)
                    ).astype(np.float32)
        xh = x.astype(np.float16).astype(np.float64)
        return (xh @ W.astype(np.float16).astype(np.float64).T).astype(np.float32)

    def rmsnorm(self, x, w, eps):
        x = np.asarray(x, np.float32)
        ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(ms + eps) * w).astype(np.float32)

    def head_norm(self, x, w, eps):
        return self.rmsnorm(x, w, eps)

    def rope(self, x, pos, cfg):
        """In place on x [T, H, D], from the CPU's tables (the kernels read the same)."""
        if cfg.n_rot:
            rotate(x, pos, *ops.rope_table(int(cfg.n_rot), float(cfg.rope_theta), ops.rope_rows(int(pos.max()))),
                   cfg.neox)

    def kv_write(self, kc, vc, pos0, k, v, types):     # float32 caches
        T = k.shape[0]
        kc[:, pos0:pos0 + T] = k.transpose(1, 0, 2)
        vc[:, pos0:pos0 + T] = v.transpose(1, 0, 2)

    def attention(self, q, kc, vc, pos0, scale, th, groups):
        T, nq, D = q.shape
        nkv = kc.shape[0]
        heads = groups if groups is not None else [i // (nq // nkv) for i in range(nq)]
        out = np.empty((T, nq, D), np.float32)
        for t in range(T):
            n = pos0 + t + 1                              # causal: positions 0..pos0+t
            for i, j in enumerate(heads):
                s = (kc[j, :n].astype(np.float64) @ q[t, i].astype(np.float64)) * scale
                p = np.exp(s - s.max())
                out[t, i] = (p / p.sum()) @ vc[j, :n].astype(np.float64)
        return out

    def silu_mul(self, gu, th):
        F = gu.shape[1] // 2
        g, u = gu[:, :F].astype(np.float64), gu[:, F:].astype(np.float64)
        return (g / (1 + np.exp(-g)) * u).astype(np.float32)

    def route(self, logits, bias, k, norm, scale):
        from .gpu.reference import router
        return router(logits, bias, k, norm, scale)

    def experts(self, gate, up, down, x, ids, weights):
        """Each token through its chosen experts as the GPU does it (a gemv per expert, its
        Q8_1-rounded input), weighted and summed in slot order -> float32 [T, d]."""
        out = np.zeros((x.shape[0], down.shape[1]), np.float32)
        for t in range(x.shape[0]):
            for j, e in enumerate(ids[t]):
                if e < 0:
                    continue
                xt = x[t:t + 1]
                gu = np.concatenate([self.linear(gate, xt, e), self.linear(up, xt, e)], 1)
                out[t] += weights[t, j] * self.linear(down, self.silu_mul(gu, 1), e)[0]
        return out


class Cuda(Twin):
    """An NVIDIA GPU through CuPy: glmcpu.gpu's NVRTC kernels (gpu/ops.py) on device arrays. Weights
    are uploaded in the file's block layouts; the caches of its layers are float32 on the card.
    NOT YET RUN ON A GPU (no card was lent to the sessions that wrote it): `--gpu` asks for it by
    name, auto never picks it, and tools/gpu_check.py checks it against the twin."""
    name = "cuda"

    def __init__(self):
        import cupy

        from .gpu import ops as gpu_ops
        self.xp, self.g, self.tables = cupy, gpu_ops, {}

    def asarray(self, x):
        return self.xp.ascontiguousarray(self.xp.asarray(x))

    def to_host(self, x):
        return self.xp.asnumpy(x)

    def vector(self, v):
        return self.xp.asarray(np.ascontiguousarray(v, np.float32))

    def zeros(self, shape, dtype=np.float32):
        return self.xp.zeros(shape, dtype)

    def weight(self, rows, wtype, n_in):
        return self.xp.asarray(np.ascontiguousarray(rows)), int(wtype), n_in

    def linear(self, w, x, e=None):
        return self.g.linear(w[0], w[1], w[2], self.xp.ascontiguousarray(x, self.xp.float32))

    def rmsnorm(self, x, w, eps):
        return self.g.rmsnorm(self.xp.ascontiguousarray(x, self.xp.float32), w, eps)

    def head_norm(self, x, w, eps):
        T, H, D = x.shape
        return self.rmsnorm(x.reshape(T * H, D), w, eps).reshape(T, H, D)

    def rope(self, x, pos, cfg):
        if not cfg.n_rot:
            return
        rows = ops.rope_rows(int(np.max(pos)))
        key = (int(cfg.n_rot), float(cfg.rope_theta), rows)
        if key not in self.tables:                     # the CPU's table, uploaded once per size
            self.tables = {key: tuple(self.xp.asarray(t) for t in ops.rope_table(*key))}
        cos, sin = self.tables[key]
        T, H, D = x.shape
        self.g.rope(x.reshape(T, H * D), self.xp.asarray(np.asarray(pos, np.int32)), cos, sin, cfg.neox, H, D)

    def attention(self, q, kc, vc, pos0, scale, th, groups):
        if groups is not None:
            raise GlmcpuError("a share of a KV group runs on the CPU only")
        T, nq, D = q.shape
        if T == 1:
            return self.g.attention_decode(q.reshape(nq, D), kc, vc, pos0 + 1, scale).reshape(1, nq, D)
        return self.g.attention_prefill(q.reshape(T, nq * D), nq, kc, vc, pos0, scale)

    def silu_mul(self, gu, th):
        return self.g.silu_mul(self.xp.ascontiguousarray(gu))

    def route(self, logits, bias, k, norm, scale):
        return self.g.router(self.xp.ascontiguousarray(logits), bias, k, norm, scale)

    def experts(self, gate, up, down, x, ids, weights):
        xp, g = self.xp, self.g
        ids, weights = xp.asarray(ids, xp.int32), xp.asarray(weights, xp.float32)
        out = xp.empty((x.shape[0], down[0].shape[1]), xp.float32)
        for t in range(x.shape[0]):
            xt = xp.ascontiguousarray(x[t:t + 1])
            a = g.silu_mul(g.experts_matvec(gate[0], gate[1], gate[2], ids[t], xt),
                           g.experts_matvec(up[0], up[1], up[2], ids[t], xt))
            y = g.experts_matvec(down[0], down[1], down[2], ids[t], a)      # [k, d]
            out[t] = (weights[t][:, None] * y).sum(0)
        return out


class Placement:
    """Which device runs each part of a model: layers first..n_layer-1 and (head) the output head on
    `dev`, the rest on the CPU; the routed experts of a layer on the CPU where cpu_moe(layer). why:
    one line for `info` and the start of a run."""

    def __init__(self, dev=None, first=0, n_layer=0, head=False, cpu_moe=frozenset(), why="the CPU", plan=None):
        self.dev = dev or CPU_DEVICE
        self.first, self.n_layer, self.head_on, self.cpu_moe, self.why = first, n_layer, head, cpu_moe, why
        self.plan = plan                    # gpu/plan.py's GpuPlan (the tensors on the device), if any

    def layer(self, i: int):
        return self.dev if self.first <= i < self.n_layer else CPU_DEVICE

    def experts(self, i: int):
        return CPU_DEVICE if i in self.cpu_moe else self.layer(i)

    def head(self):
        return self.dev if self.head_on else CPU_DEVICE


ON_CPU = Placement()


def place(f, cfg, gpu=None, gpu_layers=None, cpu_moe=False, n_cpu_moe=None, n_ctx=4096) -> Placement:
    """Where a model of file f runs. gpu: None/"auto" (a usable NVIDIA GPU if there is one, else the
    CPU), True/"cuda" (the GPU, or NoGpu saying why not), False/"cpu", "twin" (the GPU's NumPy
    twin). gpu_layers: the last N layers on the device (default: as many as fit, with the head);
    cpu_moe: every layer's routed experts on the CPU; n_cpu_moe: those of the first N MoE layers."""
    kind = {None: "auto", True: "cuda", False: "cpu"}.get(gpu, gpu)
    if kind not in ("auto", "cuda", "cpu", "twin"):
        raise GlmcpuError(f"--gpu {gpu!r}: use auto, cuda, cpu or twin")
    if kind == "cpu":
        return Placement(why="--cpu: the GPU is not used")
    if kind == "twin":
        dev, free = Twin(), 1 << 50
    else:
        from .gpu import available
        ok, what = available()
        if not ok:
            if kind == "cuda":
                raise NoGpu(f"--gpu: no GPU can be used: {what}")
            return Placement(why=f"no GPU used: {what}")
        if kind == "auto":                 # not before tools/gpu_check.py has passed on a card
            return Placement(why=f"{what}: not used by default yet (the GPU path has not been checked on a "
                                 "card; --gpu tries it)")
        import cupy
        dev, free = Cuda(), cupy.cuda.Device(0).mem_info[0]
    from .gpu.plan import plan_offload
    moe_layers = [i for i in range(cfg.n_layer) if cfg.n_expert and i >= getattr(cfg, "n_dense_lead", 0)]
    keep = set(moe_layers if cpu_moe else moe_layers[:max(0, int(n_cpu_moe or 0))])
    plan = plan_offload(f, cfg, free, n_ctx, cpu_moe=bool(cpu_moe), gpu_layers=gpu_layers)
    why = f"{dev.name}: " + plan.describe().split(": ", 1)[1]
    if kind == "twin":                    # no card: the memory figures are the plan's, not a limit
        why = (f"twin (the GPU kernels' NumPy twin, for checking): {plan.n_gpu}/{cfg.n_layer} layers"
               f"{' and the output head' if plan.head else ''}" + (f", layers 0-{plan.first - 1} on the CPU" if plan.first else ""))
    if keep:
        why += ("; every MoE layer's routed experts on the CPU" if cpu_moe else
                f"; the routed experts of the first {len(keep)} MoE layer{'s' * (len(keep) != 1)} on the CPU")
    return Placement(dev, first=plan.first, n_layer=cfg.n_layer, head=plan.head, cpu_moe=frozenset(keep), why=why,
                     plan=plan)
