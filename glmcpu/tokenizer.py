"""Byte-level BPE from a GGUF's own metadata (or a tokenizer.json), chat templates with jinja2,
and a streaming detokeniser that never emits half a UTF-8 character."""
import json
import os

import jinja2.sandbox
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .errors import GlmcpuError, ModelFileError

# cl100k-style split shared by GGUF tokenizer.ggml.pre = chatglm-bpe and glm4
GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE = ("chatglm-bpe", "glm4", "default", None)
CONTROL = 3                 # llama.cpp token type of special tokens
USER_DEFINED = 4            # added tokens that are not special (GLM-4.5's <think>, <tool_call>... where so marked)
STOP_TEXTS = ("<|endoftext|>", "<|user|>", "<|observation|>")

# used when a file carries no tokenizer.chat_template
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'observation' %}<|observation|>\n{{ m['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template=None, stop_ids=(), source="the chat template"):
        """source names the template in errors (the file and key it came from)."""
        self.tok = tok
        self.chat_template = chat_template or GLM4_TEMPLATE
        self.source = source
        self.stop_ids = set(stop_ids) | {i for t in STOP_TEXTS if (i := tok.token_to_id(t)) is not None}
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise ModelFileError(f"{source} is not a valid Jinja template ({_first_line(e)})") from None

    @classmethod
    def from_gguf(cls, f, any_pre=False) -> "Tokenizer":
        """any_pre: take another byte-level BPE's vocabulary (split as GLM-4 splits; for tools that
        want a real 151k vocabulary, such as a llama.cpp vocab-only file)."""
        kind = f.text("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelFileError(f"{f.path}: tokenizer type {kind!r} is not byte-level BPE ('gpt2'), "
                                 "which every GLM-4 file uses")
        pre = f.text("tokenizer.ggml.pre")
        if pre not in KNOWN_PRE and not any_pre:
            raise ModelFileError(f"{f.path}: pre-tokenizer {pre!r} is not a GLM one ({', '.join(p for p in KNOWN_PRE if p)})")
        tokens = f.strings("tokenizer.ggml.tokens", nonempty=True)
        merges = f.strings("tokenizer.ggml.merges", [])
        types = f.ints("tokenizer.ggml.token_type", [1] * len(tokens), length=len(tokens))
        try:
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
        except Exception as e:       # tokenizers raises a bare Exception for a bad vocabulary
            raise ModelFileError(f"{f.path}: its tokenizer metadata is inconsistent ({_first_line(e)})") from None
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GLM4_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == CONTROL])
        # matched whole in text before BPE, as llama.cpp does: a prompt's <tool_call> is that one token
        tok.add_tokens([t for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        stops = [f.number(k, -1, minimum=None) for k in ("tokenizer.ggml.eos_token_id",
                                                          "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        return cls(tok, f.text("tokenizer.chat_template"), [s for s in stops if 0 <= s < len(tokens)],
                   source=f"{f.path}: tokenizer.chat_template")

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json for the chat template and eos)."""
        tj = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        folder = os.path.dirname(tj)
        tok = HFTokenizer.from_file(tj)
        tok.post_processor = None        # GLM's post-processor prepends [gMASK]<sop]: the template does
        template, stops = None, []
        cfg = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg):
            with open(cfg) as fh:
                c = json.load(fh)
            template = c.get("chat_template")
            eos = c.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos and tok.token_to_id(eos) is not None:
                stops.append(tok.token_to_id(eos))
        tmpl = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.exists(tmpl):
            with open(tmpl) as fh:
                template = fh.read()
        return cls(tok, template, stops)

    def encode(self, text: str) -> list:
        """Text -> ids; special tokens written in the text ([gMASK], <|user|>...) become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def render(self, messages, add_generation_prompt=True, **kwargs) -> str:
        """The chat prompt of `messages`; a template that fails on them raises TemplateFailed."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TemplateFailed(f"{self.source} failed on these messages ({type(e).__name__}: "
                                 f"{_first_line(e)}); use --raw, or a file with a working template") from None


class TemplateFailed(GlmcpuError):
    """The chat template raised an error (raise_exception, an undefined name) on some messages."""


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """tojson as transformers' chat templates have it: GLM-4.5's and GLM-4-0414's templates pass
    ensure_ascii and indent, which jinja2's own refuses, and a prompt wants no HTML escapes."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Detokenizer:
    """Turns a stream of ids into text pieces, holding back ids until they end a character."""

    MAX_HELD = 8     # a run of ids that never forms valid UTF-8 is flushed as replacement chars

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.held = []

    def push(self, token_id: int) -> str:
        self.held.append(token_id)
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd") and len(self.held) < self.MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text
