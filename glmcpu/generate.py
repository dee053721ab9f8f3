"""The prefill/decode loop: a generator of token ids that records its own timing."""
import time

import numpy as np

from .draft import verify
from .errors import ContextOverflow, GlmcpuError

PREFILL_CHUNK = 256     # tokens per prefill step: bounds activation memory, keeps weights hot
# A draft whose guesses are kept this rarely costs more than it gives (a 2-token check of a MoE
# model reads 1-1.35x the bytes of one token, by how many experts the tokens share; the MTP step
# ~0.1-0.3x): after DRAFT_TRIAL guesses below MIN_ACCEPTANCE, the rest decodes plainly. Above it,
# PLAIN_PROBE plain steps are timed, and drafting goes on only if its tokens/s were higher (what
# a check costs depends on the machine's cores and bandwidth, not on acceptance alone).
MIN_ACCEPTANCE, DRAFT_TRIAL, PLAIN_PROBE = 0.4, 24, 4


def prefill(model, cache, ids, all_logits=False, chunk=PREFILL_CHUNK, progress=None, draft=None,
            top=0) -> np.ndarray:
    """Feed `ids` into the cache in chunks; logits of every token or of the last one (of the last
    one, only the `top` best are needed when top > 0: see forward). progress(done, total) is
    called after each chunk; a draft that wants them gets the hidden states of every position."""
    outs = []
    for s in range(0, len(ids), chunk):
        part = ids[s:s + chunk]
        last = s + chunk >= len(ids)
        out = forward(model, part, cache, all_logits, draft, 0 if all_logits else top)
        if all_logits or last:
            outs.append(out)
        if progress:
            progress(min(s + chunk, len(ids)), len(ids))
    return np.concatenate(outs, 0)


def forward(model, ids, cache, all_logits, draft, top=0):
    """model.forward, recording the hidden states for a draft that needs them. top > 0: only the
    top best logits of the last row are needed (Sampler.needs); a model that gathers its logits
    over a network (cluster.root.Cluster: `sparse_logits`) then sends those alone, -inf in the
    others."""
    kw = {"top": top} if top and getattr(model, "sparse_logits", False) else {}
    if draft is None or not draft.wants_hidden:
        return model.forward(ids, cache, all_logits=all_logits, **kw)
    start = cache.pos
    logits, hidden = model.forward(ids, cache, all_logits=all_logits, hidden=True, **kw)
    draft.record(start, hidden)
    return logits


class NotFinite(GlmcpuError):
    """Logits that are NaN or infinite: weights (or a config) that cannot be right."""


def check_fits(n_prompt: int, n_ctx: int):
    if n_prompt >= n_ctx:
        raise ContextOverflow(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}; "
                              "shorten it or raise --ctx")


def generate_ids(model, cache, prompt_ids, sampler, max_tokens, stop_ids, stats, progress=None,
                 draft=None, n_draft=1):
    """Yield sampled ids after `prompt_ids` until a stop id (not yielded), max_tokens or a full
    context. The cache may already hold a prefix of `prompt_ids` (cache.pos of them): only the
    rest is computed. `stats` (a dict) is filled as it goes, so it is right even if the caller
    stops early. With a draft (draft.py), each step checks up to n_draft guessed tokens in one
    pass and keeps those the sampler agrees with (draft.verify)."""
    check_fits(len(prompt_ids), cache.n_ctx)
    if not 0 <= cache.pos < len(prompt_ids) or list(cache.tokens) != list(prompt_ids[:cache.pos]):
        raise ValueError("the cache must hold a proper prefix of the prompt")
    stats.update(prompt_tokens=len(prompt_ids), cached_tokens=cache.pos, prompt_seconds=0.0,
                 gen_tokens=0, gen_seconds=0.0)
    if draft is not None:
        stats.update(drafted=0, accepted=0)
    t = time.perf_counter()
    logits = prefill(model, cache, list(prompt_ids[cache.pos:]), progress=progress, draft=draft,
                     top=sampler.needs(prompt_ids))
    if draft is not None:
        draft.prefill(list(prompt_ids))
    stats["prompt_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    check_finite(logits[-1], cache.pos)
    history = list(prompt_ids)
    new = [sampler(logits[-1], history)]     # tokens decided, not yet yielded (nor in the cache)
    spent = {True: [0.0, 0], False: [0.0, 0]}   # drafted / plain steps: [seconds, tokens]
    step = None                                 # the last step drafted (True), plain (False), or none yet
    while True:
        dt = time.perf_counter() - t
        stats["gen_seconds"] += dt
        if step is not None:
            spent[step][0] += dt
            spent[step][1] += len(new)
        for tok in new:
            if tok in stop_ids or stats["gen_tokens"] >= max_tokens:
                return
            history.append(tok)
            stats["gen_tokens"] += 1
            yield tok
        if stats["gen_tokens"] >= max_tokens or cache.pos >= cache.n_ctx or sampler.stopped:
            return
        t = time.perf_counter()                 # time the work, not the consumer of the ids
        tok = history[-1]
        k = min(n_draft, max_tokens - stats["gen_tokens"] - 1, cache.n_ctx - cache.pos - 1)
        if draft is not None and not pays(stats, spent):
            k = 0                                       # guesses that do not pay: decode plainly
        step = False
        if draft is None or k <= 0:
            logits = forward(model, [tok], cache, False, draft, sampler.needs(history))
            check_finite(logits[-1], cache.pos)
            new = [sampler(logits[-1], history)]
            continue
        drafts, dists = draft.propose(history, k, sampler)
        step = bool(drafts)                             # a lookup may find nothing: a plain step
        start = cache.pos
        logits = forward(model, [tok] + drafts, cache, True, draft)
        check_finite(logits, start)
        kept, nxt = verify(sampler, logits, drafts, dists, history)
        cache.pos = start + 1 + kept                    # the rejected guesses' keys are overwritten later
        cache.tokens = cache.tokens[:cache.pos]
        stats["drafted"] += len(drafts)
        stats["accepted"] += kept
        new = drafts[:kept] + [nxt]


def pays(stats, spent) -> bool:
    """Whether to draft the next step: through the trial guesses, then while guesses are kept
    often enough; past the trial, once PLAIN_PROBE plain steps are timed, while drafted steps
    gave more tokens a second than plain ones."""
    if stats["drafted"] < DRAFT_TRIAL:
        return True
    if stats["accepted"] < MIN_ACCEPTANCE * stats["drafted"]:
        return False
    (ds, dn), (ps, pn) = spent[True], spent[False]
    return pn >= PLAIN_PROBE and dn * ps >= pn * ds


def check_finite(logits, pos):
    if not np.isfinite(logits.max()):           # max is NaN if any logit is
        raise NotFinite(f"the model computed {logits.max()} logits at position {pos}: its weights "
                        "hold NaN or infinite values (a damaged file?)")
