"""GGUF files, memory-mapped: metadata as Python values, tensors as zero-copy NumPy views.

The header is parsed here rather than with gguf.GGUFReader: the reader builds a NumPy view per
string and takes ~9 s on a 151k-token GLM vocabulary, this parser ~0.2 s. Everything else
(type codes, block sizes, reference dequantisation, writing) comes from the `gguf` package."""
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
            GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K)
SCALARS = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I",
           VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q",
           VT.FLOAT64: "d"}
FLOAT_VIEWS = {GT.F32: np.float32, GT.F16: np.float16}


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
        vtype = VT(vtype)
        if vtype == VT.STRING:
            return self.string()
        if vtype == VT.ARRAY:
            sub, n = VT(self.take("<I")), self.take("<Q")
            if sub in (VT.STRING, VT.ARRAY):
                return [self.value(sub) for _ in range(n)]
            size = struct.calcsize(SCALARS[sub])
            if self.pos + n * size > len(self.buf):
                self.take(f"<{n * size}s")
            arr = np.frombuffer(self.buf, f"<{SCALARS[sub]}", n, self.pos)
            self.pos += n * size
            return arr.tolist()
        return self.take("<" + SCALARS[vtype])


SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")    # llama.cpp's gguf-split naming


class GGUFFile:
    """One GGUF file, or all parts of a split one (given the first part: its metadata is the
    model's; every part adds its tensors)."""

    def __init__(self, path):
        self.path = str(path)
        self.meta, self.tensors, self.parts = self._open(self.path, 0)
        count = int(self.meta.get("split.count", 1))
        if count > 1:
            if int(self.meta.get("split.no", 0)) != 0:
                raise ModelFileError(
                    f"{self.path} is part {int(self.meta['split.no']) + 1} of {count} of a split GGUF; "
                    "give the first part (…-00001-of-…gguf): glmcpu finds the others beside it")
            for no in range(1, count):
                part = self.part_path(no, count)
                meta, tensors, parts = self._open(part, no)
                if int(meta.get("split.no", -1)) != no:
                    raise ModelFileError(f"{part} is not part {no + 1} of {self.path}")
                self.tensors.update(tensors)
                self.parts += parts
            expected = self.meta.get("split.tensors.count")
            if expected is not None and int(expected) != len(self.tensors):
                raise ModelFileError(f"{self.path}: its {count} parts hold {len(self.tensors)} tensors, "
                                     f"the first part says {expected}; a part is missing or damaged")
        self.mm, self.data_start = self.parts[0][1], self.parts[0][2]
        self.size = sum(os.path.getsize(p[0]) for p in self.parts)     # bytes of all parts
        self.arch = self.meta.get("general.architecture")
        if self.arch is None:
            raise ModelFileError(f"{self.path} has no general.architecture: not a model GGUF")

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
        c.take("<I")
        version = c.take("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{path} is GGUF version {version}; glmcpu reads versions 2 and 3")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            ne = tuple(c.take("<Q") for _ in range(c.take("<I")))
            infos.append((name, GT(c.take("<I")), ne, c.take("<Q")))
        align = meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or not 0 < align <= 1 << 20 \
                or align & (align - 1):
            raise ModelFileError(f"{path}: general.alignment = {align!r} is not a power of two (GGUF files use 32)")
        align = int(align)
        start = (c.pos + align - 1) // align * align
        tensors = {}
        for name, ttype, ne, off in infos:
            block, nbytes_block = GGML_QUANT_SIZES[ttype]
            n = int(np.prod(ne))
            nbytes = n // block * nbytes_block
            begin = start + off
            if begin + nbytes > size:
                raise ModelFileError(f"{path} is truncated: tensor {name} ends at byte "
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

    def array(self, key):
        """A metadata array (token list, merges), or None."""
        return self.meta.get(key)

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

    def arch_get(self, key, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def require(self, key):
        v = self.meta.get(f"{self.arch}.{key}")
        if v is None:
            raise ModelFileError(f"{self.path}: metadata key {self.arch}.{key} is missing")
        return v

    def number(self, key, default=None, kind=int, minimum=1):
        """A numeric metadata value of this architecture, checked: present (or default), a number
        (not a string or array), and >= minimum; one line naming the key otherwise."""
        v = self.meta.get(f"{self.arch}.{key}", default)
        if v is None:
            raise ModelFileError(f"{self.path}: metadata key {self.arch}.{key} is missing")
        if isinstance(v, (bool, str, bytes, list, tuple)) or not isinstance(v, (int, float, np.number)):
            raise ModelFileError(f"{self.path}: metadata key {self.arch}.{key} is {v!r}, not a number")
        v = kind(v)
        if not np.isfinite(v) or (minimum is not None and v < minimum):
            raise ModelFileError(f"{self.path}: metadata key {self.arch}.{key} = {v} is out of range"
                                 + (f" (at least {minimum})" if minimum is not None else ""))
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
