"""Tool calls and thinking (chat_format.py, and the server's OpenAI shapes for them): scripted
GLM-4.5, GLM-4 and INTELLECT-3 answers parse into the same calls whole and fed in random pieces;
templates get tools, past calls and results as they want them; the server answers the official
openai client with tool_calls and reasoning_content, whole and streamed, on both of its paths."""
import json
import random
import threading
from contextlib import contextmanager

import pytest

import glmcpu
from glmcpu.chat_format import FORMATS, Lead, detect, value_kind
from glmcpu.hub import demo_path
from glmcpu.tokenizer import Tokenizer


def tool(name, props, required=()):
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": list(required)}}}


TOOLS = [
    tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"},
                         "unit": {"type": "string", "enum": ["C", "F"]}}, ["city"]),
    tool("write_file", {"path": {"type": "string"}, "text": {"type": "string"}}, ["path", "text"]),
    tool("plan", {"steps": {"type": "array", "items": {"type": "object"}}, "meta": {"type": "object"},
                  "urgent": {"type": "boolean"}, "score": {"type": ["number", "null"]}}),
]
NESTED = {"steps": [{"do": "buy", "what": ["milk", "eggs"]}, {"do": "cook", "time": 12.5}],
          "meta": {"owner": {"name": "Zoë", "id": 7}, "tags": []}, "urgent": True, "score": None}
CODE = 'def f(x):\n    return "</arg_key> \\n" + x\n\n'        # newlines, quotes, a tag-like string


def glm45_call(name, args):
    """A call as GLM-4.5 writes it: string values raw, others as JSON."""
    return FORMATS["glm45"].call_text(name, args)


# (format, text, reasoning, content, [(name, arguments)]) for answers as the models write them
CASES = [
    ("glm45", "\n<think>The user wants the weather.\nParis it is.</think>\nLet me look.\n"
              + glm45_call("get_weather", {"city": "Paris", "days": 3}),
     "The user wants the weather.\nParis it is.", "Let me look.", [("get_weather", {"city": "Paris", "days": 3})]),
    ("glm45", glm45_call("get_weather", {"city": "東京 ☀", "unit": "C"}) + "\n"
              + glm45_call("write_file", {"path": "/tmp/a b.py", "text": CODE}),
     "", "", [("get_weather", {"city": "東京 ☀", "unit": "C"}), ("write_file", {"path": "/tmp/a b.py", "text": CODE})]),
    ("glm45", "<think></think>\n" + glm45_call("plan", NESTED), "", "", [("plan", NESTED)]),
    ("glm45", "<think>Nothing to call.</think>\nThe answer is 42.\n\nSee <b>this</b> < that.\n",
     "Nothing to call.", "The answer is 42.\n\nSee <b>this</b> < that.\n", []),
    ("glm45", "No thinking here, a call:<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo"
              "</arg_value></tool_call>", "", "No thinking here, a call:", [("get_weather", {"city": "Oslo"})]),
    ("glm4", 'get_weather\n{"city": "Beijing", "days": 2}', "", "", [("get_weather", {"city": "Beijing", "days": 2})]),
    ("glm4", "write_file\n" + json.dumps({"path": "x", "text": CODE}, indent=2), "", "",
     [("write_file", {"path": "x", "text": CODE})]),
    ("glm4", "\nget_weather is what I would call, with {city}.", "", "get_weather is what I would call, with {city}.", []),
    ("xml", "<think>Plan first.</think>\n\nOn it.\n<tool_call>\n<function=plan>\n<parameter=steps>\n"
            + json.dumps(NESTED["steps"]) + "\n</parameter>\n<parameter=urgent>\ntrue\n</parameter>\n</function>\n"
            "</tool_call>\n<tool_call>\n<function=write_file>\n<parameter=path>\nout.txt\n</parameter>\n"
            "<parameter=text>\n\nline one\nline two\n\n</parameter>\n</function>\n</tool_call>",
     "Plan first.", "On it.", [("plan", {"steps": NESTED["steps"], "urgent": True}),
                               ("write_file", {"path": "out.txt", "text": "\nline one\nline two\n"})]),
]


def parse(fmt, pieces, tools=TOOLS, **kw):
    """(parser, events) of an answer fed piece by piece through a Lead, as the server does."""
    lead = Lead(iter(pieces))
    p = FORMATS[fmt].parser(tools, lead=lead, **kw)
    events = []
    for piece in lead:
        events += p.feed(piece)
    return p, events + p.finish()


def split(text, rng, most=40):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, most))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def replay(events):
    """What a client rebuilds from the events: (reasoning, content, [(name, arguments text)])."""
    reasoning = content = ""
    calls = {}
    for ev in events:
        if ev[0] == "reasoning":
            reasoning += ev[1]
        elif ev[0] == "content":
            content += ev[1]
        elif ev[0] == "call":
            assert ev[1] not in calls
            calls[ev[1]] = [ev[3], ""]
        else:
            calls[ev[1]][1] += ev[2]
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_scripted_answers_parse_whole_and_in_random_pieces(case):
    fmt, text, reasoning, content, calls = CASES[case]
    whole, events = parse(fmt, [text])
    assert whole.reasoning_text == reasoning and whole.content == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole.tool_calls]
    assert got == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in whole.tool_calls)
    assert replay(events) == (reasoning, content, [(c["function"]["name"], c["function"]["arguments"])
                                                   for c in whole.tool_calls])
    rng = random.Random(case)
    for _ in range(150):
        p, ev = parse(fmt, split(text, rng, most=rng.choice((3, 40, len(text)))))
        assert replay(ev) == replay(events)
        for e in ev:        # no piece of a tag ever reaches the text (nor is taken back later)
            if e[0] in ("content", "reasoning"):
                tag = "<tool_call>" if e[0] == "content" else "</think>"
                assert not any(e[1].endswith(tag[:k]) for k in range(2, len(tag))), ev


def test_tags_and_trailing_whitespace_are_held_back_until_known():
    p = FORMATS["glm45"].parser(TOOLS)
    assert p.feed("<thi") == []
    assert p.feed("nk>Hmm") == [("reasoning", "Hmm")]
    assert p.feed("\n</th") == []
    assert p.feed("ink>\nSo: ") == [("content", "So:")]
    assert p.feed("<tool") == []
    assert p.feed(" not a call") == [("content", " <tool not a call")]
    assert p.feed("\n<tool_call>get_weat") == []
    ev = p.feed("her\n<arg_key>city</arg_key>\n<arg_value>Li")
    assert [e[0] for e in ev] == ["call", "arguments"] and ev[1][2] == '{"city": "Li'
    assert p.feed("ma</arg_val") == [("arguments", 0, "ma")]
    assert p.feed("ue>\n<arg_key>days</arg_key><arg_value>1") == [("arguments", 0, '", "days": ')]
    assert p.feed("4</arg_value></tool_call>") == [("arguments", 0, "14}")]
    assert p.finish() == []
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"city": "Lima", "days": 14}


def test_values_follow_the_schema_and_fall_back_to_text():
    text = glm45_call("get_weather", {"city": "123", "days": "4"}) + glm45_call("unknown", {"n": "5", "s": "x y"})
    p, _ = parse("glm45", [text])
    args = [json.loads(c["function"]["arguments"]) for c in p.tool_calls]
    assert args == [{"city": "123", "days": 4}, {"n": 5, "s": "x y"}]    # string-typed stays a string
    assert value_kind({"type": ["string", "null"]}) == "string" and value_kind({"enum": ["a"]}) == "string"
    assert value_kind({"type": "object"}) == "json" and value_kind({}) == "any"
    p, _ = parse("glm45", [glm45_call("get_weather", {"city": "x", "days": "soon"})])
    assert json.loads(p.tool_calls[0]["function"]["arguments"])["days"] == "soon"


def test_options_inline_thinking_no_tool_parsing_one_call_and_cut_answers():
    text = CASES[0][1]
    p, _ = parse("glm45", [text], reasoning=False)
    assert p.reasoning_text == "" and p.content.startswith("<think>The user") and len(p.calls) == 1
    p, _ = parse("glm45", [text], parse_tools=False)
    assert "<tool_call>get_weather" in p.content and not p.calls
    p, _ = parse("glm45", [text], tools=[])             # no tools in the request: nothing is parsed
    assert not p.calls
    p, _ = parse("glm45", [CASES[1][1] + "\ntrailing"], parallel=False)
    assert len(p.calls) == 1 and p.content == ""
    p, _ = parse("glm45", ["Deep thought.</think>\nDone."], think_open=True)     # the prompt opened <think>
    assert (p.reasoning_text, p.content) == ("Deep thought.", "Done.")
    p, _ = parse("glm45", [text[:text.rindex("Paris") + 3]])         # max_tokens cut it mid-value
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"city": "Par"}
    p, _ = parse("glm45", ["<think>never ends"])
    assert (p.reasoning_text, p.content) == ("never ends", "")


def test_detect_by_template_then_arch():
    assert detect("glm4moe", None).name == "glm45" and detect("glm4", "").name == "glm4"
    assert detect("chatglm", "x").name == "glm4"
    assert detect("glm4", "...<arg_key>{{ k }}</arg_key>...").name == "glm45"
    assert detect("glm4moe", "<tool_call>\n<function={{ name }}>").name == "xml"


# A template in GLM-4.5's manner (written for this test): tools in the system part, past calls as
# <tool_call> blocks from a mapping of arguments, results in <tool_response>, enable_thinking.
GLM45_LIKE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
Call a function as <tool_call>NAME
<arg_key>KEY</arg_key>
<arg_value>VALUE</arg_value>
</tool_call>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}<|user|>
{{ m.content }}{{ '/nothink' if enable_thinking is defined and not enable_thinking else '' }}
{%- elif m.role == 'assistant' -%}<|assistant|>
<think>{{ m.reasoning_content or '' }}</think>
{{ m.content }}
{%- for tc in m.tool_calls or [] %}
<tool_call>{{ tc.function.name }}
{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key>
<arg_value>{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>
{% endfor %}</tool_call>
{%- endfor %}
{%- elif m.role == 'tool' -%}<|observation|>
<tool_response>
{{ m.content }}
</tool_response>
{%- elif m.role == 'system' -%}<|system|>
{{ m.content }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|assistant|>{{ '\\n<think></think>' if enable_thinking is defined and not enable_thinking else '' }}{%- endif -%}"""

# GLM-4-0414's manner: top-level tools described in Chinese, a past call as an assistant message
# whose metadata is the name, a result as an observation message
GLM4_LIKE = """[gMASK]<sop>{% if tools %}<|system|>
# 可用工具{% for t in tools %}

## {{ t.function.name }}

{{ t.function | tojson(indent=4, ensure_ascii=False) }}{% endfor %}{% endif %}
{%- for m in messages %}{% if m.role == 'assistant' and m.metadata %}<|assistant|>{{ m.metadata }}
{{ m.content }}{% else %}<|{{ m.role }}|>
{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""

# GLM-4-9B-chat's manner: the tools ride on a message
GLM4_9B_LIKE = """[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>
# 可用工具{% for t in item['tools'] %}

## {{ t['function']['name'] }}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}
{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Oslo", "days": 2}}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "Oslo: snow"},
    {"role": "tool", "tool_call_id": "c1", "content": "Paris: sun"},
]


@pytest.fixture(scope="module")
def demo():
    return glmcpu.load(demo_path())


def render(demo, fmt, template, messages=HISTORY, tools=TOOLS[:1], **kw):
    tok = Tokenizer(demo.tokenizer.tok, template)
    msgs, extra = FORMATS[fmt].render_inputs(messages, tools, template)
    return tok.render(msgs, **extra, **kw)


def test_templates_get_tools_calls_and_results_as_they_want_them(demo):
    text = render(demo, "glm45", GLM45_LIKE)
    assert '{"type": "function", "function": {"name": "get_weather"' in text       # tojson(ensure_ascii=False)
    assert ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>") in text
    assert "<think>Two cities.</think>" in text and "<tool_response>\nOslo: snow\n</tool_response>" in text
    assert render(demo, "glm45", GLM45_LIKE, enable_thinking=False).endswith("<|assistant|>\n<think></think>")

    text = render(demo, "glm4", GLM4_LIKE)
    assert "## get_weather" in text and '"name": "get_weather"' in text
    # GLM-4 calls one function a turn: each call is followed by its own result
    assert text.index('<|assistant|>get_weather\n{"city": "Paris"}') < text.index("<|observation|>\nParis: sun") \
        < text.index('<|assistant|>get_weather\n{"city": "Oslo", "days": 2}') < text.index("<|observation|>\nOslo: snow")

    text = render(demo, "glm4", GLM4_9B_LIKE)
    assert text.index("# 可用工具") < text.index("## get_weather") < text.index("<|system|>\nBe brief.")
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\nParis: sun' in text


def test_a_template_without_tools_gets_them_polyfilled(demo):
    """The demo model's template knows system, user and assistant only."""
    template = demo.tokenizer.chat_template
    text = render(demo, "glm4", template)
    assert "# 可用工具\n\n## get_weather" in text and "Be brief." in text
    assert '<|assistant|>\nget_weather\n{"city": "Paris"}' in text        # the call, in GLM-4's words
    assert "<tool_response>\nParis: sun\n</tool_response>" in text          # the result, as the user's
    text = render(demo, "glm45", template)
    assert "<tools>" in text and "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris" in text


def test_grammar_specs_name_every_function_and_their_values():
    g = FORMATS["glm45"].grammar(TOOLS, name="get_weather", parallel=False, special={"<tool_call>", "</tool_call>"})
    assert g.startswith("start: call\n") and '<tool_call> "get_weather" "\\n"' in g and "</tool_call>" in g
    assert '%json {"type": "integer", "x-guidance"' in g and 'suffix="</arg_value>"' in g and "write_file" not in g
    g = FORMATS["glm4"].grammar(TOOLS)
    assert g.count("%json") == 3 and '"plan\\n"' in g
    g = FORMATS["xml"].grammar(TOOLS)
    assert "calls: call (WS call)*" in g and '"<function=" "plan" ">\\n"' in g


def test_grammar_specs_accept_the_calls_they_describe_under_llguidance(demo):
    """The grammars compile with llguidance and take each format's canonical calls token by
    token (the demo vocabulary: every tag in several pieces); a missing required value is refused."""
    llguidance = pytest.importorskip("llguidance")
    tok = demo.tokenizer
    vocab = llguidance.LLTokenizer(tok.tok.to_str(), eos_token=min(tok.stop_ids))

    def accepts(fmt, text, tools=TOOLS, **kw):
        m = llguidance.LLMatcher(vocab, llguidance.LLMatcher.grammar_from_lark(FORMATS[fmt].grammar(tools, **kw)))
        assert not m.is_error(), m.get_error()
        ids = tok.encode(text)
        return m.consume_tokens(ids) and m.validate_tokens([]) == 0 and m.is_accepting()

    call = FORMATS["glm45"].call_text
    assert accepts("glm45", call("get_weather", {"city": "Paris", "days": 3}) + "\n" + call("plan", NESTED))
    assert accepts("glm45", call("write_file", {"path": "a", "text": CODE}), name="write_file", parallel=False)
    assert not accepts("glm45", call("get_weather", {"days": 3}))
    assert not accepts("glm45", call("get_weather", {"city": "x"}), name="plan")
    assert accepts("glm4", 'get_weather\n{"city": "Beijing", "days": 2}')
    assert accepts("xml", FORMATS["xml"].call_text("plan", {"steps": NESTED["steps"], "urgent": True}))
    assert accepts("glm45", call("free", {"a": 1, "b": "x y"}), tools=[{"type": "function", "function": {"name": "free"}}])


# ---- the server --------------------------------------------------------------------------------

openai = pytest.importorskip("openai")


class ScriptedJob:
    """A batching.Job whose tokens are a script's (the scheduler never sees it)."""

    def __init__(self, ids, finish="stop"):
        self.ids, self.finish_reason = ids, None
        self.end = finish
        self.stats = {"prompt_tokens": 5, "cached_tokens": 0, "prompt_seconds": 0.0,
                      "gen_tokens": len(ids), "gen_seconds": 0.0}

    def tokens(self, alive=None):
        yield from self.ids
        self.finish_reason = self.end


@contextmanager
def serving(api):
    from glmcpu.server import Server
    srv = Server(api, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module", params=[1, 2], ids=["parallel-1", "parallel-2"])
def api(request):
    """The demo model behind both of the server's paths: turns (1) and the batching scheduler (2)."""
    from glmcpu.server import API
    a = API(glmcpu.load(demo_path(), ctx=2048), parallel=request.param)     # the tools' text is long
    yield a
    a.stop()


@contextmanager
def scripted(api, text, fmt="glm45", finish="stop"):
    """The model 'writes' `text` (as the demo tokenizer's tokens: tags come in several pieces)."""
    m, saved = api.model, (api.format, api.model.__dict__.get("generate"))
    ids = m.tokenizer.encode(text)
    api.format = FORMATS[fmt]
    if api.scheduler is None:
        def generate(prompt_ids, max_tokens=256, **kw):
            from glmcpu.engine import detokenize
            m.last_stats = {"prompt_tokens": len(prompt_ids), "gen_tokens": 1 if finish == "stop" else max_tokens}
            yield from detokenize(m.tokenizer, (t for t in ids))
        m.generate = generate
    else:
        api.scheduler.submit = lambda prompt_ids, **kw: ScriptedJob(ids, finish)
    try:
        yield
    finally:
        api.format = saved[0]
        if api.scheduler is None:
            del m.generate
        else:
            del api.scheduler.submit


def stream(client, **kw):
    """(reasoning, content, {index: [id, name, arguments]}, finish_reason) rebuilt from a stream."""
    reasoning = content = ""
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        d = c.delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or ():
            if tc.id:
                assert tc.index not in calls and tc.type == "function"
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                calls[tc.index][2] += tc.function.arguments
        finish = c.finish_reason or finish
    return reasoning, content, calls, finish


ASK = dict(model="demo", messages=[{"role": "user", "content": "Plan my day and check Paris."}], tools=TOOLS)


def test_tool_calls_and_reasoning_in_openai_shapes_whole_and_streamed(api):
    text = ("<think>Two things to do.\nFirst the plan.</think>\nSure.\n" + glm45_call("plan", NESTED) + "\n"
            + glm45_call("get_weather", {"city": "Paris, «FR»\nnorth", "days": 1}))
    with serving(api) as client, scripted(api, text):
        r = client.chat.completions.create(**ASK)
        msg, choice = r.choices[0].message, r.choices[0]
        assert choice.finish_reason == "tool_calls" and msg.content == "Sure."
        assert msg.model_extra["reasoning_content"] == "Two things to do.\nFirst the plan."
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
        assert calls == [("plan", NESTED), ("get_weather", {"city": "Paris, «FR»\nnorth", "days": 1})]
        assert len({c.id for c in msg.tool_calls}) == 2 and all(c.type == "function" for c in msg.tool_calls)

        reasoning, content, streamed, finish = stream(client, **ASK)
        assert (reasoning, content, finish) == (msg.model_extra["reasoning_content"], "Sure.", "tool_calls")
        assert [(n, a) for _, n, a in streamed.values()] == [(c.function.name, c.function.arguments)
                                                             for c in msg.tool_calls]

        # only the content: "<think>" inline with reasoning_format none, calls left as text with tool_choice none
        r = client.chat.completions.create(**ASK, tool_choice="none", extra_body={"reasoning_format": "none"})
        assert r.choices[0].message.content.startswith("<think>Two things") and not r.choices[0].message.tool_calls
        assert "<tool_call>plan" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        r = client.chat.completions.create(**ASK, parallel_tool_calls=False)
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["plan"]


def test_a_glm4_call_and_a_plain_answer(api):
    with serving(api) as client:
        with scripted(api, 'get_weather\n{"city": "Beijing", "unit": "C"}', fmt="glm4"):
            r = client.chat.completions.create(**ASK, tool_choice={"type": "function", "function": {"name": "get_weather"}})
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None
            assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "Beijing", "unit": "C"}
            assert stream(client, **ASK)[2][0][1:] == ["get_weather", '{"city": "Beijing", "unit": "C"}']
        with scripted(api, "\nAnd the LORD said.\n", fmt="glm4", finish="length"):
            for reasoning, content, calls, finish in [stream(client, **ASK)]:
                assert (reasoning, content, calls, finish) == ("", "And the LORD said.\n", {}, "length")
            r = client.chat.completions.create(**ASK)
            assert r.choices[0].message.content == "And the LORD said.\n" and r.choices[0].message.tool_calls is None
            assert "reasoning_content" not in r.choices[0].message.model_extra


def test_the_demo_model_with_tools_renders_them_and_answers_in_shape(api):
    """A real generation: the demo model calls nothing, but its prompt holds the tools and a past
    call's round trip, and the answer is a valid chat completion."""
    small = [tool("look", {"q": {"type": "string"}})]      # the demo model was trained on 512 tokens
    history = [{"role": "user", "content": "Who made the light?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q": "Ur"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Ur: hot"}]
    body = dict(ASK, messages=history, tools=small, max_tokens=6, temperature=0)
    turn = api.chat_prompt(body)
    assert "## look" in turn.prompt and '"q": "Ur"' in turn.prompt and "Ur: hot" in turn.prompt
    assert turn.format.name == "glm4" and turn.tool_choice == "auto" and turn.tool_grammar() is None
    assert api.chat_prompt(dict(body, tools=TOOLS, tool_choice="required")).tool_grammar().count("%json") == 3
    with serving(api) as client:
        r = client.chat.completions.create(**body)
        c = r.choices[0]
        assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > len(api.model.tokenizer.encode(turn.prompt)) - 2
        plain = client.chat.completions.create(model="demo", messages=history[:1], max_tokens=6, temperature=0)
        assert plain.usage.prompt_tokens + 50 < r.usage.prompt_tokens < 500
        _, content, calls, finish = stream(client, **body)
        assert content == c.message.content and not calls and finish == c.finish_reason


def test_bad_tool_requests_are_400s(api):
    bad = [dict(tools={"get_weather": {}}), dict(tools=[{"type": "function", "function": {"name": "a b"}}]),
           dict(tool_choice={"type": "function", "function": {"name": "nope"}}), dict(tool_choice="sometimes"),
           dict(tools=None, tool_choice="required"), dict(parallel_tool_calls="yes"),
           dict(chat_template_kwargs={"messages": []}), dict(chat_template_kwargs=[1]),
           dict(reasoning_format="loud"),
           dict(messages=[{"role": "assistant", "content": "", "tool_calls": [
               {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}])]
    with serving(api) as client:
        for extra in bad:
            body = {k: v for k, v in dict(ASK, **extra).items() if v is not None}
            rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="demo", messages=body["messages"], extra_body=rest)
            err = e.value.response.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", extra


def test_chat_template_kwargs_reach_the_template(demo):
    """enable_thinking false per request: a GLM-4.5-style template closes the thinking block."""
    from glmcpu.server import API
    m = glmcpu.load(demo_path(), ctx=2048)
    m.tokenizer = Tokenizer(m.tokenizer.tok, GLM45_LIKE, m.tokenizer.stop_ids)
    a = API(m)
    try:
        assert a.format.name == "glm45"
        body = dict(ASK, messages=HISTORY)
        on, off = a.chat_prompt(body), a.chat_prompt(dict(body, chat_template_kwargs={"enable_thinking": False}))
        assert not on.prompt.endswith("</think>") and off.prompt.endswith("<|assistant|>\n<think></think>")
        assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris" in on.prompt
        with serving(a) as client, scripted(a, "<think>So.</think>\nYes."):
            r = client.chat.completions.create(**ASK, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            assert r.choices[0].message.content == "Yes." and r.choices[0].message.model_extra["reasoning_content"] == "So."
    finally:
        a.stop()
