"""How long one sync takes between two nodes, per transport: the floor under a cluster's decode.

    python tools/bench_sync.py --width 4096 --iters 3000

A sync is what the cluster does after each split module: every node sends its partial sum (one
row of `--width` values; the exact wire sends float64) to the other and adds the one it gets.
Two processes, each pinned to a core of its own (where there are two), exchange such rows over
127.0.0.1 as fast as they can; the figure is the median (and 90th percentile) of one exchange on
rank 0, in microseconds. Transports:

  zmq          ZeroMQ PAIR sockets, no encryption
  zmq-curve    the same with CurveZMQ (what the cluster's links use)
  tcp          a raw TCP socket (TCP_NODELAY), sendall / recv_into
  tcp-aesgcm   the same, each message sealed with AES-256-GCM (`cryptography`, a counter nonce)
  star         today's cluster link: glmcpu.net.link Client.request to a Server that echoes
               (ROUTER/DEALER, msgpack header, CurveZMQ), one request/reply per sync
  mesh         glmcpu's own exchange (glmcpu/net/mesh.py) as `--topology mesh` runs it: raw TCP
               read and written by the computing thread, a 6-byte prefix and 16-byte header,
               AES-256-GCM with the mesh's key
  gloo         torch.distributed's gloo all_reduce of the row (the collective of an existing
               engine; torch is a test dependency)

Nothing is timed beside it: run it alone on the machine.
"""
import argparse
import os
import socket
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRANSPORTS = ("zmq", "zmq-curve", "tcp", "tcp-aesgcm", "star", "mesh", "gloo")
DTYPES = {"f64": np.float64, "f32": np.float32}


def pin(rank):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_exact(sock, view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def exchange_loop(rank, send, recv, row, iters, warmup):
    """Each iteration: send our row, receive the peer's, add. Returns the times (s) and whether
    every sum was our row plus the peer's."""
    acc = np.empty_like(row)
    want = row + peer_row(rank, row)
    times, ok = np.empty(iters), True
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        send(row)
        other = recv()
        np.add(row, other, out=acc)
        if i >= warmup:
            times[i - warmup] = time.perf_counter() - t0
        ok = ok and np.array_equal(acc, want)
    return times, ok


def make_row(rank, width, dtype):
    return np.random.default_rng(rank).standard_normal((1, width)).astype(dtype)


def peer_row(rank, row):
    return make_row(1 - rank, row.shape[1], row.dtype)


def run_zmq(rank, port, row, iters, warmup, curve, keys):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    if curve:
        server_pub, server_sec, client_pub, client_sec = keys
        if rank == 0:
            s.curve_publickey, s.curve_secretkey, s.curve_server = server_pub, server_sec, True
        else:
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = client_pub, client_sec, server_pub
    (s.bind if rank == 0 else s.connect)(f"tcp://127.0.0.1:{port}")
    def recv():
        return np.frombuffer(s.recv(copy=False).buffer, row.dtype).reshape(row.shape)
    times = exchange_loop(rank, lambda r: s.send(r, copy=False), recv, row, iters, warmup)
    s.close(0)
    ctx.term()
    return times


def run_mesh(rank, port, row, iters, warmup, aes_key):
    from glmcpu.net.mesh import Mesh
    mesh = Mesh(rank, 2, aes_key, timeout=30)
    if rank == 1:                        # the worker: its port admits a node holding the key only
        mesh.bind("127.0.0.1", port=port)
        mesh.wait_joined([0], timeout=30)
    else:
        for _ in range(100):
            try:
                mesh.connect({1: f"tcp://127.0.0.1:{port}"})
                break
            except Exception:
                time.sleep(0.05)
    mesh.begin(1)
    sync = [0]

    def send(r):
        mesh.send(1, sync[0], memoryview(r.reshape(-1)).cast("B"))

    def recv():
        buf = mesh.gather(sync[0], [1 - rank], row.nbytes)[1 - rank]
        sync[0] += 1
        return np.frombuffer(buf, row.dtype).reshape(row.shape)
    times = exchange_loop(rank, send, recv, row, iters, warmup)
    mesh.close()
    return times


def run_tcp(rank, port, row, iters, warmup, key):
    if rank == 0:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(1)
        s, _ = ls.accept()
        ls.close()
    else:
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.01)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.empty_like(row)
    view = memoryview(buf).cast("B")
    if key is None:
        send = lambda r: s.sendall(r)                       # noqa: E731

        def recv():
            recv_exact(s, view)
            return buf
    else:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        aead = AESGCM(key)
        sealed = bytearray(row.nbytes + 16)
        sview = memoryview(sealed)
        counters = [0, 0]                                    # ours, theirs: a nonce is never reused

        def send(r):
            nonce = struct.pack("<IQ", rank, counters[0])
            counters[0] += 1
            s.sendall(aead.encrypt(nonce, r.tobytes(), None))

        def recv():
            recv_exact(s, sview)
            nonce = struct.pack("<IQ", 1 - rank, counters[1])
            counters[1] += 1
            view[:] = aead.decrypt(nonce, bytes(sealed), None)
            return buf
    times = exchange_loop(rank, send, recv, row, iters, warmup)
    s.close()
    return times


def run_star(rank, port, row, iters, warmup, keys):
    """Rank 0 is the root: one request/reply per sync, as the cluster's links do today."""
    from glmcpu.net.link import Client, Server
    server_pub, server_sec, client_pub, client_sec = keys
    if rank == 1:
        served = [0]

        def echo(op, meta, arrays):
            served[0] += 1
            return {}, [row]
        srv = Server(f"tcp://127.0.0.1:{port}", echo, keypair=(server_pub, server_sec), allowed=[client_pub])
        srv.serve(stop=lambda: served[0] >= warmup + iters, poll_ms=50)
        srv.close()
        return None
    cl = Client(f"tcp://127.0.0.1:{port}", keypair=(client_pub, client_sec), server_key=server_pub, timeout=10)

    def send(r):
        cl.send("part", {}, [r])

    def recv():
        _, arrays = cl.recv()
        return arrays[0]
    times = exchange_loop(rank, send, recv, row, iters, warmup)
    cl.close()
    return times


def run_gloo(rank, port, row, iters, warmup):
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.from_numpy(row.copy())
    want = torch.from_numpy(row + peer_row(rank, row))
    times, ok = np.empty(iters), True
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if i >= warmup:
            times[i - warmup] = time.perf_counter() - t0
        ok = ok and bool(torch.equal(t, want))
        t.copy_(torch.from_numpy(row))
    dist.destroy_process_group()
    return times, ok


def node(rank, transport, port, width, dtype, iters, warmup, keys, aes_key, out):
    pin(rank)
    row = make_row(rank, width, DTYPES[dtype])
    if transport in ("zmq", "zmq-curve"):
        times = run_zmq(rank, port, row, iters, warmup, transport == "zmq-curve", keys)
    elif transport in ("tcp", "tcp-aesgcm"):
        times = run_tcp(rank, port, row, iters, warmup, aes_key if transport == "tcp-aesgcm" else None)
    elif transport == "star":
        times = run_star(rank, port, row, iters, warmup, keys)
    elif transport == "mesh":
        times = run_mesh(rank, port, row, iters, warmup, aes_key)
    else:
        times = run_gloo(rank, port, row, iters, warmup)
    if rank == 0:
        out.send(times)                  # (times, every sum right)


def measure(transport, width, dtype, iters, warmup):
    import multiprocessing as mp
    import zmq
    ctx = mp.get_context("spawn")
    sp, ss = zmq.curve_keypair()
    cp, cs = zmq.curve_keypair()
    keys, aes_key = (sp, ss, cp, cs), os.urandom(32)
    port = free_port()
    a, b = ctx.Pipe()
    procs = [ctx.Process(target=node, args=(r, transport, port, width, dtype, iters, warmup, keys, aes_key, b))
             for r in (0, 1)]
    for p in procs:
        p.start()
    times = a.recv() if a.poll(120) else None
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=4096, help="values per row (GLM-4-9B: 4096)")
    ap.add_argument("--dtype", default="f64", choices=sorted(DTYPES), help="f64: the exact wire's partial sums")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    a = ap.parse_args()
    nbytes = a.width * np.dtype(DTYPES[a.dtype]).itemsize
    print(f"one sync = each of 2 processes sends a row of {a.width} {a.dtype} ({nbytes} bytes) and adds the "
          f"other's; 127.0.0.1, {a.iters} syncs after {a.warmup}; microseconds on rank 0")
    for t in a.transports.split(","):
        if t not in TRANSPORTS:
            sys.exit(f"unknown transport {t!r}; use some of {', '.join(TRANSPORTS)}")
        times = measure(t, a.width, a.dtype, a.iters, a.warmup)
        if times is None:
            print(f"  {t:11s} gave no result (a node failed: run it alone to see why)")
            continue
        times, ok = times
        if not ok:
            print(f"  {t:11s} WRONG SUMS: a row arrived changed")
            continue
        us = times * 1e6
        print(f"  {t:11s} median {np.median(us):7.1f}   p90 {np.percentile(us, 90):7.1f}   min {us.min():7.1f}")


if __name__ == "__main__":
    main()
