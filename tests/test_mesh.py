"""glmcpu/net/mesh.py on 127.0.0.1, nodes in threads of one process: parts reach every node and
add up the same everywhere; only a node holding the session's key joins, and a stranger's bytes
never reach an exchange; a silent, gone or misbehaving peer and the root's abort end an exchange
with the node named."""
import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from glmcpu.net.mesh import DATA, HEADER, JOIN, PREFIX, Aborted, Mesh, PeerLost, new_key


def make_mesh(n, key, timeout=5.0):
    nodes = [Mesh(i, n, key, timeout=timeout) for i in range(n)]
    eps = {i: f"tcp://127.0.0.1:{nodes[i].bind('127.0.0.1')}" for i in range(1, n)}
    for i, m in enumerate(nodes):
        m.connect({j: e for j, e in eps.items() if j > i})
    for i, m in enumerate(nodes):
        if i:
            m.wait_joined(range(i))
    return nodes


@contextlib.contextmanager
def begun(n, timeout):
    """A keyed mesh of n nodes, all at step 1; every node closed at the end (closing twice is fine)."""
    nodes = make_mesh(n, new_key(), timeout=timeout)
    try:
        for m in nodes:
            m.begin(1)
        yield nodes
    finally:
        for m in nodes:
            m.close()


def same_everywhere(out):
    """run_all's results when every node finished and all hold the same bits, sync by sync."""
    for r in out:
        assert not isinstance(r, Exception), r
        for a, b in zip(r, out[0]):
            np.testing.assert_array_equal(a, b)
    return out


def run_all(nodes, fn):
    """fn(i, mesh) on every node at once; their results (or the exception each raised)."""
    out = [None] * len(nodes)

    def go(i):
        try:
            out[i] = fn(i, nodes[i])
        except Exception as e:          # handed back to the test
            out[i] = e
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(nodes))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("rows", [2, 256])
def test_every_node_gets_every_part_and_the_same_sum(secure, rows):
    """Three nodes, several steps and syncs, not every node sending each time; 256 rows of 4096
    doubles (8 MB, a prefill's part) go both ways at once without either side blocking."""
    nodes = make_mesh(3, new_key() if secure else None)
    width = 64 if rows == 2 else 4096
    parts = [np.random.default_rng(i).standard_normal((rows, width)) for i in range(3)]

    def node(i, mesh):
        sums = []
        for step in (1, 2):
            mesh.begin(step)
            for sync in range(5 if rows == 2 else 2):
                senders = [0, 1, 2] if sync % 2 == 0 else [1, 2]      # not every node has a part each time
                if i in senders:
                    mesh.send(step, sync, memoryview(parts[i] * (sync + 1)).cast("B"))
                got = mesh.gather(sync, [j for j in senders if j != i], parts[0].nbytes)
                y = sum(parts[i] * (sync + 1) if j == i else np.frombuffer(got[j]).reshape(rows, width)
                        for j in senders)
                sums.append(y)
        return sums
    try:
        out = same_everywhere(run_all(nodes, node))
        np.testing.assert_array_equal(out[0][0], sum(parts))
    finally:
        for m in nodes:
            m.close()


@pytest.mark.parametrize("wire", ["f32", "f16", "q8_0"])
def test_every_node_adds_the_same_bits_on_every_wire(wire):
    """cluster.exchange.MeshRun over three nodes: each node's part of a split module, sent on the
    wire in two row blocks; every node's sum is the same bits (on a smaller wire each adds every
    part as it travels, its own too), the exact wire's is the float64 sum."""
    from types import SimpleNamespace
    from glmcpu.cluster.exchange import MeshRun
    cfg = SimpleNamespace(d_model=192)
    nodes = make_mesh(3, new_key())
    parts = [np.random.default_rng(i).standard_normal((2, 192)) for i in range(3)]

    def node(i, mesh):
        run = MeshRun(mesh, cfg, wire)
        run.begin(1)
        return [run("ffn", [(0, 0, 4), (1, 4, 8), (2, 8, 12)], lambda x, k=k: parts[i] * k, np.zeros((2, 8)), ())
                for k in (1, 2)]
    try:
        out = same_everywhere(run_all(nodes, node))
        if wire == "f32":
            np.testing.assert_array_equal(out[0][1], parts[0] * 2 + parts[1] * 2 + parts[2] * 2)
        else:
            np.testing.assert_allclose(out[0][0], sum(parts), atol=0.1)
            assert not np.array_equal(out[0][0], sum(parts))
    finally:
        for m in nodes:
            m.close()


def frame(sender, kind, body=b""):
    plain = HEADER.pack(1, 0, sender, kind) + body
    return PREFIX.pack(len(plain), sender) + plain


def test_only_the_session_key_joins():
    """A stranger without the key (plain frames, or a JOIN sealed with another key) is dropped at
    its first frame and never counts as node 0; the real node 0 then joins and its part arrives."""
    key = new_key()
    worker = Mesh(1, 2, key, timeout=1.0)
    port = worker.bind("127.0.0.1")
    strangers = []
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(frame(0, JOIN) + frame(0, DATA, np.full(8, 666.0).tobytes()))
    strangers.append(s)
    other = Mesh(0, 2, new_key(), timeout=1.0)        # a key of its own
    other.connect({1: f"tcp://127.0.0.1:{port}"})
    with pytest.raises(PeerLost) as e:
        worker.wait_joined([0], timeout=0.5)
    assert e.value.node == 0 and not worker.peers
    port2 = port
    # the port stays open until node 0 proves itself
    root = Mesh(0, 2, key, timeout=1.0)
    root.connect({1: f"tcp://127.0.0.1:{port2}"})
    worker.wait_joined([0])
    assert set(worker.peers) == {0} and worker.listener is None
    for m in (root, worker):
        m.begin(1)
    real = np.arange(8.0)
    root.send(1, 0, memoryview(real).cast("B"))
    np.testing.assert_array_equal(np.frombuffer(worker.gather(0, [0], real.nbytes)[0]), real)
    for m in (root, worker, other):
        m.close()
    for s in strangers:
        s.close()


def test_silence_a_lost_peer_and_the_roots_abort_name_who():
    with begun(3, 0.5) as nodes:
        with pytest.raises(PeerLost) as e:              # node 0 never sends
            nodes[1].gather(0, [0, 2], 8)
        assert e.value.node == 0 and "did not send" in str(e.value)
        nodes[0].abort()                                # the root calls the step off
        with pytest.raises(Aborted):
            nodes[2].gather(0, [1], 8)
        nodes[2].close()                                # a node that is gone: its peers see it at once
        with pytest.raises(PeerLost) as e:
            nodes[0].gather(1, [2], 8)
        assert e.value.node == 2 and "closed" in str(e.value)


def test_a_peer_that_sent_its_part_and_died_did_send_it():
    """Node 2 sends its last part and is gone (killed after its last sync): the others still take
    that part; only a later wait on node 2 fails, naming it, and a wait on node 1 does not."""
    with begun(3, 0.5) as nodes:
        nodes[2].send(1, 0, b"\x02" * 8)
        nodes[2].close()
        time.sleep(0.1)                   # its part and its end have both arrived
        nodes[1].send(1, 0, b"\x01" * 8)               # to node 2 too: that goes nowhere, no error yet
        got = nodes[0].gather(0, [1, 2], 8)
        assert got[2] == b"\x02" * 8 and got[1] == b"\x01" * 8
        nodes[1].send(1, 1, b"\x01" * 8)              # node 2 is not waited on: nothing fails
        assert nodes[1].peers[2].lost                   # (node 1's writes to it have failed by now)
        assert nodes[0].gather(1, [1], 8)[1] == b"\x01" * 8
        with pytest.raises(PeerLost) as e:
            nodes[0].gather(2, [2], 8)
        assert e.value.node == 2 and "closed" in str(e.value)


def test_a_node_late_to_a_called_off_step_stops_at_once():
    """A node stopped mid-step (SIGSTOP) wakes after the root called the step off and closed the
    mesh: waiting on another worker's part (not the root's), it stops at once, not after its
    timeout: the root's ABORT is read even once writing to the root has failed, and a node without
    its root has no step to finish."""
    for aborted in (True, False):
        with begun(3, 5.0) as nodes:
            if aborted:
                nodes[0].abort()
            nodes[0].close()
            time.sleep(0.05)
            t = time.monotonic()
            with pytest.raises((Aborted, PeerLost)) as e:
                for sync in range(3):                       # writes to the root fail by the second
                    nodes[2].send(1, sync, b"\x02" * 8)
                    nodes[2].gather(sync, [1], 8)           # node 1 never sends
            assert time.monotonic() - t < 1.0
            assert isinstance(e.value, Aborted) if aborted else e.value.node == 0


@pytest.mark.parametrize("bad", ["wrong size", "other node's header", "unknown kind", "forged", "huge"])
def test_malformed_parts_name_the_sender(bad):
    key = new_key()
    root, worker = make_mesh(2, key, timeout=1.0)
    try:
        root.begin(1)
        worker.begin(1)
        p = root.peers[1]
        if bad == "wrong size":
            root._queue(p, DATA, 1, 0, b"\x00" * 12)
        elif bad == "other node's header":
            root.node = 5                                # its header names another node
            root._queue(p, DATA, 1, 0, b"\x00" * 8)
            root.node = 0
        elif bad == "unknown kind":
            root._queue(p, 77, 1, 0, b"\x00" * 8)
        elif bad == "forged":                            # right layout, not sealed with the key
            p.out.append(memoryview(frame(0, DATA, b"\x00" * 24)))
        else:
            p.out.append(memoryview(PREFIX.pack(1 << 31, 0)))
        root._flush(time.monotonic() + 10)
        with pytest.raises(PeerLost) as e:
            worker.gather(0, [0], 8)
        assert e.value.node == 0
    finally:
        root.close()
        worker.close()


# ---- the mesh in a cluster of real `glmcpu worker`s ------------------------------------------

def free_port():
    """A port free now, with the next one free too (a worker's mesh port)."""
    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def test_a_keyed_cluster_is_a_mesh_on_the_next_port_and_a_blocked_port_means_a_star(tiny, workers, tmp_path):
    """With keys, the default cluster of 2 workers is a mesh (AES-GCM keyed over CurveZMQ) on each
    worker's --bind port + 1, giving one process's logits; a worker whose mesh port is taken
    leaves the cluster a star, with one line saying so, and the same answer."""
    import glmcpu
    from glmcpu.net.link import keygen
    from conftest import PROMPT, greedy, start_worker
    _, path, _ = tiny("glm4_moe", "q8_0")
    one = glmcpu.load(path, threads=1)
    want_logits, want = one.logits(PROMPT), greedy(one)
    for name in ("root", "worker"):
        keygen(str(tmp_path / name))
    wkeys = ["--key", str(tmp_path / "worker"), "--allow", str(tmp_path / "root.pub")]
    ports = [free_port() for _ in range(2)]
    procs = [start_worker(path, *wkeys, bind=f"tcp://127.0.0.1:{p}") for p in ports]
    keys = dict(key=str(tmp_path / "root"), worker_key=str(tmp_path / "worker.pub"))
    try:
        m = glmcpu.load(path, threads=1, workers=[e for _, e in procs], timeout=5, **keys)
        assert m.cluster.status()["topology"] == "mesh" and m.cluster.mesh.aead is not None
        assert sorted(p.sock.getpeername()[1] for p in m.cluster.mesh.peers.values()) == sorted(p + 1 for p in ports)
        np.testing.assert_array_equal(m.logits(PROMPT), want_logits)
        assert greedy(m) == want and m.cluster.stats["mesh_steps"] > 0
        m.cluster.close()
    finally:
        for p, _ in procs:
            p.kill()
            p.wait()
    # a mesh port already taken: the star, and one line on stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    p, ep = start_worker(path, "--insecure", "--mesh-port", str(taken.getsockname()[1]))
    try:
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            m = glmcpu.load(path, threads=1, workers=[ep], insecure=True, timeout=5)
        assert m.cluster.status()["topology"] == "star" and "runs as a star" in err.getvalue()
        assert greedy(m) == want
        m.cluster.close()
    finally:
        p.kill()
        p.wait()
        taken.close()


def test_a_worker_that_reports_another_nodes_fault_is_not_blamed(tiny, workers):
    """A worker whose step failed over the mesh (it names a peer) is not the one lost: the step runs
    again over the star, nobody fails over, and the next request has the mesh back."""
    import glmcpu
    from conftest import greedy
    from glmcpu.net.link import LinkError
    _, path, _ = tiny("glm4", "q8_0")
    want = greedy(glmcpu.load(path, threads=1))
    _, eps = workers(path, 2, "--insecure")
    m = glmcpu.load(path, threads=1, workers=eps, insecure=True, timeout=5)
    c = m.cluster.clients[0]
    real, calls = c.recv, []

    def recv(timeout=None):                             # its 3rd step's answer: a mesh fault it saw
        out = real(timeout)
        calls.append(1)
        if len(calls) == 3:
            e = LinkError(f"{c.endpoint}: mesh: step: node 2 closed its connection")
            e.kind = "mesh"
            raise e
        return out
    c.recv = recv
    assert greedy(m) == want
    st = m.cluster.status()
    assert st["failovers"] == 0 and st["alive"] == "2/2" and st["topology"] == "star", st
    steps = m.cluster.stats["mesh_steps"]
    assert greedy(m) == want and m.cluster.status()["topology"] == "mesh"
    assert m.cluster.stats["mesh_steps"] > steps and m.cluster.status()["failovers"] == 0
    m.cluster.close()
