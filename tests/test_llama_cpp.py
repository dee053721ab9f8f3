"""Peer check with llama.cpp (llama-cpp-python) on the very same GGUF files.

- each engine reads the other's files: llama.cpp loads what glmcpu's converter writes, glmcpu loads
  what llama.cpp's own quantiser writes;
- on a Q8_0 file glmcpu is at least as close to transformers as llama.cpp is (KL within 1.5x)."""
import numpy as np
import pytest

import glmcpu
from conftest import hf_logits, test_ids as make_ids
from test_models import kl

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
