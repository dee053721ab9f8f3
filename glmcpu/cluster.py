"""Several machines, one model: the plan, the worker's service, and the root's sharded layers.

Attention is split by query heads (whole KV-head groups while there are fewer nodes than KV heads,
slices of a group beyond that: no node-count limit), each node keeping the KV cache of its heads;
dense FFN layers by slices of the intermediate dimension (whole 32-blocks); MoE layers by ranges of
whole experts. Per layer the root sends the normed hidden state and adds up the partial outputs:
two round trips per layer, all workers at once, the root computing its own share meanwhile.

A worker that dies or stops answering is replaced by the root, which computes that share from its
own memory map of the file. FFN and expert shares hold no state, so they are redone on the spot;
an attention share held a KV cache, so the root replays the sequence so far with the new plan.
The kernels give the same bits whether tokens come in a batch or one by one, so the answer is
the same as without the fault.

The net layer (glmcpu.net) moves the arrays; everything here knows the model."""
import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import ops
from .errors import GlmcpuError
from .gguf import GT
from .net.link import Client, LinkError
from .net.protocol import ProtocolError

K = ops.K
BLOCKS = (256, 32)    # column slices (Wo, FFN down) are whole quantisation blocks: K-quant super-blocks
                      # where the width allows, else the 32-blocks of Q4_0/Q8_0/Q5_0 (llama.cpp's fallback)


class ClusterError(GlmcpuError):
    """A worker that cannot be used: unreachable at start, wrong model, wrong protocol."""


class WorkerLost(Exception):
    """A worker holding KV-cache state stopped answering mid-sequence (handled by a replay)."""


@dataclass
class Plan:
    """Who computes what. Node 0 is the root; shares are fractions of the work."""
    nodes: list                                   # "root", then worker endpoints
    shares: list
    attn: dict = field(default_factory=dict)      # layer -> [(node, q0, q1)] query-head ranges
    ffn: dict = field(default_factory=dict)       # layer -> [(node, a, b)] slices of n_ff
    experts: dict = field(default_factory=dict)   # layer -> [(node, e0, e1)] expert ranges
    bytes_per_value: int = 4                      # of the hidden vectors on the wire (f32; f16: 2)

    def describe(self, cfg) -> list:
        """Lines for `glmcpu plan`: shares, and per token the round trips and bytes moved."""
        d = cfg.d_model
        workers = len(self.nodes) - 1
        layers = sorted(set(self.ffn) | set(self.experts))
        per_layer_out = d * self.bytes_per_value + 64              # hidden vector + framing
        moe_extra = cfg.n_expert_used * 8 if getattr(cfg, "n_expert", 0) else 0
        trips = 2 * len(layers) if workers else 0                  # attention, then FFN / experts
        sent = sum(workers * (2 * per_layer_out + (moe_extra if l in self.experts else 0)) for l in layers)
        back = 2 * len(layers) * workers * per_layer_out
        lines = [f"{len(self.nodes)} nodes: " + ", ".join(
            f"{n} {s:.0%}" for n, s in zip(self.nodes, self.shares))]
        for l in layers[:3]:
            parts = self.ffn.get(l) or self.experts.get(l)
            what = "FFN rows" if l in self.ffn else "experts"
            heads = ", ".join(f"{self.nodes[n]} [{a}, {b})" for n, a, b in self.attn[l])
            lines.append(f"layer {l}: q heads {heads}; {what} " +
                         ", ".join(f"{self.nodes[n]} [{a}, {b})" for n, a, b in parts))
        if len(layers) > 3:
            lines.append(f"... {len(layers) - 3} more layers split the same way")
        lines.append(f"per token: {trips} round trips (all workers at once), "
                     f"{sent / 1024:.1f} KiB sent, {back / 1024:.1f} KiB received by the root")
        return lines


def split(total: int, shares, unit: int = 1) -> list:
    """[a, b) ranges of `total` in whole units, proportional to shares, covering it exactly."""
    units = total // unit
    cuts = np.round(np.cumsum([0.0] + list(shares)) / sum(shares) * units).astype(int)
    out = [(int(cuts[i]) * unit, int(cuts[i + 1]) * unit) for i in range(len(shares))]
    out[-1] = (out[-1][0], total)
    return out


def block_unit(width: int, n: int) -> int:
    """Items of `width` columns per slice unit so that slices of n items are whole blocks of the
    largest block size in BLOCKS that n items allow (1 if none)."""
    for blk in BLOCKS:
        unit = blk // int(np.gcd(width, blk))
        if n % unit == 0:
            return unit
    return 1


def make_plan(cfg, nodes, shares=None) -> Plan:
    shares = list(shares or [1.0] * len(nodes))
    plan = Plan(list(nodes), [s / sum(shares) for s in shares])
    G = cfg.n_head // cfg.n_head_kv
    unit = block_unit(cfg.head_dim, cfg.n_head)          # Wo column slices must be whole blocks
    if len(nodes) <= cfg.n_head_kv:
        unit = int(np.lcm(unit, G))                     # whole KV groups: no K/V computed twice
    heads = [(i, a, b) for i, (a, b) in enumerate(split(cfg.n_head, shares, unit)) if b > a]
    n_dense = getattr(cfg, "n_dense_lead", cfg.n_layer) if getattr(cfg, "n_expert", 0) else cfg.n_layer
    for l in range(cfg.n_layer):
        plan.attn[l] = heads
        if l < n_dense:
            unit = block_unit(1, cfg.n_ff)
            plan.ffn[l] = [(i, a, b) for i, (a, b) in enumerate(split(cfg.n_ff, shares, unit)) if b > a]
        else:
            plan.experts[l] = [(i, a, b) for i, (a, b) in enumerate(split(cfg.n_expert, shares)) if b > a]
    return plan


# ---- building one share of a layer from the file --------------------------------------------

class FileSource:
    """Where a share's weights come from: slices of the GGUF file, read without copying the rest."""

    def __init__(self, f):
        self.f = f

    def has(self, name):
        return self.f.has(name)

    def rows(self, name, a, b):                   # -> raw rows [b-a, row_bytes], ggml type, n_in
        w, wtype, _, n_in = self.f.matrix(name)
        return np.ascontiguousarray(w[a:b]), wtype, n_in

    def cols(self, name, a, b):                   # columns [a, b) of every row: whole blocks
        w, wtype, _, n_in = self.f.matrix(name)
        bs, bb = K.TYPE_SIZES[wtype]
        if a % bs or (b % bs and b != n_in):
            raise ClusterError(f"{name}: columns {a}..{b} split a {bs}-value block of its "
                               f"{GT(wtype).name} rows; run this model on fewer nodes")
        return np.ascontiguousarray(w[:, a // bs * bb: b // bs * bb]), wtype, b - a

    def vector(self, name):
        return self.f.vector(name)

    def experts(self, name, rows, cols, cfg, e0, e1):
        from .models.glm4_moe import expert_tensor
        w, wtype = expert_tensor(self.f, name, rows, cols, cfg)
        return np.ascontiguousarray(w[e0:e1]), wtype


class Recorder:
    """A source that keeps what it hands out: the payload that rebuilds the same share on a worker
    that has no copy of the file (Replay), and what the worker caches."""

    def __init__(self, source):
        self.source, self.log = source, []

    def __getattr__(self, method):
        fn = getattr(self.source, method)

        def call(*args):
            out = fn(*args)
            self.log.append((method, args, out))
            return out
        return call

    def payload(self):
        """(meta, arrays) for the wire: plain values in meta, arrays in order."""
        entries, arrays = [], []
        for method, args, out in self.log:
            args = [a for a in args if not hasattr(a, "n_layer")]        # the config travels apart
            if method == "has":
                entries.append([method, args, bool(out)])
            elif method == "vector":
                entries.append([method, args, len(arrays)])
                arrays.append(out)
            else:                                       # (array, ggml type[, n_in])
                entries.append([method, args, [len(arrays)] + [int(v) for v in out[1:]]])
                arrays.append(out[0])
        return {"entries": entries}, arrays


class Replay:
    """The worker's side of Recorder: answers the same calls from the shipped arrays."""

    def __init__(self, meta, arrays):
        self.answers = {}
        try:
            for method, args, out in meta["entries"]:
                if method == "has":
                    value = bool(out)
                elif method == "vector":
                    value = arrays[out]
                else:
                    value = (arrays[out[0]], *out[1:])
                self.answers[(method, repr(list(args)))] = value
        except (TypeError, ValueError, IndexError, KeyError):
            raise ProtocolError("a shipped share's description does not match its arrays") from None

    def __getattr__(self, method):
        def call(*args):
            args = [a for a in args if not hasattr(a, "n_layer")]
            key = (method, repr(list(args)))
            if key not in self.answers:
                raise ProtocolError(f"the shipped share lacks {method}{tuple(args)}")
            return self.answers[key]
        return call


class Slice:
    """Raw weight rows (gate|up stacked, or a column range of one), in the fastest layout. Parts
    of one type are stacked into one matrix; a mix (llama.cpp's Q4_K_M stores attn_v as Q6_K
    in some layers) runs part by part, outputs side by side."""

    def __init__(self, parts):
        self.n_in = parts[0][2]
        self.mats = []                                # [(weight lines, type, rows)]
        groups = []                                   # runs of consecutive parts of one type
        for w, t, _ in parts:
            if groups and groups[-1][1] == t:
                groups[-1][0].append(w)
            else:
                groups.append(([w], t))
        for ws, t in groups:
            w = np.concatenate(ws, 0) if len(ws) > 1 else ws[0]
            pw, pt = ops.repack(np.ascontiguousarray(w), t)
            self.mats.append((pw, pt, w.shape[0]))
        self.n_out = sum(r for _, _, r in self.mats)

    def __call__(self, x, th):
        outs = [ops.linear(w, t, self.n_in, x, th, r) for w, t, r in self.mats]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, 1)


class AttnShare:
    """Query heads [q0, q1) of one layer and the KV heads they read, with their own KV cache;
    returns this share's part of the attention output projection."""

    def __init__(self, src, p, cfg, q0, q1, n_ctx):
        hd, G = cfg.head_dim, cfg.n_head // cfg.n_head_kv
        self.cfg, self.q0, self.q1 = cfg, q0, q1
        self.kv0, self.kv1 = q0 // G, (q1 - 1) // G + 1
        q, k, v = (q0 * hd, q1 * hd), (self.kv0 * hd, self.kv1 * hd), (self.kv0 * hd, self.kv1 * hd)
        if src.has(p + "attn_qkv.weight"):               # rows Q, then K, then V
            off_k, off_v = cfg.n_head * hd, (cfg.n_head + cfg.n_head_kv) * hd
            parts = [(p + "attn_qkv", q), (p + "attn_qkv", (off_k + k[0], off_k + k[1])),
                     (p + "attn_qkv", (off_v + v[0], off_v + v[1]))]
        else:
            parts = [(p + "attn_q", q), (p + "attn_k", k), (p + "attn_v", v)]
        self.qkv = Slice([src.rows(n + ".weight", a, b) for n, (a, b) in parts])
        self.bias = (np.concatenate([src.vector(n + ".bias")[a:b] for n, (a, b) in parts])
                     if src.has(parts[0][0] + ".bias") else None)
        self.q_norm = src.vector(p + "attn_q_norm.weight") if src.has(p + "attn_q_norm.weight") else None
        self.k_norm = src.vector(p + "attn_k_norm.weight") if src.has(p + "attn_k_norm.weight") else None
        self.wo = Slice([src.cols(p + "attn_output.weight", *q)])
        self.nq, self.nkv = q1 - q0, self.kv1 - self.kv0
        self.k = np.zeros((self.nkv, n_ctx, hd), np.float32)   # [local kv heads, n_ctx, head_dim]
        self.v = np.zeros((self.nkv, n_ctx, hd), np.float32)
        self.scale = 1.0 / np.sqrt(hd)
        # whole groups map local q head i to local kv head i // G; a slice of a group needs care
        self.aligned = q0 % G == 0 and (q1 - q0) % G == 0

    def __call__(self, x, pos0, th):
        from .models.glm4 import head_norm
        c, T, hd = self.cfg, x.shape[0], self.cfg.head_dim
        if pos0 + T > self.k.shape[1]:
            raise ProtocolError(f"positions {pos0}..{pos0 + T} are past this share's context")
        qkv = self.qkv(x, th)
        if self.bias is not None:
            qkv += self.bias
        q = np.ascontiguousarray(qkv[:, :self.nq * hd]).reshape(T, self.nq, hd)
        k = np.ascontiguousarray(qkv[:, self.nq * hd:(self.nq + self.nkv) * hd]).reshape(T, self.nkv, hd)
        v = qkv[:, (self.nq + self.nkv) * hd:].reshape(T, self.nkv, hd)
        if self.q_norm is not None:
            q, k = head_norm(q, self.q_norm, c.eps), head_norm(k, self.k_norm, c.eps)
        pos = np.arange(pos0, pos0 + T, dtype=np.int32)
        K.rope(q, pos, c.n_rot, c.rope_theta, c.neox)
        K.rope(k, pos, c.n_rot, c.rope_theta, c.neox)
        self.k[:, pos0:pos0 + T] = k.transpose(1, 0, 2)
        self.v[:, pos0:pos0 + T] = v.transpose(1, 0, 2)
        out = np.empty_like(q)
        if self.aligned:
            K.attention(q, self.k, self.v, pos0, self.scale, out, th)
        else:
            G = c.n_head // c.n_head_kv
            for i in range(self.nq):
                j = (self.q0 + i) // G - self.kv0
                out[:, i:i + 1] = K.attention(np.ascontiguousarray(q[:, i:i + 1]), self.k[j:j + 1],
                                              self.v[j:j + 1], pos0, self.scale,
                                              np.empty((T, 1, hd), np.float32), th)
        return self.wo(out.reshape(T, -1), th)


class FFNShare:
    """silu(x Wg[a:b]) * (x Wu[a:b]) -> Wd[:, a:b]: one slice of the intermediate dimension."""

    def __init__(self, src, p, a, b, n_ff, suffix=""):
        if src.has(p + f"ffn_gate{suffix}.weight"):
            gu = [(p + f"ffn_gate{suffix}.weight", a, b), (p + f"ffn_up{suffix}.weight", a, b)]
        else:                                          # fused [gate | up] rows
            gu = [(p + "ffn_up.weight", a, b), (p + "ffn_up.weight", n_ff + a, n_ff + b)]
        self.gate_up = Slice([src.rows(*g) for g in gu])
        self.down = Slice([src.cols(p + f"ffn_down{suffix}.weight", a, b)])

    def __call__(self, x, th):
        gu = self.gate_up(x, th)
        return self.down(K.silu_mul(gu, np.empty((x.shape[0], gu.shape[1] // 2), np.float32), th), th)


class ExpertShare:
    """Experts [e0, e1) of one MoE layer: views of the file's stacked tensors (repacked if allowed)."""

    def __init__(self, src, p, e0, e1, cfg, repack):
        d, ff = cfg.d_model, cfg.n_ff_exp
        self.e0, self.e1 = e0, e1
        mats = []
        for name, rows, cols in (("gate", ff, d), ("up", ff, d), ("down", d, ff)):
            w, wtype = src.experts(p + f"ffn_{name}_exps.weight", rows, cols, cfg, e0, e1)
            if repack:
                pw, ptype = ops.repack(np.ascontiguousarray(w).reshape((e1 - e0) * rows, -1), wtype, ram_copy=False)
                if ptype != wtype:
                    w, wtype = pw.reshape(e1 - e0, rows // 8, -1), ptype
            mats.append((w, wtype))
        (self.gate, self.gu_type), (self.up, _), (self.down, self.down_type) = mats

    def __call__(self, x, ids, weights, th):
        local = np.where((ids >= self.e0) & (ids < self.e1), ids - self.e0, -1).astype(np.int32)
        return K.moe(x, self.gate, self.up, self.down, self.gu_type, self.down_type, local,
                     np.ascontiguousarray(weights, np.float32), np.empty_like(x), th)


def build_share(src, kind, layer, a, b, cfg, n_ctx, repack):
    """One node's part of one layer, from a FileSource, a Recorder or a Replay."""
    p = f"blk.{layer}."
    if kind == "attn":
        return AttnShare(src, p, cfg, a, b, n_ctx)
    if kind == "ffn":
        return FFNShare(src, p, a, b, cfg.n_ff)
    return ExpertShare(src, p, a, b, cfg, repack)


KINDS = {"attn": "attn", "ffn": "ffn", "experts": "moe"}      # plan table -> op name


# ---- the worker ----------------------------------------------------------------------------

def measure_bandwidth(threads, mib=128) -> float:
    """This machine's read bandwidth in GB/s (decode speed follows it): a quick probe at start."""
    buf = np.ones(mib << 20, np.uint8)
    K.stream_read(buf, threads)
    t = time.perf_counter()
    K.stream_read(buf, threads)
    return buf.nbytes / max(time.perf_counter() - t, 1e-9) / 1e9


def weigh(speeds, memories, need_gb) -> list:
    """Shares proportional to speed, then trimmed so no node holds more than 90% of its memory
    (what is trimmed goes to the others, in proportion)."""
    shares = np.array(speeds, float) / sum(speeds)
    caps = np.array([0.9 * m / need_gb if m and need_gb else np.inf for m in memories])
    for _ in range(len(shares)):
        over = shares > caps
        if not over.any() or caps.sum() < 1:
            break
        spare = (shares[over] - caps[over]).sum()
        shares[over] = caps[over]
        free = ~over & (shares < caps)
        shares[free] += spare * shares[free] / shares[free].sum()
    return [float(x) for x in shares]


def available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration):
        return 0.0


class WorkerService:
    """What `glmcpu worker` serves: hello, load (its share of a plan), put (a share's weights, for a
    worker without the file), attn, ffn, moe, ping. Shipped shares are kept in a cache directory
    keyed by the model's fingerprint, so the next start needs nothing from the root."""

    def __init__(self, model_path=None, threads=None, memory_gb=None, cache_dir=None):
        from .gguf import GGUFFile
        self.file = GGUFFile(model_path) if model_path else None
        self.threads = int(threads) if threads else ops.default_threads()
        self.memory = float(memory_gb) if memory_gb else available_gb()
        self.bandwidth = measure_bandwidth(self.threads)
        self.print = self.file.fingerprint() if self.file else None
        self.cache_dir = cache_dir or os.environ.get("GLMCPU_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "glmcpu", "worker")
        self.shares = {}

    def __call__(self, op, meta, arrays):
        if op == "ping":
            return {}, []
        if op == "hello":
            from . import __version__
            return {"fingerprint": self.print, "threads": self.threads, "memory_gb": self.memory,
                    "bandwidth_gbs": self.bandwidth, "version": __version__}, []
        if op == "load":
            return self.load(meta), []
        if op == "put":
            return self.put(meta, arrays), []
        if op == "attn":
            share = self._share(meta, "attn")
            (x,) = self._arrays(arrays, 1)
            pos0 = meta.get("pos0")
            if not isinstance(pos0, int) or pos0 < 0:
                raise ProtocolError("attn: pos0 must be a position")
            return {}, [share(np.ascontiguousarray(x, np.float32), pos0, self.threads).astype(x.dtype)]
        if op == "ffn":
            share = self._share(meta, "ffn")
            (x,) = self._arrays(arrays, 1)
            return {}, [share(np.ascontiguousarray(x, np.float32), self.threads).astype(x.dtype)]
        if op == "moe":
            share = self._share(meta, "moe")
            x, ids, w = self._arrays(arrays, 3)
            if ids.shape != w.shape or ids.shape[0] != x.shape[0]:
                raise ProtocolError("moe: ids, weights and x disagree")
            y = share(np.ascontiguousarray(x, np.float32), ids.astype(np.int32), w, self.threads)
            return {}, [y.astype(x.dtype)]
        raise ProtocolError(f"unknown op {op!r}")

    @staticmethod
    def _arrays(arrays, n):
        if len(arrays) != n:
            raise ProtocolError(f"expected {n} arrays, got {len(arrays)}")
        return arrays

    def _share(self, meta, kind):
        share = self.shares.get((kind, meta.get("layer")))
        if share is None:
            raise ProtocolError(f"no {kind} share loaded for layer {meta.get('layer')!r}")
        return share

    def _cfg(self, meta):
        from .models import model_class
        if self.file is not None and meta.get("fingerprint") == self.print:
            return model_class(self.file.arch).config_class.from_gguf(self.file)
        c = meta.get("config")
        if not isinstance(c, dict) or not isinstance(c.get("arch"), str):
            raise ProtocolError("load: no model configuration")
        try:
            return model_class(c["arch"]).config_class(**c)
        except (TypeError, GlmcpuError) as e:
            raise ProtocolError(f"load: bad model configuration ({e})") from None

    def _cached(self, fingerprint, kind, layer, a, b):
        if not isinstance(fingerprint, str) or not fingerprint.isalnum():
            raise ProtocolError("bad fingerprint")
        return os.path.join(self.cache_dir, fingerprint, f"{kind}-{int(layer)}-{int(a)}-{int(b)}")

    def load(self, meta):
        """Build this worker's shares: from its own copy of the file when the fingerprints match,
        else from its cache; answer which shares are missing so the root can send them."""
        fp = meta.get("fingerprint")
        cfg = self._cfg(meta)
        n_ctx = int(meta.get("ctx", 4096))
        own = self.file is not None and fp == self.print
        repack = ops.repack_experts(self.file.size) if own else ops.REPACK == "all"
        shares, missing = {}, []
        for table, kind in KINDS.items():
            for l, rng in meta.get(table, {}).items():
                a, b = int(rng[0]), int(rng[1])
                if own:
                    src = FileSource(self.file)
                else:
                    path = self._cached(fp, kind, l, a, b)
                    if not os.path.exists(path + ".npz"):
                        missing.append([kind, int(l), a, b])
                        continue
                    import json
                    with open(path + ".json") as fh, np.load(path + ".npz") as z:
                        src = Replay(json.load(fh), [z[f"arr_{i}"] for i in range(len(z.files))])
                shares[(kind, int(l))] = build_share(src, kind, int(l), a, b, cfg, n_ctx, repack)
        if not missing:
            self.shares = shares
        return {"loaded": len(shares), "missing": missing}

    def put(self, meta, arrays):
        """Keep one shipped share in the cache (json + npz, written atomically)."""
        import json
        if meta.get("kind") not in KINDS.values() or not isinstance(meta.get("entries"), list):
            raise ProtocolError("put: bad share description")
        try:
            path = self._cached(meta.get("fingerprint"), meta["kind"], int(meta.get("layer")),
                                int(meta.get("a")), int(meta.get("b")))
        except (TypeError, ValueError):
            raise ProtocolError("put: bad share position") from None
        Replay({"entries": meta["entries"]}, arrays)                    # validates indices
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp.npz", "wb") as fh:
            np.savez(fh, *arrays)
        with open(path + ".json.tmp", "w") as fh:
            json.dump({"entries": meta["entries"]}, fh)
        os.replace(path + ".json.tmp", path + ".json")
        os.replace(path + ".tmp.npz", path + ".npz")
        return {"stored": sum(a.nbytes for a in arrays)}


# ---- the root ------------------------------------------------------------------------------

class Cluster:
    """The root's view: one Client per worker, the plan, per-token figures, and fallbacks."""

    def __init__(self, f, cfg, endpoints, keypair=None, worker_key=None, timeout=5.0, shares=None,
                 threads=1, n_ctx=4096, wire="f32"):
        if wire not in ("f32", "f16"):
            raise ClusterError(f"--wire {wire}: use f32 (exact) or f16 (half the bytes)")
        self.file, self.cfg, self.n_ctx = f, cfg, n_ctx
        self.wire = np.float16 if wire == "f16" else np.float32
        self.clients = [Client(e, keypair, worker_key, timeout=timeout) for e in endpoints]
        self.alive = [True] * len(self.clients)
        self.fingerprint = f.fingerprint()
        self.info = [self.hello(c) for c in self.clients]
        # by default shares follow each node's threads, trimmed to what its memory holds; "auto"
        # follows the read bandwidth each node measured (decode is bound by it), which is truer but
        # noisy, and a plan that moves makes workers' caches of shipped weights miss
        if not shares or shares == "auto":
            speeds = ([measure_bandwidth(threads)] + [float(i.get("bandwidth_gbs") or 1) for i in self.info]
                      if shares == "auto" else [threads] + [float(i.get("threads") or 1) for i in self.info])
            memories = [available_gb()] + [float(i.get("memory_gb") or 0) for i in self.info]
            shares = weigh(speeds, memories, f.size / 2**30)
        self.plan = make_plan(cfg, ["root"] + list(endpoints), shares)
        self.plan.bytes_per_value = np.dtype(self.wire).itemsize
        self.loads = [{"fingerprint": self.fingerprint, "ctx": n_ctx, "attn": {}, "ffn": {}, "experts": {}}
                      for _ in self.clients]
        for kind, table in (("attn", self.plan.attn), ("ffn", self.plan.ffn), ("experts", self.plan.experts)):
            for l, parts in table.items():
                for node, a, b in parts:
                    if node > 0:
                        self.loads[node - 1][kind][str(l)] = [a, b]
        config = {k: (float(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(cfg).items()}
        for load in self.loads:
            load["config"] = config
        self.shipped = 0
        for c, load in zip(self.clients, self.loads):
            try:
                self.load(c, load)
            except LinkError as e:
                raise ClusterError(f"worker {c.endpoint} could not load its share: {e}") from None
        self.repack = ops.repack_experts(f.size)
        self.fallbacks = {}
        self.stats = {"tokens": 0, "round_trips": 0, "failovers": 0, "net_seconds": 0.0,
                      "compute_seconds": 0.0}

    def load(self, c, load):
        """Ask a worker to build its shares; send the weights of any it has neither in a copy of
        the file nor in its cache (once: the worker keeps them)."""
        missing = c.request("load", load, timeout=600)[0].get("missing", [])
        if not missing:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn(f"sending weights to {c.endpoint} (once: it caches them)"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                      transient=True) as bar:
            task = bar.add_task("", total=len(missing))
            for kind, layer, a, b in missing:
                rec = Recorder(FileSource(self.file))
                build_share(rec, kind, layer, a, b, self.cfg, 1, False)
                meta, arrays = rec.payload()
                meta.update(fingerprint=self.fingerprint, kind=kind, layer=layer, a=a, b=b)
                c.request("put", meta, arrays, timeout=600)
                self.shipped += sum(x.nbytes for x in arrays)
                bar.advance(task)
        if c.request("load", load, timeout=600)[0].get("missing"):
            raise LinkError(f"{c.endpoint} still lacks shares after they were sent")

    def hello(self, c):
        try:
            meta, _ = c.request("hello")
        except LinkError as e:
            raise ClusterError(f"worker {c.endpoint} is not reachable ({e}); is it running, with "
                               "matching keys (or --insecure on both sides)?") from None
        return meta

    def revive(self, timeout=0.5):
        """Give workers that failed earlier another chance (called before each request);
        returns how many came back (their shares start with empty KV caches)."""
        back = 0
        for i, c in enumerate(self.clients):
            if self.alive[i]:
                continue
            try:
                c.reset()
                c.request("hello", timeout=timeout)
                self.load(c, self.loads[i])
                self.alive[i] = True
                back += 1
            except LinkError:
                c.reset()
        return back

    def per_token(self) -> dict:
        """Network figures per token so far: bytes each way, round trips, seconds waiting."""
        n = max(1, self.stats["tokens"])
        return {"tokens": self.stats["tokens"],
                "sent_kib": sum(c.sent for c in self.clients) / 1024 / n,
                "received_kib": sum(c.received for c in self.clients) / 1024 / n,
                "round_trips": self.stats["round_trips"] / n,
                "network_ms": 1e3 * self.stats["net_seconds"] / n,
                "compute_ms": 1e3 * self.stats["compute_seconds"] / n,
                "failovers": self.stats["failovers"], "alive": f"{sum(self.alive)}/{len(self.alive)}"}

    def factory(self, f, p, i, kind):
        if kind == "attn":
            return ShardedAttention(self, f, p, i)
        if kind == "dense":
            return ShardedFFN(self, f, p, i)
        return ShardedMoE(self, f, p, i)

    def forward(self, net, ids, cache, all_logits):
        """net.run, but when a worker holding attention heads is lost, the sequence so far is
        replayed with the new plan (rebuilding every KV cache), then this step is run again."""
        history = list(cache.tokens)
        while True:
            try:
                return net.run(ids, cache, all_logits)
            except WorkerLost:
                pass
            while True:                       # replay until one whole pass gets through
                cache.pos, cache.tokens = 0, []
                try:
                    for s in range(0, len(history), 256):
                        net.run(history[s:s + 256], cache, False)
                    break
                except WorkerLost:            # lost another one meanwhile: again, without it
                    continue

    def table(self, kind):
        return {"attn": self.plan.attn, "ffn": self.plan.ffn, "moe": self.plan.experts}[kind]

    def share_of(self, kind, layer, node):
        """Build (once) any node's share on the root, for when that node is gone."""
        key = (kind, layer, node)
        if key not in self.fallbacks:
            _, a, b = next(t for t in self.table(kind)[layer] if t[0] == node)
            self.fallbacks[key] = build_share(FileSource(self.file), kind, layer, a, b, self.cfg,
                                              self.n_ctx, self.repack)
        return self.fallbacks[key]

    def run(self, kind, layer, arrays, local, compute_share, meta=None):
        """Send to the live workers of this layer, compute the root's share, add the replies;
        a worker that fails is computed here instead, and left out from then on (for an
        attention share, whose KV cache is gone with it, WorkerLost asks for a replay)."""
        remote = [n for n, _, _ in self.table(kind)[layer] if n > 0]
        asked, lost = [], False
        wire = [arrays[0].astype(self.wire, copy=False)] + list(arrays[1:])   # the hidden state
        for n in remote:
            if self.alive[n - 1]:
                try:
                    self.clients[n - 1].send(kind, dict(meta or {}, layer=layer), wire)
                    asked.append(n)
                except Exception:
                    self.alive[n - 1] = False
        t0 = time.perf_counter()
        y = local()
        t1 = time.perf_counter()
        self.stats["compute_seconds"] += t1 - t0
        for n in remote:
            part = None
            if n in asked:
                try:
                    _, (part,) = self.clients[n - 1].recv()
                    part = part.astype(np.float32)
                    self.stats["round_trips"] += 1
                except (LinkError, ValueError):
                    self.alive[n - 1] = False
                    self.stats["failovers"] += 1
                    self.clients[n - 1].reset()
                    lost = kind == "attn"
            if lost:
                continue
            if part is None:
                part = compute_share(self.share_of(kind, layer, n))
            y = part if y is None else y + part
        self.stats["net_seconds"] += time.perf_counter() - t1     # waiting beyond our own share
        if lost:
            raise WorkerLost()
        return y

    def close(self):
        for c in self.clients:
            c.close()


class ShardedAttention:
    """Replaces a layer's Attention on the root: same call, work spread by the plan."""

    def __init__(self, cluster, f, p, layer):
        self.cluster, self.layer = cluster, layer
        mine = [(a, b) for n, a, b in cluster.plan.attn[layer] if n == 0]
        self.local = AttnShare(FileSource(f), p, cluster.cfg, *mine[0], cluster.n_ctx) if mine else None

    def __call__(self, x, cache, l, pos, th):
        x, pos0 = np.ascontiguousarray(x, np.float32), cache.pos
        return self.cluster.run("attn", self.layer, [x],
                                lambda: self.local(x, pos0, th) if self.local else None,
                                lambda share: share(x, pos0, th), meta={"pos0": pos0})


class ShardedFFN:
    def __init__(self, cluster, f, p, layer):
        self.cluster, self.layer = cluster, layer
        mine = [(a, b) for n, a, b in cluster.plan.ffn[layer] if n == 0]
        self.local = FFNShare(FileSource(f), p, *mine[0], cluster.cfg.n_ff) if mine else None

    def __call__(self, x, th):
        x = np.ascontiguousarray(x, np.float32)
        return self.cluster.run("ffn", self.layer, [x],
                                lambda: self.local(x, th) if self.local else None,
                                lambda share: share(x, th))


class ShardedMoE:
    """Router and shared expert on the root; routed experts wherever the plan put them."""

    def __init__(self, cluster, f, p, layer):
        from .models.glm4 import DenseFFN
        from .models.glm4_moe import Router
        self.cluster, self.layer = cluster, layer
        self.route = Router(f, p, cluster.cfg)
        self.shared = DenseFFN(f, p, "_shexp") if cluster.cfg.n_expert_shared else None
        mine = [(a, b) for n, a, b in cluster.plan.experts[layer] if n == 0]
        self.local = ExpertShare(FileSource(f), p, *mine[0], cluster.cfg, cluster.repack) if mine else None
        self.hits = np.zeros(cluster.cfg.n_expert, np.int64)

    def __call__(self, x, th):
        x = np.ascontiguousarray(x, np.float32)
        ids, w = self.route(x, th)
        self.hits += np.bincount(ids.reshape(-1), minlength=self.cluster.cfg.n_expert)
        y = self.cluster.run("moe", self.layer, [x, ids, w],
                             lambda: self.local(x, ids, w, th) if self.local else None,
                             lambda share: share(x, ids, w, th))
        if self.shared is not None:
            y = y + self.shared(x, th)
        return y
