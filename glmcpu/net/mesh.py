"""One exchange per sync among all the nodes of a cluster: each node sends its part straight to
every other node at once and reads theirs; nobody waits for a request.

Sockets: every node but the root binds a ROUTER; each pair of nodes shares one connection, the
lower-numbered node's DEALER to the higher one's ROUTER, used both ways. CurveZMQ encrypts every
connection with one key pair the root makes for the session and hands its workers over their own
authenticated links; a worker's ROUTER admits only that key (ZAP domain `DOMAIN`), so only nodes of
this session can join. A message is a 16-byte header (step, sync, sender, kind) and the raw bytes
of one part: no msgpack and no per-array objects on this path. Nothing here knows what the bytes
mean; the caller says which nodes' parts it waits for and how long they are."""
import struct
import time

import zmq
import zmq.utils.monitor

from .link import HEARTBEAT_MS, MAX_MESSAGE, _Allowed

HEADER = struct.Struct("<QIHH")        # step, sync, sender node, kind
DATA, JOIN, ABORT = 0, 1, 2
DOMAIN = b"glmcpu-mesh"


class MeshError(Exception):
    """The exchange cannot go on; `node` is the peer at fault (None: not one peer's fault)."""

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node


class PeerLost(MeshError):
    """A peer's part did not come in time, its connection dropped, or it sent something malformed."""


class Aborted(MeshError):
    """The root called the exchange off (it lost a node, and goes on without this mesh)."""


def _identity(node: int) -> bytes:
    return b"n%d" % node


class Mesh:
    """This node's side of the mesh: node numbers 0..n-1, the root being 0."""

    def __init__(self, node: int, n: int, keypair=None, timeout=5.0, ctx=None):
        self.node, self.n, self.keypair, self.timeout = node, n, keypair, timeout
        self.ctx = ctx or zmq.Context.instance()
        self.router = None
        self.dealers = {}               # higher node -> DEALER to its ROUTER
        self.monitors = {}              # monitor socket -> the node whose connection it watches
        self.joined = set()             # lower nodes whose DEALER reached our ROUTER
        self.routes = []                # their identities, in node order
        self.inbox = {}                 # (step, sync, node) -> frame
        self.socks = {}                 # socket we read parts on -> the peer's identity (None: the ROUTER's)
        self.poller = zmq.Poller()
        self.step = 0                   # messages of older steps are dropped

    def _options(self, s):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 20)          # _poll's slice
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        beat = max(100, int(self.timeout * 1000))
        s.setsockopt(zmq.HEARTBEAT_IVL, max(50, min(HEARTBEAT_MS, beat // 4)))
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, beat)

    def bind(self, host: str, auth=None, port="*") -> int:
        """Listen on host (an ephemeral port by default; the port is returned) for the lower nodes;
        auth: the context's ThreadAuthenticator, which then admits only this session's key here."""
        s = self.ctx.socket(zmq.ROUTER)
        self._options(s)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keypair is not None:
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = self.keypair
            s.zap_domain = DOMAIN
            if auth is not None:
                auth.configure_curve_callback(DOMAIN.decode(), _Allowed([self.keypair[0]]))
        s.bind(f"tcp://{host}:{port}")
        self.router = s
        self.socks[s] = None
        self.poller.register(s, zmq.POLLIN)
        return int(s.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    def connect(self, peers: dict):
        """Connect to the higher nodes' ROUTERs ({node: endpoint}) and say who we are."""
        for j, endpoint in sorted(peers.items()):
            s = self.ctx.socket(zmq.DEALER)
            self._options(s)
            s.setsockopt(zmq.ROUTING_ID, _identity(self.node))
            if self.keypair is not None:
                s.curve_publickey, s.curve_secretkey = self.keypair
                s.curve_serverkey = self.keypair[0]
            mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            s.connect(endpoint)
            s.send_multipart([HEADER.pack(0, 0, self.node, JOIN)])
            self.dealers[j] = s
            self.monitors[mon] = j
            self.socks[s] = _identity(j)
            self.poller.register(s, zmq.POLLIN)

    def wait_joined(self, nodes, timeout=None):
        """Until every node in `nodes` (all lower than this one) has connected."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not set(nodes) <= self.joined:
            self._poll(deadline, min(set(nodes) - self.joined))

    def send(self, step: int, sync: int, data):
        """Our part of sync `sync` of step `step` to every other node."""
        msg = HEADER.pack(step, sync, self.node, DATA) + data       # one frame: one seal, one hand-over
        for s in self.dealers.values():
            s.send(msg, copy=False)
        for ident in self.routes:
            try:
                self.router.send_multipart([ident, msg], copy=False)
            except zmq.ZMQError:        # its connection is gone: it will not read this
                raise PeerLost(f"node {_node_of(ident)} is no longer connected", _node_of(ident)) from None

    def abort(self):
        """Call every other node's exchange off (the root, when it gives up on this mesh)."""
        head = HEADER.pack(self.step, 0, self.node, ABORT)
        for s in self.dealers.values():
            try:
                s.send_multipart([head], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for ident in self.routes:
            try:
                self.router.send_multipart([ident, head], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def begin(self, step: int):
        """A new step: parts of older ones (an aborted step's) are dropped."""
        self.step = step
        self.inbox = {k: v for k, v in self.inbox.items() if k[0] >= step}

    def gather(self, sync: int, nodes, nbytes: int) -> dict:
        """{node: buffer} of the parts of `nodes` for this step's sync, each of nbytes."""
        deadline = time.monotonic() + self.timeout
        out = {}
        for j in nodes:
            key = (self.step, sync, j)
            while key not in self.inbox:
                self._poll(deadline, j)
            buf = self.inbox.pop(key)
            if len(buf) != nbytes:
                raise PeerLost(f"node {j} sent {len(buf)} bytes where {nbytes} were due", j)
            out[j] = buf
        return out

    def _poll(self, deadline, waiting_for, slice_ms=20):
        """Read what has come in, waiting up to slice_ms for something; between waits, see whether
        a connection dropped and whether the deadline passed."""
        socks = self.socks
        if len(socks) == 1:                       # two nodes: one socket, a blocking read (no poll)
            sock = next(iter(socks))
            try:
                frames = sock.recv_multipart()                  # RCVTIMEO: slice_ms
            except zmq.Again:
                ready = ()
            else:
                self._take_from(sock, frames)
                ready = (sock,)
        else:
            ready = [s for s, _ in self.poller.poll(slice_ms)]
        for sock in ready:
            while sock.get(zmq.EVENTS) & zmq.POLLIN:
                self._take_from(sock, sock.recv_multipart())
        if ready:
            return
        for mon, j in self.monitors.items():
            while mon.poll(0):
                if zmq.utils.monitor.recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                    raise PeerLost(f"node {j} dropped its connection", j)
        if time.monotonic() >= deadline:
            raise PeerLost(f"node {waiting_for} did not send its part within {self.timeout:g} s", waiting_for)

    def _take_from(self, sock, frames):
        ident = self.socks[sock]
        if ident is None:
            ident, frames = frames[0], frames[1:]
        self._take(ident, frames)

    def _take(self, ident, frames):
        if len(frames) != 1 or len(frames[0]) < HEADER.size:
            raise PeerLost(f"a malformed mesh message from {ident!r}", _node_of(ident))
        buf = memoryview(frames[0])
        step, sync, node, kind = HEADER.unpack_from(buf)
        if ident != _identity(node):
            raise PeerLost(f"node {node}'s header on {ident!r}'s connection", _node_of(ident))
        if kind == JOIN and node < self.node:
            self.joined.add(node)
            self.routes = [_identity(j) for j in sorted(self.joined)]
        elif kind == ABORT and node == 0:
            if step >= self.step:
                raise Aborted("the root called this step off")
        elif kind == DATA:
            if step >= self.step:
                self.inbox[(step, sync, node)] = buf[HEADER.size:]
        else:
            raise PeerLost(f"a malformed mesh message from node {node}", node)

    def close(self):
        for mon in self.monitors:
            mon.close(0)
        for s in self.dealers.values():
            s.disable_monitor()
            s.close(0)
        if self.router is not None:
            self.router.close(0)
        self.dealers, self.monitors, self.router, self.socks = {}, {}, None, {}
        self.poller = zmq.Poller()


def _node_of(ident: bytes):
    try:
        return int(ident[1:])
    except ValueError:
        return None
