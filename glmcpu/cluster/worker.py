"""What `glmcpu worker` serves: the model family's own modules over the ranges a root's plan gives
this machine, built from its own copy of the file or from shares the root ships.

Trust: a worker serves one root at a time (its session), until that root says goodbye or falls
silent for `lease` seconds; requests from another root are refused and never touch this state.
Every share is named by the sha256 of its bytes (the root computes it): a shipped share is stored
only if the root's current load asked for it and its bytes hash to its name, checked again before
use; a share built from the worker's own file must hash to the same name, or the file differs
from the root's and the load is refused. Every array a request carries is checked against the
config's shapes and types before it reaches a kernel."""
import dataclasses
import json
import math
import os
import signal
import time

import numpy as np

from .. import ops
from ..errors import GlmcpuError
from ..models import model_class
from ..models.glm4 import KVCache
from ..net import wire as wirecodec
from ..net.protocol import ProtocolError
from ..plan import KINDS
from ..weights import FileWeights, Recorder, Shipped, payload_digest

K = ops.K
LIMITS = {"d_model": 1 << 16, "n_head": 1 << 10, "n_head_kv": 1 << 10, "head_dim": 1 << 11, "n_layer": 1 << 12,
          "n_ff": 1 << 20, "n_vocab": 1 << 23, "n_ctx_train": 1 << 24, "n_expert": 1 << 12,
          "n_expert_used": 1 << 8, "n_ff_exp": 1 << 20, "n_expert_shared": 1 << 6, "n_dense_lead": 1 << 12}
MAX_TOKENS = 4096          # rows of one request (the root sends prefill chunks of 256)


def measure_bandwidth(threads, mib=128) -> float:
    """This machine's read bandwidth in GB/s (decode speed follows it): a quick probe at start."""
    buf = np.ones(mib << 20, np.uint8)
    K.stream_read(buf, threads)
    t = time.perf_counter()
    K.stream_read(buf, threads)
    return buf.nbytes / max(time.perf_counter() - t, 1e-9) / 1e9


def available_gb() -> float:
    from .. import ops
    return ops.memory_available() / 2**30


def is_digest(d) -> bool:
    return isinstance(d, str) and len(d) == 40 and all(c in "0123456789abcdef" for c in d)


class WorkerService:
    """handler(op, meta, arrays) for net.link.Server: hello, load, put, attn, ffn, moe, head,
    ping, bye."""

    def __init__(self, model_path=None, threads=None, memory_gb=None, cache_dir=None, cache_max_gb=None,
                 lease=10.0, fault=None, repack=None):
        """repack: "auto", "none" or "all" (ops.repack_mode) for the modules this worker builds."""
        from ..gguf import GGUFFile
        self.file = GGUFFile(model_path) if model_path else None
        self.threads = int(threads) if threads else ops.default_threads()
        self.memory = float(memory_gb) if memory_gb else available_gb()
        self.repack = ops.repack_mode(repack)
        self.bandwidth = measure_bandwidth(self.threads)
        self.print = self.file.fingerprint() if self.file else None
        self.cache_dir = cache_dir or os.environ.get("GLMCPU_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "glmcpu", "worker")
        self.cache_max = float(cache_max_gb) * 2**30 if cache_max_gb else None
        self.lease = float(lease)
        self.session = None           # the root this worker serves, and when it was last heard
        self.last_seen = 0.0
        self.epoch = None
        self.cfg = None
        self.modules = {}             # (kind, layer) -> module
        self.built = {}               # digest -> module (a reload of the same plan keeps them)
        self.wanted = set()           # digests the current load asked the root for
        self.kv = None
        self.n_ctx = 0
        # for tests: "kill:attn:5" or "stop:moe:3" ends or stops this process at its 5th attn request
        fault = fault or os.environ.get("GLMCPU_WORKER_FAULT")
        self.fault = None
        if fault:
            how, op, n = fault.split(":")
            self.fault = (how, op, int(n))
        self.counts = {}
        self.busy_seconds, self.requests = 0.0, 0    # time spent computing, and requests computed

    # ---- the session -------------------------------------------------------------------------

    def _busy(self, s) -> bool:
        return (self.session is not None and s != self.session
                and time.monotonic() - self.last_seen < self.lease)

    def _own(self, meta):
        """Requests of the current session and epoch only."""
        if meta.get("s") != self.session or self.session is None:
            raise ProtocolError("stale: this worker serves another root now (or none); load again")
        if meta.get("e") != self.epoch:
            raise ProtocolError("stale: a request from before the last load")
        self.last_seen = time.monotonic()

    def __call__(self, op, meta, arrays):
        if self.fault and op == self.fault[1]:
            self.counts[op] = self.counts.get(op, 0) + 1
            if self.counts[op] == self.fault[2]:
                os.kill(os.getpid(), signal.SIGKILL if self.fault[0] == "kill" else signal.SIGSTOP)
        if op == "ping":
            if meta.get("s") == self.session and self.session is not None:
                self.last_seen = time.monotonic()
            return {"busy": self._busy(meta.get("s"))}, []
        if op == "hello":
            from .. import __version__
            return {"fingerprint": self.print, "threads": self.threads, "memory_gb": self.memory,
                    "bandwidth_gbs": self.bandwidth, "version": __version__,
                    "busy": self._busy(meta.get("s")), "busy_seconds": self.busy_seconds,
                    "requests": self.requests}, []
        if op == "bye":
            if meta.get("s") == self.session:
                self._free()
            return {}, []
        if op == "load":
            return self.load(meta), []
        if op == "put":
            return self.put(meta, arrays), []
        if op in KINDS:
            t = time.perf_counter()
            out = self.compute(op, meta, arrays)
            self.busy_seconds += time.perf_counter() - t
            self.requests += 1
            return {}, out
        raise ProtocolError(f"unknown op {op!r}")

    def _free(self):
        self.session, self.epoch, self.cfg, self.kv = None, None, None, None
        self.modules, self.built, self.wanted = {}, {}, set()

    # ---- loading -----------------------------------------------------------------------------

    def _cfg(self, meta, own):
        c = meta.get("config")
        if own:
            return model_class(self.file.arch).config_class.from_gguf(self.file)
        if not isinstance(c, dict) or not isinstance(c.get("arch"), str):
            raise ProtocolError("load: no model configuration")
        try:
            cfg = model_class(c["arch"]).config_class(**c)
        except (TypeError, GlmcpuError) as e:
            raise ProtocolError(f"load: bad model configuration ({e})") from None
        for k, v in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)):
            if isinstance(v, bool) or k in ("arch",):
                continue
            if isinstance(v, int) and not 0 <= v <= LIMITS.get(k, 1 << 24):
                raise ProtocolError(f"load: config {k}={v} is out of range")
            if isinstance(v, float) and not (math.isfinite(v) and abs(v) < 1e12):
                raise ProtocolError(f"load: config {k}={v} is out of range")
            if not isinstance(v, (int, float, str)):
                raise ProtocolError(f"load: config {k} has the wrong type")
        if (cfg.d_model < 1 or cfg.n_head < 1 or cfg.n_head_kv < 1 or cfg.n_head % cfg.n_head_kv
                or cfg.head_dim < 2 or cfg.head_dim % 2 or not 0 <= cfg.n_rot <= cfg.head_dim or cfg.n_rot % 2
                or cfg.eps <= 0 or cfg.n_layer < 1 or cfg.n_vocab < 1
                or (cfg.n_expert and not 1 <= cfg.n_expert_used <= cfg.n_expert)):
            raise ProtocolError("load: the model configuration is not self-consistent")
        return cfg

    def _store(self, digest):
        return os.path.join(self.cache_dir, digest)

    def _read_shipped(self, digest):
        """A stored share whose bytes still hash to its name, or None (a bad one is removed)."""
        path = self._store(digest)
        try:
            with open(path + ".json") as fh:
                entries = json.load(fh)
            with np.load(path + ".npz", allow_pickle=False) as z:
                arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
            if payload_digest(entries, arrays) != digest:
                raise ValueError("digest")
            os.utime(path + ".npz")                          # recently used: evicted last
            return Shipped(entries, arrays)
        except FileNotFoundError:
            return None
        except Exception:                                    # unreadable or not what its name says
            for ext in (".json", ".npz"):
                try:
                    os.remove(path + ext)
                except OSError:
                    pass
            return None

    def load(self, meta):
        """Build this worker's shares for the root's plan: from its own copy of the file when the
        headers match (and every share must hash to the root's digest), else from its cache of
        shipped shares; answer the digests still missing so the root can send them."""
        s = meta.get("s")
        if not isinstance(s, str) or not 16 <= len(s) <= 64:
            raise ProtocolError("load: no session")
        if self._busy(s):
            raise ProtocolError(f"busy: this worker serves another root (heard from it "
                                f"{time.monotonic() - self.last_seen:.1f} s ago); wait for that root to "
                                "finish, or use another worker")
        shares = meta.get("shares")
        n_ctx, epoch = meta.get("ctx"), meta.get("e")
        if not isinstance(shares, list) or len(shares) > 1 << 16 or not isinstance(epoch, int):
            raise ProtocolError("load: bad share list")
        if s != self.session:
            self._free()
        own = self.file is not None and meta.get("fingerprint") == self.print
        cfg = self._cfg(meta, own)
        if not isinstance(n_ctx, int) or not 1 <= n_ctx <= max(cfg.n_ctx_train, 1) * 8 or n_ctx > 1 << 20:
            raise ProtocolError(f"load: context {n_ctx!r} is out of range")
        kv_bytes = cfg.kv_bytes(n_ctx)
        if kv_bytes > max(self.memory, 1) * 2**30:
            raise ProtocolError(f"load: a KV cache of {kv_bytes / 2**30:.1f} GB does not fit this worker")
        parsed = []
        for sh in shares:
            if (not isinstance(sh, list) or len(sh) != 5 or sh[0] not in KINDS
                    or not all(isinstance(v, int) for v in sh[1:4]) or not is_digest(sh[4])
                    or not 0 <= sh[2] < sh[3] or not -1 <= sh[1] < cfg.n_layer):
                raise ProtocolError("load: bad share")
            parsed.append(tuple(sh))
        # its own file: what fits in the memory it offers; shipped shares are already in RAM
        packing = (ops.plan_packing(self.file, self.repack, available=self.memory * 2**30) if own else
                   ops.Packing(self.repack != "none", self.repack == "all"))
        build = model_class(cfg.arch).build
        modules, missing = {}, []
        try:
            for kind, layer, a, b, digest in parsed:
                mod = self.built.get(digest)
                if mod is None and own:
                    rec = Recorder(FileWeights(self.file, packing.dense), keep=False)
                    mod = build(rec, cfg, kind, layer, (a, b), packing.experts)
                    if rec.digest() != digest:
                        raise ProtocolError(f"refused: this worker's file ({self.file.path}) differs from the "
                                            f"root's in the {kind} share of layer {layer} ({a}..{b}); give it "
                                            "the same file, or none (the root then sends its share)")
                elif mod is None:
                    src = self._read_shipped(digest)
                    if src is None:
                        missing.append(digest)
                        continue
                    src.pack = packing.dense
                    mod = build(src, cfg, kind, layer, (a, b), packing.experts)
                modules[(kind, layer)] = (mod, digest)
        except ProtocolError:                  # refused: this worker's file differs
            raise
        except (GlmcpuError, ValueError) as e:
            raise ProtocolError(f"load: a share does not fit the configuration ({e})") from None
        self.session, self.last_seen = s, time.monotonic()
        if missing:
            self.wanted = set(missing)
            self.epoch = None                  # nothing runs until the shares are all here
            return {"missing": missing}
        self.cfg, self.n_ctx, self.epoch = cfg, n_ctx, epoch
        self.modules = {k: m for k, (m, _) in modules.items()}
        self.built = {d: m for m, d in modules.values()}
        self.wanted = set()
        self.kv = KVCache(cfg, n_ctx)          # a new epoch starts clean
        return {"missing": [], "loaded": len(modules)}

    def put(self, meta, arrays):
        """Store one shipped share under its digest, if the current load asked for it and its bytes
        hash to that digest; a stored share is never overwritten."""
        digest, entries = meta.get("digest"), meta.get("entries")
        if self.session is None or meta.get("s") != self.session or not is_digest(digest):
            raise ProtocolError("put: not asked for by this worker's root")
        if digest not in self.wanted:
            raise ProtocolError("put: this share was not asked for")
        if not isinstance(entries, list):
            raise ProtocolError("put: bad share description")
        try:
            Shipped(entries, arrays)                               # shapes and dtypes as described
            ok = payload_digest(entries, arrays) == digest
        except Exception:
            ok = False
        if not ok:
            raise ProtocolError("put: the share's bytes do not hash to its name")
        self.last_seen = time.monotonic()
        path = self._store(digest)
        if os.path.exists(path + ".npz") and self._read_shipped(digest) is not None:
            return {"stored": 0}
        size = sum(a.nbytes for a in arrays)
        self._make_room(size)
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(path + ".tmp.npz", "wb") as fh:
            np.savez(fh, *arrays)
        with open(path + ".json.tmp", "w") as fh:
            json.dump(entries, fh)
        os.replace(path + ".json.tmp", path + ".json")
        os.replace(path + ".tmp.npz", path + ".npz")
        return {"stored": size}

    def _make_room(self, size):
        """Keep the cache under --cache-max: evict the least recently used shares this root does
        not need; refuse a share that cannot fit."""
        if self.cache_max is None:
            return
        if size > self.cache_max:
            raise ProtocolError(f"put: a share of {size / 2**30:.2f} GB exceeds this worker's --cache-max")
        try:
            names = [n[:-4] for n in os.listdir(self.cache_dir) if n.endswith(".npz") and is_digest(n[:-4])]
        except FileNotFoundError:
            return
        stats = sorted(((os.stat(self._store(n) + ".npz"), n) for n in names), key=lambda t: t[0].st_mtime)
        used = sum(st.st_size for st, _ in stats)
        for st, n in stats:
            if used + size <= self.cache_max:
                break
            if n in self.wanted or n in self.built:
                continue
            for ext in (".json", ".npz"):
                try:
                    os.remove(self._store(n) + ext)
                except OSError:
                    pass
            used -= st.st_size
        if used + size > self.cache_max:
            raise ProtocolError("put: this worker's --cache-max is too small for its share of this model")

    # ---- computing ---------------------------------------------------------------------------

    def compute(self, op, meta, arrays):
        self._own(meta)
        cfg = self.cfg
        mod = self.modules.get((op, meta.get("layer")))
        if mod is None:
            raise ProtocolError(f"no {op} share loaded for layer {meta.get('layer')!r}")
        codec = meta.get("wire")
        if codec not in wirecodec.CODECS:
            raise ProtocolError(f"unknown wire codec {codec!r}")
        nx = wirecodec.arrays_of(codec)
        want = nx + (2 if op == "moe" else 0)
        if len(arrays) != want:
            raise ProtocolError(f"{op}: expected {want} arrays, got {len(arrays)}")
        x = np.ascontiguousarray(wirecodec.decode(arrays[:nx], codec, cfg.d_model, MAX_TOKENS))
        T = x.shape[0]
        th = self.threads
        if op == "attn":
            pos0 = meta.get("pos0")
            if not isinstance(pos0, int) or isinstance(pos0, bool) or not 0 <= pos0 <= self.n_ctx - T:
                raise ProtocolError(f"attn: positions {pos0!r}.. are outside the context of {self.n_ctx}")
            self.kv.pos = pos0
            y = mod(x, self.kv, meta["layer"], np.arange(pos0, pos0 + T, dtype=np.int32), th)
        elif op == "moe":
            ids, w = arrays[nx:]
            k = cfg.n_expert_used
            if (ids.dtype != np.int32 or w.dtype != np.float32 or ids.shape != (T, k) or w.shape != (T, k)
                    or (ids.size and (ids.min() < 0 or ids.max() >= cfg.n_expert)) or not np.isfinite(w).all()):
                raise ProtocolError(f"moe: expert ids and weights must be int32 / float32 [{T}, {k}] "
                                    f"with ids in 0..{cfg.n_expert - 1}")
            y = mod(x, np.ascontiguousarray(ids), np.ascontiguousarray(w), th)
        else:
            y = mod(x, th)
        return wirecodec.encode(y, "f32" if op == "head" else wirecodec.reply_codec(codec))

