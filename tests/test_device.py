"""The GPU path without a GPU (issue 25): the model's own modules placed on the GPU kernels' NumPy
twin (glmcpu.device.Twin), whole and hybrid, against the CPU; and what `--gpu` says where no GPU can
be used.

Tolerances, and the rounding that explains them: the twin multiplies a quantised weight with its
activations rounded to Q8_1 blocks (a float32 scale per 32 values), the CPU with Q8_0 blocks (an
fp16 scale) or, for K-quants, Q8_K blocks (float32, per 256); a prefill of more than 8 tokens goes
through half-precision tiles on the GPU. Each rounding moves a logit by up to ~1% of the logits'
spread on these tiny random models; F32 weights round nothing but the order of their sums."""
import subprocess
import sys

import numpy as np
import pytest

import glmcpu
from glmcpu import device
from glmcpu.generate import prefill
from glmcpu.gguf import GGUFFile
from glmcpu.models import glm4, model_class

from conftest import PROMPT, run_cli


def llama_quantize(src, out, ftype):
    code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
            f"p.ftype = llama_cpp.{ftype}; "
            "sys.exit(llama_cpp.llama_model_quantize(%r.encode(), %r.encode(), p))" % (src, out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    if p.returncode != 0:
        pytest.skip("llama-cpp-python cannot quantise here (not installed, or cannot run on this CPU)")
    return out


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """{(family, type): path} of tiny dense and MoE files: F32, Q8_0, Q4_0 (glmcpu's converter) and
    Q4_K_M (llama.cpp's own quantiser, 256-wide rows)."""
    out = {}
    for t in ("f32", "q8_0", "q4_0"):
        out[("glm4", t)] = tiny("glm4", t)[1]
        out[("glm4_moe", t)] = tiny("glm4_moe", t)[1]
    d = tmp_path_factory.mktemp("kq")
    out[("glm4", "q4_k_m")] = lambda: llama_quantize(
        tiny("glm4", "f32", hidden=256, ffn=512, head_dim=64, layers=2)[1], str(d / "dense.gguf"),
        "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    out[("glm4_moe", "q4_k_m")] = lambda: llama_quantize(
        tiny("glm4_moe", "f32", hidden=256, ffn=512, expert_ffn=256, head_dim=64, layers=3)[1],
        str(d / "moe.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    return out


def path_of(files, family, t):
    p = files[(family, t)]
    return p() if callable(p) else p


class Exact(device.Twin):
    """The file's weights in float64 with unrounded activations: the yardstick both are measured by."""
    name = "exact"

    def takes(self, wtype):
        return True                       # gguf dequantises every type

    def linear(self, w, x, e=None):
        return (x.astype(np.float64) @ w.values(e).T.astype(np.float64)).astype(np.float32)


def exact_model(path):
    f = GGUFFile(path)
    cfg = model_class(f.arch).config_class.from_gguf(f)
    return model_class(f.arch)(f, 1, placement=device.Placement(Exact(), 0, cfg.n_layer, head=True))


def spread_diff(a, b, ref):
    return float(np.abs(a - b).max() / ref.std())


# decode (at most 8 tokens, the gemv path): a Q4_0/Q8_0 weight meets 8-bit activation blocks of 32
# on both, with the same integers (Q8_1's float32 scale against Q8_0's fp16 one), so the logits agree
# to the order of float32 sums (measured <= 2e-6 of their spread, F32 too). K-quant weights meet the
# CPU's Q8_K blocks (per 256 values) and the GPU's Q8_1 (per 32): two different 8-bit roundings, each
# 0.05-0.22 of the spread from the exact forward here; the twin is held within twice the CPU's distance.
DECODE = 1e-4
# prefill (12 tokens): the GPU multiplies half-rounded tiles of activations and weights (measured
# <= 0.012 of the spread from the exact forward), the CPU 8-bit activation blocks (0.08-0.25 on these
# random models); so the twin is held to the exact forward, and to the CPU within the CPU's own distance
HALF = 0.03


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
@pytest.mark.parametrize("t", ["f32", "q8_0", "q4_0", "q4_k_m"])
@pytest.mark.parametrize("how", ["whole", "hybrid"])
def test_twin_logits_match_the_cpu(files, family, t, how):
    """Every layer and the head on the twin (whole), or the hybrid: the first layer on the CPU,
    the rest on the twin, and for MoE files the routed experts on the CPU (--cpu-moe). Decode
    steps (gemv) and a prefill of 12 tokens (half tiles) both."""
    path = path_of(files, family, t)
    cpu = glmcpu.load(path, threads=1, draft="none")
    kw = dict(gpu_layers=None) if how == "whole" else dict(gpu_layers=cpu.cfg.n_layer - 1, cpu_moe=True)
    twin = glmcpu.load(path, threads=1, draft="none", gpu="twin", **kw)
    n = cpu.cfg.n_layer
    on = [twin.net.placement.layer(i) for i in range(n)]
    assert all(isinstance(d, device.Twin) for d in on[how == "hybrid":]) and twin.net.head_dev is on[-1]
    if how == "hybrid":
        assert on[0] is device.CPU_DEVICE
        if family == "glm4_moe":
            assert all(L.ffn.experts.dev is device.CPU_DEVICE for L in twin.net.layers[1:])
            assert all(L.ffn.route.dev is on[-1] for L in twin.net.layers[1:])
    assert twin.net.placement.why.startswith("twin")
    # decode: one token at a time (the GPU's gemv path), the kept cache on the twin
    ex = exact_model(path)
    cc, tc, ec = cpu.net.new_cache(32), twin.net.new_cache(32), ex.new_cache(32)
    for tok in PROMPT[:6]:
        a, b, e = cpu.net.forward([tok], cc), twin.net.forward([tok], tc), ex.forward([tok], ec)
        if t == "q4_k_m":
            assert spread_diff(b, e, e) < 2 * spread_diff(a, e, e) + 0.02
        else:
            assert spread_diff(b, a, a) < DECODE, (tok, spread_diff(b, a, a))
    # a prefill of 12 tokens (the GPU's half tiles)
    a = prefill(cpu.net, cpu.net.new_cache(32), PROMPT, all_logits=True)
    b = prefill(twin.net, twin.net.new_cache(32), PROMPT, all_logits=True)
    e = prefill(ex, ex.new_cache(32), PROMPT, all_logits=True)
    if how == "whole" and family == "glm4":        # routed experts take the gemv (Q8_1) path in a prefill too
        assert spread_diff(b, e, e) < HALF
    assert spread_diff(b, a, e) < spread_diff(a, e, e) + HALF


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
def test_twin_greedy_text_equals_the_cpu_over_64_tokens(files, family):
    """F32 weights: greedy text on the twin is the CPU's, token for token, over 64 tokens; the
    kept cache, the next turn, and a restored prompt cache all run through the twin's KV."""
    path = path_of(files, family, "f32")
    cpu = glmcpu.load(path, threads=1, draft="none")
    twin = glmcpu.load(path, threads=1, draft="none", gpu="twin")
    kw = dict(max_tokens=64, temperature=0, ignore_eos=True)
    want = list(cpu.generate(PROMPT, **kw))
    assert list(twin.generate(PROMPT, **kw)) == want
    assert twin.last_stats["gen_tokens"] == 64
    more = PROMPT + [7, 8, 9]                 # a second turn on the kept cache (its prefix reused)
    assert list(twin.generate(more, **kw)) == list(cpu.generate(more, **kw))
    assert twin.last_stats.get("cached_tokens", 0) > 0


def test_twin_cache_moves_with_the_host_arrays(files):
    """A device layer's float32 KV goes to the host arrays (what is saved, copied, shifted) and back."""
    path = path_of(files, "glm4", "f32")
    m = glmcpu.load(path, threads=1, draft="none", gpu="twin", kv_type="f32")
    c = m.net.new_cache(16)
    for tok in PROMPT[:5]:
        m.net.forward([tok], c)
    assert c.on_device and not c.k[0].any()           # the host rows of a device layer: untouched
    k0 = c.layer(0)[0][:, :5].copy()
    c.to_host(5)
    np.testing.assert_array_equal(c.k[0, :, :5], k0)
    c.layer(0)[0][:] = 0
    c.to_device(5)
    np.testing.assert_array_equal(c.layer(0)[0][:, :5], k0)


def test_gpu_asked_for_without_one_is_one_line(files):
    """`run --gpu` where no GPU can be used: one line saying why, exit 1. The default (auto) runs on
    the CPU, and `info` says why no GPU is used."""
    path = path_of(files, "glm4", "q8_0")
    p = run_cli("run", path, "--gpu", "-p", "hi", "-n", "2")
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmcpu: error: --gpu: no GPU can be used") or \
        "not wired yet" in lines[0], p.stderr
    p = run_cli("run", path, "-p", "hi", "-n", "2", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    p = run_cli("info", path)
    assert p.returncode == 0 and "GPU" in p.stdout
    runs = next(line for line in p.stdout.splitlines() if line.strip().startswith("runs on"))
    assert "CPU" in runs, p.stdout
    p = run_cli("info", path, "--gpu", "twin", "--gpu-layers", "1")
    assert p.returncode == 0 and "twin" in p.stdout and "1/3 layers" in p.stdout, p.stdout + p.stderr


def test_cpu_refuses_the_gpu_and_twin_takes_flags(files):
    path = path_of(files, "glm4_moe", "q8_0")
    m = glmcpu.load(path, threads=1, draft="none", gpu="cpu")
    assert m.net.placement.dev is device.CPU_DEVICE and "--cpu" in m.net.placement.why
    m = glmcpu.load(path, threads=1, draft="none", gpu="twin", n_cpu_moe=1)
    moe = [L for L in m.net.layers if hasattr(L.ffn, "experts")]
    assert moe[0].ffn.experts.dev is device.CPU_DEVICE and all(
        isinstance(L.ffn.experts.dev, device.Twin) for L in moe[1:])
    with pytest.raises(glmcpu.GlmcpuError, match="--gpu 'tpu'"):
        glmcpu.load(path, threads=1, draft="none", gpu="tpu")


class FakeGpuOps:
    """glmcpu.gpu.ops's functions, same signatures and shapes, computed by the twin on NumPy arrays:
    with it the CuPy device's own code (uploads, reshapes, the rope tables, the per-token experts,
    the cache views) runs here, all but the kernels."""

    def __init__(self):
        self.t = device.Twin()

    def linear(self, w, wtype, n_in, x):
        return self.t.linear(device.TwinWeight(w, wtype, n_in), x)

    def rmsnorm(self, x, w, eps):
        return self.t.rmsnorm(x, w, eps)

    def rope(self, x, pos, cos_t, sin_t, neox, n_head, head_dim):
        device.rotate(x[:, :n_head * head_dim].reshape(x.shape[0], n_head, head_dim), pos, cos_t, sin_t, neox)
        return x                                                        # (a view: rotated in place)

    def attention_decode(self, q, k, v, n_pos, scale):
        return self.t.attention(q[None], k, v, n_pos - 1, scale, 1, None)[0]

    def attention_prefill(self, q, n_head, k, v, pos0, scale):
        T, D = q.shape[0], k.shape[2]
        return self.t.attention(np.ascontiguousarray(q[:, :n_head * D]).reshape(T, n_head, D), k, v, pos0, scale, 1, None)

    def silu_mul(self, gate_up, up=None):
        return self.t.silu_mul(gate_up if up is None else np.concatenate([gate_up, up], 1), 1)

    def router(self, logits, bias, k, norm, scale):
        return self.t.route(logits, bias, k, norm, scale)

    def experts_matvec(self, w, wtype, n_in, ids, x):
        W = device.TwinWeight(w, wtype, n_in)
        return np.concatenate([self.t.linear(W, x[min(j, x.shape[0] - 1):][:1], int(e)) for j, e in enumerate(ids)])


@pytest.mark.parametrize("family", ["glm4", "glm4_moe"])
def test_the_cupy_device_code_runs_on_fake_kernels(files, family, monkeypatch):
    """The CuPy device (device.Cuda) with NumPy for CuPy and FakeGpuOps for its kernels: its wiring
    gives the twin's logits, whole and with --cpu-moe. (The kernels themselves: tools/gpu_check.py.)"""
    path = path_of(files, family, "q8_0")

    def fake_init(self):
        self.xp, self.g, self.tables = np, FakeGpuOps(), {}
    monkeypatch.setattr(device.Cuda, "__init__", fake_init)
    monkeypatch.setattr(np, "asnumpy", np.asarray, raising=False)
    f = GGUFFile(path)
    cls = model_class(f.arch)
    n = cls.config_class.from_gguf(f).n_layer
    for cpu_moe in (frozenset(), frozenset(range(1, n))):
        twin = cls(f, 1, placement=device.Placement(device.Twin(), 0, n, head=True, cpu_moe=cpu_moe))
        fake = cls(f, 1, placement=device.Placement(device.Cuda(), 0, n, head=True, cpu_moe=cpu_moe))
        a, b = twin.new_cache(32), fake.new_cache(32)
        for tok in PROMPT[:4]:
            np.testing.assert_allclose(fake.forward([tok], b), twin.forward([tok], a), rtol=0, atol=1e-4)
        np.testing.assert_allclose(prefill(fake, fake.new_cache(32), PROMPT, all_logits=True),
                                   prefill(twin, twin.new_cache(32), PROMPT, all_logits=True), rtol=0, atol=1e-4)


def test_types_without_a_gpu_kernel_stay_on_the_cpu(files, tiny, tmp_path):
    """No file is refused for having a GPU: in a Q5_K_M file the Q5_K matrices (no GPU kernel) are
    multiplied by the CPU inside twin layers, and a MoE layer whose experts hold such a type keeps
    them on the CPU (the hybrid path); `info` lists what stays."""
    dense = llama_quantize(tiny("glm4", "f32", hidden=256, ffn=512, head_dim=64, layers=2)[1],
                           str(tmp_path / "dense_q5km.gguf"), "LLAMA_FTYPE_MOSTLY_Q5_K_M")
    moe = llama_quantize(tiny("glm4_moe", "f32", hidden=256, ffn=512, expert_ffn=256, head_dim=64, layers=3)[1],
                         str(tmp_path / "moe_q5km.gguf"), "LLAMA_FTYPE_MOSTLY_Q5_K_M")
    for path in (dense, moe):
        cpu = glmcpu.load(path, threads=1, draft="none")
        twin = glmcpu.load(path, threads=1, draft="none", gpu="twin")
        lins = [v for L in twin.net.layers for v in vars(L.attn).values() if isinstance(v, glm4.Linear)]
        assert any(lin.home is device.CPU_DEVICE and isinstance(lin.dev, device.Twin) for lin in lins)
        experts = [L.ffn.experts for L in twin.net.layers if hasattr(L.ffn, "experts")]
        assert all(e.dev is device.CPU_DEVICE for e in experts)
        ex = exact_model(path)
        cc, tc, ec = cpu.net.new_cache(16), twin.net.new_cache(16), ex.new_cache(16)
        for tok in PROMPT[:4]:
            a, b, e = cpu.net.forward([tok], cc), twin.net.forward([tok], tc), ex.forward([tok], ec)
            assert spread_diff(b, e, e) < 2 * spread_diff(a, e, e) + 0.02
        p = run_cli("info", path, "--gpu", "twin")
        assert p.returncode == 0 and "kept on the CPU" in p.stdout and "Q5_K" in p.stdout, p.stdout
