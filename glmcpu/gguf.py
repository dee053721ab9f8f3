"""A thin layer over the `gguf` package: a memory-mapped file, its metadata as Python values,
its tensors as zero-copy views, and named errors instead of ValueErrors from deep inside."""
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf import quants

from .errors import ModelFileError, UnsupportedTensorType

GT = GGMLQuantizationType
# the types the kernels multiply with; anything else is refused at load, by name
RUNNABLE = (GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0)


class GGUFFile:
    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise ModelFileError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise ModelFileError(f"{self.path} is a directory; give the path of a .gguf file "
                                 "(convert a Hugging Face folder with `glmcpu convert`)")
        size = os.path.getsize(self.path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            with open(self.path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise ModelFileError(f"{self.path} is not a GGUF file (it starts with {magic!r}, "
                                     "not b'GGUF')") from None
            raise ModelFileError(f"{self.path} is a damaged or truncated GGUF file ({e}); "
                                 "download it again") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelFileError(f"{self.path} is truncated: tensor {t.name} ends at byte "
                                     f"{t.data_offset + t.n_bytes}, the file has {size}; download it again")
        self.meta = {k: self._value(f) for k, f in self.reader.fields.items()
                     if not k.startswith("GGUF.") and k not in ("tokenizer.ggml.tokens",
                                                                  "tokenizer.ggml.merges",
                                                                  "tokenizer.ggml.token_type")}
        self.arch = self.meta.get("general.architecture")
        if self.arch is None:
            raise ModelFileError(f"{self.path} has no general.architecture: not a model GGUF")

    @staticmethod
    def _value(field):
        v = field.contents()
        return v

    def array(self, key):
        """A large metadata array (token list, merges) read on demand."""
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def get(self, key, default=None):
        return self.meta.get(key, default)

    def arch_get(self, key, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def require(self, key):
        v = self.meta.get(f"{self.arch}.{key}")
        if v is None:
            raise ModelFileError(f"{self.path}: metadata key {self.arch}.{key} is missing")
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
                f"{', '.join(x.name for x in RUNNABLE)} (re-quantise the file, e.g. to Q4_0 or Q8_0)")
        K, N = int(t.shape[0]), int(np.prod(t.shape[1:]))
        data = t.data.reshape(N, -1).view(np.uint8)
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
