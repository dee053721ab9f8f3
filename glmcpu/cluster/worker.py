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
import math
import os
import signal
import time

import numpy as np

from .. import ops
from ..errors import GlmcpuError
from ..generate import PREFILL_CHUNK
from ..models import model_class
from ..models.glm4 import KV_TYPES, Batch, KVCache
from ..net import wire as wirecodec
from ..net.mesh import Mesh, MeshError
from ..net.protocol import ProtocolError
from ..plan import KINDS
from ..weights import FileWeights, Recorder
from .exchange import MeshModule, MeshRun
from .store import ShareStore, StoreError, is_digest

SHARE_KINDS = KINDS + ("norms",)     # norms: a layer's norms and router, which a mesh node holds whole

K = ops.K
LIMITS = {"d_model": 1 << 16, "n_head": 1 << 10, "n_head_kv": 1 << 10, "head_dim": 1 << 11, "n_layer": 1 << 12,
          "n_ff": 1 << 20, "n_vocab": 1 << 23, "n_ctx_train": 1 << 24, "n_expert": 1 << 12,
          "n_expert_used": 1 << 8, "n_ff_exp": 1 << 20, "n_expert_shared": 1 << 6, "n_dense_lead": 1 << 12}
MAX_TOKENS = PREFILL_CHUNK     # rows of one request: a root never sends more than a prefill chunk
MAX_SLOTS = 64                 # sequences a load may hold KV caches for (a root's serve --parallel)


def measure_bandwidth(threads, mib=128) -> float:
    """This machine's read bandwidth in GB/s (decode speed follows it): a quick probe at start."""
    buf = np.ones(mib << 20, np.uint8)
    K.stream_read(buf, threads)
    t = time.perf_counter()
    K.stream_read(buf, threads)
    return buf.nbytes / max(time.perf_counter() - t, 1e-9) / 1e9


def scratch_bytes(cfg, shares) -> int:
    """At most what one request's activations take: MAX_TOKENS rows of a few float32 copies of
    the widest thing a share computes (float64 partial sums, head rows, FFN units, q|k|v, experts)."""
    widest = 2 * cfg.d_model
    for kind, _, a, b, _ in shares:
        if kind == "norms":
            continue
        widest = max(widest, b - a if kind == "head" else 2 * (b - a) if kind == "ffn" else
                     3 * (b - a) * cfg.head_dim if kind == "attn" else 3 * cfg.n_ff_exp * cfg.n_expert_used)
    return MAX_TOKENS * 4 * 4 * widest


def available_gb() -> float:
    from .. import ops
    return ops.memory_available() / 2**30


class MeshFault(ProtocolError):
    """A step that failed over the mesh (a peer lost, or one that sent what it should not): the root
    is told, and knows it was not this worker's own fault."""
    kind = "mesh"


class WorkerService:
    """handler(op, meta, arrays) for net.link.Server: hello, load, put, attn, ffn, moe, head,
    mesh, step, ping, bye."""

    def __init__(self, model_path=None, threads=None, memory_gb=None, cache_dir=None, cache_max_gb=None,
                 lease=10.0, fault=None, repack=None, mesh_port=None):
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
        self.store = ShareStore(self.cache_dir, int(float(cache_max_gb) * 2**30) if cache_max_gb else None)
        self.lease = float(lease)
        self.session = None           # the root this worker serves, and when it was last heard
        self.last_seen = 0.0
        self.epoch = None
        self.cfg = None
        self.modules = {}             # (kind, layer) -> module
        self.built = {}               # digest -> module (a reload of the same plan keeps them)
        self.wanted = set()           # digests the current load asked the root for
        self.held = {}                # digest -> bytes in RAM of a shipped share that is built
        self.need = 0                 # bytes the current load holds beyond its missing shares
        self.kvs = []            # one KV cache per sequence the root runs at once (its slots)
        self.n_ctx = 0
        # for tests: "kill:attn:5" or "stop:moe:3" ends or stops this process at its 5th attn request
        fault = fault or os.environ.get("GLMCPU_WORKER_FAULT")
        self.fault = None
        if fault:
            how, op, n = fault.split(":")
            self.fault = (how, op, int(n))
        self.counts = {}
        self.busy_seconds, self.requests = 0.0, 0    # time spent computing, and requests computed
        self.link = None              # the net.link.Server answering for this service (attach)
        self.mesh_port = mesh_port    # None: the link's port + 1 (any free port if the link has none)
        self.mesh = self.mesh_layers = None

    def attach(self, server):
        """The link this service answers on: a mesh port binds on its host, under its keys' rules."""
        self.link = server

    def tick(self, op):
        """For tests: the fault chosen by GLMCPU_WORKER_FAULT, at the n-th request of a kind (or
        n-th module of that kind computed, in a mesh step)."""
        if self.fault and op == self.fault[1]:
            self.counts[op] = self.counts.get(op, 0) + 1
            if self.counts[op] == self.fault[2]:
                os.kill(os.getpid(), signal.SIGKILL if self.fault[0] == "kill" else signal.SIGSTOP)

    # ---- the session -------------------------------------------------------------------------

    def _busy(self, s) -> bool:
        return (self.session is not None and s != self.session
                and time.monotonic() - self.last_seen < self.lease)

    def _own(self, meta):
        """Requests of the current session and of its current, complete load only."""
        if meta.get("s") != self.session or self.session is None:
            raise ProtocolError("stale: this worker serves another root now (or none); load again")
        if self.epoch is None or meta.get("e") != self.epoch or type(meta.get("e")) is not int:
            raise ProtocolError("stale: a request from before the last load, or before it completed")
        self.last_seen = time.monotonic()

    def __call__(self, op, meta, arrays):
        if op not in KINDS:
            self.tick(op)
        if op == "ping":
            if meta.get("s") == self.session and self.session is not None:
                self.last_seen = time.monotonic()
            return {"busy": self._busy(meta.get("s"))}, []
        if op == "hello":
            from .. import __version__
            out = {"fingerprint": self.print, "threads": self.threads, "memory_gb": self.memory,
                   "bandwidth_gbs": self.bandwidth, "version": __version__, "busy": self._busy(meta.get("s"))}
            if self.session is not None and meta.get("s") == self.session:   # its own figures only
                out.update(busy_seconds=self.busy_seconds, requests=self.requests)
            return out, []
        if op == "bye":
            if meta.get("s") == self.session:
                self._free()
            return {}, []
        if op == "load":
            return self.load(meta), []
        if op == "put":
            return self.put(meta, arrays), []
        if op in KINDS or op == "step":
            t = time.perf_counter()
            out = self.compute(op, meta, arrays) if op != "step" else self.step(meta, arrays)
            self.busy_seconds += time.perf_counter() - t
            self.requests += 1
            return {}, out
        if op == "mesh":
            return self.mesh_setup(meta), []
        raise ProtocolError(f"unknown op {op!r}")

    def _free(self):
        self.drop_mesh()
        self.session, self.epoch, self.cfg, self.kvs = None, None, None, []
        self.modules, self.built, self.wanted, self.held = {}, {}, set(), {}
        self.store.pin(())
        self.busy_seconds, self.requests = 0.0, 0
        ops.rope_table.cache_clear()         # sized for that root's config: built again on demand

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
        shares, kv = meta.get("shares"), meta.get("kv", ["f32", "f32"])
        n_ctx, epoch, slots = meta.get("ctx"), meta.get("e"), meta.get("slots", 1)
        if type(slots) is not int or not 1 <= slots <= MAX_SLOTS:
            raise ProtocolError(f"load: slots {slots!r}: 1 to {MAX_SLOTS} sequences")
        if not isinstance(kv, list) or len(kv) != 2 or not all(t in KV_TYPES for t in kv):
            raise ProtocolError(f"load: KV cache types {kv!r}: use two of {', '.join(KV_TYPES)}")
        kv = tuple(kv)
        if not isinstance(shares, list) or len(shares) > 1 << 16 or not isinstance(epoch, int):
            raise ProtocolError("load: bad share list")
        if s != self.session:
            self._free()
        own = self.file is not None and meta.get("fingerprint") == self.print
        cfg = self._cfg(meta, own)
        if not isinstance(n_ctx, int) or not 1 <= n_ctx <= max(cfg.n_ctx_train, 1) * 8 or n_ctx > 1 << 20:
            raise ProtocolError(f"load: context {n_ctx!r} is out of range")
        parsed = []
        for sh in shares:
            if (not isinstance(sh, list) or len(sh) != 5 or sh[0] not in SHARE_KINDS
                    or not all(isinstance(v, int) for v in sh[1:4]) or not is_digest(sh[4])
                    or not 0 <= sh[2] < sh[3] or not -1 <= sh[1] < cfg.n_layer):
                raise ProtocolError("load: bad share")
            parsed.append(tuple(sh))
        # what this load holds in RAM besides its own file's pages, counted before anything is built
        G = cfg.n_head // cfg.n_head_kv           # the KV heads its query heads read, in every layer they hold
        kv_heads = sum((b - 1) // G + 1 - a // G for kind, _, a, b, _ in parsed if kind == "attn")
        need = cfg.kv_bytes(n_ctx, kv) // (cfg.n_layer * cfg.n_head_kv) * kv_heads * slots + ops.rope_table_bytes(cfg.n_rot, n_ctx) + scratch_bytes(cfg, parsed)
        if not own:
            sizes = {d: self.held.get(d) or self.store.size(d) for *_, d in parsed}
            need += sum(v for v in sizes.values() if v)
        if need > self.memory * 2**30:
            raise ProtocolError(f"load: its KV cache{f's for {slots} sequences' if slots > 1 else ''}, rope tables, "
                                f"activations and shipped shares need {need / 2**30:.2f} GB; this worker offers "
                                f"{self.memory:g} GB (--memory)")
        self.store.pin(d for *_, d in parsed)           # this load's own puts never evict its shares
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
                    src = self.store.get(digest)
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
        ops.rope_table.cache_clear()           # another config's tables: only this one's are built
        if missing:
            self.wanted, self.need = set(missing), need
            self.epoch = None                  # nothing runs until the shares are all here
            return {"missing": missing}
        self.drop_mesh()                       # a mesh is set up for a complete load
        self.cfg, self.n_ctx, self.epoch = cfg, n_ctx, epoch
        self.modules = {k: m for k, (m, _) in modules.items()}
        self.built = {d: m for m, d in modules.values()}
        self.held = {d: sizes[d] or 0 for d in self.built} if not own else {}
        self.wanted = set()
        self.kvs = [KVCache(cfg, n_ctx, kv) for _ in range(slots)]     # a new epoch starts clean (zero pages)
        return {"missing": [], "loaded": len(modules)}

    def put(self, meta, arrays):
        """Store one shipped share under its digest, if the current load asked for it, it fits the
        memory this worker offers beside the rest of that load, and its bytes hash to that digest
        (the store checks the bytes and keeps --cache-max)."""
        digest, entries = meta.get("digest"), meta.get("entries")
        if self.session is None or meta.get("s") != self.session or not is_digest(digest):
            raise ProtocolError("put: not asked for by this worker's root")
        if digest not in self.wanted:
            raise ProtocolError("put: this share was not asked for")
        if not isinstance(entries, list):
            raise ProtocolError("put: bad share description")
        size = sum(a.nbytes for a in arrays)
        if self.need + size > self.memory * 2**30:
            raise ProtocolError(f"put: with this share of {size / 2**30:.2f} GB, the load would need "
                                f"{(self.need + size) / 2**30:.2f} GB; this worker offers {self.memory:g} GB (--memory)")
        try:
            stored = self.store.put(digest, entries, arrays)
        except StoreError as e:
            raise ProtocolError(f"put: {e}") from None
        self.last_seen = time.monotonic()
        self.wanted.discard(digest)
        self.need += size
        return {"stored": stored}

    # ---- computing ---------------------------------------------------------------------------

    # ---- the mesh ----------------------------------------------------------------------------

    def drop_mesh(self):
        if self.mesh is not None:
            self.mesh.close()
        self.mesh = self.mesh_layers = None

    def mesh_setup(self, meta):
        """The root's three calls: "bind" (a mesh port, on this worker's host, admitting the
        session's key only), "connect" (to the workers after this one), "ready" (all the workers
        before it have connected); then this worker runs whole steps, its layers put together from
        its shares, its norms and the plan's tables."""
        self._own(meta)
        phase = meta.get("phase")
        if phase == "bind":
            self.drop_mesh()
            node, n, key, timeout = meta.get("node"), meta.get("n"), meta.get("key"), meta.get("timeout")
            if not (type(node) is int and type(n) is int and 1 <= node < n <= 256):
                raise ProtocolError("mesh: bad node numbers")
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0.05 <= timeout <= 60:
                raise ProtocolError("mesh: bad timeout")
            secure = self.link is not None and self.link.auth is not None
            if key is None and secure:
                raise ProtocolError("refused: this worker takes encrypted links only; a mesh needs the session's key")
            if key is not None and not (isinstance(key, bytes) and len(key) == 32):
                raise ProtocolError("mesh: bad key")
            wire = meta.get("wire", "f32")
            if wire not in wirecodec.CODECS or (wire == "q8_0" and self.cfg.d_model % wirecodec.QK):
                raise ProtocolError(f"mesh: wire {wire!r} is not one this model's width can take")
            layers = self._mesh_layers(meta.get("tables"), node, wire)
            host, port = (self.link.endpoint.split("://", 1)[-1].rsplit(":", 1) if self.link is not None
                          else ("127.0.0.1", "0"))
            port = self.mesh_port if self.mesh_port is not None else (
                int(port) + 1 if port.isdigit() and self.link.bound_port else 0)
            try:
                self.mesh = Mesh(node, n, key, timeout=float(timeout))
                port = self.mesh.bind(host, port)
            except (OSError, MeshError) as e:
                self.drop_mesh()
                raise ProtocolError(f"mesh: cannot listen on {host}: {e}") from None
            layers["run"].mesh = self.mesh
            self.mesh_layers = layers
            return {"port": port}
        if self.mesh is None:
            raise ProtocolError("mesh: no mesh port bound")
        if phase == "connect":
            peers = meta.get("peers")
            if not isinstance(peers, dict) or len(peers) > 256:
                raise ProtocolError("mesh: bad peers")
            parsed = {}
            for k, e in peers.items():
                if (not isinstance(k, str) or not k.isdigit() or not int(k) > self.mesh.node or int(k) >= self.mesh.n
                        or not isinstance(e, str) or not e.startswith("tcp://") or len(e) > 300):
                    raise ProtocolError("mesh: bad peer")
                parsed[int(k)] = e
            try:
                self.mesh.connect(parsed)
            except MeshError as e:
                raise ProtocolError(f"mesh: {e}") from None
            return {}
        if phase == "ready":
            try:
                self.mesh.wait_joined(range(self.mesh.node))
            except MeshError as e:
                self.drop_mesh()
                raise ProtocolError(f"mesh: {e}") from None
            return {}
        raise ProtocolError("mesh: unknown phase")

    def _mesh_layers(self, tables, node, wire="f32"):
        """The model's layers over this worker's shares, each split module wrapped to exchange its
        parts (the plan's tables say whose), with the norms and routers shipped for the mesh."""
        cfg = self.cfg
        if not isinstance(tables, dict) or set(tables) != set(KINDS):
            raise ProtocolError("mesh: bad plan tables")
        parsed = {}
        for kind, t in tables.items():
            if not isinstance(t, dict):
                raise ProtocolError("mesh: bad plan tables")
            for l, parts in t.items():
                if (not isinstance(l, str) or not l.lstrip("-").isdigit() or not isinstance(parts, list)
                        or not all(isinstance(p, list) and len(p) == 3 and all(type(v) is int for v in p)
                                   for p in parts)):
                    raise ProtocolError("mesh: bad plan tables")
                parsed[(kind, int(l))] = [tuple(p) for p in parts]
        # every module of every layer, and this worker's parts as the load built them
        cls = model_class(cfg.arch)
        run = MeshRun(None, cfg, wire)       # its mesh is set once the port is bound
        layers = []
        try:
            for l in range(cfg.n_layer):
                norms = self.modules[("norms", l)]
                fk = "moe" if norms.router is not None else "ffn"
                mine = {k: [p for p in parsed[(k, l)] if p[0] == node] for k in ("attn", fk)}
                for k in ("attn", fk):
                    if bool(mine[k]) != ((k, l) in self.modules):
                        raise ProtocolError(f"mesh: the plan's {k} of layer {l} is not what this worker loaded")
                attn = MeshModule(run, "attn", parsed[("attn", l)], self.modules.get(("attn", l)), self.tick)
                ffn = MeshModule(run, fk, parsed[(fk, l)], self.modules.get((fk, l)), self.tick)
                if fk == "moe":
                    ffn = cls.moe_class.of(cfg, norms.router, ffn)
                layers.append(cls.layer_class.of(norms, attn, ffn))
            out_norm = self.modules[("norms", -1)].out_norm
        except KeyError as e:
            raise ProtocolError(f"mesh: this worker's load lacks {e} (load it for a mesh)") from None
        skeleton = cls.__new__(cls)          # the model's own layer loop, over these layers
        skeleton.cfg, skeleton.threads = cfg, self.threads
        return {"layers": layers, "run": run, "model": skeleton, "out_norm": out_norm}

    def step(self, meta, arrays):
        """One forward step of the root's: its embedded rows [T, d] at positions pos0..; every
        layer here, exchanging parts with the other nodes; answers this worker's columns of the
        output head (of the last row, or of all rows)."""
        self._own(meta)
        if self.mesh is None or self.mesh_layers is None:
            raise ProtocolError("step: no mesh is set up")
        cfg = self.cfg
        step, every = meta.get("step"), meta.get("all")
        if type(step) is not int or not step > 0 or not isinstance(every, bool):
            raise ProtocolError("step: bad step")
        top = self._top(meta)
        if len(arrays) != 1:
            raise ProtocolError("step: expected the embedded rows")
        h = np.array(wirecodec.decode(arrays, "f32", cfg.d_model, MAX_TOKENS))
        batch = self._batch("step", meta, h.shape[0])
        m = self.mesh_layers
        m["run"].begin(step)
        pos = batch.positions()
        try:
            for l, L in enumerate(m["layers"]):
                m["model"].run_layer(L, h, batch, l, pos)
        except MeshError as e:
            raise MeshFault(f"step: {e}") from None
        self.last_seen = time.monotonic()     # a long step (a prefill) is the root heard from, not a silence
        head = self.modules.get(("head", -1))
        if head is None:
            return []
        self.tick("head")
        rows = np.ascontiguousarray(h if every else h[batch.lasts])
        normed = m["model"].rmsnorm(rows, m["out_norm"])
        y = np.ascontiguousarray(head(normed, self.threads), np.float32)
        return wirecodec.encode_top(y, top) if top else [y]

    def _batch(self, op, meta, T) -> Batch:
        """The sequences of a request's T rows: "seg" [[slot, first position, rows, logits wanted], ...]
        in row order, each over that slot's KV cache."""
        seg = meta.get("seg")
        if not isinstance(seg, list) or not 1 <= len(seg) <= len(self.kvs):
            raise ProtocolError(f"{op}: no sequences, or more than the {len(self.kvs)} slots loaded")
        parts, slots = [], set()
        for j, e in enumerate(seg):
            if (not isinstance(e, list) or len(e) != 4 or not all(type(v) is int for v in e[:3])
                    or not isinstance(e[3], bool) or not 0 <= e[0] < len(self.kvs) or e[0] in slots
                    or e[2] < 1 or not 0 <= e[1] <= self.n_ctx - e[2]):
                raise ProtocolError(f"{op}: bad sequence {j}: [slot, first position, rows, logits "
                                    f"wanted] with slots 0..{len(self.kvs) - 1} once each, in a context "
                                    f"of {self.n_ctx}")
            slots.add(e[0])
            kv = self.kvs[e[0]]
            kv.pos = e[1]
            parts.append((kv, e[2], e[3]))
        if sum(p[1] for p in parts) != T:
            raise ProtocolError(f"{op}: the sequences' rows do not add up to the {T} sent")
        return Batch(parts)

    @staticmethod
    def _top(meta) -> int:
        """How many best logits a head answer carries (0: the whole slice)."""
        top = meta.get("top", 0)
        if type(top) is not int or not 0 <= top <= wirecodec.MAX_TOP:
            raise ProtocolError(f"head: top must be 0..{wirecodec.MAX_TOP}")
        return top

    def compute(self, op, meta, arrays):
        self._own(meta)
        self.tick(op)
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
            batch = self._batch("attn", meta, T)
            y = mod(x, batch, meta["layer"], batch.positions(), th)
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
        if op == "head":
            top = self._top(meta)
            return wirecodec.encode_top(y, top) if top else wirecodec.encode(y, "f32")
        return wirecodec.encode(y, wirecodec.reply_codec(codec))

