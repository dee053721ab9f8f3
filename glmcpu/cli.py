"""glmcpu command line: run, serve, info, convert, quantize, pull, list, worker, keygen, plan."""
import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from .errors import GlmcpuError
from .hub import human
from .net.link import LinkError
from .quantize import FILE_TYPES

KV_TYPES = ["f32", "f16", "bf16", "q8_0"]      # models.glm4.KV_TYPES (without loading the kernels)


def model_path(name) -> str:
    """The file for a model argument (path, local or catalogue name); the demo model when absent."""
    from .hub import demo_path, resolve

    return resolve(name) if name else demo_path()


def add_sampling(p):
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the K most likely tokens; 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="then from the fewest whose probabilities add up to P; 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05,
                   help="then drop tokens under P x the best one's probability; 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="make the last 64 tokens this much less likely (their logits divided, or "
                        "multiplied when negative); 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one each run)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text tokens")


def add_cluster(p):
    p.add_argument("--workers", help="comma-separated tcp://host:port of `glmcpu worker`s")
    p.add_argument("--key", help="this root's key file (glmcpu keygen)")
    p.add_argument("--worker-key", help="the workers' public key (.pub file or 40 characters)")
    p.add_argument("--insecure", action="store_true", help="plain TCP, no keys (trusted networks only)")
    p.add_argument("--shares", help="comma-separated relative shares, root first; 'auto' follows measured "
                                    "memory bandwidth (default: threads, within each machine's memory)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a silent worker is replaced")
    p.add_argument("--wire", default="f32", choices=["f32", "f16", "q8_0"],
                   help="hidden vectors on the network: f32 (exact), f16 (half the bytes) or q8_0 (34 "
                        "bytes per 32 values)")
    p.add_argument("--topology", default=None, choices=["star", "mesh"],
                   help="star: every sync through the root; mesh: every node runs the layers and sends its "
                        "parts straight to all others (one exchange per sync, on any --wire; each worker opens "
                        "one more port, --mesh-port). Default: $GLMCPU_TOPOLOGY, else mesh for up to 3 workers, "
                        "star for more")


def parse_shares(text):
    """--shares: None, "auto", or comma-separated non-negative numbers (root first)."""
    if text in (None, "auto"):
        return text
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise GlmcpuError(f"--shares {text}: give comma-separated numbers, root first (e.g. 2,1,1), "
                          "or auto") from None


def cluster_kwargs(a):
    if not getattr(a, "workers", None):
        return {}
    shares = parse_shares(a.shares)
    return dict(workers=a.workers, key=a.key, worker_key=a.worker_key, insecure=a.insecure,
                timeout=a.timeout, shares=shares, wire=a.wire, topology=a.topology,
                slots=max(1, getattr(a, "parallel", None) or 1))      # serve --parallel: a KV slot each


def cmd_worker(a):
    from .cluster import WorkerService
    from .net.link import Server, load_keypair, load_public

    if a.insecure:
        keypair, allowed = None, ()
    elif a.key and a.allow:
        keypair, allowed = load_keypair(a.key), [load_public(k) for k in a.allow]
    else:
        raise GlmcpuError("a worker needs --key (its key file) and --allow (the root's public key), "
                          "made with `glmcpu keygen`; or --insecure")
    service = WorkerService(a.model and model_path(a.model), a.threads, a.memory, a.cache, a.cache_max, a.lease,
                            repack=a.repack, mesh_port=a.mesh_port)
    server = Server(a.bind, service, keypair=keypair, allowed=allowed)
    service.attach(server)
    print(f"glmcpu worker on {server.endpoint} ({'insecure' if a.insecure else 'CurveZMQ'}; "
          f"public key {keypair[0].decode() if keypair else '-'})", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    return 0


def cmd_keygen(a):
    from .net.link import keygen

    public = keygen(a.path)
    print(f"wrote {a.path} (secret: keep it on this machine) and {a.path}.pub (public: {public})")
    return 0


def cmd_plan(a):
    from .cluster import make_plan
    from .gguf import GGUFFile
    from .plan import module_bytes
    from .models import model_class

    f = GGUFFile(model_path(a.model))
    cfg = model_class(f.arch).config_class.from_gguf(f)
    if a.layers and a.layers < cfg.n_layer:
        raise GlmcpuError(f"--layers {a.layers}: the file has {cfg.n_layer}; give more")
    sizes = module_bytes(f, cfg, a.layers)
    if a.layers:                    # a file cut short (tools/make_model.py --layers): its widths at full depth
        import dataclasses
        cfg = dataclasses.replace(cfg, n_layer=a.layers)
    nodes = ["root"] + [w for w in (a.workers or "").split(",") if w]
    shares = parse_shares(a.shares)
    try:
        plan = make_plan(cfg, nodes, None if shares == "auto" else shares)
    except ValueError as e:
        raise GlmcpuError(f"--shares: {e}") from None
    for line in plan.describe(cfg, a.wire):
        print(line)
    if a.speed:
        try:
            speeds = [float(s) for s in a.speed.split(",")]
        except ValueError:
            raise GlmcpuError(f"--speed {a.speed}: give GB/s as a number, or one per node") from None
        if len(speeds) == 1:
            speeds = speeds * len(nodes)
        if len(speeds) != len(nodes):
            raise GlmcpuError(f"--speed: give one GB/s figure, or one per node ({len(nodes)})")
        from .plan import SYNC_MS, predict
        a.topology = a.topology or ("mesh" if len(nodes) <= 4 else "star")      # as a cluster runs it
        p = predict(plan, cfg, sizes, speeds, a.link_mbit, a.latency_ms, a.wire, a.topology, a.sync_ms)
        link = f"{a.link_mbit:g} Mbit/s, {a.latency_ms:g} ms latency" if a.link_mbit else "an unlimited link"
        sync = SYNC_MS[a.topology] if a.sync_ms is None else a.sync_ms
        print(f"predicted decode ({a.topology}, {sync:g} ms of software a sync): {p['tok_s']:.2f} tok/s "
              f"({p['compute_ms']:.1f} ms reading weights on the slowest node + {p['network_ms']:.1f} ms on the "
              f"network, over {link})")
        one = predict(make_plan(cfg, ["root"]), cfg, sizes, speeds[:1])["tok_s"]
        print(f"equal nodes of {speeds[0]:g} GB/s over {link} (one node: {one:.2f} tok/s), predicted:")
        for top in ("star", "mesh"):
            row = []
            for n in (2, 4, 8):
                q = predict(make_plan(cfg, ["root"] + [f"w{i}" for i in range(1, n)]), cfg, sizes, speeds[:1] * n,
                            a.link_mbit, a.latency_ms, a.wire, top, a.sync_ms)
                row.append(f"{n} nodes {q['tok_s']:.2f} tok/s ({q['tok_s'] / one:.2f}x)")
            what = ("--topology star: the root sends each input, the workers answer" if top == "star" else
                    "--topology mesh: every node sends its part to every other at once")
            print(f"  {top}: " + ", ".join(row) + f"  [{what}]")
    return 0


REPACK_HELP = ("which weights are copied into RAM in the kernels' faster layouts: auto (the non-expert "
               "weights when they fit in the free memory, the RAM or a container's limit; a MoE file's experts "
               "too when the whole file fits in 60%% of it), none (all read from the file: least RAM, slower) "
               "or all (default: auto, or GLMCPU_REPACK)")


def add_engine(p):
    p.add_argument("--threads", "-t", type=int, default=None, help="default: physical cores")
    p.add_argument("--ctx", "-c", type=int, default=None,
                   help="context length (default: the file's, as far as half the free memory beside the weights "
                        "holds its KV cache; at least min(file's, 4096))")
    p.add_argument("--mlock", action="store_true",
                   help="lock the non-expert weights in RAM (experts stay paged from the file)")
    p.add_argument("--repack", choices=["auto", "none", "all"], default=None, help=REPACK_HELP)
    p.add_argument("--kv-type", choices=KV_TYPES, default=None,
                   help="the KV cache's element type: f16 (default, or $GLMCPU_KV_TYPE), bf16, f32 (twice the "
                        "memory and reads), q8_0 (34 bytes per 32 values); scores and sums stay float32; "
                        "workers follow the root's")
    p.add_argument("--cache-ram", type=float, default=None,
                   help="GB of KV cache kept for conversations between requests (the longest shared prefix "
                        "is reused; default: one full context's worth)")
    p.add_argument("--cache-dir", default=None,
                   help="keep KV caches of long prompts here too (when they leave RAM, and at exit); a prompt "
                        "that starts with one, after a restart too, is not computed again")
    p.add_argument("--cache-disk", type=float, default=None, help="GB --cache-dir may hold (default: no cap)")
    p.add_argument("--kv-type-k", choices=KV_TYPES, default=None, help="the keys' type (default: --kv-type)")
    p.add_argument("--kv-type-v", choices=KV_TYPES, default=None, help="the values' type (default: --kv-type)")
    p.add_argument("--draft", choices=["auto", "mtp", "lookup", "none"], default="auto",
                   help="speculative decoding: guess tokens cheaply, check them in one pass: mtp (the file's "
                        "own draft head, GLM-4.5), lookup (n-grams already in the context), none; "
                        "default auto: mtp where the file has the head. Greedy output is exactly "
                        "none's; sampled output keeps its distribution")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="tokens guessed per step (default: 1 for mtp, 3 for lookup)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", nargs="?", const="cuda", default=None, choices=["cuda", "twin"],
                   help="run on the NVIDIA GPU (CuPy), or stop with one line saying why none can be used; "
                        "--gpu twin: the GPU kernels' NumPy twin on the CPU, for checking (default: the GPU "
                        "when one can be used, else the CPU)")
    g.add_argument("--cpu", action="store_true", help="never use a GPU")
    p.add_argument("--gpu-layers", type=int, default=None,
                   help="the last N layers (and the output head) on the GPU (default: as many as fit)")
    p.add_argument("--cpu-moe", action="store_true",
                   help="keep every MoE layer's routed experts on the CPU (attention, router and shared expert "
                        "on the GPU)")
    p.add_argument("--n-cpu-moe", type=int, default=None,
                   help="keep the routed experts of the first N MoE layers on the CPU")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="the MTP head guesses among the first N token ids only (BPE lists them roughly by "
                        "frequency): a cheaper guess, the same output (default: all)")


def sampling_kwargs(a):
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed, ignore_eos=a.ignore_eos)


def stats_line(s) -> str:
    def rate(n, t):
        return f"{n / t:.1f} tok/s" if t > 0 else "-"
    cached = s.get("cached_tokens", 0)
    computed = s.get("prompt_tokens", 0) - cached
    return (f"prompt: {s.get('prompt_tokens', 0)} tokens{f' ({cached} cached)' if cached else ''}, "
            f"{rate(computed, s.get('prompt_seconds', 0))}"
            f" | generation: {s.get('gen_tokens', 0)} tokens, {rate(s.get('gen_tokens', 0), s.get('gen_seconds', 0))}"
            + (f" | draft: {s['accepted']}/{s['drafted']} accepted" if s.get("drafted") else ""))


def stream(pieces, out=None):
    """Print pieces as they come."""
    out = out or sys.stdout
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)


class StepBar:
    """A transient progress bar on stderr for work that turns out slow (over `after` seconds):
    quick steps print nothing, and nothing is drawn when stderr is not a terminal."""

    def __init__(self, what: str, after: float = 1.0):
        self.what, self.after, self.bar, self.task = what, after, None, None
        self.t0 = time.perf_counter()

    def __call__(self, done, total):
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.after or done >= total or not sys.stderr.isatty():
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                transient=True, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total)
        self.bar.update(self.task, completed=done, total=total)
        if done >= total:
            self.bar.stop()


def load_model(a):
    from . import load

    path = model_path(a.model)
    return load(path, threads=a.threads, ctx=a.ctx, mlock=a.mlock, repack=a.repack, draft=a.draft,
                draft_tokens=a.draft_tokens, draft_vocab=a.draft_vocab,
                kv_type=(a.kv_type_k or a.kv_type, a.kv_type_v or a.kv_type), cache_ram=a.cache_ram,
                cache_dir=a.cache_dir, cache_disk=a.cache_disk, **device_kwargs(a),
                progress=StepBar(f"loading {os.path.basename(path)}: layers"), **cluster_kwargs(a))


def device_kwargs(a) -> dict:
    return dict(gpu="cpu" if a.cpu else a.gpu, gpu_layers=a.gpu_layers, cpu_moe=a.cpu_moe, n_cpu_moe=a.n_cpu_moe)


def cmd_run(a):
    with load_model(a) as model:          # its workers are freed however this ends
        return run_model(model, a)


def run_model(model, a):
    kw = sampling_kwargs(a)
    kw["grammar"] = run_grammar(a)
    if a.prompt is not None or not sys.stdin.isatty():
        prompt = a.prompt if a.prompt is not None else sys.stdin.read()
        kw["progress"] = StepBar("reading the prompt: tokens", after=0.5)
        if a.raw:
            pieces = model.generate(prompt, **kw)
        else:
            pieces = model.chat([{"role": "user", "content": prompt}], **kw)
        text = stream(pieces)
        if not text.endswith("\n"):
            sys.stdout.write("\n")
        print(stats_line(model.last_stats), file=sys.stderr)
        if a.stats:
            print_expert_stats(model)
            if model.net.status():
                print(cluster_line(model.net.status()), file=sys.stderr)
        return 0
    from . import tui

    def extra():
        lines = expert_lines(model)
        if model.net.status():
            lines.append(cluster_line(model.net.status()))
        return lines

    history = os.path.join(os.path.expanduser("~"), ".cache", "glmcpu", "chat_history")
    return tui.run(model, kw, system=a.system, stats_extra=extra, history_file=history)


def run_grammar(a):
    """`run --json-schema` / `--grammar-file`: the Lark grammar the answers are held to, or None."""
    from . import constrain

    if a.json_schema and a.grammar_file:
        raise GlmcpuError("give --json-schema or --grammar-file, not both")
    if a.json_schema:
        text = a.json_schema
        if text.startswith("@"):
            with open(text[1:]) as f:
                text = f.read()
        return constrain.json_schema(text)
    if a.grammar_file:
        with open(a.grammar_file) as f:
            return constrain.gbnf(f.read())
    return None


def expert_lines(model) -> list:
    from .engine import expert_summary

    return expert_summary(model.expert_stats) or ["expert statistics: this model has no experts"]


def cmd_serve(a):
    with load_model(a) as model:          # its workers are freed however this ends
        return serve(model, a)


def serve(model, a):
    from .server import API, Server

    from .batching import default_parallel
    from . import ops

    defaults = sampling_kwargs(a)
    defaults.pop("ignore_eos")
    if a.parallel is not None and a.parallel < 1:
        raise GlmcpuError(f"--parallel {a.parallel}: give 1 or more slots")
    if a.parallel:
        parallel, parallel_note = a.parallel, f"{a.parallel} slot{'s' * (a.parallel > 1)} (--parallel)"
    else:
        resident = sum(t.n_bytes for n, t in model.file.tensors.items() if not ops.is_expert(n))
        parallel, parallel_note = default_parallel(model, ops.memory_available() - resident)
    api = API(model, name=a.name, api_key=a.api_key or os.environ.get("GLMCPU_API_KEY"),
              max_waiting=a.queue, defaults=defaults, parallel=parallel, chunk=a.prompt_chunk,
              reasoning_format=a.reasoning_format)
    try:
        server = Server(api, a.host, a.port, verbose=a.verbose, max_connections=a.max_connections,
                        head_timeout=a.head_timeout)
    except OSError as e:
        raise GlmcpuError(f"cannot listen on {a.host}:{a.port} ({e.strerror}); choose another --port "
                          "(0 picks a free one)") from None
    print(f"glmcpu serving {api.name} at {server.url} (chat page at /, OpenAI API at {server.url}/v1"
          f"{', API key required' if api.api_key else ''}). Ctrl-C to stop.", flush=True)
    print(model.ctx_note, file=sys.stderr, flush=True)
    print(parallel_note + ("" if parallel > 1 else "; generations take turns"), file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():
        server.watch_signals()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        api.stop()
    return 0


def print_expert_stats(model):
    for line in expert_lines(model):
        print(line, file=sys.stderr)


def cluster_line(f) -> str:
    return (f"cluster, per token: {f['sent_kib']:.1f} KiB sent, {f['received_kib']:.1f} KiB received, "
            f"{f['round_trips']:.1f} round trips, {f.get('syncs', 0):.1f} mesh syncs, {f['network_ms']:.2f} ms "
            f"waiting on the network vs {f['compute_ms']:.2f} ms on the root's shares; workers alive "
            f"{f['alive']}, failovers {f['failovers']}, replays {f['replays']}; {f.get('topology', 'star')}")



def cmd_info(a):
    from .errors import ModelNotFound
    from .hub import as_url, names_remote

    if a.model and as_url(a.model):
        return remote_info(a)
    try:
        path = model_path(a.model)
    except ModelNotFound:
        if not names_remote(a.model):      # a catalogue name or OWNER/REPO[:FILE] not downloaded: its header
            raise
        return remote_info(a)
    from . import ops
    from .engine import Model

    m = Model(path, threads=a.threads, ctx=a.ctx, repack=a.repack, draft="none",
              kv_type=(a.kv_type_k or a.kv_type, a.kv_type_v or a.kv_type), **device_kwargs(a))
    experts = any(ops.is_expert(n) for n in m.file.tensors)
    pk = m.net.packing
    rows = [("file", m.path)] + model_rows(m.file, m.cfg, m.ctx, m.kv_type) + [
        ("free memory", f"{human(ops.memory_available())} (the RAM, or this container's limit if lower)"),
        ("repacked", ("non-expert weights copied into RAM in the kernels' layouts" if pk.dense else
                      "nothing: every weight is read from the file (--repack none, or too little free memory)")
         + ("; experts too" if pk.experts else "; experts read from the file" if experts else "")),
        ("kernels", f"{ops.VARIANT} (built: {', '.join(ops.available_variants())})"),
        ("threads", m.threads),
    ]
    print_rows(rows + gpu_rows(m))
    return 0


def remote_info(a):
    """`info` of a file on the hub or the web, from its header alone (Range requests): nothing is
    downloaded. The rows that describe the file are local `info`'s (model_rows)."""
    from . import ops
    from .engine import chosen_kv_type, default_context
    from .hub import inspect_remote
    from .models.glm4 import kv_type as kv_types

    r = inspect_remote(a.model)
    f, cfg = r.file, r.cfg
    rows = [("file", r.name)]
    if r.count > len(r.parts):
        rows.append(("split", f"part 1 of {r.count}: the other parts were not read, so the sizes, types and "
                              "memory below are part 1's alone"))
    elif r.count > 1:
        rows.append(("split", f"{r.count} parts: " + ", ".join(f"{human(s) if s else '?'}" for _, s in r.parts)))
    rows.append(("file size", human(f.size) if f.size else "unknown (the server did not say)"))
    rows.append(("glmcpu runs it", "yes (read from its header; nothing downloaded)" if r.refused is None
                 else "no: " + " ".join(r.refused.split())))
    ctx = kv = None
    if cfg is not None:
        kv = kv_types(*chosen_kv_type((a.kv_type_k or a.kv_type, a.kv_type_v or a.kv_type)), head_dim=cfg.head_dim)
        resident = sum(t.n_bytes or 0 for n, t in f.tensors.items() if not ops.is_expert(n))
        ctx = a.ctx or default_context(cfg, kv, ops.memory_available(), resident)[0]
    print_rows(rows + model_rows(f, cfg, ctx, kv))
    return 0


def model_rows(f, cfg, ctx, kv_type) -> list:
    """The rows `info` prints of what a model file holds and the RAM running it takes, for a local
    file (a GGUFFile) and a remote one's header (hub.HeaderFile) alike; cfg None (a header that makes
    no Config) gives the architecture and the tensor types only."""
    from collections import Counter

    from . import ops
    from .gguf import REMOVED_TYPES

    types, sizes, unknown = Counter(), Counter(), set()
    for t in f.tensors.values():
        k = getattr(t.tensor_type, "name", None) or REMOVED_TYPES.get(t.tensor_type, f"type {t.tensor_type}")
        types[k] += 1
        sizes[k] += t.n_bytes or 0
        if t.n_bytes is None:
            unknown.add(k)
    weights = sum(sizes.values())

    def share(k):
        if k in unknown:
            return "size unknown"
        pct = 100 * sizes[k] / weights if weights else 0
        return f"{human(sizes[k])}, {pct:.0f}%" if pct >= 1 else f"{human(sizes[k])}, <1%"

    rows = [("architecture", f"{f.arch} ({f.get('general.name', '?')})")]
    if cfg is not None:
        c = cfg
        rows += [
            ("layers", c.n_layer),
            ("hidden / ffn", f"{c.d_model} / {c.n_ff}"),
            ("heads q / kv / dim", f"{c.n_head} / {c.n_head_kv} / {c.head_dim} (rope on {c.n_rot}, "
                                   f"theta {c.rope_theta:g})"),
            ("vocabulary", c.n_vocab),
            ("context", f"{ctx} (trained {c.n_ctx_train})"),
        ]
    rows.append(("tensor types", ", ".join(f"{k} x{v} ({share(k)})" for k, v in types.most_common())))
    if cfg is None:
        return rows
    kv = c.kv_bytes(ctx, kv_type)
    rows.append(("memory", f"{human(weights)} weights (memory-mapped) + {human(kv)} KV cache at ctx {ctx} "
                           f"({kv_type[0] if kv_type[0] == kv_type[1] else 'K {} / V {}'.format(*kv_type)})"
                           + (f"; without the {', '.join(sorted(unknown))} tensors, of unknown size" if unknown else "")))
    experts = sum(t.n_bytes or 0 for n, t in f.tensors.items() if ops.is_expert(n))
    if experts:
        rows += [
            ("experts", f"{c.n_expert} per layer, {c.n_expert_used} used per token + {c.n_expert_shared} shared, "
                        f"{c.n_layer - c.n_dense_lead} MoE layers after {c.n_dense_lead} dense"),
            ("RAM needed", f"{human(weights - experts + kv)} (non-expert weights + KV cache; lock with --mlock)"),
            ("expert weights", f"{human(experts)} read from the file on demand (the OS pages them in and out)"),
        ]
    rows.append(("draft head", f"MTP block {c.n_layer} (used by --draft auto/mtp)" if c.n_nextn else
                               "none in the file (--draft lookup guesses from the context)"))
    return rows


def print_rows(rows):
    for k, v in rows:
        print(f"{k:>20}  {v}")


def gpu_rows(m) -> list:
    """What `info` says of a GPU: where this model runs and why, and what of it would fit on a GPU."""
    from .gpu import available
    where = m.placement.why
    rows = [("runs on", where if m.placement.dev.name != "cpu" else "the CPU" if "GPU used" in where
             else f"the CPU ({where})")]
    if m.placement.plan is not None:
        from collections import Counter

        from .device import GPU_TYPES
        left = Counter(t.tensor_type.name for n, t in m.file.tensors.items()
                       if m.placement.plan.on_gpu(n) and len(t.shape) >= 2 and int(t.tensor_type) not in GPU_TYPES)
        if left:
            rows.append(("kept on the CPU", ", ".join(f"{k} x{v}" for k, v in left.most_common())
                         + " (no GPU kernel for the type: the CPU multiplies them, their inputs crossing)"))
    ok, what = available()
    if not ok:
        return rows + [("GPU", f"none used: {what}")]
    import cupy
    from .gpu.plan import plan_offload
    free = cupy.cuda.Device(0).mem_info[0]
    rows += [("GPU", f"{what}; not used yet (the CuPy device is not wired: models run on the CPU)")]
    rows.append(("would fit", plan_offload(m.file, m.cfg, free, m.ctx).describe()))
    if m.cfg.n_expert:
        rows.append(("with --cpu-moe", plan_offload(m.file, m.cfg, free, m.ctx, cpu_moe=True).describe()))
    return rows


@contextmanager
def tensor_bar(what, quiet):
    """A progress bar over a file's tensors: yields progress(done, total, tensor name)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False, disable=quiet) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total, name: bar.update(task, completed=done, total=total,
                                                   description=f"{name:<32}")


def cmd_convert(a):
    from .convert import convert

    with tensor_bar("converting", a.quiet) as progress:
        convert(a.hf_dir, a.output, a.type, fuse_qkv=a.fuse_qkv, progress=progress)
    print(f"wrote {a.output} ({human(os.path.getsize(a.output))})", file=sys.stderr)
    return 0


def cmd_pull(a):
    from .hub import pull

    for path in pull(a.name, progress=not a.quiet):
        print(path)
    return 0


def cmd_list(a):
    from rich.console import Console
    from rich.table import Table

    from .hub import CATALOGUE, demo_path, local_models, missing_kernels, models_dir

    # a pipe gets wide lines rather than names folded at 80 columns
    console = Console(width=None if sys.stdout.isatty() else 200)
    # titles as lines of their own: a table's title wraps at the table's (narrow) width
    console.print(f"local models ({models_dir()}; GLMCPU_MODELS moves it)", highlight=False, width=80)
    local = Table()
    for col in ("name", "size", "path"):
        local.add_column(col, no_wrap=col != "path")
    local.add_row("demo", human(os.path.getsize(demo_path())), "built in (a tiny model for trying glmcpu)")
    for m in local_models():
        local.add_row(m.name, human(m.size) + (" (partial: `glmcpu pull` resumes)" if m.partial else ""), m.path)
    console.print(local)
    console.print("catalogue (`glmcpu pull NAME`; sizes written from knowledge, not checked online"
                  + ("" if a.long else "; `glmcpu list --long` adds files and notes") + ")", highlight=False,
                  width=80)
    cat = Table()
    cols = ["name", "here", "size", "RAM", "arch", "runs"] + (["repository / file", "note"] if a.long else [])
    for col in cols:
        cat.add_column(col, no_wrap=col not in ("repository / file", "note"))
    needs = {}
    for e in CATALOGUE:
        missing = missing_kernels(e)
        if missing:
            needs[e.name] = ", ".join(missing)
        row = [e.name, "yes" if e.downloaded() else "-", f"~{e.size / 1e9:.1f} GB", f"~{e.ram / 1e9:.0f} GB",
               e.arch, "not yet*" if missing else "yes"]
        if a.long:
            files = e.files[0] + (f" (+{len(e.files) - 1} more parts)" if e.split else "")
            row += [f"{e.repo} / {files}", e.note]
        cat.add_row(*row)
    console.print(cat)
    for name, kernels in needs.items():
        console.print(f"* {name}: needs {kernels} kernels")
    return 0


def cmd_quantize(a):
    from collections import Counter

    from .quantize import quantize_gguf

    with tensor_bar("quantizing", a.quiet) as progress:
        types = quantize_gguf(a.input, a.output, a.type, pure=a.pure, progress=progress)
    mix = ", ".join(f"{t.name} x{n}" for t, n in Counter(types.values()).most_common())
    print(f"wrote {a.output} ({human(os.path.getsize(a.output))}; {mix})", file=sys.stderr)
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="glmcpu", description="GLM-4 language models on ordinary CPUs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="chat with a model, or answer one prompt (-p)")
    r.add_argument("model", nargs="?", help="a .gguf file, or a name from `glmcpu list` (default: the "
                                           "built-in demo model)")
    r.add_argument("-p", "--prompt", help="answer this prompt and exit")
    r.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    r.add_argument("--system", help="system message for the chat")
    r.add_argument("--stats", action="store_true", help="print per-layer expert hit counts (MoE models)")
    r.add_argument("--json-schema", "-j", metavar="SCHEMA",
                   help="answers are JSON valid under this schema (JSON text, or @FILE), by constrained sampling")
    r.add_argument("--grammar-file", metavar="FILE", help="answers follow this GBNF (llama.cpp's) or Lark grammar")
    add_sampling(r)
    add_engine(r)
    add_cluster(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="an OpenAI-compatible API and a chat page over HTTP")
    s.add_argument("model", nargs="?", help="a .gguf file, or a name from `glmcpu list` (default: the "
                                           "built-in demo model)")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or env GLMCPU_API_KEY)")
    s.add_argument("--name", help="the model id clients ask for (default: the file name without .gguf)")
    s.add_argument("--parallel", "-np", type=int, default=None,
                   help="generations decoding together in one pass, each with its own KV cache (default: "
                        "as many full contexts as fit in the free memory, at most 4; with --workers 1, as "
                        "each worker then holds a KV cache per slot); 1: one at a time, which keeps "
                        "speculative drafts")
    s.add_argument("--prompt-chunk", type=int, default=64,
                   help="prompt tokens read per step beside generating slots (default 64): fewer keep "
                        "streams smoother, more give a new request its first token sooner")
    s.add_argument("--queue", type=int, default=16,
                   help="requests that may wait for a free slot; more get 503 with Retry-After (default 16)")
    s.add_argument("--max-connections", type=int, default=64,
                   help="open connections served at once; more are answered 503 (default 64)")
    s.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's line and headers (default 10)")
    s.add_argument("--reasoning-format", choices=("deepseek", "none", "auto"), default="deepseek",
                   help="deepseek (default; auto is the same): a GLM-4.5 answer's <think> block comes back "
                        "apart, as reasoning_content; none: inline, in the content")
    s.add_argument("--verbose", "-v", action="store_true", help="log every request")
    add_sampling(s)
    add_engine(s)
    add_cluster(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="serve a share of a model to a root on the LAN")
    w.add_argument("--bind", required=True, help="tcp://HOST:PORT (HOST 0.0.0.0 for every interface)")
    w.add_argument("--model", help="this machine's copy of the GGUF file (without one, the root sends "
                                  "this worker's share once and it is kept in --cache)")
    w.add_argument("--cache", help="where shares sent by a root are kept (default ~/.cache/glmcpu/worker)")
    w.add_argument("--key", help="this worker's key file (glmcpu keygen)")
    w.add_argument("--allow", action="append", help="a root's public key allowed to connect (repeatable)")
    w.add_argument("--insecure", action="store_true", help="plain TCP, anyone may connect")
    w.add_argument("--threads", "-t", type=int, default=None, help="default: physical cores")
    w.add_argument("--memory", type=float, default=None, help="GB this worker offers (default: available RAM)")
    w.add_argument("--repack", choices=["auto", "none", "all"], default=None, help=REPACK_HELP)
    w.add_argument("--cache-max", type=float, default=None, help="GB the --cache may hold (least recently used "
                                                                   "shares go first; default: no limit)")
    w.add_argument("--lease", type=float, default=10.0, help="seconds of silence after which this worker's "
                                                              "root is taken for gone and another may use it")
    w.add_argument("--mesh-port", type=int, default=None,
                   help="TCP port for a mesh root's parts (--topology mesh; on the --bind host): default the "
                        "--bind port + 1, or any free port when --bind names none")
    w.set_defaults(func=cmd_worker)

    k = sub.add_parser("keygen", help="make a CurveZMQ key pair for a root or a worker")
    k.add_argument("path")
    k.set_defaults(func=cmd_keygen)

    pl = sub.add_parser("plan", help="show how a model would be split over workers")
    pl.add_argument("model")
    pl.add_argument("--workers", default="")
    pl.add_argument("--shares")
    pl.add_argument("--wire", default="f32", choices=["f32", "f16", "q8_0"])
    pl.add_argument("--speed", help="GB/s of weights each node reads in a one-process decode (one figure "
                                    "for all, or one per node, root first): predicts tok/s")
    pl.add_argument("--link-mbit", type=float, default=None, help="the link's rate, for the prediction")
    pl.add_argument("--latency-ms", type=float, default=0.1, help="one-way latency, for the prediction")
    pl.add_argument("--layers", type=int, default=None,
                    help="predict for the file's widths at this many layers (a file cut short by tools/make_model.py)")
    pl.add_argument("--topology", choices=["star", "mesh"], default=None,
                    help="star: request/reply links through the root; mesh: one exchange among all nodes per "
                         "sync (default: as a cluster runs, mesh for up to 3 workers)")
    pl.add_argument("--sync-ms", type=float, default=None,
                    help="software cost of one sync in ms (default: plan.SYNC_MS, 0.3 for either topology: measured "
                         "between busy nodes)")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("info", help="what a model file holds and what running it needs")
    i.add_argument("model", nargs="?", help="a .gguf file or a name from `glmcpu list` (default: the demo model); "
                                           "a URL, or a catalogue name or OWNER/REPO[:FILE] not downloaded: read "
                                           "from the remote file's header, nothing downloaded")
    add_engine(i)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="Hugging Face GLM checkpoint -> GGUF")
    c.add_argument("hf_dir")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--type", default="f16", choices=list(FILE_TYPES),
                   help="q4_k_m etc. write llama.cpp's mix of types (glmcpu runs f32..q4_0 today)")
    c.add_argument("--fuse-qkv", action="store_true", help="chatglm: one attn_qkv tensor, as THUDM's files")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=cmd_convert)

    pu = sub.add_parser("pull", help="download a model from the Hugging Face Hub (resumable, checksummed)")
    pu.add_argument("name", help="a catalogue name (`glmcpu list`), OWNER/REPO (its Q4_K_M GGUF) or "
                                 "OWNER/REPO:FILE.gguf")
    pu.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pu.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", help="downloaded models and the catalogue of known GLM GGUF files")
    ls.add_argument("--long", "-l", action="store_true", help="also each catalogue entry's repository, file and note")
    ls.set_defaults(func=cmd_list)

    q = sub.add_parser("quantize", help="re-quantise an F32/F16/BF16 GGUF (llama.cpp's mix of types)")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--type", required=True, choices=list(FILE_TYPES))
    q.add_argument("--pure", action="store_true", help="every matrix in --type (no Q6_K output, ...)")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)
    return p


def terminated(signum, frame):
    """SIGTERM (or SIGHUP) ends the command as an exception would: cleanups run (a root's
    workers hear goodbye), then the usual 128 + signal status."""
    raise SystemExit(128 + signum)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, terminated)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except (GlmcpuError, LinkError, OSError) as e:
        if args.debug:
            raise
        print("glmcpu: error: " + " ".join(str(e).split("\n")), file=sys.stderr)     # one line, always
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:                  # a bug, or a bad input no check caught: still one line
        if args.debug:
            raise
        where = e.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        at = f"{os.path.basename(where.tb_frame.f_code.co_filename)}:{where.tb_lineno}"
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"glmcpu: error: unexpected {type(e).__name__} at {at}{': ' + msg if msg else ''} "
              f"(run `glmcpu --debug ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
