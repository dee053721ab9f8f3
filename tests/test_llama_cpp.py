"""Peer check with llama.cpp (llama-cpp-python) on the very same GGUF files.

- each engine reads the other's files: llama.cpp loads what glmcpu's converter writes, glmcpu loads
  what llama.cpp's own quantiser writes;
- on a Q8_0 file glmcpu is at least as close to transformers as llama.cpp is (KL within 1.5x)."""
import numpy as np
import pytest

import glmcpu
from conftest import hf_logits, kl, test_ids as make_ids

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to compare with llama.cpp")


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_runs_here(tiny):
    """A llama.cpp built with -march=native on a VM that lists AMX it cannot run dies with SIGILL,
    taking pytest with it: try it once in a child process first."""
    import subprocess
    import sys
    _, path, _ = tiny("glm4", "q8_0")
    probe = ("import llama_cpp; m = llama_cpp.Llama(model_path=%r, n_ctx=32, verbose=False); "
             "m.eval([1, 2, 3])" % path)
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"this llama-cpp-python build cannot run here (exit {p.returncode}); rebuild it with "
                    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                    "pip install --no-cache-dir --force-reinstall llama-cpp-python")

KL_RATIO = 1.5        # glmcpu's KL to transformers may be at most this times llama.cpp's
LLAMA_F32_TOL = 2e-2  # llama.cpp keeps its KV cache in f16: ~1e-3 off transformers on tiny models


def llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close() if hasattr(llm, "close") else None
    return out


@pytest.mark.parametrize("family,fuse", [("glm", False), ("glm", True), ("glm4", False)])
def test_llama_cpp_reads_glmcpu_files(tiny, family, fuse):
    model, path, _ = tiny(family, "f32", fuse_qkv=fuse)
    ids = make_ids(36, seed=11)
    want = hf_logits(model, ids)
    assert np.abs(llama_logits(path, ids) - want).max() < LLAMA_F32_TOL


def assert_kl_within_llama_cpp(model, path, label, top1):
    """glmcpu's top-1 agreement with transformers >= top1, and its KL at most KL_RATIO x llama.cpp's."""
    ids = make_ids(40, seed=7)
    want = hf_logits(model, ids)
    ours = glmcpu.load(path, threads=2).logits(ids)
    kl_ours, kl_theirs = kl(want, ours), kl(want, llama_logits(path, ids))
    print(f"{label}: KL(transformers || glmcpu) = {kl_ours:.3e}, KL(transformers || llama.cpp) = {kl_theirs:.3e}")
    assert (ours.argmax(-1) == want.argmax(-1)).mean() >= top1
    assert kl_ours <= KL_RATIO * kl_theirs


@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_q8_0_kl_against_llama_cpp(tiny, family):
    model, path, _ = tiny(family, "q8_0")
    assert_kl_within_llama_cpp(model, path, family, 0.9)


@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_glmcpu_reads_llama_cpp_quantized_files(tiny, tmp_path, family):
    model, path, _ = tiny(family, "f32")
    out = str(tmp_path / "llama_q8_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(path.encode(), out.encode(), params) == 0
    m = glmcpu.load(out, threads=2)
    assert any(t.tensor_type.name == "Q8_0" for t in m.file.tensors.values())
    ids = make_ids(36, seed=13)
    got, want = m.logits(ids), hf_logits(model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert kl(want, got) < 0.01


@pytest.mark.parametrize("kw", [dict(qk_norm=False, scaling=1.0), dict(qk_norm=True, scaling=2.5)],
                         ids=["plain", "qknorm-scaled"])
def test_moe_q8_0_kl_against_llama_cpp(tiny, kw):
    model, path, _ = tiny("glm4_moe", "q8_0", **kw)
    assert_kl_within_llama_cpp(model, path, f"glm4moe {kw}", 0.85)


def test_llama_cpp_reads_glmcpu_moe_file(tiny):
    model, path, _ = tiny("glm4_moe", "f32", qk_norm=True, scaling=2.5)
    ids = make_ids(36, seed=11)
    assert np.abs(llama_logits(path, ids) - hf_logits(model, ids)).max() < LLAMA_F32_TOL


# ---- K-quant files written by llama.cpp's own quantiser ---------------------------------------
KQ_DENSE = dict(hidden=256, ffn=512, head_dim=64, layers=2)          # every width a multiple of 256
KQ_MOE = dict(hidden=256, ffn=512, expert_ffn=256, head_dim=64, layers=2)  # dense layer + MoE layer


def llama_quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) == 0
    return dst


def dequantized_copy(src, dst):
    """The same model with every tensor dequantised to F32 by gguf.quants: the exact math of a
    quantised file, run by glmcpu's float kernels."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for t in r.tensors:
        v = quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, v.reshape([int(n) for n in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def assert_agrees_with_llama_cpp(path, label, top1=0.95, kl_max=0.002, exact=None):
    """glmcpu's and llama.cpp's logits on the same file: top-1 agreement and KL(llama.cpp || glmcpu).
    With `exact` (the file dequantised to F32), glmcpu must also be as close to it as llama.cpp is."""
    # two prompts (80 positions): random tiny models have near-ties, so fewer would be noisy
    m = glmcpu.load(path, threads=2)
    ref = glmcpu.load(exact, threads=2) if exact else None
    ours, theirs, want = [], [], []
    for seed in (1, 2):
        ids = make_ids(40, seed=seed)
        ours.append(m.logits(ids))
        theirs.append(llama_logits(path, ids))
        want.append(ref.logits(ids) if ref else ours[-1])
    ours, theirs, want = np.concatenate(ours), np.concatenate(theirs), np.concatenate(want)
    agree, k = (ours.argmax(-1) == theirs.argmax(-1)).mean(), kl(theirs, ours)
    print(f"{label}: top-1 agreement with llama.cpp {agree:.3f}, KL(llama.cpp || glmcpu) = {k:.3e}")
    assert agree >= top1
    assert k <= kl_max
    if exact:
        k_ours, k_theirs = kl(want, ours), kl(want, theirs)
        print(f"{label}: KL(exact || glmcpu) = {k_ours:.3e}, KL(exact || llama.cpp) = {k_theirs:.3e}")
        assert k_ours <= KL_RATIO * k_theirs


def types_in(path, part=""):
    from glmcpu.gguf import GGUFFile
    return {t.tensor_type.name for n, t in GGUFFile(path).tensors.items() if part in n}


@pytest.mark.parametrize("family,kw", [("glm4", KQ_DENSE), ("glm4_moe", KQ_MOE)], ids=["glm4", "glm4moe"])
def test_llama_cpp_q4_k_m_files(tiny, tmp_path, family, kw):
    """What most people download: llama.cpp's Q4_K_M, a mix of Q4_K and Q6_K (issue 7)."""
    _, path, _ = tiny(family, "f32", **kw)
    out = llama_quantize(path, str(tmp_path / "q4_k_m.gguf"), "Q4_K_M")
    assert {"Q4_K", "Q6_K"} <= types_in(out, "_exps." if family == "glm4_moe" else "")
    exact = dequantized_copy(out, str(tmp_path / "exact_f32.gguf"))
    assert_agrees_with_llama_cpp(out, f"{family} Q4_K_M", kl_max=0.005, exact=exact)


@pytest.mark.parametrize("ftype,must", [("Q5_K_M", {"Q5_K", "Q6_K"}), ("Q6_K", {"Q6_K"}),
                                        ("Q3_K_M", {"Q3_K"}), ("Q2_K", {"Q2_K"}),
                                        ("Q4_1", {"Q4_1"}), ("Q5_0", {"Q5_0"}), ("Q5_1", {"Q5_1"}), ("Q8_0", {"Q8_0"})])
def test_llama_cpp_other_quant_files(tiny, tmp_path, ftype, must):
    _, path, _ = tiny("glm4", "f32", **KQ_DENSE)
    out = llama_quantize(path, str(tmp_path / f"{ftype}.gguf"), ftype)
    assert must <= types_in(out)
    # top-1 0.9: on this tiny random model even Q8_0 files agree only ~0.96 (near-ties in the
    # logits); the KL bound is what catches a wrong kernel (a wrong layout gives KL >> 0.01)
    assert_agrees_with_llama_cpp(out, ftype, top1=0.9)


def test_bench_tiles_a_llama_cpp_state(tiny):
    """tools/bench.py --tile: llama.cpp's state of n cells repeated twice loads into a fresh
    context, which then holds positions 0..2n-1 and writes the same bytes back (the layout as
    this llama.cpp reads and writes it); a state cut short is refused."""
    import ctypes
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import bench
    _, path, _ = tiny("glm4", "q8_0")
    kw = dict(model_path=path, n_ctx=128, n_batch=64, n_ubatch=64, flash_attn=True, type_k=1, type_v=1,
              verbose=False, n_threads=2)
    llm = llama_cpp.Llama(**kw)
    llm.eval(list(range(1, 41)))
    blob = bench.tile_llama_state(llm.save_state().llama_state, 2)
    two = llama_cpp.Llama(**kw)
    ctx = two._ctx.ctx
    assert llama_cpp.llama_state_set_data(ctx, (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob), len(blob)) == len(blob)
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 0) == 79
    size = llama_cpp.llama_state_get_size(ctx)
    buf = (ctypes.c_uint8 * size)()
    n = llama_cpp.llama_state_get_data(ctx, buf, size)
    assert bytes(buf[:n]) == blob
    with pytest.raises(ValueError):
        bench.tile_llama_state(blob[:-3], 2)


# the MoE's expert width 96 is no multiple of 256 (GLM-4.5-Air's 1408 is not either): llama.cpp
# falls back per tensor there (IQ4_NL in the IQ4_XS mix; Q4_0 in this version's Q2_K / Q3_K_S)
IQ_MOE = dict(hidden=256, ffn=512, expert_ffn=96, head_dim=64, layers=3)


@pytest.mark.parametrize("family,kw", [("glm4", KQ_DENSE), ("glm4_moe", IQ_MOE)], ids=["glm4", "glm4moe"])
@pytest.mark.parametrize("ftype,must", [("Q2_K", {"Q2_K"}), ("Q3_K_S", {"Q3_K"}), ("IQ4_NL", {"IQ4_NL"}),
                                        ("IQ4_XS", {"IQ4_XS"}), ("IQ3_S", {"IQ3_S"}), ("IQ3_M", {"IQ3_S"})])
def test_llama_cpp_low_bit_and_iq4_files(tiny, tmp_path, family, kw, ftype, must):
    """The small mixes people download (issue 26), written by llama.cpp's own quantiser: glmcpu's
    KL to the F32 model is within 1.1x of llama.cpp's on the same file (measured 0.997-1.002,
    2026-12-07), over three prompts."""
    _, f32, _ = tiny(family, "f32", **kw)
    out = llama_quantize(f32, str(tmp_path / f"{ftype}.gguf"), ftype)
    assert must <= types_in(out)
    if ftype == "IQ4_XS" and family == "glm4_moe":
        assert "IQ4_NL" in types_in(out, "ffn_down_exps")           # the 96-wide rows' fallback
    ref, m = glmcpu.load(f32, threads=2), glmcpu.load(out, threads=2)
    ours, theirs = [], []
    for seed in (1, 2, 3):
        ids = make_ids(40, seed=seed)
        want = ref.logits(ids)
        ours.append(kl(want, m.logits(ids)))
        theirs.append(kl(want, llama_logits(out, ids)))
    print(f"{family} {ftype}: KL(F32 || glmcpu) = {np.mean(ours):.4e}, KL(F32 || llama.cpp) = {np.mean(theirs):.4e}")
    assert np.mean(ours) <= 1.1 * np.mean(theirs)


# llama.cpp quantises to IQ3_XXS, IQ2_* and IQ1_* only with an importance matrix, which
# llama-cpp-python cannot pass: those types are checked on files of random valid blocks instead
@pytest.mark.parametrize("qtype", ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M"])
def test_llama_cpp_reads_iq_blocks_as_glmcpu(tiny, tmp_path, qtype):
    """Two matrices of a tiny GLM-4 stored as random blocks of an IQ type: glmcpu and llama.cpp are
    as close to the exact model (the blocks dequantised to F32) as each other, and closer to each
    other than to it: both read the blocks alike, and differ only in rounding (measured: KL ratio
    0.91-1.03, the engines' KL 0.27x that to the exact model, 2026-12)."""
    from gguf import GGMLQuantizationType as GT
    import test_iquants
    _, f32, _ = tiny("glm4", "f32", **KQ_DENSE)
    path, exact = str(tmp_path / "iq.gguf"), str(tmp_path / "exact.gguf")
    test_iquants.write_iq_model(f32, path, exact, seed=int(GT[qtype]),
                                places={"blk.0.ffn_up.weight": GT[qtype], "blk.1.attn_output.weight": GT[qtype]})
    ids = make_ids(40, seed=1)
    want, ours, theirs = glmcpu.load(exact, threads=2).logits(ids), glmcpu.load(path, threads=2).logits(ids), \
        llama_logits(path, ids)
    k_ours, k_theirs, k_both = kl(want, ours), kl(want, theirs), kl(ours, theirs)
    print(f"{qtype}: KL(exact || glmcpu) = {k_ours:.3e}, KL(exact || llama.cpp) = {k_theirs:.3e}, "
          f"KL(glmcpu || llama.cpp) = {k_both:.3e}")
    assert k_ours <= 1.2 * k_theirs and k_both <= 0.5 * k_theirs
