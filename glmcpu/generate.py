"""The prefill/decode loop: a generator of token ids that records its own timing."""
import time

import numpy as np

from .errors import ContextOverflow, GlmcpuError

PREFILL_CHUNK = 256     # tokens per prefill step: bounds activation memory, keeps weights hot


def prefill(model, cache, ids, all_logits=False, chunk=PREFILL_CHUNK, progress=None) -> np.ndarray:
    """Feed `ids` into the cache in chunks; logits of every token or of the last one.
    progress(done, total) is called after each chunk."""
    outs = []
    for s in range(0, len(ids), chunk):
        part = ids[s:s + chunk]
        last = s + chunk >= len(ids)
        if all_logits or last:
            outs.append(model.forward(part, cache, all_logits=all_logits))
        else:
            model.forward(part, cache, all_logits=False)
        if progress:
            progress(min(s + chunk, len(ids)), len(ids))
    return np.concatenate(outs, 0)


class NotFinite(GlmcpuError):
    """Logits that are NaN or infinite: weights (or a config) that cannot be right."""


def check_fits(n_prompt: int, n_ctx: int):
    if n_prompt >= n_ctx:
        raise ContextOverflow(f"the prompt has {n_prompt} tokens but the context holds {n_ctx}; "
                              "shorten it or raise --ctx")


def generate_ids(model, cache, prompt_ids, sampler, max_tokens, stop_ids, stats, progress=None):
    """Yield sampled ids after `prompt_ids` until a stop id (not yielded), max_tokens or a full
    context. The cache may already hold a prefix of `prompt_ids` (cache.pos of them): only the
    rest is computed. `stats` (a dict) is filled as it goes, so it is right even if the caller
    stops early."""
    check_fits(len(prompt_ids), cache.n_ctx)
    if not 0 <= cache.pos < len(prompt_ids) or list(cache.tokens) != list(prompt_ids[:cache.pos]):
        raise ValueError("the cache must hold a proper prefix of the prompt")
    stats.update(prompt_tokens=len(prompt_ids), cached_tokens=cache.pos, prompt_seconds=0.0,
                 gen_tokens=0, gen_seconds=0.0)
    t = time.perf_counter()
    logits = prefill(model, cache, list(prompt_ids[cache.pos:]), progress=progress)[-1]
    stats["prompt_seconds"] = time.perf_counter() - t
    history = list(prompt_ids)
    tok = None
    for i in range(max_tokens):
        t = time.perf_counter()                 # time the work, not the consumer of the ids
        if i > 0:
            if cache.pos >= cache.n_ctx:
                break
            logits = model.forward([tok], cache)[-1]
        if not np.isfinite(logits.max()):           # max is NaN if any logit is
            raise NotFinite(f"the model computed {logits.max()} logits at position {cache.pos}: its weights "
                            "hold NaN or infinite values (a damaged file?)")
        tok = sampler(logits, history)
        stats["gen_seconds"] += time.perf_counter() - t
        if tok in stop_ids:
            break
        history.append(tok)
        stats["gen_tokens"] += 1
        yield tok
