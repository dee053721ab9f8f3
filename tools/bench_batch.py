#!/usr/bin/env python3
"""One decode step of B sequences in one forward pass (glm4.Batch), B = 1, 2, 4, 8: the engine's
side of `serve --parallel`, without HTTP. Says why batching pays less on a MoE file: each
sequence routes to its own experts, so a step reads the weights every token reads once, plus
every expert any of its tokens chose.

    python tools/bench_batch.py model.gguf --threads 2 [--batches 1,2,4,8] [--runs 2]

Each of B caches first holds a 32-token prompt of random ids; then, per run and batch size (in
alternating order), 6 steps of one random token per sequence are timed (median). For MoE files
it counts the distinct routed experts per MoE layer in those steps and the bytes a step reads:
the non-expert weights (the embedding excepted) plus that many experts per layer. "predicted x"
is B tokens over those bytes, against one token's: what a step bound by memory reads, and what
the step times give ("measured x"). --beside: a step of 4 sequences' tokens with a prompt chunk
of that many tokens beside them (a new request's, as `serve` reads it)."""
import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import glmcpu                                   # noqa: E402
from glmcpu import ops                          # noqa: E402
from glmcpu.models import glm4_moe             # noqa: E402
from glmcpu.models.glm4 import Batch           # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--beside", default="16,64",
                    help="also time a step of 4 sequences' tokens plus a prompt chunk of these sizes (new cache)")
    a = ap.parse_args()
    sizes = [int(b) for b in a.batches.split(",")]
    chunks = [int(n) for n in a.beside.split(",") if n] if max(sizes) >= 4 else []
    m = glmcpu.load(a.model, ctx=1024, draft="none", threads=a.threads)
    net, cfg, f = m.net, m.cfg, m.file
    distinct = []
    route = glm4_moe.Router.__call__

    def counted(self, x, th):                   # each MoE layer's choice, as it is made
        idx, w = route(self, x, th)
        distinct.append(len(np.unique(idx)))
        return idx, w
    glm4_moe.Router.__call__ = counted
    rng = np.random.default_rng(0)
    vocab = min(cfg.n_vocab, 100000)
    caches = [net.new_cache(1024) for _ in range(max(sizes))]
    for c in caches:
        net.forward([int(t) for t in rng.integers(0, vocab, 32)], c)
    times, experts = {}, {}
    for _ in range(a.runs):
        for B in sizes:
            distinct.clear()
            ts = []
            for _ in range(6):
                ids = [int(t) for t in rng.integers(0, vocab, B)]
                t = time.perf_counter()
                net.forward(ids, Batch([(c, 1) for c in caches[:B]]))
                ts.append(time.perf_counter() - t)
            times.setdefault(B, []).append(statistics.median(ts))
            if distinct:
                experts.setdefault(B, []).append(float(np.mean(distinct)))
        for n in chunks:
            ids = [int(t) for t in rng.integers(0, vocab, 4 + n)]
            t = time.perf_counter()
            net.forward(ids, Batch([(c, 1) for c in caches[:4]] + [(net.new_cache(1024), n)]))
            times.setdefault(f"4 + {n}", []).append(time.perf_counter() - t)
    n_moe = cfg.n_layer - getattr(cfg, "n_dense_lead", cfg.n_layer)
    own = [n for n in f.tensors if not n.startswith(f"blk.{cfg.n_layer}.") and "nextn" not in n]   # no MTP block
    per_expert = sum(f.tensors[n].n_bytes for n in own if ops.is_expert(n)) / max(1, n_moe * cfg.n_expert)
    fixed = sum(f.tensors[n].n_bytes for n in own if not ops.is_expert(n) and not n.startswith("token_embd"))
    print(f"{a.model}: {a.threads} threads, kernels {ops.VARIANT}, {a.runs} runs; non-expert weights "
          f"{fixed / 2**30:.2f} GiB" + (f", {n_moe} MoE layers, {per_expert / 2**20:.2f} MiB per expert" if n_moe else ""))
    print("\n| B | step ms | tok/s | measured x | experts / MoE layer | GiB read / step | predicted x |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    t1 = b1 = None
    for B in sizes:
        t = statistics.median(times[B])
        e = statistics.mean(experts[B]) if B in experts else 0.0
        read = fixed + n_moe * e * per_expert
        t1, b1 = t1 or t / B, b1 or read / B
        print(f"| {B} | {t * 1e3:.0f} | {B / t:.1f} | {B * t1 / t:.2f}x | {e:.1f} | {read / 2**30:.2f} | "
              f"{B * b1 / read:.2f}x |")
    for n in chunks:
        print(f"\nA step of 4 sequences' tokens with a {n}-token prompt chunk beside them: "
              f"{statistics.median(times[f'4 + {n}']) * 1e3:.0f} ms (one prompt token: "
              f"{(statistics.median(times[f'4 + {n}']) - statistics.median(times[4])) / n * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
