"""ZeroMQ links between a root and its workers: CurveZMQ-encrypted and authenticated by default.

A worker (`Server`) answers one request at a time on a ROUTER socket and never dies on a bad
message; a root (`Client`) talks to one worker over a DEALER socket with a deadline per request.
Keys are CurveZMQ key pairs in Z85 text files made by `keygen`."""
import os
import time

import zmq
import zmq.auth
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from .protocol import MAX_ARRAYS, ProtocolError, pack, unpack

MAX_MESSAGE = 1 << 30          # bytes of one frame: ZeroMQ drops a peer that sends a bigger one
MAX_TOTAL = 1 << 30            # bytes of all the frames of one message
MAX_FRAMES = MAX_ARRAYS + 2    # routing id, header, arrays
HEARTBEAT_MS = 1000            # ZMTP pings on idle links; a peer silent for 5 beats is dropped


def _common(sock):
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * HEARTBEAT_MS)


class LinkError(Exception):
    """A worker that cannot be reached, does not answer in time, or answers with an error (whose
    kind the worker named: `kind`)."""
    kind = None


class LinkLost(LinkError):
    """No answer will come: the peer did not answer in time, or its connection dropped while it
    held our request (killed, or stopped: its heartbeats ceased)."""


def keygen(path: str) -> str:
    """Write a key pair: PATH (secret, mode 600 from its first byte, even over an existing file)
    and PATH.pub (public, to give to the other side)."""
    public, secret = zmq.curve_keypair()
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"public = {public.decode()}\nsecret = {secret.decode()}\n")
        os.replace(tmp, path)              # a new file: an old one's wider mode does not carry over
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with open(path + ".pub", "w") as f:
        f.write(public.decode() + "\n")
    return public.decode()


def load_keypair(path: str) -> tuple:
    """The (public, secret) pair of a `glmcpu keygen` file; refused, as ssh refuses its keys,
    when others may read it."""
    if os.name == "posix":
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            raise LinkError(f"{path} holds a secret key but others may read it (mode {mode:o}): "
                            f"run `chmod 600 {path}`, or make a new pair with `glmcpu keygen`")
    with open(path) as f:
        text = f.read()
    vals = {}
    for line in text.splitlines():
        k, _, v = line.partition("=")             # Z85 keys may hold "=": only the first splits
        vals[k.strip()] = v.strip().encode()
    if not {"public", "secret"} <= set(vals):
        words = text.split()
        hint = (" (it looks like a public .pub file: give the secret file keygen wrote beside it)"
                if len(words) == 1 and len(words[0]) == 40 else "")
        raise LinkError(f"{path} is not a glmcpu key file{hint}; make one with `glmcpu keygen`")
    if len(vals["public"]) != 40 or len(vals["secret"]) != 40:
        raise LinkError(f"{path}: its keys are not 40 Z85 characters; make a new pair with `glmcpu keygen`")
    return vals["public"], vals["secret"]


def load_public(path_or_key: str) -> bytes:
    """A public key given inline (40 Z85 characters) or as a .pub file."""
    if len(path_or_key) == 40 and not os.path.exists(path_or_key):
        return path_or_key.encode()
    with open(path_or_key) as f:
        words = f.read().split()
    if not words or len(words[0]) != 40:
        raise LinkError(f"{path_or_key} holds no public key (40 characters, as in a .pub file from `glmcpu keygen`)")
    return words[0].encode()


class _Allowed:
    def __init__(self, keys):
        self.keys = set(keys)

    def callback(self, domain, key):
        return zmq.utils.z85.encode(key) in self.keys if len(key) == 32 else key in self.keys


class Server:
    """Binds `endpoint`; `handler(op, meta, arrays) -> (meta, arrays)` answers each request."""

    def __init__(self, endpoint, handler, keypair=None, allowed=(), ctx=None):
        self.ctx = ctx or zmq.Context()
        self.handler = handler
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        _common(self.sock)
        if keypair is not None:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", _Allowed(allowed))
            self.sock.curve_publickey, self.sock.curve_secretkey = keypair
            self.sock.curve_server = True
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise LinkError(f"cannot listen on {endpoint}: {e}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bound_port = not endpoint.rstrip("/").endswith((":*", ":0"))     # a port chosen by the user
        self.served = self.refused = 0

    def serve(self, stop=lambda: False, poll_ms=200):
        """Answer requests until stop() is true; malformed ones get an error reply."""
        while not stop():
            if not self.sock.poll(poll_ms):
                continue
            try:
                frames, too_big = self._receive()
            except zmq.ZMQError:
                continue
            ident, body = frames[0], [f.buffer for f in frames[1:]]
            try:
                if too_big:
                    raise ProtocolError(f"message over {MAX_FRAMES} frames or {MAX_TOTAL >> 20} MiB")
                op, meta, arrays = unpack(body)
                rmeta, rarrays = self.handler(op, meta, arrays)
                reply = pack("ok", rmeta, rarrays)
                self.served += 1
            except ProtocolError as e:
                self.refused += 1
                reply = pack("error", {"kind": e.kind, "message": str(e)})
            except Exception as e:             # a handler bug must not take the worker down
                self.refused += 1
                reply = pack("error", {"kind": type(e).__name__, "message": str(e)[:500]})
            try:
                self.sock.send_multipart([ident] + reply)
            except zmq.ZMQError:
                pass
            frames = body = meta = arrays = reply = rarrays = None     # a large message is not kept until the next

    def _receive(self):
        """One message, frame by frame: past MAX_FRAMES frames or MAX_TOTAL bytes the rest is read
        and dropped at once, never kept (ZeroMQ hands over a message only when all of it has
        arrived, each frame within MAX_MESSAGE)."""
        frames, total, too_big = [], 0, False
        while True:
            f = self.sock.recv(copy=False)
            total += len(f.buffer)
            if len(frames) >= MAX_FRAMES or total > MAX_TOTAL:
                too_big = True
            else:
                frames.append(f)
            if not f.more:
                return frames, too_big

    def close(self):
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()


class Client:
    """One worker seen from the root. `request` raises LinkError on an error reply, LinkLost when
    no answer will come: past the deadline, or at once when the connection drops meanwhile (a
    killed peer closes it; a stopped one misses its heartbeats for `timeout` seconds), so a long
    request (a load) waits on a live worker as long as it needs, and not on a dead one."""

    def __init__(self, endpoint, keypair=None, server_key=None, timeout=5.0, ctx=None):
        self.endpoint, self.timeout = endpoint, timeout
        self.ctx = ctx or zmq.Context.instance()
        self.keypair, self.server_key = keypair, server_key
        self.sent = self.received = self.round_trips = 0
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.DEALER)
        _common(self.sock)
        beat = max(100, int(self.timeout * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, beat // 4))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, beat)
        if self.keypair is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = self.keypair
            self.sock.curve_serverkey = self.server_key
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()                # made once: recv runs per module and token
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        # a send waits this long at most for a connection (a DEALER whose handshakes keep failing,
        # a wrong key or plain text against CurveZMQ, may have none to queue the message on)
        self.sock.setsockopt(zmq.SNDTIMEO, max(100, int(self.timeout * 1000)))
        self.sock.connect(self.endpoint)
        self.pending = False

    def _dropped(self, wait_ms=0) -> bool:
        """Whether the connection dropped (events queued since the last look)."""
        dropped = False
        while self.monitor.poll(wait_ms):
            wait_ms = 0
            if zmq.utils.monitor.recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                dropped = True
        return dropped

    def send(self, op, meta=None, arrays=()):
        if self.pending:                          # a reply we gave up on: start clean
            self.reset()
        self._dropped()                           # drops before this request are not its loss
        frames = pack(op, meta, arrays)
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise LinkLost(f"{self.endpoint} took no connection within {self.timeout:g} s (gone, or our key "
                           "refused)") from None
        self.sent += sum(len(f) for f in frames)
        self.pending = True

    def recv(self, timeout=None):
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            ready = dict(self.poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if self.sock not in ready:
                if self.monitor in ready and self._dropped():
                    raise LinkLost(f"{self.endpoint} dropped the connection before answering (stopped, gone, or our key refused)")
                if time.monotonic() >= deadline:
                    raise LinkLost(f"{self.endpoint} did not answer within {limit:g} s")
                continue
            frames = self.sock.recv_multipart(copy=False)
            self.pending = False
            self.received += sum(len(f.buffer) for f in frames)
            self.round_trips += 1
            try:
                op, meta, arrays = unpack([f.buffer for f in frames])
            except ProtocolError as e:
                raise LinkError(f"{self.endpoint} sent a malformed reply ({e})") from None
            if op == "error":
                err = LinkError(f"{self.endpoint}: {meta.get('kind')}: {meta.get('message')}")
                err.kind = meta.get("kind")
                raise err
            return meta, arrays

    def request(self, op, meta=None, arrays=(), timeout=None):
        self.send(op, meta, arrays)
        return self.recv(timeout)

    def reset(self):
        self.close()
        self._connect()

    def close(self):
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


class Keepalive:
    """A thread that tells each endpoint `op` (with meta) every `every` seconds, on sockets of
    its own, without waiting for answers: a worker that hears nothing from its root for a while
    may serve another."""

    def __init__(self, endpoints, keypair, server_key, op, meta, every=1.0):
        import threading
        self.frames = pack(op, meta)
        self.every = every
        self.stopped = threading.Event()
        self.ctx = zmq.Context.instance()
        self.socks = []
        for e in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            _common(s)
            s.setsockopt(zmq.SNDHWM, 4)
            if keypair is not None:
                s.curve_publickey, s.curve_secretkey = keypair
                s.curve_serverkey = server_key
            s.connect(e)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._run, daemon=True, name="glmcpu-keepalive")
        self.thread.start()

    def _run(self):
        while not self.stopped.wait(self.every):
            for s in self.socks:
                try:
                    while s.poll(0):
                        s.recv_multipart()
                    s.send_multipart(self.frames, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for s in self.socks:
            s.close(0)

    def stop(self):
        self.stopped.set()
