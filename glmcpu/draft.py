"""Drafts for speculative decoding: a cheap guess of the next tokens, which the model then checks
in one batched pass (generate.generate_ids). A decode step reads every weight once whether it
computes one token or four, so each accepted guess is a token for nearly nothing.

- MTPDraft: GLM-4.5's own multi-token-prediction head (the file's "nextn" block).
- LookupDraft: prompt lookup, the tokens that followed the last n-gram where it occurred before
  in the context (chat turns that quote, edit or summarise).

Both keep their state beside the KV cache they draft for (`cache.draft`); a cache cut back to a
shared prefix is followed on the next proposal."""
import numpy as np

from .errors import GlmcpuError

MODES = ("auto", "mtp", "lookup", "none")


class MTPDraft:
    """Drafts with the model's MTP head (models.glm4_moe.MTP). It needs the main model's
    final-normed hidden state at every position: generate_ids records them here (`record`)."""

    wants_hidden = True

    def __init__(self, head, n_ctx: int, d_model: int):
        self.head = head
        self.cache = head.new_cache(n_ctx)      # slot s: position s + 1
        self.hidden = np.zeros((n_ctx, d_model), np.float32)

    def record(self, start: int, hidden):
        """The main model's normed hidden states of positions start.. (from a forward pass)."""
        self.hidden[start:start + len(hidden)] = hidden

    def catch_up(self, seq, upto: int):
        """Bring the head's cache to positions 1..upto of seq (their hidden states recorded),
        keeping the entries whose tokens still hold. -> the last forward's (logits, hidden), or None."""
        c = self.cache
        n = min(len(c.tokens), upto - 1)              # entries whose token (position s + 1) still holds
        if c.tokens[:n] == list(seq[1:n + 1]):        # the usual case, one comparison in C
            keep = n
        else:
            keep = next(i for i, (a, b) in enumerate(zip(c.tokens, seq[1:])) if a != b)
        c.pos, c.tokens = keep, c.tokens[:keep]
        if keep < upto:
            return self.head.forward(seq[keep + 1:upto + 1], self.hidden[keep:upto], c)
        return None

    def prefill(self, seq):
        """After the prompt's pass: its positions 1.. into the head's cache (timed as the prompt)."""
        self.catch_up(seq, len(seq) - 1)

    def propose(self, seq, k: int, sampler):
        """Up to k tokens after seq (the tokens of positions 0..P; the model holds 0..P-1 in its
        cache and computes P next) -> (tokens, their draft distributions [(ids, probs)])."""
        P, c = len(seq) - 1, self.cache
        logits, hid = self.catch_up(seq, P)           # at least position P (its token is new) is computed
        drafts, dists = [], []
        for i in range(k):
            ids, p = sampler.distribution(logits[-1], recent(sampler, seq) + drafts)
            drafts.append(sampler.draw(ids, p))
            dists.append((ids, p))
            if i + 1 < k:          # chained on the head's own hidden state: speculation, dropped below
                logits, hid = self.head.forward(drafts[-1:], hid[-1:], c)
        c.pos, c.tokens = P, c.tokens[:P]
        return drafts, dists


class LookupDraft:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the context's
    last n tokens (n = max_n down to 1). No distributions: each guess is a sure one."""

    wants_hidden = False

    def __init__(self, max_n: int = 3):
        self.max_n = max_n

    def record(self, start, hidden):
        pass

    def prefill(self, seq):
        pass

    def propose(self, seq, k: int, sampler):
        a = np.asarray(seq, np.int64)
        for n in range(min(self.max_n, len(a) - 1), 0, -1):
            tail = a[-n:]
            starts = np.flatnonzero(a[:len(a) - n] == tail[0])       # earlier windows, latest last
            for s in starts[::-1]:
                if np.array_equal(a[s:s + n], tail):
                    follow = a[s + n:s + n + k]
                    if len(follow):
                        return [int(t) for t in follow], None
        return [], None


def make(mode: str, model, n_ctx: int, vocab=None):
    """The draft for a --draft mode and model (None: plain decoding). "auto" is MTP where the
    file has the head, else none. vocab: the MTP head guesses among the first `vocab` ids only."""
    if mode not in MODES:
        raise GlmcpuError(f"--draft {mode!r}: use one of {', '.join(MODES)}")
    head = model.draft_head() if mode in ("auto", "mtp") and hasattr(model, "draft_head") else None
    if mode == "mtp" and head is None:
        raise GlmcpuError("--draft mtp: this model has no MTP head (GLM-4.5 files have one; "
                          "try --draft lookup)")
    if head is not None:
        head.limit_vocab(vocab)
        return MTPDraft(head, n_ctx, model.cfg.d_model)
    return LookupDraft() if mode == "lookup" else None


def verify(sampler, logits, drafts, dists, history):
    """Check drafts against the model's logits for the positions before each of them and after
    the last (logits [len(drafts) + 1, n_vocab]). -> (how many are kept, the token after them).

    Greedy: a draft is kept while it is the model's own argmax, so the output is exactly that of
    plain decoding. Sampling: draft d from distribution q is kept with probability
    min(1, p(d) / q(d)), else the token is drawn from max(0, p - q), renormalised (for a sure
    guess, q is 1 at d): the tokens keep exactly the model's distribution p."""
    h = recent(sampler, history)
    for i, d in enumerate(drafts):
        ids, p = sampler.distribution(logits[i], h)
        if sampler.greedy:
            if int(ids[0]) != d:
                return i, int(ids[0])
        else:
            q_ids, q = dists[i] if dists is not None else (np.array([d]), np.array([1.0]))
            pd, qd = p[ids == d].sum(), q[q_ids == d].sum()
            if not sampler.rng.random() < pd / qd:
                return i, residual(sampler, ids, p, q_ids, q)
        h.append(d)
    ids, p = sampler.distribution(logits[len(drafts)], h)
    return len(drafts), sampler.draw(ids, p)


def recent(sampler, history) -> list:
    """The part of the history a sampler reads (its repeat-penalty window), as a new list."""
    return list(history[-sampler.repeat_last_n:])


def residual(sampler, ids, p, q_ids, q) -> int:
    """A token from max(0, p - q), renormalised (p where that is empty)."""
    qa = np.zeros(len(ids))
    pos = {int(t): j for j, t in enumerate(ids)}
    for t, v in zip(q_ids, q):
        j = pos.get(int(t))
        if j is not None:
            qa[j] = v
    r = np.maximum(p - qa, 0)
    return sampler.draw(ids, r / r.sum()) if r.sum() > 0 else sampler.draw(ids, p)
