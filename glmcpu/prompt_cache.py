"""KV caches kept between requests, so that no prefix is computed twice: several conversations in
RAM within a byte budget, each prompt taking the cache that shares its longest prefix; a
conversation whose oldest turns were dropped keeps the turns after them (keys re-rotated); and,
with a directory, caches written to disk when they leave RAM or the process ends, and read back
for a prompt that starts with them (after a restart too).

A disk entry is one file: MAGIC, the header's length, a JSON header (the model's identity, the KV
types, the tokens, the arrays' shapes, a sha256 of their bytes), then the keys and values of
positions 0..n-1. Written to a temporary name and renamed; its size and hash are checked before
use; the directory is kept under its cap by dropping the least recently used entries."""
import hashlib
import json
import os
import secrets

import numpy as np

MAGIC = b"GLMCPUKV1"
MIN_SAVE = 256            # positions worth writing to disk (fewer are quicker to compute again)


class PromptCache:
    def __init__(self, net, n_ctx, new_draft, ram_bytes, directory=None, disk_bytes=None, identity=""):
        """net: the model (or cluster) making caches; new_draft(): the draft state kept beside each;
        identity: what the model's KV depends on (file, KV types): disk entries of another are ignored."""
        self.net, self.n_ctx, self.new_draft = net, n_ctx, new_draft
        self.ram, self.disk = ram_bytes, disk_bytes
        self.identity = identity
        self.per = net.cfg.kv_bytes(1, net.kv_type)
        cluster = hasattr(net, "clients")           # its caches hold the root's KV heads only: never on disk
        self.single = cluster and net.slots == 1      # its workers hold one sequence: one cache
        self.caches = []                              # least recently used first
        self.busy = set()                             # id()s of caches a running generation holds (batching.py)
        self.dir = None if cluster else directory
        self.index = self._scan() if self.dir else {}      # file -> tokens

    def latest(self):
        return self.caches[-1] if self.caches else None

    def take(self, ids):
        """The cache to compute `ids` in, holding the longest prefix of ids[:-1] that is kept (at
        least the last token is left to compute: its logits start the answer). A prefix shared with
        another conversation, or held by a generation still running (`busy`), is copied, not cut
        from it."""
        best, keep = None, -1
        for c in self.caches:
            n = common_prefix(c.tokens, ids[:-1])
            if n > keep:
                best, keep = c, n
        dropped = find_drop(best.tokens, ids[:-1], keep) if best is not None and not self.single \
            and id(best) not in self.busy else None
        if dropped:                     # old turns dropped (a chat past --ctx): keep the turns after them
            drop(best, keep, *dropped)
            keep += dropped[1]
        if best is not None and id(best) in self.busy and self.single:
            raise RuntimeError("a cluster's workers hold one sequence: it serves one generation at a time")
        if best is None or ((keep < len(best.tokens) or id(best) in self.busy) and not self.single):
            cache = self.new()
            if best is not None and keep > 0:
                copy_prefix(best, cache, keep)
            else:
                keep = 0
            if self.single:
                self.caches = []
        else:
            cache = best
            self.caches.remove(best)
        if self.index and keep < len(ids) - 1:      # a longer prefix on disk
            keep = max(keep, self._read(cache, ids[:-1], keep))
        self.caches.append(cache)
        self.net.begin(cache)           # a cluster whose worker came back starts this cache again
        cache.pos, cache.tokens = min(keep, cache.pos), cache.tokens[:min(keep, cache.pos)]
        while self.per * (sum(c.pos for c in self.caches) + len(ids)) > self.ram:
            idle = [c for c in self.caches[:-1] if id(c) not in self.busy]
            if not idle:
                break
            self.caches.remove(idle[0])
            self._save(idle[0])
        return cache

    def new(self):
        cache = self.net.new_cache(self.n_ctx)
        cache.draft = self.new_draft()
        return cache

    def close(self):
        """Write what is kept to disk (with a directory), then forget it."""
        for c in self.caches:
            self._save(c)
        self.caches = []

    # ---- disk ----------------------------------------------------------------------------------

    def _scan(self) -> dict:
        """{path: tokens} of this model's entries in the directory (headers only)."""
        index = {}
        try:
            names = os.listdir(self.dir)
        except OSError:
            return index
        for name in names:
            path = os.path.join(self.dir, name)
            if name.endswith(".kv"):
                head = _header(path)
                if head and head["identity"] == self.identity:
                    index[path] = head["tokens"]
        return index

    def _save(self, cache):
        if not self.dir or cache.pos < MIN_SAVE:
            return
        n, tokens = cache.pos, [int(t) for t in cache.tokens[:cache.pos]]
        if any(common_prefix(t, tokens) == n for t in self.index.values()):
            return                                   # held already, in this entry or a longer one
        cache.to_host(n)                             # layers run on a device: theirs too
        k, v = np.ascontiguousarray(cache.k[:, :, :n]), np.ascontiguousarray(cache.v[:, :, :n])
        h = hashlib.sha256(memoryview(k).cast("B"))
        h.update(memoryview(v).cast("B"))
        head = json.dumps({"identity": self.identity, "tokens": tokens, "k": [k.dtype.str, list(k.shape)],
                           "v": [v.dtype.str, list(v.shape)], "sha256": h.hexdigest()}).encode()
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, hashlib.sha256(head).hexdigest()[:32] + ".kv")
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        try:
            self._make_room(len(head) + k.nbytes + v.nbytes)
            with open(tmp, "xb") as f:
                f.write(MAGIC + len(head).to_bytes(8, "little") + head)
                f.write(memoryview(k).cast("B"))
                f.write(memoryview(v).cast("B"))
            os.replace(tmp, path)
            self.index[path] = tokens
        except OSError:                              # a full disk loses a cache, nothing else
            pass
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _make_room(self, size):
        if self.disk is None:
            return
        entries = []
        for name in os.listdir(self.dir):
            p = os.path.join(self.dir, name)
            if name.endswith((".kv", ".tmp")) and os.path.isfile(p):
                entries.append((os.stat(p).st_mtime, os.path.getsize(p), p))
        used = sum(s for _, s, _ in entries)
        for _, s, p in sorted(entries):
            if used + size <= self.disk:
                break
            os.remove(p)
            self.index.pop(p, None)
            used -= s
        if used + size > self.disk:
            raise OSError("the prompt cache's directory is full")

    def _read(self, cache, ids, keep) -> int:
        """Positions of the disk entry sharing the longest prefix of ids (past keep) read into
        cache; how many it holds now (keep if none is better or an entry is damaged)."""
        path, n = None, keep
        for p, tokens in self.index.items():
            m = common_prefix(tokens, ids)
            if m > n:
                path, n = p, m
        if path is None:
            return keep
        head = _header(path)
        try:
            with open(path, "rb") as f:
                f.seek(len(MAGIC) + 8 + head["size"])
                if head["k"][0] != cache.k.dtype.str or head["v"][0] != cache.v.dtype.str:
                    raise ValueError("another KV type")          # (the identity names it too)
                k = np.fromfile(f, cache.k.dtype, int(np.prod(head["k"][1]))).reshape(head["k"][1])
                v = np.fromfile(f, cache.v.dtype, int(np.prod(head["v"][1]))).reshape(head["v"][1])
            h = hashlib.sha256(memoryview(k).cast("B"))
            h.update(memoryview(v).cast("B"))
            if h.hexdigest() != head["sha256"] or k.shape[:2] != cache.k.shape[:2] or k.dtype != cache.k.dtype:
                raise ValueError("damaged")
        except (OSError, ValueError, TypeError):
            os.remove(path)
            self.index.pop(path, None)
            return keep
        os.utime(path)                               # recently used: dropped last
        cache.k[:, :, :n], cache.v[:, :, :n] = k[:, :, :n], v[:, :, :n]
        cache.to_device(n)
        cache.pos, cache.tokens = n, list(ids[:n])
        if cache.draft is not None and getattr(cache.draft, "cache", None) is not None:
            cache.draft.cache.pos, cache.draft.cache.tokens = 0, []      # the MTP head catches up
        return n


def _header(path):
    """The JSON header of a disk entry (with "size": its length), or None."""
    try:
        with open(path, "rb") as f:
            magic, size = f.read(len(MAGIC)), f.read(8)
            if magic != MAGIC or len(size) != 8:
                return None
            size = int.from_bytes(size, "little")
            total = os.fstat(f.fileno()).st_size
            if size > min(total, 64 << 20):
                return None
            head = json.loads(f.read(size))
        arrays = sum(int(np.prod(head[x][1])) * np.dtype(head[x][0]).itemsize for x in ("k", "v"))
        if total != len(MAGIC) + 8 + size + arrays:
            return None
        head["size"] = size
        return head
    except (OSError, ValueError, KeyError, TypeError):
        return None


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_drop(tokens, ids, a: int, least: int = 16):
    """(d, m) where tokens[a + d:a + d + m] == ids[a:a + m] with d > 0 and the longest m >= least:
    a conversation whose tokens a..a+d-1 were dropped from the middle (its oldest turns), or None."""
    t, q = np.asarray(tokens, np.int64), np.asarray(ids, np.int64)
    if a >= min(len(t), len(q)):
        return None
    found = None
    for s in np.flatnonzero(t[a + 1:] == q[a]) + a + 1:          # where the kept part may start
        n = min(len(t) - s, len(q) - a)
        same = t[s:s + n] == q[a:a + n]
        m = n if same.all() else int(np.argmin(same))
        if m >= least and (found is None or m > found[1]):
            found = (int(s - a), m)
    return found


def drop(cache, a, d, m):
    """cache.drop, and an MTP draft's hidden states moved alike (its head catches up from a)."""
    cache.drop(a, d, m)
    if getattr(cache.draft, "hidden", None) is not None:
        cache.draft.hidden[a:a + m] = cache.draft.hidden[a + d:a + d + m]
        c = cache.draft.cache
        c.pos = min(c.pos, max(a - 1, 0))
        c.tokens = c.tokens[:c.pos]


def copy_prefix(src, dst, n: int):
    """Positions 0..n-1 of one KV cache (and of its MTP draft's hidden states and cache) into a
    fresh one."""
    src.to_host(n)
    dst.k[:, :, :n], dst.v[:, :, :n] = src.k[:, :, :n], src.v[:, :, :n]
    dst.to_device(n)
    dst.pos, dst.tokens = n, list(src.tokens[:n])
    if getattr(src.draft, "hidden", None) is not None:
        dst.draft.hidden[:n] = src.draft.hidden[:n]
        copy_prefix(src.draft.cache, dst.draft.cache, min(n, src.draft.cache.pos))
