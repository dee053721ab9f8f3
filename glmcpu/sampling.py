"""Next-token choice from logits, in llama.cpp's order: penalty, top-k, top-p, min-p, temperature."""
from dataclasses import dataclass

import numpy as np


@dataclass
class Sampler:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    constraint: object = None       # constrain.Constraint: tokens its grammar forbids are never chosen

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    @property
    def stopped(self) -> bool:
        """The constraint's grammar is complete: the answer ends (only a stop token may follow)."""
        return self.constraint is not None and self.constraint.done

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def needs(self, history) -> int:
        """How many of the best logits decide this sampler's choice, 0 meaning all of them: the best
        one when greedy, the top-k's k (top-p and min-p then work within those), all when a
        penalty may reorder them. A cluster's workers then send those, not whole logit slices;
        every other logit may be -inf and the choice is the same."""
        if (self.repeat_penalty != 1.0 and len(history)) or self.constraint is not None:
            return 0
        return 1 if self.greedy else max(self.top_k, 0)

    def __call__(self, logits: np.ndarray, history) -> int:
        tok = self.draw(*self.distribution(logits, history))
        if self.constraint is not None:
            self.constraint.accept(tok)
        return tok

    def draw(self, ids, p) -> int:
        """A token from a distribution of distribution(): the first when greedy."""
        return int(ids[0]) if self.greedy else int(self.rng.choice(ids, p=p))

    def distribution(self, logits: np.ndarray, history):
        """The tokens this sampler may pick and their probabilities (ids, p summing to 1), best
        first; greedy: the argmax alone."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        if self.repeat_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history[-self.repeat_last_n:], dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            logits = logits.copy()
            v = logits[seen]
            logits[seen] = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if self.greedy:
            return np.array([np.argmax(logits)]), np.ones(1)
        idx, norm = self._candidates(logits)
        z = logits[idx].astype(np.float64)
        p = np.exp(z - z[0]) / norm
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            idx, z, p = idx[:keep], z[:keep], p[:keep]
        if self.min_p > 0:
            keep = p >= self.min_p * p[0]
            idx, z = idx[keep], z[keep]
        p = np.exp((z - z[0]) / self.temperature)
        return idx, p / p.sum()

    def _candidates(self, logits):
        """The tokens top-k keeps, best first (ties by id, as a stable sort of the whole
        vocabulary orders them), and sum(exp(logit - best)) over them: the top-k softmax's
        denominator. Sorting all 151,552 logits costs ~24 ms a token; this partitions out the k
        (~0.3 ms) and, with top-k off, sorts only the tokens min-p can keep."""
        n = logits.shape[0]
        if 0 < self.top_k < n:
            # k blocks each hold a logit >= the smallest of their maxima, so at least k logits
            # are >= it: the k best are among those (usually a few hundred), found in one pass
            k = self.top_k
            floor = logits[:n // k * k].reshape(k, -1).max(1).min()
            cand = np.flatnonzero(logits >= floor)
            if floor == -np.inf:                             # a cluster's best logits only, -inf elsewhere
                finite = np.flatnonzero(logits > -np.inf)
                cand = finite if len(finite) >= k else cand
            kth = logits[cand][np.argpartition(logits[cand], len(cand) - k)[len(cand) - k]]
            cand = cand[logits[cand] >= kth]                 # the k best, and any tied with the k-th
        else:
            cand = np.arange(n)
        z = logits[cand].astype(np.float64)
        if len(cand) < n:                                    # top-k: sort the k, sum over them
            order = np.lexsort((cand, -z))[:self.top_k]
            return cand[order], np.exp(z[order] - z[order[0]]).sum()
        top = z.max()
        norm = np.exp(z - top).sum()
        if self.min_p > 0:                                   # min-p drops all below best * min_p
            sure = z >= top + np.log(self.min_p) - 1e-6
            cand, z = cand[sure], z[sure]
        return cand[np.lexsort((cand, -z))], norm
