#!/usr/bin/env python3
"""Decode speed of a root + one worker against one process, on this machine, same file.

    python tools/bench_cluster.py glm4-9b-40l-q4_0.gguf --runs 5 --tokens 24
    python tools/bench_cluster.py glm4-9b-2l-q4_0.gguf --link-mbit 200   # worker behind a tbf link

One process runs with --single-threads (2), the root and the worker with one thread each, so
both sides use the same cores and the same memory bus (on one machine parity is the ceiling).
Runs alternate; medians are reported, with the bytes and round trips per token of each wire
codec. With --link-mbit the worker runs in a network namespace behind a veth pair whose both
ends are rate-limited with tc's tbf (root needed), and the measured speed is set beside what
`glmcpu plan` predicts from the one-process speeds and the link."""
import argparse
import os
import platform
import statistics
import subprocess
import sys

import numpy as np

NS = "glmcpu-bench"
ADDR_ROOT, ADDR_WORKER = "10.231.7.1", "10.231.7.2"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def netns_up(mbit, latency_ms=0.0):
    netns_down()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", "glmr0", "type", "veth", "peer", "name", "glmw0")
    sh("ip", "link", "set", "glmw0", "netns", NS)
    sh("ip", "addr", "add", f"{ADDR_ROOT}/24", "dev", "glmr0")
    sh("ip", "link", "set", "glmr0", "up")
    sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{ADDR_WORKER}/24", "dev", "glmw0")
    sh("ip", "netns", "exec", NS, "ip", "link", "set", "glmw0", "up")
    sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
    for pre, dev in (((), "glmr0"), (("ip", "netns", "exec", NS), "glmw0")):
        sh(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", "32kb",
           "latency", "400ms")


def netns_down():
    sh("ip", "link", "del", "glmr0", check=False)
    sh("ip", "netns", "del", NS, check=False)


def start_worker(path, netns=False):
    bind = f"tcp://{ADDR_WORKER}:5599" if netns else "tcp://127.0.0.1:*"
    pre = ["ip", "netns", "exec", NS] if netns else []
    if os.environ.get("WORKER_CPUS"):
        pre += ["taskset", "-c", os.environ["WORKER_CPUS"]]
    p = subprocess.Popen(pre + [sys.executable, "-m", "glmcpu", "worker", "--bind", bind, "--model", path,
                                "-t", "1", "--insecure"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("glmcpu worker on"):
        raise SystemExit("the worker did not start")
    return p, line.split()[3]


def decode_rate(m, n, prompt):
    m.reset()
    list(m.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))
    s = m.last_stats
    return s["gen_tokens"] / s["gen_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--single-threads", type=int, default=2)
    ap.add_argument("--wires", default="f32,f16,q8_0")
    ap.add_argument("--link-mbit", type=float, default=None)
    ap.add_argument("--shares", default=None, help="root,worker (default: even)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import glmcpu
    from glmcpu import ops
    from glmcpu.plan import make_plan, module_bytes, predict

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} CPUs, kernels {ops.VARIANT}; {os.path.basename(args.model)}")
    if args.link_mbit:
        try:
            netns_up(args.link_mbit)
        except (subprocess.CalledProcessError, OSError) as e:
            netns_down()
            print(f"netns: cannot make a rate-limited network namespace here ({e})", file=sys.stderr)
            sys.exit(3)
    worker, ep = start_worker(args.model, netns=bool(args.link_mbit))
    try:
        prompt = list(range(1000, 1008))
        single = glmcpu.load(args.model, threads=args.single_threads)
        shares = [float(x) for x in args.shares.split(",")] if args.shares else None
        root = glmcpu.load(args.model, threads=1, workers=[ep], insecure=True, timeout=30, shares=shares)
        c = root.cluster
        wires = args.wires.split(",")
        rates = {"single": [], **{w: [] for w in wires}}
        figures = {}
        decode_rate(single, 4, prompt)
        decode_rate(root, 4, prompt)
        def counters():
            return np.array([sum(x.sent for x in c.clients), sum(x.received for x in c.clients),
                             c.stats["round_trips"], c.stats["net_seconds"]], float)

        for r in range(args.runs):
            rates["single"].append(decode_rate(single, args.tokens, prompt))
            for w in wires:
                c.wire = w
                t0 = counters()
                decode_rate(root, 1, prompt)                 # the prompt alone
                t1 = counters()
                rates[w].append(decode_rate(root, args.tokens, prompt))
                t2 = counters()
                figures[w] = ((t2 - t1) - (t1 - t0)) / (args.tokens - 1)    # per decoded token
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"one process, {args.single_threads} threads: {med['single']:.2f} tok/s "
              f"(runs {', '.join(f'{x:.2f}' for x in rates['single'])})")
        for w in wires:
            sent, recv, trips, net = figures[w]
            print(f"root 1 thread + worker 1 thread, wire {w}: {med[w]:.2f} tok/s = {med[w] / med['single']:.2f}x "
                  f"(runs {', '.join(f'{x:.2f}' for x in rates[w])}); per token {sent / 1024:.1f} KiB sent, "
                  f"{recv / 1024:.1f} KiB received, {trips:.0f} round trips, {1e3 * net:.1f} ms waiting")
        result = {"single": med["single"], "cluster": {w: med[w] for w in wires},
                  "per_token": {w: dict(zip(("sent", "received", "round_trips", "net_seconds"), map(float, figures[w])))
                                for w in wires}, "predicted": {}}
        if args.link_mbit:
            cfg = root.cfg
            sizes = module_bytes(root.file, cfg)
            per_token = sum(sum(sizes[k].values()) for k in ("attn", "ffn", "moe")) + sizes["head"] + sizes["root"]
            one_gbs = per_token * decode_rate(glmcpu.load(args.model, threads=1), args.tokens, prompt) / 1e9
            plan = make_plan(cfg, ["root", ep], [1, 1])
            for w in wires:
                p = predict(plan, cfg, sizes, [one_gbs, one_gbs], args.link_mbit, 0.05, w)
                result["predicted"][w] = p["tok_s"]
                print(f"over {args.link_mbit:g} Mbit/s, wire {w}: measured {med[w]:.2f} tok/s, `glmcpu plan` "
                      f"predicts {p['tok_s']:.2f} ({one_gbs:.1f} GB/s per node from a 1-thread run)")
        c.close()
        if args.json:
            import json
            with open(args.json, "w") as fh:
                json.dump(result, fh)
    finally:
        worker.kill()
        worker.wait()
        if args.link_mbit:
            netns_down()


if __name__ == "__main__":
    main()
