"""GGUF files, memory-mapped: metadata as Python values, tensors as zero-copy NumPy views.

The header is parsed here rather than with gguf.GGUFReader: the reader builds a NumPy view per
string and takes ~9 s on a 151k-token GLM vocabulary, this parser ~0.2 s. Everything else
(type codes, block sizes, reference dequantisation, writing) comes from the `gguf` package."""
import math
import os
import re
import struct
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants

from .errors import GlmcpuError, ModelFileError, UnsupportedTensorType

GT = GGMLQuantizationType
VT = GGUFValueType
# the types the kernels multiply with; anything else is refused at load, by name
RUNNABLE = (GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1,
            GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL, GT.IQ4_XS,
            GT.IQ3_S, GT.IQ3_XXS, GT.IQ2_S, GT.IQ2_XS, GT.IQ2_XXS, GT.IQ1_M, GT.IQ1_S)
# type codes ggml has had and dropped: llama.cpp's ARM repacks, written into files until late 2024
REMOVED_TYPES = {31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}


def type_name(code: int) -> str:
    """A tensor type code as people know it, and where it comes from if glmcpu cannot read it."""
    if code in REMOVED_TYPES:
        return (f"{REMOVED_TYPES[code]} (ggml type {code}: an ARM repack llama.cpp wrote until late 2024 and no "
                "longer reads; get a file made by a current llama.cpp)")
    try:
        return GT(code).name
    except ValueError:
        return (f"ggml type {code}, which no mainline llama.cpp this glmcpu knows writes (a fork's own type, "
                "such as ik_llama.cpp's IQ*_K, or a newer llama.cpp; from mainline llama.cpp, the file is damaged)")


SCALARS = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I",
           VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q",
           VT.FLOAT64: "d"}
FLOAT_VIEWS = {GT.F32: np.float32, GT.F16: np.float16}
MAX_DEPTH = 4            # arrays of arrays of ...
MAX_DIMS = 4             # ggml tensors have at most 4 dimensions


class Tensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple          # ggml order: shape[0] is the row length
    n_bytes: int
    data_offset: int
    data: np.ndarray      # NumPy order; float types as floats, others as rows of bytes
    part: int = 0         # which file of a split GGUF holds it


class _Cursor:
    """Little-endian reads from a buffer; running off its end means the file is truncated."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"{self.path} is a damaged or truncated GGUF file (header ends "
                                 f"early at byte {self.pos}); download it again")
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v if len(v) > 1 else v[0]

    def string(self):
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            self.take(f"<{n}s")                   # raises the truncation error
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype):
        """One metadata value. Arrays of arrays are read with an explicit stack, not recursion,
        and at most MAX_DEPTH deep (llama.cpp reads none): a hostile file cannot exhaust either."""
        try:
            vtype = VT(vtype)
        except ValueError:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4}") from None
        if vtype != VT.ARRAY:
            return self.string() if vtype == VT.STRING else self.take("<" + SCALARS[vtype])
        top = []
        stack = [self.array(top, 1)]              # frames: [item type, items left, the list]
        while stack:
            frame = stack[-1]
            if frame[1] == 0:
                stack.pop()
                continue
            frame[1] -= 1
            if frame[0] == VT.ARRAY:
                child = []
                frame[2].append(child)
                stack.append(self.array(child, len(stack) + 1))
            else:
                frame[2].append(self.string())
        return top

    def array(self, items, depth):
        """An array's header: a frame for its strings or arrays, or all its numbers at once."""
        if depth > MAX_DEPTH:
            raise ValueError(f"metadata arrays nested more than {MAX_DEPTH} deep at byte {self.pos}")
        sub, n = self.take("<I"), self.take("<Q")
        if sub in (VT.STRING, VT.ARRAY):
            if n > (len(self.buf) - self.pos) // 8:           # each item takes at least 8 bytes
                self.take(f"<{len(self.buf) - self.pos + 1}s")
            return [VT(sub), n, items]
        if sub not in SCALARS:
            raise ValueError(f"unknown metadata array type {sub} at byte {self.pos - 12}")
        size = struct.calcsize(SCALARS[sub])
        if self.pos + n * size > len(self.buf):
            self.take(f"<{n * size}s")
        items.extend(np.frombuffer(self.buf, f"<{SCALARS[sub]}", n, self.pos).tolist())
        self.pos += n * size
        return [sub, 0, items]


SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")    # llama.cpp's gguf-split naming


def tensor_bytes(ttype, ne) -> int:
    """Bytes of a tensor of ggml type ttype and shape ne (ggml order)."""
    block, nbytes_block = GGML_QUANT_SIZES[ttype]
    return math.prod(ne) // block * nbytes_block


def read_table(c, path, size):
    """(metadata, [(tensor name, ggml type code, shape, offset)]) of a GGUF read through cursor c;
    size: the whole file's bytes (c may hold only its first ones: a header read before a download)."""
    if bytes(c.buf[:4]) != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {bytes(c.buf[:4])!r}, not b'GGUF')")
    c.take("<I")
    version = c.take("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; glmcpu reads versions 2 and 3")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    left = size - c.pos
    if n_kv > left // 13 or n_tensors > left // 29:   # smallest key-value / tensor entry
        raise ModelFileError(f"{path} is a damaged or truncated GGUF file: it says it holds {n_tensors} tensors and "
                             f"{n_kv} metadata keys, more than its {size} bytes can; download it again")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        if key in meta:
            raise ModelFileError(f"{path} is a damaged GGUF file: metadata key {_name(key)} appears twice")
        meta[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {_name(name)} has {n_dims} dimensions (ggml tensors have "
                                 f"1 to {MAX_DIMS}); the file is damaged")
        ne = tuple(c.take("<Q") for _ in range(n_dims))
        infos.append((name, c.take("<I"), ne, c.take("<Q")))
    return meta, infos


class HeaderCut(Exception):
    """The bytes given end before the header does (read_header: fetch more)."""


class _PrefixCursor(_Cursor):
    def take(self, fmt):
        if self.pos + struct.calcsize(fmt) > len(self.buf):
            raise HeaderCut()
        return super().take(fmt)


def read_header(head: bytes, size: int, path: str):
    """(metadata, [(name, type code, shape, offset)]) from the first bytes of a GGUF of `size` bytes;
    HeaderCut if they end before its tensor table does."""
    return read_table(_PrefixCursor(memoryview(head), path), path, size)


class GGUFFile:
    """One GGUF file, or all parts of a split one (given the first part: its metadata is the
    model's; every part adds its tensors)."""

    def __init__(self, path):
        self.path = str(path)
        self.meta, self.tensors, self.parts = self._open(self.path, 0)
        count = self.number("split.count", 1, maximum=99999)
        if count > 1:
            if self.number("split.no", 0, minimum=0) != 0:
                raise ModelFileError(
                    f"{self.path} is part {self.number('split.no') + 1} of {count} of a split GGUF; "
                    "give the first part (…-00001-of-…gguf): glmcpu finds the others beside it")
            for no in range(1, count):
                part = self.part_path(no, count)
                meta, tensors, parts = self._open(part, no)
                if meta.get("split.no", -1) != no:
                    raise ModelFileError(f"{part} is not part {no + 1} of {self.path}")
                self.tensors.update(tensors)
                self.parts += parts
            expected = self.number("split.tensors.count", len(self.tensors), minimum=0)
            if expected != len(self.tensors):
                raise ModelFileError(f"{self.path}: its {count} parts hold {len(self.tensors)} tensors, "
                                     f"the first part says {expected}; a part is missing or damaged")
        self.mm, self.data_start = self.parts[0][1], self.parts[0][2]
        self.size = sum(os.path.getsize(p[0]) for p in self.parts)     # bytes of all parts
        self.arch = self.meta.get("general.architecture")
        if self.arch is None:
            raise ModelFileError(f"{self.path} has no general.architecture: not a model GGUF")
        if not isinstance(self.arch, str):
            raise ModelFileError(f"{self.path}: general.architecture is {_short(self.arch)}, not a name")

    def part_path(self, no, count) -> str:
        m = SPLIT_NAME.search(self.path)
        if not m:
            raise ModelFileError(f"{self.path} is the first of {count} parts of a split GGUF but is not "
                                 "named like one (…-00001-of-000NN.gguf), so the others cannot be found")
        path = self.path[:m.start()] + f"-{no + 1:05d}-of-{count:05d}.gguf"
        if not os.path.exists(path):
            raise ModelFileError(f"{path}: no such file (part {no + 1} of {count} of {self.path}); "
                                 "download every part")
        return path

    def _open(self, path, part):
        """(metadata, tensors, [(path, memmap, data start)]) of one file."""
        if not os.path.exists(path):
            raise ModelFileError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise ModelFileError(f"{self.path} is a directory; give the path of a .gguf file "
                                 "(convert a Hugging Face folder with `glmcpu convert`)")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        mm = np.memmap(path, np.uint8, "r")
        try:
            meta, tensors, start = self._parse(mm, path, size, part)
        except (ValueError, OverflowError, struct.error) as e:
            raise ModelFileError(f"{path} is a damaged GGUF file ({e}); download it again") from None
        return meta, tensors, [(path, mm, start)]

    @staticmethod
    def _parse(mm, path, size, part):
        c = _Cursor(memoryview(mm), path)
        meta, infos = read_table(c, path, size)
        for name, code, ne, off in infos:
            if code not in GGML_QUANT_SIZES:
                if code > 255:
                    raise ModelFileError(f"{path}: tensor {_name(name)} has ggml type {code}, which is no ggml "
                                         "type; the file is damaged")
                raise UnsupportedTensorType(f"{path}: tensor {_name(name)} is stored as {type_name(code)}")
        infos = [(name, GT(code), ne, off) for name, code, ne, off in infos]
        align = meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or not 0 < align <= 1 << 20 \
                or align & (align - 1):
            raise ModelFileError(f"{path}: general.alignment = {align!r} is not a power of two (GGUF files use 32)")
        align = int(align)
        start = (c.pos + align - 1) // align * align
        tensors = {}
        for name, ttype, ne, off in infos:
            block, nbytes_block = GGML_QUANT_SIZES[ttype]
            if name in tensors or min(ne) < 1 or ne[0] % block or off % align:
                what = ("appears twice" if name in tensors else f"has shape {ne}" if min(ne) < 1 else
                        f"has rows of {ne[0]} values, not whole {block}-value {ttype.name} blocks"
                        if ne[0] % block else f"starts at offset {off}, not a multiple of {align}")
                raise ModelFileError(f"{path}: tensor {_name(name)} {what}; the file is damaged")
            nbytes = tensor_bytes(ttype, ne)
            begin = start + off
            if begin + nbytes > size:
                raise ModelFileError(f"{path} is truncated: tensor {_name(name)} ends at byte "
                                     f"{begin + nbytes}, the file has {size}; download it again")
            raw = mm[begin:begin + nbytes]
            np_shape = tuple(reversed(ne))
            if ttype in FLOAT_VIEWS:
                data = raw.view(FLOAT_VIEWS[ttype]).reshape(np_shape)
            else:
                data = raw.reshape(*np_shape[:-1], ne[0] // block * nbytes_block)
            tensors[name] = Tensor(name, ttype, ne, nbytes, begin, data, part)
        return meta, tensors, start

    def fingerprint(self) -> str:
        """sha256 of the header (metadata + tensor table) and the file size: cheap, and it changes
        whenever the model, its quantisation or its tokenizer does."""
        import hashlib
        h = hashlib.sha256()
        for _, mm, start in self.parts:
            h.update(memoryview(mm[:start]))
        h.update(str(self.size).encode())
        return h.hexdigest()[:32]

    def lock(self, names):
        """mlock the pages of these tensors (so the OS never pages them out)."""
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        total = 0
        for n in names:
            t = self.tensors[n]
            start = t.data.ctypes.data // page * page
            length = t.data.ctypes.data + t.n_bytes - start
            if libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(length)) != 0:
                err = ctypes.get_errno()
                raise GlmcpuError(f"cannot lock {total + length} bytes of weights in RAM ({os.strerror(err)}); "
                                  "raise the limit with `ulimit -l unlimited` or run without --mlock")
            total += length
        return total

    def release(self, name):
        """Tell the OS this process no longer needs a tensor's pages (after copying it)."""
        import mmap
        t = self.tensors[name]
        mm = getattr(self.parts[t.part][1], "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = (t.data_offset + page - 1) // page * page
        end = (t.data_offset + t.n_bytes) // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def _key(self, key):
        """Keys of the file's architecture may be given without it: "block_count"."""
        return key if key.startswith(("general.", "tokenizer.", "split.")) else f"{self.arch}.{key}"

    def _lookup(self, key, default, required=True):
        """(full key, value or default); a missing required value is one line naming the key."""
        key = self._key(key)
        v = self.meta.get(key, default)
        if v is None and required:
            raise ModelFileError(f"{self.path}: metadata key {key} is missing")
        return key, v

    def number(self, key, default=None, kind=int, minimum=1, maximum=None):
        """A numeric metadata value, checked: present (or default), a number (not a string or
        array), finite and within [minimum, maximum]; one line naming the key otherwise."""
        key, v = self._lookup(key, default)
        if isinstance(v, (str, bytes, list, tuple)) or not isinstance(v, (int, float, np.number)) or (
                isinstance(v, bool) and kind is not bool):
            raise ModelFileError(f"{self.path}: metadata key {key} is {_short(v)}, not a number")
        v = kind(v)
        if not np.isfinite(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise ModelFileError(f"{self.path}: metadata key {key} = {v} is out of range ("
                                 + ", ".join(s for s in (minimum is not None and f"at least {minimum}",
                                                         maximum is not None and f"at most {maximum}") if s) + ")")
        return v

    def text(self, key, default=None):
        """A string metadata value (or default if absent)."""
        key, v = self._lookup(key, default, required=False)
        if v is not None and not isinstance(v, str):
            raise ModelFileError(f"{self.path}: metadata key {key} is {_short(v)}, not a string")
        return v

    def strings(self, key, default=None, nonempty=False):
        """A metadata array of strings (token list, merges)."""
        key, v = self._lookup(key, default)
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or (nonempty and not v):
            raise ModelFileError(f"{self.path}: metadata key {key} is {_short(v)}, not "
                                 f"{'a non-empty' if nonempty else 'an'} array of strings")
        return v

    def ints(self, key, default=None, length=None):
        """A metadata array of integers (token types), of `length` items if given."""
        key, v = self._lookup(key, default)
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ModelFileError(f"{self.path}: metadata key {key} is {_short(v)}, not an array of integers")
        if length is not None and len(v) != length:
            raise ModelFileError(f"{self.path}: metadata key {key} has {len(v)} items for {length} tokens")
        return v

    def has(self, name):
        return name in self.tensors

    def tensor(self, name):
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name} is missing")
        return t

    def vector(self, name):
        """A 1-D tensor (norm weight, bias) as float32 in RAM."""
        t = self.tensor(name)
        return np.ascontiguousarray(dequantize(t).reshape(-1), dtype=np.float32)

    def matrix(self, name):
        """A 2-D weight as (rows of bytes [N, row_bytes] view, ggml type, N, K): no copy."""
        t = self.tensor(name)
        if t.tensor_type not in RUNNABLE:
            raise UnsupportedTensorType(
                f"{self.path}: tensor {name} is stored as {t.tensor_type.name}; glmcpu runs "
                f"{', '.join(x.name for x in RUNNABLE)} (use a file quantised to Q4_K_M, Q5_K_M, Q6_K, Q8_0 or Q4_0)")
        K, N = int(t.shape[0]), int(np.prod(t.shape[1:]))
        data = t.data.reshape(N, -1).view(np.uint8)              # [N, row_bytes]
        return data, int(t.tensor_type), N, K


def _name(s: str) -> str:
    """A tensor or key name for an error message: as is if plain, else quoted and cut short."""
    if s.isprintable() and len(s) <= 80:
        return s
    r = repr(s)
    return r if len(r) <= 80 else r[:77] + "..."


def _short(v) -> str:
    """A metadata value for an error message: strings and arrays cut short."""
    if isinstance(v, list):
        return f"an array of {len(v)} items" + (f" ({_short(v[0])}, ...)" if v else "")
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def dequantize(t, rows=None) -> np.ndarray:
    """float32 values of a tensor (or of some of its rows), through gguf's reference code."""
    data = t.data if rows is None else t.data[rows]
    if t.tensor_type == GT.F32:
        return np.asarray(data, dtype=np.float32)
    if t.tensor_type == GT.F16:
        return np.asarray(data, dtype=np.float32)
    try:
        return quants.dequantize(np.asarray(data), t.tensor_type).astype(np.float32, copy=False)
    except (NotImplementedError, quants.QuantError) as e:
        raise UnsupportedTensorType(f"tensor {t.name} is stored as {t.tensor_type.name}, "
                                    f"which glmcpu cannot read ({e})") from None
