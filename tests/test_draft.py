"""Drafting: GLM-4.5's MTP head against transformers' MtpModel, and speculative decoding (MTP and
prompt lookup) giving exactly the tokens of plain decoding when greedy, and the same
distribution when sampling."""
import os

import numpy as np
import pytest

import glmcpu
from conftest import test_ids as make_ids

VARIANTS = [dict(qk_norm=False, scaling=1.0), dict(qk_norm=True, scaling=2.5)]


def hf_mtp(model, hf_dir, layers):
    """transformers' MtpModel for a tiny Glm4Moe whose checkpoint holds the MTP block as layer
    `layers` (conftest.make_hf_moe(mtp=True)): the block's decoder layer is read through a
    (layers + 1)-layer model (transformers converts its experts), the rest from the file."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.modeling_layers import MtpModel

    big = transformers.Glm4MoeForCausalLM.from_pretrained(hf_dir, num_hidden_layers=layers + 1).eval()
    mtp = MtpModel(model, 1).eval()
    mtp.layers[0].mtp_block.load_state_dict(big.model.layers[layers].state_dict())
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    p = f"model.layers.{layers}."
    with torch.no_grad():
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("post_norm", "shared_head.norm")):
            getattr(mtp.layers[0], ours).weight.copy_(sd[p + theirs + ".weight"])
    return mtp


@pytest.mark.parametrize("kw", VARIANTS, ids=["plain", "qknorm-scaled"])
def test_mtp_draft_logits_match_transformers(tiny, kw):
    import torch
    model, path, hf_dir = tiny("glm4_moe", "f32", mtp=True, **kw)
    mtp = hf_mtp(model, hf_dir, 4)
    ids = make_ids(24, seed=7)
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]     # final-normed
        pos = torch.arange(1, len(ids))[None]
        h = mtp.forward_layer(0, hs[:, :-1], pos, None, input_ids=torch.tensor([ids[1:]]))
        want = mtp._project_to_logits(h)[0].float().numpy()
    m = glmcpu.load(path)
    head = m.net.draft_head()
    cache = m.net.new_cache(64)
    _, hidden = m.net.forward(ids, cache, all_logits=True, hidden=True)
    np.testing.assert_allclose(hidden, hs[0].numpy(), atol=1e-4)
    got, _ = head.forward(ids[1:], hidden[:-1], head.new_cache(64), all_logits=True)
    assert np.abs(got - want).max() <= 3e-3, np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # in pieces, through the draft head's own KV cache: the same logits
    c = head.new_cache(64)
    parts = [head.forward(ids[1 + a:1 + b], hidden[a:b], c, all_logits=True)[0] for a, b in ((0, 9), (9, 10), (10, 23))]
    np.testing.assert_allclose(np.concatenate(parts), got, atol=2e-4)


def test_dense_models_have_no_draft_head(tiny):
    _, path, _ = tiny("glm4", "f32")
    assert glmcpu.load(path).net.draft_head() is None


def greedy(m, prompt, n):
    return list(m.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))


@pytest.mark.parametrize("family,mode", [("glm4_moe", "mtp"), ("glm4_moe", "lookup"), ("glm4", "lookup"),
                                         ("glm", "lookup")])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_exactly_plain_decoding(tiny, family, mode, k):
    """200 greedy tokens with drafts = without, token for token (the kernels give a batch the
    bits they give one token); the drafts are really used and some are kept."""
    kw = dict(mtp=True, **VARIANTS[0]) if family == "glm4_moe" else {}
    _, path, _ = tiny(family, "q8_0", **kw)
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    want = greedy(glmcpu.load(path, draft="none"), prompt, 200)
    m = glmcpu.load(path, draft=mode, draft_tokens=k)
    assert greedy(m, prompt, 200) == want
    s = m.last_stats
    assert s["gen_tokens"] == 200 and s["drafted"] > 0 and s["accepted"] <= s["drafted"], s
    if mode == "lookup":         # random weights loop, so the context predicts them (MTP: see the trained model)
        assert s["accepted"] > 0, s
    # and again on the kept cache (a second turn reuses the prefix; the draft follows it)
    assert greedy(m, prompt + " jumps", 50) == greedy(glmcpu.load(path, draft="none"), prompt + " jumps", 50)
