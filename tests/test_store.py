"""The worker's store of shipped shares: one file per share, checked against its name, within a cap,
never following or waiting on what else sits at its names."""
import math
import os
import threading
import tracemalloc

import numpy as np
import pytest

from glmcpu.cluster import store as store_mod
from glmcpu.cluster.store import MAGIC, ShareStore, StoreError
from glmcpu.weights import payload_digest


def share(seed=0, cols=34):
    """(digest, entries, arrays): a vector and two rows of bytes, as a Recorder would give them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(4).astype(np.float32)
    w = rng.integers(0, 256, (2, cols), dtype=np.uint8)
    entries = [["has", ["x"], True], ["vector", ["x"], [0], "<f4", [4]],
               ["rows", ["w", 0, 2], [1, 8, 32], "|u1", [2, cols]]]
    return payload_digest(entries, [x, w]), entries, [x, w]


def listing(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def share_bytes(tmp_path, cols=34):
    """Bytes on disk of one share() of this width."""
    s = ShareStore(str(tmp_path / "probe"))
    return s.put(*share(0, cols))


def test_round_trip(tmp_path):
    d = tmp_path / "cache"
    s = ShareStore(str(d))
    digest, entries, arrays = share()
    assert s.get(digest) is None and s.size(digest) is None and s.used() == 0
    assert not d.exists()                                   # nothing created before a put
    n = s.put(digest, entries, arrays)
    assert listing(d) == [digest + ".share"]
    assert n == s.used() == os.path.getsize(d / (digest + ".share")) > sum(a.nbytes for a in arrays)
    assert s.size(digest) == sum(a.nbytes for a in arrays)
    src = ShareStore(str(d)).get(digest)                    # read back by a new store, as after a restart
    assert src.has("x") is True
    assert np.array_equal(src.vector("x"), arrays[0])
    w, a, b = src.rows("w", 0, 2)
    assert np.array_equal(w, arrays[1]) and (a, b) == (8, 32)
    assert s.put(digest, entries, arrays) == 0              # already stored
    assert listing(d) == [digest + ".share"]


def test_no_cap(tmp_path):
    s = ShareStore(str(tmp_path / "c"))
    digests = [d for d, *_ in (share(i) for i in range(6))]
    for i in range(6):
        s.put(*share(i))
    assert all(s.get(d) is not None for d in digests)


def refused(kind):
    digest, entries, arrays = share()
    if kind == "bytes":
        entries[1][1] = [b"x"]
    elif kind == "tuple":
        entries[1][1] = ("x",)
    elif kind == "dict":
        entries[0][2] = {"a": 1}
    elif kind == "nan":
        entries[2][2][1] = math.nan
    elif kind == "unnamed":
        arrays = arrays + [np.zeros(3, np.float32)]
    elif kind == "named twice":
        entries.append(["vector", ["y"], [0], "<f4", [4]])
    elif kind == "wrong dtype":
        entries[1][3] = "<f2"
    elif kind == "big-endian":
        arrays[0] = arrays[0].astype(">f4")
        entries[1][3] = ">f4"
    elif kind == "wrong digest":
        return "0" * 40, entries, arrays
    elif kind == "bad name":
        return "../" + digest[3:], entries, arrays
    return payload_digest(entries, arrays), entries, arrays


@pytest.mark.parametrize("kind", ["bytes", "tuple", "dict", "nan", "unnamed", "named twice", "wrong dtype",
                                  "big-endian", "wrong digest", "bad name", "too big"])
def test_refused_puts_leave_nothing(tmp_path, kind):
    d = tmp_path / "cache"
    s = ShareStore(str(d), max_bytes=100 if kind == "too big" else None)
    with pytest.raises(StoreError):
        s.put(*refused(kind))
    assert listing(tmp_path) == []                          # not even the directory


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    s = ShareStore(str(d))

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store_mod.os, "fsync", full)
    with pytest.raises(StoreError, match="No space left"):
        s.put(*share())
    assert listing(d) == []


def test_cap_is_kept_lru(tmp_path):
    one = share_bytes(tmp_path)
    d = tmp_path / "cache"
    cap = 3 * one + 10
    s = ShareStore(str(d), max_bytes=cap)
    os.makedirs(d)
    other = "ab" * 20
    for name, n in ((other + ".npz", one), (other + ".json", 100), (other + ".77." + "c" * 16 + ".tmp", 500),
                    ("1" * 40 + ".tmp.npz", 300)):
        (d / name).write_bytes(b"\0" * n)                   # an older version's files, a dead put's leftovers
    (d / "notes.txt").write_bytes(b"\0" * 10 * one)         # not the store's: neither counted nor touched
    assert s.used() == one + 100 + 500 + 300
    first = share(0)[0]
    for i in range(8):
        s.put(*share(i))
        assert s.used() <= cap
        assert s.get(first) is not None                     # used after every put: never the oldest
    assert listing(d) == sorted([first + ".share", share(6)[0] + ".share", share(7)[0] + ".share", "notes.txt"])
    assert s.used() == 3 * one


def test_start_removes_temporaries(tmp_path):
    d = tmp_path / "cache"
    os.makedirs(d)
    digest = share()[0]
    names = [f"{digest}.123.{'d' * 16}.tmp", f"{digest}.tmp.npz", f"{digest}.json.tmp"]
    for name in names + ["mine.tmp"]:
        (d / name).write_bytes(b"x")
    ShareStore(str(d))
    assert listing(d) == ["mine.tmp"]


def test_put_removes_the_older_format(tmp_path):
    d = tmp_path / "cache"
    os.makedirs(d)
    digest, entries, arrays = share()
    for ext in (".npz", ".json"):
        (d / (digest + ext)).write_bytes(b"old")
    ShareStore(str(d)).put(digest, entries, arrays)
    assert listing(d) == [digest + ".share"]


def test_pinned_shares_are_never_evicted(tmp_path):
    one = share_bytes(tmp_path)
    d = tmp_path / "cache"
    s = ShareStore(str(d), max_bytes=2 * one + 10)
    a, b, c = share(0), share(1), share(2)
    s.put(*a)
    s.put(*b)
    (d / ("ef" * 20 + ".json")).write_bytes(b"{}")          # evictable, but evicting it would not help
    s.pin([a[0], b[0]])
    before = listing(d)
    with pytest.raises(StoreError, match="too small"):
        s.put(*c)
    assert listing(d) == before                             # refused before evicting or writing anything
    s.get(b[0])                                             # b is now the most recently used ...
    s.pin([a[0]])
    s.put(*c)                                               # ... yet a, pinned, stays
    assert listing(d) == sorted([a[0] + ".share", c[0] + ".share"])


def test_symlink_at_temporary_name_is_not_written_through(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    os.makedirs(d)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    digest, entries, arrays = share()
    names = iter(["a" * 16, "b" * 16])
    monkeypatch.setattr(store_mod.secrets, "token_hex", lambda n: next(names))
    planted = d / f"{digest}.{os.getpid()}.{'a' * 16}.tmp"
    os.symlink(victim, planted)
    s = ShareStore(str(d))                                  # removes the planted link as a leftover ...
    os.symlink(victim, planted)                             # ... so plant it again, after the start
    assert s.put(digest, entries, arrays) > 0
    assert victim.read_bytes() == b"keep"
    assert s.get(digest) is not None


def test_symlink_at_share_name_is_not_followed(tmp_path):
    d = tmp_path / "cache"
    os.makedirs(d)
    s = ShareStore(str(d))
    digest, entries, arrays = share()
    path = d / (digest + ".share")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, path)
    assert s.get(digest) is None and not os.path.lexists(path) and victim.read_bytes() == b"keep"
    os.symlink(victim, path)
    assert s.put(digest, entries, arrays) > 0
    assert not path.is_symlink() and victim.read_bytes() == b"keep"
    assert s.get(digest) is not None
    folder = tmp_path / "folder"                            # a link to a directory: the link goes, not the tree
    os.makedirs(folder)
    (folder / "f").write_bytes(b"keep")
    os.unlink(path)
    os.symlink(folder, path)
    assert s.size(digest) is None and not os.path.lexists(path) and (folder / "f").read_bytes() == b"keep"


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "blocked"
    return out[0]


def test_fifo_at_share_name(tmp_path):
    d = tmp_path / "cache"
    os.makedirs(d)
    s = ShareStore(str(d))
    digest, entries, arrays = share()
    path = d / (digest + ".share")
    os.mkfifo(path)
    assert in_thread(lambda: s.size(digest)) is None and not os.path.lexists(path)
    os.mkfifo(path)
    assert in_thread(lambda: s.get(digest)) is None and not os.path.lexists(path)
    os.mkfifo(path)
    assert in_thread(lambda: s.put(digest, entries, arrays)) > 0
    assert s.get(digest) is not None


def test_directory_at_share_name(tmp_path):
    d = tmp_path / "cache"
    s = ShareStore(str(d))
    digest, entries, arrays = share()
    path = d / (digest + ".share")
    os.makedirs(path / "sub")
    assert s.get(digest) is None and not os.path.lexists(path)
    os.makedirs(path / "sub")
    assert s.put(digest, entries, arrays) > 0 and s.get(digest) is not None


def write_raw(path, header: bytes, body=b"", n=None):
    path.write_bytes(MAGIC + (len(header) if n is None else n).to_bytes(8, "little") + header + body)


def test_header_claiming_huge_arrays_is_refused_without_allocating(tmp_path):
    d = tmp_path / "cache"
    os.makedirs(d)
    s = ShareStore(str(d))
    digest = share()[0]
    path = d / (digest + ".share")
    head = b'{"entries":[["rows",["w",0,1],[0,1,1],"|u1",[1,1073741824]]],"arrays":[["|u1",[1,1073741824]]]}'
    write_raw(path, head, b"\0" * 1000)
    tracemalloc.start()
    try:
        assert s.get(digest) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and not path.exists()
    write_raw(path, head, n=1 << 62)                        # a header length beyond the file
    assert s.size(digest) is None and not path.exists()
    write_raw(path, b"[" * 100000 + b"]" * 100000)           # nesting deeper than json's recursion limit
    assert s.get(digest) is None and not path.exists()


def test_corrupted_share_is_removed_and_size_reads_only_the_header(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    s = ShareStore(str(d))
    digest, entries, arrays = share()
    s.put(digest, entries, arrays)
    path = d / (digest + ".share")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with monkeypatch.context() as m:
        m.setattr(store_mod, "_read_array", None)           # size must not read any array
        assert s.size(digest) == sum(a.nbytes for a in arrays)
    assert s.get(digest) is None and not path.exists()
    path.write_bytes(bytes(raw[:-1]))                       # truncated
    assert s.size(digest) is None and not path.exists()
