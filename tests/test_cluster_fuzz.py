"""What a worker does with well-framed but hostile messages: the protocol's own ops with mutated
fields, shapes, dtypes and sizes, from an allowed (or, insecure, any) peer. It must answer each
with an error or a result, stay alive, keep its memory bounded, and answer the next root right."""
import copy
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq

import glmcpu
from glmcpu.net.link import keygen, load_keypair
from glmcpu.net.protocol import pack, unpack
from glmcpu.weights import FileWeights, Recorder, payload_digest
from conftest import greedy, start_worker

POOL = [None, True, False, -1, 0, 1, 3, 7, 255, 2 ** 31, 2 ** 40, -2 ** 40, 2 ** 63 - 1, 1.5, -0.0,
        float("nan"), float("inf"), "", "x", "attn", "moe", "../../etc", "a" * 300, [], [1], [[1, 2, 3]],
        {}, {"a": 1}, b"\x00\xff", ["moe", 1, 0, 8, "0" * 40]]
DTYPES = [np.float32, np.float16, np.int32, np.int64, np.uint8, np.int8]


def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


def mutate(obj, rng, depth=0):
    """A changed copy of a plain value: a key dropped or replaced, an element changed, a number
    pushed out of range, a string bent, or a value of another type."""
    pick = POOL[rng.integers(len(POOL))]
    if depth > 6:
        return pick
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        c, k = dict(obj), list(obj)[rng.integers(len(obj))]
        r = rng.random()
        if r < 0.15:
            del c[k]
        elif r < 0.65:
            c[k] = mutate(c[k], rng, depth + 1)
        else:
            c[k] = pick
        return c
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        c, i = list(obj), int(rng.integers(len(obj)))
        r = rng.random()
        if r < 0.15:
            del c[i]
        elif r < 0.3:
            c.append(copy.deepcopy(c[i]))
        elif r < 0.75:
            c[i] = mutate(c[i], rng, depth + 1)
        else:
            c[i] = pick
        return c
    if isinstance(obj, int) and not isinstance(obj, bool) and rng.random() < 0.8:
        return [obj + 1, obj - 1, -obj - 1, obj * 1000 + 1, 0, 2 ** 40, obj + 4096][rng.integers(7)]
    if isinstance(obj, str) and rng.random() < 0.7:
        return [obj[::-1], obj + "0", "", obj[:-1], obj.upper()][rng.integers(5)]
    return pick


def mutate_arrays(arrays, rng):
    arrays = [np.array(a) for a in arrays]
    r = rng.random()
    if not arrays or r < 0.1:
        return arrays + [rng.standard_normal(int(rng.integers(0, 64))).astype(np.float32)]
    i = int(rng.integers(len(arrays)))
    a = arrays[i]
    if r < 0.3:                                   # another dtype, same bytes where they fit
        dt = DTYPES[rng.integers(len(DTYPES))]
        flat = a.reshape(-1).view(np.uint8)
        n = flat.size // np.dtype(dt).itemsize
        arrays[i] = flat[:n * np.dtype(dt).itemsize].view(dt)
    elif r < 0.5:                                 # another shape
        choices = [a.reshape(-1), a.reshape(1, -1), a[:0], a[: max(1, a.shape[0] // 2)] if a.ndim else a,
                   np.concatenate([a, a]) if a.ndim else a, a.reshape(*a.shape, 1), a.T.copy() if a.ndim > 1 else a]
        arrays[i] = choices[rng.integers(len(choices))]
    elif r < 0.65:                                # values: NaN, huge, out-of-range ids
        b = a.copy()
        if b.size:
            if b.dtype.kind == "f":
                b.reshape(-1)[rng.integers(b.size)] = [np.nan, np.inf, -1e38][rng.integers(3)]
            else:
                info = np.iinfo(b.dtype)
                b.reshape(-1)[rng.integers(b.size)] = [info.min, 127, info.max][rng.integers(3)]
        arrays[i] = b
    elif r < 0.8:
        del arrays[i]
    else:                                         # bytes of another length
        arrays[i] = np.zeros(int(rng.integers(0, 4096)), np.uint8)
    return arrays


class Peer:
    """A raw DEALER to a worker, with the root's key where it has one."""

    def __init__(self, endpoint, keys=None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys:
            (pub, sec), server = keys
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = pub, sec, server
        self.sock.connect(endpoint)

    def ask(self, op, meta=None, arrays=(), frames=None):
        self.sock.send_multipart(frames or pack(op, meta, arrays))
        assert self.sock.poll(30000), f"no answer to {op}"
        return unpack(self.sock.recv_multipart())

    def close(self):
        self.sock.close(0)


def templates(path, m, session):
    """Valid messages of every op, from a real root's plan for this worker."""
    c = m.cluster
    shares = [[k, l, a, b, c.digests[(k, l, a, b)]] for k, l, a, b in c.shares_of(1)]
    load = {"s": session, "e": 1, "config": c.config, "ctx": 64, "fingerprint": c.file.fingerprint(),
            "shares": shares, "slots": 2}
    k, l, a, b = c.plan.shares_of(1)[0]
    rec = Recorder(FileWeights(c.file))
    c.build(rec, k, l, a, b)
    entries, arrays = rec.payload()
    d = m.cfg.d_model
    x = np.random.default_rng(0).standard_normal((3, d)).astype(np.float32)
    base = {"s": session, "e": 1, "wire": "f32"}
    moe_layer = next(iter(c.plan.tables["moe"]))
    ids = np.array([[0, 1], [2, 3], [4, 5]], np.int32)
    return [("hello", {}, []), ("ping", {"s": session}, []), ("load", load, []),
            ("put", {"s": session, "digest": shares[0][4], "entries": entries}, arrays),
            ("attn", dict(base, layer=0, seg=[[0, 0, 3, True]]), [x]), ("ffn", dict(base, layer=0), [x]),
            ("moe", dict(base, layer=moe_layer), [x, ids, np.full((3, 2), 0.5, np.float32)]),
            ("head", dict(base, layer=-1), [x]),
            ("mesh", {"s": session, "e": 1, "phase": "bind", "node": 1, "n": 2, "timeout": 0.2,
                      "key": bytes(range(32)), "tables": {k: {str(l): [list(p) for p in parts] for l, parts in t.items()}
                                                          for k, t in c.plan.tables.items()}}, []),
            ("mesh", {"s": session, "e": 1, "phase": "connect", "peers": {}}, []),
            ("mesh", {"s": session, "e": 1, "phase": "ready"}, []),
            ("step", {"s": session, "e": 1, "step": 1, "seg": [[0, 0, 2, False], [1, 5, 1, True]], "all": False}, [x]),
            ("attn", dict(base, layer=0, seg=[[1, 0, 3, True]], wire="q8_0"),
             [np.zeros((3, d), np.int8), np.ones((3, d // 32), np.float16)]),
            ("bye", {"s": session}, [])]


def fuzz(endpoint, path, keys, n, seed):
    rng = np.random.default_rng(seed)
    session = "f" * 32
    root_kw = dict(key=keys[0], worker_key=keys[1]) if keys else dict(insecure=True)
    m = glmcpu.load(path, threads=1, workers=[endpoint], topology="mesh", **root_kw)
    tmpl = templates(path, m, session)
    m.cluster.close()
    peer = Peer(endpoint, keys and (load_keypair(keys[0]), open(keys[1]).read().split()[0].encode()))
    answers = {"ok": 0, "error": 0}
    for i in range(n):
        if i % 50 == 0:                 # a valid load now and then, so that later requests reach
            op, meta, _ = peer.ask("load", tmpl[2][1])          # the checks behind the session
        op, meta, arrays = tmpl[rng.integers(len(tmpl))]
        r = rng.random()
        if r < 0.55:
            meta = mutate(meta, rng)
        elif r < 0.85:
            arrays = mutate_arrays(arrays, rng)
        else:
            meta, arrays = mutate(meta, rng), mutate_arrays(arrays, rng)
        if rng.random() < 0.05:
            op = mutate(op, rng) if rng.random() < 0.5 else op
            op = op if isinstance(op, str) else "x"
        frames = pack(op, meta if isinstance(meta, dict) else {"m": meta}, arrays)
        if rng.random() < 0.05:         # a header whose array list disagrees with the frames
            h = msgpack.unpackb(frames[0])
            h["arrays"] = mutate(h["arrays"], rng)
            frames[0] = msgpack.packb(h)
        reply = peer.ask(None, frames=frames)
        answers[reply[0]] = answers.get(reply[0], 0) + 1
    peer.ask("bye", {"s": session})
    peer.close()
    return answers


@pytest.mark.parametrize("secure", [False, True])
def test_fuzzed_messages_leave_the_worker_well(tiny, tmp_path, secure):
    _, path, _ = tiny("glm4_moe", "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    keys, extra, root_kw = None, ["--insecure"], dict(insecure=True)
    if secure:
        for name in ("root", "worker"):
            keygen(str(tmp_path / name))
        keys = (str(tmp_path / "root"), str(tmp_path / "worker.pub"))
        extra = ["--key", str(tmp_path / "worker"), "--allow", str(tmp_path / "root.pub")]
        root_kw = dict(key=keys[0], worker_key=keys[1])
    # secure: a worker without the file (shipped shares, puts reach the cache); insecure: with it
    p, ep = start_worker(None if secure else path, *extra, "--cache", str(tmp_path / "cache"),
                         "--lease", "1")
    try:
        base = rss_mb(p.pid)
        answers = fuzz(ep, path, keys, 1000, seed=1 + secure)
        assert p.poll() is None
        assert answers["error"] > 500 and answers["ok"] > 20          # both kinds of answer were reached
        assert rss_mb(p.pid) < base + 300
        time.sleep(1.5)                                               # any fuzzed session's lease ends
        m = glmcpu.load(path, threads=1, workers=[ep], **root_kw)
        assert greedy(m) == want
        m.cluster.close()
    finally:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


def test_three_messages_that_crashed_a_worker(tiny, tmp_path):
    """An allowed root that crafts a consistent-looking share: experts whose rows are 4 bytes (with
    the right digest), a config that disagrees with them, then a moe request. Each is refused."""
    _, path, _ = tiny("glm4_moe", "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    p, ep = start_worker(None, "--insecure", "--cache", str(tmp_path / "cache"), "--lease", "1")
    try:
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        cfg = m.cluster.config
        m.cluster.close()
        E, ff, d = cfg["n_expert"], cfg["n_ff_exp"], cfg["d_model"]
        arrays = [np.zeros((E, ff, 4), np.uint8), np.zeros((E, ff, 4), np.uint8), np.zeros((E, d, 4), np.uint8)]
        entries = [["experts", [f"blk.1.ffn_{n}_exps.weight", rows, cols, E, 0, E], [i, 8], "|u1", list(a.shape)]
                   for i, (n, rows, cols, a) in enumerate(zip(("gate", "up", "down"), (ff, ff, d), (d, d, ff), arrays))]
        digest = payload_digest(entries, arrays)
        s = "e" * 32
        load = {"s": s, "e": 1, "config": cfg, "ctx": 64, "fingerprint": "x", "shares": [["moe", 1, 0, E, digest]]}
        peer = Peer(ep)
        assert peer.ask("load", load)[1]["missing"] == [digest]
        assert peer.ask("put", {"s": s, "digest": digest, "entries": entries}, arrays)[0] == "ok"   # it hashes
        op, meta, _ = peer.ask("load", load)
        assert op == "error" and "does not fit" in meta["message"]
        bigger = dict(load, config=dict(cfg, d_model=4 * d))
        op, meta, _ = peer.ask("load", bigger)
        assert op == "error"
        x = np.zeros((1, d), np.float32)
        op, meta, _ = peer.ask("moe", {"s": s, "e": 1, "layer": 1, "wire": "f32"},
                               [x, np.zeros((1, 2), np.int32), np.ones((1, 2), np.float32)])
        assert op == "error"
        peer.ask("bye", {"s": s})
        peer.close()
        assert p.poll() is None
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        assert greedy(m) == want
        m.cluster.close()
    finally:
        p.kill()
        p.wait()
