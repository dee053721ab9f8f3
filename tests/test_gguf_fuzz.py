"""GGUF fuzzing: thousands of damaged copies of small valid files. Each one either loads and
generates, or `glmcpu run` exits 1 with one line naming what is wrong: never a traceback, never
the CLI's last-resort "unexpected ..." line, never more than 200 MB of memory."""
import json
import os
import random
import struct
import subprocess
import sys

import pytest
from gguf import GGUFValueType

from conftest import rewrite

VT = GGUFValueType
SCALAR_SIZE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
               VT.FLOAT32: 4, VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}
ABSURD = (0, 1, 2, 3, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
N_CASES = int(os.environ.get("GLMCPU_FUZZ_CASES", 2400))


def scan(data: bytes):
    """The header's fields as (kind, offset, size): 'u32' (versions, value and tensor types,
    n_dims), 'count' (u64 tensor/kv/array counts, string lengths, dims, offsets), 'vtype'
    (a metadata value type), 'ttype' (a tensor type), 'str' (string bytes), 'scalar' (a
    metadata number); and where the tensor data starts."""
    fields, pos = [], 0

    def take(kind, size):
        nonlocal pos
        fields.append((kind, pos, size))
        pos += size
        return data[pos - size:pos]

    def string():
        n = struct.unpack("<Q", take("count", 8))[0]
        take("str", n)

    def value(vt):
        if vt == VT.STRING:
            string()
        elif vt == VT.ARRAY:
            sub = VT(struct.unpack("<I", take("vtype", 4))[0])
            n = struct.unpack("<Q", take("count", 8))[0]
            if sub in (VT.STRING, VT.ARRAY):
                for _ in range(n):
                    value(sub)
            else:
                take("scalar", SCALAR_SIZE[sub] * n)
        else:
            take("scalar", SCALAR_SIZE[vt])

    take("magic", 4)
    take("u32", 4)
    n_tensors = struct.unpack("<Q", take("count", 8))[0]
    n_kv = struct.unpack("<Q", take("count", 8))[0]
    for _ in range(n_kv):
        string()
        value(VT(struct.unpack("<I", take("vtype", 4))[0]))
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack("<I", take("u32", 4))[0]
        for _ in range(n_dims):
            take("count", 8)
        take("ttype", 4)
        take("count", 8)
    return fields, pos


def mutations(data: bytes, rng: random.Random, n: int):
    """n (label, bytes) damaged copies: bit and byte flips in the header, truncation at field
    boundaries and in the data, value types swapped, absurd counts, dims, types and offsets."""
    fields, header_end = scan(data)
    by_kind = {}
    for f in fields:
        by_kind.setdefault(f[0], []).append(f)
    out = []
    for i in range(n):
        b = bytearray(data)
        kind = i % 7
        if kind == 0:                                     # flips anywhere in the header
            for _ in range(rng.choice((1, 1, 2, 4))):
                p = rng.randrange(header_end)
                b[p] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            label = "flip"
        elif kind == 1:                                   # truncation at a field edge, or in the data
            _, off, size = rng.choice(fields)
            cut = rng.choice((off, off + size // 2, off + size)) if rng.random() < 0.8 else \
                rng.randrange(header_end, len(data))
            b = b[:cut]
            label = f"truncate@{cut}"
        elif kind == 2:                                   # a metadata value (or array item) type swapped
            _, off, _ = rng.choice(by_kind["vtype"])
            b[off:off + 4] = struct.pack("<I", rng.choice(list(range(14)) + [99, 2**32 - 1]))
            label = f"vtype@{off}"
        elif kind == 3:                                   # an absurd count, string length, dim or offset
            _, off, _ = rng.choice(by_kind["count"])
            old = struct.unpack_from("<Q", b, off)[0]
            new = rng.choice(ABSURD + (old + 1, max(old - 1, 0), old * 2, old // 2))
            b[off:off + 8] = struct.pack("<Q", new % 2**64)
            label = f"count@{off}={new}"
        elif kind == 4:                                   # tensor types and n_dims
            _, off, _ = rng.choice(by_kind["ttype"] + by_kind["u32"])
            b[off:off + 4] = struct.pack("<I", rng.choice(list(range(42)) + [99, 2**31, 2**32 - 1]))
            label = f"u32@{off}"
        elif kind == 5:                                   # metadata numbers
            _, off, size = rng.choice(by_kind["scalar"])
            p = off + rng.randrange(max(size, 1)) if size else off
            if p < len(b):
                b[p] = rng.choice((0, 0xff, 0x7f, 0x80, rng.randrange(256)))
            label = f"scalar@{p}"
        else:                                             # string bytes: invalid UTF-8, NULs
            _, off, size = rng.choice([f for f in by_kind["str"] if f[2]])
            p = off + rng.randrange(size)
            b[p] = rng.choice((0x00, 0xff, 0xc3, 0x80, ord(" "), ord(".")))
            label = f"str@{p}"
        out.append((label, bytes(b)))
    return out


def semantic_cases(path, d):
    """Valid GGUF structure, wrong content: config numbers that disagree with the tensors,
    missing or retyped tensors, broken tokenizer and chat template metadata."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    out = []
    for k, f in r.fields.items():
        if not k.startswith(arch + ".") or f.types[0] == VT.ARRAY:
            continue
        v = f.contents()
        for j, new in enumerate([0, 1, v * 2, v // 2 if isinstance(v, int) else v / 2, v + 1, 2**31 - 1, -1]):
            t = f.types[0]
            if t in (VT.UINT32, VT.UINT64, VT.UINT8, VT.UINT16) and new < 0:
                new, t = -1, VT.INT32
            if t == VT.BOOL:
                new = bool(j % 2)
            dst = str(d / f"{k}_{j}.gguf")
            rewrite(path, dst, typed={k: (new, t)})
            out.append((f"{k}={new!r}", dst))
        dst = str(d / f"{k}_str.gguf")
        rewrite(path, dst, typed={k: ("12", VT.STRING)})
        out.append((f"{k}='12'", dst))
    S, A = VT.STRING, VT.ARRAY
    tok_cases = {
        "template_syntax": {"tokenizer.chat_template": ("{% for m in messages %}{{ m.content", S)},
        "template_raises": {"tokenizer.chat_template": ("{{ raise_exception('no') }}", S)},
        "template_undefined": {"tokenizer.chat_template": ("{{ messages[5].content.upper() }}", S)},
        "template_empty": {"tokenizer.chat_template": ("", S)},
        "model_llama": {"tokenizer.ggml.model": ("llama", S)},
        "eos_huge": {"tokenizer.ggml.eos_token_id": (2**31 - 1, VT.UINT32)},
        "eos_string": {"tokenizer.ggml.eos_token_id": ("x", S)},
        "tokens_ints": {"tokenizer.ggml.tokens": ([1, 2, 3], A)},
        "tokens_empty": {"tokenizer.ggml.tokens": ([], A)},
        "types_short": {"tokenizer.ggml.token_type": ([3], A)},
        "types_strings": {"tokenizer.ggml.token_type": (["a", "b"], A)},
        "merges_ints": {"tokenizer.ggml.merges": ([1, 2], A)},
        "merges_bad": {"tokenizer.ggml.merges": (["nospace", "a b c", ""], A)},
        "tokens_string": {"tokenizer.ggml.tokens": ("abc", S)},
        "arch_int": {"general.architecture": (7, VT.UINT32)},
    }
    for name, typed in tok_cases.items():
        dst = str(d / f"{name}.gguf")
        try:
            rewrite(path, dst, typed=typed)
        except Exception:          # GGUFWriter refuses some of these (e.g. an int architecture)
            continue
        out.append((name, dst))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.model"):
        dst = str(d / f"drop_{key}.gguf")
        rewrite(path, dst, drop_keys=(key,))
        out.append((f"no {key}", dst))
    for t in r.tensors[:40]:
        dst = str(d / f"drop_{t.name}.gguf")
        rewrite(path, dst, drop=(t.name,))
        out.append((f"no {t.name}", dst))
    return out


DRIVER = r"""
import contextlib, io, json, signal, sys, time
from glmcpu import cli

class Hang(Exception):
    pass

def alarm(*_):
    raise Hang("over 20 s")

def peak_mb():
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

signal.signal(signal.SIGALRM, alarm)
out = open(sys.argv[1], "w")
for i, path in enumerate(sys.argv[2:]):
    err, so = io.StringIO(), io.StringIO()
    args = ["run", path, "-p", "hello there", "-n", "3", "--threads", "1", "--seed", "1"]
    if i % 2:
        args.append("--raw")
    t = time.time()
    signal.alarm(20)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
            rc = cli.main(args)
    except BaseException as e:          # SystemExit, Hang, anything cli.main let through
        rc = f"raised {type(e).__name__}: {e}"
    signal.alarm(0)
    out.write(json.dumps({"path": path, "rc": rc, "stderr": err.getvalue(), "s": time.time() - t,
                          "rss_mb": peak_mb()}) + "\n")
    out.flush()
"""


@pytest.fixture(scope="module")
def fuzz_results(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    bases = [tiny("glm4", "f32")[1], tiny("glm", "q8_0")[1], tiny("glm4_moe", "q4_0")[1],
             tiny("glm4", "q4_k_m", hidden=256, ffn=256)[1]]
    rng = random.Random(int(os.environ.get("GLMCPU_FUZZ_SEED", 1234)))
    cases = []
    for b, base in enumerate(bases):
        data = open(base, "rb").read()
        for j, (label, blob) in enumerate(mutations(data, rng, N_CASES // len(bases))):
            p = d / f"m{b}_{j}.gguf"
            p.write_bytes(blob)
            cases.append((f"{os.path.basename(os.path.dirname(base))} {label}", str(p)))
    sem = d / "semantic"
    sem.mkdir()
    for b, base in enumerate(bases[:3]):
        sub = sem / str(b)
        sub.mkdir()
        cases += [(f"{b}: {label}", p) for label, p in semantic_cases(base, sub)]
    labels = {p: label for label, p in cases}
    log = d / "results.jsonl"
    env = dict(os.environ, GLMCPU_THREADS="1", COLUMNS="200")
    subprocess.run([sys.executable, "-c", DRIVER, str(log)] + [p for _, p in cases], env=env,
                   timeout=1500, check=True, stdin=subprocess.DEVNULL)
    rows = [json.loads(line) for line in open(log)]
    for r in rows:
        r["label"] = labels[r["path"]]
    return rows


def test_every_mutation_loads_or_fails_in_one_line(fuzz_results):
    assert len(fuzz_results) >= 2000
    bad = []
    for r in fuzz_results:
        lines = r["stderr"].strip().splitlines()
        if r["rc"] == 0:
            continue
        if r["rc"] != 1 or len(lines) != 1 or not lines[0].startswith("glmcpu: error:") \
                or "glmcpu --debug" in lines[0] or "Traceback" in r["stderr"]:
            bad.append(f"{r['label']}: rc={r['rc']} {r['stderr'].strip()[:300]!r}")
    assert not bad, f"{len(bad)} of {len(fuzz_results)} cases:\n" + "\n".join(bad[:40])


def test_fuzzing_stays_small_and_quick(fuzz_results):
    assert max(r["rss_mb"] for r in fuzz_results) < 200
    assert max(r["s"] for r in fuzz_results) < 20


def test_fuzz_cases_are_varied(fuzz_results):
    """The mutations reach past the header: some run, some fail at open, some at the config."""
    ok = sum(r["rc"] == 0 for r in fuzz_results)
    assert 100 < ok < len(fuzz_results) - 500
    messages = {r["stderr"].split(":")[2] if r["stderr"].count(":") > 2 else r["stderr"] for r in fuzz_results}
    assert len(messages) > 20
