"""The model's side of a sync, the same code on the root and on every worker: whose parts a split
module adds up, this node's own part, and (in a mesh) the exchange itself.

A MoE layer's shared expert runs on the root, added to the root's part (Experts.__call__); so the
root sends a part of every MoE layer of a model with shared experts, whether or not it holds
routed experts there. Partial sums are float64 whose float32 terms add exactly in double, so the
parts added in node order give one process's bits."""
import time

import numpy as np


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
    bits of the residual stream."""

    def __init__(self, mesh, cfg):
        self.mesh, self.cfg, self.sync = mesh, cfg, 0
        self.waited = 0.0               # seconds spent sending and waiting, own parts not included

    def begin(self, step: int):
        self.mesh.begin(step)
        self.sync = 0

    def __call__(self, kind, parts, local, x, args, tick=None):
        sync, self.sync = self.sync, self.sync + 1
        order = senders(self.cfg, kind, parts)
        me = self.mesh.node
        got = {}
        if me in order:
            if tick is not None:
                tick(kind)
            own = own_part(kind, local, x, args)
            got[me] = own = np.ascontiguousarray(own, np.float64)
        t = time.perf_counter()
        if me in order:
            self.mesh.send(self.mesh.step, sync, memoryview(own.reshape(-1)).cast("B"))
        T, d = x.shape[0], self.cfg.d_model
        for n, buf in self.mesh.gather(sync, [n for n in order if n != me], T * d * 8).items():
            got[n] = np.frombuffer(buf, np.float64).reshape(T, d)
        self.waited += time.perf_counter() - t
        y = add_parts(order, got)
        return y if y.flags.writeable else y.copy()


class MeshModule:
    """A worker's split module in a mesh: the model's layer loop calls it as it calls the module."""

    def __init__(self, run, kind, parts, local, tick=None):
        self.run, self.kind, self.parts, self.local, self.tick = run, kind, parts, local, tick

    def __call__(self, x, *args):
        return self.run(self.kind, self.parts, self.local, x, args, self.tick)
