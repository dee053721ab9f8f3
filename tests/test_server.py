"""`glmcpu serve` with the demo model, driven by the official openai client and a headless Chromium."""
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
HELLO = [{"role": "user", "content": "Who made the heaven and the earth?"}]


def start_server(*args):
    """(process, base URL) of `glmcpu serve --port 0 ARGS`, once it answers /health."""
    p = subprocess.Popen([sys.executable, "-m", "glmcpu", "serve", "--port", "0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while not (m := re.search(r"http://127\.0\.0\.1:\d+", "".join(lines))) and p.poll() is None:
        lines.append(p.stdout.readline())          # the URL line follows any warnings
    assert m, "".join(lines) + p.stdout.read()
    url = m.group(0)
    threading.Thread(target=p.stdout.read, daemon=True).start()     # never block on a full pipe
    assert json.load(urllib.request.urlopen(url + "/health", timeout=30))["status"] == "ok"
    return p, url


@pytest.fixture(scope="module")
def server():
    p, url = start_server("--api-key", KEY, "--queue", "12")
    yield url
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server, method, path, body=b"", headers=None):
    """(status, parsed JSON) of a request sent by hand."""
    host, port = server.rsplit("/", 1)[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status == 503:
        assert r.getheader("Retry-After")
    return r.status, json.loads(data)


def assert_openai_error(body, status_param=None):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    if status_param:
        assert err["param"] == status_param, body


def test_chat_completion(client):
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=6, temperature=0)
    c = r.choices[0]
    assert isinstance(c.message.content, str) and c.message.content.strip()
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")
    assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_non_streaming(client):
    kw = dict(model="demo", messages=HELLO, max_tokens=8, temperature=0, seed=3)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 8 and chunks[-1].choices == []


def test_eight_concurrent_clients(client):
    answers = [None] * 8

    def ask(i):
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": f"Tell of the {i + 2} tribes"}],
            max_tokens=4, temperature=0.7, seed=i)
        answers[i] = r.choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(a, str) and a.strip() for a in answers), answers


def test_completions_stop_and_models(client):
    r = client.completions.create(model="demo", prompt="In the beginning God", max_tokens=12,
                                  temperature=0)
    text = r.choices[0].text
    assert text and r.object == "text_completion"
    word = text.split()[0]
    cut = client.completions.create(model="demo", prompt="In the beginning God", max_tokens=12,
                                    temperature=0, stop=[word])
    assert cut.choices[0].text == text[:text.index(word)] and cut.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list()] == ["demo"]


def test_list_of_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]
    a = client.chat.completions.create(model="demo", messages=parts, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_prefix_of_a_conversation_is_reused(client):
    turn = [{"role": "user", "content": "Who begat Enos?"}]
    a = client.chat.completions.create(model="demo", messages=turn, max_tokens=6, temperature=0)
    turn += [{"role": "assistant", "content": a.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    b = client.chat.completions.create(model="demo", messages=turn, max_tokens=6, temperature=0)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert a.usage.prompt_tokens <= cached < b.usage.prompt_tokens


def test_two_alternating_conversations_both_keep_their_history(client):
    """Two chats taking turns on one server: each next turn reuses its own conversation's cache."""
    chats = [[{"role": "user", "content": "Who begat Enos?"}], [{"role": "user", "content": "Where is Eden?"}]]
    firsts = []
    for turn in chats:
        a = client.chat.completions.create(model="demo", messages=turn, max_tokens=6, temperature=0)
        firsts.append(a.usage.prompt_tokens)
        turn += [{"role": "assistant", "content": a.choices[0].message.content}, {"role": "user", "content": "And?"}]
    for turn, first in zip(chats, firsts):
        b = client.chat.completions.create(model="demo", messages=turn, max_tokens=6, temperature=0)
        assert first <= b.usage.prompt_tokens_details.cached_tokens < b.usage.prompt_tokens


def test_a_restarted_server_reads_a_long_prompt_from_its_cache_dir(tmp_path):
    """SIGTERM writes the kept caches to --cache-dir; the next server answers the same long prompt
    without computing it again."""
    long = [{"role": "user", "content": " ".join(f"verse {i} of the book" for i in range(60))}]
    answers = []
    for run in range(2):
        p, url = start_server("--cache-dir", str(tmp_path / "kv"))
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
            r = c.chat.completions.create(model="demo", messages=long, max_tokens=6, temperature=0)
            answers.append((r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens))
            assert r.usage.prompt_tokens > 256
        finally:
            p.terminate()
            p.wait(timeout=30)
    assert answers[0][1] == 0 and answers[1][1] == r.usage.prompt_tokens - 1
    assert answers[0][0] == answers[1][0]


def test_bad_requests_are_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=HELLO, temperature="hot")
    assert e.value.status_code == 400
    assert_openai_error(e.value.response.json(), "temperature")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[])
    assert_openai_error(e.value.response.json(), "messages")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=HELLO, n=2)
    bad_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.status_code == 401
    assert_openai_error(e.value.response.json())

    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert_openai_error(body)
    status, body = raw(server, "GET", "/v2/nothing")
    assert status == 404
    assert_openai_error(body)
    big = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    status, body = raw(server, "POST", "/v1/chat/completions", big.encode())
    assert status == 413
    assert_openai_error(body)
    long = {"model": "demo", "messages": [{"role": "user", "content": "and " * 5000}]}
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps(long).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"

    # none of that hurt the server
    assert health(server)["status"] == "ok"
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=3)
    assert r.choices[0].message.content is not None


def health(server):
    return json.load(urllib.request.urlopen(server + "/health", timeout=10))


def test_client_that_leaves_mid_stream_frees_the_model(client, server):
    host, port = server.rsplit("/", 1)[1].split(":")
    cancelled = health(server)["cancelled"]
    body = json.dumps({"model": "demo", "messages": HELLO, "stream": True, "max_tokens": 480,
                       "ignore_eos": True, "temperature": 1.0, "seed": 1})
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while got.count(b"data: ") < 3:             # a few tokens are out: it is generating
        more = s.recv(4096)
        assert more, got
        got += more
    s.close()
    t = time.perf_counter()
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=2, temperature=0)
    # 500 tokens would take far longer than this; the next request runs as soon as the
    # server notices the closed socket (at its next token)
    assert r.choices[0].message.content is not None and time.perf_counter() - t < 15
    h = health(server)
    assert (h["status"], h["model"], h["pending"], h["busy"], h["waiting"], h["cancelled"]) == \
        ("ok", "demo", 0, 0, 0, cancelled + 1), h
    assert all(slot["state"] == "idle" for slot in h["slots"]), h


def test_turns_are_first_come_first_served_with_a_bounded_line():
    from glmcpu.server import APIError, Turns

    turns, order, errors = Turns(max_waiting=2), [], []
    gate = threading.Event()

    def request(i):
        try:
            with turns:
                order.append(i)
                gate.wait(10)
        except APIError as e:
            errors.append((i, e.status))
    threads = []
    for i in range(4):          # one served, two waiting, the fourth turned away
        threads.append(threading.Thread(target=request, args=(i,)))
        threads[-1].start()
        while turns.pending() < min(i + 1, 3) and not errors:
            time.sleep(0.01)
    threads[-1].join(10)
    gate.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2] and errors == [(3, 503)] and turns.pending() == 0


def find_chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium under selenium, shared by the page's tests (each starts afresh)."""
    browser, driver = find_chromium()
    if not (browser and driver):
        pytest.skip("no chromium/chromedriver: install Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def open_page(d, server):
    """The chat page with nothing kept in the browser, its model named."""
    d.get(f"{server}/?key={KEY}")
    d.execute_script("localStorage.clear()")
    d.refresh()
    wait(lambda: d.find_element("id", "model").text == "demo", "the model name")
    d.get_log("browser")                    # forget what came before


def set_max_tokens(d, n):
    d.find_element("id", "max-tokens").clear()
    d.find_element("id", "max-tokens").send_keys(str(n))


def notes(d):
    """The texts of the answers' notes shown (tokens/s, "stopped")."""
    return [e.text for e in d.find_elements("css selector", ".stats") if e.is_displayed()]


def kept(d):
    return d.execute_script("return JSON.parse(localStorage.getItem('glmcpu-chats') || '[]')")


def no_console_errors(d):
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors               # a refused script or resource (CSP) shows up here


def test_chat_page_streams_keeps_stops_and_regenerates_in_chromium(server, chromium):
    d = chromium
    open_page(d, server)
    set_max_tokens(d, 12)
    d.find_element("id", "input").send_keys("Who made the light?")
    d.find_element("id", "send").click()
    wait(lambda: notes(d), "the tokens/s line", timeout=120)
    answer = d.find_element("id", "answer").text
    assert answer.strip() and d.execute_script("return chunks") >= 2
    assert "tokens/s" in notes(d)[0]
    assert not d.find_elements("css selector", ".error")

    # Kept across a reload: listed, and shown as it was.
    d.refresh()
    wait(lambda: d.find_element("id", "model").text == "demo", "the model name")
    [item] = d.find_elements("css selector", "#list li")
    assert item.text.startswith("Who made the light?") and "current" in item.get_attribute("class")
    shown = d.find_elements("css selector", "#log .msg")
    assert [e.text for e in shown] == ["Who made the light?", answer], page_text(d)
    assert "tokens/s" in notes(d)[0]

    # Stop: the page aborts its fetch and the server ends that generation. The page's
    # requests get ignore_eos here, so the answer cannot end on its own before the click.
    d.execute_script("""const f = window.fetch;
        window.fetch = (url, opts) => {
            if (opts && opts.body) {
                window.lastBody = {...JSON.parse(opts.body), ignore_eos: true};
                opts.body = JSON.stringify(window.lastBody); }
            return f(url, opts); };""")
    cancelled = health(server)["cancelled"]
    set_max_tokens(d, 400)
    d.find_element("id", "input").send_keys("Tell me of Noah")
    chunks = d.execute_script("return chunks")
    d.find_element("id", "send").click()
    wait(lambda: d.execute_script("return chunks") >= chunks + 3, "streamed text", timeout=120)
    assert d.find_element("id", "send").get_property("disabled")
    d.find_element("id", "stop").click()
    wait(lambda: len(notes(d)) == 2, "the end of the answer")
    assert notes(d)[-1] == "stopped", page_text(d)
    wait(lambda: health(server)["cancelled"] > cancelled, "the server to cancel the generation")
    assert health(server)["pending"] == 0
    [conv] = kept(d)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][-1]["note"] == "stopped" and conv["messages"][-1]["content"].strip()

    # Regenerate: the last answer is replaced by a new one.
    set_max_tokens(d, 6)
    d.find_element("id", "regenerate").click()
    wait(lambda: len(notes(d)) == 2 and "tokens/s" in notes(d)[-1], "the regenerated answer", timeout=120)
    assert len(d.find_elements("css selector", "#log .msg.assistant")) == 2
    assert [m["role"] for m in d.execute_script("return window.lastBody.messages")] == ["user", "assistant", "user"]
    [conv] = kept(d)
    assert len(conv["messages"]) == 4 and conv["messages"][-1].get("note") != "stopped"
    assert conv["messages"][-1]["content"].strip() == d.find_element("css selector", "#answer .md").text
    assert not d.find_elements("css selector", ".error")
    no_console_errors(d)


# A stand-in for the server's stream: the SSE chunks of the given deltas (what the page was
# sent is kept in window.sent). Markdown, thinking and HTML can then be checked whatever the
# demo model says.
FAKE_STREAM = """
window.fakeDeltas = arguments[0];
if (!window.realFetch) window.realFetch = window.fetch;
window.fetch = async (url, opts) => {
    if (!String(url).endsWith("/v1/chat/completions")) return window.realFetch(url, opts);
    window.sent = JSON.parse(opts.body);
    const enc = new TextEncoder();
    const body = new ReadableStream({ start(c) {
        for (const delta of window.fakeDeltas)
            c.enqueue(enc.encode("data: " + JSON.stringify({choices: [{index: 0, delta, finish_reason: null}]}) + "\\n\\n"));
        c.enqueue(enc.encode("data: [DONE]\\n\\n"));
        c.close(); } });
    return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};"""

MARKDOWN = ("Here:\n\n```python\nprint(\"<b>hi</b>\")\n```\n\n"
            "<img src=x onerror=\"window.injected = 1\"><script>window.injected = 2</script>"
            "<b>bold?</b> <iframe src=\"/health\"></iframe>\n\n"
            "[bad](javascript:window.injected=3) [worse](&#106;avascript:window.injected=4) "
            "[good](https://example.com/a?b=1) ![pic](https://example.com/x.png) **done**")


def say(d, text, deltas):
    chunks = d.execute_script("return chunks") + sum(bool(x.get("content") or x.get("reasoning_content")) for x in deltas)
    d.execute_script(FAKE_STREAM, deltas)
    d.find_element("id", "input").send_keys(text)
    d.find_element("id", "send").click()
    wait(lambda: d.execute_script("return chunks") == chunks and not d.execute_script("return controller"),
         "the stand-in answer")


def check_rendered(d):
    """The two stand-in answers as the page shows them, live or after a reload."""
    first, second = d.find_elements("css selector", "#log .msg.assistant")
    [code] = first.find_elements("css selector", ".md pre > code")
    assert code.get_attribute("class") == "language-python"
    assert code.get_property("textContent") == 'print("<b>hi</b>")\n'
    # raw HTML is shown as text, never made into elements; bad links are text, images links
    md = first.find_element("css selector", ".md")
    for tag in ("img", "script", "iframe", "b"):
        assert not md.find_elements("tag name", tag), tag
    assert '<img src=x onerror="window.injected = 1">' in md.text and "<b>bold?</b>" in md.text
    assert d.execute_script("return window.injected") is None
    links = {a.text: (a.get_attribute("href"), a.get_attribute("target"))
             for a in md.find_elements("tag name", "a")}
    assert links == {"good": ("https://example.com/a?b=1", "_blank"),
                     "pic": ("https://example.com/x.png", "_blank")}, links
    assert "bad" in md.text and "worse" in md.text
    assert md.find_element("tag name", "strong").text == "done"
    # thinking folded: there, closed, not in the answer; both ways it may come
    for msg, thought in ((first, "The user wants code."), (second, "Inline thoughts.")):
        think = msg.find_element("css selector", "details.think")
        assert think.is_displayed() and think.get_attribute("open") is None
        assert think.find_element("tag name", "summary").text == "Thinking"
        assert think.find_element("tag name", "div").get_property("textContent") == thought
        assert thought not in msg.text
    assert second.find_element("css selector", ".md").text == "The answer."


def test_chat_page_markdown_thinking_and_conversations_in_chromium(server, chromium):
    from selenium.webdriver.common.keys import Keys

    d = chromium
    open_page(d, server)
    pieces = [MARKDOWN[i:i + 7] for i in range(0, len(MARKDOWN), 7)]      # cut anywhere, tags too
    say(d, "Show me code", [{"role": "assistant"}, {"reasoning_content": "The user wants "},
                            {"reasoning_content": "code."}] + [{"content": p} for p in pieces])
    say(d, "And think inline", [{"content": "<th"}, {"content": "ink>Inline thoughts.</think>"},
                                {"content": "\n\nThe answer."}])
    check_rendered(d)
    # earlier answers go back without their thinking
    sent = [m["content"] for m in d.execute_script("return window.sent.messages")]
    assert sent == ["Show me code", MARKDOWN, "And think inline"], sent
    [conv] = kept(d)
    assert conv["messages"][1] == {"role": "assistant", "content": MARKDOWN,
                                   "reasoning": "The user wants code."}
    assert conv["messages"][3]["reasoning"] == "Inline thoughts."
    assert conv["messages"][3]["content"] == "The answer."

    d.refresh()
    wait(lambda: d.find_element("id", "model").text == "demo", "the model name")
    check_rendered(d)
    d.find_element("css selector", "details.think summary").click()      # unfolds
    assert "The user wants code." in d.find_elements("css selector", "#log .msg.assistant")[0].text

    # A second conversation; rename, switch, delete.
    d.find_element("id", "new").click()
    wait(lambda: not d.find_elements("css selector", "#log .msg"), "an empty log")
    say(d, "Another one", [{"content": "Yes."}])
    items = d.find_elements("css selector", "#list li")
    assert [i.text.split("\n")[0] for i in items] == ["Another one", "Show me code"]
    items[1].find_element("css selector", ".rename").click()
    box = d.find_element("css selector", "#list li input")
    assert box.get_property("value") == "Show me code"
    box.send_keys(Keys.CONTROL + "a")            # (clear() would blur it, which ends a rename)
    box.send_keys("Code and thinking\n")
    wait(lambda: not d.find_elements("css selector", "#list li input"), "the rename to end")
    d.find_elements("css selector", "#list li .title")[1].click()
    wait(lambda: len(d.find_elements("css selector", "#log .msg")) == 4, "the first conversation")
    check_rendered(d)
    d.refresh()
    wait(lambda: len(d.find_elements("css selector", "#log .msg")) == 4, "the first conversation")
    titles = [e.get_property("textContent") for e in d.find_elements("css selector", "#list .title")]
    assert titles == ["Another one", "Code and thinking"], titles       # the last written first
    assert "current" in d.find_elements("css selector", "#list li")[1].get_attribute("class")
    d.execute_script("window.confirm = () => true")
    d.find_elements("css selector", "#list li .delete")[1].click()         # the one shown
    wait(lambda: len(d.find_elements("css selector", "#list li")) == 1, "the deletion")
    assert not d.find_elements("css selector", "#log .msg")
    assert [c["title"] for c in kept(d)] == ["Another one"]
    no_console_errors(d)

    # Behind the cleaning, the page's Content-Security-Policy: no inline handler runs, nothing
    # outside this server loads. The renderer comes from the server, like the page.
    d.execute_script("""document.body.insertAdjacentHTML("beforeend",
        '<img src="data:," onerror="window.injected = 5"><img src="http://192.0.2.1/x.png">')""")
    time.sleep(0.5)
    assert d.execute_script("return window.injected") is None
    refused = [e["message"] for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    assert any("inline event handler" in m for m in refused) and any("192.0.2.1" in m for m in refused), refused
    with urllib.request.urlopen(server + "/") as r:
        assert "script-src 'self' 'sha256-" in r.headers["Content-Security-Policy"]
    with urllib.request.urlopen(server + "/marked.min.js") as r:
        assert r.headers["Content-Type"].startswith("text/javascript") and b"(MIT Licensed)" in r.read(300)


def page_text(d):
    return d.execute_script("return [...document.querySelectorAll('#log > *')]"
                            ".map((e) => e.className + ': ' + e.textContent).join('\\n')")


def wait(cond, what, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_stop_strings_are_cut_and_never_streamed_in_part():

    from glmcpu.engine import answer
    from glmcpu.server import Generation

    closed = []

    def pieces():
        try:
            yield from ["\n\nAnd the", " LO", "RD said", " unto"]
        finally:
            closed.append(True)
    g = Generation(answer(pieces()), lambda: "length", stops=["LORD said", "xyz"])
    assert list(g) == ["And the", " "] and g.text == "And the " and g.finish_reason == "stop"
    assert closed == [True]         # the model's generator is closed at the stop string
    g = Generation(pieces(), lambda: "length", stops=["LOST"])
    assert "".join(g) == "\n\nAnd the LORD said unto" and g.finish_reason == "length"


def test_a_full_queue_is_answered_503_with_retry_after():
    import glmcpu
    from glmcpu.hub import demo_path
    from glmcpu.server import API, Server

    api = API(glmcpu.load(demo_path()), max_waiting=0)
    srv = Server(api, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with api.turns:             # the model is busy and nobody may wait
            status, body = raw(srv.url, "POST", "/v1/chat/completions",
                               json.dumps({"messages": HELLO, "max_tokens": 2}).encode())
        assert status == 503 and body["error"]["code"] == "server_busy"
        assert_openai_error(body)
        status, body = raw(srv.url, "POST", "/v1/chat/completions",
                           json.dumps({"messages": HELLO, "max_tokens": 2}).encode())
        assert status == 200 and body["choices"][0]["message"]["content"] is not None
    finally:
        srv.shutdown()
        srv.server_close()


def test_serve_shares_the_model_with_workers(client, tmp_path):
    """serve --workers: a worker without the file gets its share shipped, and answers as one process."""
    from conftest import start_worker

    worker, endpoint = start_worker(None, "--insecure", "--cache", str(tmp_path / "cache"))
    try:
        p, url = start_server("--workers", endpoint, "--insecure")
        try:
            kw = dict(model="demo", messages=HELLO, max_tokens=10, temperature=0)
            shared = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
            assert (shared.chat.completions.create(**kw).choices[0].message.content
                    == client.chat.completions.create(**kw).choices[0].message.content)
            assert json.load(urllib.request.urlopen(url + "/health", timeout=30))["status"] == "ok"
            assert list((tmp_path / "cache").rglob("*.share")), "the root sent the worker no share"
        finally:
            p.terminate()
            p.wait(timeout=30)
    finally:
        worker.kill()
        worker.wait()


def test_deep_json_and_odd_lengths_are_400(server):
    """A 100,000-deep body and a Content-Length that str.isdigit() accepts but int() does not
    ("²"): 400 with an OpenAI error body, not a 500 or a dropped connection."""
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = raw(server, "POST", "/v1/chat/completions", deep)
    assert status == 400 and "nested" in body["error"]["message"]
    assert_openai_error(body)
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY +
                   "\r\nContent-Length: \u00b2\r\n\r\n").encode("latin-1"))
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.") and head.split()[1] == "400", head[:200]
    assert health(server)["status"] == "ok"


def test_a_client_that_resets_mid_request_leaves_no_traceback(capsys):
    import struct
    from glmcpu.server import Server
    srv = Server(api=None, port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        for _ in range(3):
            s = socket.create_connection(srv.server_address[:2], timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close = reset
            s.close()
        time.sleep(0.5)
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_a_bug_is_a_500_in_openai_shape_logged_in_one_line_only_with_verbose(capfd):
    """A bug in route() (here: a server without an API) and one in http.server's part of the work
    (here: the parser) are answered 500 with an OpenAI error body, never a dropped connection;
    stderr gets no traceback, one line per bug with verbose, nothing without."""
    from glmcpu.server import Handler, Server

    class BrokenParser(Handler):
        def parse_request(self):
            raise RuntimeError("a bug in the parser")

    for verbose in (False, True):
        srv = Server(api=None, port=0, verbose=verbose)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            for handler in (Handler, BrokenParser):
                srv.RequestHandlerClass = handler
                status, body = raw(srv.url, "GET", "/health")
                assert status == 500 and body["error"]["type"] == "server_error", body
                assert_openai_error(body)
        finally:
            srv.shutdown()
            srv.server_close()
        err = capfd.readouterr().err
        assert "Traceback" not in err, err
        ours = [line for line in err.splitlines() if line.startswith("glmcpu serve:")]
        assert len(ours) == (2 if verbose else 0), err
        assert not verbose or "RuntimeError: a bug in the parser" in ours[1], err
        assert all(line in ours or line.endswith('" 500 -') for line in err.splitlines()), err   # + access log


def raw_bytes(server, data: bytes):
    """(status, parsed JSON body) of bytes sent by hand on a connection the server closes."""
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        got = b""
        while more := s.recv(65536):
            got += more
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), got[:300]
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_values_that_made_500s_are_400s_or_served(server):
    """Each of these was a 500 (an exception in the server) before being checked; and a 'model'
    that is no string is a 400 for that, not a 404 that echoes its repr."""
    def post(body: bytes, path="/v1/chat/completions"):
        return raw(server, "POST", path, body, {"Content-Type": "application/json"})

    status, body = post(b'{"messages": ' + b"1" * 5000 + b"}")     # int() takes 4,300 digits at most
    assert status == 400 and "not valid JSON" in body["error"]["message"], body
    for path, key, value in (("/v1/chat/completions", "messages", [{"role": "user", "content": "\ud800"}]),
                             ("/v1/completions", "prompt", "a\udfffb")):
        status, body = post(json.dumps({key: value, "max_tokens": 1}).encode(), path)
        assert status == 400 and "surrogate" in body["error"]["message"], body
    status, body = post(json.dumps({"messages": HELLO, "max_tokens": 1, "repeat_penalty": 0}).encode())
    assert status == 400 and body["error"]["param"] == "repeat_penalty", body
    for seed in (-1, -5, -2**63):       # -1: a random seed, as llama.cpp
        status, body = post(json.dumps({"messages": HELLO, "max_tokens": 1, "seed": seed}).encode())
        assert status == 200, body
    status, body = post(json.dumps({"model": ["demo"], "messages": HELLO}).encode())
    assert status == 400 and body["error"]["param"] == "model", body
    assert health(server)["status"] == "ok"


def test_bodies_without_one_clear_length_are_refused(server):
    """Chunked, two different Content-Lengths, one of 5,000 digits: an OpenAI error and a closed
    connection (where the body ends is unknown), never a guess."""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    body = json.dumps({"messages": HELLO, "max_tokens": 1})
    chunked = f"{len(body):x}\r\n{body}\r\n0\r\n\r\n"
    for extra, sent, want in (("Transfer-Encoding: chunked\r\n", chunked, 411),
                              (f"Transfer-Encoding: chunked\r\nContent-Length: {len(body)}\r\n", body, 411),
                              (f"Content-Length: {len(body)}\r\nContent-Length: 3\r\n", body, 400),
                              ("Content-Length: " + "9" * 5000 + "\r\n", body, 413)):
        status, err = raw_bytes(server, (head + extra + "\r\n" + sent).encode())
        assert status == want, (extra[:60], err)
        assert_openai_error(err)


def test_requests_http_server_refuses_are_openai_errors(server):
    """http.server's own answers (request line, version, method, header size) are JSON in
    OpenAI's shape after a status line, not its HTML page."""
    for line, want in ((b"GARBAGE", 400), (b"GET /v1/models HTTP/1.1.1", 400), (b"GET /v1/models", 400),
                       (b"GET /v1/models HTTP/2.0", 505), (b"BREW /v1/models HTTP/1.1", 405),
                       (b"post /v1/chat/completions HTTP/1.1", 405),
                       (b"GET /" + b"a" * 70000 + b" HTTP/1.1", 414)):
        status, body = raw_bytes(server, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == want, (line[:40], body)
        assert_openai_error(body)
    status, body = raw_bytes(server, b"GET /v1/models HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n")
    assert status == 431
    assert_openai_error(body)
    assert health(server)["status"] == "ok"


def test_serve_options_bound_connections_and_slow_heads():
    """`serve --max-connections 1 --head-timeout 1`: a second connection while one is open gets
    503 JSON at once; the open one, sending no request, is closed after about a second."""
    import socket
    import time
    from urllib.parse import urlsplit
    p, url = start_server("--max-connections", "1", "--head-timeout", "1")
    try:
        addr = (urlsplit(url).hostname, urlsplit(url).port)
        for _ in range(20):     # the /health probe's thread may not have given its slot back yet
            idle = socket.create_connection(addr, timeout=5)
            time.sleep(0.2)
            idle.setblocking(False)
            try:
                idle.recv(1, socket.MSG_PEEK)       # data or EOF: turned away, try again
            except BlockingIOError:
                break                               # nothing to read: it holds the one slot
            idle.close()
        else:
            raise AssertionError("no connection ever held the server's one slot")
        idle.setblocking(True)
        idle.settimeout(5)
        other = socket.create_connection(addr, timeout=5)
        other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = other.recv(65536).decode()
        assert answer.startswith("HTTP/1.0 503") or answer.startswith("HTTP/1.1 503"), answer
        assert '"server_busy"' in answer
        t, data = time.perf_counter(), b""
        while chunk := idle.recv(4096):               # closed by the head deadline (maybe after a 408)
            data += chunk
        assert time.perf_counter() - t < 3 and (not data or b" 408 " in data.split(b"\r\n")[0]), data
        time.sleep(0.3)
        assert json.load(urllib.request.urlopen(url + "/health", timeout=5))["status"] == "ok"
    finally:
        p.terminate()
        p.wait(timeout=30)
