"""Bad input: a named exception from the API, one line and exit code 1 from the CLI."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

import glmcpu
from glmcpu.errors import (ContextOverflow, ModelFileError, UnsupportedArchitecture,
                           UnsupportedTensorType)


def rewrite(src, dst, arch=None, retype=None, meta=None, drop=(), typed=None):
    """Copy a GGUF, optionally renaming its architecture, re-storing one tensor in another type,
    changing metadata values (typed: key -> (value, GGUFValueType), added or replacing) or
    dropping tensors."""
    r = GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch or old)
    for k, (v, t) in (typed or {}).items():
        w.add_key_value(k, v, t)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in (typed or {}):
            continue
        v = (meta or {}).get(k, f.contents())
        key = k.replace(f"{old}.", f"{arch}.", 1) if arch else k
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, v, GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, f.types[0])
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if retype and t.name == retype[0] and retype[1] == GT.IQ4_NL:
            # gguf-py cannot quantise IQ4_NL; its blocks have Q4_0's size, so relabel Q4_0 bytes
            w.add_tensor(t.name, quants.quantize(data, GT.Q4_0), raw_dtype=GT.IQ4_NL)
        elif retype and t.name == retype[0]:
            w.add_tensor(t.name, quants.quantize(data, retype[1]), raw_dtype=retype[1])
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rewrite_meta(src, dst, meta):
    rewrite(src, dst, meta=meta)


@pytest.fixture(scope="module")
def bad_files(tiny, tmp_path_factory):
    _, good, _ = tiny("glm4", "f32")
    d = tmp_path_factory.mktemp("bad")
    data = open(good, "rb").read()
    (d / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (d / "header_only.gguf").write_bytes(data[:100])
    (d / "text.gguf").write_text("this is a text file, not a model\n" * 10)
    rewrite(good, str(d / "llama.gguf"), arch="llama")
    rewrite(good, str(d / "iq4.gguf"), retype=("blk.1.attn_q.weight", GT.IQ4_NL))
    U32, STR = GGUFValueType.UINT32, GGUFValueType.STRING
    rewrite(good, str(d / "align0.gguf"), typed={"general.alignment": (0, U32)})
    rewrite(good, str(d / "heads0.gguf"), typed={"glm4.attention.head_count": (0, U32)})
    rewrite(good, str(d / "ctx0.gguf"), typed={"glm4.context_length": (0, U32)})
    rewrite(good, str(d / "width_abc.gguf"), typed={"glm4.embedding_length": ("abc", STR)})
    return {"good": good, "dir": d}


CASES = [("truncated.gguf", ModelFileError, "truncated"),
         ("header_only.gguf", ModelFileError, "damaged or truncated"),
         ("text.gguf", ModelFileError, "not a GGUF file"),
         ("missing.gguf", ModelFileError, "no such file"),
         ("llama.gguf", UnsupportedArchitecture, "'llama'"),
         ("iq4.gguf", UnsupportedTensorType, "blk.1.attn_q.weight is stored as IQ4_NL"),
         ("align0.gguf", ModelFileError, "general.alignment = 0 is not a power of two"),
         ("heads0.gguf", ModelFileError, "glm4.attention.head_count = 0 is out of range"),
         ("ctx0.gguf", ModelFileError, "glm4.context_length = 0 is out of range"),
         ("width_abc.gguf", ModelFileError, "glm4.embedding_length is 'abc', not a number")]


@pytest.mark.parametrize("name,exc,words", CASES)
def test_api_raises_named_error(bad_files, name, exc, words):
    with pytest.raises(exc, match=words):
        glmcpu.load(str(bad_files["dir"] / name))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "glmcpu", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("name,exc,words", CASES)
def test_cli_one_line(bad_files, name, exc, words):
    p = run_cli("run", str(bad_files["dir"] / name), "-p", "hi", "--max-tokens", "2")
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmcpu: error:") and words in lines[0]
    assert "Traceback" not in p.stderr


def test_prompt_longer_than_context(bad_files):
    m = glmcpu.load(bad_files["good"], ctx=16)
    with pytest.raises(ContextOverflow):
        list(m.generate("word " * 40, max_tokens=4))
    with pytest.raises(ContextOverflow):
        m.logits(list(range(20)))
    p = run_cli("run", bad_files["good"], "-p", "word " * 40, "--ctx", "16", "--raw")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert "context holds 16" in p.stderr


def test_debug_shows_traceback(bad_files):
    p = run_cli("--debug", "info", str(bad_files["dir"] / "text.gguf"))
    assert p.returncode != 0 and "Traceback" in p.stderr


def _fake_root(tmp, cgroup_lines, files, avail_kb=24 * 2**20):
    (tmp / "proc/self").mkdir(parents=True)
    (tmp / "proc/meminfo").write_text(f"MemTotal: {avail_kb * 2} kB\nMemAvailable: {avail_kb} kB\n")
    (tmp / "proc/self/cgroup").write_text("".join(l + "\n" for l in cgroup_lines))
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return str(tmp)


def test_memory_available_reads_the_cgroup_limit(tmp_path):
    """A container's memory limit, not the host's RAM, decides what may be copied into memory."""
    from glmcpu import ops
    G = 2**30
    v2 = _fake_root(tmp_path / "v2", ["0::/box"], {"sys/fs/cgroup/box/memory.max": str(6 * G),
                                                   "sys/fs/cgroup/box/memory.current": str(G)})
    assert ops.memory_available(v2) == 5 * G
    parent = _fake_root(tmp_path / "v2p", ["0::/a/b"], {"sys/fs/cgroup/a/b/memory.max": "max",
                                                        "sys/fs/cgroup/a/b/memory.current": str(G),
                                                        "sys/fs/cgroup/a/memory.max": str(3 * G),
                                                        "sys/fs/cgroup/a/memory.current": str(2 * G)})
    assert ops.memory_available(parent) == G
    v1 = _fake_root(tmp_path / "v1", ["4:memory:/c", "3:cpu:/"],
                    {"sys/fs/cgroup/memory/c/memory.limit_in_bytes": str(8 * G),
                     "sys/fs/cgroup/memory/c/memory.usage_in_bytes": str(2 * G),
                     "sys/fs/cgroup/memory/memory.limit_in_bytes": str(2**63 - 4096),
                     "sys/fs/cgroup/memory/memory.usage_in_bytes": str(G)})
    assert ops.memory_available(v1) == 6 * G
    free = _fake_root(tmp_path / "none", ["0::/"], {}, avail_kb=3 * 2**20)
    assert ops.memory_available(free) == 3 * G
    assert ops.memory_available(str(tmp_path / "nothing")) == 0
