"""GLM-4.5 (glm4moe) against transformers' Glm4MoeForCausalLM on tiny random models."""
import numpy as np
import pytest
import torch

import glmcpu
from conftest import F32_TOL, rewrite, run_cli, assert_prefill_equals_steps, hf_logits, kl, test_ids as make_ids

VARIANTS = [dict(qk_norm=False, scaling=1.0), dict(qk_norm=True, scaling=2.5)]


@pytest.mark.parametrize("kw", VARIANTS, ids=["plain", "qknorm-scaled"])
def test_f32_logits_match_transformers(tiny, kw):
    model, path, _ = tiny("glm4_moe", "f32", **kw)
    m = glmcpu.load(path, threads=2)
    c = m.cfg
    assert (c.arch, c.n_layer, c.n_dense_lead, c.n_expert, c.n_expert_used, c.n_expert_shared) == \
        ("glm4moe", 4, 1, 8, 2, 1)
    assert c.expert_scale == kw["scaling"] and c.neox
    ids = make_ids(40, seed=2)
    got, want = m.logits(ids), hf_logits(model, ids)
    assert np.abs(got - want).max() < F32_TOL
    hits = m.net.expert_stats()
    assert sorted(hits) == [1, 2, 3] and all(h.sum() == 40 * 2 for h in hits.values())


def test_correction_bias_changes_the_choice(tiny):
    """The bias must matter in these tests, or a router that ignores it would pass."""
    model, path, _ = tiny("glm4_moe", "f32", **VARIANTS[0])
    seen = {}
    gate = model.model.layers[2].mlp.gate

    def grab(mod, inp, out):
        seen.setdefault("x", inp[0].detach())
    handle = gate.register_forward_hook(grab)
    hf_logits(model, make_ids(40, seed=2))
    handle.remove()
    x = seen["x"].reshape(-1, 64)
    s = torch.sigmoid(x @ gate.weight.T)
    with_bias = torch.topk(s + gate.e_score_correction_bias, 2).indices.sort().values
    without = torch.topk(s, 2).indices.sort().values
    assert (with_bias != without).any(1).float().mean() > 0.2


@pytest.mark.parametrize("kw", VARIANTS, ids=["plain", "qknorm-scaled"])
def test_q8_0_close_to_transformers(tiny, kw):
    model, path, _ = tiny("glm4_moe", "q8_0", **kw)
    ids = make_ids(40, seed=7)
    got, want = glmcpu.load(path, threads=2).logits(ids), hf_logits(model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85
    assert kl(want, got) < 0.02


def test_prefill_equals_token_by_token(tiny):
    _, path, _ = tiny("glm4_moe", "q8_0", **VARIANTS[1])
    assert_prefill_equals_steps(glmcpu.load(path, threads=2), make_ids(33, seed=5))


def test_nextn_block_is_not_run(tiny, tmp_path):
    model, path, _ = tiny("glm4_moe", "f32", mtp=True, **VARIANTS[0])
    m = glmcpu.load(path)
    assert m.file.number("block_count") == 5 and m.file.number("nextn_predict_layers") == 1
    assert m.file.has("blk.4.nextn.eh_proj.weight") and m.cfg.n_layer == 4
    ids = make_ids(36, seed=4)
    want = hf_logits(model, ids)
    assert np.abs(m.logits(ids) - want).max() < F32_TOL
    # the same file told it has no MTP block runs all 5 blocks: the logits move
    five = str(tmp_path / "five.gguf")
    rewrite(path, five, meta={"glm4moe.nextn_predict_layers": 0})
    assert np.abs(glmcpu.load(five).logits(ids) - want).max() > 10 * F32_TOL


@pytest.fixture(scope="module")
def moe_bad(tiny, tmp_path_factory):
    _, path, _ = tiny("glm4_moe", "f32", **VARIANTS[0])
    d = tmp_path_factory.mktemp("moe_bad")
    rewrite(path, str(d / "missing.gguf"), drop=("blk.2.ffn_up_exps.weight",))
    rewrite(path, str(d / "count.gguf"), meta={"glm4moe.expert_count": 6})
    return d


@pytest.mark.parametrize("name,words", [("missing.gguf", "blk.2.ffn_up_exps.weight is missing"),
                                        ("count.gguf", "blk.1.exp_probs_b.bias has shape")])
def test_bad_moe_files(moe_bad, name, words):
    from glmcpu.errors import ModelFileError
    with pytest.raises(ModelFileError, match=words):
        glmcpu.load(str(moe_bad / name))
    p = run_cli("run", str(moe_bad / name), "-p", "hi")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and words in p.stderr


def test_expert_tensor_shape_checked(tiny, tmp_path):
    """Router and experts agree with each other but not with the metadata: the experts are named."""
    from glmcpu.errors import ModelFileError
    from glmcpu.gguf import GGUFFile
    from glmcpu.weights import FileWeights
    _, path, _ = tiny("glm4_moe", "f32", **VARIANTS[0])
    with pytest.raises(ModelFileError, match="blk.1.ffn_gate_exps.weight has shape"):
        FileWeights(GGUFFile(path)).experts("blk.1.ffn_gate_exps.weight", 32, 64, 6, 0, 6)


def test_stats_info_and_mlock(tiny):
    _, path, _ = tiny("glm4_moe", "q8_0", **VARIANTS[0])
    p = run_cli("run", path, "-p", "hello", "-n", "3", "--stats", "--mlock", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("experts used, evenness") == 3          # MoE layers 1, 2, 3
    p = run_cli("info", path)
    assert "RAM needed" in p.stdout and "read from the file on demand" in p.stdout
    m = glmcpu.load(path, mlock=True)
    assert m.expert_stats and all(h.sum() == 0 for h in m.expert_stats.values())
    list(m.generate([5, 6, 7], max_tokens=2, ignore_eos=True))
    assert all(h.sum() == (3 + 1) * 2 for h in m.expert_stats.values())   # 4 tokens run, top-2


def test_repacked_q4_0_experts(tiny):
    from glmcpu import ops
    model, path, _ = tiny("glm4_moe", "q4_0", **VARIANTS[0])
    ids = make_ids(40, seed=2)
    want = hf_logits(model, ids)
    m = glmcpu.load(path, repack="all")
    assert m.net.layers[1].ffn.experts.gu_type == ops.Q4_0X8
    packed = m.logits(ids)
    m = glmcpu.load(path, repack="none")
    assert m.net.layers[1].ffn.experts.gu_type == ops.Q4_0
    plain = m.logits(ids)
    assert (packed.argmax(-1) == plain.argmax(-1)).mean() >= 0.9
    assert kl(want, packed) < 1.5 * kl(want, plain) and kl(want, plain) < 1.5 * kl(want, packed)


def test_gate_and_up_experts_of_different_types(tiny, tmp_path):
    """GLM-4.5 files whose ffn_gate_exps and ffn_up_exps differ in type run (issue 26): F32 gate with
    Q8_0 up (their activations quantised apart), and a Q4_0 gate (8-row groups when repacked) with an
    F32 up (none), repacked or not; close to transformers."""
    from gguf import GGMLQuantizationType as GT
    model, path, _ = tiny("glm4_moe", "f32", **VARIANTS[0])
    one = str(tmp_path / "one.gguf")
    rewrite(path, one, retype=("blk.1.ffn_up_exps.weight", GT.Q8_0))
    mixed = str(tmp_path / "mixed.gguf")
    rewrite(one, mixed, retype=("blk.2.ffn_gate_exps.weight", GT.Q4_0))
    ids = make_ids(40, seed=3)
    want = hf_logits(model, ids)
    for repack in ("all", "none"):
        m = glmcpu.load(mixed, threads=2, repack=repack)
        e1, e2 = m.net.layers[1].ffn.experts, m.net.layers[2].ffn.experts
        assert (e1.gu_type, e1.up_type) == (int(GT.F32), int(GT.Q8_0)) and e2.up_type == int(GT.F32)
        got = m.logits(ids)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85
        assert kl(want, got) < 0.02
