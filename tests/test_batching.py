"""Continuous batching (`serve --parallel N`): glm4.Batch runs several sequences in one forward pass
bit for bit as each would run alone; batching.Scheduler gives every job the tokens it would get
alone; the server streams them, frees the slot of a client that leaves, bounds its waiting line
(503 + Retry-After) and counts it all in /metrics."""
import http.client
import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import glmcpu
from conftest import test_ids as make_ids
from glmcpu.batching import Scheduler
from glmcpu.generate import generate_ids
from glmcpu.hub import demo_path
from glmcpu.models.glm4 import Batch
from glmcpu.sampling import Sampler

openai = pytest.importorskip("openai")
from test_server import assert_openai_error, health, start_server  # noqa: E402

LONG = 4000         # tokens of a generation that must outlast a test's steps (cancelled at its end)


# ---- the model: Batch ------------------------------------------------------------------------

# Four sequences s0..s3 go through batched steps; each part is (sequence, tokens, logits wanted).
# s0 and s3 start with a prefix already in their caches; s1 reads its prompt in two chunks, logits
# wanted after the second only; steps mix prompt chunks with single decode tokens at different
# positions, in varying order.
PREFIX = {0: 10, 3: 20}
STEPS = [[(0, 1, True), (1, 7, False), (2, 5, True), (3, 1, True)],
         [(1, 6, True), (0, 1, True), (2, 1, True)],
         [(3, 1, True), (1, 1, True), (0, 3, False)],
         [(1, 2, False), (2, 3, False)],                     # no logits wanted at all
         [(2, 1, True), (0, 1, True), (1, 1, True), (3, 1, True)]]


@pytest.mark.parametrize("family,out_type", [("glm4", "f32"), ("glm4", "q8_0"),
                                             ("glm4_moe", "f32"), ("glm4_moe", "q8_0")])
def test_batch_logits_equal_each_sequence_alone(tiny, family, out_type):
    kw = dict(qk_norm=True, scaling=2.5) if family == "glm4_moe" else {}
    _, path, _ = tiny(family, out_type, **kw)
    net = glmcpu.load(path, threads=2, draft="none").net
    seqs = [make_ids(60, seed=10 + s) for s in range(4)]
    alone, batched = [net.new_cache(64) for _ in seqs], [net.new_cache(64) for _ in seqs]
    done = [0] * 4                      # tokens of each sequence in its caches
    for s, n in PREFIX.items():
        for caches in (alone, batched):
            net.forward(seqs[s][:n], caches[s])
        done[s] = n
    for step in STEPS:
        ids, want = [], []
        for s, n, wanted in step:
            ids += seqs[s][done[s]:done[s] + n]
            one = net.forward(seqs[s][done[s]:done[s] + n], alone[s])
            if wanted:
                want.append(one[0])
            done[s] += n
        got = net.forward(ids, Batch([(batched[s], n, wanted) for s, n, wanted in step]))
        assert got.shape == (len(want), net.cfg.n_vocab), step
        for row, (a, b) in enumerate(zip(got, want)):
            assert np.array_equal(a, b), (step, row, np.abs(a - b).max())
    for s in range(4):                  # the keys and values went to each sequence's own positions
        a, b = alone[s], batched[s]
        assert a.pos == b.pos == done[s] and a.tokens == b.tokens == seqs[s][:done[s]]
        assert np.array_equal(a.k[:, :, :a.pos], b.k[:, :, :b.pos])
        assert np.array_equal(a.v[:, :, :a.pos], b.v[:, :, :b.pos])


def test_batch_refuses_a_cache_twice_and_empty_parts(tiny):
    _, path, _ = tiny("glm4", "f32")
    net = glmcpu.load(path, threads=2, draft="none").net
    a, b = net.new_cache(16), net.new_cache(16)
    with pytest.raises(ValueError):
        Batch([(a, 1), (b, 2), (a, 1)])
    with pytest.raises(ValueError):
        Batch([(a, 1), (b, 0)])
    assert Batch([(a, 2, False), (b, 3)]).lasts == [4]


# ---- the scheduler, in process -----------------------------------------------------------------

class Spy:
    """The model's net, recording each step's parts as (cache, its position before, tokens)."""

    def __init__(self, net):
        self.net, self.steps = net, []

    def forward(self, ids, batch, **kw):
        self.steps.append([(c, c.pos, b - a) for c, a, b in batch.parts])
        return self.net.forward(ids, batch, **kw)


def test_scheduler_answers_equal_each_job_alone():
    """Six jobs from six threads on four slots, prompts read 8 tokens a step beside the running
    streams: every job's tokens are those it gets alone on a one-slot scheduler, and those of the
    engine's own generation loop (generate_ids, as `--parallel 1` runs it)."""
    model = glmcpu.load(demo_path(), threads=2, draft="none")
    prompts = [make_ids(n, seed=n, vocab=4000) for n in (3, 11, 26, 40, 17)]
    prompts.append(prompts[3] + make_ids(9, seed=99, vocab=4000))    # job 3's prompt and more
    base = dict(top_k=0, top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=None, ignore_eos=True)
    kws = [dict(base, temperature=0), dict(base, temperature=0.8, seed=1),
           dict(base, temperature=0, repeat_penalty=1.3), dict(base, temperature=0.8, seed=2, repeat_penalty=1.1),
           dict(base, temperature=0.8, seed=3, top_p=1.0, min_p=0.0),
           dict(base, temperature=0, repeat_penalty=1.1, ignore_eos=False)]
    max_tokens = [24, 6, 30, 30, 20, 16]      # slots free at different steps: waiting jobs join running ones

    sched = Scheduler(model, parallel=4, max_waiting=8, chunk=8)
    sched.net = spy = Spy(model.net)
    jobs = [None] * 6
    gate = threading.Barrier(5)

    def run(i):
        if i == 5:      # once job 3 generates: its cache is busy, so job 5 gets a copy of its prefix
            wait_for(lambda: jobs[3] is not None and jobs[3].first is not None, "job 3 to generate")
        else:
            gate.wait()
        jobs[i] = sched.submit(prompts[i], max_tokens=max_tokens[i], **kws[i])
        return list(jobs[i].tokens())
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, range(6)))
    counts = dict(sched.counts)
    assert sched.status() == {"slots": [{"id": i, "state": "idle"} for i in range(4)], "busy": 0, "waiting": 0}
    sched.close()
    assert jobs[5].stats["cached_tokens"] == len(prompts[3])

    alone, engine = [], []
    one = Scheduler(model, parallel=1)
    for p, n, kw in zip(prompts, max_tokens, kws):
        model.reset()
        alone.append(list(one.submit(p, max_tokens=n, **kw).tokens()))
        sampler = Sampler(*(kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")),
                          seed=kw["seed"])
        stops = set() if kw["ignore_eos"] else model.tokenizer.stop_ids
        engine.append(list(generate_ids(model.net, model.net.new_cache(model.ctx), p, sampler, n, stops, {})))
    one.close()

    assert all(len(a) == n for a, n, kw in zip(alone, max_tokens, kws) if kw["ignore_eos"]), alone
    for i in range(6):
        assert together[i] == alone[i] == engine[i], (i, together[i], alone[i], engine[i])
        assert jobs[i].finish_reason == ("length" if len(alone[i]) == max_tokens[i] else "stop")
    # it really batched: passes carried several sequences, decode tokens beside prompt chunks
    total = sum(map(len, alone))
    assert counts["tokens_predicted"] == total
    assert counts["steps"] == len(spy.steps) and counts["step_rows"] == sum(n for s in spy.steps for *_, n in s)
    assert counts["step_rows"] > counts["steps"] and counts["steps"] < total, counts
    assert max(len(s) for s in spy.steps) == 4
    prompt_len = {id(j.cache): len(j.ids) for j in jobs}
    assert len(prompt_len) == 6
    mixed = [s for s in spy.steps if any(pos >= prompt_len[id(c)] for c, pos, _ in s)
             and any(pos < prompt_len[id(c)] for c, pos, _ in s)]
    assert mixed, "no prompt chunk ever ran beside a decoding stream"
    assert all(n <= 8 for s in mixed for c, pos, n in s if pos < prompt_len[id(c)])


# ---- the server ------------------------------------------------------------------------------------

def metrics(url) -> dict:
    """{(sample name, frozenset of labels): value} of /metrics, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m, name, **labels):
    return m[(f"glmcpu_{name}", frozenset(labels.items()))]


def requests_total(m):
    return sum(v for (name, _), v in m.items() if name == "glmcpu_requests_total")


def wait_for(cond, what, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := cond():
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Stream:
    """A streaming chat request on a raw socket, which the test may close at any moment."""

    def __init__(self, url, content, max_tokens=LONG):
        host, port = url.rsplit("/", 1)[1].split(":")
        body = json.dumps({"messages": [{"role": "user", "content": content}], "stream": True,
                           "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": 1})
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        self.got = b""

    def events(self, n):
        """Read until n events have come (the stream is generating)."""
        while self.got.count(b"data: ") < n:
            more = self.sock.recv(65536)
            assert more, self.got
            self.got += more
        return self.got.count(b"data: ")

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    p, url = start_server("--parallel", "4", "--queue", "100", "--ctx", "4096")
    yield url
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0, timeout=120)


def streamed(client, request):
    """(text, finish_reason, usage) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **request))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage


def test_concurrent_streams_equal_each_alone(server, client):
    """Four streams at once, greedy and seeded: each answer is the one the same request gets alone,
    and the passes carried several streams' tokens."""
    requests = [dict(model="demo", messages=[{"role": "user", "content": text}], max_tokens=40,
                     extra_body={"ignore_eos": True}, **kw)
                for text, kw in (("Who made the heaven and the earth?", dict(temperature=0)),
                                 ("Tell me of Noah and the ark", dict(temperature=0.9, seed=7)),
                                 ("What did Moses say?", dict(temperature=0)),
                                 ("Sing of the waters", dict(temperature=1.0, seed=11, top_p=0.9)))]
    before = metrics(server)
    gate = threading.Barrier(4)

    def ask(request):
        gate.wait()
        return streamed(client, request)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, requests))
    after = metrics(server)
    alone = [streamed(client, r) for r in requests]

    for (text, finish, usage), (text1, finish1, usage1) in zip(together, alone):
        assert text == text1 and text
        assert finish == finish1 == "length" and usage.completion_tokens == usage1.completion_tokens == 40
    steps = value(after, "steps_total") - value(before, "steps_total")
    rows = value(after, "step_tokens_total") - value(before, "step_tokens_total")
    prompt = value(after, "prompt_tokens_total") - value(before, "prompt_tokens_total")
    predicted = value(after, "tokens_predicted_total") - value(before, "tokens_predicted_total")
    assert predicted == 160 and rows / steps > 1, (steps, rows)
    # one stream at a time, a pass carries one decode token (rows beyond the prompts' <= passes);
    # four streams together, nearly four
    assert (rows - prompt) / steps > 1.5, (steps, rows, prompt)


def test_a_client_that_leaves_frees_its_slot_while_another_streams(server):
    """Two long streams; one client closes its socket mid-stream: its slot is idle within
    moments while the other goes on streaming, and /metrics counts it cancelled."""
    cancelled = value(metrics(server), "requests_total", outcome="cancelled")
    stay, leave = Stream(server, "Tell me all of Genesis"), Stream(server, "And of Exodus")
    stay.events(3)
    leave.events(3)
    assert health(server)["busy"] == 2
    leave.close()
    h = wait_for(lambda: (h := health(server))["busy"] == 1 and h, "the slot of the client that left")
    assert [s["state"] for s in h["slots"]].count("generating") == 1 and h["waiting"] == 0, h
    seen = stay.events(3)
    assert stay.events(seen + 5) > seen         # the other stream goes on
    assert health(server)["busy"] == 1
    wait_for(lambda: value(metrics(server), "requests_total", outcome="cancelled") == cancelled + 1,
             "the cancelled count")
    stay.close()
    h = wait_for(lambda: (h := health(server))["busy"] == 0 and h, "every slot to be free")
    assert h["pending"] == 0 and all(s["state"] == "idle" for s in h["slots"]), h
    assert value(metrics(server), "requests_total", outcome="cancelled") == cancelled + 2


def test_a_hundred_requests_from_sixteen_threads(server):
    """Chat and completions, streamed and not, short answers: all served; /metrics (parsed by
    prometheus_client) counts them and the tokens the clients were told of."""
    before = metrics(server)

    def request(i):
        c = openai.OpenAI(base_url=server + "/v1", api_key="-", max_retries=0, timeout=120)
        kw = dict(model="demo", max_tokens=1 + i % 7, temperature=0 if i % 3 else 0.8, seed=i)
        stream = i % 4 >= 2
        if stream:
            kw.update(stream=True, stream_options={"include_usage": True})
        if i % 2:
            r = c.chat.completions.create(messages=[{"role": "user", "content": f"Count to {i}"}], **kw)
        else:
            r = c.completions.create(prompt=f"Verse {i}: in the beginning", **kw)
        chunks = list(r) if stream else [r]
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
        usage = chunks[-1].usage
        assert finish in ("stop", "length") and 0 <= usage.completion_tokens <= kw["max_tokens"], (i, usage)
        return usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(request, range(100)))
    h = health(server)
    assert (h["busy"], h["waiting"], h["pending"]) == (0, 0, 0), h
    after = metrics(server)
    delta = {o: value(after, "requests_total", outcome=o) - value(before, "requests_total", outcome=o)
             for o in ("stop", "length", "cancelled", "error")}
    assert delta["stop"] + delta["length"] == 100 and delta["cancelled"] == delta["error"] == 0, delta
    assert requests_total(after) >= 100
    assert value(after, "tokens_predicted_total") - value(before, "tokens_predicted_total") == sum(tokens)
    assert value(after, "requests_rejected_total") == value(before, "requests_rejected_total")
    assert (value(after, "slots"), value(after, "slots_busy"), value(after, "queue_length")) == (4, 0, 0)


def test_past_the_queue_a_request_gets_503_with_retry_after():
    """--parallel 2 --queue 1: two generating and one waiting, a fourth request is refused in
    OpenAI's shape with Retry-After; a waiting client that leaves gives its place back."""
    p, url = start_server("--parallel", "2", "--queue", "1", "--ctx", "4096")
    streams = []
    try:
        streams = [Stream(url, "Tell me all of Genesis"), Stream(url, "And of Exodus")]
        for s in streams:
            s.events(2)
        streams.append(Stream(url, "And of Leviticus"))
        wait_for(lambda: health(url)["waiting"] == 1, "the third request to wait")
        host, port = url.rsplit("/", 1)[1].split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"})
        r = c.getresponse()
        body = json.loads(r.read())
        c.close()
        assert r.status == 503 and r.getheader("Retry-After", "").isdigit(), (r.status, body)
        assert_openai_error(body)
        assert body["error"]["code"] == "server_busy" and body["error"]["type"] == "server_error", body
        h = health(url)
        assert (h["busy"], h["waiting"], h["pending"]) == (2, 1, 3), h
        assert value(metrics(url), "requests_rejected_total") == 1

        # the official client sees the same 503 (and, told not to retry, raises it)
        oc = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            oc.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers.get("retry-after")

        streams.pop().close()           # the waiting client leaves: its place in the line is free
        h = wait_for(lambda: (h := health(url))["waiting"] == 0 and h, "the waiting client's place to be given back",
                     timeout=5)
        assert h["busy"] == 2, h         # while the two long generations still run
        streams.append(Stream(url, "And of Numbers"))
        wait_for(lambda: health(url)["waiting"] == 1, "a new request to wait")
        for s in streams:
            s.close()
        h = wait_for(lambda: (h := health(url))["pending"] == 0 and h, "every slot to be free")
        assert h["busy"] == h["waiting"] == 0, h
        r = oc.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.choices[0].message.content is not None
    finally:
        for s in streams:
            s.close()
        p.terminate()
        p.wait(timeout=30)


@pytest.mark.parametrize("parallel", ["2", "1"])
def test_max_tokens_past_the_context_is_capped(parallel):
    """--ctx 64: an answer asked for 1000 tokens ends with "length" once the context is full, its
    prompt and answer within the 64 tokens, batched (--parallel 2) or in turns (1)."""
    p, url = start_server("--parallel", parallel, "--ctx", "64")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        r = c.completions.create(model="demo", prompt="In the beginning", max_tokens=1000,
                                 temperature=0, extra_body={"ignore_eos": True})
        u = r.usage
        assert r.choices[0].finish_reason == "length" and 0 < u.prompt_tokens < 10, r
        assert u.completion_tokens == 64 - u.prompt_tokens, u       # all the context left, no more
        text, finish, su = streamed(c, dict(model="demo", max_tokens=1000, temperature=0,
                                            messages=[{"role": "user", "content": "Hi"}],
                                            extra_body={"ignore_eos": True}))
        assert finish == "length" and 0 < su.completion_tokens <= 64 - su.prompt_tokens, su
        # the turns count a request once its handler is done, just after the client has its answer
        deadline = time.monotonic() + 10
        while (health(url)["pending"] or value(metrics(url), "requests_total", outcome="length") < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(url)["pending"] == 0
        m = metrics(url)            # counted with the usage the clients were told of
        assert value(m, "requests_total", outcome="length") == 2
        assert value(m, "tokens_predicted_total") == u.completion_tokens + su.completion_tokens
    finally:
        p.terminate()
        p.wait(timeout=30)
