#!/usr/bin/env python3
"""Time one weight matrix per type through glmcpu's kernels: 4096 x 13824 (GLM-4-9B's FFN shape),
1 thread, 1, 4 and 64 tokens, in the layout a load gives it (8-row groups where the type has one,
else the file's rows; --rows keeps the rows). Six copies are cycled so that single tokens read
from DRAM, not from cache; the figure is the fastest of several passes.

    python tools/bench_kernels.py --kernels avx512vnni --types Q4_K,IQ4_XS,Q2_K
    python tools/bench_kernels.py --kernels avx2 --types Q2_K,Q3_K,Q4_K,Q5_K,Q6_K --rows

Compare builds side by side on one machine, idle: a number from a busy machine means nothing.
"""
import argparse
import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from glmcpu import ops  # noqa: E402
from glmcpu import quants as our_quants  # noqa: E402

ROWS, COLS = 4096, 13824


def matrix(rng, qtype):
    """[ROWS, row bytes] of qtype: quantised normal weights (random bytes for the types glmcpu
    cannot write, whose decode cost does not depend on the values)."""
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    try:
        return our_quants.quantize(x, qtype)
    except (NotImplementedError, ValueError):
        bs, bb = quants.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (ROWS, COLS // bs * bb), dtype=np.uint8)
        return raw


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=ops.VARIANT, help="a build: generic, avx2, avx512, avx512vnni")
    p.add_argument("--types", default="Q4_0,Q5_0,Q8_0,Q4_K,IQ4_NL,IQ4_XS,Q2_K")
    p.add_argument("--rows", action="store_true", help="keep the file's rows (no 8-row groups)")
    a = p.parse_args()
    K = ops.load_variant(a.kernels)
    rng = np.random.default_rng(0)
    for name in a.types.split(","):
        qtype = GT[name]
        raw = matrix(rng, qtype)
        w, wtype = raw, int(qtype)
        if not a.rows:
            try:
                w, wtype = K.repack_x8(raw, int(qtype))
            except ValueError:                    # no 8-row layout for this type
                pass
        mats = [w.copy() for _ in range(6)]
        line = []
        for T in (1, 4, 64):
            x = rng.standard_normal((T, COLS)).astype(np.float32)
            out = np.empty((T, ROWS), np.float32)
            K.gemm(mats[0], wtype, COLS, x, out, 1)
            best = float("inf")
            for r in range(12 if T == 1 else 5):
                t0 = time.perf_counter()
                K.gemm(mats[r % 6], wtype, COLS, x, out, 1)
                best = min(best, time.perf_counter() - t0)
            line.append(f"{T:2d} tokens {best * 1e3:7.2f} ms")
        print(f"{name:7s} {K.ISA:11s} {'rows' if wtype == int(qtype) else 'groups':6s}  " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
