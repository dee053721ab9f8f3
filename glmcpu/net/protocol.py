"""Wire format: one msgpack header frame, then one raw frame per array.

header = {"v": VERSION, "op": str, "meta": {str: plain values}, "arrays": [[dtype, shape], ...]}

No pickle and no msgpack extension types: a frame can only ever become plain values and NumPy
arrays of the listed dtypes, and every size is checked before an array is built."""
import math

import msgpack
import numpy as np

VERSION = 2            # 2: sessions, load epochs, content-addressed shares, f64 partial sums
DTYPES = {"f64": np.float64, "f32": np.float32, "f16": np.float16, "i32": np.int32, "i64": np.int64, "u8": np.uint8,
          "i8": np.int8}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 1 << 20          # bytes of msgpack header
MAX_ARRAYS = 64
MAX_DIMS = 8


class ProtocolError(Exception):
    """A message that does not follow this protocol (the peer gets an error reply, nothing more).
    `kind` names the error in that reply."""
    kind = "protocol"


def pack(op: str, meta: dict = None, arrays=()) -> list:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for a in arrays:
        if a.dtype not in NAMES:
            raise ProtocolError(f"dtype {a.dtype} cannot be sent")
    header = {"v": VERSION, "op": op, "meta": meta or {},
              "arrays": [[NAMES[a.dtype], list(a.shape)] for a in arrays]}
    return [msgpack.packb(header, use_bin_type=True)] + [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays]


def _no_ext(code, data):
    raise ProtocolError("msgpack extension types are not accepted")


PLAIN = (type(None), bool, int, float, str, bytes)


def plain(value) -> bool:
    """Whether value is built of msgpack's plain types only (no Timestamp: msgpack decodes that
    extension itself, before any ext_hook)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif type(v) not in PLAIN:
            return False
    return True


def unpack(frames) -> tuple:
    """frames (bytes-like) -> (op, meta, [arrays]); raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames[0]) > MAX_HEADER:
        raise ProtocolError("header too large")
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False, ext_hook=_no_ext, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:                    # msgpack raises many types on garbage
        raise ProtocolError(f"bad header: {type(e).__name__}") from None
    if not isinstance(header, dict) or set(header) != {"v", "op", "meta", "arrays"}:
        raise ProtocolError("header is not a glmcpu header")
    if header["v"] != VERSION:
        raise ProtocolError(f"protocol version {header['v']!r}, this side speaks {VERSION}")
    op, meta, specs = header["op"], header["meta"], header["arrays"]
    if not isinstance(op, str) or not isinstance(meta, dict) or not isinstance(specs, list):
        raise ProtocolError("header fields have the wrong types")
    if not plain(meta):
        raise ProtocolError("meta holds values other than nil, bool, numbers, strings, bytes, lists and maps")
    if len(specs) > MAX_ARRAYS or len(specs) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(specs)} arrays, the message carries {len(frames) - 1}")
    arrays = []
    for spec, frame in zip(specs, frames[1:]):
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in DTYPES
                or not isinstance(spec[1], list) or len(spec[1]) > MAX_DIMS
                or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in spec[1])):
            raise ProtocolError("bad array description")
        dtype = np.dtype(DTYPES[spec[0]])
        if math.prod(spec[1]) * dtype.itemsize != len(frame):
            raise ProtocolError(f"array of shape {spec[1]} does not match its {len(frame)} bytes")
        arrays.append(np.frombuffer(frame, dtype).reshape(spec[1]))
    return op, meta, arrays
