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
        self.inbox = {}                 # (step, sync, node) -> frame
        self.poller = zmq.Poller()
        self.step = 0                   # messages of older steps are dropped

    def _options(self, s):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        beat = max(100, int(self.timeout * 1000))
        s.setsockopt(zmq.HEARTBEAT_IVL, max(50, min(HEARTBEAT_MS, beat // 4)))
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, beat)

    def bind(self, host: str, auth=None) -> int:
        """Listen on host (an ephemeral port, returned) for the lower nodes; auth: the context's
        ThreadAuthenticator, which then admits only this session's key here."""
        s = self.ctx.socket(zmq.ROUTER)
        self._options(s)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keypair is not None:
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = self.keypair
            s.zap_domain = DOMAIN
            if auth is not None:
                auth.configure_curve_callback(DOMAIN.decode(), _Allowed([self.keypair[0]]))
        s.bind(f"tcp://{host}:*")
        self.router = s
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
            self.poller.register(s, zmq.POLLIN)
            self.poller.register(mon, zmq.POLLIN)

    def wait_joined(self, nodes, timeout=None):
        """Until every node in `nodes` (all lower than this one) has connected."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not set(nodes) <= self.joined:
            self._poll(deadline, min(set(nodes) - self.joined))

    def send(self, step: int, sync: int, data):
        """Our part of sync `sync` of step `step` to every other node."""
        head = HEADER.pack(step, sync, self.node, DATA)
        for s in self.dealers.values():
            s.send_multipart([head, data], copy=False)
        for j in sorted(self.joined):
            try:
                self.router.send_multipart([_identity(j), head, data], copy=False)
            except zmq.ZMQError:        # its connection is gone: it will not read this
                raise PeerLost(f"node {j} is no longer connected", j) from None

    def abort(self):
        """Call every other node's exchange off (the root, when it gives up on this mesh)."""
        head = HEADER.pack(self.step, 0, self.node, ABORT)
        for s in self.dealers.values():
            try:
                s.send_multipart([head], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for j in self.joined:
            try:
                self.router.send_multipart([_identity(j), head], flags=zmq.NOBLOCK)
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

    def _poll(self, deadline, waiting_for):
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerLost(f"node {waiting_for} did not send its part within {self.timeout:g} s", waiting_for)
        for sock, _ in self.poller.poll(int(left * 1000) + 1):
            if sock in self.monitors:
                j = self.monitors[sock]
                if zmq.utils.monitor.recv_monitor_message(sock)["event"] == zmq.EVENT_DISCONNECTED:
                    raise PeerLost(f"node {j} dropped its connection", j)
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if sock is self.router:
                    ident, frames = bytes(frames[0].buffer), frames[1:]
                else:
                    ident = _identity(next(j for j, s in self.dealers.items() if s is sock))
                self._take(ident, frames)

    def _take(self, ident, frames):
        if not frames or len(frames[0].buffer) != HEADER.size or len(frames) > 2:
            raise PeerLost(f"a malformed mesh message from {ident!r}", _node_of(ident))
        step, sync, node, kind = HEADER.unpack(frames[0].buffer)
        if ident != _identity(node):
            raise PeerLost(f"node {node}'s header on {ident!r}'s connection", _node_of(ident))
        if kind == JOIN and node < self.node:
            self.joined.add(node)
        elif kind == ABORT and node == 0:
            if step >= self.step:
                raise Aborted("the root called this step off")
        elif kind == DATA and len(frames) == 2:
            if step >= self.step:
                self.inbox[(step, sync, node)] = frames[1].buffer
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
        self.dealers, self.monitors, self.router = {}, {}, None


def _node_of(ident: bytes):
    try:
        return int(ident[1:])
    except ValueError:
        return None
