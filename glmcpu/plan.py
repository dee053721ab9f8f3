"""Who computes what in a cluster, and what it costs: pure functions of the model's config and
sizes, the nodes' speeds and memories, and the link. Nothing here runs a model or a socket.

The split vocabulary: "attn" (query heads, with the KV heads they read and their columns of the
output projection), "ffn" (units of a dense FFN: gate/up rows, down columns), "moe" (ranges of
whole routed experts) and "head" (vocabulary rows of the output matrix)."""
from dataclasses import dataclass, field

import numpy as np

LAYER_KINDS = ("attn", "ffn", "moe")     # split modules of a layer: query heads, FFN units, experts
KINDS = LAYER_KINDS + ("head",)          # and the output head's vocabulary rows
WIRE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}    # bytes per value of a hidden vector on the wire
FRAME = 120           # bytes of header per message (msgpack + ZeroMQ framing), measured on loopback
HEAD_TOP = 40         # a worker's slice of the output head sends its best logits (and ids) while decoding:
                      # the default sampler's top-k (Sampler.needs; a penalty would need the whole slice)


@dataclass
class Plan:
    """Node 0 is the root; shares are fractions of the work. tables[kind][layer] lists
    (node, a, b) ranges covering that module exactly, in node order (the head's layer is -1)."""
    nodes: list
    shares: list
    tables: dict = field(default_factory=lambda: {k: {} for k in KINDS})

    def ranges(self, node):
        """ranges(kind, layer) for the model's constructor: this node's (a, b), or () for none."""
        def rng(kind, layer):
            for n, a, b in self.tables[kind].get(-1 if kind == "head" else layer, []):
                if n == node:
                    return (a, b)
            return ()
        return rng

    def parts(self, kind, layer):
        return self.tables[kind][-1 if kind == "head" else layer]

    def shares_of(self, node):
        """[(kind, layer, a, b)] of one node, in a fixed order."""
        return [(kind, layer, a, b) for kind in KINDS for layer, parts in sorted(self.tables[kind].items())
                for n, a, b in parts if n == node]

    def trips(self) -> int:
        """Round trips per token: one per split module (all workers at once)."""
        if len(self.nodes) < 2:
            return 0
        return sum(1 for kind in KINDS for parts in self.tables[kind].values() if any(n > 0 for n, _, _ in parts))

    def wire(self, cfg, wire="f32") -> dict:
        """Bytes per decoded token the root sends and receives, all workers together."""
        d, per = cfg.d_model, WIRE_BYTES[wire]
        sent = received = 0.0
        for kind in KINDS:
            for parts in self.tables[kind].values():
                workers = [(a, b) for n, a, b in parts if n > 0]
                extra = cfg.n_expert_used * 8 if kind == "moe" else 8 if kind == "attn" else 0
                sent += len(workers) * (d * per + FRAME + extra)
                for a, b in workers:       # partial sums come back in double on the exact wire
                    received += FRAME + (min(b - a, HEAD_TOP) * 8 if kind == "head" else d * (8 if wire == "f32" else per))
        return {"sent": sent, "received": received}

    def describe(self, cfg, wire="f32") -> list:
        """Lines for `glmcpu plan`: shares, the first layers' ranges, trips and bytes per token."""
        lines = [f"{len(self.nodes)} nodes: " + ", ".join(f"{n} {s:.0%}" for n, s in zip(self.nodes, self.shares))]
        for l in range(min(cfg.n_layer, 3)):
            bits = []
            for kind, what in (("attn", "q heads"), ("ffn", "FFN units"), ("moe", "experts")):
                if l in self.tables[kind]:
                    bits.append(f"{what} " + ", ".join(f"{self.nodes[n]} [{a}, {b})" for n, a, b in self.tables[kind][l]))
            lines.append(f"layer {l}: " + "; ".join(bits))
        if cfg.n_layer > 3:
            lines.append(f"... {cfg.n_layer - 3} more layers split the same way")
        lines.append("output head: vocabulary rows " + ", ".join(
            f"{self.nodes[n]} [{a}, {b})" for n, a, b in self.tables["head"][-1]))
        w = self.wire(cfg, wire)
        lines.append(f"per token: {self.trips()} round trips (all workers at once), {w['sent'] / 1024:.1f} KiB "
                     f"sent, {w['received'] / 1024:.1f} KiB received by the root ({wire} hidden vectors)")
        return lines


def chunk_edges(n: int, unit: int = 1) -> list:
    """Column edges [0, ..., n] of the chunks of a matrix whose outputs nodes add up (attention
    output, FFN down): every process sums such a matrix chunk by chunk in double (kernels:
    gemm_chunked), and nodes split it only at chunk edges, so partial sums add up to one process's
    sum. About 12 chunks of whole quantisation blocks (K-quant super-blocks where the width is made
    of them, else 32-blocks) and whole `unit`s (an attention head's columns), as even as those
    allow, so 2, 3, 4 or 6 nodes share it evenly (GLM-4-9B's 13,696 FFN units are 428 blocks: two
    nodes get 214 each, not 216 and 212); a width under 2048 in chunks of one block."""
    block = 256 if n % 256 == 0 else 32
    if n < 2048:
        return list(range(0, n, block)) + [n]
    g = int(np.lcm(block, unit))
    m = n // g                                          # whole groups; a rest joins the last chunk
    k = max(1, min(12, m))
    return sorted({(2 * i * m + k) // (2 * k) * g for i in range(k)} | {n})


def local_edges(edges, a: int, b: int) -> list:
    """The chunk edges of columns a..b of a matrix, counted from a (a node's slice of it)."""
    return [0] + [e - a for e in edges if a < e < b] + [b - a]


def split(points, total: int, shares) -> list:
    """[a, b) ranges of `total` proportional to shares, cut at the allowed points nearest to the
    proportional ones (0 and total are always allowed; range(0, total, unit): whole units, the
    last range taking a partial one), covering it exactly."""
    pts = np.union1d(np.asarray(points, np.int64), [0, total])
    ideal = np.cumsum([0.0] + list(shares)) / sum(shares) * total
    cuts = []
    for x in ideal:
        i = int(np.clip(np.searchsorted(pts, x), 1, len(pts) - 1))       # pts[i - 1] <= x <= pts[i]
        lo, hi = x - pts[i - 1], pts[i] - x
        cuts.append(int(pts[i - 1] if lo < hi or lo == hi and (i - 1) % 2 == 0 else pts[i]))   # ties: even point, as np.round
    cuts[0], cuts[-1] = 0, total
    cuts = list(np.maximum.accumulate(cuts))
    return [(int(cuts[i]), int(cuts[i + 1])) for i in range(len(shares))]


def row_halves(n: int) -> list:
    """Two output-row ranges of a partial sum of n values, cut at a multiple of 32 (a repacked
    matrix's 8-row group, a Q8_0 wire's block): a mesh node sends the first while it computes the
    second."""
    h = n // 2 // 32 * 32
    return [(0, h), (h, n)] if 0 < h < n else [(0, n)]


def make_plan(cfg, nodes, shares=None) -> Plan:
    shares = list(shares or [1.0] * len(nodes))
    if len(shares) != len(nodes) or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"{len(shares)} shares for {len(nodes)} nodes; give one non-negative share per node")
    plan = Plan(list(nodes), [s / sum(shares) for s in shares])

    def ranges(points, total):
        return [(i, a, b) for i, (a, b) in enumerate(split(points, total, shares)) if b > a]

    G = cfg.n_head // cfg.n_head_kv
    hd = cfg.head_dim
    cuts = [e // hd for e in chunk_edges(cfg.n_head * hd, hd)]     # Wo column slices: whole chunks
    if len(nodes) <= cfg.n_head_kv:
        cuts = [h for h in cuts if h % G == 0]          # whole KV groups: no K/V computed twice
    heads = ranges(cuts, cfg.n_head)
    ffn = ranges(chunk_edges(cfg.n_ff), cfg.n_ff) if cfg.n_ff else []
    n_dense = cfg.n_dense_lead if cfg.n_expert else cfg.n_layer
    for l in range(cfg.n_layer):
        plan.tables["attn"][l] = heads
        if l < n_dense:
            plan.tables["ffn"][l] = ffn
        else:
            plan.tables["moe"][l] = ranges(range(cfg.n_expert), cfg.n_expert)
    plan.tables["head"][-1] = ranges(range(0, cfg.n_vocab, 8), cfg.n_vocab)   # whole 8-row groups (repacked)
    return plan


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


def module_bytes(f, cfg, n_layer=None) -> dict:
    """Bytes of weights one decoded token reads, per split module and for the root's own part:
    {"attn": per layer, "ffn": per dense layer, "moe": per MoE layer (the experts a token uses),
    "head": the output matrix, "root": norms, routers, shared experts}. n_layer beyond the file's
    (a file cut short by tools/make_model.py) repeats its last layer of each kind."""
    def size(name):
        return f.tensors[name].n_bytes if f.has(name) else 0
    out = {"attn": {}, "ffn": {}, "moe": {}, "head": size("output.weight") or size("token_embd.weight"), "root": 0}
    for l in range(cfg.n_layer):
        p = f"blk.{l}."
        out["attn"][l] = sum(size(p + n + ".weight") for n in ("attn_qkv", "attn_q", "attn_k", "attn_v", "attn_output"))
        if cfg.n_expert and l >= cfg.n_dense_lead:
            per_expert = sum(size(p + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down")) / cfg.n_expert
            out["moe"][l] = per_expert * cfg.n_expert_used
            out["root"] += sum(size(p + f"ffn_{n}_shexp.weight") for n in ("gate", "up", "down"))
            out["root"] += size(p + "ffn_gate_inp.weight")
        else:
            out["ffn"][l] = sum(size(p + f"ffn_{n}.weight") for n in ("gate", "up", "down"))
    per_layer_root = out["root"] / max(1, len(out["moe"]))
    for l in range(cfg.n_layer, n_layer or cfg.n_layer):
        for kind in ("attn", "moe" if out["moe"] else "ffn"):
            out[kind][l] = out[kind][l - 1]
        out["root"] += per_layer_root if out["moe"] else 0
    return out


def token_bytes(sizes) -> float:
    """Bytes of weights one decoded token reads in all (module_bytes' figures summed)."""
    return sum(sum(sizes[k].values()) for k in LAYER_KINDS) + sizes["head"] + sizes["root"]


# software per sync, ms: the star's request/reply ~0.3 (tools/bench_sync.py); the mesh's exchange
# takes 0.03-0.07 idle on loopback, but its nodes move in lockstep: traced on both nodes' clocks
# (GLM-4-9B, two busy pinned nodes in namespaces, 1 Gbit/s tbf, 2026-12-07) each of the 80 syncs
# a token cost 0.42 ms of waiting, 0.13 of it the last half of the 32 KB part on the wire and
# ~0.3 the exchange's software, the nodes reaching the sync 0.05-0.2 ms apart, and stalls
SYNC_MS = {"star": 0.3, "mesh": 0.3}


def expected_max_experts(parts, n_expert, k, speeds, draws=4000) -> float:
    """E[max over nodes of (the chosen experts it holds) / its speed] for k of n_expert experts
    chosen uniformly: one token's MoE layer waits for the node that drew the most (a fixed seed:
    the same figure every time)."""
    rng = np.random.default_rng(0)
    owner = np.zeros(n_expert, int)
    for node, a, b in parts:
        owner[a:b] = node
    picks = np.argsort(rng.random((draws, n_expert)), axis=1)[:, :k]
    counts = np.stack([(owner[picks] == node).sum(1) for node, _, _ in parts], 1)
    return float((counts / np.array([speeds[node] for node, _, _ in parts])).max(1).mean())


def predict(plan: Plan, cfg, sizes: dict, node_gbs, link_mbit=None, latency_ms=0.0, wire="f32",
            topology="star", sync_ms=None) -> dict:
    """Decode tok/s this plan should give, sync by sync. Each node reads its share of each split
    module's weights at its speed (GB/s of weights, as a one-core decode of the whole file shows
    when all the nodes' cores run at once); a MoE layer waits for the node that drew the most of
    the token's experts. topology "star" (today's links): the root sends the input to every worker
    through its one port, computes its own part meanwhile, and each worker's partial comes back
    through that port; "mesh": every node holds the input already and sends its partial to every
    other node at once (full-duplex ports). Each sync also costs `sync_ms` of software (SYNC_MS);
    the root alone reads the norms, routers and shared experts."""
    n = len(plan.nodes)
    speeds = np.asarray(node_gbs, float) * 1e9                       # bytes per second
    sync = SYNC_MS[topology] if sync_ms is None else sync_ms
    lat = latency_ms / 1e3
    rate = link_mbit * 1e6 / 8 if link_mbit else np.inf             # bytes per second of a port
    per = WIRE_BYTES[wire]
    read = np.zeros(n)
    seconds = sizes["root"] / speeds[0]
    net = 0.0
    modules = [(k, l, parts) for k in LAYER_KINDS for l, parts in plan.tables[k].items()]
    modules.append(("head", -1, plan.tables["head"][-1]))
    busiest = {}                                  # MoE layers split alike wait alike: drawn once
    for kind, l, parts in modules:
        whole = {"attn": cfg.n_head, "ffn": cfg.n_ff, "moe": cfg.n_expert, "head": cfg.n_vocab}[kind]
        total = sizes["head"] if kind == "head" else sizes[kind][l]
        c = np.zeros(n)
        for node, a, b in parts:
            c[node] = total * (b - a) / whole / speeds[node]
            read[node] += total * (b - a) / whole
        if kind == "moe" and len(parts) > 1:
            key = tuple(parts)
            if key not in busiest:
                busiest[key] = expected_max_experts(parts, cfg.n_expert, cfg.n_expert_used, speeds)
            c_max = busiest[key] * total / cfg.n_expert_used
        else:
            c_max = c.max()
        workers = [(node, a, b) for node, a, b in parts if node > 0]
        if not workers:                                              # the root's alone
            seconds += c[0]
            continue
        reply = [min(b - a, HEAD_TOP) * 8 if kind == "head" else cfg.d_model * (8 if wire == "f32" else per)
                 for _, a, b in workers]
        if topology == "star":
            x = cfg.d_model * per + FRAME
            # the last input leaves the root's port after all of them, the replies share it coming back
            done = max(2 * lat + (i + 1) * x / rate + c[node] + reply[i] / rate for i, (node, _, _) in enumerate(workers))
            done = max(done, 2 * lat + x / rate + min(c[node] for node, _, _ in workers) + sum(reply) / rate)
            t = max(c_max if kind == "moe" else c[0], done)
        else:
            out = max(reply) * (n - 1) if kind != "head" else sum(reply)     # each port sends to all others
            t = c_max + lat + out / rate
        seconds += t + sync / 1e3
        net += t - c_max + sync / 1e3
    return {"tok_s": 1.0 / seconds, "compute_ms": (seconds - net) * 1e3, "network_ms": net * 1e3,
            "read_gb": [float(r / 1e9) for r in read]}
