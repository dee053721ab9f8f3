"""Constrained sampling: an answer held to a grammar, token by token, by llguidance (the library
llama.cpp's `--grammar`/`json_schema` uses when built with it): before each choice, every token
that cannot continue a valid output gets -inf; the grammar consumes the token chosen; once it is
complete, only a stop token is left (llguidance allows the tokenizer's EOS tokens then).

Grammars: a JSON schema (OpenAI's response_format json_schema, llama.cpp's json_schema field),
any JSON object (response_format json_object), a Lark or llama.cpp GBNF grammar (the `grammar`
field), or a chat format's tool calls (chat_format.ChatTurn.tool_grammar: tool_choice required or
a named function). JSON is written with ", " and ": " and no other whitespace, so a model cannot
wander off into blank space; strings keep every character JSON allows; a number has at most
MAX_DIGITS digits in a row where it could end instead (llguidance's number has no length limit).

Why llguidance and not xgrammar: tools/bench_constrain.py times both on the same token sequences
over a 151k byte-level BPE vocabulary (README: Structured outputs)."""
import json
import re
import time

import numpy as np

from .errors import GlmcpuError

# JSON as json.dumps writes it: the separators, no other whitespace
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# digits in a row a JSON number may have where it could end instead: llguidance's number has no
# length limit, and a model that likes a digit (greedy, or a small one) writes 2.2222... until
# max_tokens; llama.cpp's JSON grammars allow 16 digits in each part of a number
MAX_DIGITS = 16


class GrammarError(GlmcpuError):
    """A grammar or schema llguidance cannot compile (the message says where)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GlmcpuError("constrained output (response_format, grammar, tool_choice) needs the "
                          "llguidance package: pip install llguidance") from None
    return llguidance


def json_schema(schema) -> str:
    """The Lark grammar of JSON valid under `schema` (a dict, or its text), written as JSON_OPTIONS
    says unless the schema's own "x-guidance" says otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    return "start: " + json_expr(schema)


def json_expr(schema: dict) -> str:
    """`%json {schema}` for a Lark rule, written as JSON_OPTIONS says (unless the schema's own
    "x-guidance" says otherwise)."""
    return "%json " + json.dumps(dict(schema, **{"x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}))


def json_object() -> str:
    """Any JSON object."""
    return json_schema({"type": "object"})


def gbnf(text: str) -> str:
    """A llama.cpp GBNF grammar (root ::= ...), or Lark, as Lark."""
    try:
        return _llguidance().gbnf_to_lark.any_to_lark(text)
    except Exception as e:          # its converter raises what its parser raises
        raise GrammarError(f"the grammar is not valid GBNF or Lark ({e})") from None


def special_tags(tokenizer) -> frozenset:
    """The texts of the tokenizer's special (control) tokens: in a grammar they are single tokens,
    written <tag> (llguidance's token syntax), not strings."""
    return frozenset(t.content for t in tokenizer.tok.get_added_tokens_decoder().values() if t.special)


def with_thinking(grammar: str, mode, special=frozenset()) -> str:
    """A chat answer whose text is `grammar` (Lark with a start rule), after its thinking: mode None
    (nothing before it), "optional" (a <think>...</think> block may come first: GLM-4.5 thinks
    unless told not to), "open" (the prompt ended inside <think>: reasoning and </think> first)."""
    if mode is None:
        return grammar
    body = re.sub(r"(?m)^start(\s*:)", r"answer\1", grammar)
    if "</think>" in special:       # a special token ends the reasoning by itself
        reasoning = "reasoning <" + "/think>\nreasoning: /(?s:.*)/"
    else:                           # the rule's text ends where "</think>" is written
        reasoning = 'reasoning\nreasoning[suffix="</think>"]: /(?s:.*)/'
    opener = ("<think>" if "<think>" in special else '"<think>"') + " "
    if mode == "optional":
        return f"start: thinking? answer\nthinking: {opener}{reasoning}\n{body}"
    return f"start: thinking answer\nthinking: {reasoning}\n{body}"


def ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's view of a glmcpu Tokenizer over the model's n_vocab rows (kept on it: building
    one takes ~1 s for 151k tokens); its EOS tokens are the tokenizer's stop ids."""
    cache = getattr(tokenizer, "_llg", None)
    if cache is None or cache[0] != n_vocab:
        llg = _llguidance()
        stops = sorted(i for i in tokenizer.stop_ids if i < n_vocab)
        tok = llg.LLTokenizer(tokenizer.tok.to_str(), n_vocab=n_vocab, eos_token=stops or None)
        tokenizer._llg = cache = (n_vocab, tok)
        digit_table(tokenizer, n_vocab)         # here, so that a first grammar's compile time is its own
    return cache[1]


def digit_table(tokenizer, n_vocab: int):
    """Per token (kept on the tokenizer; ~40 ms for 151k tokens): its leading and trailing ASCII
    digits (for a token of digits only, its length, negated in `trail`), and whether it starts
    with a quote."""
    cache = getattr(tokenizer, "_digits", None)
    if cache is None or cache[0] != n_vocab:
        ll = ll_tokenizer(tokenizer, n_vocab)
        lead, trail = np.zeros(n_vocab, np.int32), np.zeros(n_vocab, np.int32)
        quote = np.zeros(n_vocab, bool)
        for i in range(n_vocab):
            b = ll.decode_bytes([i])
            n = len(b) - len(b.lstrip(b"0123456789"))
            lead[i] = n
            trail[i] = -n if n == len(b) and n else len(b) - len(b.rstrip(b"0123456789"))
            quote[i] = b[:1] == b'"'
        tokenizer._digits = cache = (n_vocab, (lead, trail, quote))
    return cache[1]


def check(grammar: str, tokenizer, n_vocab: int):
    """GrammarError unless the grammar compiles (before a request takes a slot)."""
    Constraint(grammar, tokenizer, n_vocab)


def lark(text: str) -> str:
    return text


class Constraint:
    """One generation's grammar state: mask the logits, then accept the token chosen."""

    def __init__(self, grammar: str, tokenizer, n_vocab: int):
        """grammar: Lark (llguidance's dialect: %json, <special tokens>), as this module builds it."""
        llg = _llguidance()
        self.n_vocab = n_vocab
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer, n_vocab), llg.LLMatcher.grammar_from_lark(grammar),
                                     log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.words = np.zeros((n_vocab + 31) // 32, np.int32)     # llguidance's bitmask, reused
        self.seconds, self.masks = 0.0, 0          # time spent computing masks (tools/bench_constrain.py)
        # JSON in the grammar: its numbers are held to MAX_DIGITS digits in a row (cap_digits)
        self.digits = digit_table(tokenizer, n_vocab) if "%json" in grammar else None
        self.run = 0                # digits at the end of the output so far

    @property
    def done(self) -> bool:
        """The output is complete: nothing but a stop token may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the tokens that may come next."""
        t = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.n_vocab].view(bool)
        self.seconds += time.perf_counter() - t
        self.masks += 1
        return bits

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits [n_vocab] with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        if self.run and self.digits is not None:
            allowed = self.cap_digits(allowed)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def cap_digits(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` less the tokens that would make the digits in a row more than MAX_DIGITS,
        where the grammar allows something else and no quote (in a JSON number, not a string)."""
        lead, _, quote = self.digits
        longer = allowed & (lead > MAX_DIGITS - self.run)
        if longer.any() and not (allowed & quote).any():
            rest = allowed & ~longer
            if rest.any():
                return rest
        return allowed

    def accept(self, token: int):
        if not self.matcher.consume_token(int(token)):
            raise GlmcpuError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.digits is not None and 0 <= token < self.n_vocab:
            t = int(self.digits[1][token])
            self.run = self.run - t if t < 0 else t


def from_request(response_format=None, grammar=None, schema=None):
    """The grammar an OpenAI-style request asks for, or None: response_format {"type": "text" |
    "json_object" | "json_schema", "json_schema": {"schema": ...}}, llama.cpp's `grammar` (GBNF or
    Lark) or `json_schema`. GrammarError for a shape it cannot read."""
    asked = [x for x in (grammar, schema) if x is not None]
    rf = response_format
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise GrammarError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                               "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}")
        if rf["type"] != "text":
            asked.append(rf)
    if len(asked) > 1:
        raise GrammarError("give one of response_format, grammar and json_schema")
    if not asked:
        return None
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("grammar must be a GBNF (or Lark) grammar in a string")
        return gbnf(grammar)
    if schema is not None:
        if not isinstance(schema, dict):
            raise GrammarError("json_schema must be a JSON schema object")
        return json_schema(schema)
    if rf["type"] == "json_object":
        return json_object()
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
        raise GrammarError("response_format json_schema needs \"json_schema\": {\"name\": ..., \"schema\": {...}}")
    return json_schema(js.get("schema") or {"type": "object"})
