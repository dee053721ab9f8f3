#!/usr/bin/env python3
"""What speculative decoding costs and gives, on one GGUF file.

    python tools/bench_draft.py air9-mtp.gguf                 # step costs, predicted speedups
    python tools/bench_draft.py moe-mtp.gguf --generate 200   # also: real runs, none vs mtp (vs lookup)

Step costs (medians of alternating rounds at the same context position): one decode step
(1 token), a verification pass of 2, 3 and 4 tokens (all logits and hidden states, as
generate_ids asks), and one MTP draft step; the output head alone for 1..4 rows. With k guesses
a step and each kept with probability a (independently), a step yields (1 - a^(k+1)) / (1 - a)
tokens for one verification of k + 1 and k draft steps: the predicted speedup over plain
decoding. For a file shallower than its model (random-weight test files), the prediction is also
given at the real depth (--depth, default GLM-4.5-Air's 46 layers), scaling the measured layer
time and keeping the head's. For a file with an MTP block, the memory bound is printed too: the
weight bytes each pass reads, from the file's tensor sizes (tokens routed at random, as in a
random-weight file), and the speedup those bytes allow. Prompt lookup guesses cost nothing to
make, so its prediction needs only the verification costs (dense files: `--depth` is not used).
"""
import argparse
import contextlib
import statistics
import time

import numpy as np

import glmcpu
from glmcpu import ops
from glmcpu.models import glm4_moe


def timed(fn, rounds):
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def step_costs(m, rounds, prompt_len, vocab=None):
    net, head = m.net, m.net.draft_head()
    heads = {}
    if head:                                   # the full head, and the reduced one in the same rounds
        head.limit_vocab(None)
        heads["mtp draft"] = head.head
        if vocab:
            head.limit_vocab(vocab)
            heads[f"mtp draft {vocab}"] = head.head
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, 1000, prompt_len)]
    cache = net.new_cache(prompt_len + 16)
    _, hidden = net.forward(ids, cache, all_logits=False, hidden=True)
    pos0, toks0 = cache.pos, list(cache.tokens)
    mcache = head.new_cache(prompt_len + 16) if head else None
    if head:
        head.forward(ids[1:], hidden[:-1], mcache)
    m0 = (mcache.pos, list(mcache.tokens)) if head else None

    def verify(T):
        def run():
            net.forward(ids[:T], cache, all_logits=T > 1, hidden=True)
            cache.pos, cache.tokens = pos0, list(toks0)
        return run

    def draft(h):
        def run():
            head.head = h
            head.forward(ids[:1], hidden[-1:], mcache)
            mcache.pos, mcache.tokens = m0[0], list(m0[1])
        return run

    def out_head(T):
        x = np.ascontiguousarray(hidden[:1].repeat(T, 0))
        return lambda: net.output(x, net.threads)

    jobs = {f"step {T}": verify(T) for T in (1, 2, 3, 4)}
    jobs.update({f"head {T}": out_head(T) for T in (1, 2, 3, 4)})
    jobs.update({k: draft(h) for k, h in heads.items()})
    for fn in jobs.values():                    # warm: pages in, teams started
        fn()
    times = {k: [] for k in jobs}
    for _ in range(rounds):                     # alternate, so bandwidth swings fall on all
        for k, fn in jobs.items():
            times[k] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def weight_bytes(f, cfg, vocab=None):
    """The memory bound, from the file's tensor sizes: bytes a pass of T positions reads (every
    weight once, routed experts once per distinct expert, tokens routed at random: 1 - (1 - k/n)^T
    of each layer's experts) and one MTP guess reads; the token embedding is a row per token.
    f: the model's GGUFFile."""
    n, k = max(cfg.n_expert, 1), cfg.n_expert_used
    frac = min(vocab, cfg.n_vocab) / cfg.n_vocab if vocab else 1.0
    nextn = tuple(f"blk.{i}." for i in range(cfg.n_layer, cfg.n_layer + cfg.n_nextn))
    main = {"shared": 0, "experts": 0}
    draft = {"shared": 0, "experts": 0, "head": 0}
    for name, t in f.tensors.items():
        if name == "token_embd.weight" or name.endswith(".nextn.embed_tokens.weight"):
            continue                                            # a row per token
        part = draft if name.startswith(nextn) else main
        if name.endswith(".nextn.shared_head_head.weight"):
            draft["head"] += t.n_bytes * frac
        else:
            part["experts" if "_exps." in name else "shared"] += t.n_bytes
    if not draft["head"]:                                       # the MTP block uses the model's head
        draft["head"] = f.tensors.get("output.weight", f.tensors["token_embd.weight"]).n_bytes * frac

    def reads(T):
        return main["shared"] + main["experts"] * (1 - (1 - k / n) ** T)
    guess = draft["shared"] + draft["experts"] * k / n + draft["head"]
    return {T: reads(T) for T in (1, 2, 3, 4)}, guess


@contextlib.contextmanager
def router_wrapped(wrap):
    """Within the block, every MoE router calls wrap(its own __call__) instead."""
    own = glm4_moe.Router.__call__
    glm4_moe.Router.__call__ = wrap(own)
    try:
        yield
    finally:
        glm4_moe.Router.__call__ = own


def random_routing(seed=0):
    """Route every token to k experts drawn at random (its own draw per token), keeping the
    router's work and weights: the worst case for a check of several tokens (a trained model's
    consecutive tokens share more experts), timed beside the file's own routing. A random-weight
    file can route every token alike, the best case (tools/make_model.py did before it took
    GPT-2's initialisation)."""
    rng = np.random.default_rng(seed)

    def wrap(own):
        def route(self, x, th):
            idx, w = own(self, x, th)
            idx = np.stack([rng.choice(self.cfg.n_expert, idx.shape[1], replace=False) for _ in idx])
            return idx.astype(np.int32), w
        return route
    return router_wrapped(wrap)


def routes(m, ids):
    """The experts each MoE layer picks for the tokens ids (a fresh cache): a list of [T, k]."""
    seen = []

    def wrap(own):
        def route(self, x, th):
            idx, w = own(self, x, th)
            seen.append(idx.copy())
            return idx, w
        return route
    with router_wrapped(wrap):
        m.net.forward(ids, m.net.new_cache(len(ids)))
    return seen


def expert_overlap(m, prompt_len):
    """Mean experts shared by consecutive tokens of a random prompt, over the MoE layers."""
    ids = [int(i) for i in np.random.default_rng(1).integers(0, m.cfg.n_vocab, prompt_len)]
    return float(np.mean([len(set(a[t]) & set(a[t + 1])) for a in routes(m, ids) for t in range(len(a) - 1)]))


def predict(c, k, a, depth_scale=1.0, draft="mtp draft"):
    """Speedup of k guesses a step at acceptance a, from step costs c (seconds)."""
    def cost(T):
        return (c[f"step {T}"] - c[f"head {T}"]) * depth_scale + c[f"head {T}"]
    tokens = (1 - a ** (k + 1)) / (1 - a)
    return tokens * cost(1) / (cost(k + 1) + k * c[draft])


def generation(path, n, runs, threads, vocab=None):
    """tok/s and acceptance of greedy runs, none vs mtp vs lookup, alternating."""
    models = {mode: glmcpu.load(path, threads=threads, draft=mode, draft_vocab=vocab)
              for mode in ("none", "mtp", "lookup")}
    prompt = "[gMASK]<sop><|user|>\nAnd God said<|assistant|>"
    res = {mode: [] for mode in models}
    texts = {}
    for _ in range(runs):
        for mode, m in models.items():
            m.reset()
            texts[mode] = "".join(m.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True))
            s = m.last_stats
            res[mode].append((s["gen_tokens"] / s["gen_seconds"], s.get("accepted", 0), s.get("drafted", 0)))
    assert texts["mtp"] == texts["none"] == texts["lookup"], "greedy text differs with drafts"
    print(f"greedy text identical with --draft none, mtp and lookup ({n} tokens, {runs} runs each)")
    return res, texts["none"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt", type=int, default=64, help="context tokens before the measured step")
    p.add_argument("--depth", type=int, default=46, help="layers of the real model, for the scaled prediction")
    p.add_argument("--generate", type=int, default=0, help="also time N-token greedy generations")
    p.add_argument("--runs", type=int, default=5, help="alternating runs of each generation")
    p.add_argument("--draft-vocab", type=int, default=None, help="the MTP head guesses among the first N ids")
    a = p.parse_args()
    m = glmcpu.load(a.model, threads=a.threads, draft="none")
    print(f"{a.model}: {m.cfg.arch}, {m.cfg.n_layer} layers (+{m.cfg.n_nextn} MTP), kernels {ops.VARIANT}, "
          f"{m.threads} threads")
    scale = a.depth / m.cfg.n_layer if m.cfg.n_nextn else 1.0
    routings = ["file"]
    if m.cfg.n_expert:
        shared = expert_overlap(m, a.prompt)
        print(f"this file's routing: consecutive prompt tokens share {shared:.2f} of {m.cfg.n_expert_used} "
              f"experts per MoE layer (tokens routed at random would share "
              f"{m.cfg.n_expert_used ** 2 / m.cfg.n_expert:.2f})")
        routings.append("random")
    for routing in routings:
        with random_routing() if routing == "random" else contextlib.nullcontext():
            c = step_costs(m, a.rounds, a.prompt, a.draft_vocab)
        base = c["step 1"]
        print(f"[{routing} routing] step costs (median of {a.rounds}): "
              + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / base:.2f}x)" for k, v in c.items()))
        c["lookup"] = 0.0                       # a prompt-lookup guess costs no weight reads
        for key in [k for k in c if k.startswith("mtp draft")] + ["lookup"]:
            for k in ((1, 2) if key != "lookup" else (1, 2, 3)):
                row = ", ".join(f"a={acc}: {predict(c, k, acc, draft=key):.2f}x" for acc in (0.6, 0.7, 0.8))
                deep = ", ".join(f"a={acc}: {predict(c, k, acc, scale, key):.2f}x" for acc in (0.6, 0.7, 0.8))
                print(f"  predicted speedup ({key}), {k} guess{'es' if k > 1 else ''} a step: {row}"
                      + (f" | at {a.depth} layers: {deep}" if scale != 1 else ""))
    if m.cfg.n_nextn:
        reads, guess = weight_bytes(m.net.file, m.cfg, a.draft_vocab)
        base = reads[1]
        print("memory bound (weight bytes a pass reads, random routing): "
              + ", ".join(f"{T} tokens {reads[T] / 1e6:.0f} MB ({reads[T] / base:.2f}x)" for T in (1, 2, 3, 4))
              + f", one MTP guess{f' ({a.draft_vocab} ids)' if a.draft_vocab else ''} {guess / base:.2f}x")
        for acc in (0.6, 0.7, 0.8):
            print(f"  at acceptance {acc}, 1 guess a step: at most {(1 + acc) * base / (reads[2] + guess):.2f}x "
                  f"({(1 + acc) * base / reads[2]:.2f}x if the guess were free); 2 guesses: at most "
                  f"{(1 + acc + acc * acc) * base / (reads[3] + 2 * guess):.2f}x")
    if a.generate:
        res, text = generation(a.model, a.generate, a.runs, a.threads, a.draft_vocab)
        base = statistics.median(r[0] for r in res["none"])
        for mode, rows in res.items():
            rate = statistics.median(r[0] for r in rows)
            acc, dr = rows[-1][1], rows[-1][2]
            print(f"generate {a.generate} greedy, --draft {mode}: {rate:.1f} tok/s ({rate / base:.2f}x)"
                  + (f", accepted {acc}/{dr} ({acc / dr:.0%})" if dr else ""))
        print("text:", text[:200].replace("\n", " "))


if __name__ == "__main__":
    main()
