"""A cluster a user can run twice and trust under faults (issue 22): every way a root ends frees
its workers at once; a worker lost at any moment (the output head while it holds KV, a draft step,
a verification pass, a load, a put) leaves the answer as it was; a hostile root cannot take a
worker past --memory or its cache past --cache-max; a file changed in place is noticed; what is
planted in a worker's cache is never followed, read or waited on."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import glmcpu
from glmcpu.cluster import make_plan
from glmcpu.models import glm4
from glmcpu.models.glm4_moe import MTP
from glmcpu.net.protocol import pack
from glmcpu.weights import FileWeights, Recorder, payload_digest
from conftest import PROMPT, greedy, start_worker
from test_cluster import flip_a_weight
from test_cluster_fuzz import Peer, rss_mb

TOPOLOGY = "star"          # tests/test_*_mesh.py run these tests again over a mesh


def glmcpu_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "glmcpu", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


# ---- every way a root ends frees its workers at once ----------------------------------------

def test_runs_in_a_row_and_after_ctrl_c_and_a_terminated_server(tiny, workers):
    """Workers with a 60 s lease: `run` three times with no pause, after a Ctrl-C'd `run`, and
    after a SIGTERM'd `serve`: each is served at once, by both workers."""
    _, path, _ = tiny("glm4", "q8_0")
    _, eps = workers(path, 2, "--insecure", lease=60)
    cluster = ["--workers", ",".join(eps), "--insecure"]
    one = ["run", path, "-p", "Once", "-n", "6", "--ignore-eos", "--stats", *cluster]

    def served_at_once():
        t = time.perf_counter()
        p = glmcpu_cli(*one)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "workers alive 2/2" in err and "failovers 0" in err
        return time.perf_counter() - t

    for _ in range(3):
        print(f"run {served_at_once():.1f} s")
    # Ctrl-C in the middle of an answer
    p = glmcpu_cli("run", path, "-p", "Once", "-n", "100000", "--ignore-eos", "--raw", *cluster)
    assert p.stdout.read(1)                      # it is answering
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode == 130
    print(f"run after Ctrl-C {served_at_once():.1f} s")
    # a server stopped by SIGTERM while it holds the workers
    p = glmcpu_cli("serve", path, "--port", "0", *cluster)
    assert p.stdout.readline().startswith("glmcpu serving")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    print(f"run after SIGTERM'd serve {served_at_once():.1f} s")


# ---- the head victim holds KV -------------------------------------------------------------

def kv_and_head_holder(cfg, n_workers):
    """A worker that holds query heads (their KV) and rows of the output head."""
    plan = make_plan(cfg, ["root"] + ["w"] * n_workers)
    kv = {n for parts in plan.tables["attn"].values() for n, _, _ in parts}
    head = {n for n, _, _ in plan.tables["head"][-1]}
    return min((kv & head) - {0}) - 1


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
@pytest.mark.parametrize("n_workers", [2, 3])
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_head_victim_holding_kv_changes_nothing(tiny, workers, family, n_workers, how):
    """Lost while it answers the output head of decode step 3: the step was not committed, so the
    replay ends where the step starts and the step runs once."""
    _, path, _ = tiny(family, "q8_0")
    one = glmcpu.load(path, threads=1)
    want = greedy(one, 16)
    victim = kv_and_head_holder(one.cfg, n_workers)
    faults = [None] * n_workers
    faults[victim] = f"{how}:head:5"             # the prompt's pass is head request 1
    _, eps = workers(path, n_workers, "--insecure", faults=faults)
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=1.5)
    assert greedy(m, 16) == want
    assert m.cache.tokens == one.cache.tokens        # each position once (a text may hide a repeat)
    st = m.cluster.status()
    assert st["failovers"] == 1 and st["replays"] == 1 and st["alive"] == f"{n_workers - 1}/{n_workers}"
    m.close()


# ---- a draft step and a verification pass ---------------------------------------------------

def head_calls(path, mode, prompt, n):
    """In one process, for each call of the output head in order: whether it was the MTP head's
    (a draft step), and how many rows it computed (more than one: a verification pass)."""
    one = glmcpu.load(path, threads=1, draft=mode, draft_tokens=2)
    calls, in_draft = [], [False]
    head, mtp_forward, call = one.net.output, MTP.forward, glm4.Linear.__call__

    def draft_forward(self, *a, **kw):
        in_draft[0] = True
        try:
            return mtp_forward(self, *a, **kw)
        finally:
            in_draft[0] = False

    def linear(self, x, th):
        if self is head:
            calls.append((in_draft[0], x.shape[0]))
        return call(self, x, th)

    mp = pytest.MonkeyPatch()
    mp.setattr(MTP, "forward", draft_forward)
    mp.setattr(glm4.Linear, "__call__", linear)
    try:
        text = list(one.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))
    finally:
        mp.undo()
    return calls, text, one.cache.tokens


@pytest.mark.parametrize("mode", ["mtp", "lookup"])
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_worker_lost_in_a_draft_step_or_a_check_changes_nothing(tiny, workers, mode, how):
    """--draft mtp: the KV-holding head victim is lost while it answers the MTP head of a draft
    step (the root's own layer beside the split head); --draft lookup: while it answers a
    verification pass of 1 + guesses tokens. Greedy text is one process's without drafts."""
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, qk_norm=False, scaling=1.0)
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    want = list(glmcpu.load(path, threads=1, draft="none").generate(prompt, max_tokens=40, temperature=0,
                                                                   ignore_eos=True))
    calls, text, tokens = head_calls(path, mode, prompt, 40)
    assert text == want
    pick = (lambda c: c[0]) if mode == "mtp" else (lambda c: c[1] > 1)
    nth = [i + 1 for i, c in enumerate(calls) if pick(c)][2]       # the third draft step / check
    cfg = glmcpu.load(path, threads=1, draft="none").cfg
    faults = [None, None]
    faults[kv_and_head_holder(cfg, 2)] = f"{how}:head:{nth}"
    _, eps = workers(path, 2, "--insecure", faults=faults)
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=1.5, draft=mode, draft_tokens=2)
    assert list(m.generate(prompt, max_tokens=40, temperature=0, ignore_eos=True)) == want
    assert m.cache.tokens == tokens
    st = m.cluster.status()
    assert st["failovers"] == 1 and st["replays"] == 1 and m.last_stats["drafted"] > 0
    m.close()


# ---- load and put --------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["load", "put"])
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_worker_lost_during_load_or_put_is_a_failover(tiny, workers, op, how):
    """kill -9 or SIGSTOP as the worker receives its first load (it has the file) or put (it has
    none: the root ships its share): the root goes on without it, within --timeout, same text."""
    _, path, _ = tiny("glm4_moe", "q8_0")
    want = greedy(glmcpu.load(path, threads=1), 16)
    _, eps = workers(path if op == "load" else None, 2, "--insecure", faults=[f"{how}:{op}:1", None])
    t = time.perf_counter()
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=2)
    print(f"{how} during {op}: the root started in {time.perf_counter() - t:.1f} s (--timeout 2)")
    assert time.perf_counter() - t < 20                  # not LONG (600 s): the loss is seen at once
    assert greedy(m, 16) == want
    st = m.cluster.status()
    assert st["failovers"] == 1 and st["alive"] == "1/2"
    m.close()


# ---- a hostile root: --memory ----------------------------------------------------------------

def attn_share(path, heads):
    """(config, digest, entries, arrays) of layer 0's attention share over `heads` of a file."""
    m = glmcpu.load(path, threads=1)
    rec = Recorder(FileWeights(m.file))
    type(m.net).build(rec, m.cfg, "attn", 0, heads)
    entries, arrays = rec.payload()
    import dataclasses
    cfg = {k: (float(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(m.cfg).items()}
    return cfg, rec.digest(), entries, arrays


def test_a_hostile_root_cannot_take_a_worker_past_its_memory(tiny, tmp_path):
    """--memory 0.5 GB. A root that claims a long context and a new rope theta at each session
    (and at each reload within one), with rope over whole 64-dim heads: 64 MiB of tables each;
    then shares shipped past the memory offered. RSS stays within --memory and does not grow."""
    _, path, _ = tiny("glm4", "q8_0", hidden=256, ffn=512, head_dim=64, layers=2)
    cfg, digest, entries, arrays = attn_share(path, (0, 2))
    ctx = 1 << 18                    # KV of one layer: 256 MiB (as zero pages); rope table: 64 MiB
    cfg.update(n_layer=1, n_ctx_train=ctx, n_rot=cfg["head_dim"])
    p, ep = start_worker(None, "--insecure", "--memory", "0.5", "--cache", str(tmp_path / "cache"), "--lease", "30")
    peer = Peer(ep)
    try:
        base = rss_mb(p.pid)
        x = np.ones((1, cfg["d_model"]), np.float32)
        seen = []

        def session(s, epoch, theta):
            load = {"s": s, "e": epoch, "config": dict(cfg, rope_theta=theta), "ctx": ctx, "fingerprint": "x",
                    "shares": [["attn", 0, 0, 2, digest]]}
            op, meta, _ = peer.ask("load", load)
            assert op == "ok", meta
            if meta["missing"]:
                assert peer.ask("put", {"s": s, "digest": digest, "entries": entries}, arrays)[0] == "ok"
                assert peer.ask("load", load)[1]["missing"] == []
            op, meta, _ = peer.ask("attn", {"s": s, "e": epoch, "layer": 0, "seg": [[0, ctx - 1, 1, True]], "wire": "f32"}, [x])
            assert op == "ok", meta
            seen.append(rss_mb(p.pid))
            assert seen[-1] < base + 512, seen

        for i in range(8):                                # eight roots, one after another
            session(f"{i:032x}", 1, 10000.0 + i)
            peer.ask("bye", {"s": f"{i:032x}"})
        for e in range(1, 9):                             # one root reloading with new thetas
            session("f" * 32, e, 20000.0 + e)
        assert max(seen[2:]) < seen[1] + 80, seen        # one table at a time (64 MiB), none kept
        print(f"worker RSS (MB): at start {base:.0f}, after each session {[round(x) for x in seen]}")
        # shipped shares past the memory offered: a 300 MB share fits, a second does not
        s = "a" * 32
        peer.ask("bye", {"s": "f" * 32})
        big = [np.ones(75 << 20, np.float32), np.full(75 << 20, 2, np.float32)]
        shares = [[["vector", [f"v{i}"], [0], "<f4", [75 << 20]]] for i in range(2)]
        digests = [payload_digest(e, [a]) for e, a in zip(shares, big)]
        load = {"s": s, "e": 1, "config": dict(cfg, n_ctx_train=64), "ctx": 64, "fingerprint": "x",
                "shares": [["head", -1, 0, 8, d] for d in digests]}
        assert peer.ask("load", load)[1]["missing"] == digests
        assert peer.ask("put", {"s": s, "digest": digests[0], "entries": shares[0]}, big[:1])[0] == "ok"
        op, meta, _ = peer.ask("put", {"s": s, "digest": digests[1], "entries": shares[1]}, big[1:])
        assert op == "error" and "--memory" in meta["message"], meta
        del big
        print(f"worker RSS after a 300 MB put and a refused one: {rss_mb(p.pid):.0f} MB")
        assert rss_mb(p.pid) < base + 512
        peer.ask("bye", {"s": s})
        assert p.poll() is None
    finally:
        peer.close()
        p.kill()
        p.wait()


# ---- a hostile root: --cache-max -------------------------------------------------------------

def disk_bytes(folder) -> int:
    return sum(os.lstat(os.path.join(folder, n)).st_size for n in os.listdir(folder)) if os.path.isdir(folder) else 0


def test_a_hostile_root_cannot_take_the_cache_past_cache_max(tiny, tmp_path):
    """--cache-max 10 MiB against puts whose entries hold bytes, arrays no entry names, empty
    entries, and a load bigger than the cap; the directory's size is measured after each."""
    _, path, _ = tiny("glm4", "q8_0")
    cache, cap = str(tmp_path / "cache"), 10 << 20
    p, ep = start_worker(None, "--insecure", "--cache", cache, "--cache-max", str(cap / 2**30), "--lease", "1")
    peer = Peer(ep)
    s = "b" * 32
    cfg = attn_share(path, (0, 2))[0]

    def load(digests):
        shares = [["head", -1, 0, 8, d] for d in digests]
        return peer.ask("load", {"s": s, "e": 1, "config": cfg, "ctx": 64, "fingerprint": "x", "shares": shares})

    def put(digest, entries, arrays):
        return peer.ask("put", {"s": s, "digest": digest, "entries": entries}, arrays)

    try:
        mib = np.ones(2 << 20, np.float32)                                  # 8 MiB
        for i in range(5):                                                  # bytes in the entries
            entries = [["vector", [f"x{i}", b"\x00" * 1000], [0], "<f4", [mib.size]]]
            d = payload_digest(entries, [mib])
            load([d])
            op, meta, _ = put(d, entries, [mib])
            assert op == "error" and disk_bytes(cache) <= cap
        for i in range(5):                                                  # an array no entry names
            entries = [["has", [f"y{i}"], True]]
            d = payload_digest(entries, [])
            load([d])
            assert put(d, entries, [mib])[0] == "error" and disk_bytes(cache) <= cap
        ds = []
        for i in range(300):                                                # empty entries: counted
            entries = [] if i == 0 else [["has", [f"z{i}"], True]]
            ds.append(payload_digest(entries, []))
        load(ds)
        for i, d in enumerate(ds):
            entries = [] if i == 0 else [["has", [f"z{i}"], True]]
            assert put(d, entries, [])[0] == "ok"
        assert disk_bytes(cache) <= cap and len(os.listdir(cache)) == 300
        # a load of two 8 MiB shares: the second does not fit beside the first, which it never evicts
        vecs = [[["vector", [f"w{i}"], [0], "<f4", [mib.size]]] for i in range(3)]
        ds = [payload_digest(e, [mib]) for e in vecs]
        load(ds[:2])
        assert put(ds[0], vecs[0], [mib])[0] == "ok"
        op, meta, _ = put(ds[1], vecs[1], [mib])
        assert op == "error" and "cap" in meta["message"] and disk_bytes(cache) <= cap
        assert os.path.exists(os.path.join(cache, ds[0] + ".share"))
        load(ds[2:])                                                        # the next load evicts it
        assert put(ds[2], vecs[2], [mib])[0] == "ok" and disk_bytes(cache) <= cap
        print(f"cache on disk: {disk_bytes(cache)} bytes, cap {cap}")
        assert not os.path.exists(os.path.join(cache, ds[0] + ".share"))
        peer.ask("bye", {"s": s})
        assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]
        assert p.poll() is None
    finally:
        peer.close()
        p.kill()
        p.wait()
    # a real root whose share is bigger than the cap: one line, the cache still within it
    p, ep = start_worker(None, "--insecure", "--cache", cache, "--cache-max", str(2000 / 2**30))
    try:
        with pytest.raises(glmcpu.GlmcpuError) as e:
            glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        assert "cap" in str(e.value) and "\n" not in str(e.value)
        assert disk_bytes(cache) <= cap
    finally:
        p.kill()
        p.wait()


# ---- files: changed in place, and planted in the cache ---------------------------------------

def test_a_file_rewritten_in_place_with_its_mtime_restored(tiny, tmp_path, monkeypatch):
    """The root's digests come from the file as it is now: a worker that caches shipped shares
    answers as one process on the new bytes, not with the old file's shares."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))          # the root's digest cache
    _, src, _ = tiny("glm4", "q8_0")
    path, changed = str(tmp_path / "model.gguf"), str(tmp_path / "changed.gguf")
    flip_a_weight(src, path, "blk.1.ffn_down.weight")
    flip_a_weight(path, changed, "blk.1.ffn_down.weight")                # flipped back: src's bytes
    p, ep = start_worker(None, "--insecure", "--cache", str(tmp_path / "cache"))
    try:
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        old = m.logits(PROMPT)
        np.testing.assert_array_equal(old, glmcpu.load(path, threads=1).logits(PROMPT))
        m.close()
        st = os.stat(path)
        with open(path, "r+b") as f, open(changed, "rb") as g:           # in place: same inode, size
            f.write(g.read())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_ino == st.st_ino
        want = glmcpu.load(path, threads=1).logits(PROMPT)
        assert not np.array_equal(want, old)
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        np.testing.assert_array_equal(m.logits(PROMPT), want)
        assert m.cluster.shipped > 0
        m.close()
    finally:
        p.kill()
        p.wait()


def test_links_fifos_and_directories_planted_in_the_cache(tiny, tmp_path):
    """At shares' names: a symlink to a file outside (never written through), a FIFO (never
    waited on), a directory (never in the way): each replaced by the real share, same text."""
    _, path, _ = tiny("glm4", "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    p, ep = start_worker(None, "--insecure", "--cache", str(tmp_path / "first"))
    try:
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
        digests = sorted(set(m.cluster.digests.values()))
        m.close()
    finally:
        p.kill()
        p.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    os.symlink(outside, cache / f"{digests[0]}.share")
    os.mkfifo(cache / f"{digests[1]}.share")
    (cache / f"{digests[2]}.share").mkdir()
    (cache / f"{digests[2]}.share" / "inside").write_bytes(b"x")
    p, ep = start_worker(None, "--insecure", "--cache", str(cache))
    try:
        t = time.perf_counter()
        m = glmcpu.load(path, threads=1, workers=[ep], insecure=True, timeout=5)
        assert time.perf_counter() - t < 60 and m.cluster.stats["failovers"] == 0
        assert greedy(m) == want
        m.close()
    finally:
        p.kill()
        p.wait()
    assert outside.read_bytes() == b"keep me"
    for d in digests[:3]:
        f = cache / f"{d}.share"
        assert f.is_file() and not f.is_symlink()


# ---- small things a peer could do ------------------------------------------------------------

def test_stale_epochs_timestamps_and_foreign_figures_are_refused(tiny, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    p, ep = start_worker(None, "--insecure", "--cache", str(tmp_path / "cache"), "--lease", "30")
    m = glmcpu.load(path, threads=1, workers=[ep], insecure=True)
    s, c = m.cluster.session, m.cluster
    try:
        greedy(m, 2)
        peer = Peer(ep)
        # hello tells a stranger nothing of this root's work; the root itself gets its figures
        assert "requests" not in peer.ask("hello", {})[1]
        assert peer.ask("hello", {"s": s})[1]["requests"] > 0
        # a msgpack Timestamp (an extension msgpack decodes itself) is refused
        import msgpack
        frames = pack("hello", {})
        header = msgpack.unpackb(frames[0])
        header["meta"] = {"t": msgpack.Timestamp(1, 0)}
        op, meta, _ = peer.ask(None, frames=[msgpack.packb(header, datetime=False)])
        assert op == "error" and "meta" in meta["message"]
        # a reload that lacks a share leaves no epoch: a request naming none is refused
        shares = [[k, l, a, b, c.digests[(k, l, a, b)]] for k, l, a, b in c.plan.shares_of(1)]
        load = {"s": s, "e": 7, "config": c.config, "ctx": 64, "fingerprint": "x",
                "shares": shares + [["head", -1, 0, 8, "0" * 40]]}
        assert peer.ask("load", load)[1]["missing"] == ["0" * 40]
        x = np.ones((1, m.cfg.d_model), np.float32)
        for e in (None, 7, c.epochs[0]):
            op, meta, _ = peer.ask("ffn", {"s": s, "e": e, "layer": 0, "wire": "f32"}, [x])
            assert op == "error" and "stale" in meta["message"], e
        peer.close()
    finally:
        m.close()
        p.kill()
        p.wait()
