#!/usr/bin/env python3
"""Read bandwidth of this machine, STREAM-style: T threads each read their slice of a buffer much
larger than the caches (SIMD loads XORed together, glmcpu's stream_read kernel); the median of
several passes, in GB/s (1e9 bytes/s).

    python tools/membw.py --threads 2 --gib 2

Decode speed is bounded by this number divided by the bytes of weights read per token
(tools/bench.py prints both engines as a fraction of it)."""
import argparse
import statistics
import time

import numpy as np


def read_bandwidth(threads=2, gib=2.0, passes=5) -> float:
    from glmcpu import ops
    buf = np.ones(int(gib * 2**30), np.uint8)               # touched once: pages are real
    ops.K.stream_read(buf, threads)
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        ops.K.stream_read(buf, threads)
        rates.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--passes", type=int, default=7)
    a = p.parse_args()
    print(f"read bandwidth, {a.threads} threads: {read_bandwidth(a.threads, a.gib, a.passes):.1f} GB/s")


if __name__ == "__main__":
    main()
