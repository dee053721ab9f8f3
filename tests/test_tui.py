"""The terminal chat: its logic on a console written to a string, then the real thing in tmux."""
from types import SimpleNamespace
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from rich.console import Console

import glmcpu
from glmcpu.hub import demo_path
from glmcpu.tokenizer import Tokenizer
from glmcpu.tui import Chat, split_thinking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


def console():
    return Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None)


@pytest.fixture(scope="module")
def demo():
    return glmcpu.load(demo_path(), threads=2)


def test_split_thinking():
    assert split_thinking("\nHello") == ("", "Hello", True)
    assert split_thinking("<think>plan it") == ("plan it", "", False)
    assert split_thinking("<thi") == ("", "", False)            # the tag is still arriving
    assert split_thinking("<think> a\nb </think>\n\nAnswer") == ("a\nb", "Answer", True)


def test_chat_streams_the_models_answer_and_reuses_the_cache(demo):
    chat = Chat(demo, GREEDY, console=console())
    answer = chat.ask("In the beginning")
    demo.reset()
    direct = "".join(demo.chat([{"role": "user", "content": "In the beginning"}], **GREEDY))
    assert answer.strip() and answer.strip() == direct.strip()
    chat.ask("And then?")
    assert demo.last_stats["cached_tokens"] > 0
    out = chat.console.file.getvalue()
    assert re.search(r"tok/s · 12 tokens · context \d+/512 .* \(\d+ cached\)", out)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_old_turns_are_dropped_to_fit_the_context(tmp_path):
    m = glmcpu.load(demo_path(), threads=2, ctx=96)
    chat = Chat(m, dict(GREEDY, max_tokens=8), console=console())
    for i in range(6):
        chat.ask(f"Tell me of the kings of Israel and Judah, the {i}th time, and of their wars")
    assert len(chat.messages) < 12 and chat.messages[-2]["content"].endswith("their wars")
    assert "oldest" in chat.console.file.getvalue() and chat.prompt_tokens() < 96
    with pytest.raises(glmcpu.GlmcpuError, match="context holds"):
        chat.ask("word " * 200)


def test_commands_save_load_reset_system_think(demo, tmp_path):
    chat = Chat(demo, GREEDY, console=console())
    chat.ask("Who was Moses?")
    path = str(tmp_path / "c.json")
    assert chat.command(f"/save {path}")
    assert json.load(open(path))["messages"] == chat.messages
    saved = list(chat.messages)
    assert chat.command("/reset") and chat.messages == []
    assert chat.command(f"/load {path}") and chat.messages == saved
    assert chat.command(f"/load {tmp_path / 'missing.json'}") and chat.messages == saved
    assert chat.command("/system You speak briefly.") and chat.messages == []
    assert chat.conversation()[0] == {"role": "system", "content": "You speak briefly."}
    assert chat.command("/think off") and chat.template_kwargs() == {"enable_thinking": False}
    assert chat.command("/stats") and chat.command("/help") and chat.command("/nonsense")
    assert not chat.command("/exit")
    out = chat.console.file.getvalue()
    assert "unknown command /nonsense" in out and "cannot load" in out and "/think on|off" in out


class ThinkingModel:
    """Stands in for a GLM-4.5 model: answers '<think>...</think>answer', renders enable_thinking."""

    def __init__(self, demo):
        tmpl = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
                "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
        self.tokenizer = Tokenizer(demo.tokenizer.tok, tmpl)
        self.ctx, self.cache, self.last_stats, self.prompts = 512, None, {}, []
        self.net = SimpleNamespace(status=dict)          # one process: no cluster figures

    def chat(self, messages, template_kwargs=None, progress=None, **kw):
        self.prompts.append(self.tokenizer.render(messages, **(template_kwargs or {})))
        yield from ["<think>", "First the ", "plan.", "</think>", "\n\n**The** answer."]


def test_thinking_is_folded_and_think_off_reaches_the_template(demo):
    m = ThinkingModel(demo)
    chat = Chat(m, GREEDY, console=console())
    assert chat.ask("hi") == "**The** answer."
    out = chat.console.file.getvalue()
    assert "thought for 3 words" in out and "The answer." in out and "**" not in out   # Markdown drawn
    assert chat.messages[-1]["content"] == "**The** answer." and chat.last_thought == "First the plan."
    chat.command("/think off")
    chat.ask("again")
    assert not m.prompts[0].endswith("<think></think>") and m.prompts[1].endswith("<think></think>")


# -- the real terminal ---------------------------------------------------------------------

class Tmux:
    def __init__(self, command, width=100, height=40):
        self.name = f"glmcpu-{uuid.uuid4().hex[:8]}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        command], check=True, cwd=ROOT)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def keys(self, *keys):
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait(self, pattern, timeout=60, every=0.02, seen=None):
        end = time.time() + timeout
        while time.time() < end:
            s = self.screen()
            if seen is not None:
                seen.append(s)
            if re.search(pattern, s, re.S):
                return s
            time.sleep(every)
        raise AssertionError(f"{pattern!r} never appeared; the screen:\n{self.screen()}")

    def close(self):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


STATUS = r"tok/s · (\d+) tokens · context (\d+)/512"
DONE = STATUS + r"[^\n]*\n>"         # the status line under a finished answer, then the prompt


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_a_real_terminal(tmp_path):
    cmd = (f"{sys.executable} -m glmcpu run --temp 0 --max-tokens 150 --ignore-eos --threads 1; "
           "echo EXITED $?; sleep 30")
    t = Tmux(f"env HOME={tmp_path} {cmd}")
    try:
        t.wait(r"/help for commands.*\n>")
        t.keys("In the beginning God created", "Enter")
        frames = []
        first = t.wait(DONE, seen=frames)
        # the answer streamed: some frame showed part of it before the status line came
        partial = [f for f in frames if "In the beginning God created\n" in f and not re.search(DONE, f)
                   and f.split("In the beginning God created\n", 1)[1].strip()]
        assert partial, "no frame showed a partial answer"
        answer = first.split("In the beginning God created\n", 1)[1].split("\n\n")[0]
        assert len(answer.split()) > 20
        assert re.search(DONE, first).group(1) == "150"

        t.keys("/reset", "Enter")
        t.wait("New conversation")
        t.keys("Tell me of Moses", "Enter")
        s = t.wait(r"New conversation.*" + STATUS + r".*prompt (\d+)[^\n]*\n>")
        after_reset = re.search(r"New conversation.*" + STATUS + r".*prompt (\d+)[^\n]*\n>", s, re.S)
        assert int(after_reset.group(3)) < 20          # the first conversation (159 tokens) is gone
        t.keys("Again", "Enter")
        s = t.wait(r"Again\n.*" + STATUS + r".*\((\d+) cached\)[^\n]*\n>")
        cached = re.search(r"Again\n.*" + STATUS + r".*\((\d+) cached\)[^\n]*\n>", s, re.S).group(3)
        assert int(cached) > 150                       # the next turn computed only its new tokens

        t.keys("/exit", "Enter")
        final = t.wait("EXITED 0")
        print("\n--- the terminal before /exit ---\n" + final)
    finally:
        t.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path):
    # an answer of up to 4000 tokens (seconds, even for the demo model on a busy machine), so the
    # Ctrl-C lands while it runs
    t = Tmux(f"env HOME={tmp_path} {sys.executable} -m glmcpu run --temp 0 --max-tokens 4000 --ctx 4096 "
             "--ignore-eos --threads 1; echo EXITED $?; sleep 30")
    status = STATUS.replace("/512", "/4096")
    try:
        t.wait(r"/help for commands.*\n>")
        t.keys("Sing", "Enter")
        t.wait(r"Sing\n\S+")                     # the answer has begun
        t.keys("C-c")
        s = t.wait(status + r".*stopped.*\n>")
        assert int(re.search(status, s).group(1)) < 4000
        t.keys("C-d")
        t.wait("EXITED 0")
    finally:
        t.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_a_chat_past_its_context_computes_only_the_new_turn(tmp_path):
    """Old turns dropped to fit --ctx: the turns after them keep their cache (moved, keys
    re-rotated), so the status line shows a prompt mostly cached, not the conversation again."""
    cmd = (f"{sys.executable} -m glmcpu run --temp 0 --max-tokens 12 --ignore-eos --threads 1 --ctx 192; "
           "echo EXITED $?; sleep 30")
    t = Tmux(f"env HOME={tmp_path} {cmd}")
    pattern = r"dropped\.[^>]*?prompt (\d+) \((\d+) cached\)[^\n]*\n>"
    try:
        t.wait(r"/help for commands.*\n>")
        for i in range(12):
            t.keys(f"Tell me of the kings of Israel and Judah, the {i}th time, and of all their wars", "Enter")
            s = t.wait(rf"the {i}th time, and of all their wars\n.*" + DONE.replace("/512", "/192"))
            m = re.search(rf"the {i}th time, and of all their wars\n.*" + pattern, s, re.S)
            if m:
                break
        assert m, "the conversation never outgrew its context"
        prompt, cached = int(m.group(1)), int(m.group(2))
        print(f"turn {i}: prompt {prompt}, {cached} cached")
        assert cached > prompt - 40, (prompt, cached)      # the new message and its template tokens
        t.keys("/exit", "Enter")
        t.wait("EXITED 0")
    finally:
        t.close()
