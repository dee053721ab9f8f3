#!/usr/bin/env python3
"""Decode speed of a cluster against one machine's, on this machine, same file.

    python tools/bench_cluster.py glm4-9b-40l-q4_0.gguf --runs 5 --tokens 24
    sudo python tools/bench_cluster.py glm4-9b-40l-q4_0.gguf --netns --link-mbit 1000,100 --runs 3

Loopback (the default): one process with --single-threads (2) against a root and a worker with
one thread each over 127.0.0.1, each pinned to a core of its own (the root to the first, the
worker to the last), so both sides use the same cores and the same memory bus (on one machine
parity is the ceiling). --topologies measures the star (each of --wires) and the mesh in turn on
the same workers. Runs alternate; medians are reported, with the bytes and round
trips per token of each wire codec. --link-mbit alone puts the worker in a network namespace
behind a tbf-limited veth pair, the root outside it.

--netns (root needed) measures a cluster as separate machines would see it. Every node gets a
network namespace of its own and one core of its own (`taskset`): the root on core 0, worker i on
core i. Two nodes are joined by one veth pair whose both ends are limited by `tc ... tbf` to each
--link-mbit in turn (a cable); more (or --switch) meet at a bridge in a namespace of its own
through such pairs (a switch with ports of that speed). The
links are authenticated and encrypted (CurveZMQ keys made for the run) unless --insecure. The
yardstick is the machine's own ceiling, not N x one core: the memory bus is shared, so N
independent one-core processes decoding at the same time (each pinned to its core) are what N
nodes of this machine can do at best. Each run measures one such process alone, then N of them at
once, then the cluster at each link speed; medians over --runs. The figures: the cluster's speed
as a multiple of one core, and as a share of the ceiling (its speed over the N processes' summed
speed), with `glmcpu plan`'s prediction for the link."""
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
        sh(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst",
           str(tbf_burst(mbit)), "latency", "400ms")


def netns_down():
    sh("ip", "link", "del", "glmr0", check=False)
    sh("ip", "netns", "del", NS, check=False)


def start_worker(path, netns=False):
    bind = f"tcp://{ADDR_WORKER}:5599" if netns else "tcp://127.0.0.1:*"
    pre = ["ip", "netns", "exec", NS] if netns else []
    cpus = os.environ.get("WORKER_CPUS") or (str(sorted(os.sched_getaffinity(0))[-1])
                                             if len(os.sched_getaffinity(0)) > 1 else None)
    if cpus:                                   # the worker on a core of its own (the last), the root on another
        pre += ["taskset", "-c", cpus]
    p = subprocess.Popen(pre + [sys.executable, "-m", "glmcpu", "worker", "--bind", bind, "--model", path,
                                "-t", "1", "--insecure"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("glmcpu worker on"):
        raise SystemExit("the worker did not start")
    return p, line.split()[3]


SW = "glmb-sw"                      # --netns: the bridge's namespace; node i is glmb-<i>


def node_ns(i):
    return f"glmb-{i}"


def node_addr(i):
    return f"10.231.8.{i + 1}"


def mesh_down(n=16):
    for i in range(n):
        sh("ip", "netns", "del", node_ns(i), check=False)
    sh("ip", "netns", "del", SW, check=False)


def mesh_up(nodes, mbit, switch=False):
    """nodes namespaces joined by a bridge in SW through veth pairs, both ends limited by tbf (a
    switch with ports of that speed); two nodes by one veth pair, each end limited (a cable),
    unless switch. The emulated network's work runs on the sending node's core (a real NIC and
    switch do it in hardware): a bridge and a second pair of queues cost each 16 KB part ~0.1 ms
    of that core's time here."""
    mesh_down()
    for i in range(nodes):
        sh("ip", "netns", "add", node_ns(i))
    if nodes == 2 and not switch:
        sh("ip", "netns", "exec", node_ns(0), "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", node_ns(1))
    else:
        sh("ip", "netns", "add", SW)
        sw = ("ip", "netns", "exec", SW)
        sh(*sw, "ip", "link", "add", "br0", "type", "bridge")
        # a switch runs no firewall: frames through the bridge skip iptables (br_netfilter would run
        # every frame through it, on the sending node's core)
        for proto in ("iptables", "ip6tables", "arptables"):
            sh(*sw, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{proto}=0", check=False)
        sh(*sw, "ip", "link", "set", "br0", "up")
        for i in range(nodes):
            sh("ip", "netns", "exec", node_ns(i), "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
               "netns", SW)
            sh(*sw, "ip", "link", "set", f"p{i}", "master", "br0")
            sh(*sw, "ip", "link", "set", f"p{i}", "up")
    for i in range(nodes):
        at = ("ip", "netns", "exec", node_ns(i))
        sh(*at, "ip", "addr", "add", f"{node_addr(i)}/24", "dev", "eth0")
        sh(*at, "ip", "link", "set", "eth0", "up")
        sh(*at, "ip", "link", "set", "lo", "up")
    set_rate(nodes, mbit, "add")


def tbf_burst(mbit):
    """Bytes tbf may pass at once: 125 us of the rate, at least 4 KB. A real port sends each
    message at its line rate; with a burst of 64 KB a 32 KB message crossed a "100 Mbit/s" link in
    0.03 ms instead of 2.6 (measured here: a 32 KB round trip took 4.9 ms at 100 Mbit/s with a
    4 KB burst, 0.55 ms at 1 Gbit/s with 16 KB, the line rates' 5.2 and 0.52; 4 KB at 1 Gbit/s
    gave 1.16, the kernel's timer)."""
    return max(4096, int(mbit * 1e6 / 8 * 125e-6))


def set_rate(nodes, mbit, how="change"):
    burst = tbf_burst(mbit)
    switch = sh("ip", "netns", "pids", SW, check=False).returncode == 0
    for i in range(nodes):
        ports = [(("ip", "netns", "exec", node_ns(i)), "eth0")] + ([(("ip", "netns", "exec", SW), f"p{i}")] if switch else [])
        for pre, dev in ports:
            sh(*pre, "tc", "qdisc", how, "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
               "latency", "50ms")


class Child:
    """A decoding process (tools/bench_cluster.py --child): loads, warms up, says "ready", then
    decodes N tokens for each line "N" it reads and answers with a JSON line."""

    def __init__(self, pre, argv):
        self.p = subprocess.Popen(pre + [sys.executable, os.path.abspath(__file__)] + argv, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def wait_ready(self):
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"a benchmark process did not start ({line.strip() or 'no output'})")

    def ask(self, n, topology=None):
        self.p.stdin.write(f"{n} {topology}\n" if topology else f"{n}\n")
        self.p.stdin.flush()

    def answer(self):
        import json
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit("a benchmark process ended early")
        return json.loads(line)

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


def together(children, n, topology=None):
    """All of them decode n tokens at the same time: their rates."""
    for c in children:
        c.ask(n, topology)
    return [c.answer() for c in children]


def child_main(args):
    """One decoding process, pinned and placed by its parent."""
    import json
    import glmcpu
    kw = {}
    if args.child == "root":
        kw = dict(workers=args.endpoints.split(","), timeout=60, wire=args.wires.split(",")[0],
                  topology="mesh" if "mesh" in args.topologies.split(",") else "star")
        kw.update(insecure=True) if args.insecure else kw.update(key=args.key, worker_key=args.worker_key)
    if args.child == "root" and args.batch > 1:
        kw["slots"] = args.batch
    m = glmcpu.load(args.model, threads=args.threads, **kw)
    prompt = list(range(1000, 1008))
    decode_rate(m, 4, prompt, batch=args.batch)
    print("ready", flush=True)
    c = getattr(m, "cluster", None)
    for line in sys.stdin:
        n, *topology = line.split()
        n = int(n)
        if c and topology and c.topology == "mesh":
            if c.use_mesh(topology[0] == "mesh") != (topology[0] == "mesh"):
                raise SystemExit("the mesh could not be set up")
        first = []
        rate = decode_rate(m, n, prompt, (lambda: first.append(counters(c))) if c else None, args.batch)
        out = {"rate": rate}
        if c:
            d = counters(c) - first[0]              # the decode steps alone, not the prompt's
            tok = max(1, d[4])
            out.update(sent_kib=d[0] / 1024 / tok, received_kib=d[1] / 1024 / tok, round_trips=d[2] / tok,
                       net_ms=1e3 * d[3] / tok, syncs=d[5] / tok, alive=int(sum(c.alive)))
        print(json.dumps(out), flush=True)


def netns_main(args):
    """Each node in its namespace on its core, over tbf links; the ceiling from N pinned processes."""
    import tempfile
    from glmcpu.net.link import keygen
    from glmcpu.plan import make_plan, module_bytes, predict, token_bytes
    n = args.nodes
    if n > (os.cpu_count() or 1):
        raise SystemExit(f"--nodes {n}: this machine has {os.cpu_count()} cores (one per node)")
    mbits = [float(x) for x in args.link_mbit.split(",")]
    tmp = tempfile.mkdtemp(prefix="glmb-")
    keys = []
    if not args.insecure:
        keygen(os.path.join(tmp, "root"))
        keygen(os.path.join(tmp, "worker"))
        keys = ["--key", os.path.join(tmp, "root"), "--worker-key", os.path.join(tmp, "worker.pub")]
    try:
        mesh_up(n, mbits[0], args.switch)
    except (subprocess.CalledProcessError, OSError) as e:
        mesh_down()
        print(f"netns: cannot make rate-limited network namespaces here ({getattr(e, 'stderr', '') or e})",
              file=sys.stderr)
        sys.exit(3)
    base = ["--child", "single", "--threads", "1", "--batch", str(args.batch), args.model]
    topologies = args.topologies.split(",")
    links = [(m, t) for m in mbits for t in topologies]          # each link speed, each topology
    rates = {"alone": [], "ceiling": [], **{k: [] for k in links}}
    figures = {}
    workers, root, singles = [], None, []
    try:
        for r in range(args.runs):
            # the ceiling: N one-core processes, each pinned to its core (no network)
            singles = [Child(["taskset", "-c", str(i)], base) for i in range(n)]
            for c in singles:
                c.wait_ready()
            rates["alone"].append(together(singles[:1], args.tokens)[0]["rate"])
            rates["ceiling"].append(sum(x["rate"] for x in together(singles, args.tokens)))
            for c in singles:
                c.close()
            singles = []
            # the cluster: root on core 0 in glmb-0, worker i on core i in glmb-i
            if not workers:
                wkeys = [] if args.insecure else ["--key", os.path.join(tmp, "worker"), "--allow",
                                                  os.path.join(tmp, "root.pub")]
                for i in range(1, n):
                    w = subprocess.Popen(["ip", "netns", "exec", node_ns(i), "taskset", "-c", str(i), sys.executable,
                                          "-m", "glmcpu", "worker", "--bind", f"tcp://{node_addr(i)}:5599", "--model",
                                          args.model, "-t", "1"] + (["--insecure"] if args.insecure else wkeys),
                                         stdout=subprocess.PIPE, text=True)
                    if not w.stdout.readline().startswith("glmcpu worker on"):
                        raise SystemExit("a worker did not start")
                    workers.append(w)
            eps = ",".join(f"tcp://{node_addr(i)}:5599" for i in range(1, n))
            root = Child(["ip", "netns", "exec", node_ns(0), "taskset", "-c", "0"],
                         ["--child", "root", "--threads", "1", "--endpoints", eps, "--wires", args.wires,
                          "--topologies", args.topologies, "--batch", str(args.batch), args.model]
                         + (["--insecure"] if args.insecure else keys))
            root.wait_ready()
            for m in mbits:
                set_rate(n, m)
                for t in (topologies if r % 2 == 0 else topologies[::-1]):      # alternating order
                    res = together([root], args.tokens, t)[0]
                    if res["alive"] != n - 1:
                        raise SystemExit("a worker was lost during the run: the figure would be the root's alone")
                    rates[(m, t)].append(res["rate"])
                    figures[(m, t)] = res
            root.close()
            root = None
            print(f"run {r + 1}: one core {rates['alone'][-1]:.2f} tok/s, {n} at once {rates['ceiling'][-1]:.2f}, "
                  + ", ".join(f"{t} over {m:g} Mbit/s {rates[(m, t)][-1]:.2f}" for m, t in links), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        one, ceil = med["alone"], med["ceiling"]
        print(f"one core alone: {one:.2f} tok/s; {n} one-core processes at once: {ceil:.2f} tok/s in all "
              f"(this machine's ceiling for {n} nodes: {ceil / one:.2f}x)")
        from glmcpu.gguf import GGUFFile
        from glmcpu.models import model_class
        f = GGUFFile(args.model)
        cfg = model_class(f.arch).config_class.from_gguf(f)
        sizes = module_bytes(f, cfg)
        per_token = token_bytes(sizes)
        plan = make_plan(cfg, ["root"] + [f"w{i}" for i in range(1, n)], [1] * n)
        result = {"nodes": n, "alone": one, "ceiling": ceil, "cluster": {}, "predicted": {}}
        for m, t in links:
            fig, key = figures[(m, t)], f"{t} {m:g}"
            # each node as fast as one of the N processes that ran at once (its share of the memory bus)
            speeds = [per_token * ceil / n / 1e9] * n
            p = predict(plan, cfg, sizes, speeds, m, 0.05, args.wires.split(",")[0], topology=t)
            result["cluster"][key], result["predicted"][key] = med[(m, t)], p["tok_s"]
            print(f"{t} over {m:g} Mbit/s: {med[(m, t)]:.2f} tok/s = {med[(m, t)] / one:.2f}x one core, "
                  f"{med[(m, t)] / ceil:.2f} of the ceiling (runs {', '.join(f'{x:.2f}' for x in rates[(m, t)])}); "
                  f"per token {fig['sent_kib']:.1f} KiB sent, {fig['received_kib']:.1f} KiB received by the root, "
                  f"{fig['round_trips']:.0f} round trips, {fig['syncs']:.0f} mesh syncs, {fig['net_ms']:.1f} ms waiting; "
                  f"`glmcpu plan --topology {t}` predicts {p['tok_s']:.2f} ({p['tok_s'] / ceil:.2f} of the ceiling)")
        if args.json:
            import json
            with open(args.json, "w") as fh:
                json.dump(result, fh)
    finally:
        for c in singles + ([root] if root else []):
            c.p.kill()
        for w in workers:
            w.kill()
            w.wait()
        mesh_down()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def apart_main(args):
    """Loopback with one model resident at a time (a file near half the RAM would push the other
    out of the page cache): each run, a --single-threads process alone, then a root (first core)
    and a worker (last core) with one thread each, every --topologies in turn."""
    cores = sorted(os.sched_getaffinity(0))
    topologies = args.topologies.split(",")
    rates = {"single": [], **{t: [] for t in topologies}}
    for r in range(args.runs):
        c = Child([], ["--child", "single", "--threads", str(args.single_threads), args.model])
        c.wait_ready()
        rates["single"].append(together([c], args.tokens)[0]["rate"])
        c.close()
        w, ep = start_worker(args.model)
        try:
            root = Child(["taskset", "-c", str(cores[0])], ["--child", "root", "--threads", "1", "--endpoints", ep,
                                                            "--wires", "f32", "--topologies", args.topologies,
                                                            "--insecure", args.model])
            root.wait_ready()
            for t in (topologies if r % 2 == 0 else topologies[::-1]):
                rates[t].append(together([root], args.tokens, t)[0]["rate"])
            root.close()
        finally:
            w.kill()
            w.wait()
        print(f"run {r + 1}: one process {rates['single'][-1]:.2f} tok/s, "
              + ", ".join(f"{t} {rates[t][-1]:.2f}" for t in topologies), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"one process, {args.single_threads} threads: {med['single']:.2f} tok/s")
    for t in topologies:
        print(f"root 1 thread + worker 1 thread, {t} (exact wire): {med[t]:.2f} tok/s = "
              f"{med[t] / med['single']:.2f}x (runs {', '.join(f'{x:.2f}' for x in rates[t])})")


def counters(c):
    """A cluster's running totals: bytes sent, received, round trips, seconds waiting, tokens, syncs."""
    return np.array([c.stats["sent"], c.stats["received"], c.stats["round_trips"],        # (the mesh's bytes too)
                     c.stats["net_seconds"], c.stats["tokens"], c.stats["syncs"]], float)


def decode_rate(m, n, prompt, at_first=None, batch=1):
    """Decode tok/s of n tokens after the prompt; at_first() is called once the first token (the
    prompt's step) is out, so that counters taken then and at the end cover decode steps alone.
    batch > 1: that many sequences (the prompt, each with its own first id) decode together, one
    forward pass a step (glm4.Batch, as serve --parallel runs them): all their tokens a second."""
    if batch > 1:
        return batch_rate(m, n, prompt, at_first, batch)
    m.reset()
    for i, _ in enumerate(m.generate(prompt, max_tokens=n, seed=0, ignore_eos=True)):  # default sampling
        if i == 0 and at_first is not None:
            at_first()
    s = m.last_stats
    return s["gen_tokens"] / s["gen_seconds"]


def batch_rate(m, n, prompt, at_first, batch):
    import time
    from glmcpu.models.glm4 import Batch
    net = m.net
    caches = [net.new_cache(len(prompt) + n + 1) for _ in range(batch)]
    last = [int(np.argmax(net.forward([prompt[0] + i] + prompt[1:], c)[-1])) for i, c in enumerate(caches)]
    if at_first is not None:
        at_first()
    t = time.perf_counter()
    kw = {"top": 1} if getattr(net, "sparse_logits", False) else {}       # greedy: the best logit of each row
    for _ in range(n):
        logits = net.forward(last, Batch([(c, 1) for c in caches]), **kw)
        last = [int(x) for x in np.argmax(logits, 1)]
    return batch * n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--single-threads", type=int, default=2)
    ap.add_argument("--wires", default="f32,f16,q8_0", help="the star's wire codecs to measure")
    ap.add_argument("--topologies", default="star,mesh",
                    help="star (every sync through the root, each --wires) and/or mesh (one exchange among "
                         "all nodes per sync, exact wire), in turn on the same workers")
    ap.add_argument("--link-mbit", default=None, help="Mbit/s of the link (--netns: comma-separated, each in turn)")
    ap.add_argument("--shares", default=None, help="root,worker (default: even)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--netns", action="store_true", help="every node in a namespace and on a core of its own")
    ap.add_argument("--nodes", type=int, default=2, help="--netns: root + workers")
    ap.add_argument("--insecure", action="store_true", help="--netns: plain TCP (default: CurveZMQ keys)")
    ap.add_argument("--switch", action="store_true", help="--netns: 2 nodes meet at a bridge too (default: a cable)")
    ap.add_argument("--batch", type=int, default=1,
                    help="--netns: sequences decoding together in one pass, in every process (serve --parallel): "
                         "rates are all their tokens a second")
    ap.add_argument("--apart", action="store_true",
                    help="loopback with one model loaded at a time (files near half the RAM)")
    ap.add_argument("--child", choices=("single", "root"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--endpoints", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--worker-key", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args)
    if args.apart:
        return apart_main(args)
    if args.netns:
        if not args.link_mbit:
            args.link_mbit = "1000,100"
        return netns_main(args)
    if args.link_mbit:
        args.link_mbit = float(args.link_mbit)

    import glmcpu
    from glmcpu import ops
    from glmcpu.plan import make_plan, module_bytes, predict, token_bytes

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
        topologies = args.topologies.split(",")
        root = glmcpu.load(args.model, threads=1, workers=[ep], insecure=True, timeout=30, shares=shares,
                           topology="mesh" if "mesh" in topologies else "star")
        c = root.cluster
        # each configuration: a wire over the star, or the mesh (exact wire)
        wires = ([w for w in args.wires.split(",")] if "star" in topologies else []) + (
            ["mesh"] if "mesh" in topologies else [])
        rates = {"single": [], "one": [], **{w: [] for w in wires}}
        figures = {}
        decode_rate(single, 4, prompt)
        # a one-thread process on the root's core, timed in every run beside the cluster (the
        # prediction's node speed, measured under the same conditions as what it predicts)
        one = glmcpu.load(args.model, threads=1) if args.link_mbit else None
        all_cores = os.sched_getaffinity(0)
        root_core = {sorted(all_cores)[0]} if len(all_cores) > 1 else all_cores
        os.sched_setaffinity(0, root_core)        # this thread runs the root's one-thread kernels
        decode_rate(root, 4, prompt)
        for r in range(args.runs):
            os.sched_setaffinity(0, all_cores)
            rates["single"].append(decode_rate(single, args.tokens, prompt))
            os.sched_setaffinity(0, root_core)
            if one is not None:
                rates["one"].append(decode_rate(one, args.tokens, prompt))
            for w in wires:
                if "mesh" in topologies:
                    c.use_mesh(w == "mesh")
                c.wire = "f32" if w == "mesh" else w
                t0 = counters(c)[[0, 1, 2, 3, 5]]
                decode_rate(root, 1, prompt)                 # the prompt alone
                t1 = counters(c)[[0, 1, 2, 3, 5]]
                rates[w].append(decode_rate(root, args.tokens, prompt))
                t2 = counters(c)[[0, 1, 2, 3, 5]]
                figures[w] = ((t2 - t1) - (t1 - t0)) / (args.tokens - 1)    # per decoded token
        med = {k: statistics.median(v) for k, v in rates.items() if v}
        print(f"one process, {args.single_threads} threads: {med['single']:.2f} tok/s "
              f"(runs {', '.join(f'{x:.2f}' for x in rates['single'])})")
        for w in wires:
            sent, recv, trips, net, syncs = figures[w]
            what = "mesh (exact wire)" if w == "mesh" else f"star, wire {w}"
            print(f"root 1 thread + worker 1 thread, {what}: {med[w]:.2f} tok/s = {med[w] / med['single']:.2f}x "
                  f"(runs {', '.join(f'{x:.2f}' for x in rates[w])}); per token " +
                  (f"{syncs:.0f} syncs, {1e3 * net:.1f} ms sending and waiting in them, "
                   f"{1e3 * net / max(syncs, 1):.3f} ms a sync" if w == "mesh" else
                   f"{sent / 1024:.1f} KiB sent, {recv / 1024:.1f} KiB received, {trips:.0f} round trips, "
                   f"{1e3 * net:.1f} ms waiting"))
        result = {"single": med["single"], "cluster": {w: med[w] for w in wires},
                  "per_token": {w: dict(zip(("sent", "received", "round_trips", "net_seconds", "syncs"),
                                            map(float, figures[w])))
                                for w in wires}, "predicted": {}}
        if args.link_mbit:
            cfg = root.cfg
            sizes = module_bytes(root.file, cfg)
            per_token = token_bytes(sizes)
            one_gbs = per_token * med["one"] / 1e9
            plan = make_plan(cfg, ["root", ep], [1, 1])
            for w in wires:
                p = predict(plan, cfg, sizes, [one_gbs, one_gbs], args.link_mbit, 0.05, "f32" if w == "mesh" else w,
                            topology="mesh" if w == "mesh" else "star")
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
