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
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()     # the issue asks <= 3e-3; it is ~2e-6
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


def chi2_ok(counts, probs, z=3.29):
    """Pearson's chi-square of counts against probs, below its 0.9995 quantile (Wilson-Hilferty)."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    n = counts.sum()
    stat = ((counts - n * probs) ** 2 / (n * probs)).sum()
    k = len(counts) - 1
    return stat < k * (1 - 2 / (9 * k) + z * np.sqrt(2 / (9 * k))) ** 3, stat


@pytest.mark.parametrize("case", ["close", "far", "sure-guess", "outside"])
def test_speculative_sampling_keeps_the_distribution(case):
    """draft.verify on one position: whatever the draft's distribution q, the token that comes
    out (kept guess or residual draw) follows the model's p (chi-square over 40,000 draws)."""
    from glmcpu.draft import verify
    from glmcpu.sampling import Sampler
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    ids, p = s.distribution(logits, [])
    p_full = np.zeros(6)
    p_full[ids] = p
    q_ids = np.arange(6)
    q = {"close": [0.35, 0.3, 0.15, 0.1, 0.06, 0.04], "far": [0.02, 0.02, 0.06, 0.1, 0.3, 0.5],
         "sure-guess": None, "outside": [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]}[case]
    counts = np.zeros(6)
    kept = 0
    for _ in range(40_000):
        if q is None:
            d, dists = 2, None                                      # prompt lookup: a sure guess of token 2
        else:
            d = int(rng.choice(6, p=q))
            dists = [(q_ids, np.asarray(q))]
        n, nxt = verify(s, np.stack([logits, logits]), [d], dists, [])
        counts[d if n == 1 else nxt] += 1
        kept += n
    ok, stat = chi2_ok(counts, p_full)
    assert ok, (counts / counts.sum(), p_full, stat)
    assert 0 < kept < 40_000


def test_sampled_generation_keeps_its_distribution(tiny):
    """End to end on a tiny MoE model with its MTP head: the joint distribution of the first two
    sampled tokens (over 500 seeds) is the same with and without drafting (two-sample chi-square)."""
    from glmcpu.draft import make
    from glmcpu.generate import generate_ids
    from glmcpu.sampling import Sampler
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    m = glmcpu.load(path, draft="none")
    ids = make_ids(8, seed=3)
    counts = []
    for mode in ("none", "mtp"):
        c = {}
        for seed in range(500):
            sampler = Sampler(temperature=1.5, top_k=4, top_p=1.0, min_p=0.0, seed=seed)
            stats = {}
            toks = tuple(generate_ids(m.net, m.net.new_cache(32), ids, sampler, 3, set(), stats,
                                      draft=make(mode, m.net, 32), n_draft=1))[:2]
            assert mode == "none" or stats["drafted"] >= 1
            c[toks] = c.get(toks, 0) + 1
        counts.append(c)
    keys = sorted(set(counts[0]) | set(counts[1]), key=lambda k: -(counts[0].get(k, 0) + counts[1].get(k, 0)))
    a = np.array([counts[0].get(k, 0) for k in keys], float)
    b = np.array([counts[1].get(k, 0) for k in keys], float)
    big = (a + b) >= 20                                       # expected counts >= 10; the rest pooled
    a, b = np.append(a[big], a[~big].sum()), np.append(b[big], b[~big].sum())
    a, b = a[a + b > 0], b[a + b > 0]
    assert (a != b).any()                                     # the drafts changed which seed gives what
    pooled = (a + b) / (a + b).sum()
    stat = (((a - a.sum() * pooled) ** 2 + (b - b.sum() * pooled) ** 2) / (a.sum() * pooled)).sum()
    k = len(a) - 1
    assert k >= 3 and stat < k * (1 - 2 / (9 * k) + 3.29 * np.sqrt(2 / (9 * k))) ** 3, (a, b, stat)


def test_cli_draft_options(tiny):
    """--draft mtp shows its acceptance in the speed line; on a file without the head it is one
    line and exit 1; info names the head."""
    from conftest import run_cli
    _, moe, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    _, dense, _ = tiny("glm4", "f32")
    p = run_cli("run", moe, "-p", "hello", "-n", "6", "--draft", "mtp", "--ignore-eos", "--temperature", "0")
    assert p.returncode == 0 and "| draft: " in p.stderr and " accepted" in p.stderr, p.stderr
    p = run_cli("run", dense, "-p", "hello", "-n", "2", "--draft", "mtp")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no MTP head" in p.stderr, p.stderr
    p = run_cli("run", dense, "-p", "hello", "-n", "6", "--draft", "lookup", "--draft-tokens", "2", "--raw")
    assert p.returncode == 0, p.stderr
    assert "MTP block 4" in run_cli("info", moe).stdout


def test_server_reports_predicted_tokens(tiny):
    """The server's usage says how many guessed tokens were kept, in OpenAI's fields."""
    import json
    import threading
    import urllib.request

    from glmcpu.server import API, Server
    _, moe, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    api = API(glmcpu.load(moe, draft="mtp"))
    srv = Server(api, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"model": api.name, "prompt": "hello", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(srv.url + "/v1/completions", body, {"Content-Type": "application/json"})
        usage = json.load(urllib.request.urlopen(req, timeout=60))["usage"]
        d = usage["completion_tokens_details"]
        assert d["accepted_prediction_tokens"] + d["rejected_prediction_tokens"] > 0, usage
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_draft_that_is_never_right_is_dropped(tiny):
    """A random MTP head is almost never right: after the trial guesses the generation decodes
    plainly (few guesses in 200 tokens), and its output is still plain decoding's."""
    from glmcpu.generate import DRAFT_TRIAL
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    prompt = make_ids(8, seed=9)
    m = glmcpu.load(path, draft="mtp")
    assert greedy(m, prompt, 200) == greedy(glmcpu.load(path, draft="none"), prompt, 200)
    s = m.last_stats
    assert s["accepted"] < 0.4 * s["drafted"] and s["drafted"] <= DRAFT_TRIAL + 5, s


def test_a_reduced_draft_vocabulary_changes_guesses_not_output(tiny):
    """--draft-vocab: the MTP head reads only the first N rows of the head; its guesses lie
    below N, and greedy output is still plain decoding's."""
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    m = glmcpu.load(path, draft="mtp", draft_vocab=96)
    head = m.net.draft_head()
    assert head.vocab == 96 and head.head.n_out == 96
    assert greedy(m, prompt, 60) == greedy(glmcpu.load(path, draft="none"), prompt, 60)
    from glmcpu.sampling import Sampler
    d = m.cache.draft
    guesses, _ = d.propose(list(m.cache.tokens[:20]), 3, Sampler(temperature=0))
    assert all(g < 96 for g in guesses)


def test_bench_draft_byte_model_and_routing(tiny):
    """tools/bench_draft.py: the weight bytes a pass of T tokens reads (every tensor but the
    embedding, routed experts by the expected share of k of n picked at random per token) and
    its random-routing switch, which sends consecutive tokens to different experts and puts the
    router back afterwards."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import bench_draft
    from glmcpu.models import glm4_moe
    _, path, _ = tiny("glm4_moe", "q8_0", mtp=True, **VARIANTS[0])
    m = glmcpu.load(path, draft="none")
    cfg, f = m.cfg, m.net.file
    n, k = cfg.n_expert, cfg.n_expert_used
    mtp = f"blk.{cfg.n_layer}."
    exps = sum(t.n_bytes for name, t in f.tensors.items() if "_exps." in name and not name.startswith(mtp))
    rest = sum(t.n_bytes for name, t in f.tensors.items()
               if "_exps." not in name and not name.startswith(mtp) and name != "token_embd.weight")
    reads, guess = bench_draft.weight_bytes(f, cfg)
    for T in (1, 2, 3, 4):
        assert reads[T] == pytest.approx(rest + exps * (1 - (1 - k / n) ** T))
    head = f.tensors.get("output.weight", f.tensors["token_embd.weight"]).n_bytes
    _, small = bench_draft.weight_bytes(f, cfg, vocab=cfg.n_vocab // 4)
    assert guess - small == pytest.approx(head * (1 - (cfg.n_vocab // 4) / cfg.n_vocab))
    ids = make_ids(24, seed=3)

    def routes():
        return np.concatenate(bench_draft.routes(m, ids))

    own = glm4_moe.Router.__call__
    plain = routes()
    assert np.array_equal(plain, routes())
    with bench_draft.random_routing():
        a, b = routes(), routes()
        assert not np.array_equal(a, b) and not np.array_equal(a, plain)
        assert all(len(set(r)) == k for r in a)
        assert 0 <= bench_draft.expert_overlap(m, 24) < k
    assert glm4_moe.Router.__call__ is own and np.array_equal(plain, routes())


def test_draft_policy():
    """generate.pays: the trial guesses are drafted; past them, a draft kept too rarely stops;
    otherwise PLAIN_PROBE plain steps are timed first, then drafting goes on only while its steps
    give more tokens a second than plain ones."""
    from glmcpu.generate import DRAFT_TRIAL, PLAIN_PROBE, pays
    none = {True: [0.0, 0], False: [0.0, 0]}
    assert pays(dict(drafted=0, accepted=0), none)
    assert pays(dict(drafted=DRAFT_TRIAL - 1, accepted=0), none)
    good = dict(drafted=DRAFT_TRIAL, accepted=DRAFT_TRIAL)
    assert not pays(dict(drafted=DRAFT_TRIAL, accepted=0), none)
    assert not pays(good, {True: [1.0, 40], False: [0.1, PLAIN_PROBE - 1]})     # still probing
    assert pays(good, {True: [1.0, 40], False: [0.2, PLAIN_PROBE]})             # 40/s vs 20/s
    assert not pays(good, {True: [1.0, 40], False: [0.05, PLAIN_PROBE]})        # 40/s vs 80/s


def test_a_slow_draft_is_dropped_after_timing_plain_steps(tiny, monkeypatch):
    """A draft that is always right but slower than decoding (its guesses cost 20 ms each) is
    dropped once the plain steps are timed; the output is still plain decoding's."""
    import time
    from glmcpu import draft as draft_mod
    from glmcpu.generate import DRAFT_TRIAL
    _, path, _ = tiny()
    prompt = make_ids(8, seed=5)
    want = greedy(glmcpu.load(path, draft="none"), prompt, 120)
    m = glmcpu.load(path, draft="lookup", draft_tokens=1)
    own = draft_mod.LookupDraft.propose
    oracle = glmcpu.load(path, draft="none")

    def slow_right_guess(self, seq, k, sampler):
        time.sleep(0.02)
        return [int(np.argmax(oracle.logits(list(seq))[-1]))], None
    monkeypatch.setattr(draft_mod.LookupDraft, "propose", slow_right_guess)
    try:
        assert greedy(m, prompt, 120) == want
    finally:
        monkeypatch.setattr(draft_mod.LookupDraft, "propose", own)
    s = m.last_stats
    assert s["accepted"] == s["drafted"] == DRAFT_TRIAL, s
