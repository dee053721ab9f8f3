"""The shares a root ships to a worker, kept on disk under their digests within a size cap.

One file per share, `<digest>.share`: MAGIC, the header's length (8 bytes, little-endian), a JSON
header {"entries": [...], "arrays": [[dtype, shape], ...]}, then each array's bytes in C order.
Nothing is compressed: the file's size is checked against its header before any array is
allocated, and a share is used only if its bytes hash to its name. Anything else found at a
share's name (a symlink, FIFO, directory, truncated or corrupted file) is removed, never followed,
read or waited on."""
import json
import math
import os
import re
import secrets
import shutil
import stat
import time

import numpy as np

from ..net.protocol import DTYPES
from ..weights import ShareError, Shipped, payload_digest

MAGIC = b"GLMCPUSHARE1"
PREFIX = len(MAGIC) + 8
MAX_HEADER = 16 << 20
MAX_DEPTH = 32                      # of nested lists in a share's entries
DTYPE_STRS = {np.dtype(t).str for t in DTYPES.values()}
# every name this store, or the .npz + .json store of older versions, can create; others are left alone
SHARE = re.compile(r"([0-9a-f]{40})\.(share|npz|json)")
TEMP = re.compile(r"([0-9a-f]{40})\.(\d+\.[0-9a-f]{16}\.tmp|tmp\.npz|json\.tmp)")
OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class StoreError(Exception):
    """A share this store will not keep; the message says why, in one line."""


def is_digest(d) -> bool:
    return isinstance(d, str) and len(d) == 40 and all(c in "0123456789abcdef" for c in d)


class ShareStore:
    """Shares shipped by a root, on disk under their digests, within max_bytes."""

    def __init__(self, directory: str, max_bytes: int | None = None):
        self.directory, self.max_bytes = directory, max_bytes
        self.pinned = frozenset()
        for name, _, temp, _ in self._files():     # left by a put that died part way
            if temp:
                self._remove(name)

    def pin(self, digests) -> None:
        """Replace the set of digests never evicted (the shares of the load under way)."""
        self.pinned = frozenset(digests)

    def used(self) -> int:
        """Bytes on disk of every file this store could have created in its directory."""
        return sum(st.st_size for *_, st in self._files())

    def get(self, digest: str) -> Shipped | None:
        """The stored share, marked recently used; None if it is missing or not what its name says
        (then whatever was at its name is removed)."""
        fh = self._open(digest)
        if fh is None:
            return None
        try:
            with fh:
                entries, specs, _ = _header(fh)
                arrays = [_read_array(fh, dtype, shape) for dtype, shape in specs]
                src = _check(digest, entries, arrays)
                _touch(fh.fileno())
            return src
        except (OSError, ValueError, RecursionError, StoreError):
            self._remove(digest + ".share")
            return None

    def size(self, digest: str) -> int | None:
        """Bytes of the arrays of a stored share, from its header alone (a memory budget can be
        checked before the share is read); None if it is not stored."""
        fh = self._open(digest)
        if fh is None:
            return None
        try:
            with fh:
                return _header(fh)[2]
        except (OSError, ValueError, RecursionError):
            self._remove(digest + ".share")
            return None

    def put(self, digest: str, entries: list, arrays: list) -> int:
        """Store a share; the bytes written (0 if it is already stored). StoreError, with nothing
        written, for a share that is not exactly what its name says or that cannot fit."""
        if not is_digest(digest):
            raise StoreError("a share's name must be 40 hex digits")
        arrays = list(arrays)
        _check(digest, entries, arrays)
        head = json.dumps({"entries": entries, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]},
                          separators=(",", ":")).encode()
        if len(head) > MAX_HEADER:
            raise StoreError(f"a share's description is over {MAX_HEADER >> 20} MiB")
        size = PREFIX + len(head) + sum(a.nbytes for a in arrays)
        if self.max_bytes is not None and size > self.max_bytes:
            raise StoreError(f"a share of {size / 2**30:.2f} GiB exceeds this worker's cache cap of "
                             f"{self.max_bytes / 2**30:.2f} GiB")
        if self.get(digest) is not None:
            return 0
        for ext in (".npz", ".json"):             # the same share in the older format: superseded
            self._remove(digest + ext)
        self._make_room(digest, size)
        tmp = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            tmp, fh = self._create(digest)
            with fh:
                fh.write(MAGIC + len(head).to_bytes(8, "little") + head)
                for a in arrays:
                    fh.write(_bytes(a))
                _touch(fh.fileno())
                os.fsync(fh.fileno())
            os.replace(self._path(tmp), self._path(digest + ".share"))
        except OSError as e:
            raise StoreError(f"this worker cannot write its cache {self.directory} ({e.strerror or e})") from None
        finally:
            if tmp is not None:                   # gone after the replace; a failed write's leftovers otherwise
                self._remove(tmp)
        return size

    # ---- files -------------------------------------------------------------------------------

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _files(self):
        """(name, digest, is temporary, lstat) of each directory entry of this store's naming."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            m = SHARE.fullmatch(name) or TEMP.fullmatch(name)
            if m:
                try:
                    out.append((name, m[1], m.re is TEMP, os.lstat(self._path(name))))
                except FileNotFoundError:
                    pass
        return out

    def _remove(self, name) -> bool:
        """Remove what is at name: a real directory's tree, else the entry itself (a symlink, never
        its target). Whether nothing is there now."""
        path = self._path(name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def _open(self, digest):
        """<digest>.share opened for reading if it is a regular file, else None (and whatever is
        there is removed): O_NOFOLLOW and O_NONBLOCK, so no link is followed and no FIFO waited on."""
        if not is_digest(digest):                 # also keeps the name inside the directory
            return None
        name = digest + ".share"
        try:
            fd = os.open(self._path(name), OPEN_READ)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:                           # a symlink (ELOOP), a socket (ENXIO), ...
            self._remove(name)
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self._remove(name)
            return None
        return open(fd, "rb", buffering=0)

    def _create(self, digest):
        """(name, file) of a new temporary file, created exclusively: a name already taken (say by a
        planted symlink) is never opened; another random name is tried."""
        for _ in range(8):
            name = f"{digest}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
            try:
                return name, open(os.open(self._path(name), OPEN_NEW, 0o600), "wb")
            except FileExistsError:
                continue
        raise StoreError(f"cannot create a temporary file in {self.directory}")

    def _make_room(self, digest, size):
        """Evict stale temporaries, then the least recently used shares, until size more bytes fit;
        evict nothing and refuse if they would not fit even with every unpinned share gone."""
        if self.max_bytes is None:
            return
        files = self._files()
        used = sum(st.st_size for *_, st in files)
        keep = self.pinned | {digest}
        victims = sorted((f for f in files if f[2] or f[1] not in keep),     # temporaries first, then LRU
                         key=lambda f: (not f[2], f[3].st_mtime_ns))
        if used - sum(f[3].st_size for f in victims) + size > self.max_bytes:
            raise StoreError(f"this worker's cache cap of {self.max_bytes / 2**30:.2f} GiB is too small "
                             "for its share of this model")
        for name, _, _, st in victims:
            if used + size <= self.max_bytes:
                break
            if self._remove(name):
                used -= st.st_size
        if used + size > self.max_bytes:          # a file that could not be removed
            raise StoreError(f"this worker cannot free room in its cache {self.directory}")


def _plain(v, depth=0) -> bool:
    """A JSON value that comes back from the header as it went in (so it hashes the same)."""
    if v is None or type(v) in (bool, str):
        return True
    if type(v) is int:
        return -2**63 <= v < 2**64                # what msgpack, hence payload_digest, can encode
    if type(v) is float:
        return math.isfinite(v)
    return type(v) is list and depth < MAX_DEPTH and all(_plain(x, depth + 1) for x in v)


def _check(digest, entries, arrays) -> Shipped:
    """The Shipped of a share that is exactly what its name says: plain entries, each array named
    by one entry, bytes that hash to the digest. StoreError otherwise."""
    if type(entries) is not list or not _plain(entries):
        raise StoreError("a share's description holds values other than plain JSON lists, numbers and strings")
    if not all(isinstance(a, np.ndarray) and a.dtype.str in DTYPE_STRS for a in arrays):
        raise StoreError("a share holds an array of a type that cannot be stored")
    try:
        src = Shipped(entries, arrays)
    except ShareError as e:
        raise StoreError(str(e)) from None
    if sorted(e[2][0] for e in entries if e[0] != "has") != list(range(len(arrays))):
        raise StoreError("every array of a share must be named by exactly one of its entries")
    try:
        ok = payload_digest(entries, arrays) == digest
    except ValueError:                            # a string msgpack cannot encode (a lone surrogate)
        ok = False
    if not ok:
        raise StoreError("the share's bytes do not hash to its name")
    return src


def _header(fh):
    """(entries, [(dtype, shape)], bytes of the arrays) of a share file, ValueError unless its
    size is exactly what the header says (checked before anything is allocated)."""
    prefix = fh.read(PREFIX)
    if len(prefix) != PREFIX or prefix[:len(MAGIC)] != MAGIC:
        raise ValueError("not a share file")
    n, total = int.from_bytes(prefix[len(MAGIC):], "little"), os.fstat(fh.fileno()).st_size
    if n > min(MAX_HEADER, total - PREFIX):
        raise ValueError("header too long")
    head = json.loads(fh.read(n))
    specs = head.get("arrays") if isinstance(head, dict) else None
    if not isinstance(specs, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and s[0] in DTYPE_STRS
            and isinstance(s[1], list) and all(type(d) is int and d >= 0 for d in s[1]) for s in specs):
        raise ValueError("bad array description")
    nbytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for dtype, shape in specs)
    if total != PREFIX + n + nbytes:
        raise ValueError("the file's size is not what its header says")
    return head.get("entries"), specs, nbytes


def _bytes(a):
    """The bytes of a C-contiguous array, as one flat buffer."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _read_array(fh, dtype, shape):
    a = np.empty(shape, dtype)
    buf = _bytes(a)
    while len(buf):
        n = fh.readinto(buf)
        if not n:
            raise ValueError("truncated")
        buf = buf[n:]
    return a


def _touch(fd):
    """Mark a share used now (LRU), in ns of time.time_ns: the kernel's own stamps tie within a tick.
    Best effort: a share on a read-only disk is still used."""
    t = time.time_ns()
    try:
        os.utime(fd, ns=(t, t))
    except OSError:
        pass
