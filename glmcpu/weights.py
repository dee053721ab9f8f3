"""Where a model's modules get their tensors: ranges of a GGUF file's tensors, or the same ranges
shipped by a root to a worker that has no copy of the file.

A module asks for `rows(name, a, b)`, `cols(name, a, b)`, `vector(name, a, b)` or
`experts(name, e0, e1)`; a whole model asks for whole ranges and gets the file's memory map
without a copy. `Recorder` wraps a source and keeps (and hashes) every answer: the payload that
rebuilds the same module elsewhere, and the digest that names it (`Shipped` answers the calls
from such a payload, refusing any call it was not given)."""
import hashlib

import msgpack
import numpy as np

from .errors import GlmcpuError, ModelFileError
from gguf import GGML_QUANT_SIZES

from .gguf import GT

def row_bytes(wtype: int, n: int) -> int:
    """Bytes of one row of n values of ggml type wtype (ValueError if n splits a block)."""
    if wtype not in GGML_QUANT_SIZES:
        raise ValueError(f"ggml type {wtype} is not a ggml type")
    bs, bb = GGML_QUANT_SIZES[wtype]
    if n % bs:
        raise ValueError(f"{n} values are not whole {bs}-value blocks")
    return n // bs * bb


class ShareError(GlmcpuError):
    """A range that cannot be cut from a tensor (it would split a quantisation block), or shipped
    weights that do not match what a module needs."""


class FileWeights:
    """Ranges of the tensors of a GGUFFile. Whole ranges are the memory map itself (no copy).
    pack: whether modules copy these weights into RAM in the kernels' layouts (ops.plan_packing)."""

    def __init__(self, f, pack=True):
        self.f, self.pack = f, pack

    def has(self, name):
        return self.f.has(name)

    def vector(self, name, a=None, b=None):              # float32 [b - a]
        v = self.f.vector(name)
        return v if a is None else np.ascontiguousarray(v[a:b])

    def rows(self, name, a=None, b=None):                # (lines [b-a, row_bytes], type, n_in)
        w, wtype, n_out, n_in = self.f.matrix(name)
        if a is None or (a, b) == (0, n_out):
            return w, wtype, n_in
        if not 0 <= a <= b <= n_out:
            raise ShareError(f"{name}: rows {a}..{b} are outside its {n_out} rows")
        return np.ascontiguousarray(w[a:b]), wtype, n_in

    def cols(self, name, a, b):                          # columns [a, b) of every row: whole blocks
        w, wtype, _, n_in = self.f.matrix(name)
        if (a, b) == (0, n_in):
            return w, wtype, n_in
        bs, bb = GGML_QUANT_SIZES[wtype]
        if a % bs or (b % bs and b != n_in) or not 0 <= a <= b <= n_in:
            raise ShareError(f"{name}: columns {a}..{b} split a {bs}-value block of its "
                             f"{GT(wtype).name} rows; run this model on fewer nodes")
        return np.ascontiguousarray(w[:, a // bs * bb: -(-b // bs) * bb]), wtype, b - a

    def experts(self, name, rows, cols, n_expert, e0, e1):
        """[e1 - e0, rows, row_bytes] lines of experts e0..e1 of a stacked expert tensor, + type."""
        t = self.f.tensor(name)
        want = (cols, rows, n_expert)
        if tuple(int(d) for d in t.shape) != want:
            raise ModelFileError(f"{self.f.path}: tensor {name} has shape {tuple(int(d) for d in t.shape)} "
                                 f"(ggml order) but the metadata says {want} ({n_expert} experts of "
                                 f"{rows} x {cols})")
        w, wtype, _, _ = self.f.matrix(name)            # validates the type
        w = w.reshape(n_expert, rows, -1)
        return (w, wtype) if (e0, e1) == (0, n_expert) else (np.ascontiguousarray(w[e0:e1]), wtype)

    def release(self, name):
        self.f.release(name)


class Recorder:
    """A source that hashes (and, with keep=True, keeps) what it hands out."""

    def __init__(self, source, keep=True):
        self.source, self.keep = source, keep
        self.pack = getattr(source, "pack", True)
        self.entries, self.arrays = [], []
        self.hash = hashlib.sha256()

    def release(self, name):
        getattr(self.source, "release", lambda n: None)(name)

    def _add(self, method, args, value):
        if method == "has":
            entry, arr = [method, list(args), bool(value)], None
        else:
            arr, rest = (value, []) if method == "vector" else (value[0], [int(v) for v in value[1:]])
            arr = np.ascontiguousarray(arr)
            entry = [method, list(args), [len(self.arrays) if self.keep else -1] + rest,
                     arr.dtype.str, list(arr.shape)]
            if self.keep:
                self.arrays.append(arr)
        hash_entry(self.hash, entry, arr)
        self.entries.append(entry)

    def __getattr__(self, method):
        fn = getattr(self.source, method)

        def call(*args):
            out = fn(*args)
            self._add(method, args, out)
            return out
        return call

    def digest(self) -> str:
        return self.hash.hexdigest()[:40]

    def payload(self):
        """(entries, arrays) for the wire: plain values, then the arrays in order."""
        return self.entries, self.arrays


def hash_entry(h, entry, arr):
    """Add one recorded call to a digest: the entry without its array index, then the bytes."""
    if arr is None:
        h.update(msgpack.packb(entry))
        return
    h.update(msgpack.packb([entry[0], entry[1], [-1] + list(entry[2][1:]), entry[3], entry[4]]))
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))


def payload_digest(entries, arrays) -> str:
    """The digest a Recorder gave for this payload (a worker checks shipped shares with it)."""
    h = hashlib.sha256()
    for e in entries:
        hash_entry(h, e, None if e[0] == "has" else arrays[e[2][0]])
    return h.hexdigest()[:40]


class Shipped:
    """The worker's side of a Recorder: answers the same calls from the shipped arrays, checked
    against their recorded dtypes and shapes. Anything else raises ShareError."""

    def __init__(self, entries, arrays):
        self.answers = {}
        self.pack = True
        try:
            for e in entries:
                method, args = e[0], e[1]
                if method == "has":
                    value = bool(e[2])
                else:
                    i, rest, dtype, shape = e[2][0], e[2][1:], e[3], e[4]
                    arr = arrays[i]
                    if not isinstance(i, int) or i < 0 or arr.dtype.str != dtype or list(arr.shape) != shape:
                        raise ShareError(f"shipped array {i} is not the {dtype} {shape} its entry says")
                    if method != "vector" and (arr.ndim < 2 or arr.dtype != np.uint8):
                        raise ShareError(f"shipped weight {args[0]!r} is not rows of bytes")
                    if method == "vector" and (arr.ndim != 1 or arr.dtype != np.float32):
                        raise ShareError(f"shipped vector {args[0]!r} is not float32")
                    value = arr if method == "vector" else (arr, *[int(v) for v in rest])
                self.answers[(method, repr(list(args)))] = value
        except (TypeError, ValueError, IndexError, KeyError, AttributeError):
            raise ShareError("a shipped share's description does not match its arrays") from None

    def release(self, name):
        pass

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args):
            key = (method, repr(list(args)))
            if key not in self.answers:
                raise ShareError(f"the shipped share lacks {method}{tuple(args)}")
            return self.answers[key]
        return call
