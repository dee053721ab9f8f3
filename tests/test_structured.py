"""Structured outputs, the must-show evidence of issue 28, with the official openai client against an
in-process server:

1. tool_choice a named function, and "required", on the demo model (GLM-4's call format: the name,
   a newline, the arguments as JSON; its template knows no tools, so they are described in the
   prompt): a call to that function whose arguments validate against each of the 10 function
   schemas of tests/schemas.py, sampled and greedy, and streamed (the deltas add up to the call);
2. the same on a random GLM-4.5 file (its template GLM-4.5-style: <tool_call>NAME, <arg_key> and
   <arg_value> pairs, strings raw), thinking turned off per request;
3. response_format json_schema valid under each of the 20 schemas, in turns and batched; json_object;
   llama.cpp's GBNF `grammar`; 400s in OpenAI's shape for what cannot be enforced;
4. reasoning_content apart from the content on the GLM-4.5 file, whole and streamed;
5. Model.chat(response_format=), the Python API.
Random models write whatever the grammar lets them, so these also show that every answer ends:
bounded strings, numbers and whitespace, not just an answer cut at max_tokens."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

import glmcpu
from conftest import rewrite
from glmcpu.hub import demo_path
from schemas import SCHEMAS, TOOLS
from test_chat_format import GLM45_LIKE, serving, stream

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SEED = 1234
ASK = [{"role": "user", "content": "Use one of the tools."}]
JSON_ASK = [{"role": "user", "content": "Answer in JSON."}]
NAMES = [t["function"]["name"] for t in TOOLS]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def named(name):
    return {"type": "function", "function": {"name": name}}


def params(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def valid_calls(r, names, n=1):
    """The tool calls of an answer, checked: finish_reason "tool_calls", no content, `n` calls (None:
    any number), each to a function among `names` with arguments that validate against its
    parameters. Returns [(name, arguments text)]."""
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", (c.finish_reason, c.message)
    calls = c.message.tool_calls
    assert c.message.content is None and calls and (n is None or len(calls) == n), c.message
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names, call
        jsonschema.validate(json.loads(call.function.arguments), params(call.function.name))
    return [(call.function.name, call.function.arguments) for call in calls]


def api_for(path, parallel=1):
    from glmcpu.server import API
    # the ten tools described in the prompt take thousands of tokens: more than the demo's context
    return API(glmcpu.load(path, draft="none", ctx=16384), parallel=parallel)


@pytest.fixture(scope="module")
def demo_api():
    a = api_for(demo_path())
    yield a
    a.stop()


@pytest.fixture(scope="module")
def glm45_api(tiny, tmp_path_factory):
    """A random glm4moe file whose template is GLM-4.5-style (tests/test_chat_format.py's)."""
    _, src, _ = tiny("glm4_moe", "q8_0")
    path = str(tmp_path_factory.mktemp("glm45") / "glm45.gguf")
    rewrite(src, path, meta={"tokenizer.chat_template": GLM45_LIKE})
    a = api_for(path)
    yield a
    a.stop()


def check_tool_choices(a, extra):
    """Each function named, sampled and greedy, then streamed with the sampled one's seed; then
    "required" over all ten."""
    body = dict(model=a.name, messages=ASK, tools=TOOLS, seed=SEED, max_tokens=400, **extra)
    with serving(a) as client:
        for name in NAMES:
            choice = named(name)
            sampled = valid_calls(client.chat.completions.create(tool_choice=choice, temperature=0.8, **body), {name})
            valid_calls(client.chat.completions.create(tool_choice=choice, temperature=0, **body), {name})
            reasoning, content, calls, finish = stream(client, tool_choice=choice, temperature=0.8, **body)
            assert (reasoning, content, finish) == ("", "", "tool_calls") and list(calls) == [0], (content, calls)
            assert calls[0][0].startswith("call_") and [tuple(calls[0][1:])] == sampled
        for temperature in (0.8, 0):
            r = client.chat.completions.create(tool_choice="required", temperature=temperature, **body)
            valid_calls(r, set(NAMES))


# ---- 1. tool_choice on the demo model ---------------------------------------------------------------

def test_demo_named_and_required_tool_calls_validate(demo_api):
    a = demo_api
    assert a.format.name == "glm4" and "tools" not in a.model.tokenizer.chat_template
    turn = a.chat_prompt({"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    assert all(f"## {name}\n" in turn.prompt for name in NAMES)      # described in the system message
    assert turn.tool_grammar().count("%json") == len(TOOLS)
    check_tool_choices(a, {})


# ---- 2. the same on a random GLM-4.5 file ---------------------------------------------------------

def test_glm45_named_and_required_tool_calls_validate(glm45_api):
    a = glm45_api
    assert a.format.name == "glm45" and a.model.tokenizer.chat_template == GLM45_LIKE
    turn = a.chat_prompt({"messages": ASK, "tools": TOOLS, "tool_choice": "required", **NO_THINKING})
    assert turn.prompt.endswith("<|assistant|>\n<think></think>") and '"name": "book_table"' in turn.prompt
    check_tool_choices(a, dict(parallel_tool_calls=False, extra_body=NO_THINKING))
    # string arguments are written raw, yet held to their schema: pattern, lengths, const
    code = {"type": "function", "function": {"name": "ship", "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                         "note": {"type": "string", "minLength": 2, "maxLength": 5},
                                         "via": {"const": "air"}}, "required": ["code", "note", "via"]}}}
    with serving(a) as client:
        for temperature in (0.8, 0):
            r = client.chat.completions.create(model=a.name, messages=ASK, tools=[code], tool_choice="required",
                                               temperature=temperature, seed=SEED, max_tokens=400,
                                               parallel_tool_calls=False, extra_body=NO_THINKING)
            assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
            jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments),
                                code["function"]["parameters"])
    # parallel calls allowed: one or more, each valid
    with serving(a) as client:
        counts = [len(valid_calls(client.chat.completions.create(
            model=a.name, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed, max_tokens=800,
            extra_body=NO_THINKING), set(NAMES), n=None)) for seed in range(3)]
    assert min(counts) >= 1


# ---- 3. response_format, grammar, and what cannot be enforced -------------------------------------------

def ask_schema(client, model, i, temperature):
    schema = SCHEMAS[i][0]
    r = client.chat.completions.create(
        model=model, messages=JSON_ASK, temperature=temperature, seed=SEED + i, max_tokens=400,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
    c = r.choices[0]
    assert c.finish_reason == "stop", (i, c)
    jsonschema.validate(json.loads(c.message.content), schema)


def test_json_schema_answers_validate_in_turns(demo_api):
    with serving(demo_api) as client:
        for i in range(len(SCHEMAS)):
            for temperature in (0.8, 0):
                ask_schema(client, demo_api.name, i, temperature)


def test_json_schema_answers_validate_batched():
    """--parallel 4, four clients at once: their answers decode together in one forward pass."""
    a = api_for(demo_path(), parallel=4)
    jobs = [(i, t) for i in range(len(SCHEMAS)) for t in (0.8, 0)]
    try:
        with serving(a) as client, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda job: ask_schema(client, a.name, *job), jobs))
    finally:
        a.stop()
    counts = a.scheduler.counts
    assert counts["requests_stop"] == len(jobs)
    # one at a time, every token would take a forward pass of its own
    assert counts["steps"] < 0.6 * counts["tokens_predicted"], dict(counts)


def test_json_object_and_gbnf_grammar(demo_api):
    a = demo_api
    with serving(a) as client:
        r = client.chat.completions.create(model=a.name, messages=JSON_ASK, temperature=0, max_tokens=400,
                                           response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
        for seed in range(6):
            r = client.chat.completions.create(model=a.name, messages=ASK, temperature=1.0, seed=seed, max_tokens=50,
                                               extra_body={"grammar": 'root ::= "yes" | "no"'})
            assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content in ("yes", "no")
        r = client.chat.completions.create(model=a.name, messages=ASK, temperature=0.8, seed=SEED, max_tokens=50,
                                           extra_body={"grammar": 'root ::= "<" [0-9]{3} ">" [a-z]{2,4}'})
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and re.fullmatch("<[0-9]{3}>[a-z]{2,4}", text), text


def test_what_cannot_be_enforced_is_a_400(demo_api):
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}      # llguidance: unimplemented
    bad = [({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": unique}}},
            "response_format", "uniqueItems"),
           ({"grammar": 'root ::= "yes'}, "grammar", "GBNF"),
           ({"grammar": "root ::= missing"}, "grammar", "missing"),
           ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
            "tool_choice", "required"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0][0]}},
             "tools": TOOLS, "tool_choice": named("add")}, "tool_choice", "add")]
    with serving(demo_api) as client:
        for extra, param, words in bad:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=demo_api.name, messages=ASK, extra_body=extra)
            err = e.value.response.json()["error"]
            assert e.value.status_code == 400 and set(err) == {"message", "type", "param", "code"}, err
            assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
        # and the server goes on answering
        r = client.chat.completions.create(model=demo_api.name, messages=ASK, max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")


# ---- 4. reasoning_content apart from the content, on the GLM-4.5 file -------------------------------

def test_reasoning_content_apart_whole_and_streamed(glm45_api):
    """How the server composes a grammar with GLM-4.5's thinking (constrain.with_thinking): with
    thinking on (the prompt ends at <|assistant|>) the grammar's text comes after an optional
    thinking block whose text is free, so a random model that starts thinking never stops; with
    enable_thinking false (the prompt closes the block: <think></think>) the grammar is the whole
    answer. So the grammar here, with thinking off, makes the model write a <think> block of a few
    words and then a word: its text comes back as reasoning_content, the word as content, and
    with reasoning_format none both inline."""
    a = glm45_api
    yes_no = 'root ::= "yes" | "no"'
    on = a.grammar({"grammar": yes_no}, a.chat_prompt({"messages": ASK}))
    off = a.grammar({"grammar": yes_no}, a.chat_prompt({"messages": ASK, **NO_THINKING}))
    assert on.startswith("start: thinking? answer\n") and '[suffix="</think>"]' in on and "think" not in off

    grammar = 'root ::= "<think>" [a-z ]{3,20} "</think>" [a-z]{1,20}'
    body = dict(model=a.name, messages=ASK, temperature=0.8, max_tokens=200,
                extra_body=dict(NO_THINKING, grammar=grammar))
    with serving(a) as client:
        for seed in range(3):
            c = client.chat.completions.create(seed=seed, **body).choices[0]
            reasoning, content = c.message.model_extra.get("reasoning_content"), c.message.content
            assert c.finish_reason == "stop" and reasoning and content, c
            assert stream(client, seed=seed, **body) == (reasoning, content, {}, "stop")
            inline = client.chat.completions.create(
                seed=seed, **dict(body, extra_body=dict(body["extra_body"], reasoning_format="none"))).choices[0].message
            whole = re.fullmatch("<think>([a-z ]{3,20})</think>([a-z]{1,20})", inline.content)
            assert whole and "reasoning_content" not in inline.model_extra, inline
            assert (whole[1].strip(), whole[2]) == (reasoning, content)    # the reasoning's ends are stripped

        # thinking on: the model may answer at once, or think (here for ever: cut at max_tokens)
        seen = set()
        for seed in range(16):
            b = dict(model=a.name, messages=ASK, temperature=0.8, seed=seed, max_tokens=30,
                     extra_body={"grammar": yes_no})
            c = client.chat.completions.create(**b).choices[0]
            reasoning = c.message.model_extra.get("reasoning_content")
            if reasoning:
                assert (c.message.content, c.finish_reason) == ("", "length")
            else:
                assert c.message.content in ("yes", "no") and c.finish_reason == "stop"
            assert stream(client, **b) == (reasoning or "", c.message.content, {}, c.finish_reason)
            seen.add(bool(reasoning))
            if len(seen) == 2:
                break
        assert seen == {True, False}


# ---- 5. the Python API takes the same options ------------------------------------------------------------

def test_model_chat_takes_response_format():
    m = glmcpu.load(demo_path(), draft="none")
    for schema, _ in SCHEMAS:
        rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        text = "".join(m.chat(JSON_ASK, response_format=rf, temperature=0, max_tokens=400))
        jsonschema.validate(json.loads(text), schema)
    text = "".join(m.chat(JSON_ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=400))
    assert isinstance(json.loads(text), dict)
    m.close()
