#!/usr/bin/env python3
"""One layer's decode attention (one token against a cache of DEPTH positions), alone: its time,
its float rate, and that rate as a share of the machine's multiply-add peak.

    python tools/bench_attention.py --depth 4096,16384 --peak 230     # GFLOP/s of all threads
    GLMCPU_KERNELS=avx2 python tools/bench_attention.py --shape glm4 --kv-type q8_0

--shape air: GLM-4.5-Air's 96 query heads on 8 KV heads (groups of 12); glm4: GLM-4-9B's 32 on 2
(groups of 16); head_dim 128. The work is 2 x Hq x DEPTH x 128 multiply-adds (Q.K and P.V); --peak
is the all-core FMA peak in GFLOP/s (tools/fma_peak.c, one copy per core at once, summed).
Medians of --runs calls; the cache is random (the work does not depend on its values)."""
import argparse
import statistics
import time

import numpy as np

SHAPES = {"air": (8, 12), "glm4": (2, 16)}      # KV heads, query heads per KV head


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", default="4096,16384")
    ap.add_argument("--shape", choices=SHAPES, default="air")
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--layers", type=int, default=9, help="layers a token passes (the ms per token column)")
    ap.add_argument("--peak", type=float, default=None, help="all-core FMA peak, GFLOP/s")
    args = ap.parse_args()

    from glmcpu import ops
    hkv, g = SHAPES[args.shape]
    D = 128
    rng = np.random.default_rng(0)
    print(f"kernels {ops.VARIANT}, {args.threads} threads, {args.shape} ({hkv * g} query heads on {hkv} KV heads), "
          f"{args.kv_type} cache")
    for depth in (int(x) for x in args.depth.split(",")):
        kc = ops.kv_encode(rng.standard_normal((hkv, depth + 1, D), np.float32), args.kv_type)
        vc = ops.kv_encode(rng.standard_normal((hkv, depth + 1, D), np.float32), args.kv_type)
        q = rng.standard_normal((1, hkv * g, D)).astype(np.float32)
        out = np.empty_like(q)
        ops.K.attention(q, kc, vc, depth, 0.088, out, args.threads)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            ops.K.attention(q, kc, vc, depth, 0.088, out, args.threads)
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        gflops = 2 * 2 * hkv * g * (depth + 1) * D / s / 1e9
        share = f", {gflops / args.peak:.0%} of the peak" if args.peak else ""
        print(f"depth {depth:6d}: {1e3 * s:7.2f} ms a layer ({args.layers} layers: {args.layers * 1e3 * s:6.1f} ms "
              f"a token), {gflops:6.1f} GFLOP/s{share}")


if __name__ == "__main__":
    main()
