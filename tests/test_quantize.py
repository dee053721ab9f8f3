"""Writing K-quants: the NumPy quantisers against gguf's reference dequantiser and llama.cpp's own
quantiser, the per-tensor type mix against llama.cpp's, and `glmcpu quantize` / `convert --type`
files run by llama.cpp (glmcpu cannot run K-quants until its kernels do)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from conftest import hf_logits, kl, run_cli, test_ids as make_ids
import glmcpu
from glmcpu import quants
from glmcpu.hub import demo_path
from glmcpu.quantize import FILE_TYPES, copy_metadata, tensor_types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import make_model  # noqa: E402

K_TYPES = (GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL, GT.IQ4_XS)   # glmcpu's own quantisers
# round-trip RMSE relative to the RMS of standard normal weights (measured 0.27, 0.145, 0.071,
# 0.036, 0.017)
REL_RMSE = {GT.Q2_K: 0.28, GT.Q3_K: 0.15, GT.Q4_K: 0.075, GT.Q5_K: 0.038, GT.Q6_K: 0.018, GT.IQ4_NL: 0.08,
            GT.IQ4_XS: 0.08}
CONSTANT_RTOL = 2e-3     # a constant row is one scale step: exact up to the f16 and 6-bit scales
TINY_REL_RMSE = 0.15     # weights ~1e-6: the f16 super-block scale has only a few bits left
TINY_REL_RMSE_IQ4 = 0.25  # ... and IQ4's codes meet a subnormal f16 scale with no integer scale between
                          # (measured 0.20; llama.cpp codes against the unrounded scale, far off there)
RMSE_RATIO = 1.02        # our squared-error search may be at most this much worse than llama.cpp's
LLAMA = {"q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S",
         "q6_k": "Q6_K", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
         "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}
TEXT = ("And it came to pass, when the king heard these words, that he rent his clothes, and said "
        "unto the people of the land, Go ye up, and inquire of the LORD for me, and for the people, "
        "and for all Judah, concerning the words of this book that is found: for great is the wrath.")


def rel_rmse(got, want):
    return float(np.sqrt(np.mean((got - want) ** 2) / max(np.mean(want ** 2), 1e-30)))


def round_trip(x, qtype):
    q = quants.quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == quant_shape_to_byte_shape(x.shape, qtype)
    return dequantize(q, qtype).reshape(x.shape)


# --- the quantisers on their own -------------------------------------------------------------------

@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (17, 768), (2, 3, 256)])
def test_round_trip_through_reference_dequantizer(qtype, shape):
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    y = round_trip(x, qtype)
    assert rel_rmse(y, x) < REL_RMSE[qtype]
    # what a file holds quantises to itself: the packing and the scale search agree
    assert rel_rmse(round_trip(y, qtype), y) < REL_RMSE[qtype] / 4


def extreme_inputs():
    rng = np.random.default_rng(3)
    normal = rng.standard_normal((4, 512)).astype(np.float32)
    outlier = normal.copy()
    outlier[1, 77] = 1000.0
    mixed = normal * np.array([1e-3, 1.0, 1e3, 3e4], np.float32)[:, None]   # a scale per row
    return {"zeros": np.zeros((2, 256), np.float32),
            "constant": np.array([[0.5] * 256, [-2.0] * 256, [60.0] * 256], np.float32),
            "outlier": outlier, "mixed magnitudes": mixed, "huge": normal * 3e4,
            "tiny": normal * 1e-6, "one sign": np.abs(normal), "sparse": normal * (normal > 1.5)}


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(extreme_inputs()))
def test_extreme_inputs_stay_finite_and_close(qtype, case):
    x = extreme_inputs()[case]
    y = round_trip(x, qtype)
    assert np.isfinite(y).all()
    if case in ("zeros", "constant"):
        np.testing.assert_allclose(y, x, rtol=CONSTANT_RTOL)
    elif case == "outlier":
        assert abs(y[1, 77] - 1000) < 1000 * REL_RMSE[qtype]
    elif case == "tiny":        # the f16 super-block scale is subnormal here: coarser, not zero
        tiny = TINY_REL_RMSE_IQ4 if qtype in (GT.IQ4_NL, GT.IQ4_XS) else TINY_REL_RMSE
        assert rel_rmse(y, x) < max(tiny, 1.5 * REL_RMSE[qtype])
    else:                       # every 256-block has its own scales: each row is as good as any
        for got, want in zip(y, x):
            assert rel_rmse(got, want) < 1.5 * REL_RMSE[qtype], case


# --- against llama.cpp ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, if it imports and runs here (a -march=native build dies with SIGILL on
    some VMs: try it in a child process first)."""
    mod = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to compare with llama.cpp")
    probe = ("import llama_cpp; m = llama_cpp.Llama(model_path=%r, n_ctx=32, verbose=False); "
             "m.eval([1, 2, 3])" % demo_path())
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"this llama-cpp-python build cannot run here (exit {p.returncode})")
    return mod


def llama_quantize(llama_cpp, src, dst, file_type, pure=False):
    """llama.cpp's own quantisation of src; {tensor name: type name} of what it wrote."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + LLAMA[file_type])
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return {t.name: t.tensor_type.name for t in GGUFReader(str(dst)).tensors}


def types_in(path):
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def demo_f16(tmp_path_factory):
    """The built-in demo model (trained, 256 wide, stored Q8_0) written back as an F16 GGUF: real
    weights to quantise, that llama.cpp runs."""
    path = str(tmp_path_factory.mktemp("demo") / "demo_f16.gguf")
    r = GGUFReader(demo_path())
    w = GGUFWriter(path, "glm4")
    copy_metadata(r, w)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    for t in r.tensors:
        x = dequantize(t.data, t.tensor_type).reshape([int(s) for s in reversed(t.shape)])
        w.add_tensor(t.name, x.astype(np.float16 if x.ndim > 1 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("file_type,qtype", [("q2_k", GT.Q2_K), ("q3_k_m", GT.Q3_K), ("q4_k_m", GT.Q4_K), ("q5_k_m", GT.Q5_K),
                                             ("q6_k", GT.Q6_K), ("iq4_nl", GT.IQ4_NL), ("iq4_xs", GT.IQ4_XS)])
def test_error_no_worse_than_llama_cpp(llama_cpp, demo_f16, tmp_path, file_type, qtype):
    """Every matrix of the demo model (llama.cpp's --pure), ours and llama.cpp's, against the
    F16 weights both started from."""
    theirs_path = tmp_path / "theirs.gguf"
    llama_quantize(llama_cpp, demo_f16, theirs_path, file_type, pure=True)
    src = {t.name: t for t in GGUFReader(demo_f16).tensors}
    ours_err = theirs_err = 0.0
    for t in GGUFReader(str(theirs_path)).tensors:
        if t.tensor_type != qtype:
            continue
        x = np.asarray(src[t.name].data, np.float32).reshape(-1, int(t.shape[0]))
        ours_err += ((round_trip(x, qtype) - x) ** 2).sum()
        theirs_err += ((dequantize(t.data, qtype).reshape(x.shape) - x) ** 2).sum()
    ratio = np.sqrt(ours_err / theirs_err)
    print(f"{qtype.name}: RMSE ours / llama.cpp = {ratio:.4f}")
    assert theirs_err > 0 and ratio <= RMSE_RATIO


# shapes with rows of whole 256-blocks and with rows that fall back (320, 96 * 2, 160)
SHAPES = {"256": dict(d=256, ff=512, heads=2, kv=1, head_dim=128, vocab=512, first_special=500),
          "odd": dict(d=256, ff=320, heads=2, kv=1, head_dim=96, vocab=512, first_special=500)}
MIX_CASES = {
    "glm4-3": ("glm4", 3, SHAPES["256"]),
    "glm4-12": ("glm4", 12, SHAPES["256"]),          # 12 layers: use_more_bits is not just ends
    "glm4-odd-9": ("glm4", 9, SHAPES["odd"]),
    "chatglm-qkv-10": ("chatglm", 10, SHAPES["256"]),
    "glm4moe-10": ("glm4moe", 10, dict(SHAPES["256"], experts=4, used=2, ff_exp=256, dense=1)),
    "glm4moe-8-experts-odd-5": ("glm4moe", 5, dict(SHAPES["odd"], experts=8, used=2, ff_exp=160, dense=1)),
}


@pytest.mark.parametrize("case", list(MIX_CASES))
def test_mix_matches_llama_cpp(llama_cpp, tmp_path, case):
    arch, layers, shape = MIX_CASES[case]
    src = tmp_path / "f16.gguf"
    make_model.write(str(src), layers, "f16", arch=arch, shape=shape)
    tensors = {t.name: (tuple(int(s) for s in reversed(t.shape)), t.tensor_type) for t in GGUFReader(str(src)).tensors}
    for file_type in LLAMA:
        want = llama_quantize(llama_cpp, src, tmp_path / f"{file_type}.gguf", file_type)
        got = tensor_types(tensors, file_type, layers, shape.get("experts", 0), n_gqa=shape["heads"] // shape["kv"])
        diff = {n: (want[n], got[n].name) for n in want if want[n] != got[n].name}
        assert not diff and set(got) == set(want), f"{file_type}: llama.cpp vs glmcpu {diff}"


def test_pure_matches_llama_cpp(llama_cpp, tmp_path):
    """--pure: every quantisable matrix in the file type's own type, fallbacks still applied."""
    arch, layers, shape = MIX_CASES["glm4moe-8-experts-odd-5"]
    src = tmp_path / "f16.gguf"
    make_model.write(str(src), layers, "f16", arch=arch, shape=shape)
    tensors = {t.name: (tuple(int(s) for s in reversed(t.shape)), t.tensor_type) for t in GGUFReader(str(src)).tensors}
    for file_type in ("q4_k_m", "q6_k", "q4_0"):
        want = llama_quantize(llama_cpp, src, tmp_path / f"{file_type}.gguf", file_type, pure=True)
        got = tensor_types(tensors, file_type, layers, shape["experts"], pure=True,
                           n_gqa=shape["heads"] // shape["kv"])
        assert want == {n: t.name for n, t in got.items()}, file_type


def logits_of(llama_cpp, path, ids=None, text=TEXT):
    """llama.cpp's logits [n_tokens, n_vocab] for token ids, or for the tokens of text."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                          n_threads=2)
    ids = ids if ids is not None else llm.tokenize(text.encode(), add_bos=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


# top-1 agreement with llama.cpp's own file of the type, and with the F16 model
TOP1 = {"q2_k": (0.7, 0.7), "q3_k_m": (0.85, 0.8), "q4_k_m": (0.9, 0.85), "q5_k_m": (0.95, 0.9), "q6_k": (0.95, 0.95),
        "iq4_nl": (0.9, 0.85), "iq4_xs": (0.9, 0.85)}
KL_RATIO = 1.5          # KL(F16 || ours) may be at most this times KL(F16 || llama.cpp's)
CONVERT_KL = 0.05       # tiny converted Q5_0/Q8_0 model vs transformers


@pytest.mark.parametrize("file_type", list(TOP1))
def test_quantize_cli_agrees_with_llama_cpp(llama_cpp, demo_f16, tmp_path, file_type):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    p = run_cli("quantize", demo_f16, str(ours), "--type", file_type, "--quiet")
    assert p.returncode == 0, p.stderr
    assert types_in(ours) == llama_quantize(llama_cpp, demo_f16, theirs, file_type)
    r_ours, r_theirs = GGUFReader(str(ours)), GGUFReader(str(theirs))
    assert set(r_ours.fields) == set(r_theirs.fields)
    for key in ("general.file_type", "general.quantization_version", "tokenizer.ggml.merges",
                "tokenizer.ggml.tokens", "glm4.rope.freq_base"):
        assert r_ours.fields[key].contents() == r_theirs.fields[key].contents(), key
    ids = glmcpu.load(demo_f16).tokenizer.encode(TEXT)
    ref, a, b = (logits_of(llama_cpp, p, ids) for p in (demo_f16, ours, theirs))
    # glmcpu runs the file it wrote as llama.cpp does
    g = glmcpu.load(str(ours), threads=2).logits(ids)
    same, k_engines = (g.argmax(-1) == a.argmax(-1)).mean(), kl(a, g)
    print(f"{file_type}: glmcpu vs llama.cpp on glmcpu's file: top-1 {same:.3f}, KL {k_engines:.2e}")
    assert same >= 0.95 and k_engines < 2e-3
    top_theirs, top_ref = (a.argmax(-1) == b.argmax(-1)).mean(), (a.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{file_type}: top-1 vs llama.cpp's {top_theirs:.3f}, vs F16 {top_ref:.3f} (llama.cpp's "
          f"{(b.argmax(-1) == ref.argmax(-1)).mean():.3f}); KL(F16 || ours) {kl(ref, a):.2e}, "
          f"KL(F16 || llama.cpp's) {kl(ref, b):.2e}")
    assert top_theirs >= TOP1[file_type][0] and top_ref >= TOP1[file_type][1]
    assert kl(ref, a) <= KL_RATIO * kl(ref, b)


@pytest.mark.parametrize("family,kw", [("glm4", dict(layers=12)), ("glm4_moe", dict(mtp=True))],
                         ids=["glm4-12-layers", "glm4moe-mtp"])
def test_convert_k_quant_mix_runs_in_llama_cpp(llama_cpp, tiny, tmp_path, family, kw):
    """convert --type q4_k_m writes what llama.cpp's Q4_K_M of the F32 conversion holds (these tiny
    models are 64 wide, so the K types fall back: the mix still shows), and llama.cpp runs it."""
    model, f32_path, hf = tiny(family, "f32", **kw)
    out = tmp_path / "q4_k_m.gguf"
    p = run_cli("convert", hf, "-o", str(out), "--type", "q4_k_m", "--quiet")
    assert p.returncode == 0, p.stderr
    assert types_in(out) == llama_quantize(llama_cpp, f32_path, tmp_path / "theirs.gguf", "q4_k_m")
    assert GGUFReader(str(out)).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    if family == "glm4":            # transformers does not run the MTP layer llama.cpp would load
        ids = make_ids(24, seed=5)
        assert kl(hf_logits(model, ids), logits_of(llama_cpp, out, ids)) < CONVERT_KL


def make_hf_wide(folder, layers=2):
    """A random Glm4ForCausalLM whose matrices have rows of whole 256-blocks."""
    import torch
    import transformers
    from conftest import N_VOCAB, make_tokenizer, randomize

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.Glm4Config(
        vocab_size=N_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128, partial_rotary_factor=0.5,
        rms_norm_eps=1e-5, attention_bias=True, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = randomize(transformers.Glm4ForCausalLM(cfg).eval(), 0.05)
    model.save_pretrained(folder)
    return model


def test_convert_writes_k_quant_blocks(llama_cpp, tmp_path):
    """Rows of whole 256-blocks: convert --type q6_k / q4_k_m write real K blocks, typed as
    llama.cpp types them, close to transformers when llama.cpp runs them."""
    hf = str(tmp_path / "hf")
    model = make_hf_wide(hf)
    from glmcpu.convert import convert
    convert(hf, str(tmp_path / "f32.gguf"), "f32")
    ids = make_ids(24, seed=5)
    want = hf_logits(model, ids)
    for file_type in ("q6_k", "q4_k_m"):
        out = tmp_path / f"{file_type}.gguf"
        p = run_cli("convert", hf, "-o", str(out), "--type", file_type, "--quiet")
        assert p.returncode == 0, p.stderr
        types = types_in(out)
        assert types == llama_quantize(llama_cpp, tmp_path / "f32.gguf", tmp_path / "theirs.gguf", file_type)
        assert {"Q6_K"} <= set(types.values())
        got = logits_of(llama_cpp, out, ids)
        theirs = logits_of(llama_cpp, tmp_path / "theirs.gguf", ids)
        print(f"convert {file_type}: KL(transformers || ours) {kl(want, got):.2e}, "
              f"|| llama.cpp's {kl(want, theirs):.2e}")
        assert kl(want, got) <= KL_RATIO * kl(want, theirs)


# --- bad input ----------------------------------------------------------------------------------

def test_quantize_cli_errors_are_one_line(tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    out = str(tmp_path / "out.gguf")
    cases = {"missing": [str(tmp_path / "nope.gguf"), out],
             "not a GGUF": [str(not_gguf), out],
             "already quantised": [demo_path(), out],
             "same file": [demo_path(), demo_path()]}
    for why, args in cases.items():
        p = run_cli("quantize", *args, "--type", "q4_k_m", "--quiet")
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("glmcpu: error:"), (why, p.stderr)
    assert not os.path.exists(out)


def test_every_file_type_has_a_llama_cpp_name():
    assert set(LLAMA) | {"f32", "f16", "bf16"} == set(FILE_TYPES)
