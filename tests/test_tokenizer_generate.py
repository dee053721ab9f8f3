"""Tokenizer from GGUF metadata vs tokenizer.json, streaming text, chat template, sampling, stops."""
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

import glmcpu
from glmcpu.sampling import Sampler
from glmcpu.tokenizer import Detokenizer, Tokenizer

SAMPLES = ["Hello world", "The quick brown fox, 12345 jumps!\n\n  indented\tTab",
           "Über café naïve — ünïcödé 🙂🙂 text", "[gMASK]<sop><|user|>\nhi<|assistant|>",
           "don't won't I'll we've", "   leading spaces and trailing   "]


@pytest.fixture(scope="module")
def model(tiny):
    _, path, hf = tiny("glm4", "q8_0")
    return glmcpu.load(path, threads=2), hf


def test_gguf_tokenizer_encodes_like_tokenizer_json(model):
    m, hf = model
    ref = HFTokenizer.from_file(f"{hf}/tokenizer.json")
    for s in SAMPLES:
        assert m.tokenizer.encode(s) == ref.encode(s, add_special_tokens=False).ids, s
        assert m.tokenizer.decode(m.tokenizer.encode(s)) == s
    ids = m.tokenizer.encode("[gMASK]<sop><|user|>")
    assert [m.tokenizer.decode([i]) for i in ids] == ["[gMASK]", "<sop>", "<|user|>"]
    assert Tokenizer.from_dir(hf).encode(SAMPLES[2]) == m.tokenizer.encode(SAMPLES[2])


def test_stream_never_splits_a_character(model):
    m, _ = model
    text = "Über 🙂 naïve — 🙂🙂 ok"
    ids = m.tokenizer.encode(text)
    # byte-level BPE splits the emoji over several ids: the stream must hold them back
    assert any("\ufffd" in m.tokenizer.decode([i]) for i in ids)
    d = Detokenizer(m.tokenizer)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_template_renders_glm_prompt(model):
    m, _ = model
    s = m.tokenizer.render([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"}])
    assert s == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>"


def test_sampler_greedy_topk_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0, 0.0], np.float32)
    assert Sampler(temperature=0)(logits, []) == 1
    draws = [Sampler(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=s)(logits, []) for s in range(50)]
    assert set(draws) == {1, 2}
    a = [Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)(logits, []) for _ in range(5)]
    b = [Sampler(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)(logits, []) for _ in range(5)]
    assert a == b
    # top-p 0.3 keeps only the best (p = 0.49); min-p 0.99 too
    assert {Sampler(1.0, 0, 0.3, 0.0, seed=s)(logits, []) for s in range(30)} == {1}
    assert {Sampler(1.0, 0, 1.0, 0.99, seed=s)(logits, []) for s in range(30)} == {1}
    # repetition penalty pushes a seen token below the other
    assert Sampler(temperature=0, repeat_penalty=2.0)(logits, [1]) == 2


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.8),                # defaults: top-k 40
                                      dict(temperature=1.5, top_k=3, top_p=0.5, min_p=0.0),
                                      dict(temperature=1.0, top_k=2000, top_p=1.0, min_p=0.0)])
def test_a_samplers_needs_decide_its_choice(settings):
    """What Sampler.needs asks a cluster for (each worker's best logits of its slice, with ties by
    the lower id; -inf in all others) gives the same choices, draw by draw, as whole logits, with
    many ties; a penalty needs them all."""
    from glmcpu.net.wire import decode_top, encode_top
    rng = np.random.default_rng(7)
    for trial in range(40):
        logits = np.round(rng.standard_normal(3000) * 3, 1).astype(np.float32)      # ties galore
        cuts = [0, 700, 1900, 3000]                       # the root's slice, then two workers'
        a, b = Sampler(**settings, seed=trial), Sampler(**settings, seed=trial)
        k = a.needs([5, 6])
        assert k == (1 if settings["temperature"] == 0 else settings.get("top_k", 40))
        merged = np.concatenate([logits[:700]] + [decode_top(encode_top(logits[None, u:v], k), v - u, 1, k)[0]
                                                  for u, v in zip(cuts[1:], cuts[2:])])
        assert (merged == -np.inf).sum() >= 3000 - 700 - 2 * k
        assert [a(logits, [5, 6]) for _ in range(5)] == [b(merged, [5, 6]) for _ in range(5)]
    assert Sampler(repeat_penalty=1.1).needs([5]) == 0 and Sampler(top_k=0).needs([]) == 0


def test_generate_greedy_matches_logits_argmax(model):
    m, _ = model
    prompt = m.tokenizer.encode("The quick brown")
    list(m.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True))
    st = m.last_stats
    assert st["prompt_tokens"] == len(prompt) and st["gen_tokens"] == 6
    assert st["prompt_seconds"] > 0 and st["gen_seconds"] > 0
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(m.logits(ids)[-1].argmax()))
    text = "".join(m.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True))
    assert text == m.tokenizer.decode(ids[len(prompt):])


def test_generate_stops_on_end_token(model, monkeypatch):
    m, _ = model
    prompt = m.tokenizer.encode("The quick brown")
    first = int(m.logits(prompt)[-1].argmax())
    monkeypatch.setattr(m.tokenizer, "stop_ids", {first})
    assert "".join(m.generate(prompt, max_tokens=5, temperature=0)) == ""
    assert m.last_stats["gen_tokens"] == 0
    out = list(m.generate(prompt, max_tokens=3, temperature=0, ignore_eos=True))
    assert m.last_stats["gen_tokens"] == 3 and out


def test_stop_ids_from_file(model):
    m, _ = model
    t = m.tokenizer
    assert {t.tok.token_to_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>")} <= t.stop_ids


def test_generation_stops_at_full_context(tiny):
    _, path, _ = tiny("glm4", "q8_0")
    m = glmcpu.load(path, ctx=12)
    list(m.generate(list(range(5, 10)), max_tokens=50, temperature=0, ignore_eos=True))
    # 5 prompt positions + 7 decoded fill the 12; the 8th token comes from the last logits
    assert m.last_stats["gen_tokens"] == 8


def test_kept_cache_reuses_a_shared_prefix_and_answers_the_same(tiny):
    _, path, _ = tiny("glm4", "q8_0")
    m, fresh = glmcpu.load(path, threads=2), glmcpu.load(path, threads=2)
    turn1 = m.tokenizer.encode("The quick brown fox")
    kw = dict(max_tokens=5, temperature=0, ignore_eos=True)
    answer1 = "".join(m.generate(turn1, **kw))
    turn2 = turn1 + m.tokenizer.encode(answer1 + " and then")        # the next turn of a chat
    seen = []
    answer2 = "".join(m.generate(turn2, progress=lambda done, total: seen.append((done, total)), **kw))
    st = m.last_stats
    assert st["prompt_tokens"] == len(turn2)
    assert len(turn1) <= st["cached_tokens"] < len(turn2)
    assert seen[-1] == (len(turn2) - st["cached_tokens"],) * 2
    assert answer2 == "".join(fresh.generate(turn2, **kw))
    assert fresh.last_stats["cached_tokens"] == 0
    # a prompt that diverges early, the same prompt again, and one that is a strict prefix
    other = m.tokenizer.encode("A quick brown fox")
    assert "".join(m.generate(other, **kw)) == "".join(fresh.generate(other, **kw))
    assert "".join(m.generate(other, **kw)) == "".join(fresh.generate(other, **kw))
    assert m.last_stats["cached_tokens"] == len(other) - 1
    assert "".join(m.generate(other[:2], **kw)) == "".join(glmcpu.load(path).generate(other[:2], **kw))


def _sorted_reference(s, logits):
    """The sampler as it was: a stable sort of the whole vocabulary, then top-k, top-p, min-p."""
    idx = np.argsort(-logits, kind="stable")
    if s.top_k > 0:
        idx = idx[:s.top_k]
    z = logits[idx].astype(np.float64)
    p = np.exp(z - z[0])
    p /= p.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        idx, z, p = idx[:keep], z[:keep], p[:keep]
    if s.min_p > 0:
        keep = p >= s.min_p * p[0]
        idx, z = idx[keep], z[keep]
    return idx


@pytest.mark.parametrize("top_k,top_p,min_p", [(40, 0.95, 0.05), (40, 1.0, 0.0), (0, 0.95, 0.05), (0, 0.9, 0.0),
                                               (0, 1.0, 0.02), (5, 0.5, 0.3), (1, 1.0, 0.0)])
def test_sampler_candidates_match_a_full_sort(top_k, top_p, min_p):
    """Partitioning out the top k (no sort of the vocabulary) keeps exactly the tokens, in the
    order, that a stable sort of all logits kept: ties at the k-th place included."""
    rng = np.random.default_rng(top_k + int(100 * top_p))
    for trial in range(20):
        n = 5000
        logits = (rng.standard_normal(n) * (1 + trial % 4)).astype(np.float32)
        if trial % 3 == 0:                                   # many exact ties
            logits = np.round(logits * 2) / 2
        s = Sampler(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p, seed=trial)
        want = _sorted_reference(s, logits)
        idx, norm = s._candidates(logits)
        z = logits[idx].astype(np.float64)
        p = np.exp(z - z[0]) / norm
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            idx, p = idx[:keep], p[:keep]
        if min_p > 0:
            idx = idx[p >= min_p * p[0]]
        np.testing.assert_array_equal(idx, want)
