"""Bad input: a named exception from the API, one line and exit code 1 from the CLI."""
import re
import struct
import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFValueType

import glmcpu
from conftest import relabel, rewrite, run_cli
from glmcpu.errors import (ContextOverflow, ModelFileError, UnsupportedArchitecture,
                           UnsupportedTensorType)


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
    # the same tensor labelled with ggml type 31, the Q4_0_4_4 repack llama.cpp no longer reads
    (d / "q4_0_4_4.gguf").write_bytes(relabel(open(d / "iq4.gguf", "rb").read(), "blk.1.attn_q.weight", 31))
    U32, STR = GGUFValueType.UINT32, GGUFValueType.STRING
    rewrite(good, str(d / "align0.gguf"), typed={"general.alignment": (0, U32)})
    rewrite(good, str(d / "heads0.gguf"), typed={"glm4.attention.head_count": (0, U32)})
    rewrite(good, str(d / "ctx0.gguf"), typed={"glm4.context_length": (0, U32)})
    rewrite(good, str(d / "width_abc.gguf"), typed={"glm4.embedding_length": ("abc", STR)})
    rewrite(good, str(d / "width128.gguf"), typed={"glm4.embedding_length": (128, U32)})
    rewrite(good, str(d / "kv1.gguf"), typed={"glm4.attention.head_count_kv": (1, U32)})
    rewrite(good, str(d / "template.gguf"), typed={"tokenizer.chat_template": ("{% for m in messages %}", STR)})
    rewrite(good, str(d / "no_tokens.gguf"), drop_keys=("tokenizer.ggml.tokens",))
    rewrite(good, str(d / "tokens_ints.gguf"), typed={"tokenizer.ggml.tokens": ([1, 2], GGUFValueType.ARRAY)})
    (d / "deep.gguf").write_bytes(deep_arrays(100_000))
    return {"good": good, "dir": d}


def deep_arrays(depth):
    """A GGUF whose one metadata value is an array of an array of ... `depth` deep."""
    def s(text):
        return struct.pack("<Q", len(text)) + text.encode()
    arr, string = int(GGUFValueType.ARRAY), int(GGUFValueType.STRING)
    body = s("general.architecture") + struct.pack("<I", string) + s("glm4") + s("deep") + struct.pack("<I", arr)
    body += struct.pack("<IQ", arr, 1) * (depth - 1) + struct.pack("<IQ", string, 0)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + body


CASES = [("truncated.gguf", ModelFileError, "truncated"),
         ("header_only.gguf", ModelFileError, "damaged or truncated"),
         ("text.gguf", ModelFileError, "not a GGUF file"),
         ("missing.gguf", ModelFileError, "no such file"),
         ("llama.gguf", UnsupportedArchitecture, "'llama'"),
         ("q4_0_4_4.gguf", UnsupportedTensorType, "blk.1.attn_q.weight is stored as Q4_0_4_4 .ggml type 31: an ARM "
          "repack llama.cpp wrote until late 2024"),
         ("align0.gguf", ModelFileError, "general.alignment = 0 is not a power of two"),
         ("heads0.gguf", ModelFileError, "glm4.attention.head_count = 0 is out of range"),
         ("ctx0.gguf", ModelFileError, "glm4.context_length = 0 is out of range"),
         ("width_abc.gguf", ModelFileError, "glm4.embedding_length is 'abc', not a number"),
         ("width128.gguf", ModelFileError, r"tensor \S+ has shape \(64, 384\).*width 128"),
         ("kv1.gguf", ModelFileError, r"tensor blk\.0\.attn_k\S* has shape .*4 heads \(1 KV\)"),
         ("template.gguf", ModelFileError, "tokenizer.chat_template is not a valid Jinja template"),
         ("no_tokens.gguf", ModelFileError, "metadata key tokenizer.ggml.tokens is missing"),
         ("tokens_ints.gguf", ModelFileError, "tokenizer.ggml.tokens is an array of 2 items .1, ...., not a non-empty"),
         ("deep.gguf", ModelFileError, "metadata arrays nested more than 4 deep")]


@pytest.mark.parametrize("name,exc,words", CASES)
def test_api_raises_named_error(bad_files, name, exc, words):
    with pytest.raises(exc, match=words):
        glmcpu.load(str(bad_files["dir"] / name))


@pytest.mark.parametrize("name,exc,words", CASES)
def test_cli_one_line(bad_files, name, exc, words):
    p = run_cli("run", str(bad_files["dir"] / name), "-p", "hi", "--max-tokens", "2")
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmcpu: error:") and re.search(words, lines[0])
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


def test_nan_weights_and_failing_templates_are_one_line(bad_files, tmp_path):
    """Weights holding NaN: one line, not an IndexError from the sampler. A chat template that
    raises on the messages: one line naming the file's template, and --raw still works."""
    import numpy as np
    from glmcpu.generate import NotFinite
    from glmcpu.gguf import GGUFFile
    from glmcpu.tokenizer import TemplateFailed
    good = bad_files["good"]
    t = GGUFFile(good).tensors["output_norm.weight"]
    data = bytearray(open(good, "rb").read())
    data[t.data_offset:t.data_offset + 4] = np.float32("nan").tobytes()
    nan = tmp_path / "nan.gguf"
    nan.write_bytes(bytes(data))
    with pytest.raises(NotFinite, match="NaN or infinite"):
        list(glmcpu.load(str(nan)).generate("hello", max_tokens=2))
    p = run_cli("run", str(nan), "-p", "hello", "-n", "2")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "weights hold NaN" in p.stderr, p.stderr
    raising = str(tmp_path / "raising.gguf")
    rewrite(good, raising, typed={"tokenizer.chat_template": ("{{ raise_exception('roles must alternate') }}",
                                                              GGUFValueType.STRING)})
    with pytest.raises(TemplateFailed, match="roles must alternate"):
        glmcpu.load(raising).tokenizer.render([{"role": "user", "content": "hi"}])
    p = run_cli("run", raising, "-p", "hello", "-n", "2")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "tokenizer.chat_template failed" in p.stderr
    assert run_cli("run", raising, "-p", "hello", "-n", "2", "--raw").returncode == 0


def test_no_token_types_still_runs(bad_files, tmp_path):
    """token_type is optional in GGUF (llama.cpp takes every token as normal): the file runs."""
    path = str(tmp_path / "no_types.gguf")
    rewrite(bad_files["good"], path, drop_keys=("tokenizer.ggml.token_type",))
    p = run_cli("run", path, "-p", "hello", "-n", "3", "--raw")
    assert p.returncode == 0, p.stderr


def memory_cgroup(limit_bytes):
    """A new v1 or v2 memory cgroup with this limit, as (procs file, cleanup), or None where this
    machine does not let the test make one (not root, no writable memory controller)."""
    import os
    import uuid
    name = f"glmcpu-test-{uuid.uuid4().hex[:8]}"
    for base, limit in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        d = os.path.join(base, name)
        if not os.path.exists(os.path.join(base, limit if base.endswith("memory") else "cgroup.controllers")):
            continue
        try:
            os.mkdir(d)
        except OSError:
            continue
        try:
            with open(os.path.join(d, limit), "w") as f:
                f.write(str(limit_bytes))
            swap = os.path.join(d, "memory.memsw.limit_in_bytes" if base.endswith("memory") else "memory.swap.max")
            if os.path.exists(swap):
                with open(swap, "w") as f:
                    f.write(str(limit_bytes) if base.endswith("memory") else "0")
        except OSError:
            os.rmdir(d)
            continue
        return os.path.join(d, "cgroup.procs"), lambda d=d: os.rmdir(d)
    return None


def test_moe_file_larger_than_a_memory_cgroup_runs(tmp_path):
    """A container's memory limit below the file's size: the load sees the limit (not the host's
    RAM), leaves the experts in the memory map and generates; --repack all says in one line that
    it cannot fit, before copying anything; and the limit does bite (a plain allocation of the
    file's size in the same cgroup is killed)."""
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import make_model
    limit = 320 * 2**20
    cg = memory_cgroup(limit)
    if cg is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a writable cgroup v1/v2 memory controller)")
    procs, cleanup = cg
    try:
        path = str(tmp_path / "moe.gguf")
        shape = dict(d=1024, ff=2048, heads=8, kv=2, head_dim=128, vocab=4096, first_special=4000,
                     experts=64, used=4, ff_exp=1024, dense=1)
        make_model.write(path, 5, "q4_0", arch="glm4moe", shape=shape)     # 1 dense + 4 MoE layers
        size = os.path.getsize(path)
        assert size > limit * 1.3

        def in_cgroup(*args):
            def enter():
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            return subprocess.run(list(args), capture_output=True, text=True, timeout=300, preexec_fn=enter,
                                  env=dict(os.environ, GLMCPU_THREADS="2"))

        try:
            p = in_cgroup(sys.executable, "-c", f"b = bytearray({size}); b[::4096] = b'x' * len(b[::4096])")
        except subprocess.SubprocessError as e:      # cgroup.procs refused the process (cgroup v2 rules)
            pytest.skip(f"cannot move a process into the new memory cgroup here ({e})")
        if p.returncode != -9:
            pytest.skip("this machine's memory cgroup does not enforce its limit: nothing to show")
        p = in_cgroup(sys.executable, "-m", "glmcpu", "run", path, "-p", "hello", "-n", "8", "--raw", "--ignore-eos")
        assert p.returncode == 0, p.stderr
        assert "generation: 8 tokens" in p.stderr
        p = in_cgroup(sys.executable, "-m", "glmcpu", "run", path, "-p", "hello", "-n", "2", "--repack", "all")
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "repacking all its weights needs" in p.stderr and "container's memory limit" in p.stderr
        p = in_cgroup(sys.executable, "-m", "glmcpu", "info", path)
        assert "experts read from the file" in p.stdout, p.stdout + p.stderr
    finally:
        cleanup()
