"""The command line: one-shot run, stdin prompts, the chat loop, info, convert, the demo model."""
import os
import re
import subprocess
import sys

import pytest

import glmcpu
from glmcpu import cli, hub
from conftest import run_cli


def test_demo_model_writes_english():
    path = hub.demo_path()
    assert os.path.exists(path), "the built-in demo model is missing from the package"
    assert os.path.getsize(path) < 32 * 2**20
    p = run_cli("run", "-p", "Once upon a time", "--max-tokens", "24", "--seed", "1")
    assert p.returncode == 0, p.stderr
    words = re.findall(r"[A-Za-z]+", p.stdout)
    common = {"the", "and", "of", "to", "that", "he", "his", "in", "unto", "a", "i", "they", "is",
              "was", "for", "shall", "be", "with", "not", "them", "him", "it", "all", "lord", "said"}
    assert len(words) >= 8 and sum(w.lower() in common for w in words) >= 3, p.stdout
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: \d+ tokens, [\d.]+ tok/s", p.stderr)


def test_stdin_prompt_and_greedy_is_repeatable(tiny):
    _, path, _ = tiny("glm4", "q8_0")
    a = run_cli("run", path, "--temperature", "0", "-n", "8", "--ignore-eos", stdin="The quick")
    b = run_cli("run", path, "-p", "The quick", "--temperature", "0", "-n", "8", "--ignore-eos")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_chat_loop(tiny, monkeypatch, capsys, tmp_path):
    _, path, _ = tiny("glm4", "q8_0")
    lines = iter(["hello there", "", "/stats", "and again"])

    class Session:                      # prompt_toolkit's, typed into
        def __init__(self, **kw):
            pass

        def prompt(self, prompt=""):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None
    monkeypatch.setattr("prompt_toolkit.PromptSession", Session)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    real_chat = glmcpu.Model.chat

    def spy(self, messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(self, messages, **kw)
    monkeypatch.setattr(glmcpu.Model, "chat", spy)
    assert cli.main(["run", path, "-n", "4", "--seed", "0", "--ignore-eos"]) == 0
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]   # history kept
    assert seen[1][2]["content"] == "and again"
    out = capsys.readouterr().out
    assert out.count("tok/s") == 2 and "expert statistics: this model has no experts" in out


def test_info(tiny):
    _, path, _ = tiny("glm", "q8_0")
    p = run_cli("info", path, "--threads", "3")
    assert p.returncode == 0, p.stderr
    for word in ("chatglm", "Q8_0", "KV cache", "kernels", glmcpu.ops.VARIANT):
        assert word in p.stdout
    assert re.search(r"threads\s+3", p.stdout)


def test_convert_command(tiny, tmp_path):
    model, _, hf = tiny("glm", "f32")
    out = tmp_path / "cli.gguf"
    p = run_cli("convert", hf, "-o", str(out), "--type", "q4_0", "--quiet")
    assert p.returncode == 0, p.stderr
    m = glmcpu.load(str(out))
    types = {t.name: t.tensor_type.name for t in m.file.tensors.values()}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.bias"] == "F32"
    assert m.tokenizer.chat_template.startswith("[gMASK]<sop>")
    bad = run_cli("convert", str(tmp_path), "-o", str(tmp_path / "x.gguf"))
    assert bad.returncode == 1 and "config.json" in bad.stderr


def test_python_api_generate_and_stats(tiny):
    _, path, _ = tiny("glm4", "q8_0")
    m = glmcpu.load(path, threads=1, ctx=64)
    text = "".join(m.chat([{"role": "user", "content": "hi"}], max_tokens=5, seed=3, ignore_eos=True))
    assert isinstance(text, str) and set(m.last_stats) == {"prompt_tokens", "cached_tokens", "prompt_seconds",
                                                           "gen_tokens", "gen_seconds"}
    assert m.last_stats["gen_tokens"] == 5


def test_kernel_variant_forced_by_environment(tiny):
    _, path, _ = tiny("glm4", "q8_0")
    env = dict(os.environ, GLMCPU_KERNELS="generic")
    p = subprocess.run([sys.executable, "-m", "glmcpu", "info", path], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0 and re.search(r"kernels\s+generic", p.stdout)
    env["GLMCPU_KERNELS"] = "sse9"
    p = subprocess.run([sys.executable, "-m", "glmcpu", "info", path], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("glmcpu: error:") and "sse9" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_slow_steps_draw_a_bar_on_a_terminal_only(monkeypatch, capsys):
    from glmcpu.cli import StepBar

    quick = StepBar("loading: layers", after=60)
    for i in range(1, 4):
        quick(i, 3)
    assert quick.bar is None                       # finished before `after`: nothing drawn
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    piped = StepBar("loading: layers", after=0)
    piped(1, 3)
    assert piped.bar is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    slow = StepBar("reading the prompt: tokens", after=0)
    slow(256, 1024)
    assert slow.bar is not None and slow.bar.live.is_started
    slow(1024, 1024)
    assert not slow.bar.live.is_started            # stopped (and, being transient, wiped) at the end


def test_python_api_takes_the_names_the_cli_takes_and_documents_itself():
    assert "load" in dir(glmcpu) and "Model" in dir(glmcpu)
    m = glmcpu.load("demo", threads=1)
    assert m.cfg.n_layer == 4
    doc = glmcpu.load.__doc__
    for word in ("path", "threads", "ctx", "mlock", "workers", "progress", '"demo"'):
        assert word in doc, word


def test_run_help_states_every_sampling_option_and_default():
    import argparse
    p = argparse.ArgumentParser()
    cli.add_sampling(p)
    for action in p._actions:
        if action.dest in ("help", "ignore_eos"):
            continue
        assert action.help and "default" in action.help, action.dest


def test_chat_answer_does_not_start_with_the_template_newline(monkeypatch):
    m = glmcpu.load("demo", threads=1)
    monkeypatch.setattr(m, "generate", lambda prompt, **kw: iter(["\n", "\nHi", " there\n"]))
    assert list(m.chat([{"role": "user", "content": "Hello"}])) == ["Hi", " there\n"]


def test_list_fits_80_columns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLMCPU_MODELS", str(tmp_path))
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "glm-4.5-air" in out and "glm4moe" in out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    assert cli.main(["list", "--long"]) == 0
    assert "bartowski" in capsys.readouterr().out


def test_an_unexpected_exception_is_one_line(monkeypatch, capsys):
    def boom(a):
        raise ZeroDivisionError("float division by zero\nsecond line")
    monkeypatch.setattr(cli, "cmd_list", boom)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "list"])


def test_info_says_why_no_gpu_is_used_or_what_would_fit():
    p = run_cli("info")
    assert p.returncode == 0, p.stderr
    row = next(l for l in p.stdout.splitlines() if l.strip().startswith("GPU "))
    from glmcpu.gpu import available
    ok, why = available()
    assert (not ok and "none used: " + why.split(" (")[0] in row) or (ok and "would fit" in p.stdout), row
