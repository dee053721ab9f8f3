"""The kernel variant for this CPU, chosen once at import, and the thread count.

`GLMCPU_KERNELS=generic|avx2|avx512|avx512vnni|neon` forces a variant (for tests, or a CPU that
misreports its features)."""
import functools
import importlib
import mmap
import os
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .errors import GlmcpuError

# variant -> CPU features it needs (NumPy's names for them)
NEEDS = {
    "avx512vnni": ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "AVX512VNNI", "AVX2", "FMA3", "F16C"),
    "avx512": ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "AVX2", "FMA3", "F16C"),
    "avx2": ("AVX2", "FMA3", "F16C"),
    "neon": ("ASIMD",),
    "generic": (),
}


def cpu_features() -> dict:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


def _importable(name):
    try:
        return importlib.import_module(f"glmcpu._kernels_{name}")
    except ImportError:
        return None


def available_variants() -> list:
    """Variants that are built and that this CPU can run, best first."""
    feats = cpu_features()
    out = []
    for name, needs in NEEDS.items():
        if all(feats.get(f) for f in needs) and _importable(name) is not None:
            out.append(name)
    return out


def load_variant(name: str):
    if name not in NEEDS:
        raise GlmcpuError(f"GLMCPU_KERNELS={name!r} is not a kernel variant; use one of {', '.join(NEEDS)}")
    mod = _importable(name)
    if mod is None:
        raise GlmcpuError(f"kernel variant {name!r} is not built for this machine; built and usable: "
                          f"{', '.join(available_variants()) or 'none'}")
    missing = [f for f in NEEDS[name] if not cpu_features().get(f)]
    if missing:
        raise GlmcpuError(f"this CPU lacks {', '.join(missing)}, needed by kernel variant {name!r}")
    return mod


def _choose():
    forced = os.environ.get("GLMCPU_KERNELS")
    if forced:
        return load_variant(forced)
    variants = available_variants()
    if not variants:
        raise GlmcpuError("glmcpu's compiled kernels are missing: reinstall with `pip install .`")
    return load_variant(variants[0])


K = _choose()
VARIANT = K.ISA
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K = (K.TYPES[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K"))
Q4_0X8, Q5_0X8, Q8_0X8, Q4_KX8 = K.Q4_0X8, K.Q5_0X8, K.Q8_0X8, K.Q4_KX8
PACKED = (Q4_0X8, Q5_0X8, Q8_0X8, Q4_KX8, K.IQ4_NLX8, K.IQ4_XSX8, K.Q2_KX8, K.Q5_1X8)       # types in 8-row groups


def is_expert(tensor_name: str) -> bool:
    """Routed-expert tensors: read on demand, 8 of 128 per token in GLM-4.5-Air."""
    return "_exps." in tensor_name


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None       # "max" (v2, no limit) -> None


def memory_available(root: str = "/") -> int:
    """Bytes this process may still fill: the host's MemAvailable, or less where a memory cgroup
    (a container's limit: v2 memory.max, v1 memory.limit_in_bytes, on this cgroup or any above
    it) leaves less room. 0 when nothing can be read."""
    avail = None
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    rooms = [] if avail is None else [avail]
    try:
        with open(os.path.join(root, "proc/self/cgroup")) as f:
            lines = [l.strip().split(":", 2) for l in f if l.count(":") >= 2]
    except OSError:
        lines = []
    for _, controllers, path in lines:
        if controllers == "":                                         # v2
            base, limit, usage = "sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):                      # v1
            base, limit, usage = "sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):                        # this cgroup, then its parents
            d = os.path.join(root, base, *parts[:depth])
            lim, used = _read_int(os.path.join(d, limit)), _read_int(os.path.join(d, usage))
            if lim is not None and lim < 1 << 60 and used is not None:   # v1 says "no limit" as ~2^63
                rooms.append(max(0, lim - used))
    return min(rooms) if rooms else 0


REPACK_MODES = ("auto", "none", "all")
PACKABLE = (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, K.TYPES["Q2_K"], K.TYPES["IQ4_NL"], K.TYPES["IQ4_XS"])   # file types with an 8-row layout


def repack_mode(mode=None) -> str:
    """How much of a model to copy into RAM in the kernels' layouts (8-row groups for Q4_0, Q5_0,
    Q8_0 and Q4_K; a plain copy of the other K-quants): "auto" (the default, or GLMCPU_REPACK),
    "none" (everything runs from the file's memory map: least RAM, slower) or "all"."""
    raw = mode if mode is not None else os.environ.get("GLMCPU_REPACK") or "auto"
    m = {"1": "auto", "0": "none", "no": "none", "off": "none"}.get(str(raw).lower(), str(raw).lower())
    if m not in REPACK_MODES:
        raise GlmcpuError(f"repack mode {raw!r} is not one of {', '.join(REPACK_MODES)}")
    return m


class Packing(NamedTuple):
    dense: bool          # non-expert weights copied into RAM in the kernels' layouts
    experts: bool        # routed experts repacked too (else read from the memory map)


def plan_packing(f, mode=None, available=None) -> Packing:
    """What a load copies into RAM, decided before anything is: "auto" copies the non-expert
    weights when they fit in 80% of the memory this process may use (the RAM, or a container's
    limit), and the routed experts too when the whole file fits in 60% of it; "all" refuses in
    one line when it cannot fit. KV caches are checked where they are made."""
    mode = repack_mode(mode)
    if mode == "none":
        return Packing(False, False)
    avail = memory_available() if available is None else available
    dense = experts = 0
    for name, t in f.tensors.items():
        if len(t.shape) < 2 or (name == "token_embd.weight" and "output.weight" in f.tensors):
            continue                                   # vectors are small; embedding rows are read in place
        if is_expert(name):
            experts += t.n_bytes if t.tensor_type in PACKABLE else 0
        elif t.tensor_type in PACKABLE or t.tensor_type in IN_RAM:
            dense += t.n_bytes
    if mode == "all":
        if dense + experts > avail:
            raise GlmcpuError(f"{f.path}: repacking all its weights needs {(dense + experts) / 2**30:.1f} GB of RAM "
                              f"and {avail / 2**30:.1f} GB is free (the RAM or this container's memory limit); "
                              "use --repack auto (or none: least RAM)")
        return Packing(True, experts > 0)
    return Packing(dense < 0.8 * avail, experts > 0 and f.size < 0.6 * avail)


# K-quants and the other legacy types keep the file's layout, but are copied into RAM like the
# repacked ones, so q|k|v and gate|up can be fused into one matrix (one thread split, not three)
IN_RAM = (Q4_1, Q5_0, Q5_1, K.TYPES["IQ4_NL"]) + tuple(K.K_TYPES)


HUGE_PAGE = 2 << 20


def huge_empty(shape, dtype=np.uint8) -> np.ndarray:
    """An uninitialised array for weights read at every token: its memory starts on a 2 MB boundary
    and asks for transparent huge pages, so all of it can sit on them (numpy's own allocations of
    4 MB or more ask too, but start anywhere: the 2 MB pages at their ends stay in 4 KB ones,
    which read ~10% slower, a fifth of a mesh node's weights on GLM-4-9B). np.empty where huge
    pages are not offered (or the array is smaller than one)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(shape, dtype)
    # private: a shared anonymous mapping is shmem, which gets no transparent huge pages
    m = mmap.mmap(-1, -(-n // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    buf = np.frombuffer(m, np.uint8)                                  # keeps the mapping alive
    off = -buf.ctypes.data % HUGE_PAGE
    return buf[off:off + n].view(dtype).reshape(shape)


def repack(w, wtype: int, ram_copy: bool = True, pack: bool = True):
    """(weight lines, type) in the fastest layout for this type: Q4_0, Q5_0, Q5_1, Q8_0, Q2_K, Q4_K,
    IQ4_NL and IQ4_XS rows in groups of 8, the other K-quants as a RAM copy of the file's rows (unless ram_copy=False: routed
    experts, which gain nothing from a plain copy). Returns w itself when it stays in the file
    (always with pack=False)."""
    if not pack:
        return w, wtype
    # the 8-row kernels have AVX2/AVX-512 bodies; elsewhere (NEON, generic) the file's layout is faster
    if wtype in PACKABLE and w.shape[0] % 8 == 0 and VARIANT in ("avx2", "avx512", "avx512vnni"):
        return K.repack_x8(np.ascontiguousarray(w), wtype, alloc=huge_empty)
    if wtype in IN_RAM and ram_copy:
        out = huge_empty(w.shape, w.dtype)
        out[...] = w
        return out, wtype
    return w, wtype


def physical_cores() -> int:
    """Physical cores this process may use (hyperthreads share a core's load/store units)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            info = {}
            for line in f:
                if not line.strip():
                    if info.get("processor") is not None and int(info["processor"]) in allowed:
                        cores.add((info.get("physical id"), info.get("core id")))
                    info = {}
                    continue
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
        if cores and (None, None) not in cores:
            return max(1, len(cores))
    except (OSError, ValueError):
        pass
    return max(1, len(allowed))


def default_threads() -> int:
    env = os.environ.get("GLMCPU_THREADS")
    return int(env) if env else physical_cores()


@functools.lru_cache(maxsize=8)
def rope_table(n_rot: int, theta: float, n: int):
    return K.rope_table(n_rot, theta, n)


def rope_rows(last: int) -> int:
    """Positions in the table that holds position `last`: powers of two, at least 4096."""
    return 1 << max(12, int(last).bit_length())


def rope_table_bytes(n_rot: int, n_ctx: int) -> int:
    """Bytes of the (cos, sin) table for positions 0..n_ctx-1 (4096 positions x 64 dims: 1 MB)."""
    return rope_rows(n_ctx - 1) * (n_rot // 2) * 4 * 2


def rope(x, pos, n_rot: int, theta: float, neox: bool):
    """RoPE in place on x [T, H, D] at positions pos (int32 [T]), from a table of positions kept
    per (n_rot, theta) and grown in powers of two."""
    return K.rope(x, pos, *rope_table(int(n_rot), float(theta), rope_rows(pos.max())), neox)


def rope_by(x, delta: int, n_rot: int, theta: float, neox: bool):
    """Rotate x [T, H, D] in place by `delta` positions (negative: back). RoPE rotations compose,
    so keys written at position p become those of p + delta (a cache shifted after a drop)."""
    cos, sin = K.rope_table(int(n_rot), float(theta), abs(delta) + 1)
    return K.rope(x, np.full(x.shape[0], abs(delta), np.int32), cos, sin if delta >= 0 else -sin, neox)


# The element types a KV cache holds (kernels.h KV_*): array dtype, values per element. bf16 is
# kept as its uint16 bits; q8_0 as llama.cpp's blocks of 32 values (an f16 scale d, 32 int8: q * d).
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
KV_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
             "q8_0": Q8_0_BLOCK}
KV_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32}


def kv_bytes_per_value(t: str) -> float:
    return KV_DTYPES[t].itemsize / KV_BLOCK[t]


def kv_encode(x, t: str) -> np.ndarray:
    """x float32 [..., D] in KV type t: [..., D / KV_BLOCK[t]] of KV_DTYPES[t], rounded once (bf16
    to nearest even; q8_0 as llama.cpp's quantize_row_q8_0, by gguf-py)."""
    x = np.asarray(x, np.float32)
    if t in ("f32", "f16"):
        return x.astype(KV_DTYPES[t])
    qtype = GGMLQuantizationType.BF16 if t == "bf16" else GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(gguf_quants.quantize(x, qtype)).view(KV_DTYPES[t])


def kv_decode(a, t: str) -> np.ndarray:
    """The float32 values of a KV array of type t, a new array (exact: every type is a subset of
    float32)."""
    if t in ("f32", "f16"):
        return np.array(a, np.float32, order="C")
    qtype = GGMLQuantizationType.BF16 if t == "bf16" else GGMLQuantizationType.Q8_0
    return gguf_quants.dequantize(np.ascontiguousarray(a).view(np.uint8), qtype).astype(np.float32, copy=False)


def linear_chunked(m, x: np.ndarray, threads: int) -> np.ndarray:
    """x [T, n] float32 @ W^T -> [T, N] float64 for W kept as column chunks (K.Chunked), summed
    chunk by chunk in double (see kernels gemm_chunked)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], m.N), np.float64)
    return K.gemm_chunked(m, x, out, threads)


def linear(w, wtype: int, n: int, x: np.ndarray, threads: int, n_out: int = None) -> np.ndarray:
    """x [T, n] float32 @ W^T -> [T, n_out] for W as lines of ggml-typed bytes (rows, or groups
    of 8 rows for Q4_0X8)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], n_out or w.shape[0]), np.float32)
    return K.gemm(w, wtype, n, x, out, threads)
