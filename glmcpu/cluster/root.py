"""The root of a cluster: the model's own modules over the root's ranges, each split module
wrapped in `Distributed`, which sends the input to the workers holding the other ranges, runs the
root's range meanwhile, and adds up (or, for the output head, lays side by side) the parts in
node order. There is no second copy of the math here: workers build the same modules over their
ranges (worker.py), and a worker that is lost is replaced by the same module built on the root
from its own file.

Faults: a worker holding attention heads also holds their KV cache, so losing it, whatever it was
answering, replays the sequence so far (a prefill) with that share computed on the root; the
kernels give the same bits in a batch as one token at a time, so the answer does not change. A
worker that comes back starts clean, from the next request. Every request carries this root's
session and the worker's load epoch: a worker serves one root at a time, and a stale request
(one sent before a reload) is refused instead of touching the new state."""
import dataclasses
import json
import os
import secrets
import sys
import time
import weakref

import numpy as np

from .. import ops
from ..errors import GlmcpuError
from ..models.glm4 import Batch, segments
from ..net import wire as wirecodec
from ..net.link import Client, Keepalive, LinkError, LinkLost
from ..net.mesh import Mesh, MeshError, new_key
from ..net.protocol import ProtocolError
from ..plan import make_plan, weigh
from ..weights import FileWeights, Recorder
from .exchange import MeshRun, add_parts, own_part, senders


LONG = 600        # seconds a live worker may take over a load or a put (a dead one is noticed in --timeout)


class ClusterError(GlmcpuError):
    """A worker that cannot be used: unreachable at start, busy with another root, a file that
    differs from the root's, wrong protocol."""


class WorkerLost(Exception):
    """A worker holding KV-cache state stopped answering mid-sequence (handled by a replay)."""
    replay = True


class StepAgain(WorkerLost):
    """A mesh step called off (a node lost or misbehaving): the step runs again, over the star,
    from where it started; the sequence so far is replayed only if a lost node held KV heads."""
    replay = False


class Distributed:
    """One split module of the root's model: same call as the module it wraps."""

    def __init__(self, cluster, kind, layer, local):
        self.cluster, self.kind, self.layer, self.local = cluster, kind, layer, local
        self.parts = cluster.plan.parts(kind, layer)          # [(node, a, b)] in node order
        self.fallback = {}                                    # node -> the same module, built here

    def __call__(self, x, *args):
        return self.cluster.exchange(self, x, args)


class DraftHead:
    """A draft head (models.glm4_moe.MTP) whose output head may be split: a worker lost during its
    step marks the workers' KV stale (the next forward replays it) and the step runs again, now
    with that share on the root; its own cache is the root's and commits only whole steps."""

    def __init__(self, cluster, head):
        self.cluster, self.head = cluster, head

    def new_cache(self, n_ctx):
        return self.head.new_cache(n_ctx)

    def limit_vocab(self, n):
        self.head.limit_vocab(n)

    def forward(self, *args, **kw):
        while True:
            try:
                return self.head.forward(*args, **kw)
            except WorkerLost:
                self.cluster.forget()


class Cluster:
    """What the engine runs when workers share the work: forward, new_cache, begin, status."""
    sparse_logits = True        # forward(top=k): workers send their k best logits, not whole slices

    def __init__(self, f, model_cls, endpoints, keypair=None, worker_key=None, timeout=5.0, shares=None,
                 threads=1, n_ctx=4096, wire="f32", progress=None, digest_cache=None, repack=None,
                 kv_type=("f32", "f32"), topology=None, slots=1):
        """slots: sequences run at once (serve --parallel): each worker holds a KV cache for each."""
        if wire not in wirecodec.CODECS:
            raise ClusterError(f"--wire {wire}: use f32 (exact), f16 (half the bytes) or q8_0 (about a quarter)")
        if topology is None:
            # the default: every node's port carries a part to each other node, which past 4 nodes
            # on 1 GbE costs more than the star saves (glmcpu plan's 2/4/8-node predictions)
            topology = os.environ.get("GLMCPU_TOPOLOGY") or ("mesh" if len(endpoints) <= 3 else "star")
        if topology not in ("star", "mesh"):
            raise ClusterError(f"--topology {topology}: use star (every sync through the root) or mesh "
                               "(every node runs the layers and sends its parts to all others)")
        self.topology, self.mesh, self.run_mesh, self.stepping, self.steps = topology, None, None, False, 0
        self.mesh_again = False           # a mesh dropped with nobody lost: set up again at the next request
        self.top = 0                      # this step's head: the workers' best `top` logits only (0: all)
        self.timeout = timeout
        if not 1 <= int(slots) <= 64:
            raise ClusterError(f"--parallel {slots}: a cluster runs 1 to 64 sequences at once")
        self.slots = int(slots)
        self.file, self.model_cls, self.n_ctx, self.wire, self.kv_type = f, model_cls, n_ctx, wire, tuple(kv_type)
        self.cfg = model_cls.config_class.from_gguf(f)
        self.session = secrets.token_hex(16)
        self.clients = [Client(e, keypair, worker_key, timeout=timeout) for e in endpoints]
        self.alive = [True] * len(self.clients)
        self.epochs = [0] * len(self.clients)
        self.losses = []                  # why workers were lost, the last few
        self.stats = {"tokens": 0, "round_trips": 0, "failovers": 0, "replays": 0, "net_seconds": 0.0,
                      "compute_seconds": 0.0, "sent": 0, "received": 0,     # bytes of requests, not of loads
                      "syncs": 0, "mesh_steps": 0}
        # however this root ends (close, an error, Ctrl-C, exit), its workers hear goodbye
        self.keepalive = Keepalive(endpoints, keypair, worker_key, "ping", {"s": self.session})
        self._goodbye = weakref.finalize(self, goodbye, self.keepalive, self.clients, self.session)
        try:
            self._start(endpoints, shares, threads, progress, digest_cache, repack)
        except BaseException:
            self.close()
            raise

    def _start(self, endpoints, shares, threads, progress, digest_cache, repack):
        f, cfg = self.file, self.cfg
        self.info = [self.hello(c) for c in self.clients]
        # by default shares follow each node's threads, trimmed to what its memory holds; "auto"
        # follows the read bandwidth each node measured (decode is bound by it), which is truer but
        # noisy, and a plan that moves makes workers' caches of shipped weights miss
        if not shares or shares == "auto":
            from .worker import available_gb, measure_bandwidth
            speeds = ([measure_bandwidth(threads)] + [float(i.get("bandwidth_gbs") or 1) for i in self.info]
                      if shares == "auto" else [threads] + [float(i.get("threads") or 1) for i in self.info])
            memories = [available_gb()] + [float(i.get("memory_gb") or 0) for i in self.info]
            shares = weigh(speeds, memories, f.size / 2**30)
        try:
            self.plan = make_plan(cfg, ["root"] + list(endpoints), shares)
        except ValueError as e:
            raise ClusterError(f"--shares: {e}") from None
        self.packing = ops.plan_packing(f, repack)
        self.model = self.model_cls(f, threads, ranges=self.plan.ranges(0), progress=progress, packing=self.packing,
                                    kv_type=self.kv_type)
        self.modules = []
        for l, L in enumerate(self.model.layers):
            L.attn = self._wrap("attn", l, L.attn)
            if hasattr(L.ffn, "experts"):
                L.ffn.experts = self._wrap("moe", l, L.ffn.experts)       # the root adds the shared expert
            else:
                L.ffn = self._wrap("ffn", l, L.ffn)
        self.model.output = self._wrap("head", -1, self.model.output)
        self.kv_nodes = {n for n, _, _ in (p for parts in self.plan.tables["attn"].values() for p in parts) if n > 0}
        self.digests = self._digests(digest_cache)
        self.config = {k: (float(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(cfg).items()}
        self.shipped = 0
        self.clock = 0                    # bind()s so far: when each slot was last used
        self.forget()                     # lines[i]: the cache whose sequence the workers' KV slot i holds
        self.needs_replay = False
        for i, c in enumerate(self.clients):
            try:
                self.load(i)
            except LinkLost as e:         # gone while loading: the root computes its shares
                self.lose(i + 1, f"lost while loading: {e}")
                print(f"glmcpu: {e}; the root computes that worker's share itself", file=sys.stderr)
            except LinkError as e:
                raise ClusterError(f"worker {c.endpoint} could not load its share: {e}") from None
        self.needs_replay = False         # nothing was computed yet: nothing to replay
        if self.topology == "mesh" and all(self.alive):
            self.setup_mesh()

    def _wrap(self, kind, layer, local):
        if all(n == 0 for n, _, _ in self.plan.parts(kind, layer)) and self.topology == "star":
            return local                  # the root holds all of it: nothing to send (a mesh's workers need it)
        mod = Distributed(self, kind, layer, local)
        self.modules.append(mod)
        return mod

    # ---- loading -----------------------------------------------------------------------------

    def shares_of(self, node):
        """[(kind, layer, a, b)] a worker builds: its plan shares, and in a mesh every layer's norms
        (and routers) and the output norm, for it runs the layer loop itself."""
        own = self.plan.shares_of(node)
        if self.topology == "mesh":
            own = own + [("norms", l, 0, 1) for l in range(self.cfg.n_layer)] + [("norms", -1, 0, 1)]
        return own

    def _digests(self, cache_dir):
        """sha256 of every worker share (its tensors' bytes, names and ranges): the name a worker
        stores a shipped share under and the check of its own copy of the file. Kept on disk per
        file (size, mtime and header), so a second start reads nothing."""
        wanted = [(k, l, a, b) for node in range(1, len(self.plan.nodes)) for k, l, a, b in self.shares_of(node)]
        path = None
        known = {}
        if cache_dir is not False:
            cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                  os.path.join(os.path.expanduser("~"), ".cache"), "glmcpu", "digests")
            st = os.stat(self.file.path)
            # the kernel sets ctime on every write and on every mtime change; it cannot be set back,
            # so a file rewritten in place (its mtime restored or not) gets new digests
            path = os.path.join(cache_dir, f"{self.file.fingerprint()}-{st.st_size}-{st.st_mtime_ns}-"
                                           f"{st.st_ctime_ns}-{st.st_dev}-{st.st_ino}.json")
            try:
                with open(path) as fh:
                    known = json.load(fh)
            except (OSError, ValueError):
                known = {}
        out = {}
        for share in wanted:
            key = "/".join(map(str, share))
            if key not in known:
                rec = Recorder(FileWeights(self.file), keep=False)
                self.build(rec, *share)
                known[key] = rec.digest()
            out[share] = known[key]
        if path:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "w") as fh:
                    json.dump(known, fh)
                os.replace(path + ".tmp", path)
            except OSError:
                pass
        return out

    def build(self, weights, kind, layer, a, b, repack=False):
        return self.model_cls.build(weights, self.cfg, kind, layer, (a, b), repack)

    def load(self, i):
        """Ask worker i to build its shares (a new epoch: empty KV caches); send the weights of
        any it has neither in a matching copy of the file nor in its cache (once: it keeps them)."""
        c = self.clients[i]
        self.epochs[i] += 1
        shares = [[k, l, a, b, self.digests[(k, l, a, b)]] for k, l, a, b in self.shares_of(i + 1)]
        meta = {"s": self.session, "e": self.epochs[i], "config": self.config, "ctx": self.n_ctx, "kv": list(self.kv_type),
                "fingerprint": self.file.fingerprint(), "shares": shares, "slots": self.slots}
        missing = self._request_load(c, meta)
        if not missing:
            return
        by_digest = {s[4]: s[:4] for s in shares}
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        with Progress(TextColumn(f"sending weights to {c.endpoint} (once: it caches them)"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                      transient=True) as bar:
            task = bar.add_task("", total=len(missing))
            for digest in missing:
                if digest not in by_digest:
                    raise LinkError(f"{c.endpoint} asked for a share this root did not offer")
                rec = Recorder(FileWeights(self.file))
                self.build(rec, *by_digest[digest])
                entries, arrays = rec.payload()
                c.request("put", {"s": self.session, "digest": digest, "entries": entries}, arrays, timeout=LONG)
                self.shipped += sum(x.nbytes for x in arrays)
                bar.advance(task)
        if self._request_load(c, meta):
            raise LinkError(f"{c.endpoint} still lacks shares after they were sent")

    def _request_load(self, c, meta):
        try:
            return c.request("load", meta, timeout=LONG)[0].get("missing", [])
        except LinkError as e:
            msg = str(e)
            if ": busy:" in msg or ": refused:" in msg:
                raise ClusterError(msg.split(": ", 1)[0] + ": " + msg.split(": ", 2)[-1]) from None
            raise

    def hello(self, c):
        try:
            meta, _ = c.request("hello", {"s": self.session})
        except LinkError as e:
            raise ClusterError(f"worker {c.endpoint} is not reachable ({e}); is it running, with "
                               "matching keys (or --insecure on both sides)?") from None
        return meta

    # ---- running -----------------------------------------------------------------------------

    def new_cache(self, n_ctx):
        return self.model.new_cache(n_ctx)

    def expert_stats(self):
        return self.model.expert_stats()

    def begin(self, cache):
        """Before a request: workers that failed earlier get another chance (one that comes back
        starts clean, so the kept cache is computed again), and a mesh dropped over a fault of no
        worker's own is set up again."""
        if self.revive():
            cache.pos, cache.tokens = 0, []
        elif self.mesh_again and self.mesh is None and all(self.alive):
            self.setup_mesh()
        self.mesh_again = False

    def draft_head(self):
        """The file's MTP head: its layer runs whole on the root, its output head (the model's,
        split) through the cluster, so a worker lost in a draft step is a failover like any other."""
        head = self.model.draft_head()
        return None if head is None else DraftHead(self, head)

    def forward(self, ids, cache, all_logits=False, hidden=False, top=0):
        """The model's forward (of one cache, or of a glm4.Batch of several: each sequence in its
        own KV slot on the workers). A sequence whose slot the workers no longer hold (another took
        it, or a worker holding KV heads was lost meanwhile) is replayed first (the step's tokens
        are committed to the cache only once all of it came back, so the replay ends where the
        step starts). A cache cut back (a draft's rejected guesses) needs nothing: each request
        names its first position. top > 0: of the last row's logits only the `top` best are wanted
        (the sampler's choice needs no more): workers send those, the others come back as -inf."""
        caches = [c for c, _, _ in segments(cache, len(ids))]
        if isinstance(cache, Batch) and not (cache.lasts or all_logits):
            cache.lasts = [len(ids) - 1]     # every node runs the head each step: one row, not used
        while True:
            try:
                while not all(any(c is h for h in self.lines) for c in caches):
                    for c in caches:          # (a replay that lost a worker forgets the others' slots)
                        self.bind(c, caches)
                self.top = int(top) if not all_logits and 0 < top <= wirecodec.MAX_TOP else 0
                try:
                    out = self.run(ids, cache, all_logits, hidden)
                finally:
                    self.top = 0
                self.stats["tokens"] += len(ids)
                return out
            except WorkerLost as e:
                if e.replay or self.needs_replay:
                    self.needs_replay = False
                    self.forget()

    def forget(self):
        """The workers' KV slots hold nothing known: each sequence is replayed at its next step."""
        self.lines = [None] * self.slots
        self.used = [0] * self.slots

    def line(self, cache) -> int:
        return next(i for i, c in enumerate(self.lines) if c is cache)

    def bind(self, cache, step):
        """A KV slot on the workers for cache: its own, else a free one or the least recently used
        one that no other cache of this step needs, its sequence so far replayed into it."""
        self.clock += 1
        if any(c is cache for c in self.lines):
            i = self.line(cache)
        else:
            taken = [i for i, c in enumerate(self.lines) if c is not None and any(c is s for s in step)]
            free = [i for i in range(self.slots) if i not in taken]
            if not free:
                raise GlmcpuError(f"a step of {len(step)} sequences; this cluster was loaded for {self.slots}")
            i = min(free, key=lambda j: (self.lines[j] is not None, self.used[j]))
            self.lines[i] = cache
            if cache.pos > 0:
                self.replay(cache)
        self.used[i] = self.clock

    def replay(self, cache):
        history = list(cache.tokens[:cache.pos])
        self.stats["replays"] += 1
        while True:                       # until one whole pass gets through
            cache.pos, cache.tokens = 0, []
            self.needs_replay = False
            if not any(c is cache for c in self.lines):     # another replay's fault forgot the slots
                self.lines[self.used.index(min(self.used))] = cache
            try:
                for s in range(0, len(history), 256):
                    self.run(history[s:s + 256], cache, False)
                return
            except WorkerLost:            # lost another one meanwhile: again, without it
                self.forget()
                continue

    def seg(self, cache, T) -> list:
        """The sequences of a request's T rows as the workers take them: [[slot, first position,
        rows, logits wanted], ...]."""
        wanted = set(cache.lasts) if isinstance(cache, Batch) else {T - 1}
        return [[self.line(c), int(c.pos), b - a, b - 1 in wanted] for c, a, b in segments(cache, T)]

    # ---- the mesh ------------------------------------------------------------------------------

    def setup_mesh(self):
        """Every worker binds a mesh port and connects to the workers after it, the root to all;
        the mesh's AES-GCM key (fresh each time) travels over each worker's own CurveZMQ link. On
        any failure the cluster goes on as a star (a lost worker is a failover as ever)."""
        self.drop_mesh()
        secure = self.clients[0].keypair is not None
        key = new_key() if secure else None
        n = 1 + len(self.clients)
        timeout = float(min(self.timeout, 60))       # a worker takes up to 60 s
        base = {"s": self.session, "n": n, "timeout": timeout, "key": key, "wire": self.wire,
                "tables": {k: {str(l): [list(p) for p in parts] for l, parts in t.items()}
                           for k, t in self.plan.tables.items()}}
        i = 0
        try:
            ports = {}
            for i, c in enumerate(self.clients):
                meta, _ = c.request("mesh", dict(base, e=self.epochs[i], phase="bind", node=i + 1))
                ports[i + 1] = int(meta["port"])
            eps = {j: f"tcp://{host_of(self.clients[j - 1].endpoint)}:{port}" for j, port in ports.items()}
            for i, c in enumerate(self.clients):
                c.request("mesh", {"s": self.session, "e": self.epochs[i], "phase": "connect",
                                   "peers": {str(j): e for j, e in eps.items() if j > i + 1}})
            self.mesh = Mesh(0, n, key, timeout=timeout)
            self.mesh.connect(eps)
            for i, c in enumerate(self.clients):
                c.request("mesh", {"s": self.session, "e": self.epochs[i], "phase": "ready"})
        except LinkLost as e:
            self.drop_mesh()
            self.lose(i + 1, f"lost while setting up the mesh: {e}")
            print(f"glmcpu: {e}; the cluster runs as a star without it", file=sys.stderr)
            return
        except (LinkError, MeshError, KeyError, TypeError, ValueError) as e:
            self.drop_mesh()
            print(f"glmcpu: no mesh ({e}); the cluster runs as a star", file=sys.stderr)
            return
        self.run_mesh = MeshRun(self.mesh, self.cfg, self.wire)

    def use_mesh(self, on: bool) -> bool:
        """Switch a cluster loaded as a mesh between the mesh and the star (tools/bench_cluster.py
        compares them on the same workers); whether it runs as a mesh now."""
        if self.topology != "mesh":
            raise ClusterError("this cluster was loaded as a star; load it with topology='mesh'")
        if not on:
            self.drop_mesh()
        elif self.mesh is None and all(self.alive):
            self.setup_mesh()
        return self.mesh is not None

    def drop_mesh(self):
        if self.mesh is not None:
            self.mesh.close()
        self.mesh = self.run_mesh = None

    def run(self, ids, cache, all_logits=False, hidden=False):
        """One forward step: over the star, or in a mesh the root hands every worker the step's
        embedded rows and runs the layers as they do, exchanging parts."""
        if self.mesh is None:
            return self.model.forward(ids, cache, all_logits, hidden)
        self.steps += 1
        meta = {"s": self.session, "step": self.steps, "seg": self.seg(cache, len(ids)), "all": bool(all_logits),
                "top": self.top}
        rows = self.model.embed(self.model.embd, ids)
        mesh = self.mesh
        bytes0 = (sum(c.sent for c in self.clients) + mesh.bytes_out, sum(c.received for c in self.clients) + mesh.bytes_in)
        self.run_mesh.begin(self.steps)
        self.stepping = True
        try:
            for i, c in enumerate(self.clients):
                try:
                    c.send("step", dict(meta, e=self.epochs[i]), [rows])
                except LinkError as e:
                    self.mesh_failed(i + 1, f"step not sent: {e}")
            out = self.model.forward(ids, cache, all_logits, hidden)
        except WorkerLost:
            raise
        except BaseException:             # Ctrl-C or a bug mid-step: the workers drop the step
            if self.mesh is not None:
                self.mesh.abort()
            raise
        finally:
            self.stepping = False
        self.stats["mesh_steps"] += 1
        self.stats["sent"] += sum(c.sent for c in self.clients) + mesh.bytes_out - bytes0[0]
        self.stats["received"] += sum(c.received for c in self.clients) + mesh.bytes_in - bytes0[1]
        return out

    def mesh_failed(self, node, why):
        """A node of the mesh failed (lost, or sent what it should not): the others are told to
        drop the step, the cluster goes on as a star, and the step runs again."""
        if self.mesh is not None:
            self.mesh.abort()
        self.drop_mesh()
        if node:
            self.lose(node, f"in the mesh: {why}")
        else:
            self.mesh_again = True
        raise StepAgain()

    def exchange_mesh(self, mod, x, args):
        """One sync of a mesh step; the output head's parts come back as the workers' answers to
        the step (every worker answers it, holding a part of the head or not)."""
        t0 = time.perf_counter()
        if mod.kind != "head":
            w0 = self.run_mesh.waited
            try:
                y = self.run_mesh(mod.kind, mod.parts, mod.local, x, args)
            except MeshError as e:
                self.mesh_failed(e.node, e)
            self.stats["syncs"] += 1
            self.stats["net_seconds"] += self.run_mesh.waited - w0
            self.stats["compute_seconds"] += time.perf_counter() - t0 - (self.run_mesh.waited - w0)
            return y
        out = {0: mod.local(x, *args)} if mod.local is not None else {}
        t0 = time.perf_counter()
        widths = {n: b - a for n, a, b in mod.parts}
        for i, c in enumerate(self.clients):
            if not self.alive[i]:
                continue
            try:
                _, arrays = c.recv()
                if i + 1 in widths:
                    y = wirecodec.decode_top(arrays, widths[i + 1], x.shape[0], self.top)
                    if y.shape[0] != x.shape[0]:
                        raise ProtocolError(f"{y.shape[0]} rows of logits for {x.shape[0]}")
                    out[i + 1] = y
            except (LinkError, ProtocolError) as e:
                # a worker whose trouble was another node's is not blamed: the star finds out who is gone
                self.mesh_failed(0 if getattr(e, "kind", None) == "mesh" else i + 1, f"head: {e}")
        self.stats["net_seconds"] += time.perf_counter() - t0
        return np.concatenate([out[n] for n, _, _ in mod.parts], 1)

    # ---- the star ------------------------------------------------------------------------------

    def exchange(self, mod, x, args):
        """Send x to the live workers holding parts of mod, run the root's part, gather; parts of
        lost workers are computed here, from the same wire values the worker would have read. Partial
        sums come in float64 (f32 wire) and add in node order: float32 chunk sums add exactly in
        double, so the total is one process's."""
        if self.stepping:
            return self.exchange_mesh(mod, x, args)
        kind = mod.kind
        x = np.ascontiguousarray(x, np.float32)
        meta = {"layer": mod.layer, "s": self.session, "wire": self.wire}
        extra = []
        if kind == "attn":
            meta["seg"] = self.seg(args[0], x.shape[0])
        elif kind == "head":
            meta["top"] = self.top
        elif kind == "moe":
            extra = [np.ascontiguousarray(args[0], np.int32), np.ascontiguousarray(args[1], np.float32)]
        sent = wirecodec.encode(x, self.wire)
        reply = wirecodec.reply_codec(self.wire)      # partial sums: f64 on the exact wire
        bytes0 = (sum(c.sent for c in self.clients), sum(c.received for c in self.clients))
        asked = []
        for n, _, _ in mod.parts:
            if n > 0 and self.alive[n - 1]:
                try:
                    self.clients[n - 1].send(kind, dict(meta, e=self.epochs[n - 1]), sent + extra)
                    asked.append(n)
                except LinkError as e:
                    self.lose(n, f"{kind} not sent: {e}")
        t0 = time.perf_counter()
        out = {}
        own = own_part(kind, mod.local, x, args)
        if own is not None:
            out[0] = own
        t1 = time.perf_counter()
        self.stats["compute_seconds"] += t1 - t0
        width = None
        for n, a, b in mod.parts:
            if n in asked:
                width = (b - a) if kind == "head" else self.cfg.d_model
                try:
                    _, arrays = self.clients[n - 1].recv()
                    out[n] = (wirecodec.decode_top(arrays, width, x.shape[0], self.top) if kind == "head"
                              else wirecodec.decode(arrays, reply, width, x.shape[0]))
                except (LinkError, ProtocolError) as e:
                    self.lose(n, f"{kind}: {e}")
        if asked:
            self.stats["round_trips"] += 1
        self.stats["sent"] += sum(c.sent for c in self.clients) - bytes0[0]
        self.stats["received"] += sum(c.received for c in self.clients) - bytes0[1]
        self.stats["net_seconds"] += time.perf_counter() - t1       # waiting beyond our own share
        if self.needs_replay:
            self.needs_replay = False
            raise WorkerLost()
        for n, a, b in mod.parts:
            if n not in out:                                       # a worker that is gone
                if n not in mod.fallback:
                    mod.fallback[n] = self.build(FileWeights(self.file, self.packing.dense), kind, mod.layer, a, b,
                                                 self.packing.experts)
                y = mod.fallback[n](wirecodec.roundtrip(x, self.wire), *(args[:3] if kind == "moe" else args))
                out[n] = y if kind == "head" else wirecodec.roundtrip(y, reply)
        if kind == "head":
            return np.concatenate([out[n] for n, _, _ in mod.parts], 1)
        return add_parts(senders(self.cfg, kind, mod.parts), out)

    def lose(self, n, why=""):
        if not self.alive[n - 1]:
            return
        self.alive[n - 1] = False
        self.stats["failovers"] += 1
        self.losses = (self.losses + [f"worker {n} ({self.clients[n - 1].endpoint}): {why}"])[-8:]
        self.clients[n - 1].reset()
        if n in self.kv_nodes:
            self.needs_replay = True

    def revive(self, timeout=0.5) -> int:
        """Workers that failed earlier, asked again (each reload is a new epoch with empty KV
        caches); returns how many came back."""
        back = 0
        for i, c in enumerate(self.clients):
            if self.alive[i]:
                continue
            try:
                c.reset()
                c.request("hello", timeout=timeout)
                self.load(i)
            except (LinkError, ClusterError):
                c.reset()
                continue
            self.alive[i] = True
            for mod in self.modules:
                mod.fallback.pop(i + 1, None)
            back += 1
        if back:
            self.forget()
            if self.topology == "mesh" and all(self.alive):
                self.setup_mesh()
        return back

    def status(self) -> dict:
        """Network figures per token so far: bytes each way, round trips, seconds waiting."""
        n = max(1, self.stats["tokens"])
        return {"tokens": self.stats["tokens"],
                "sent_kib": self.stats["sent"] / 1024 / n,
                "received_kib": self.stats["received"] / 1024 / n,
                "round_trips": self.stats["round_trips"] / n,
                "network_ms": 1e3 * self.stats["net_seconds"] / n,
                "compute_ms": 1e3 * self.stats["compute_seconds"] / n,
                "failovers": self.stats["failovers"], "replays": self.stats["replays"], "losses": list(self.losses),
                "alive": f"{sum(self.alive)}/{len(self.alive)}",
                "topology": "mesh" if self.mesh is not None else "star",
                "syncs": self.stats["syncs"] / n,
                "nodes": f"{1 + sum(self.alive)}/{1 + len(self.alive)}"}


    def close(self):
        """Free the workers for other roots at once, and close the links (also run when this
        object is collected, and at interpreter exit)."""
        if getattr(self, "mesh", None) is not None:
            self.drop_mesh()
        if hasattr(self, "_goodbye"):
            self._goodbye()
        else:
            for c in self.clients:
                c.close()


def host_of(endpoint: str) -> str:
    """The host of a tcp:// endpoint, as this root reaches it (other nodes reach it the same way)."""
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0]


def goodbye(keepalive, clients, session, wait=1.0):
    """Say "bye" to every worker (all at once, then up to `wait` seconds for the answers), so each
    may serve another root now rather than after its lease; then close the links. Workers taken
    for lost hear it too: one that was only slow (or was lost as Ctrl-C struck) is freed as well."""
    keepalive.stop()
    asked = []
    for c in clients:
        try:
            # on a fresh connection: an answer still due on the old one (a request cut short by
            # Ctrl-C) must not pass for the bye's, nor the close that follows drop an unsent bye
            c.reset()
            c.send("bye", {"s": session})
            asked.append(c)
        except Exception:                     # a closed or broken socket: nothing to free
            pass
    deadline = time.monotonic() + wait
    for c in asked:
        try:
            c.recv(timeout=max(0.05, deadline - time.monotonic()))
        except Exception:
            pass
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
