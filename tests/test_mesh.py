"""glmcpu/net/mesh.py on 127.0.0.1, nodes in threads of one process (each with a ZeroMQ context of
its own, as separate processes have): parts reach every node and add up the same everywhere;
only the session's key joins a worker's port; a silent, gone or misbehaving peer and the root's
abort end an exchange with the node named."""
import struct
import threading

import numpy as np
import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from glmcpu.net.mesh import HEADER, DATA, Aborted, Mesh, PeerLost


class Node:
    """A mesh node with a context (and, for a worker, a ZAP handler) of its own."""

    def __init__(self, node, n, keypair, timeout=5.0):
        self.ctx = zmq.Context()
        self.auth = None
        self.mesh = Mesh(node, n, keypair, timeout=timeout, ctx=self.ctx)
        if node > 0:
            if keypair is not None:
                self.auth = ThreadAuthenticator(self.ctx)
                self.auth.start()
            self.port = self.mesh.bind("127.0.0.1", self.auth)

    def close(self):
        self.mesh.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def make_mesh(n, keypair, timeout=5.0):
    nodes = [Node(i, n, keypair, timeout) for i in range(n)]
    eps = {i: f"tcp://127.0.0.1:{nodes[i].port}" for i in range(1, n)}
    for i, node in enumerate(nodes):
        node.mesh.connect({j: e for j, e in eps.items() if j > i})
    for i, node in enumerate(nodes):
        if i:
            node.mesh.wait_joined(range(i))
    return nodes


def run_all(nodes, fn):
    """fn(i, mesh) on every node at once; their results (or the exception each raised)."""
    out = [None] * len(nodes)

    def go(i):
        try:
            out[i] = fn(i, nodes[i].mesh)
        except Exception as e:          # handed back to the test
            out[i] = e
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(nodes))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out


@pytest.mark.parametrize("secure", [False, True])
def test_every_node_gets_every_part_and_the_same_sum(secure):
    keypair = zmq.curve_keypair() if secure else None
    nodes = make_mesh(3, keypair)
    parts = [np.random.default_rng(i).standard_normal((2, 64)) for i in range(3)]

    def node(i, mesh):
        sums = []
        for step in (1, 2):
            mesh.begin(step)
            for sync in range(5):
                senders = [0, 1, 2] if sync % 2 == 0 else [1, 2]      # not every node has a part each time
                if i in senders:
                    mesh.send(step, sync, memoryview(parts[i] * (sync + 1)).cast("B"))
                got = mesh.gather(sync, [j for j in senders if j != i], parts[0].nbytes)
                y = sum((parts[i] * (sync + 1)) if j == i else np.frombuffer(got[j]).reshape(2, 64) for j in senders)
                sums.append(y)
        return sums
    try:
        out = run_all(nodes, node)
        for r in out:
            assert not isinstance(r, Exception), r
            for a, b in zip(r, out[0]):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(out[0][0], sum(parts))
    finally:
        for n in nodes:
            n.close()


def test_only_the_session_key_joins_a_worker():
    keypair = zmq.curve_keypair()
    nodes = make_mesh(2, keypair, timeout=1.0)
    ctx = zmq.Context()
    try:
        # a stranger with a key pair of its own, naming itself node 0, sends a part for sync 0
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, b"n0")
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.curve_serverkey = keypair[0]
        s.connect(f"tcp://127.0.0.1:{nodes[1].port}")
        fake = np.full(8, 666.0)
        s.send(HEADER.pack(1, 0, 0, DATA) + fake.tobytes())
        plain = ctx.socket(zmq.DEALER)                  # and one without CurveZMQ at all
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(f"tcp://127.0.0.1:{nodes[1].port}")
        plain.send(HEADER.pack(1, 0, 0, DATA) + fake.tobytes())
        worker = nodes[1].mesh
        worker.begin(1)
        with pytest.raises(PeerLost) as e:              # neither reached it: node 0 sent nothing yet
            worker.gather(0, [0], fake.nbytes)
        assert e.value.node == 0
        real = np.arange(8.0)
        nodes[0].mesh.begin(1)
        nodes[0].mesh.send(1, 0, memoryview(real).cast("B"))
        np.testing.assert_array_equal(np.frombuffer(worker.gather(0, [0], real.nbytes)[0]), real)
        s.close(0)
        plain.close(0)
    finally:
        ctx.term()
        for n in nodes:
            n.close()


def test_silence_a_lost_peer_and_the_roots_abort_name_who():
    nodes = make_mesh(3, None, timeout=0.5)
    try:
        for n in nodes:
            n.mesh.begin(1)
        with pytest.raises(PeerLost) as e:              # node 2 never sends
            nodes[1].mesh.gather(0, [0, 2], 8)
        assert e.value.node == 0 and "did not send" in str(e.value)
        nodes[0].mesh.abort()                           # the root calls the step off
        with pytest.raises(Aborted):
            nodes[2].mesh.gather(0, [1], 8)
        nodes[2].close()                                # a node that is gone: its DEALER peers see it drop
        with pytest.raises(PeerLost) as e:
            nodes[0].mesh.gather(1, [2], 8)
        assert e.value.node == 2
    finally:
        for n in nodes[:2]:
            n.close()


@pytest.mark.parametrize("bad", ["short", "wrong size", "other node's header", "unknown kind"])
def test_malformed_parts_name_the_sender(bad):
    nodes = make_mesh(2, zmq.curve_keypair(), timeout=1.0)
    try:
        root, worker = nodes[0].mesh, nodes[1].mesh
        root.begin(1)
        worker.begin(1)
        dealer = root.dealers[1]
        if bad == "short":
            dealer.send(b"\x01\x02")
        elif bad == "wrong size":
            dealer.send(HEADER.pack(1, 0, 0, DATA) + b"\x00" * 12)
        elif bad == "other node's header":
            dealer.send(HEADER.pack(1, 0, 5, DATA) + b"\x00" * 8)
        else:
            dealer.send(HEADER.pack(1, 0, 0, 77) + b"\x00" * 8)
        with pytest.raises(PeerLost) as e:
            worker.gather(0, [0], 8)
        assert e.value.node == 0
        assert struct.calcsize("<QIHH") == HEADER.size == 16
    finally:
        for n in nodes:
            n.close()
