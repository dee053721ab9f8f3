#!/usr/bin/env python3
"""Decode and prefill speed of glmcpu and (when llama-cpp-python is installed) llama.cpp on the
same GGUF file and thread count: alternating runs, medians, and the ratio.

    python tools/bench.py model.gguf --threads 2 --runs 5

Both engines see the same token ids: a prompt of --prompt random ids, then --gen fixed ids fed
one at a time (no sampling, so only the engines are timed). This machine's memory bandwidth
drifts over minutes: only the ratio within one run means much.

The output names the CPU, glmcpu's kernel variant (GLMCPU_KERNELS=avx2 forces the AVX2 one) and
the instruction sets llama.cpp was built for. To compare against another llama.cpp build, point
llama-cpp-python at its libraries: LLAMA_CPP_LIB_PATH=/path/to/llama_cpp/lib.

--busy N runs N busy-loop processes beside the engines (a loaded machine); --sampling adds
glmcpu's generate() with its default sampling against greedy, on the same prompt.

--depth 4096,16384 (like `llama-bench -d`): at each depth, a cache is filled once with that many
random ids (not timed), then every run restores it and times a --prompt-token prefill and --gen
decoded tokens after it. llama.cpp runs with flash attention and each --llama-kv cache type
(f16, q8_0, bf16; restored with save_state/load_state); glmcpu with each --kv-type (f32, f16,
bf16, q8_0). Each line gives the fill's speed (a depth-token prompt from an empty cache), the
prefill and decode after it, and the decode as a share of the read bandwidth: the bytes of
weights plus the KV cache of that type that each token reads.

--apart DIR keeps each engine in a process of its own and its fills in DIR; --tile then makes a
missing depth by repeating a kept fill of a depth that divides it (32768 from 16384: a 32k fill
of a 9-layer Air file takes llama.cpp over an hour on 2 cores). Neither engine's work depends on
the cached values, so the timing is a real cache's; the line says "tiled from" in place of the
fill speed."""
import argparse
import os
import statistics
import sys
import time

import numpy as np


class GlmcpuEngine:
    name = "glmcpu"

    def __init__(self, path, threads, n_ctx, kv_type=None, model=None):
        import glmcpu
        self.m = model or glmcpu.load(path, threads=threads, ctx=n_ctx, draft="none")
        self.n_ctx, self.kv_type = n_ctx, kv_type or self.m.kv_type[0]
        if kv_type:
            self.name = f"glmcpu {kv_type}"
        self.filled = None

    def new_cache(self):
        self.m.net.kv_type = (self.kv_type, self.kv_type)      # engines of several types share a model
        return self.m.net.new_cache(self.n_ctx)

    def fill(self, ids):
        """A cache holding ids (restored by each run below)."""
        from glmcpu.generate import prefill
        self.filled = self.new_cache()
        prefill(self.m.net, self.filled, ids)
        self.depth = len(ids)

    def run(self, prompt, gen):
        from glmcpu.generate import prefill
        net = self.m.net
        if self.filled is None:
            cache = self.new_cache()
        else:                      # later positions are simply written again: restoring is free
            cache = self.filled
            cache.pos, cache.tokens = self.depth, cache.tokens[:self.depth]
        t0 = time.perf_counter()
        prefill(net, cache, prompt)
        t1 = time.perf_counter()
        for tok in gen:
            net.forward([tok], cache)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class LlamaCppEngine:
    name = "llama.cpp"
    TYPES = {"f16": 1, "q8_0": 8, "bf16": 30}        # ggml type ids of its KV caches
    N_BATCH = 512

    def __init__(self, path, threads, n_ctx, kv_type=None):
        self.kv_type = kv_type or "f16"
        from llama_cpp import Llama
        kw = {} if kv_type is None else dict(flash_attn=True, type_k=self.TYPES[kv_type], type_v=self.TYPES[kv_type])
        if kv_type is not None:
            self.name = f"llama.cpp {kv_type}"
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=self.N_BATCH, n_ubatch=self.N_BATCH, verbose=False, **kw)
        self.state = None

    def fill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        self.state = self.llm.save_state()

    def run(self, prompt, gen):
        if self.state is None:
            self.llm.reset()
        else:
            self.llm.load_state(self.state)
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        for tok in gen:
            self.llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads: everything but the embedding table (one row)
    and the MTP block; routed experts count at n_used / n_expert."""
    import re
    c, total = model.cfg, 0
    for name, t in model.file.tensors.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if (m and int(m.group(1)) >= c.n_layer) or (name == "token_embd.weight" and "output.weight" in model.file.tensors):
            continue
        total += t.n_bytes * (c.n_expert_used / c.n_expert if "_exps." in name else 1)
    return int(total)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def llama_isa() -> str:
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode()
    on = [kv.split("=")[0].strip() for kv in info.replace("CPU :", "|").split("|") if kv.strip().endswith("= 1")]
    return " ".join(x for x in on if x.startswith(("AVX", "FMA", "F16C", "NEON", "AMX")))


def busy_loops(n):
    """n processes spinning on a core each, until killed."""
    import subprocess
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def sampling_speed(m, prompt, n, runs):
    """Decode tok/s of generate()'s loop (generate_ids, what Model.generate runs) with the default
    sampling and greedy: two loops over their own caches, stepped a token each in turn, so the
    host's bandwidth swings fall on both alike. Medians over runs."""
    from glmcpu.generate import generate_ids
    from glmcpu.sampling import Sampler
    out = {"default sampling": [], "greedy": []}
    for r in range(runs):
        stats = {"default sampling": {}, "greedy": {}}
        loops = {name: generate_ids(m.net, m.net.new_cache(len(prompt) + n + 1), prompt,
                                    Sampler(seed=r) if name == "default sampling" else Sampler(temperature=0),
                                    n, set(), stats[name])
                 for name in (("default sampling", "greedy") if r % 2 == 0 else ("greedy", "default sampling"))}
        for name in loops:                               # prompts and first tokens, not timed below
            next(loops[name])
            stats[name]["gen_seconds"] = 0.0
        for _ in range(n - 1):
            for name, loop in loops.items():
                next(loop)
        for name in loops:
            out[name].append((n - 1) / stats[name]["gen_seconds"])
    return {k: statistics.median(v) for k, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    p.add_argument("--gen", type=int, default=32, help="decoded tokens")
    p.add_argument("--no-llama", action="store_true", help="glmcpu only")
    p.add_argument("--no-membw", action="store_true", help="skip the memory bandwidth measurement")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes to run beside the engines")
    p.add_argument("--sampling", action="store_true", help="also time generate() sampled vs greedy")
    p.add_argument("--depth", default="", help="comma-separated context depths to time at (see above)")
    p.add_argument("--kv-type", default="f32,f16", help="glmcpu KV cache types at --depth")
    p.add_argument("--llama-kv", default="f16,q8_0", help="llama.cpp KV cache types at --depth (flash attention on)")
    p.add_argument("--apart", metavar="DIR", default=None,
                   help="--depth with each engine in a process of its own, one at a time, fills kept in DIR")
    p.add_argument("--tile", action="store_true",
                   help="--apart: a depth with no kept fill repeats a kept fill of a depth dividing it "
                        "(for timing only: neither engine's work depends on the cached values)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return depth_child(a)
    busy = busy_loops(a.busy)
    try:
        run_apart(a) if a.apart else run_depths(a) if a.depth else run(a)
    finally:
        for b in busy:
            b.kill()


def run(a):
    from membw import read_bandwidth
    bw = [] if a.no_membw else [read_bandwidth(a.threads)]

    engines = [GlmcpuEngine(a.model, a.threads, a.prompt + a.gen + 8)]
    if not a.no_llama:
        try:
            engines.append(LlamaCppEngine(a.model, a.threads, a.prompt + a.gen + 8))
        except ImportError:
            print("llama-cpp-python is not installed: glmcpu only", file=sys.stderr)
    n_vocab = engines[0].m.cfg.n_vocab
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(0, min(n_vocab, 100000), a.prompt)]
    gen = [int(i) for i in rng.integers(0, min(n_vocab, 100000), a.gen)]
    for e in engines:                                  # warm-up: page the weights in
        e.run(prompt[:8], gen[:2])
    times = {e.name: ([], []) for e in engines}
    for r in range(a.runs):
        for e in (engines if r % 2 == 0 else engines[::-1]):   # alternate who goes first
            tp, tg = e.run(prompt, gen)
            times[e.name][0].append(a.prompt / tp)
            times[e.name][1].append(a.gen / tg)
            print(f"run {r + 1}: {e.name:<10} prefill {a.prompt / tp:8.1f} tok/s   decode {a.gen / tg:7.2f} tok/s",
                  file=sys.stderr)
    print(f"\n{os.path.basename(a.model)}, {a.threads} threads, {a.runs} runs, medians, "
          f"prompt {a.prompt} / decode {a.gen} tokens" + (f", {a.busy} busy processes beside" if a.busy else ""))
    print(f"  CPU: {cpu_name()}; glmcpu kernels: {__import__('glmcpu').ops.VARIANT}"
          + (f"; llama.cpp built for: {llama_isa()}" if len(engines) > 1 else ""))
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in times.items()}
    if not a.no_membw:
        bw.append(read_bandwidth(a.threads))
    per_tok = bytes_per_token(engines[0].m)
    for k, (pp, tg) in med.items():
        line = f"  {k:<10} prefill {pp:8.1f} tok/s   decode {tg:7.2f} tok/s"
        if bw:
            gbs = per_tok * tg / 1e9
            line += f"   = {gbs:5.1f} GB/s of weights, {gbs / statistics.mean(bw):.0%} of the read bandwidth"
        print(line)
    if bw:
        print(f"  read bandwidth (tools/membw.py, before/after): {' / '.join(f'{b:.1f}' for b in bw)} GB/s; "
              f"{per_tok / 1e9:.2f} GB of weights per token")
    if "llama.cpp" in med:
        g, l = med["glmcpu"], med["llama.cpp"]
        print(f"  glmcpu / llama.cpp: prefill {g[0] / l[0]:.2f}x   decode {g[1] / l[1]:.2f}x")
    if a.sampling:
        sp = sampling_speed(engines[0].m, prompt[:16], a.gen + 1, a.runs)
        print(f"  glmcpu generate(): default sampling {sp['default sampling']:.2f} tok/s, greedy "
              f"{sp['greedy']:.2f} tok/s ({sp['default sampling'] / sp['greedy']:.3f}x)")


def run_depths(a):
    """Prefill and decode after a cache filled to each depth, every engine and KV type alternating."""
    import glmcpu
    from membw import read_bandwidth
    depths = [int(d) for d in a.depth.split(",")]
    n_ctx = max(depths) + a.prompt + a.gen + 8
    m = glmcpu.load(a.model, threads=a.threads, ctx=n_ctx, draft="none")
    bw = [] if a.no_membw else [read_bandwidth(a.threads)]
    weights = bytes_per_token(m)
    engines = [GlmcpuEngine(a.model, a.threads, n_ctx, t, model=m) for t in a.kv_type.split(",") if t]
    if not a.no_llama:
        try:
            engines += [LlamaCppEngine(a.model, a.threads, n_ctx, t) for t in a.llama_kv.split(",") if t]
        except ImportError:
            print("llama-cpp-python is not installed: glmcpu only", file=sys.stderr)
    rng = np.random.default_rng(0)
    vocab = min(m.cfg.n_vocab, 100000)
    prompt = [int(i) for i in rng.integers(0, vocab, a.prompt)]
    gen = [int(i) for i in rng.integers(0, vocab, a.gen)]
    print(f"{os.path.basename(a.model)}, {a.threads} threads, {a.runs} runs, medians; at each depth a "
          f"{a.prompt}-token prefill, then {a.gen} decoded tokens")
    print(f"  CPU: {cpu_name()}; glmcpu kernels: {glmcpu.ops.VARIANT}"
          + (f"; llama.cpp built for: {llama_isa()}" if any(isinstance(e, LlamaCppEngine) for e in engines) else ""))
    for depth in depths:
        fill = [int(i) for i in rng.integers(0, vocab, depth)]
        times, filled = {}, {}
        for e in engines:
            t = time.perf_counter()
            e.fill(fill)
            filled[e.name] = time.perf_counter() - t
            print(f"depth {depth}: {e.name} filled in {filled[e.name]:.0f} s", file=sys.stderr)
            times[e.name] = ([], [])
        for r in range(a.runs):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                tp, tg = e.run(prompt, gen)
                times[e.name][0].append(a.prompt / tp)
                times[e.name][1].append(a.gen / tg)
                print(f"depth {depth} run {r + 1}: {e.name:<16} prefill {a.prompt / tp:8.1f}   decode {a.gen / tg:7.2f}",
                      file=sys.stderr)
        for e in engines:                        # one filled cache at a time
            e.filled = e.state = None
        if not a.no_membw:
            bw.append(read_bandwidth(a.threads))
        print(f"  depth {depth} (the fill: a {depth}-token prompt from an empty cache, in {a.prompt}-token "
              f"batches for llama.cpp, 256 for glmcpu):")
        for e in engines:
            pp, tg = (statistics.median(x) for x in times[e.name])
            kv = m.cfg.kv_bytes(depth + a.prompt + a.gen // 2, (e.kv_type,) * 2)     # read per decoded token
            line = (f"    {e.name:<16} fill {depth / filled[e.name]:7.1f} tok/s   prefill {pp:8.1f} tok/s   "
                    f"decode {tg:7.2f} tok/s")
            if bw:
                gbs = (weights + kv) * tg / 1e9
                line += (f" = {gbs:5.1f} GB/s of weights + KV ({kv / 1e9:.2f} GB {e.kv_type}), "
                         f"{gbs / statistics.mean(bw):.0%} of the read bandwidth")
            print(line)
        if bw:
            print(f"    read bandwidth (tools/membw.py, before/after): {' / '.join(f'{b:.1f}' for b in bw[-2:])} GB/s; "
                  f"{weights / 1e9:.2f} GB of weights per token")
        sys.stdout.flush()


def depth_ids(vocab, n_prompt, n_gen, depth):
    """run_depths' ids: the prompt, the decoded tokens, then the fill of that depth."""
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(0, vocab, n_prompt)]
    gen = [int(i) for i in rng.integers(0, vocab, n_gen)]
    return prompt, gen, [int(i) for i in np.random.default_rng(depth).integers(0, vocab, depth)]


def depth_child(a):
    """One engine of --apart in this process: fill (saving it) or restore, then one timed run.
    Prints one JSON line."""
    import json
    import pickle
    c = json.loads(a.child)
    engine, kv, depth, state = c["engine"], c["kv"], c["depth"], c["state"]
    n_ctx = depth + a.prompt + a.gen + 8
    if engine == "glmcpu":
        e = GlmcpuEngine(a.model, a.threads, n_ctx, kv)
        vocab = min(e.m.cfg.n_vocab, 100000)
    else:
        e = LlamaCppEngine(a.model, a.threads, n_ctx, kv)
        vocab = min(e.llm.n_vocab(), 100000)
    prompt, gen, fill = depth_ids(vocab, a.prompt, a.gen, depth)
    out = {}
    if not os.path.exists(state):
        t = time.perf_counter()
        e.fill(fill)
        out["fill_s"] = time.perf_counter() - t
        with open(state + ".tmp", "wb") as f:
            if engine == "glmcpu":
                pickle.dump((e.filled.k[:, :, :depth], e.filled.v[:, :, :depth], depth), f, protocol=5)
            else:
                pickle.dump(e.state, f, protocol=5)
        os.replace(state + ".tmp", state)
    else:
        with open(state, "rb") as f:
            saved = pickle.load(f)
        if engine == "glmcpu":
            from glmcpu import ops
            k, v, n = saved
            e.filled = e.new_cache()
            for dst, src in ((e.filled.k, k), (e.filled.v, v)):
                if src.dtype == dst.dtype:
                    dst[:, :, :n] = src
                else:                                # a cache of another type: its values in this one
                    src_t = next(t for t, d in ops.KV_DTYPES.items() if d == src.dtype)
                    for l in range(dst.shape[0]):
                        dst[l, :, :n] = ops.kv_encode(ops.kv_decode(src[l], src_t), kv)
            e.filled.pos, e.filled.tokens, e.depth = n, list(fill), n
        else:
            e.state = saved
        e.run(prompt[:8], gen[:2])                  # warm-up: weights paged in
        tp, tg = e.run(prompt, gen)
        out.update(prefill=a.prompt / tp, decode=a.gen / tg)
    print(json.dumps(out), flush=True)


def tile_llama_state(blob: bytes, m: int) -> bytes:
    """llama.cpp's state (as llama-cpp-python 0.3.36 saves it: the architecture's name, then the
    KV cache: streams, cells as (position, seq-id count, seq ids), then each layer's K rows and each
    layer's V rows, untransposed under flash attention) with its cells repeated m times, positions
    running on. ValueError where the bytes are not laid out so (the layout is checked to the byte)."""
    import struct
    (n,) = struct.unpack_from("<I", blob, 0)
    o = 4 + n
    head = blob[:o]
    streams, cells = struct.unpack_from("<II", blob, o)
    o += 8
    meta = np.frombuffer(blob, np.int32, 3 * cells, o).reshape(cells, 3)
    if streams != 1 or not (meta[:, 1] == 1).all() or not (meta[:, 0] == np.arange(cells)).all():
        raise ValueError("not one sequence of cells at positions 0..n-1")
    o += meta.nbytes
    v_trans, layers = struct.unpack_from("<II", blob, o)
    if v_trans:
        raise ValueError("a transposed V cache (flash attention off)")
    out = [head, struct.pack("<II", 1, cells * m)]
    new_meta = np.empty((cells * m, 3), np.int32)
    new_meta[:, 0], new_meta[:, 1], new_meta[:, 2] = np.arange(cells * m), 1, meta[0, 2]
    out += [new_meta.tobytes(), blob[o:o + 8]]
    o += 8
    for _ in range(2 * layers):                         # K of every layer, then V of every layer
        (row,) = struct.unpack_from("<Q", blob, o + 4)   # after the layer's ggml type
        out.append(blob[o:o + 12])
        o += 12
        out.append(blob[o:o + cells * row] * m)
        o += cells * row
    if o != len(blob):
        raise ValueError(f"the state is {len(blob) - o:+d} bytes off the layout this reads")
    return b"".join(out)


def tile_state(src, dst, engine, m, n_ctx):
    """A kept fill repeated m times along the positions (a deeper cache for timing: neither
    engine's work depends on the cached values)."""
    import pickle
    with open(src, "rb") as f:
        saved = pickle.load(f)
    if engine == "glmcpu":
        k, v, n = saved
        tiled = (np.concatenate([k] * m, axis=2), np.concatenate([v] * m, axis=2), n * m)
    else:
        from llama_cpp.llama import LlamaState
        blob = tile_llama_state(saved.llama_state, m)
        n = saved.n_tokens * m
        ids = np.zeros(max(n_ctx, n), saved.input_ids.dtype)
        ids[:n] = np.tile(saved.input_ids[:saved.n_tokens], m)
        # llama-cpp-python keeps the logits of min(tokens, its batch) rows; a run evaluates before it reads them
        scores = np.zeros((min(n, LlamaCppEngine.N_BATCH, n_ctx), saved.scores.shape[1]), saved.scores.dtype)
        tiled = LlamaState(input_ids=ids, scores=scores, n_tokens=n,
                           llama_state=blob, llama_state_size=len(blob), seed=saved.seed)
    with open(dst + ".tmp", "wb") as f:
        pickle.dump(tiled, f, protocol=5)
    os.replace(dst + ".tmp", dst)


def run_apart(a):
    """--apart DIR: every engine in a process of its own, one at a time (a file too big for two
    engines' copies of its weights in RAM). A depth is filled once per engine and KV type and
    kept in DIR (later runs and invocations restore it; glmcpu's other KV types are converted
    from its first type's fill: the values differ, the work does not); the runs alternate
    engines, a fresh process each."""
    import json
    import subprocess
    from glmcpu.gguf import GGUFFile
    from glmcpu.models import model_class
    from membw import read_bandwidth
    f = GGUFFile(a.model)
    cfg = model_class(f.arch).config_class.from_gguf(f)
    from types import SimpleNamespace
    weights = bytes_per_token(SimpleNamespace(cfg=cfg, file=f))
    os.makedirs(a.apart, exist_ok=True)
    tag = os.path.basename(a.model)
    engines = [("glmcpu", t) for t in a.kv_type.split(",") if t]
    if not a.no_llama:
        engines += [("llama", t) for t in a.llama_kv.split(",") if t]

    def child(engine, kv, depth, state):
        spec = json.dumps({"engine": engine, "kv": kv, "depth": depth, "state": state})
        p = subprocess.run([sys.executable, __file__, a.model, "--threads", str(a.threads), "--prompt", str(a.prompt),
                            "--gen", str(a.gen), "--child", spec], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{engine} {kv}: {p.stderr.strip().splitlines()[-1:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    print(f"{tag}, {a.threads} threads, {a.runs} runs, medians; each engine in a process of its own, one at a "
          f"time; at each depth a {a.prompt}-token prefill, then {a.gen} decoded tokens", flush=True)
    for depth in [int(d) for d in a.depth.split(",")]:
        fills, times = {}, {e: ([], []) for e in engines}
        first = a.kv_type.split(",")[0]
        for engine, kv in engines:
            name = f"{engine}-{first if engine == 'glmcpu' else kv}-{depth}"
            state = os.path.join(a.apart, f"{tag}.{name}.state")
            side = state + ".json"
            stem = os.path.join(a.apart, f"{tag}.{name.rsplit('-', 1)[0]}")       # + "-{depth}.state"
            if a.tile and not os.path.exists(state):
                kept = [d for d in range(depth // 2, 0, -1) if depth % d == 0 and os.path.exists(f"{stem}-{d}.state")]
                if kept:
                    tile_state(f"{stem}-{kept[0]}.state", state, engine, depth // kept[0], depth + a.prompt + a.gen + 8)
                    with open(side, "w") as fh:
                        json.dump({"fill_s": None, "tiled_from": kept[0]}, fh)
            if not os.path.exists(state):
                r = child(engine, first if engine == "glmcpu" else kv, depth, state)
                with open(side, "w") as fh:
                    json.dump(r, fh)
            with open(side) as fh:
                side_info = json.load(fh)
            fills[name] = (f"fill {depth / side_info['fill_s']:7.1f} tok/s ({side_info['fill_s']:.0f} s)" if side_info["fill_s"]
                           else f"(tiled from {side_info['tiled_from']})")
            print(f"depth {depth}: {name} {fills[name]}", file=sys.stderr, flush=True)
        bw = [] if a.no_membw else [read_bandwidth(a.threads)]
        for r in range(a.runs):
            for engine, kv in (engines if r % 2 == 0 else engines[::-1]):
                state = os.path.join(a.apart, f"{tag}.{engine}-{first if engine == 'glmcpu' else kv}-{depth}.state")
                res = child(engine, kv, depth, state)
                times[(engine, kv)][0].append(res["prefill"])
                times[(engine, kv)][1].append(res["decode"])
                print(f"depth {depth} run {r + 1}: {engine} {kv:<5} prefill {res['prefill']:8.1f}   "
                      f"decode {res['decode']:7.2f}", file=sys.stderr, flush=True)
        if not a.no_membw:
            bw.append(read_bandwidth(a.threads))
        print(f"  CPU: {cpu_name()}; glmcpu kernels: {__import__('glmcpu').ops.VARIANT}"
              + ("" if a.no_llama else f"; llama.cpp built for: {llama_isa()}"))
        print(f"  depth {depth} (fill: a {depth}-token prompt from an empty cache, or a kept fill tiled; "
              f"glmcpu's in its first KV type):")
        for (engine, kv), (pp, tg) in times.items():
            name = f"{engine}-{first if engine == 'glmcpu' else kv}-{depth}"
            line = (f"    {engine:<9} {kv:<5} {fills[name]}   prefill "
                    f"{statistics.median(pp):8.1f} tok/s   decode {statistics.median(tg):7.2f} tok/s")
            if bw:
                kvb = cfg.kv_bytes(depth + a.prompt + a.gen // 2, (kv, kv))
                gbs = (weights + kvb) * statistics.median(tg) / 1e9
                line += (f" = {gbs:5.1f} GB/s of weights + KV ({kvb / 1e9:.2f} GB), "
                         f"{gbs / statistics.mean(bw):.0%} of the read bandwidth")
            print(line)
        if bw:
            print(f"    read bandwidth (tools/membw.py, before/after the runs): "
                  f"{' / '.join(f'{b:.1f}' for b in bw)} GB/s; {weights / 1e9:.2f} GB of weights per token", flush=True)


if __name__ == "__main__":
    main()
