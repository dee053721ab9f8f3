"""The model's side of a sync, the same code on the root and on every worker: whose parts a split
module adds up, this node's own part, and (in a mesh) the exchange itself.

A MoE layer's shared expert runs on the root, added to the root's part (Experts.__call__); so the
root sends a part of every MoE layer of a model with shared experts, whether or not it holds
routed experts there. Partial sums are float64 whose float32 terms add exactly in double, so the
parts added in node order give one process's bits."""
import time

import numpy as np

from ..net import wire as wirecodec
from ..plan import row_halves


def senders(cfg, kind, parts) -> list:
    """Nodes whose parts make up one split module's output, in node order."""
    nodes = [n for n, _, _ in parts]
    if kind == "moe" and getattr(cfg, "n_expert_shared", 0) and 0 not in nodes:
        nodes = [0] + nodes
    return nodes


def own_part(kind, local, x, args):
    """This node's part of a module: its share, or (a MoE layer where it holds no routed experts)
    the shared expert alone, args being (ids, weights, threads, shared); None if it has none."""
    if local is not None:
        return local(x, *args)
    shared = args[3] if kind == "moe" and len(args) > 3 else None
    return None if shared is None else shared(x, args[2]).astype(np.float64)


def add_parts(order, parts: dict):
    """The parts added in node order (float64)."""
    y = None
    for n in order:
        y = parts[n] if y is None else y + parts[n]
    return y


class MeshRun:
    """The syncs of one step over a net.mesh.Mesh: each split module's part goes to every other
    node at once, theirs come in, and all add them in node order: every node then holds the same
    bits of the residual stream. A part travels in two halves of its rows; a module that yields
    its output by halves (row_blocks: attention, dense FFN) has the first on the wire while it
    computes the second.

    On a smaller wire (f16, q8_0) every node adds the parts as they travel, its own included (each
    rounded as it would be sent), so every node still holds the same bits: one process's within
    the wire's rounding."""

    def __init__(self, mesh, cfg, wire="f32"):
        self.mesh, self.cfg, self.sync = mesh, cfg, 0
        self.codec = wirecodec.reply_codec(wire)      # f64 on the exact wire
        self.waited = 0.0               # seconds spent sending and waiting, own parts not included
        self.halves = row_halves(cfg.d_model)

    def _pack(self, y) -> tuple:
        """A part block as bytes to send, and as every node will add it (float64)."""
        buf = wirecodec.to_bytes(y, self.codec)
        return buf, (y if self.codec == "f64" else self._unpack(buf, *y.shape))

    def _unpack(self, buf, T, n) -> np.ndarray:
        return wirecodec.from_bytes(buf, self.codec, T, n).astype(np.float64, copy=False)

    def begin(self, step: int):
        self.mesh.begin(step)
        self.sync = 0

    def _send(self, block, buf):
        t = time.perf_counter()
        self.mesh.send(self.mesh.step, block, buf)
        self.waited += time.perf_counter() - t

    def __call__(self, kind, parts, local, x, args, tick=None):
        sync, self.sync = self.sync, self.sync + 1
        order = senders(self.cfg, kind, parts)
        me = self.mesh.node
        halves = self.halves
        mine = {}
        if me in order:
            if tick is not None:
                tick(kind)
            if local is not None and hasattr(local, "row_blocks"):
                blocks = local.row_blocks(x, *args)
            else:
                whole = own_part(kind, local, x, args)
                blocks = ((a, b, whole[:, a:b]) for a, b in halves)
            for i, (a, b, y) in enumerate(blocks):
                if (a, b) != halves[i]:
                    raise ValueError(f"a {kind} part came in rows {a}..{b}, not {halves[i]}")
                buf, mine[i] = self._pack(np.ascontiguousarray(y, np.float64))
                self._send(len(halves) * sync + i, buf)
        t = time.perf_counter()
        T = x.shape[0]
        out = np.empty((T, self.cfg.d_model), np.float64)
        others = [n for n in order if n != me]
        for i, (a, b) in enumerate(halves):
            got = self.mesh.gather(len(halves) * sync + i, others, wirecodec.packed_size(self.codec, T, b - a))
            got = {n: self._unpack(buf, T, b - a) for n, buf in got.items()}
            if me in order:
                got[me] = mine[i]
            out[:, a:b] = add_parts(order, got)
        self.waited += time.perf_counter() - t
        return out


class MeshModule:
    """A worker's split module in a mesh: the model's layer loop calls it as it calls the module."""

    def __init__(self, run, kind, parts, local, tick=None):
        self.run, self.kind, self.parts, self.local, self.tick = run, kind, parts, local, tick

    def __call__(self, x, *args):
        return self.run(self.kind, self.parts, self.local, x, args, self.tick)
