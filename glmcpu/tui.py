"""The terminal chat of `glmcpu run`: answers stream in as Markdown, GLM-4.5 thinking is shown
dimmed while it runs and folded to one line after, a status line follows every answer."""
import json
import os
import time

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from .errors import GlmcpuError
from .generate import check_fits

HELP = """\
/help            this list
/reset           start a new conversation (keeps the system message)
/system TEXT     set the system message (and start over); /system alone clears it
/think on|off    let a GLM-4.5 model think before it answers, or not
/thoughts        show the last answer's thinking in full
/save FILE       write the conversation to FILE (JSON)
/load FILE       continue a conversation saved with /save
/stats           timings of the last answer (and experts / cluster figures)
/exit            leave (Ctrl-D too); Ctrl-C stops an answer, not the chat"""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(text: str):
    """'<think>T</think>A' -> (T, A, done?); text without a think block is all answer."""
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        if THINK_OPEN.startswith(body) and body:        # the tag may still be arriving
            return "", "", False
        return "", text.lstrip("\n"), True
    body = body[len(THINK_OPEN):]
    thought, sep, answer = body.partition(THINK_CLOSE)
    return thought.strip(), answer.lstrip("\n"), bool(sep)


class Chat:
    """One conversation with a loaded Model; the Model keeps the KV cache of the previous turn,
    so each turn computes only its new tokens."""

    FRAME = 1 / 20      # seconds between redraws: Markdown is re-rendered whole each time

    def __init__(self, model, sampling: dict, system=None, console=None, stats_extra=None):
        self.model = model
        self.sampling = sampling
        self.console = console or Console(highlight=False)
        self.system = system
        self.messages = []              # [{"role": "user"|"assistant", "content": str}]
        self.thinking = None            # None: the template's default; True/False: /think on|off
        self.last_thought = ""
        self.stats_extra = stats_extra  # called by /stats for the model's extra figures

    # -- the conversation ------------------------------------------------------------------
    def conversation(self):
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def template_kwargs(self):
        return {} if self.thinking is None else {"enable_thinking": self.thinking}

    def prompt_tokens(self) -> int:
        text = self.model.tokenizer.render(self.conversation(), **self.template_kwargs())
        return len(self.model.tokenizer.encode(text))

    def fit(self) -> int:
        """Drop the oldest turns until the prompt leaves room for an answer; returns how many
        messages were dropped (the newest user message is never dropped)."""
        room = self.model.ctx - min(self.sampling.get("max_tokens", 256), self.model.ctx // 4)
        dropped = 0
        while self.prompt_tokens() > room and len(self.messages) > 1:
            del self.messages[0]
            dropped += 1
            if self.messages and self.messages[0]["role"] == "assistant":
                del self.messages[0]
                dropped += 1
        try:
            check_fits(self.prompt_tokens(), self.model.ctx)
        except GlmcpuError:
            self.messages.pop()
            raise
        return dropped

    def ask(self, text: str) -> str:
        """Send a user message, stream the answer to the console, return the answer text."""
        self.messages.append({"role": "user", "content": text})
        dropped = self.fit()
        if dropped:
            self.console.print(f"[yellow]The conversation outgrew the context of {self.model.ctx} tokens: "
                               f"the oldest {dropped} messages were dropped.[/]")
        pieces, stopped = [], False
        live = Live(Text("…", style="dim"), console=self.console, auto_refresh=False,
                    vertical_overflow="visible")
        drawn = [0.0]

        def draw(renderable, force=False):
            if force or time.perf_counter() - drawn[0] > self.FRAME:
                live.update(renderable, refresh=True)
                drawn[0] = time.perf_counter()

        def reading(done, total):               # a long prompt: show how far its prefill is
            draw(Text(f"reading the prompt… {done}/{total} tokens", style="dim"))

        gen = self.model.chat(self.conversation(), template_kwargs=self.template_kwargs(),
                              progress=reading, **self.sampling)
        with live:
            try:
                for piece in gen:
                    pieces.append(piece)
                    draw(Group(self.render("".join(pieces)), Text(self.status_line(False), style="dim")))
            except KeyboardInterrupt:           # stop this answer, keep the chat
                stopped = True
            finally:
                gen.close()
            thought, answer, _ = split_thinking("".join(pieces))
            draw(self.render("".join(pieces), final=True), force=True)
        self.last_thought = thought
        self.messages.append({"role": "assistant", "content": answer.strip()})
        self.console.print(Text(self.status_line(stopped), style="dim"))
        return answer

    # -- drawing ---------------------------------------------------------------------------
    def render(self, text, final=False):
        thought, answer, thought_done = split_thinking(text)
        parts = []
        if thought and (final or thought_done):
            words = len(thought.split())
            parts.append(Text(f"▸ thought for {words} words (/thoughts shows them)", style="dim italic"))
        elif thought or (text.strip() and not thought_done):
            parts.append(Text(thought or "thinking…", style="dim italic"))
        if answer:
            parts.append(Markdown(answer))
        return Group(*parts)

    def status_line(self, stopped) -> str:
        s, m = self.model.last_stats, self.model
        gen_rate = s.get("gen_tokens", 0) / s["gen_seconds"] if s.get("gen_seconds") else 0.0
        used = m.cache.pos if m.cache is not None else 0
        bits = [f"{gen_rate:.1f} tok/s", f"{s.get('gen_tokens', 0)} tokens",
                f"context {used}/{m.ctx} ({100 * used / m.ctx:.0f}%)",
                f"prompt {s.get('prompt_tokens', 0)} ({s.get('cached_tokens', 0)} cached)"]
        if s.get("drafted"):
            bits.append(f"draft {100 * s['accepted'] / s['drafted']:.0f}% accepted")
        if m.net.status():
            bits.append(f"nodes {m.net.status()['nodes']}")
        if stopped:
            bits.append("stopped")
        return " · ".join(bits)

    # -- commands --------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        out = self.console
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            out.print(HELP, markup=False)
        elif name == "/reset":
            self.messages = []
            out.print("[dim]New conversation.[/]")
        elif name == "/system":
            self.system, self.messages = arg or None, []
            out.print(f"[dim]System message {'set' if arg else 'cleared'}; new conversation.[/]")
        elif name == "/think":
            if arg not in ("on", "off"):
                out.print("[red]/think on or /think off[/]")
            else:
                self.thinking = arg == "on"
                out.print(f"[dim]Thinking {arg}.[/]")
        elif name == "/thoughts":
            out.print(Text(self.last_thought or "(the last answer had no thinking)", style="dim italic"))
        elif name == "/save":
            if not arg:
                out.print("[red]/save FILE[/]")
            else:
                with open(os.path.expanduser(arg), "w") as fh:
                    json.dump({"system": self.system, "messages": self.messages}, fh, indent=1,
                              ensure_ascii=False)
                out.print(f"[dim]Saved {len(self.messages)} messages to {arg}.[/]")
        elif name == "/load":
            self.load(arg)
        elif name == "/stats":
            s = self.model.last_stats
            out.print(Text(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}),
                           style="dim") if s else Text("no answer yet", style="dim"))
            for extra in (self.stats_extra() if self.stats_extra else []):
                out.print(Text(extra, style="dim"))
        else:
            out.print(Text(f"unknown command {name} (/help lists them)", style="red"))
        return True

    def load(self, path):
        try:
            with open(os.path.expanduser(path)) as fh:
                data = json.load(fh)
            msgs = data["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ("user", "assistant") and
                       isinstance(m.get("content"), str) for m in msgs):
                raise ValueError("messages must be {role: user|assistant, content: text}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.console.print(Text(f"cannot load {path}: {e}", style="red"))
            return
        self.system, self.messages = data.get("system"), msgs
        self.console.print(f"[dim]Loaded {len(msgs)} messages.[/]")
        for m in msgs[-4:]:
            self.console.print(Text(("> " if m["role"] == "user" else "") + m["content"],
                                    style="bold" if m["role"] == "user" else ""))


def run(model, sampling: dict, system=None, stats_extra=None, history_file=None):
    """The interactive loop: prompt_toolkit for line editing and history, rich for output."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    chat = Chat(model, sampling, system, stats_extra=stats_extra)
    history = InMemoryHistory()
    if history_file:
        try:
            os.makedirs(os.path.dirname(history_file), exist_ok=True)
            history = FileHistory(history_file)
        except OSError:
            pass
    session = PromptSession(history=history)
    c = model.cfg
    status = model.net.status()
    nodes = f", {status['nodes'].split('/')[1]} nodes" if status else ""
    chat.console.print(f"[bold]glmcpu[/] chat with {os.path.basename(model.path)} ({c.arch}, "
                       f"{model.threads} threads, context {model.ctx}{nodes}). /help for commands, "
                       "Ctrl-D to leave.")
    if getattr(model, "ctx_note", None):
        chat.console.print(f"[dim]{model.ctx_note}[/]")
    while True:
        try:
            line = session.prompt("> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.ask(line)
        except GlmcpuError as e:
            chat.console.print(Text(str(e), style="red"))
