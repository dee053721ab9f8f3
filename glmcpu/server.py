"""An OpenAI-compatible HTTP server for one loaded model, and the chat page at `/`.

Standard library only. Every connection runs in its own thread, up to `max_connections` at once
(more are answered 503 by the accepting thread and closed); a connection gets `head_timeout`
seconds for each request's line and headers (and no longer idle between keep-alive requests).
With --parallel N (batching.py) up to N generations decode together in one forward pass, each with
its own KV cache; with 1 they take turns in arrival order (`Turns`). Either way the model runs on one
thread, and kept KV caches let the next turn of a conversation reuse its prefix. A client that
goes away (closed socket) ends its generation at the next token, freeing its slot.

Every error is answered in OpenAI's shape, http.server's own refusals included (a garbled request
line: 400, an unknown method: 405, headers too long: 431, a version HTTP/2 or later: 505); a bug
is a 500 with that body, logged in one line with --verbose and never with a traceback.

Chat requests take tools, tool_choice, parallel_tool_calls, assistant messages with tool_calls
and tool messages, put into the file's own template as its format wants (chat_format.py); the
answer comes back as message.tool_calls (finish_reason "tool_calls") and message.reasoning_content
(GLM-4.5's <think> block; inline with --reasoning-format none), streamed as OpenAI streams them.
Also chat_template_kwargs (e.g. {"enable_thinking": false}) and reasoning_format, as llama-server.

Structured outputs: response_format json_object / json_schema, and llama.cpp's grammar (GBNF or
Lark) and json_schema fields; tool_choice "required" or a named function; each enforced by
constrained sampling (constrain.py, llguidance), after GLM-4.5's thinking where it thinks.

Accepted and ignored: frequency_penalty, presence_penalty, logit_bias, user.
Refused with 400: n != 1, logprobs, echo. Extensions as llama.cpp's server has them: top_k, min_p,
repeat_penalty, ignore_eos, and seed -1 for a random seed.
"""
import collections
import collections.abc
import contextlib
import hmac
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from . import constrain
from .batching import PROMPT_CHUNK, QueueFull, Scheduler, prometheus
from .chat_format import (THINK_OPEN, ChatFormatError, ChatTurn, Lead, check_tool_calls, check_tool_choice, answer_grammar,
                          check_tools, detect)
from .errors import ContextOverflow, GlmcpuError
from .engine import detokenize
from .generate import check_fits

MAX_BODY = 1 << 20          # bytes of request JSON; a prompt that fills a 128k context is ~600 KB
MAX_DISCARD = 16 << 20      # an unwanted body up to this size is read, so its sender sees our answer
MAX_CONNECTIONS = 64        # connections served at once; each holds a thread
HEAD_TIMEOUT = 10           # seconds for a request line and headers, idle keep-alive included
ROLES = ("system", "user", "assistant", "observation", "tool")
REASONING_FORMATS = ("deepseek", "none", "auto")     # auto: deepseek, as llama-server's
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt")   # chat_template_kwargs may not set these


class APIError(Exception):
    """Answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


class Turns:
    """A first-come first-served lock with a bounded waiting line (beyond it: 503)."""

    def __init__(self, max_waiting):
        self.max_waiting = max_waiting
        self.cond = threading.Condition()
        self.next_ticket = 0        # handed to the next arrival
        self.serving = 0            # the ticket whose turn it is

    def pending(self):
        """Requests generating or waiting to."""
        return self.next_ticket - self.serving

    def __enter__(self):
        with self.cond:
            if self.pending() > self.max_waiting:       # the one being served is not waiting
                raise APIError(503, f"the server is busy ({self.max_waiting} requests are waiting); "
                               "retry shortly", code="server_busy", kind="server_error")
            ticket = self.next_ticket
            self.next_ticket += 1
            while self.serving != ticket:
                self.cond.wait()

    def __exit__(self, *exc):
        with self.cond:
            self.serving += 1
            self.cond.notify_all()


class LastStats(collections.abc.Mapping):
    """A model's last_stats as they are when read: model.generate puts a new dict there when it
    starts, so one taken before would be the previous generation's."""

    def __init__(self, model):
        self.model = model

    def __getitem__(self, key):
        return self.model.last_stats[key]

    def __iter__(self):
        return iter(self.model.last_stats)

    def __len__(self):
        return len(self.model.last_stats)


class Generation:
    """Iterates the text a model generates, cut at the first stop string; afterwards
    `finish_reason` is "stop" or "length". Text that could begin a stop string is held back
    until it is known not to, so a stream never shows part of one."""

    def __init__(self, pieces, finish, stops=()):
        """finish(): "stop" or "length", asked once the pieces have run out."""
        self.pieces, self.finish = pieces, finish
        self.stops = [s for s in stops if s]
        self.finish_reason = None
        self.text = ""

    def __iter__(self):
        sent = 0
        try:
            for piece in self.pieces:
                self.text += piece
                cut = min((i for i in (self.text.find(s, sent) for s in self.stops) if i >= 0),
                          default=None)
                if cut is not None:
                    self.text = self.text[:cut]
                    if cut > sent:
                        yield self.text[sent:]
                    self.finish_reason = "stop"
                    return
                end = len(self.text) - self.held_back()
                if end > sent:
                    yield self.text[sent:end]
                    sent = end
            if sent < len(self.text):
                yield self.text[sent:]
            self.finish_reason = self.finish()
        finally:
            self.pieces.close()         # stops the model at once if we leave early

    def held_back(self):
        """Length of the longest end of the text that is the start of a stop string."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)


class API:
    """What the server does with a parsed request, kept apart from HTTP."""

    def __init__(self, model, name=None, api_key=None, max_waiting=16, defaults=None, parallel=1,
                 chunk=PROMPT_CHUNK, reasoning_format="deepseek"):
        """parallel > 1: that many generations decode together in one forward pass (batching.py);
        1: one at a time, in turns (speculative drafts, where the model has one, then work).
        reasoning_format "none" keeps GLM-4.5's <think> block in the content; "deepseek" (or
        "auto") returns it as reasoning_content."""
        self.model = model
        self.reasoning_format = reasoning_format
        self.format = detect(getattr(model.cfg, "arch", None), model.tokenizer.chat_template)
        self.name = name or os.path.splitext(os.path.basename(model.path))[0]
        self.api_key = api_key
        self.turns = Turns(max_waiting)
        self.scheduler = Scheduler(model, parallel, max_waiting, chunk) if parallel > 1 else None
        self.counts = collections.Counter()      # the turns' figures for /metrics (the scheduler keeps its own)
        self.defaults = dict(max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                             repeat_penalty=1.0, seed=None)
        self.defaults.update(defaults or {})
        self.created = int(os.path.getmtime(model.path))
        self.cancelled = 0          # generations ended early because their client left
        # OpenMP keeps a team of threads for each thread that calls the kernels: one caller, one team
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="glmcpu-model")

    def generate(self, ids, **kw):
        """model.generate, stepped on the runner thread; closing it stops the model."""
        gen = self.model.generate(ids, **kw)
        try:
            while (piece := self.runner.submit(next, gen, None).result()) is not None:
                yield piece
        finally:
            self.runner.submit(gen.close).result()

    def stop(self):
        """The server is going away: the model's step in flight ends, no other starts (then its
        owner may close the model)."""
        if self.scheduler is not None:
            self.scheduler.close()
        self.runner.shutdown(wait=True, cancel_futures=True)

    def run(self, ids, kw, alive):
        """Generate from token ids: (text pieces, finish(), stats) where finish() says "stop" or
        "length" once the pieces have run out, and stats fill in as they go (engine last_stats)."""
        if self.scheduler is not None:
            try:
                job = self.scheduler.submit(ids, **kw)
            except QueueFull as e:
                raise APIError(503, str(e), code="server_busy", kind="server_error") from None
            return detokenize(self.model.tokenizer, job.tokens(alive)), lambda: job.finish_reason or "cancelled", job.stats
        m = self.model
        kw = dict(kw, max_tokens=min(kw["max_tokens"], m.ctx - len(ids)))     # as the scheduler caps it

        def finish():
            s = m.last_stats
            full = s.get("prompt_tokens", 0) + s.get("gen_tokens", 0) >= m.ctx
            return "length" if s.get("gen_tokens", 0) >= kw["max_tokens"] or full else "stop"
        return self.generate(ids, **kw), finish, LastStats(m)

    def count(self, stats, outcome):
        """A generation of the turns ended (finish reason, "cancelled" or "error"): /metrics."""
        c = self.counts
        c[f"requests_{outcome}"] += 1
        c["prompt_tokens"] += stats.get("prompt_tokens", 0) - stats.get("cached_tokens", 0)
        c["prompt_seconds"] += stats.get("prompt_seconds", 0.0)
        c["tokens_predicted"] += stats.get("gen_tokens", 0)
        c["decode_seconds"] += stats.get("gen_seconds", 0.0)

    def health(self) -> dict:
        if self.scheduler is not None:
            st = self.scheduler.status()
        else:
            busy = min(self.turns.pending(), 1)
            st = {"slots": [{"id": 0, "state": "generating" if busy else "idle"}], "busy": busy,
                  "waiting": self.turns.pending() - busy}
        return {"status": "ok", "model": self.name, **st, "pending": st["busy"] + st["waiting"],
                "cancelled": self.cancelled}

    def metrics(self) -> str:
        if self.scheduler is not None:
            return self.scheduler.metrics()
        h = self.health()
        return prometheus(self.counts, len(h["slots"]), h["busy"], h["waiting"])

    def check_key(self, header):
        if not self.api_key:
            return
        given = header[7:].strip() if header and header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else
                           "Missing API key: send the header 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def model_card(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "glmcpu"}

    def check_model(self, body):
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise APIError(400, f"'model' must be a string, not {shown(name)}", param="model")
        if name is not None and name != self.name:
            raise APIError(404, f"The model {shown(name)} does not exist; this server runs '{self.name}'.",
                           param="model", code="model_not_found")

    def sampling(self, body):
        """Generation keywords from the request, checked, over the server's defaults."""
        refuse(body, "n", lambda v: v == 1, "only n=1 is supported")
        refuse(body, "logprobs", lambda v: not v, "logprobs are not supported")
        refuse(body, "echo", lambda v: not v, "echo is not supported")
        kw = dict(self.defaults)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if limit is not None:
            # no tighter bound: a full context ends the answer anyway, with finish_reason "length"
            kw["max_tokens"] = number(limit, param, 1, 2**31 - 1, integer=True)
        for key, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1), ("min_p", 0, 1),
                            ("repeat_penalty", 0.01, 10)):         # 0 would divide logits by 0
            if body.get(key) is not None:
                kw[key] = number(body[key], key, lo, hi)
        for key, lo in (("top_k", 0), ("seed", -2**63)):
            if body.get(key) is not None:
                kw[key] = number(body[key], key, lo, 2**63 - 1, integer=True)
        if kw["seed"] is not None and kw["seed"] < 0:      # numpy takes no negative seed
            kw["seed"] = None if kw["seed"] == -1 else kw["seed"] % 2**64   # -1: random, as llama.cpp
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                     and all(isinstance(s, str) for s in stop)):
            raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
        for key in ("stream", "ignore_eos"):
            if not isinstance(body.get(key, False), bool):
                raise APIError(400, f"'{key}' must be true or false", param=key)
        stream = body.get("stream", False)
        kw["ignore_eos"] = body.get("ignore_eos", False)
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        return kw, stop or [], stream, bool(opts.get("include_usage"))

    def chat_prompt(self, body) -> ChatTurn:
        """The request's messages, tools and template options rendered with the file's template."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
        try:
            tools = check_tools(body.get("tools"))
            choice = check_tool_choice(body.get("tool_choice"), tools)
            out = [self.message(m, i) for i, m in enumerate(messages)]
        except ChatFormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        parallel = body.get("parallel_tool_calls")
        parallel = True if parallel is None else parallel
        if not isinstance(parallel, bool):
            raise APIError(400, "'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict) or any(k in TEMPLATE_OWN or not k.isidentifier() for k in kwargs):
            raise APIError(400, "'chat_template_kwargs' must be an object of template variables (not "
                                f"{', '.join(TEMPLATE_OWN)})", param="chat_template_kwargs")
        reasoning = body.get("reasoning_format") or self.reasoning_format
        if reasoning not in REASONING_FORMATS:
            raise APIError(400, f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}",
                           param="reasoning_format")
        tok = self.model.tokenizer
        try:
            msgs, extra = self.format.render_inputs(out, tools, tok.chat_template)
            prompt = tok.render(msgs, **extra, **kwargs)
        except Exception as e:          # jinja2 errors, raise_exception() in the file's template, deep JSON
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages")
        unicode(prompt, "tools" if tools else "messages")      # a lone surrogate in a tool or an argument
        return ChatTurn(prompt, self.format, tools, choice, parallel, reasoning != "none",
                        prompt.rstrip().endswith(THINK_OPEN))

    @staticmethod
    def message(m, i):
        """messages[i], checked: role and text content; an assistant's tool_calls (arguments as
        objects) and reasoning_content; a tool result's tool_call_id."""
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a 'role', one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        out = {"role": m["role"], "content": text_of(m.get("content"), f"messages[{i}].content")}
        if m["role"] == "assistant" and m.get("tool_calls"):
            out["tool_calls"] = check_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        if m["role"] == "assistant" and isinstance(m.get("reasoning_content"), str):
            out["reasoning_content"] = unicode(m["reasoning_content"], f"messages[{i}].reasoning_content")
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = unicode(m[key], f"messages[{i}].{key}")
        return out

    def completion_prompt(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids_ok = isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model.cfg.n_vocab
            for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not ids_ok:
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids",
                           param="prompt")
        return unicode(prompt, "prompt") if isinstance(prompt, str) else prompt

    def start(self, body, chat):
        """Check a request; returns (prompt, generate keywords, stops, stream, include_usage)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.check_model(body)
        prompt = self.chat_prompt(body) if chat else self.completion_prompt(body)
        kw, stops, stream, usage = self.sampling(body)
        kw["grammar"] = self.grammar(body, prompt if chat else None)
        return prompt, kw, stops, stream, usage

    def grammar(self, body, turn):
        """The grammar the answer is held to (constrain.py), or None: response_format, llama.cpp's
        grammar / json_schema, or a chat turn's tool_choice required or named; after any thinking
        GLM-4.5 does first. Checked here: a grammar that does not compile is a 400."""
        tok, n_vocab, calls = self.model.tokenizer, self.model.cfg.n_vocab, None
        param = next((k for k in ("response_format", "grammar", "json_schema") if body.get(k) is not None),
                     "response_format")
        try:
            grammar = constrain.from_request(body.get("response_format"), body.get("grammar"),
                                             body.get("json_schema"))
            special = constrain.special_tags(tok)
            calls = turn.tool_grammar(special) if turn is not None else None
            if calls is not None and grammar is not None:
                raise constrain.GrammarError(f"tool_choice {turn.tool_choice!r} holds the answer to tool calls; "
                                             f"it cannot also follow {param}")
            grammar = calls or grammar
            if grammar is None:
                return None
            if turn is not None:
                grammar = answer_grammar(turn.format, turn.prompt, grammar, special)
            constrain.check(grammar, tok, n_vocab)
        except constrain.GrammarError as e:
            raise APIError(400, str(e), param="tool_choice" if calls is not None else param) from None
        except ChatFormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        return grammar

    def token_ids(self, prompt, chat):
        """The prompt (a ChatTurn's, for chat) as token ids, checked against the context before
        the turn is taken."""
        prompt = prompt.prompt if isinstance(prompt, ChatTurn) else prompt
        ids = self.model.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        try:
            check_fits(len(ids), self.model.ctx)
        except ContextOverflow as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        return ids

    def usage(self, s):
        p, c = s.get("prompt_tokens", 0), s.get("gen_tokens", 0)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                 "prompt_tokens_details": {"cached_tokens": s.get("cached_tokens", 0)}}
        if "drafted" in s:          # speculative decoding: OpenAI's names for predicted tokens
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": s["accepted"],
                                                  "rejected_prediction_tokens": s["drafted"] - s["accepted"]}
        return usage


def chat_message(parser) -> dict:
    """OpenAI's choices[0].message of a parsed answer: content (null beside tool calls and
    nothing else), reasoning_content where the model reasoned, tool_calls where it called."""
    msg = {"role": "assistant", "content": parser.content or (None if parser.calls else "")}
    if parser.reasoning_text:
        msg["reasoning_content"] = parser.reasoning_text
    if parser.calls:
        msg["tool_calls"] = parser.tool_calls
    return msg


def chat_delta(ev) -> dict:
    """A StreamParser event as a streamed choice's delta."""
    if ev[0] == "content":
        return {"content": ev[1]}
    if ev[0] == "reasoning":
        return {"reasoning_content": ev[1]}
    if ev[0] == "call":
        return {"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                "function": {"name": ev[3], "arguments": ""}}]}
    return {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}


def finish_reason(gen, parser) -> str:
    """"tool_calls" for an answer that called tools and ended by itself, else the generation's."""
    return "tool_calls" if parser and parser.calls and gen.finish_reason == "stop" else gen.finish_reason


def refuse(body, key, ok, message):
    if key in body and body[key] is not None and not ok(body[key]):
        raise APIError(400, message, param=key)


def number(v, param, lo, hi, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not lo <= v <= hi:
        raise APIError(400, f"'{param}' must be {'an integer' if integer else 'a number'} "
                            f"from {lo} to {hi}, not {shown(v)}", param=param)
    return v


def shown(v):
    """A client's value for an error message: short, and never the repr of a deep structure."""
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def unicode(text, param):
    """`text`, refused when it holds a lone surrogate ("\\ud800" is valid JSON, not valid text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} holds a lone surrogate ({shown(text[e.start:e.end])}); send "
                            "valid Unicode", param=param) from None
    return text


def text_of(content, param):
    """A message's content: a string, null, or a list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return unicode(content or "", param)
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise APIError(400, "only text content parts are supported", param=param)
            parts.append(unicode(p["text"], param))
        return "".join(parts)
    raise APIError(400, "content must be a string or a list of text parts", param=param)


class HeadReader(io.RawIOBase):
    """A connection's socket as the handler reads it: while `deadline` (time.monotonic()) is set,
    no read waits past it, so a client sending its headers a byte at a time still leaves in time."""

    def __init__(self, sock):
        self.sock, self.deadline = sock, None

    def readable(self):
        return True

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request's head took too long")
            self.sock.settimeout(left)
        return self.sock.recv_into(b)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive for the openai client's connection pool
    server_version = "glmcpu"
    timeout = 120                       # each read of a body, each write; the head has head_timeout

    @property
    def api(self) -> API:
        return self.server.api

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def setup(self):
        super().setup()
        self.rfile.close()              # the socket counts its files: an open one keeps it open
        self.reader = HeadReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        """http.server's, with a deadline for the head, and the last resort for a bug: a 500 in
        OpenAI's shape (unless an answer was started), one line with --verbose, then close."""
        self.answered, self.body_read = False, True     # route() says when a body waits unread
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", None
        self.reader.deadline = time.monotonic() + self.server.head_timeout
        try:
            super().handle_one_request()
        except ConnectionError:         # the client left: Server.handle_error
            raise
        except Exception as e:
            self.close_connection = True
            self.server.note(f"internal error on {self.requestline!r}: {type(e).__name__}: {e}")
            if self.answered:
                return
            try:
                if not self.body_read:
                    self.discard_body()
                self.send_error_json(APIError(500, f"internal error: {type(e).__name__}: {e}"[:300],
                                              kind="server_error"))
            except OSError:
                pass

    def parse_request(self):
        ok = super().parse_request()
        self.reader.deadline = None
        self.connection.settimeout(self.timeout)
        if ok and self.request_version == "HTTP/0.9":      # "GET /path": no headers, so no key
            self.send_error(400, "send a request line with a version: METHOD PATH HTTP/1.1")
            return False
        return ok

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a garbled request line, headers too long, an unknown
        method) in OpenAI's error shape, always after a status line, and closing."""
        if code == HTTPStatus.NOT_IMPLEMENTED:          # no do_<method>: not one of ours
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not allowed"
        if self.request_version == "HTTP/0.9":          # set by parse_request before it knows
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.log_error("code %d, message %s", code, message)
        status = HTTPStatus(code)
        self.send_error_json(APIError(status, message or status.phrase, code=status.name.lower(),
                                      kind="invalid_request_error" if code < 500 else "server_error"))

    def send_response(self, code, message=None):
        self.answered = True
        super().send_response(code, message)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self.body_read = False
        try:
            if method == "GET" and path in ("/", "/index.html"):
                page = chat_page()
                return self.send(200, page, "text/html; charset=utf-8",
                                 [("Content-Security-Policy", page_policy(page))])
            if method == "GET" and path == "/marked.min.js":        # the page's Markdown renderer
                return self.send(200, data_file("marked.min.js"), "text/javascript; charset=utf-8")
            if method == "GET" and path == "/health":
                return self.send_json(200, self.api.health())
            if method == "GET" and path == "/metrics":
                self.api.check_key(self.headers.get("Authorization"))
                return self.send(200, self.api.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            if not path.startswith("/v1/"):
                raise APIError(404, f"no such path: {method} {path}", code="unknown_url")
            self.api.check_key(self.headers.get("Authorization"))
            if method == "GET" and path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [self.api.model_card()]})
            if method == "GET" and path == f"/v1/models/{self.api.name}":
                return self.send_json(200, self.api.model_card())
            if method == "GET" and path.startswith("/v1/models/"):
                raise APIError(404, f"The model '{path[11:]}' does not exist", param="model",
                               code="model_not_found")
            if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                return self.complete(chat=path == "/v1/chat/completions")
            raise APIError(404, f"no such path: {method} {path}", code="unknown_url")
        except APIError as e:
            if not self.body_read:
                self.discard_body()
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def body_length(self) -> int:
        """The body's declared length, or APIError (closing: where the body ends is unknown)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise APIError(411, "chunked (or any Transfer-Encoding) bodies are not supported; send "
                                "the body with a Content-Length")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length", [])}
        length = lengths.pop() if len(lengths) == 1 else None
        if length is None or not (length.isascii() and length.isdigit()):     # not "²" either
            self.close_connection = True
            raise APIError(400 if lengths or length else 411, "send the body with one Content-Length")
        return int(length) if len(length) < 19 else 2**63      # int() refuses 4,300 digits

    def read_json(self):
        n = self.body_length()
        if n > MAX_BODY:
            raise APIError(413, f"the request body is {n} bytes; the limit is {MAX_BODY}",
                           code="request_too_large")
        self.body_read = True
        try:
            return json.loads(self.rfile.read(n))
        except ValueError as e:         # JSON, UTF-8, an integer of over 4,300 digits
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply") from None

    def discard_body(self):
        """Read and drop the body of a refused request: left unread it would be taken for the
        next request, and closing on a client still sending makes it miss the answer."""
        if self.headers.get("Content-Length") is None and self.headers.get("Transfer-Encoding") is None:
            return                      # no body
        try:
            n = self.body_length()
        except APIError:                # the connection closes
            return
        if n > MAX_DISCARD:
            self.close_connection = True
            return
        while n > 0:
            got = self.rfile.read(min(n, 1 << 16))
            if not got:
                break
            n -= len(got)

    def complete(self, chat):
        api = self.api
        prompt, kw, stops, stream, include_usage = api.start(self.read_json(), chat)
        ids = api.token_ids(prompt, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        with api.turns if api.scheduler is None else contextlib.nullcontext():
            if self.client_gone():      # gave up while waiting: do not compute for nobody
                self.close_connection = True
                return
            pieces, finish, stats = api.run(ids, kw, lambda: not self.client_gone())
            if chat:        # the answer without its opening newline, read into reasoning, content, calls
                lead = Lead(pieces)
                gen, parser = Generation(lead, finish, stops), prompt.parser(lead)
            else:
                gen, parser = Generation(pieces, finish, stops), None
            failed = False
            try:
                if stream:
                    self.stream(gen, rid, created, "chat.completion.chunk" if chat else kind, parser,
                                include_usage, stats)
                else:
                    text = ""
                    for piece in gen:
                        if self.client_gone():
                            break
                        text += piece
                        if parser:
                            parser.feed(piece)
                    if gen.finish_reason in (None, "cancelled"):     # the client left
                        self.close_connection = True
                        api.cancelled += 1
                        return
                    if parser:
                        parser.finish()
                        choice = {"index": 0, "message": chat_message(parser), "logprobs": None,
                                  "finish_reason": finish_reason(gen, parser)}
                    else:
                        choice = {"index": 0, "text": text, "logprobs": None,
                                  "finish_reason": gen.finish_reason}
                    self.send_json(200, {"id": rid, "object": kind, "created": created,
                                         "model": api.name, "choices": [choice],
                                         "usage": api.usage(stats)})
            except GlmcpuError as e:        # e.g. a cluster that lost every worker
                failed = True
                raise APIError(500, str(e), kind="server_error") from None
            finally:
                gen.pieces.close()
                if api.scheduler is None:
                    api.count(stats, "error" if failed else gen.finish_reason or "cancelled")

    def stream(self, gen, rid, created, kind, parser, include_usage, stats):
        """Server-sent events of a generation; with a parser (chat), the answer's reasoning,
        content and tool calls as OpenAI's deltas."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")     # no Content-Length: the end of the body is EOF
        self.end_headers()
        self.close_connection = True
        api = self.api

        def event(choice, **extra):
            chunk = {"id": rid, "object": kind, "created": created, "model": api.name,
                     "choices": [choice] if choice else [], **extra}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()

        def choice(text, finish=None):
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def delta(d, finish=None):
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

        try:
            if parser:
                event(delta({"role": "assistant", "content": ""}))
            for piece in gen:
                if self.client_gone():
                    api.cancelled += 1
                    return
                if not parser:
                    event(choice(piece))
                for ev in parser.feed(piece) if parser else ():
                    event(delta(chat_delta(ev)))
            if gen.finish_reason == "cancelled":        # the client left while its job waited
                api.cancelled += 1
                return
            for ev in parser.finish() if parser else ():
                event(delta(chat_delta(ev)))
            last = delta({}, finish_reason(gen, parser)) if parser else choice("", gen.finish_reason)
            event(last, **({"usage": None} if include_usage else {}))
            if include_usage:
                event(None, usage=api.usage(stats))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):     # the client left
            if gen.finish_reason is None:       # mid-answer: leaving the loop closes the generation
                api.cancelled += 1
        except Exception as e:      # e.g. a cluster that lost every worker; the status is sent
            if not isinstance(e, GlmcpuError):
                self.server.note(f"internal error while streaming: {type(e).__name__}: {e}")
            body = APIError(500, str(e), kind="server_error").body()
            try:
                self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            except OSError:
                pass

    def client_gone(self) -> bool:
        """True when the peer has closed its side (readable, yet nothing to read)."""
        try:
            if hasattr(select, "poll"):      # select() fails on descriptors past 1024 (busy servers)
                p = select.poll()
                p.register(self.connection, select.POLLIN)
                readable = p.poll(0)
            else:
                readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send(self, status, data: bytes, ctype, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def send_error_json(self, e: APIError):
        headers = [("Retry-After", "1")] if e.status == 503 else []
        if e.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        if e.status == 405:
            headers.append(("Allow", "GET, POST"))
        self.send_json(e.status, e.body(), headers)


class Server(ThreadingHTTPServer):
    daemon_threads = True           # Ctrl-C does not wait for open connections
    allow_reuse_address = True
    # the listen backlog: with socketserver's 5, a burst of connections has its SYNs dropped
    # and retried after 1, 3, 7... s, and a request behind it waits that long
    request_queue_size = 1024

    def __init__(self, api: API, host="127.0.0.1", port=8000, verbose=False,
                 max_connections=MAX_CONNECTIONS, head_timeout=HEAD_TIMEOUT):
        self.api, self.verbose = api, verbose
        self.max_connections, self.head_timeout = max_connections, head_timeout
        self.slots = threading.BoundedSemaphore(max_connections)    # one per connection thread
        super().__init__((host, port), Handler)

    signals = None                  # the read end of the signal wakeup pipe (watch_signals)

    def watch_signals(self):
        """SIGTERM, SIGHUP and SIGINT end serve_forever for certain. CPython 3.11 runs a signal's
        Python handler only once the main thread sees its eval breaker, which another thread
        taking the GIL can clear: an idle server could then miss a SIGTERM. The handler's C part
        always writes the signal to the wakeup fd, which the loop reads (service_actions)."""
        r, w = os.pipe()
        for fd in (r, w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(w)
        self.signals = r

    def service_actions(self):
        """Run by serve_forever after every select (at least every 0.5 s)."""
        if self.signals is None:
            return
        try:
            got = os.read(self.signals, 64)
        except BlockingIOError:
            return
        for sig in got:
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            if sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                raise SystemExit(128 + sig)

    def process_request(self, request, client_address):
        """A thread for the connection if one of `max_connections` is free, else a 503 from this
        (the accepting) thread, which never waits on the client."""
        if not self.slots.acquire(blocking=False):
            return self.turn_away(request)
        try:
            super().process_request(request, client_address)
        except BaseException:           # no thread started: it will not give the slot back
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def turn_away(self, request):
        e = APIError(503, f"the server is busy ({self.max_connections} connections are open); "
                          "retry shortly", code="server_busy", kind="server_error")
        body = json.dumps(e.body()).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            drain(request)      # a close with unread bytes is a reset, which can lose the answer
            request.send(head.encode() + body)      # fits an empty socket buffer
            request.shutdown(socket.SHUT_WR)
            drain(request)
        except OSError:
            pass
        request.close()

    def note(self, text):
        """One line on stderr with --verbose, nothing otherwise: what clients do is no error of
        ours, and a bug of ours is answered 500 and must not flood the log."""
        if self.verbose:
            print("glmcpu serve: " + " ".join(str(text).split())[:500], file=sys.stderr, flush=True)

    def handle_error(self, request, client_address):
        """An exception that left a handler: a client that left mid-request (reset, broken
        pipe, timeout) or a failure before any request was read. One line with --verbose."""
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError)):
            self.note(f"{client_address[0]} left mid-request ({type(e).__name__})")
        else:
            self.note(f"error with {client_address[0]}: {type(e).__name__}: {e}")

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def drain(sock, limit=1 << 20):
    """Read what a non-blocking socket holds, up to `limit` bytes."""
    while limit > 0:
        try:
            got = sock.recv(min(limit, 1 << 16))
        except (BlockingIOError, InterruptedError):
            return
        if not got:
            return
        limit -= len(got)


def data_file(name) -> bytes:
    return (resources.files("glmcpu") / "data" / name).read_bytes()


def chat_page() -> bytes:
    return data_file("chat.html")


def page_policy(page: bytes) -> str:
    """The chat page's Content-Security-Policy: it loads nothing but its own script (by hash) and
    /marked.min.js, and talks only to this server, so neither a slip in its handling of model
    output (an inline onerror=, a <script>) nor an image URL the model writes can run or load."""
    import base64, hashlib, re       # here: only the page needs them
    hashes = " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s).digest()).decode()
                      for s in re.findall(rb"<script>(.*?)</script>", page, re.S))
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
