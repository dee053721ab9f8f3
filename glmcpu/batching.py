"""Continuous batching: several generations decoding in one forward pass (`serve --parallel N`).

One thread runs the model. Each step it
1. frees the slots whose reader left (a cancelled job), and gives waiting jobs the free slots, each
   with the kept KV cache sharing the longest prefix of its prompt (prompt_cache: a cache another
   running job holds is copied, never shared);
2. runs one forward pass over a `Batch`: the next token of every decoding slot, and up to `chunk`
   prompt tokens of the slots still reading their prompts (oldest first), so that running streams
   keep flowing while a long prompt is read (a whole PREFILL_CHUNK when no stream is waiting);
3. samples, for each slot whose last token was computed, with that slot's own sampler (its own
   seed) and hands the token to the slot's reader.
A CPU decode is bound by reading the weights: one pass for several tokens reads them once. The
kernels give a row the same bits whatever rows share its pass, attention runs per sequence, and
each slot samples with its own state, so every answer is token for token the one it would be
alone. Speculative drafts are not used here: a batch already fills the spare compute."""
import collections
import queue
import threading
import time

from .constrain import Constraint
from .errors import GlmcpuError
from .generate import PREFILL_CHUNK, check_finite, check_fits
from .models.glm4 import Batch
from .sampling import Sampler

# prompt tokens per step beside running streams: a token of prompt costs about what it costs
# alone (35 ms on the 40-layer 9B-shape Q4_0 file, 2 threads), so a 64-token chunk makes a step of
# 4 streams 2.5 s instead of 0.26 (tools/bench_batch.py --beside); smaller chunks keep the streams
# smoother and the new request's first token later
PROMPT_CHUNK = 64


class QueueFull(GlmcpuError):
    """Every slot is busy and `max_waiting` jobs wait already (HTTP: 503 with Retry-After)."""


class Job:
    """One generation: submitted by a reader thread, run by the scheduler's. Read its tokens with
    `tokens()`; `stats` (the engine's last_stats keys) and `finish_reason` ("stop", "length",
    "cancelled" or "error") are final once they end."""

    def __init__(self, scheduler, ids, sampler, max_tokens, stop_ids):
        self.scheduler, self.ids, self.sampler = scheduler, ids, sampler
        self.max_tokens, self.stop_ids = max_tokens, stop_ids
        self.out = queue.SimpleQueue()      # ("tok", id), ("end", reason) or ("error", exception)
        self.cancelled = False
        self.finish_reason = None
        self.stats = {"prompt_tokens": len(ids), "cached_tokens": 0, "prompt_seconds": 0.0,
                      "gen_tokens": 0, "gen_seconds": 0.0}
        # the scheduler's, while running
        self.cache = self.pending = self.history = None
        self.started = self.first = None

    def tokens(self, alive=None, poll=0.25):
        """The generated ids as they come. alive(): polled while waiting; False (the client
        left) cancels the job. Leaving early (close()) cancels it too: its slot is free after
        the step under way."""
        try:
            while True:
                try:
                    kind, value = self.out.get(timeout=poll)
                except queue.Empty:
                    if alive is not None and not alive():
                        return
                    continue
                if kind == "tok":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            if self.finish_reason is None:
                self.cancel()

    def cancel(self):
        self.cancelled = True
        self.scheduler.wake()

    @property
    def state(self) -> str:
        if self.pending is None:
            return "queued"
        return "prompt" if self.pending else "generating"


class Scheduler:
    """`parallel` slots over one engine.Model (a cluster's: up to the slots it was loaded for)."""

    def __init__(self, model, parallel: int, max_waiting: int = 16, chunk: int = PROMPT_CHUNK):
        if model.cluster is not None and parallel > model.cluster.slots:
            raise GlmcpuError(f"{parallel} slots: this cluster was loaded for {model.cluster.slots} sequences "
                              "at once (load(..., slots=N))")
        self.model, self.net = model, model.net
        self.slots = [None] * max(1, int(parallel))
        self.max_waiting, self.chunk = int(max_waiting), max(1, int(chunk))
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.error = None                   # what stopped the loop (a bug), re-raised to new jobs
        self.counts = collections.Counter()         # Prometheus counters: metrics()
        self.thread = threading.Thread(target=self.loop, name="glmcpu-model", daemon=True)
        self.thread.start()

    # ---- the readers' side -------------------------------------------------------------------

    def submit(self, ids, max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
               repeat_penalty=1.0, seed=None, ignore_eos=False, grammar=None) -> Job:
        """Queue a generation continuing token ids `ids`; QueueFull when the waiting line is full.
        max_tokens is capped by the context left after the prompt; grammar (constrain.py) holds
        the answer to it."""
        ids = [int(i) for i in ids]
        if not ids:
            raise GlmcpuError("the prompt is empty")
        check_fits(len(ids), self.model.ctx)
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed,
                          constraint=None if grammar is None else Constraint(grammar, self.model.tokenizer,
                                                                             self.model.cfg.n_vocab))
        stops = frozenset() if ignore_eos else frozenset(self.model.tokenizer.stop_ids)
        job = Job(self, ids, sampler, min(int(max_tokens), self.model.ctx - len(ids)), stops)
        with self.cond:
            if self.closed or self.error is not None:
                raise GlmcpuError(f"the model has stopped{f': {self.error}' if self.error else ''}")
            self.drop_waiting_cancelled()       # a client that left waiting holds no place in the line
            if len(self.waiting) >= self.max_waiting and None not in self.slots:
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy ({len(self.slots)} generating, {len(self.waiting)} "
                                "waiting); retry shortly")
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def wake(self):
        with self.cond:
            self.cond.notify_all()

    def close(self):
        """Stop after the step under way; running and waiting jobs end with an error."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def status(self) -> dict:
        """Slot states for /health, and the waiting line's length."""
        with self.cond:
            slots = [{"id": i, "state": "idle"} if j is None else
                     {"id": i, "state": j.state, "prompt_tokens": len(j.ids), "generated": j.stats["gen_tokens"]}
                     for i, j in enumerate(self.slots)]
            return {"slots": slots, "busy": sum(j is not None for j in self.slots), "waiting": len(self.waiting)}

    # ---- the model's thread ------------------------------------------------------------------

    def loop(self):
        try:
            while True:
                with self.cond:
                    while not self.closed and not self.waiting and not any(self.slots):
                        self.cond.wait()
                    if self.closed:
                        break
                    self.drop_cancelled()
                    self.drop_waiting_cancelled()
                    admit = []
                    while self.waiting and None in self.slots:
                        job = self.waiting.popleft()
                        if job.cancelled:
                            self.end(job, "cancelled")
                            continue
                        i = self.slots.index(None)
                        self.slots[i] = job
                        admit.append(job)
                for job in admit:
                    self.start(job)
                if any(self.slots):
                    self.step()
        except BaseException as e:          # a bug: every job hears of it, and new ones are refused
            self.error = e
            raise
        finally:
            with self.cond:
                jobs = [j for j in self.slots if j is not None] + list(self.waiting)
                self.slots = [None] * len(self.slots)
                self.waiting.clear()
            for job in jobs:
                self.fail(job, self.error or GlmcpuError("the server is stopping"))

    def drop_cancelled(self):
        for i, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self.release(i, "cancelled")

    def drop_waiting_cancelled(self):
        """End the waiting jobs whose reader left (self.cond held)."""
        if any(j.cancelled for j in self.waiting):
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
                self.end(job, "cancelled")

    def start(self, job):
        """A job's first moment in a slot: its cache (the kept one sharing the longest prefix)."""
        try:
            cache = self.model.prompts.take(job.ids)
        except Exception as e:
            return self.release(self.slots.index(job), "error", e)
        self.model.prompts.busy.add(id(cache))
        job.cache, job.history = cache, list(job.ids)
        job.pending = job.ids[cache.pos:]
        job.stats["cached_tokens"] = cache.pos
        job.started = time.perf_counter()

    def step(self):
        """One forward pass over every busy slot (see the module's docstring)."""
        parts = []
        decoding = [j for j in self.slots if j is not None and not j.pending]
        for job in decoding:
            parts.append((job, [job.history[-1]], True))
        budget = self.chunk if decoding else PREFILL_CHUNK
        for job in sorted((j for j in self.slots if j is not None and j.pending), key=lambda j: j.started):
            if budget <= 0:
                break
            take = job.pending[:budget]
            budget -= len(take)
            parts.append((job, take, len(take) == len(job.pending)))
        ids = [t for _, toks, _ in parts for t in toks]
        # a cluster's workers send each row's `top` best logits alone when every sampler's choice
        # needs no more (Sampler.needs; generate.forward does the same for one sequence)
        needs = [j.sampler.needs(j.history) for j, _, want in parts if want]
        top = 0 if not needs or 0 in needs else max(needs)
        kw = {"top": top} if top and getattr(self.net, "sparse_logits", False) else {}
        t0 = time.perf_counter()
        try:
            logits = self.net.forward(ids, Batch([(j.cache, len(toks), want) for j, toks, want in parts]), **kw)
        except Exception as e:              # e.g. a cluster that lost every worker: these jobs end
            for job, _, _ in parts:
                self.release(self.slots.index(job), "error", e)
            return
        dt = time.perf_counter() - t0
        n_prompt = sum(len(toks) for j, toks, _ in parts if j.pending)
        self.counts["steps"] += 1
        self.counts["step_rows"] += len(ids)
        if n_prompt:
            self.counts["prompt_tokens"] += n_prompt
            self.counts["prompt_seconds"] += dt
        if decoding:
            self.counts["decode_seconds"] += dt
        row = 0
        for job, toks, want in parts:
            if job.pending:
                job.pending = job.pending[len(toks):]
            if not want:
                continue
            x = logits[row]
            row += 1
            try:
                check_finite(x, job.cache.pos)
            except GlmcpuError as e:
                self.release(self.slots.index(job), "error", e)
                continue
            if job.first is None:
                job.first = time.perf_counter()
                job.stats["prompt_seconds"] = job.first - job.started
            self.emit(job, job.sampler(x, job.history))

    def emit(self, job, tok):
        """A sampled token: the end of the answer (a stop id, max_tokens), or one more for its
        reader (then the end if the context is full)."""
        i = self.slots.index(job)
        job.stats["gen_seconds"] = time.perf_counter() - job.first
        if tok in job.stop_ids:
            return self.release(i, "stop")
        if job.stats["gen_tokens"] >= job.max_tokens:
            return self.release(i, "length")
        job.history.append(tok)
        job.stats["gen_tokens"] += 1
        self.counts["tokens_predicted"] += 1
        job.out.put(("tok", tok))
        if job.stats["gen_tokens"] >= job.max_tokens or job.cache.pos >= job.cache.n_ctx:
            self.release(i, "length")
        elif job.sampler.stopped:               # its grammar is complete
            self.release(i, "stop")

    def release(self, i, reason, error=None):
        """Slot i is free at once; its cache stays kept for the next turn of that conversation."""
        job = self.slots[i]
        with self.cond:
            self.slots[i] = None
        if job.cache is not None:
            self.model.prompts.busy.discard(id(job.cache))
        if error is not None:
            self.fail(job, error)
        else:
            self.end(job, reason)

    def end(self, job, reason):
        job.finish_reason = reason
        self.counts[f"requests_{reason}"] += 1
        job.out.put(("end", reason))

    def fail(self, job, error):
        job.finish_reason = "error"
        self.counts["requests_error"] += 1
        job.out.put(("error", error))

    def metrics(self) -> str:
        st = self.status()
        return prometheus(self.counts, len(st["slots"]), st["busy"], st["waiting"])


def prometheus(c, slots: int, busy: int, waiting: int) -> str:
    """Prometheus text exposition (version 0.0.4) of a server's counts: llama-server's figures
    under glmcpu_ names."""
    rate = lambda n, s: c[n] / c[s] if c[s] else 0.0       # noqa: E731
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP glmcpu_{name} {help_}")
        lines.append(f"# TYPE glmcpu_{name} {kind}")
        for labels, v in samples:
            lines.append(f"glmcpu_{name}{labels} {float(v)!r}")

    metric("requests_total", "counter", "Generations ended, by how.",
           [(f'{{outcome="{o}"}}', c[f"requests_{o}"]) for o in ("stop", "length", "cancelled", "error")])
    metric("requests_rejected_total", "counter", "Requests refused with 503: every slot busy and the queue full.",
           [("", c["rejected"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens computed (not those reused from a kept cache).",
           [("", c["prompt_tokens"])])
    metric("tokens_predicted_total", "counter", "Tokens generated.", [("", c["tokens_predicted"])])
    metric("prompt_seconds_total", "counter", "Seconds of forward passes that carried prompt tokens.",
           [("", c["prompt_seconds"])])
    metric("decode_seconds_total", "counter", "Seconds of forward passes that carried generated tokens.",
           [("", c["decode_seconds"])])
    metric("steps_total", "counter", "Forward passes run (--parallel above 1).", [("", c["steps"])])
    metric("step_tokens_total", "counter", "Tokens those passes carried: over steps_total, the mean batch.",
           [("", c["step_rows"])])
    metric("prompt_tokens_per_second", "gauge", "prompt_tokens_total / prompt_seconds_total.",
           [("", rate("prompt_tokens", "prompt_seconds"))])
    metric("decode_tokens_per_second", "gauge", "tokens_predicted_total / decode_seconds_total: all streams together.",
           [("", rate("tokens_predicted", "decode_seconds"))])
    metric("slots", "gauge", "Generation slots (--parallel).", [("", slots)])
    metric("slots_busy", "gauge", "Slots running a generation.", [("", busy)])
    metric("queue_length", "gauge", "Requests waiting for a slot.", [("", waiting)])
    return "\n".join(lines) + "\n"


def default_parallel(model, free: int, cap: int = 4) -> tuple:
    """(slots, a line saying why): as many full-context KV caches as the memory beside the weights
    holds, 1..cap. A slot's cache takes memory as it fills, so this bounds the worst case."""
    if model.cluster is not None:
        n = model.cluster.slots
        return n, f"{n} slot{'s' * (n > 1)}: the cluster's workers hold a KV cache for each (--parallel N)"
    per = model.cfg.kv_bytes(model.ctx, model.kv_type)
    n = int(max(1, min(cap, free // max(per, 1))))
    return n, (f"{n} slot{'s' * (n > 1)}: {'at most ' if n == cap else ''}{n} full contexts of "
               f"{per / 2**30:.1f} GB of KV cache fit in the free memory (--parallel N to choose)")

