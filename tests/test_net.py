"""The net layer alone (no model): framing, CurveZMQ keys, and a server that survives garbage."""
import os
import threading

import msgpack
import numpy as np
import pytest
import zmq

from glmcpu.net.link import Client, LinkError, Server, keygen, load_keypair, load_public
from glmcpu.net.protocol import VERSION, ProtocolError, pack, unpack


def handler(op, meta, arrays):
    if op == "add":
        return {"n": len(arrays)}, [arrays[0] + arrays[1]]
    if op == "ping":
        return {"pong": meta.get("x")}, []
    raise ProtocolError(f"unknown op {op!r}")


@pytest.fixture
def keys(tmp_path):
    for name in ("worker", "root", "stranger"):
        keygen(str(tmp_path / name))
    return {n: load_keypair(str(tmp_path / n)) for n in ("worker", "root", "stranger")}, tmp_path


def start(keypair=None, allowed=()):
    stop = threading.Event()
    srv = Server("tcp://127.0.0.1:*", handler, keypair=keypair, allowed=allowed)
    t = threading.Thread(target=srv.serve, kwargs={"stop": stop.is_set, "poll_ms": 20}, daemon=True)
    t.start()

    def finish():
        stop.set()
        t.join(5)
        srv.close()
    return srv, finish


def test_roundtrip_and_arrays():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    op, meta, arrays = unpack(pack("add", {"k": [1, "x"]}, [a, a.astype(np.float16)]))
    assert op == "add" and meta == {"k": [1, "x"]}
    assert np.array_equal(arrays[0], a) and arrays[1].dtype == np.float16


@pytest.mark.parametrize("frames,words", [
    ([b"\xc1\xff\x00"], "bad header"),
    ([msgpack.packb([1, 2])], "not a glmcpu header"),
    ([msgpack.packb({"v": 99, "op": "x", "meta": {}, "arrays": []})], "version"),
    ([msgpack.packb({"v": VERSION, "op": "x", "meta": {}, "arrays": [["f32", [4]]]}), b"\x00" * 8], "does not match"),
    ([msgpack.packb({"v": VERSION, "op": "x", "meta": {}, "arrays": [["obj", [1]]]}), b"\x00"], "bad array"),
    ([msgpack.packb({"v": VERSION, "op": "x", "meta": {}, "arrays": []}), b"extra"], "carries"),
    ([msgpack.packb({"v": VERSION, "op": "x", "meta": msgpack.ExtType(1, b"boom"), "arrays": []})], "extension"),
])
def test_malformed_frames_are_refused(frames, words):
    with pytest.raises(ProtocolError, match=words):
        unpack(frames)


def test_server_survives_garbage_then_serves(keys):
    (k, _) = keys
    srv, finish = start(k["worker"], [k["root"][0]])
    try:
        good = Client(srv.endpoint, k["root"], k["worker"][0], timeout=5)
        rng = np.random.default_rng(0)
        raw = good.ctx.socket(zmq.DEALER)
        raw.curve_publickey, raw.curve_secretkey = k["root"]
        raw.curve_serverkey = k["worker"][0]
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(srv.endpoint)
        bad = [[rng.bytes(int(n))] for n in rng.integers(0, 300, 20)]
        bad += [[msgpack.packb({"v": VERSION, "op": "nope", "meta": {}, "arrays": []})],
                [msgpack.packb({"v": VERSION, "op": "add", "meta": {}, "arrays": [["f32", [2]]]}), b"1234"]]
        for frames in bad:
            raw.send_multipart(frames)
            assert raw.poll(5000), "the worker stopped answering"
            reply = raw.recv_multipart()
            assert unpack(reply)[0] == "error"
        raw.close()
        with pytest.raises(LinkError, match="unknown op"):
            good.request("frobnicate")
        meta, (s,) = good.request("add", {}, [np.ones(3, np.float32), np.ones(3, np.float32)])
        assert np.array_equal(s, [2, 2, 2]) and srv.refused >= len(bad)
        good.close()
    finally:
        finish()


def test_oversize_message_is_dropped_not_fatal(keys, monkeypatch):
    import glmcpu.net.link as link
    monkeypatch.setattr(link, "MAX_MESSAGE", 1 << 16)
    (k, _) = keys
    srv, finish = start(k["worker"], [k["root"][0]])
    try:
        c = Client(srv.endpoint, k["root"], k["worker"][0], timeout=1)
        with pytest.raises(LinkError):          # ZeroMQ drops the peer that sent too much
            c.request("add", {}, [np.ones(1 << 15, np.float32), np.ones(1 << 15, np.float32)])
        c.close()
        c = Client(srv.endpoint, k["root"], k["worker"][0], timeout=5)
        assert c.request("ping", {"x": 3})[0] == {"pong": 3}
        c.close()
    finally:
        finish()


def test_unlisted_key_and_plaintext_are_refused(keys):
    (k, folder) = keys
    srv, finish = start(k["worker"], [k["root"][0]])
    try:
        stranger = Client(srv.endpoint, k["stranger"], k["worker"][0], timeout=1)
        with pytest.raises(LinkError, match="did not answer|key refused"):
            stranger.request("ping")
        plain = Client(srv.endpoint, timeout=1)
        with pytest.raises(LinkError, match="did not answer|key refused"):
            plain.request("ping")
        wrong_server = Client(srv.endpoint, k["root"], k["stranger"][0], timeout=1)
        with pytest.raises(LinkError, match="did not answer|key refused"):   # the root checks the worker's key
            wrong_server.request("ping")
        ok = Client(srv.endpoint, k["root"], load_public(str(folder / "worker.pub")), timeout=5)
        assert ok.request("ping", {"x": "hi"})[0] == {"pong": "hi"}
        for c in (stranger, plain, wrong_server, ok):
            c.close()
        assert srv.served == 1
        assert oct(os.stat(folder / "root").st_mode & 0o777) == "0o600"
    finally:
        finish()


def test_insecure_mode_works_without_keys():
    srv, finish = start()
    try:
        c = Client(srv.endpoint, timeout=5)
        assert c.request("ping", {"x": 1})[0] == {"pong": 1}
        assert c.round_trips == 1 and c.sent > 0 and c.received > 0
        c.close()
    finally:
        finish()


def test_too_many_frames_or_bytes_are_dropped_as_they_are_read(monkeypatch):
    import glmcpu.net.link as link
    monkeypatch.setattr(link, "MAX_TOTAL", 1 << 16)
    srv, finish = start()
    try:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(srv.endpoint)
        for frames in ([b"h"] * 200, [msgpack.packb({"v": VERSION, "op": "add", "meta": {}, "arrays": [["u8", [1 << 15]]] * 3})]
                       + [b"\x00" * (1 << 15)] * 3):
            raw.send_multipart(frames)
            assert raw.poll(5000)
            op, meta, _ = unpack(raw.recv_multipart())
            assert op == "error" and "frames or" in meta["message"]
        raw.close()
        c = Client(srv.endpoint, timeout=5)
        assert c.request("ping", {"x": 2})[0] == {"pong": 2}
        c.close()
    finally:
        finish()


def test_keygen_over_a_readable_file_leaves_a_private_secret(tmp_path):
    path = tmp_path / "key"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    keygen(str(path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_keypair(str(path))[0] == (tmp_path / "key.pub").read_text().split()[0].encode()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("mistake,words", [
    ("readable", "chmod 600"),               # a secret others may read, as ssh refuses it
    ("pub", "public .pub"),                  # the .pub file given as --key
    ("garbage", "not a glmcpu key file"),
    ("short", "40 Z85"),
])
def test_key_file_mistakes_are_one_line(tmp_path, mistake, words):
    keygen(str(tmp_path / "k"))
    path = tmp_path / "k"
    if mistake == "readable":
        os.chmod(path, 0o640)
    elif mistake == "pub":                   # Z85 keys may hold "=": make sure some do
        while "=" not in (tmp_path / "k.pub").read_text():
            keygen(str(tmp_path / "k"))
        path = tmp_path / "k.pub"
        os.chmod(path, 0o600)
    elif mistake == "garbage":
        path.write_text("hello\n")
    else:
        path.write_text("public = abc\nsecret = def\n")
    with pytest.raises(LinkError, match=words) as e:
        load_keypair(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "\n", "short\n"])
def test_allow_file_without_a_key_is_one_line(tmp_path, text):
    path = tmp_path / "root.pub"
    path.write_text(text)
    with pytest.raises(LinkError, match="holds no public key"):
        load_public(str(path))


def test_a_port_in_use_or_a_bad_bind_is_one_line():
    first = Server("tcp://127.0.0.1:0", handler)
    try:
        with pytest.raises(LinkError, match="cannot listen on"):
            Server(first.endpoint, handler)
        with pytest.raises(LinkError, match="cannot listen on"):
            Server("tcp://no-such-interface-xyz:1", handler)
    finally:
        first.close()


@pytest.mark.parametrize("transport", ["zmq-curve", "tcp-aesgcm", "star"])
def test_bench_sync_exchanges_rows(transport):
    """tools/bench_sync.py: two processes exchange rows over each transport (a few syncs, not a
    timing; speed lives in the tool): every sum is the two rows', one time per sync."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import bench_sync
    got = bench_sync.measure(transport, 256, "f64", 20, 3)
    assert got is not None
    times, sums_right = got
    assert sums_right and times.shape == (20,) and np.all(times > 0)


def test_top_values_travel_and_bad_ones_are_refused():
    """encode_top/decode_top: each row's k best with ties by the lower column, -inf elsewhere; a
    matrix with NaN travels whole; wrong dtypes, shapes or columns are a ProtocolError."""
    from glmcpu.net.wire import decode_top, encode_top
    x = np.array([[1, 5, 5, 2, 5], [0, -1, 3, 3, 2]], np.float32)
    v, c = encode_top(x, 2)
    assert c.tolist() == [[1, 2], [2, 3]] and v.tolist() == [[5, 5], [3, 3]]
    y = decode_top([v, c], 5, 2, 2)
    assert y.tolist() == [[-np.inf, 5, 5, -np.inf, -np.inf], [-np.inf, -np.inf, 3, 3, -np.inf]]
    nan = x.copy()
    nan[0, 0] = np.nan
    assert len(encode_top(nan, 2)) == 1 and np.isnan(decode_top(encode_top(nan, 2), 5, 2, 2)[0, 0])
    for bad in ([v, c + 3], [v, -c], [v.astype(np.float64), c], [v, c.astype(np.int64)], [v[:, :1], c[:, :1]],
                [v, c, c], [v[:0], c[:0]]):
        with pytest.raises(ProtocolError):
            decode_top(bad, 5, 2, 2)


@pytest.mark.parametrize("codec", ["f64", "f32", "f16", "q8_0"])
def test_a_matrix_in_one_buffer(codec):
    """to_bytes/from_bytes (a mesh part in one frame): packed_size bytes, the codec's values back
    (f64 exactly, the others as encode/decode round them), a wrong size refused."""
    from glmcpu.net.wire import decode, encode, from_bytes, packed_size, to_bytes
    x = np.random.default_rng(0).standard_normal((3, 64))
    buf = to_bytes(x, codec)
    assert len(buf) == packed_size(codec, 3, 64)
    y = from_bytes(buf, codec, 3, 64)
    want = x if codec == "f64" else decode(encode(x.astype(np.float32), codec), codec, 64, 3)
    np.testing.assert_array_equal(y, want)
    with pytest.raises(ProtocolError):
        from_bytes(bytes(buf)[:-1], codec, 3, 64)


def _q8_reference(x):
    """The Q8_0 wire in NumPy (what the kernels must give bit for bit): fp16 scales of max / 127,
    values x * (1 / d) rounded half to even and clipped, all in float32."""
    T, n = x.shape
    b = x.reshape(T, n // 32, 32)
    d = (np.abs(b).max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)
    inv = np.divide(1.0, df, out=np.zeros_like(df), where=df > 0)
    q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int8).reshape(T, n)
    back = (q.reshape(T, -1, 32).astype(np.float32) * df[..., None]).reshape(T, n)
    return q, d, back


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_q8_0_wire_kernels_match_numpy():
    """wire.encode's and from_bytes' Q8_0 loops against the NumPy reference, bit for bit: ordinary
    blocks, a zero block, halves that round to even, scales that fall to fp16 zero or overflow to
    infinity (both send zeros; the latter reads back as NaN, past any model's activations),
    float64 partial sums."""
    from glmcpu.net.wire import encode, from_bytes, to_bytes
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 512)) * np.exp(rng.uniform(-8, 8, (4, 1)))).astype(np.float32)
    x[0, :32] = 0
    x[1, 32:64] = np.r_[31.75, 0.125 + 0.25 * np.arange(31)]      # d = 0.25 exactly: x / d = k + 0.5
    x[2, :32] = 1e-9                             # max / 127 below fp16's least subnormal: d = 0
    x[2, 32:64] = 1e9                            # max / 127 past fp16's largest: d = inf
    q, d, back = _q8_reference(x)
    got_q, got_d = encode(x, "q8_0")
    np.testing.assert_array_equal(got_d.view(np.uint16), d.view(np.uint16))
    np.testing.assert_array_equal(got_q, q)
    assert (q[2, :64] == 0).all() and list(q[1, 33:37]) == [0, 2, 2, 4]          # half to even
    y = from_bytes(to_bytes(x.astype(np.float64), "q8_0"), "q8_0", 4, 512)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, back.astype(np.float64))
