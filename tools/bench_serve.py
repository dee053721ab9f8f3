#!/usr/bin/env python3
"""Aggregate decode throughput of `glmcpu serve --parallel P` with 1, 2, 4, 8... concurrent clients.

    python tools/bench_serve.py model.gguf --threads 2 --clients 1,2,4,8 --runs 3 --prompt 32 --gen 32

One server process serves every run (`--draft none`, a context of prompt + gen + 512). After a
short warm-up request, each run sends, for each client count in turn (1,2,4,8,1,2,4,8,...: the
counts alternate, as this machine's memory bandwidth drifts over minutes), that many streaming
/v1/completions requests at once: --prompt random token ids (a different first id for every
request, so no kept prompt cache is reused), max_tokens --gen, ignore_eos, temperature 0.

Aggregate decode tok/s, per run: the clients' common decode window runs from the latest first
token to the earliest last token. In it every stream is decoding (every prompt is read, none has
ended), so each forward pass carries one token for each client: the sum of the clients' rates
in that window is the server's throughput with N streams, without the prefill of late joiners or
the tail where fewer streams remain (a plain sum of tokens over wall time would count those as
decode time). A client's rate is its tokens between its first and last event in the window over
the time between them (its stream's events are its tokens, as they arrived; a token that ends
mid-character is sent with the next, so event counts are scaled by the request's
completion_tokens). A run whose window is too short for two events of every client (a straggler
that started after another had ended: the tiny demo model answers in milliseconds) has no
figure, and the table says how many runs were skipped. The table gives medians over runs,
per-client = aggregate / N, the ratio to one client's median, and the median time to first
token over all requests of that count.

tokens/pass is the sanity column from /metrics: glmcpu_step_tokens_total / glmcpu_steps_total
over that count's requests (prompt chunks included), and in brackets the decode tokens alone
per pass (step tokens less glmcpu_prompt_tokens_total): about N, a little less (the pass that
reads the prompts has none)."""
import argparse
import datetime
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)             # this checkout's glmcpu, here and in the server

from glmcpu import ops                  # noqa: E402
from glmcpu.gguf import GGUFFile        # noqa: E402

METRICS = ("steps_total", "step_tokens_total", "prompt_tokens_total")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(("model name", "Model")))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def median(xs):
    xs = [x for x in xs if x == x]       # not nan
    return statistics.median(xs) if xs else float("nan")


def start_server(a, parallel):
    cmd = [sys.executable, "-m", "glmcpu", "serve", a.model, "--port", "0", "--threads", str(a.threads),
           "--parallel", str(parallel), "--ctx", str(a.prompt + a.gen + 512), "--draft", "none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)    # its notes: our stderr
    line = proc.stdout.readline()
    m = re.search(r"at (http://\S+) ", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip() or proc.wait()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()     # never let its pipe fill
    url = m.group(1)
    for _ in range(600):
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server never answered /health")


def metrics(url) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {k: float(m.group(1)) if (m := re.search(rf"^glmcpu_{k} (\S+)$", text, re.M)) else 0.0
            for k in METRICS}


def complete(url, ids, gen, out, barrier=None):
    """One streaming request; fills out with the send time, each text event's time and the
    completion_tokens of its usage."""
    host = url.split("//", 1)[1]
    body = json.dumps({"prompt": ids, "max_tokens": gen, "ignore_eos": True, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, timeout=600)
    if barrier:
        barrier.wait()
    out["sent"], out["events"] = time.perf_counter(), []
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    for line in r:
        if not line.startswith(b"data: {"):
            continue
        now, chunk = time.perf_counter(), json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            out["events"].append(now)
        if chunk.get("usage"):
            out["tokens"] = chunk["usage"]["completion_tokens"]
    conn.close()


def one_count(url, prompts, gen):
    """The prompts sent at once: (aggregate decode tok/s, [time to first token of each])."""
    n = len(prompts)
    outs, errors = [{} for _ in range(n)], []
    barrier = threading.Barrier(n)

    def client(i):
        try:
            complete(url, prompts[i], gen, outs[i], barrier)
        except Exception as e:     # noqa: BLE001 -- reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{n} clients: {errors[0]}")
    start, end = max(o["events"][0] for o in outs), min(o["events"][-1] for o in outs)
    total = 0.0
    for o in outs:
        ev = o["events"]
        inside = [t for t in ev if start <= t <= end]
        if len(inside) < 2 or len(ev) < 2:
            return float("nan"), [o["events"][0] - o["sent"] for o in outs]
        per_event = (o.get("tokens", len(ev)) - 1) / (len(ev) - 1)
        total += (len(inside) - 1) * per_event / (inside[-1] - inside[0])
    return total, [o["events"][0] - o["sent"] for o in outs]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .gguf file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--gen", type=int, default=32, help="generated tokens per request")
    p.add_argument("--parallel", type=int, help="server slots (default: the largest client count)")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    counts = [int(c) for c in a.clients.split(",")]
    parallel = a.parallel or max(counts)
    vocab = min(len(GGUFFile(a.model).get("tokenizer.ggml.tokens")), 100000)
    rng = random.Random(0)
    firsts = iter(rng.sample(range(vocab), min(vocab, 1 + a.runs * sum(counts))))

    def prompt(length):         # random ids; the first differs from every other prompt's
        return [next(firsts)] + [rng.randrange(vocab) for _ in range(length - 1)]

    res = {n: {"agg": [], "ttft": [], "steps": 0.0, "step_tokens": 0.0, "prompt_tokens": 0.0} for n in counts}
    proc, url = start_server(a, parallel)
    try:
        complete(url, prompt(8), 4, {})    # warm-up
        for run in range(a.runs):
            for n in counts:
                before = metrics(url)
                agg, ttft = one_count(url, [prompt(a.prompt) for _ in range(n)], a.gen)
                after = metrics(url)
                r = res[n]
                r["agg"].append(agg)
                r["ttft"] += ttft
                for k in METRICS:
                    r[k.removesuffix("_total")] += after[k] - before[k]
                print(f"run {run + 1}/{a.runs}, {n} client{'s' * (n > 1)}: {agg:.1f} tok/s", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"{a.model}: {a.threads} threads, --parallel {parallel}, prompt {a.prompt}, gen {a.gen}, "
          f"{a.runs} runs; CPU: {cpu_name()}; glmcpu kernels: {ops.VARIANT}; {date}\n")
    print("| clients | aggregate decode tok/s | per-client tok/s | x one client | TTFT median | tokens/pass |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = median(res[1]["agg"]) if 1 in res else float("nan")
    for n in counts:
        r = res[n]
        r["median"] = med = median(r["agg"])
        skipped = sum(x != x for x in r["agg"])
        r["ttft_median"] = statistics.median(r["ttft"])
        steps = r["steps"]
        tpp = (f"{r['step_tokens'] / steps:.2f} ({(r['step_tokens'] - r['prompt_tokens']) / steps:.2f})"
               if steps else "-")
        note = f" ({skipped} of {a.runs} runs had no common window)" if skipped else ""
        print(f"| {n} | {med:.1f}{note} | {med / n:.1f} | {med / base:.2f}x | {r['ttft_median'] * 1000:.0f} ms | {tpp} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "threads": a.threads, "parallel": parallel, "prompt": a.prompt,
                       "gen": a.gen, "cpu": cpu_name(), "kernels": ops.VARIANT, "date": date,
                       "results": {str(n): r for n, r in res.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
