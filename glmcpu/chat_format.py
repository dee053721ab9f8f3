"""What a GLM chat template expects for tools, tool calls and tool results, and a streaming parser
that splits what the model writes into reasoning, content and OpenAI tool calls.

Three formats (`detect` picks one from the template's text, else from the file's arch):

- "glm45": GLM-4.5, GLM-4.5-Air, GLM-4.6 (GGUF arch glm4moe). The answer may open with
  `<think>...</think>` (its reasoning); a call is
  `<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...</tool_call>`, several
  may follow each other; VALUE is raw text for a string parameter and JSON for any other. The
  template takes `tools`, assistant messages with `tool_calls` (their arguments as a mapping) and
  `tool` messages (each wrapped in `<tool_response>`), and `enable_thinking` (false: an empty
  `<think></think>` after `<|assistant|>`).
- "glm4": GLM-4-9B-chat (arch chatglm), GLM-4-0414 and GLM-Z1 (arch glm4). A call is the whole
  answer: the function's name right after `<|assistant|>` (where a plain answer writes a
  newline), a newline, then the arguments as one JSON object; the model then writes
  `<|observation|>` (a stop token). One call per turn. GLM-4-9B-chat's template takes the tools
  from a message's `tools` key, GLM-4-0414's from `tools`; both render a past call as an assistant
  message whose `metadata` is the name and whose content is the JSON, and a result as an
  `observation` message. GLM-Z1's prompt ends in `<think>`: it reasons first.
- "xml": INTELLECT-3 (a GLM-4.5-Air fine-tune, arch glm4moe) is served with vLLM's qwen3_coder
  tool parser: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n
  </tool_call>`; found by `<function=` / `<parameter=` in its template.

A template that knows nothing of tools (the demo model's) gets them "polyfilled": the tools are
described in the system message, past calls written into the assistant's text in the format's
own syntax, and results sent as observation (or user) messages.
"""
import json
import re
import uuid
from dataclasses import dataclass, field

from .constrain import json_expr, with_thinking

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ChatFormatError(ValueError):
    """A request's messages or tools that cannot be put into the template (HTTP 400)."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Syntax:
    """The tag syntax of an XML-like tool call."""
    call_open: str          # starts a call
    name_open: str          # before the name, after call_open and any whitespace ("" for GLM-4.5)
    name_ends: tuple        # what ends the name; those that are tags are left for the next state
    key_open: str
    key_close: str
    value_open: str         # "" : the value follows key_close at once
    value_close: str
    call_close: str
    skip: tuple = ()        # tags between the arguments and call_close that mean nothing more
    trim_newline: bool = False      # one newline after the value's opening and before its end is syntax


GLM45_SYNTAX = Syntax("<tool_call>", "", ("\n", "<arg_key>", "</tool_call>"), "<arg_key>", "</arg_key>",
                      "<arg_value>", "</arg_value>", "</tool_call>")
XML_SYNTAX = Syntax("<tool_call>", "<function=", (">",), "<parameter=", ">", "", "</parameter>",
                    "</tool_call>", skip=("</function>",), trim_newline=True)


@dataclass(frozen=True)
class ChatFormat:
    name: str               # "glm45", "glm4" or "xml"
    syntax: Syntax = None   # XML-like calls; None: GLM-4's name line and JSON

    # ---- the prompt side -------------------------------------------------------------------------

    def render_inputs(self, messages, tools, template: str):
        """(messages, template keywords) for the file's template from OpenAI messages (checked, with
        each tool call's arguments as an object: check_tool_calls) and tools (check_tools): what
        this format's templates want, polyfilled where the template does not know tools, tool
        calls or tool results."""
        template = template or ""
        knows_tools = "tools" in template
        knows_calls = ("tool_calls" in template) if self.syntax else ("metadata" in template)
        # a result's role: GLM-4.5's templates take "tool"; GLM-4's "observation" (GLM-4-9B-chat's
        # writes any role as <|role|>, and like GLM-4-0414's knows a call by its metadata)
        result_role = "tool" if self.syntax else "observation"
        if result_role not in template and not (result_role == "observation" and knows_calls):
            result_role = "observation" if "observation" in template else "user"
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
        out = []
        i = 0
        while i < len(messages):
            m = messages[i]
            i += 1
            if m["role"] == "assistant" and m.get("tool_calls"):
                results = []
                while i < len(messages) and messages[i]["role"] in ("tool", "observation"):
                    results.append(messages[i])
                    i += 1
                out += self._calls(m, results, knows_calls, result_role, names)
            elif m["role"] in ("tool", "observation"):
                out.append(self._result(m, result_role, names))
            else:
                out.append(dict(m))
        kwargs = {}
        if tools:
            kwargs["tools"] = tools
            if not knows_tools:
                out = with_system(out, self.describe_tools(tools))
            elif not self.syntax and "['tools']" in template:       # GLM-4-9B-chat: a message's tools key
                out = with_system(out, "")
                out[0]["tools"] = tools
        return out, kwargs

    def _calls(self, m, results, knows_calls, result_role, names):
        """An assistant message with tool_calls, and the results that follow it."""
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                 for c in m["tool_calls"]]
        if self.syntax:
            msg = {k: v for k, v in m.items() if k != "tool_calls"}
            msg["content"] = msg.get("content") or ""
            if knows_calls:
                msg["tool_calls"] = calls
            else:
                text = "\n".join(self.call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls)
                msg["content"] = (msg["content"] + "\n" if msg["content"] else "") + text
            return [msg] + [self._result(r, result_role, names) for r in results]
        # GLM-4: one call per assistant turn, each followed by its own result
        out = []
        if m.get("content"):
            out.append({"role": "assistant", "content": m["content"]})
        by_id = {r.get("tool_call_id"): r for r in results}
        used = set()
        for c in calls:
            name, args = c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False)
            out.append({"role": "assistant", "metadata": name, "content": args} if knows_calls else
                       {"role": "assistant", "content": f"{name}\n{args}"})
            r = by_id.get(c["id"])
            if r is not None and id(r) not in used:
                used.add(id(r))
                out.append(self._result(r, result_role, names))
        out += [self._result(r, result_role, names) for r in results if id(r) not in used]
        return out

    def _result(self, m, role, names):
        content = m.get("content") or ""
        if role == "user":
            content = f"<tool_response>\n{content}\n</tool_response>"
        r = {"role": role, "content": content}
        if m.get("tool_call_id"):
            r["tool_call_id"] = m["tool_call_id"]
            if m["tool_call_id"] in names:
                r["name"] = names[m["tool_call_id"]]
        return r

    def describe_tools(self, tools) -> str:
        """The tools in a system message, for a template that has no place for them."""
        if not self.syntax:         # GLM-4's own wording
            return "# 可用工具" + "".join(
                f"\n\n## {t['function']['name']}\n\n{json.dumps(t['function'], ensure_ascii=False, indent=4)}"
                "\n在调用上述函数时，请使用 Json 格式表示调用的参数。" for t in tools)
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        example = self.call_text("FUNCTION_NAME", {"ARGUMENT_NAME": "ARGUMENT_VALUE"})
        return ("# Tools\n\nYou may call functions to answer the user. Their signatures, one per line:\n"
                f"<tools>\n{lines}\n</tools>\n\nTo call one, write:\n{example}")

    def call_text(self, name, arguments: dict) -> str:
        """A call as the model writes it (string values raw, others as JSON)."""
        val = lambda v: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)  # noqa: E731
        if not self.syntax:
            return f"{name}\n{json.dumps(arguments, ensure_ascii=False)}"
        if self.syntax is XML_SYNTAX:
            args = "".join(f"<parameter={k}>\n{val(v)}\n</parameter>\n" for k, v in arguments.items())
            return f"<tool_call>\n<function={name}>\n{args}</function>\n</tool_call>"
        args = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{val(v)}</arg_value>\n" for k, v in arguments.items())
        return f"<tool_call>{name}\n{args}</tool_call>"

    # ---- the output side ---------------------------------------------------------------------

    def parser(self, tools=(), parse_tools=True, reasoning=True, think_open=False, parallel=True, lead=None):
        """A StreamParser for one answer. tools: the request's (their schemas say which values are
        strings); parse_tools False leaves any call syntax in the content; reasoning False keeps
        the thinking inline; think_open: the prompt ends inside `<think>`; parallel False keeps
        only the first call; lead: the Lead the text comes through (GLM-4 needs it)."""
        return StreamParser(self, list(tools or ()), parse_tools and bool(tools), reasoning, think_open,
                            parallel, lead)

    def grammar(self, tools, name=None, parallel=True, special=frozenset()) -> str:
        """The tool-call part of an answer as an llguidance Lark grammar: one call (several if
        parallel) to any of `tools`, or to the function `name`, each function's arguments held
        to its schema: for tool_choice "required" or a named function. Start it where the
        answer's text starts (after any thinking). special: the tags that are single special
        tokens of the model's vocabulary, written `<tag>` (llguidance's token syntax) rather than
        as strings. Not yet compiled against llguidance here: check it where it is used."""
        fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if not fns:
            raise ChatFormatError(f"no function named {name!r} among the tools", "tool_choice")
        def lit(tag):
            return f"<{tag[1:-1]}>" if tag in special else json.dumps(tag)
        rules, alts = [], []
        for k, fn in enumerate(fns):
            schema = fn.get("parameters") or {"type": "object"}
            if not self.syntax:
                rules.append(f"call{k}: {json.dumps(fn['name'] + chr(10))} {json_expr(schema)}")
            else:
                rules += self._xml_rules(k, fn["name"], schema, lit, special)
            alts.append(f"call{k}")
        many = parallel and self.syntax is not None
        ws = 'WS: /[ \\t\\n]{0,4}/'        # bounded: no wandering off into blank space
        head = "start: calls\ncalls: call (WS call)*\n" if many else "start: call\n"
        return head + f"call: {' | '.join(alts)}\n" + "\n".join(rules) + f"\n{ws}\n"

    def _xml_rules(self, k, name, schema, lit, special):
        s = self.syntax
        nl = "\n" if s.trim_newline else ""
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        key_lead = f"{lit(s.key_open)} "
        key_tail = f" {lit(s.key_close)} " + (json.dumps(nl) if nl else f"WS {lit(s.value_open)}")
        rules, parts = [], []

        def value(tag, sub):
            kind = value_kind(sub)
            if kind == "json":
                return json_expr(sub) + (f" {json.dumps(nl)}" if nl else "") + f" {lit(s.value_close)}"
            if kind == "string" and text_choices(sub) is not None:     # enum, const: one of these texts
                rules.append(f"{tag}: " + " | ".join(json.dumps(v) for v in text_choices(sub)))
                return tag + (f" {json.dumps(nl)}" if nl else "") + f" {lit(s.value_close)}"
            text = text_lexeme(sub if kind == "string" else None)      # a string's pattern and lengths
            if s.value_close in special:        # a special token ends the text by itself
                rules.append(f"{tag}: {text}")
                return f"{tag} {lit(s.value_close)}"
            rules.append(f"{tag}[suffix={json.dumps(nl + s.value_close)}]: {text}")  # the rule eats its end
            return tag

        for j, (key, sub) in enumerate(props.items()):
            rules.append(f"arg{k}_{j}: {key_lead}{json.dumps(key)}{key_tail} {value(f'val{k}_{j}', sub)} WS")
            parts.append(f"arg{k}_{j}" + ("" if key in required else "?"))
        if not props:                           # any keys
            rules.append(f"arg{k}_any: {key_lead}/[A-Za-z0-9_.-]+/{key_tail} {value(f'val{k}_any', None)} WS")
            parts.append(f"arg{k}_any*")
        opener = lit(s.call_open) + (f' WS {json.dumps(s.name_open)}' if s.name_open else "")
        name_end = '">\\n"' if s.name_open else '"\\n"'
        closer = "".join(f"{lit(t)} WS " for t in s.skip) + lit(s.call_close)
        rules.append(f"call{k}: {opener} {json.dumps(name)} {name_end} {' '.join(parts)} {closer}")
        return rules


FORMATS = {n: ChatFormat(n, syn) for n, syn in (("glm45", GLM45_SYNTAX), ("glm4", None), ("xml", XML_SYNTAX))}


def detect(arch, template) -> ChatFormat:
    """The format a model speaks: its template's call syntax when the template shows one, else
    GLM-4.5's for arch glm4moe and GLM-4's for the others."""
    t = template or ""
    if "<arg_key>" in t:
        return FORMATS["glm45"]
    if "<function=" in t or "<parameter=" in t:
        return FORMATS["xml"]
    return FORMATS["glm45"] if arch == "glm4moe" else FORMATS["glm4"]


def answer_grammar(fmt: ChatFormat, prompt: str, grammar: str, special=frozenset()) -> str:
    """`grammar` (Lark) for the answer a chat prompt gets, after the thinking the model may do first."""
    return with_thinking(grammar, thinking_mode(fmt, prompt), special)


def thinking_mode(fmt: ChatFormat, prompt: str):
    """What may come before a constrained answer (constrain.with_thinking): the reasoning a GLM-4.5
    (or INTELLECT-3) model writes first unless the prompt closed it (enable_thinking false writes
    <think></think>): "optional"; the rest of a thinking the prompt opened: "open"; GLM-4: None."""
    p = prompt.rstrip()
    if p.endswith(THINK_OPEN):
        return "open"
    if fmt.name == "glm4" or p.endswith(THINK_CLOSE):
        return None
    return "optional"


def with_system(messages, text):
    """messages with `text` added to the first system message (one made first if none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        if text:
            out[0]["content"] = text + ("\n\n" + out[0]["content"] if out[0]["content"] else "")
        return out
    return [{"role": "system", "content": text}] + out


def value_kind(schema) -> str:
    """"string" for a parameter whose values are strings (written raw), "json" for one of another
    type, "any" where the schema does not say (JSON if it parses, else the text)."""
    if not isinstance(schema, dict):
        return "any"
    t = schema.get("type")
    if isinstance(t, list):
        t = [x for x in t if x != "null"]
        t = t[0] if len(t) == 1 else None
    if t == "string":
        return "string"
    if t is not None:
        return "json"
    if "enum" in schema and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
        return "string"
    if "const" in schema and isinstance(schema["const"], str):
        return "string"
    return "any"


def text_choices(schema):
    """The texts a string parameter may be (its enum or const), or None."""
    if isinstance(schema.get("const"), str):
        return [schema["const"]]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return enum
    return None


def text_lexeme(schema) -> str:
    """The Lark lexeme of a string parameter's raw text (written without JSON's quotes): any text,
    held to the schema's pattern (searched for, as JSON Schema does, unless anchored), minLength
    and maxLength, so that a bounded string ends."""
    schema = schema if isinstance(schema, dict) else {}
    parts = []
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        head = pattern.startswith("^")
        tail = pattern.endswith("$") and not pattern.endswith("\\$")
        body = re.sub(r"(?<!\\)/", r"\/", pattern[int(head):len(pattern) - int(tail)])   # Lark's /.../
        parts.append(("" if head else "(?s:.*)") + f"(?:{body})" + ("" if tail else "(?s:.*)"))
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if isinstance(lo, int) and lo > 0 or isinstance(hi, int):
        lo = lo if isinstance(lo, int) and lo > 0 else 0
        parts.append(f"(?s:.{{{lo},{hi if isinstance(hi, int) else ''}}})")
    return " & ".join(f"/{p}/" for p in parts) or "/(?s:.*)/"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ChatTurn:
    """A checked chat request, rendered: what generating and reading its answer need. The hook for
    constraints: `tool_grammar()` is the grammar its tool_choice asks for (None: unconstrained)."""
    prompt: str
    format: ChatFormat
    tools: list                 # the request's tools, checked
    tool_choice: str            # "auto", "none", "required" or the name of the function to call
    parallel: bool = True       # parallel_tool_calls
    reasoning: bool = True      # reasoning_content apart (False: --reasoning-format none, inline)
    think_open: bool = False    # the prompt ends inside <think>: the answer starts with its reasoning

    def parser(self, lead=None) -> "StreamParser":
        return self.format.parser(self.tools, self.tool_choice != "none", self.reasoning, self.think_open,
                                  self.parallel, lead)

    def tool_grammar(self, special=frozenset()):
        """For tool_choice "required" or a named function: the llguidance Lark grammar of the calls
        the answer must be (ChatFormat.grammar), else None."""
        if self.tool_choice in ("auto", "none"):
            return None
        return self.format.grammar(self.tools, None if self.tool_choice == "required" else self.tool_choice,
                                   self.parallel, special)


# ---- checking a request's tools and messages ---------------------------------------------------

def check_tools(tools):
    """A request's `tools`, checked: a list of {"type": "function", "function": {"name", ...}}."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatFormatError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    seen = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", fn["name"])):
            raise ChatFormatError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                                  "NAME, \"parameters\": SCHEMA}}} with a name of letters, digits, _ . : -",
                                  f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ChatFormatError(f"tools[{i}].function.parameters must be a JSON schema object",
                                  f"tools[{i}].function.parameters")
        if fn["name"] in seen:
            raise ChatFormatError(f"two tools are named {fn['name']!r}", f"tools[{i}]")
        seen.add(fn["name"])
    return [{"type": "function", "function": t["function"]} for t in tools]


def check_tool_choice(choice, tools):
    """"auto", "none", "required", or a function's name (from {"type": "function", "function":
    {"name"}}); "auto" when absent (and "none" without tools, as OpenAI's default)."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise ChatFormatError("tool_choice 'required' needs 'tools'", "tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str) and choice.get("type", "function") == "function":
        if fn["name"] not in {t["function"]["name"] for t in tools}:
            raise ChatFormatError(f"tool_choice names {fn['name']!r}, which is not among the tools", "tool_choice")
        return fn["name"]
    raise ChatFormatError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                          "\"function\": {\"name\": NAME}}", "tool_choice")


def check_tool_calls(calls, param):
    """An assistant message's tool_calls with their arguments parsed into objects."""
    if not isinstance(calls, list):
        raise ChatFormatError("tool_calls must be a list", param)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise ChatFormatError("each tool call needs {\"function\": {\"name\", \"arguments\"}}", f"{param}[{j}]")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                raise ChatFormatError("a tool call's arguments must be a JSON object", f"{param}[{j}]") from None
        if not isinstance(args, dict):
            raise ChatFormatError("a tool call's arguments must be a JSON object", f"{param}[{j}]")
        cid = c.get("id") if isinstance(c.get("id"), str) else f"call_{j}"
        out.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# ---- the output side -------------------------------------------------------------------------

class Lead:
    """Text pieces of a chat answer without the newline(s) GLM models write after <|assistant|>;
    `stripped` says whether there were any (GLM-4 writes a call's name there instead)."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.started = False
        self.stripped = False

    def __iter__(self):
        for piece in self.pieces:
            if not self.started:
                rest = piece.lstrip("\n")
                self.stripped |= len(rest) < len(piece)
                if not rest:
                    continue
                self.started, piece = True, rest
            yield piece

    def close(self):
        close = getattr(self.pieces, "close", None)
        if close:
            close()


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class StreamParser:
    """Feed it the answer's text as it comes (`feed`), then `finish()`; each returns events:
    ("reasoning", text), ("content", text), ("call", index, id, name), ("arguments", index, text).
    A call's argument deltas add up to its final `arguments` (a JSON object's text). Text that
    could be the start of a tag is held back until it is known not to be, and so is trailing
    whitespace (the ends of the answer and of the reasoning are stripped, and so is the
    whitespace around calls)."""
    fmt: ChatFormat
    tools: list = ()
    parse_tools: bool = True
    reasoning: bool = True
    think_open: bool = False
    parallel: bool = True
    lead: Lead = None               # GLM-4: whether the answer began with a newline (a call does not)
    calls: list = field(default_factory=list)
    content: str = ""
    reasoning_text: str = ""

    def __post_init__(self):
        self.buf = ""
        self.state = "think" if self.think_open and self.reasoning else "start"
        self.events = []
        self.pending_ws = ""            # trailing whitespace of the content or reasoning, held back
        self.seg_text = False           # the current stretch of content or reasoning has text
        self.done = False               # the rest of the text is dropped (parallel=False, one call made)
        self.schemas = {t["function"]["name"]: (t["function"].get("parameters") or {}) for t in self.tools}
        self.kind = None                # the value being read: "string", "json" or "any"
        self.lead_checked = False       # XML: the newline after a value's opening is dropped
        self.n_args = 0

    # ---- the public side -------------------------------------------------------------------------

    def feed(self, text: str) -> list:
        if not self.done:
            self.buf += text
            self._run(final=False)
        return self._take()

    def finish(self) -> list:
        if not self.done:
            self._run(final=True)
            self._close_call()
            if self.pending_ws and self.seg_text and self.state == "content":
                self._emit_text("content", self.pending_ws)
        self.pending_ws, self.done = "", True
        return self._take()

    @property
    def tool_calls(self) -> list:
        """OpenAI's message.tool_calls."""
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]

    # ---- events ------------------------------------------------------------------------------

    def _take(self):
        ev, self.events = self.events, []
        return ev

    def _emit_text(self, kind, text):
        if kind == "content":
            self.content += text
        else:
            self.reasoning_text += text
        if self.events and self.events[-1][0] == kind:
            self.events[-1] = (kind, self.events[-1][1] + text)
        else:
            self.events.append((kind, text))

    def _text(self, kind, text):
        """Text of the current stretch: its leading whitespace dropped (newlines only, for the
        content), its trailing whitespace held back."""
        if not self.seg_text:
            text = text.lstrip("\n" if kind == "content" else None)
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        if body:
            self.seg_text = True
            self._emit_text(kind, body)

    def _new_stretch(self):
        self.pending_ws, self.seg_text = "", False

    def _arg_text(self, text):
        if not text:
            return
        i = len(self.calls) - 1
        self.calls[i].arguments += text
        if self.events and self.events[-1][0] == "arguments" and self.events[-1][1] == i:
            self.events[-1] = ("arguments", i, self.events[-1][2] + text)
        else:
            self.events.append(("arguments", i, text))

    def _start_call(self, name):
        self._new_stretch()
        self.calls.append(Call(new_call_id(), name))
        self.events.append(("call", len(self.calls) - 1, self.calls[-1].id, name))
        self.n_args = 0

    def _end_call(self):
        self._arg_text("}" if self.n_args else "{}")
        self._new_stretch()
        self.state = "content"
        if not self.parallel:
            self.done, self.buf = True, ""

    def _close_call(self):
        """At the end of the text: a call cut short is closed as far as it got."""
        if self.state == "value":
            self._end_value(self.buf)
        if self.state in ("params", "key", "value_open", "value"):
            self._end_call()
        self.buf = ""

    # ---- the machine: one method per state, each consuming what it can ---------------------------

    def _run(self, final):
        while not self.done:
            before = (self.state, self.buf)
            getattr(self, "_" + self.state)(final)
            if (self.state, self.buf) == before:
                return

    def _start(self, final):
        """The answer's opening: a <think> block? (GLM-4: a call's name line?)"""
        head = self.buf.lstrip()
        if self.reasoning:
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN):], "think"
                return
            if THINK_OPEN.startswith(head) and not final:
                return                          # wait: "<thi" may become "<think>"
        if self.parse_tools and self.fmt.syntax is None and not (self.lead and self.lead.stripped):
            self.state = "glm4_name"
        else:
            self.state = "content"

    def _think(self, final):
        i = self.buf.find(THINK_CLOSE)
        if i >= 0:
            self._text("reasoning", self.buf[:i])
            self.buf = self.buf[i + len(THINK_CLOSE):].lstrip("\n")
            self._new_stretch()
            self.state = "glm4_name" if self.parse_tools and self.fmt.syntax is None else "content"
            return
        keep = 0 if final else held(self.buf, (THINK_CLOSE,))
        self._text("reasoning", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    def _content(self, final):
        s = self.fmt.syntax
        i = self.buf.find(s.call_open) if self.parse_tools and s else -1
        if i >= 0:
            self._text("content", self.buf[:i])
            self.buf, self.state = self.buf[i + len(s.call_open):], "name"
            return
        keep = 0 if final or not (self.parse_tools and s) else held(self.buf, (s.call_open,))
        self._text("content", self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]

    # GLM-4: "NAME\n{JSON}" as the whole answer

    def _glm4_name(self, final):
        self.buf = self.buf.lstrip("\n")          # after </think>
        if not self.buf and not final:
            return
        nl = self.buf.find("\n")
        if nl < 0:
            if not final and any(n.startswith(self.buf) for n in self.schemas):
                return                          # may be a name: wait for its line's end
            self.state = "content"
            return
        name, rest = self.buf[:nl].strip(), self.buf[nl + 1:].lstrip()
        if not rest and not final and name in self.schemas:
            return                              # wait for the line after the name
        if name in self.schemas and rest.startswith("{"):
            self._start_call(name)
            self.buf, self.state = rest, "glm4_json"
        else:
            self.state = "content"

    def _glm4_json(self, final):
        text = self.buf if final else self.buf.rstrip()
        self._arg_text(text.rstrip() if final else text)
        self.buf = self.buf[len(text):]
        if final:
            self.buf = ""

    # GLM-4.5 and XML: tags

    def _name(self, final):
        s = self.fmt.syntax
        if s.name_open:
            head = self.buf.lstrip()
            if head.startswith(s.name_open):
                self.buf = head[len(s.name_open):]
            elif s.name_open.startswith(head) and not final:
                return
        ends = [(i, e) for e in s.name_ends if (i := self.buf.find(e)) >= 0]
        if not ends and not final:
            return
        i, end = min(ends) if ends else (len(self.buf), "")
        name = self.buf[:i].strip()
        if not name:                            # "<tool_call>" and nothing after it
            self.buf, self.state = "", "content"
            return
        self.buf = self.buf[i + (len(end) if end in ("\n", ">") else 0):]
        self._start_call(name)
        self.state = "params"

    def _params(self, final):
        s = self.fmt.syntax
        head = self.buf.lstrip()
        if head.startswith(s.key_open):
            self.buf, self.state = head[len(s.key_open):], "key"
        elif head.startswith(s.call_close):
            self.buf = head[len(s.call_close):]
            self._end_call()
        elif skip := next((t for t in s.skip if head.startswith(t)), None):
            self.buf = head[len(skip):]
        elif not head or (not final and any(t.startswith(head) for t in (s.key_open, s.call_close) + s.skip)):
            self.buf = head                     # wait for more
        else:                                   # not the syntax: skip to the next tag
            j = head.find("<", 1)
            self.buf = head[j:] if j > 0 else ""

    def _key(self, final):
        s = self.fmt.syntax
        i = self.buf.find(s.key_close)
        if i < 0:
            return
        key = self.buf[:i].strip()
        self.buf = self.buf[i + len(s.key_close):]
        schema = self.schemas.get(self.calls[-1].name, {})
        self.kind = value_kind((schema.get("properties") or {}).get(key))
        self._arg_text(("{" if not self.n_args else ", ") + json.dumps(key, ensure_ascii=False) + ": ")
        self.n_args += 1
        if self.kind == "string":
            self._arg_text('"')
        self.lead_checked = not s.trim_newline
        self.state = "value_open" if s.value_open else "value"

    def _value_open(self, final):
        s = self.fmt.syntax
        head = self.buf.lstrip()
        if head.startswith(s.value_open):
            self.buf, self.state = head[len(s.value_open):], "value"
        elif not head or (s.value_open.startswith(head) and not final):
            self.buf = head
        else:
            self.buf, self.state = head, "value"       # a value without its opening tag

    def _value(self, final):
        s = self.fmt.syntax
        if not self.lead_checked:
            if not self.buf:
                return
            if self.buf.startswith("\n"):
                self.buf = self.buf[1:]
            self.lead_checked = True
        i = self.buf.find(s.value_close)
        if i >= 0:
            text = self.buf[:i]
            self.buf = self.buf[i + len(s.value_close):]
            self._end_value(text)
            return
        if self.kind == "string" and not final:     # strings stream; other values wait for their end
            tags = ("\n" + s.value_close, s.value_close) if s.trim_newline else (s.value_close,)
            keep = held(self.buf, tags)
            self._arg_text(json.dumps(self.buf[:len(self.buf) - keep], ensure_ascii=False)[1:-1])
            self.buf = self.buf[len(self.buf) - keep:]

    def _end_value(self, text):
        if self.fmt.syntax.trim_newline and text.endswith("\n"):
            text = text[:-1]
        if self.kind == "string":
            self._arg_text(json.dumps(text, ensure_ascii=False)[1:-1] + '"')
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = text                    # not JSON: the text itself
            self._arg_text(json.dumps(value, ensure_ascii=False))
        self.state = "params"


def held(text: str, tags) -> int:
    """Length of the longest end of `text` that is a proper start of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best
