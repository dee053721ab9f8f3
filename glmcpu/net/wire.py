"""How activations travel: exactly (f32; partial sums as f64), halved (f16), or as Q8_0 blocks
(int8 values with one fp16 scale per 32, as ggml and distributed-llama's q80 buffers: 34 bytes
per 32 values). Nothing here knows what the numbers mean."""
import numpy as np

from ..ops import K
from .protocol import ProtocolError

CODECS = ("f32", "f16", "q8_0")
QK = 32


def reply_codec(codec: str) -> str:
    """Sums that the receiver adds up travel in double on the exact wire (float32 values add
    exactly there), else as the wire says."""
    return "f64" if codec == "f32" else codec


def encode(x: np.ndarray, codec: str) -> list:
    """float32 [T, n] -> the arrays that carry it."""
    if codec in ("f32", "f64"):
        return [np.ascontiguousarray(x, np.float32 if codec == "f32" else np.float64)]
    if codec == "f16":
        return [x.astype(np.float16)]
    if codec == "q8_0":
        # d = fp16(max |block| / 127), q = clip(rint(x / d), -127, 127), all in float32: the
        # kernels' loops (NumPy's dozen calls took 33 us a 2,048-value half, on every mesh sync)
        T, n = x.shape
        if n % QK:
            raise ValueError(f"q8_0 needs rows of whole {QK}-blocks, not {n}")
        x = np.ascontiguousarray(x, np.float32)
        with np.errstate(over="ignore"):                        # a scale past fp16's range: inf, zeros sent
            d = K.wire_q8_scales(x, np.empty((T, n // QK), np.float32)).astype(np.float16)   # [T, n/32]
        q = np.empty((T, n), np.int8)
        K.wire_q8_quantize(x, d.view(np.uint16), q)
        return [q, d]
    raise ValueError(f"unknown wire codec {codec!r}; use one of {', '.join(CODECS)}")


def decode(arrays, codec: str, n: int, max_rows: int) -> np.ndarray:
    """The arrays of encode() -> float32 [T, n], checking every dtype and shape first
    (ProtocolError otherwise); T is at most max_rows."""
    want = {"f32": 1, "f64": 1, "f16": 1, "q8_0": 2}.get(codec)
    if want is None or len(arrays) < want:
        raise ProtocolError(f"activations: unknown codec {codec!r} or too few arrays")
    a = arrays[0]
    if a.ndim != 2 or a.shape[1] != n or not 1 <= a.shape[0] <= max_rows:
        raise ProtocolError(f"activations of shape {list(a.shape)}: want [1..{max_rows}, {n}]")
    if (codec, a.dtype) in (("f32", np.float32), ("f64", np.float64)):
        return a
    if codec == "f16" and a.dtype == np.float16:
        return a.astype(np.float32)
    if codec == "q8_0" and a.dtype == np.int8 and n % QK == 0:
        d = arrays[1]
        if d.dtype == np.float16 and d.shape == (a.shape[0], n // QK):
            return (a.reshape(a.shape[0], -1, QK).astype(np.float32)
                    * d.astype(np.float32)[..., None]).reshape(a.shape[0], n)
    raise ProtocolError(f"activations are not {codec} arrays of the right shapes")


def packed_size(codec: str, T: int, n: int) -> int:
    """Bytes of a [T, n] matrix in one buffer (to_bytes): f64 and f32 values, f16 values, or Q8_0's
    int8 values then its fp16 scales."""
    if codec == "q8_0":
        return T * n + T * (n // QK) * 2
    return T * n * {"f64": 8, "f32": 4, "f16": 2}[codec]


def to_bytes(x: np.ndarray, codec: str):
    """A [T, n] matrix as one buffer in `codec` (a view, for f64 values sent as f64)."""
    if codec == "f64" and x.dtype == np.float64 and x.flags.c_contiguous:
        return memoryview(x.reshape(-1)).cast("B")
    return b"".join(a.tobytes() for a in encode(np.asarray(x, np.float32), codec))


def from_bytes(buf, codec: str, T: int, n: int) -> np.ndarray:
    """The matrix of to_bytes() (float32; float64 for f64 and q8_0), its size checked."""
    if len(buf) != packed_size(codec, T, n):
        raise ProtocolError(f"{len(buf)} bytes for a [{T}, {n}] {codec} matrix")
    if codec == "q8_0":                  # float64 (the float32 products q * d, widened)
        q = np.frombuffer(buf, np.int8, T * n).reshape(T, n)
        d = np.frombuffer(buf, np.uint16, offset=T * n).reshape(T, n // QK)
        return K.wire_q8_dequantize(q, d, np.empty((T, n), np.float64))
    a = np.frombuffer(buf, {"f64": np.float64, "f32": np.float32, "f16": np.float16}[codec]).reshape(T, n)
    return a.astype(np.float32) if codec == "f16" else a


def arrays_of(codec: str) -> int:
    """How many arrays carry one activation matrix in this codec."""
    return 2 if codec == "q8_0" else 1


def roundtrip(x: np.ndarray, codec: str) -> np.ndarray:
    """What the other side reads of x (x itself for f32)."""
    if codec in ("f32", "f64"):
        return x
    return decode(encode(x, codec), codec, x.shape[1], x.shape[0])


MAX_TOP = 1024


def encode_top(x: np.ndarray, k: int) -> list:
    """float32 [T, n] -> the k largest of each row with their columns, best first, ties by the
    lower column ([values f32 [T, k], columns int32 [T, k]]): what a receiver that only ranks
    the values needs. A matrix holding NaN or infinities travels whole (encode's f32)."""
    T, n = x.shape
    k = min(k, n)
    if not np.isfinite(x).all():
        return encode(x, "f32")
    cols = np.empty((T, k), np.int32)
    for r in range(T):
        row = x[r]
        if k == 1:
            cols[r, 0] = np.argmax(row)              # the first of the largest
            continue
        kth = np.partition(row, n - k)[n - k]
        above = np.flatnonzero(row > kth)
        c = np.concatenate([above, np.flatnonzero(row == kth)[:k - len(above)]])
        cols[r] = c[np.lexsort((c, -row[c]))]
    return [np.take_along_axis(x, cols.astype(np.intp), 1).astype(np.float32), cols]


def decode_top(arrays, n: int, max_rows: int, k: int) -> np.ndarray:
    """The arrays of encode_top() -> float32 [T, n]: those values in their columns, -inf in every
    other (or the whole matrix, as sent); dtypes, shapes and columns checked (ProtocolError)."""
    if len(arrays) == 1:
        return decode(arrays, "f32", n, max_rows)
    k = min(k, n)
    if len(arrays) != 2:
        raise ProtocolError("top values: expected values and columns")
    v, c = arrays
    if (v.dtype != np.float32 or c.dtype != np.int32 or v.ndim != 2 or v.shape != c.shape
            or v.shape[1] != k or not 1 <= v.shape[0] <= max_rows):
        raise ProtocolError(f"top values of shapes {list(v.shape)} / {list(c.shape)}: want [1..{max_rows}, {k}]")
    if c.size and (c.min() < 0 or c.max() >= n):
        raise ProtocolError(f"top values: columns outside 0..{n - 1}")
    out = np.full((v.shape[0], n), -np.inf, np.float32)
    np.put_along_axis(out, c.astype(np.intp), v, 1)
    return out
