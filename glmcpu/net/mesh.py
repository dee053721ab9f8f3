"""One exchange per sync among all the nodes of a cluster: each node sends its part straight to
every other node at once and reads theirs; nobody waits for a request.

Raw TCP, one connection per pair of nodes (the lower-numbered node connects to the higher one's
port), used both ways. Parts are written and read by the computing thread itself: no I/O thread
and no message framework between a part and the kernel (ZeroMQ's cost ~150 us more a sync on a
busy core here: tools/bench_sync.py). ZeroMQ + CurveZMQ stays the protocol for control, loads and
faults; the root makes a fresh AES-256-GCM key for each mesh and hands it to its workers over those
authenticated, encrypted links, so the mesh is keyed from the CurveZMQ sessions.

A frame is a 6-byte prefix (body length, sender node), then the body: a 16-byte header (step,
sync, sender, kind) and the raw bytes of one part, sealed with AES-GCM (the prefix authenticated
with it; the nonce is sender, receiver and a per-direction counter, so a frame cannot be replayed,
reordered or passed off as another node's). A connection's first frame must be a JOIN that opens
with the session's key; anything else, and a stranger, is dropped. Without a key (--insecure)
frames travel in plain text. Nothing here knows what the bytes mean: the caller says which nodes'
parts it waits for and how long they are."""
import os
import select
import socket
import struct
import time

HEADER = struct.Struct("<QIHH")        # step, sync, sender node, kind
PREFIX = struct.Struct("<IH")          # body length, sender node
NONCE = struct.Struct("<HHQ")          # sender, receiver, frame counter (12 bytes)
DATA, JOIN, ABORT = 0, 1, 2
TAG = 16                               # AES-GCM's tag
MAX_BODY = 1 << 30
SLICE = 0.02                           # seconds between looks at the deadline
# seconds a node polls without sleeping before it blocks, at each gather: a core put to sleep takes
# an interrupt to wake (in a VM, an exit), which cost 25 us of the 60 a sync took on loopback (the
# parts of two busy pinned nodes of GLM-4-9B, median: 58 us blocking, 34 spinning). It yields at
# each look, so nodes that share a core still take turns.
SPIN = 0.002
_yield = getattr(os, "sched_yield", lambda: None)


class MeshError(Exception):
    """The exchange cannot go on; `node` is the peer at fault (None: not one peer's fault)."""

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node


class PeerLost(MeshError):
    """A peer's part did not come in time, its connection dropped, or it sent something malformed."""


class Aborted(MeshError):
    """The root called the exchange off (it lost a node, and goes on without this mesh)."""


def _sealer(key):
    if key is None:
        return None
    if not isinstance(key, bytes) or len(key) != 32:
        raise ValueError("a mesh key is 32 bytes")
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise MeshError("an encrypted mesh needs the `cryptography` package (pip install cryptography)") from None
    return AESGCM(key)


class Peer:
    """One connection: its socket, what is still to be written, what has been read so far."""

    def __init__(self, sock, node=None):
        self.sock, self.node = sock, node
        self.out = []                  # buffers still to write
        self.prefix = bytearray(PREFIX.size)
        self.got = 0                   # bytes of the prefix, then of the body, read so far
        self.body = None               # the frame being read, once its prefix is in
        self.sent = self.received = 0  # frames each way (the nonces' counters)
        self.lost = None               # why the connection ended, once it has (read to its end first)


class Mesh:
    """This node's side of the mesh: node numbers 0..n-1, the root being 0."""

    def __init__(self, node: int, n: int, key=None, timeout=5.0):
        self.node, self.n, self.timeout = node, n, timeout
        self.aead = _sealer(key)
        self.listener = None
        self.peers = {}                 # node -> Peer
        self.strangers = []             # accepted connections that have not said who they are
        self.inbox = {}                 # (step, sync, node) -> part bytes
        self.step = 0                   # parts of older steps are dropped
        self._spin_until = 0.0          # gather polls without sleeping until then
        self.bytes_out = self.bytes_in = 0

    # ---- setting up ------------------------------------------------------------------------

    def bind(self, host: str, port=0) -> int:
        """Listen on host (an ephemeral port by default; the port is returned) for the lower nodes."""
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]") if host != "*" else "", port))
        s.listen(64)
        s.setblocking(False)
        self.listener = s
        return s.getsockname()[1]

    def connect(self, peers: dict):
        """Connect to the higher nodes' ports ({node: "tcp://host:port"}) and say who we are."""
        for j, endpoint in sorted(peers.items()):
            host, port = endpoint.split("://", 1)[-1].rsplit(":", 1)
            try:
                s = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout)
            except OSError as e:
                raise PeerLost(f"cannot reach node {j} at {endpoint} ({e})", j) from None
            self._ready(s)
            peer = self.peers[j] = Peer(s, j)
            self._queue(peer, JOIN, 0, 0)
        self._flush(time.monotonic() + self.timeout)

    def wait_joined(self, nodes, timeout=None):
        """Until every node in `nodes` (all lower than this one) has connected and proved it holds
        the session's key; strangers are dropped. Then the port is closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        want = set(nodes)
        while not want <= set(self.peers):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = min(want - set(self.peers))
                raise PeerLost(f"node {missing} did not join the mesh within {self.timeout:g} s", missing)
            socks = [self.listener] + [p.sock for p in self.strangers]
            ready, _, _ = select.select(socks, [], [], min(left, SLICE))
            for s in ready:
                if s is self.listener:
                    try:
                        c, _ = s.accept()
                    except OSError:
                        continue
                    self._ready(c)
                    self.strangers.append(Peer(c))
                else:
                    self._introduce(next(p for p in self.strangers if p.sock is s))
        for p in self.strangers:
            p.sock.close()
        self.strangers = []
        self.listener.close()
        self.listener = None

    def _introduce(self, p):
        """A new connection's first frame: a JOIN of a lower node not yet here, sealed with the
        session's key; anything else closes it."""
        try:
            frames = self._read(p)
            if not frames:
                return self._drop(p) if p.lost else None     # gone, or not a whole frame yet
            sender, *frame = frames[0]
            step, sync, node, kind, _ = self._open(p, sender, frame)
        except MeshError:
            return self._drop(p)
        if kind != JOIN or node >= self.node or node in self.peers:
            return self._drop(p)
        p.node = sender
        self.peers[sender] = p
        self.strangers.remove(p)
        for sender, *frame in frames[1:]:
            self._take(p, sender, frame)

    def _drop(self, p):
        self.strangers.remove(p)
        p.sock.close()

    @staticmethod
    def _ready(s):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)

    # ---- exchanging ------------------------------------------------------------------------

    def begin(self, step: int):
        """A new step: parts of older ones (an aborted step's) are dropped."""
        self.step = step
        self.inbox = {k: v for k, v in self.inbox.items() if k[0] >= step}

    def send(self, step: int, sync: int, data):
        """Our part of sync `sync` of step `step` to every other node (written as the sockets take
        it: while we wait for the others' parts, what is left goes out)."""
        for p in self.peers.values():
            self._queue(p, DATA, step, sync, data)
        for p in self.peers.values():
            self._write(p)

    def gather(self, sync: int, nodes, nbytes: int) -> dict:
        """{node: bytes} of the parts of `nodes` for this step's sync, each of nbytes."""
        deadline = time.monotonic() + self.timeout
        self._spin_until = time.monotonic() + SPIN
        out = {}
        for j in nodes:
            key = (self.step, sync, j)
            while key not in self.inbox:
                self._poll(deadline, j)
            buf = self.inbox.pop(key)
            if len(buf) != nbytes:
                raise PeerLost(f"node {j} sent {len(buf)} bytes where {nbytes} were due", j)
            out[j] = buf
        while True:           # and ours all handed to the kernel: nobody polls for us once we go on
            waiting = [p.node for p in self.peers.values() if p.out]
            if not waiting:
                return out
            self._poll(deadline, waiting[0], "takes nothing in")

    def abort(self):
        """Call every other node's exchange off (the root, when it gives up on this mesh)."""
        for p in self.peers.values():
            try:
                self._queue(p, ABORT, self.step, 0)
                self._write(p)
            except MeshError:
                pass

    def _poll(self, deadline, waiting_for, what="did not send its part"):
        """Read what has come in and write what is waiting to go, for up to SLICE seconds. A lost
        peer fails the exchange only once we wait on it."""
        peer = self.peers.get(waiting_for)
        if peer is None:
            raise PeerLost(f"node {waiting_for} is not in this mesh", waiting_for)
        if peer.lost is not None:
            raise PeerLost(peer.lost, waiting_for)
        root = self.peers.get(0)
        if root is not None and root.lost is not None:      # no root, no step
            raise PeerLost(root.lost, 0)
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerLost(f"node {waiting_for} {what} within {self.timeout:g} s", waiting_for)
        readers = [p.sock for p in self.peers.values() if p.lost is None]
        writers = [p.sock for p in self.peers.values() if p.out and p.lost is None]
        if time.monotonic() < self._spin_until:
            _yield()
            r, w, _ = select.select(readers, writers, [], 0)
        else:
            r, w, _ = select.select(readers, writers, [], min(left, SLICE))
        by_sock = {p.sock: p for p in self.peers.values()}
        for s in w:
            self._write(by_sock[s])
        for s in r:
            p = by_sock[s]
            for sender, *frame in self._read(p):
                self._take(p, sender, frame)

    def _flush(self, deadline):
        while any(p.out or p.lost for p in self.peers.values()):
            lost = next((p for p in self.peers.values() if p.lost), None)
            if lost is not None:
                raise PeerLost(lost.lost, lost.node)
            if time.monotonic() > deadline:
                j = next(p.node for p in self.peers.values() if p.out)
                raise PeerLost(f"node {j} takes nothing in", j)
            writers = [p.sock for p in self.peers.values() if p.out]
            _, w, _ = select.select([], writers, [], SLICE)
            for p in self.peers.values():
                if p.sock in w:
                    self._write(p)

    # ---- frames ------------------------------------------------------------------------------

    def _queue(self, p, kind, step, sync, data=b""):
        if p.lost is not None:           # gone: nothing more goes to it
            return
        head = HEADER.pack(step, sync, self.node, kind)
        prefix = PREFIX.pack(len(head) + len(data) + (TAG if self.aead else 0), self.node)
        if self.aead is None:
            p.out += [prefix, head, data] if len(data) else [prefix, head]
        else:
            p.out += [prefix, self.aead.encrypt(NONCE.pack(self.node, p.node, p.sent), head + data, prefix)]
        p.sent += 1

    def _write(self, p):
        """Hand what is waiting for p to the kernel, as much as it takes now (one sendmsg). A
        connection that failed sets p.lost (what was still to go to it is dropped)."""
        while p.out and p.lost is None:
            try:
                n = p.sock.sendmsg(p.out[:64])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                p.out = []
                for sender, *frame in self._read(p):      # what it sent before the end counts (an ABORT)
                    self._take(p, sender, frame)
                p.lost = p.lost or f"node {p.node}'s connection failed ({e.strerror or e})"
                return
            self.bytes_out += n
            while n:
                first = p.out[0]
                if n >= len(first):
                    n -= len(first)
                    p.out.pop(0)
                else:
                    p.out[0] = memoryview(first)[n:]
                    return

    def _read(self, p) -> list:
        """The whole frames that have come in on p: [(sender, prefix, body)], each read straight
        into a buffer of its own. A connection that ends sets p.lost: what came before its end is
        taken all the same (a peer that sent its last part and then died did send it)."""
        frames = []
        while p.lost is None:
            if p.body is None:
                view, want = memoryview(p.prefix)[p.got:], PREFIX.size
            else:
                view, want = memoryview(p.body)[p.got:], len(p.body)
            try:
                n = p.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return frames
            except OSError as e:
                p.lost = f"node {p.node}'s connection failed ({e.strerror or e})"
                break
            if n == 0:
                p.lost = f"node {p.node} closed its connection"
                break
            p.got += n
            self.bytes_in += n
            if p.got < want:
                continue
            p.got = 0
            if p.body is None:
                length, sender = PREFIX.unpack_from(p.prefix)
                least = HEADER.size + (TAG if self.aead else 0)
                if length > (MAX_BODY if p.node is not None else least) or length < least or (
                        p.node is not None and sender != p.node):     # a stranger sends one JOIN, no more
                    raise PeerLost(f"a malformed frame from node {p.node}", p.node)
                p.body = bytearray(length)
            else:
                frames.append((PREFIX.unpack_from(p.prefix)[1], bytes(p.prefix), p.body))
                p.body = None
        return frames

    def _open(self, p, sender, frame):
        """(step, sync, node, kind, part) of a frame (prefix, body) from `sender`."""
        prefix, body = frame
        if self.aead is not None:
            from cryptography.exceptions import InvalidTag
            try:
                body = self.aead.decrypt(NONCE.pack(sender, self.node, p.received), body, prefix)
            except InvalidTag:
                raise PeerLost(f"a frame from node {sender} does not open with the session's key", sender) from None
        p.received += 1
        step, sync, node, kind = HEADER.unpack_from(body)
        if node != sender:
            raise PeerLost(f"node {node}'s header on node {sender}'s connection", sender)
        return step, sync, node, kind, memoryview(body)[HEADER.size:]

    def _take(self, p, sender, frame):
        step, sync, node, kind, part = self._open(p, sender, frame)
        if kind == ABORT and node == 0:
            if step >= self.step:
                raise Aborted("the root called this step off")
        elif kind == DATA:
            if step >= self.step:
                self.inbox[(step, sync, node)] = part
        else:
            raise PeerLost(f"a malformed frame from node {node}", node)

    def close(self):
        for p in list(self.peers.values()) + self.strangers:
            try:
                p.sock.close()
            except OSError:
                pass
        if self.listener is not None:
            self.listener.close()
        self.peers, self.strangers, self.listener = {}, [], None


def new_key() -> bytes:
    """A fresh AES-256-GCM key for one mesh."""
    return os.urandom(32)

