"""glmcpu.gpu without a GPU: the CUDA sources compile to PTX and to Hopper/Ampere machine code with
NVRTC alone (no driver), the block decoders they share are built with the host's C++ compiler and
checked against gguf.quants, the NumPy twins against the CPU engine, and the offload plan on
synthetic tensor lists of the real shapes and on small files from tools/make_model.py. The kernels
themselves run on a GPU in tools/gpu_check.py."""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as GT

from glmcpu.gguf import GGUFFile
from glmcpu.gpu import available, kernels, reference
from glmcpu.gpu.plan import GB, WORKSPACE_SHARE, GpuMemoryError, plan_offload, tensor_list
from glmcpu.models import glm4, glm4_moe

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import make_model  # noqa: E402

NVRTC_INSTALL = "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12  (or 'cupy-cuda12x[ctk]', ~1.7 GB)"
ARCHS = ("80", "90")                     # Ampere (A100), Hopper (H100, H200)
DOT_RTOL = 2e-6                          # of sum |w x|: float32 sums of exact integer dot products


def nvrtc():
    """CuPy's NVRTC binding, or a skip saying what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc as mod
        mod.getVersion()
    except Exception as e:       # not installed, or installed without a loadable libnvrtc
        pytest.skip(f"CUDA's NVRTC is not usable here ({type(e).__name__}: {e}); {NVRTC_INSTALL}")
    return mod


# -- importing, and available() ---------------------------------------------------------------

def test_import_never_needs_cupy():
    """glmcpu, glmcpu.gpu and its host modules import without CuPy (here: CuPy made unimportable),
    and available() says why there is no GPU instead of raising."""
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
            "import glmcpu, glmcpu.gpu, glmcpu.gpu.plan, glmcpu.gpu.kernels, glmcpu.gpu.reference\n"
            "ok, why = glmcpu.gpu.available()\n"
            "assert ok is False and 'CuPy is not installed' in why and 'glmcpu[cuda]' in why, why\n"
            "print('fine')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "fine" in p.stdout, p.stderr


def test_import_does_not_load_cupy():
    code = ("import sys, glmcpu, glmcpu.gpu, glmcpu.gpu.plan, glmcpu.gpu.kernels, glmcpu.gpu.reference\n"
            "assert not any(m == 'cupy' or m.startswith(('cupy.', 'cupy_backends')) for m in sys.modules)\n"
            "print('fine')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "fine" in p.stdout, p.stderr


def test_available_answers_without_raising():
    ok, why = available()
    assert isinstance(ok, bool) and isinstance(why, str) and why and "\n" not in why
    if not ok:
        print("no GPU here:", why)


# -- the CUDA sources ------------------------------------------------------------------------------

def test_type_table_matches_gguf():
    for t, (name, qk, size) in kernels.TYPES.items():
        assert GGML_QUANT_SIZES[t] == (qk, size), name
        assert f"struct {name.upper()} {{" in kernels.BLOCKS and f"QK = {qk}, BYTES = {size};" in kernels.BLOCKS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", kernels.UNITS)
def test_source_compiles_to_ptx(unit, arch):
    """Every unit compiles for compute_80 and compute_90, and its PTX holds exactly the kernels
    kernels.KERNELS names (none missing, none unlisted)."""
    nvrtc()
    ptx = kernels.compile_ptx(unit, f"compute_{arch}")
    entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx))
    assert entries == set(kernels.KERNELS[unit])
    assert f".target sm_{arch}" in ptx


def test_every_kernel_the_brief_names_is_there():
    expected = {"quantize_q8_1_f32", "rmsnorm_f32", "rope_adjacent_f32", "rope_neox_f32", "attention_decode_f32",
                "attention_prefill_f32", "silu_mul_f32", "router_topk_f32", "gemv_f16_f32", "gemv_f32_f32"}
    for t in ("q4_0", "q8_0", "q5_0", "q4_K", "q6_K"):
        expected |= {f"gemv_{t}_q8_1", f"gemv_experts_{t}_q8_1", f"dequantize_{t}_f16"}
    expected |= {"dequantize_f16_f16", "dequantize_f32_f16"}
    listed = {n for names in kernels.KERNELS.values() for n in names}
    assert expected <= listed


@pytest.mark.parametrize("arch", ARCHS)
def test_machine_code_has_no_spills(arch):
    """NVRTC's ptxas (no GPU needed) builds sm_80 and sm_90 code: no kernel spills registers or
    keeps a stack frame (a runtime-indexed register array would), and the gemv kernels use dp4a."""
    mod = nvrtc()
    for unit in kernels.UNITS:
        prog = mod.createProgram(kernels.source(unit), f"{unit}.cu", [], [])
        try:
            mod.compileProgram(prog, [f"-arch=sm_{arch}", *kernels.NVRTC_OPTIONS, "--ptxas-options=-v"])
            log = mod.getProgramLog(prog)
            assert len(mod.getCUBIN(prog)) > 0
        finally:
            mod.destroyProgram(prog)
        frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(frames) == len(kernels.KERNELS[unit]), log
        assert all(f == ("0", "0", "0") for f in frames), f"{unit}: {log}"
    assert "dp4a" in kernels.compile_ptx("matvec", f"compute_{arch}")


# -- the block decoders, built for the host ---------------------------------------------------------

HARNESS = r"""
template <class W> void dequant(const u8* w, int rows, int n, float* out) {
    const long long rb = (long long)(n / W::QK) * W::BYTES;
    for (int r = 0; r < rows; r++)
        for (int e = 0; e < n; e++) out[(long long)r * n + e] = W::value(w + r * rb, e);
}
template <class W> void dot(const u8* w, int rows, int n, const block_q8_1* x, float* out) {
    const long long rb = (long long)(n / W::QK) * W::BYTES;
    for (int r = 0; r < rows; r++) {
        float acc = 0.0f;
        for (int g = 0; g < n / 32; g++) acc += W::dot(w + r * rb, g, x + g);
        out[r] = acc;
    }
}
#define VALUE(name, W) extern "C" void dequant_##name(const u8* w, int rows, int n, float* out) { dequant<W>(w, rows, n, out); }
#define DOT(name, W) extern "C" void dot_##name(const u8* w, int rows, int n, const block_q8_1* x, float* out) { dot<W>(w, rows, n, x, out); }
VALUE(q4_0, Q4_0) VALUE(q8_0, Q8_0) VALUE(q5_0, Q5_0) VALUE(q4_K, Q4_K) VALUE(q6_K, Q6_K) VALUE(f16, F16) VALUE(f32, F32)
DOT(q4_0, Q4_0) DOT(q8_0, Q8_0) DOT(q5_0, Q5_0) DOT(q4_K, Q4_K) DOT(q6_K, Q6_K)
"""


@pytest.fixture(scope="module")
def host_blocks(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the block decoders for the host")
    folder = tmp_path_factory.mktemp("blocks")
    src, lib = folder / "blocks.cpp", folder / "blocks.so"
    src.write_text(kernels.PRELUDE + kernels.BLOCKS + HARNESS)
    subprocess.run([cxx, "-O2", "-std=c++17", "-fno-strict-aliasing", "-ffp-contract=off", "-shared", "-fPIC",
                    "-o", str(lib), str(src)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def call(lib, fn, *args):
    conv = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray) else ctypes.c_int(a) for a in args]
    getattr(lib, fn)(*conv)


SIZES = [(1, 32), (3, 96), (17, 4096 + 32)]      # (rows, values per row); K-quants use whole 256s below


def type_sizes(wtype):
    qk = GGML_QUANT_SIZES[wtype][0]
    return [(r, max(qk, n // qk * qk)) for r, n in SIZES]


@pytest.mark.parametrize("wtype", list(kernels.TYPES), ids=lambda t: kernels.TYPES[t][0])
def test_block_values_match_gguf(host_blocks, wtype):
    """value(row, e), the decoder the dequantise kernels run, equals gguf.quants.dequantize."""
    rng = np.random.default_rng(1)
    for rows, n in type_sizes(wtype):
        w = reference.random_blocks(rng, wtype, rows, n)
        got = np.empty((rows, n), np.float32)
        call(host_blocks, f"dequant_{kernels.TYPES[wtype][0]}", w, rows, n, got)
        want = quants.dequantize(w, wtype).astype(np.float32)
        np.testing.assert_array_equal(got, want.reshape(rows, n))


@pytest.mark.parametrize("wtype", kernels.QUANTISED, ids=lambda t: kernels.TYPES[t][0])
def test_block_dots_match_dequantised_products(host_blocks, wtype):
    """dot(row, g, x), the gemv kernels' inner product, equals dequantise(W) . dequantise(Q8_1 x)
    up to float32 summation, on awkward sizes, a zero weight block and a zero activation block."""
    rng = np.random.default_rng(2)
    for rows, n in type_sizes(wtype):
        w = reference.random_blocks(rng, wtype, rows, n)
        x = rng.standard_normal((1, n)).astype(np.float32) * 3
        x[0, 32:64] = 0                              # an all-zero activation block (d = 0)
        xb = reference.quantize_q8_1(x)
        got = np.empty(rows, np.float32)
        call(host_blocks, f"dot_{kernels.TYPES[wtype][0]}", w, rows, n, np.ascontiguousarray(xb[0]), got)
        wf = quants.dequantize(w, wtype).reshape(rows, n).astype(np.float64)
        xf = reference.dequantize_q8_1(xb).astype(np.float64)[0]
        want = wf @ xf
        scale = np.abs(wf) @ np.abs(xf) + 1e-30
        assert np.all(np.abs(got - want) <= DOT_RTOL * scale), np.max(np.abs(got - want) / scale)


# -- the NumPy twins ---------------------------------------------------------------------------------

def test_q8_1_twin():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[1, :32] = 0
    x[2, 32:64] = 1e-30                                 # tiny but not zero
    b = reference.quantize_q8_1(x)
    assert b.shape == (3, 3) and b.dtype.itemsize == kernels.Q8_1_BYTES
    assert np.all(b["d"][1, 0] == 0) and np.all(b["qs"][1, 0] == 0) and b["s"][1, 0] == 0
    assert np.abs(b["qs"].astype(int)).max() == 127
    np.testing.assert_allclose(b["s"], b["d"] * b["qs"].sum(-1))
    err = np.abs(reference.dequantize_q8_1(b) - x)
    assert np.all(err <= 0.5 * np.repeat(b["d"], 32, 1) * (1 + 1e-6))     # half a step at most


def test_router_twin_agrees_with_the_engine():
    """reference.router (the GPU kernel's order) chooses the CPU Router's experts with its weights;
    the bias only chooses."""
    cfg = air_config(n_layer=2)
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, cfg.n_expert)).astype(np.float32)
    bias = (rng.standard_normal(cfg.n_expert) * 0.5).astype(np.float32)
    for b in (bias, None):
        r = glm4_moe.Router.__new__(glm4_moe.Router)
        r.cfg, r.bias, r.gate, r.dev = cfg, b, (lambda x, th: logits), glm4_moe.CPU_DEVICE
        cpu_ids, cpu_w = r(None, 1)
        ids, w = reference.router(logits, b, cfg.n_expert_used, cfg.expert_norm, cfg.expert_scale)
        order = np.argsort(cpu_ids, 1)
        assert np.array_equal(np.sort(ids, 1), np.take_along_axis(cpu_ids, order, 1))
        np.testing.assert_allclose(np.take_along_axis(w, np.argsort(ids, 1), 1),
                                   np.take_along_axis(cpu_w, order, 1), rtol=1e-6)
    s = 1 / (1 + np.exp(-logits))
    ids, w = reference.router(logits, bias, 8, True, 1.0)
    np.testing.assert_allclose(w, np.take_along_axis(s, ids, 1) / np.take_along_axis(s, ids, 1).sum(1, keepdims=True),
                               rtol=1e-6)


# -- the offload plan -------------------------------------------------------------------------------

def model_tensors(arch, layers, s, qtype=GT.Q4_0, nextn=False):
    """(name, type, ggml shape, bytes) of every tensor tools/make_model.py writes for this shape
    (the real GLM-4-9B and GLM-4.5-Air shapes without writing 60 GB); nextn adds an MTP block."""
    out = []

    def mat(name, rows, cols, experts=0, t=qtype):
        qk, size = GGML_QUANT_SIZES[t]
        out.append((name, t, (cols, rows) + ((experts,) if experts else ()), rows * cols * max(experts, 1) // qk * size))

    def vec(name, n):
        out.append((name, GT.F32, (n,), 4 * n))
    d, hd, E = s["d"], s["head_dim"], s.get("experts", 0)
    q, kv = s["heads"] * hd, s["kv"] * hd
    mat("token_embd.weight", s["vocab"], d)
    for i in range(layers + nextn):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", d)
        if arch == "chatglm":
            mat(p + "attn_qkv.weight", q + 2 * kv, d)
            vec(p + "attn_qkv.bias", q + 2 * kv)
        else:
            for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                mat(p + name + ".weight", rows, d)
                vec(p + name + ".bias", rows)
        mat(p + "attn_output.weight", d, q)
        if arch != "chatglm":
            vec(p + "post_attention_norm.weight", d)
        if arch != "glm4moe":
            vec(p + "ffn_norm.weight", d)
        if arch == "glm4moe" and i >= s["dense"]:
            mat(p + "ffn_gate_inp.weight", E, d, t=GT.F32)
            vec(p + "exp_probs_b.bias", E)
            for name, rows, cols in (("gate", s["ff_exp"], d), ("up", s["ff_exp"], d), ("down", d, s["ff_exp"])):
                mat(p + f"ffn_{name}_exps.weight", rows, cols, experts=E)
                mat(p + f"ffn_{name}_shexp.weight", rows, cols)
        elif arch == "glm4moe":
            for name, rows, cols in (("gate", s["ff"], d), ("up", s["ff"], d), ("down", d, s["ff"])):
                mat(p + f"ffn_{name}.weight", rows, cols)
        else:
            mat(p + "ffn_up.weight", 2 * s["ff"], d)
            mat(p + "ffn_down.weight", d, s["ff"])
        if arch == "glm4":
            vec(p + "post_ffw_norm.weight", d)
    vec("output_norm.weight", d)
    mat("output.weight", s["vocab"], d)
    return out


def air_config(n_layer=46):
    """GLM-4.5-Air's config (SPEC.md)."""
    return glm4_moe.Config(arch="glm4moe", n_layer=n_layer, d_model=4096, n_ff=10944, n_head=96, n_head_kv=8,
                           head_dim=128, n_rot=64, rope_theta=1e6, neox=True, eps=1e-5, n_ctx_train=131072,
                           n_vocab=151552, n_expert=128, n_expert_used=8, n_expert_shared=1, n_ff_exp=1408,
                           n_dense_lead=1)


def glm4_9b_config():
    return glm4.Config(arch="glm4", n_layer=40, d_model=4096, n_ff=13696, n_head=32, n_head_kv=2, head_dim=128,
                       n_rot=64, rope_theta=10000.0, neox=False, eps=1e-5, n_ctx_train=131072, n_vocab=151552,
                       sandwich_norms=True)


TINY = dict(d=256, ff=512, heads=4, kv=2, head_dim=64, vocab=512, first_special=500, experts=8, used=2,
            ff_exp=256, dense=1)


@pytest.mark.parametrize("arch", ["glm4", "chatglm", "glm4moe"])
def test_synthetic_tensor_list_is_what_make_model_writes(tmp_path, arch):
    path = str(tmp_path / f"{arch}.gguf")
    make_model.write(path, 3, "q4_0", arch=arch, shape=TINY)
    f = GGUFFile(path)
    assert sorted(tensor_list(f)) == sorted(tensor_list(model_tensors(arch, 3, TINY)))


def test_air_on_a_24_gb_card_with_experts_on_the_cpu():
    """GLM-4.5-Air Q4_0 on a 24 GB card: with cpu_moe everything but the routed experts fits;
    without, some of the last layers do, as many as the memory allows."""
    cfg, ts = air_config(), model_tensors("glm4moe", 46, make_model.SHAPE_AIR, nextn=True)
    plan = plan_offload(ts, cfg, 24 * GB, n_ctx=8192, cpu_moe=True)
    assert (plan.n_gpu, plan.head) == (46, True)
    assert plan.total <= 24 * GB
    for name, _, _, _ in ts:
        experts, mtp, embd = "_exps." in name, name.startswith("blk.46."), name == "token_embd.weight"
        assert plan.on_gpu(name) == (not experts and not mtp and not embd), name
    assert 3.0 * GB < plan.weights < 4.5 * GB              # SPEC: ~4 GB is not experts, embedding included
    assert 45 * GB < plan.expert_bytes < 60 * GB
    line = plan.describe()
    assert line.startswith("GPU: 46/46 layers and the output head, ") and "of 24.0 GB free" in line
    assert line.endswith("GB)") and "experts on the CPU" in line and "\n" not in line
    print(line)

    whole = plan_offload(ts, cfg, 24 * GB, n_ctx=8192)
    assert 0 < whole.n_gpu < 46 and whole.head and whole.total <= 24 * GB
    assert all(whole.layer_on_gpu(l) == (l >= 46 - whole.n_gpu) for l in range(46))
    assert whole.on_gpu("blk.45.ffn_up_exps.weight") and not whole.on_gpu(f"blk.{whole.first - 1}.attn_q.weight")
    assert f"layers 0-{whole.first - 1} on the CPU" in whole.describe()
    with pytest.raises(GpuMemoryError, match=f"enough for {whole.n_gpu} layers: use --gpu-layers {whole.n_gpu} or --cpu-moe"):
        plan_offload(ts, cfg, 24 * GB, n_ctx=8192, gpu_layers=whole.n_gpu + 1)
    print(whole.describe())


def test_air_q4_k_m_mix_and_a_long_context():
    """The Q4_K_M type mix (as llama.cpp assigns it) still leaves everything but experts on a 24 GB
    card; a 64k context's KV cache (float32) does not fit beside it, and fewer layers are placed."""
    from glmcpu.quantize import tensor_types
    cfg = air_config()
    src = model_tensors("glm4moe", 46, make_model.SHAPE_AIR, qtype=GT.F32)
    types = tensor_types({n: (tuple(reversed(s)), t) for n, t, s, _ in src}, "q4_k_m", 46, 128, n_gqa=12)
    ts = []
    for name, _, shape, _ in src:
        qk, size = GGML_QUANT_SIZES[types[name]]
        ts.append((name, types[name], shape, int(np.prod(shape)) // qk * size))
    assert {types["blk.1.ffn_gate_exps.weight"], types["output.weight"]} == {GT.Q4_K, GT.Q6_K}
    plan = plan_offload(ts, cfg, 24 * GB, n_ctx=8192, cpu_moe=True)
    assert plan.n_gpu == 46 and plan.head and plan.total <= 24 * GB
    long = plan_offload(ts, cfg, 24 * GB, n_ctx=65536, cpu_moe=True)
    assert 0 < long.n_gpu < 46 and long.total <= 24 * GB


def test_glm4_9b_on_an_80_gb_card():
    cfg, ts = glm4_9b_config(), model_tensors("glm4", 40, make_model.SHAPE_9B)
    plan = plan_offload(ts, cfg, 80 * GB, n_ctx=8192)
    assert (plan.n_gpu, plan.head, plan.first) == (40, True, 0)
    embd = next(t[3] for t in ts if t[0] == "token_embd.weight")
    assert plan.weights == sum(t[3] for t in ts) - embd and plan.cpu_weights == embd
    assert plan.kv == 40 * 2 * 2 * 128 * 8192 * 4
    assert plan.describe().startswith("GPU: 40/40 layers and the output head, ")
    assert "on the CPU" not in plan.describe()


def test_gpu_layers_asked_for():
    cfg, ts = glm4_9b_config(), model_tensors("glm4", 40, make_model.SHAPE_9B)
    nothing = plan_offload(ts, cfg, 80 * GB, n_ctx=4096, gpu_layers=0)
    assert (nothing.n_gpu, nothing.head, nothing.weights, nothing.total) == (0, False, 0, 0)
    assert nothing.describe().startswith("GPU: nothing") and not nothing.gpu_tensors
    ten = plan_offload(ts, cfg, 80 * GB, n_ctx=4096, gpu_layers=10)
    assert ten.first == 30 and ten.on_gpu("blk.30.attn_q.weight") and not ten.on_gpu("blk.29.attn_q.weight")
    assert ten.on_gpu("output.weight") and ten.describe().count("layers 0-29 on the CPU") == 1
    assert plan_offload(ts, cfg, 80 * GB, n_ctx=4096, gpu_layers=99).n_gpu == 40
    small = plan_offload(ts, cfg, 1 * GB, n_ctx=4096)
    assert small.n_gpu == 0 and not small.head and small.describe().startswith("GPU: nothing")
    with pytest.raises(GpuMemoryError, match="enough for 0 layers"):
        plan_offload(ts, cfg, 1 * GB, n_ctx=4096, gpu_layers=1)


def test_tied_head_takes_the_embedding():
    cfg = glm4_9b_config()
    ts = [t for t in model_tensors("glm4", 40, make_model.SHAPE_9B) if t[0] != "output.weight"]
    plan = plan_offload(ts, cfg, 80 * GB, n_ctx=4096)
    assert plan.on_gpu("token_embd.weight") and plan.cpu_weights == 0


@pytest.mark.parametrize("arch", ["glm4", "glm4moe"])
def test_plan_of_small_files(tmp_path, arch):
    """On files make_model.py writes and their config from the file: every byte is on one side,
    and a card too small for all layers gets the last ones."""
    path = str(tmp_path / f"{arch}.gguf")
    make_model.write(path, 4, "q4_0", arch=arch, shape=TINY)
    f = GGUFFile(path)
    cfg = (glm4_moe if arch == "glm4moe" else glm4).Config.from_gguf(f)
    total = sum(t.n_bytes for t in f.tensors.values())
    for cpu_moe in (False, True):
        plan = plan_offload(f, cfg, 64 * GB, n_ctx=256, cpu_moe=cpu_moe)
        assert plan.n_gpu == 4 and plan.weights + plan.cpu_weights == total
        on_cpu = {n for n in f.tensors if not plan.on_gpu(n)}
        want = {"token_embd.weight"} | ({n for n in f.tensors if "_exps." in n} if cpu_moe else set())
        assert on_cpu == want
    full = plan_offload(f, cfg, 64 * GB, n_ctx=256)
    head = sum(f.tensors[n].n_bytes for n in ("output.weight", "output_norm.weight"))
    per_layer = (full.weights + full.kv - head) / 4
    fixed = full.workspace - int(WORKSPACE_SHARE * full.free)       # the workspace less its share of the free memory
    free = int((fixed + full.weights + full.kv - 1.5 * per_layer) / (1 - WORKSPACE_SHARE))
    part = plan_offload(f, cfg, free, n_ctx=256)
    assert (part.n_gpu, part.first, part.head) == (2, 2, True) and part.total <= free


def test_gpu_check_reports_every_step(tmp_path):
    """tools/gpu_check.py --quick --no-install ends with a summary line per step (here, without a
    GPU: the GPU steps skipped, the plans made for nominal cards), says what is not wired yet, and
    writes its JSON and log."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools", "gpu_check.py"),
                        "--quick", "--no-install", "--out", str(out), "--files", str(tmp_path / "files")],
                       capture_output=True, text=True, timeout=600)
    summary = p.stdout[p.stdout.index("== summary"):]
    steps = ("setup", "files", "device", "compile", "matvec", "ops", "plan", "speed: gemv per type",
             "model: logits on the GPU", "model: decode speed")
    for s in steps:
        assert re.search(rf"^(ok|FAIL|skip)\s+{re.escape(s)}\s", summary, re.M), (s, summary)
    assert "not yet wired: CUDA graphs of the model's decode" in summary
    assert re.search(r"^ok\s+plan\s", summary, re.M) and "tiny-glm4moe.gguf --cpu-moe on a 24 GB card: GPU: 4/4" in p.stdout
    ok, _ = available()
    if not ok:
        assert p.returncode == 1 and re.search(r"^skip\s+matvec\s+.*no usable GPU", summary, re.M)
    import json
    facts = json.loads((out / "gpu_check.json").read_text())
    assert facts["not_yet_wired"] == "CUDA graphs of the model's decode" and len(facts["results"]) >= len(steps)
    assert "== summary" in (out / "gpu_check.log").read_text()
