"""The public API: `load(path) -> Model` with logits / generate / chat, like llama-cpp-python's Llama."""
import os

import numpy as np

from . import device, ops
from .chat_format import answer_grammar, detect
from .constrain import Constraint, from_request, special_tags
from .errors import GlmcpuError
from .draft import MODES, make as make_draft
from .generate import check_fits, generate_ids, prefill
from .gguf import GGUFFile
from .models import model_class
from .models.glm4 import kv_type as kv_types
from .prompt_cache import PromptCache
from .sampling import Sampler
from .tokenizer import Detokenizer, Tokenizer


# tokens guessed per step: an MTP head's second guess rides on its own first, so it is kept less often
DEFAULT_DRAFT_TOKENS = {"MTPDraft": 1, "LookupDraft": 3}


class Model:
    def __init__(self, path, threads=None, ctx=None, mlock=False, workers=None, key=None,
                 worker_key=None, insecure=False, timeout=5.0, shares=None, wire="f32", topology=None, slots=1, progress=None,
                 repack=None, draft="auto", draft_tokens=None, draft_vocab=None, kv_type=None, cache_ram=None,
                 cache_dir=None, cache_disk=None, gpu=None, gpu_layers=None, cpu_moe=False, n_cpu_moe=None):
        self.file = GGUFFile(path)
        self.path = self.file.path
        self.threads = int(threads) if threads else ops.default_threads()
        cls = model_class(self.file.arch)
        cfg = cls.config_class.from_gguf(self.file)
        cls.check_tensors(self.file, cfg)
        self.tokenizer = Tokenizer.from_gguf(self.file)      # its mistakes found before any weight is read
        self.kv_type = kv_types(*chosen_kv_type(kv_type), head_dim=cfg.head_dim)
        free = ops.memory_available()
        if ctx:
            self.ctx, self.ctx_note = int(ctx), f"context {int(ctx)} tokens (--ctx)"
        else:
            resident = sum(t.n_bytes for n, t in self.file.tensors.items() if not ops.is_expert(n))
            self.ctx, self.ctx_note = default_context(cfg, self.kv_type, free, resident)
        if self.ctx < 1:
            raise GlmcpuError(f"context size must be positive, not {ctx}")
        kv = cfg.kv_bytes(self.ctx, self.kv_type)
        if kv > free > 0:
            raise GlmcpuError(f"a KV cache of {self.ctx} tokens needs {kv / 2**30:.1f} GB and "
                              f"{free / 2**30:.1f} GB of RAM is free; lower --ctx")
        # the model, or a cluster running it: both have forward, new_cache, begin and status
        if workers:
            if gpu not in (None, "auto", False, "cpu"):
                raise GlmcpuError("--gpu with --workers: a cluster runs on its nodes' CPUs (a GPU root or "
                                  "`worker --gpu` is not wired yet)")
            self.placement = device.ON_CPU
            self.net = connect(self.file, cls, workers, key, worker_key, insecure, timeout, shares,
                               self.threads, self.ctx, wire, progress, repack, self.kv_type, topology, slots)
        else:
            self.placement = device.place(self.file, cfg, gpu, gpu_layers, cpu_moe, n_cpu_moe, self.ctx)
            self.net = cls(self.file, self.threads, progress=progress, packing=ops.plan_packing(self.file, repack),
                           kv_type=self.kv_type, placement=self.placement)
        self.cfg = self.net.cfg
        try:
            if draft not in MODES:
                raise GlmcpuError(f"draft {draft!r}: use one of {', '.join(MODES)}")
            self.draft_mode = draft
            self.draft_tokens = int(draft_tokens) if draft_tokens else None
            self.draft_vocab = int(draft_vocab) if draft_vocab else None
            make_draft(self.draft_mode, self.net, 1, self.draft_vocab)   # builds the MTP head now; mtp without one: one line
            self.last_stats = {}
            # KV caches kept between calls: cache_ram GB of positions (default: one full context's worth)
            st = os.stat(self.path)
            self.prompts = PromptCache(
                self.net, self.ctx, lambda: make_draft(self.draft_mode, self.net, self.ctx, self.draft_vocab),
                float(cache_ram) * 2**30 if cache_ram else self.cfg.kv_bytes(self.ctx, self.kv_type),
                cache_dir, float(cache_disk) * 2**30 if cache_disk else None,
                f"{self.file.fingerprint()}-{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}-"
                f"{'-'.join(self.kv_type)}")
            if mlock:       # keep what every token reads in RAM; experts stay paged on demand
                self.file.lock([n for n in self.file.tensors if not ops.is_expert(n)])
        except BaseException:
            self.close()
            raise

    @property
    def cluster(self):
        """The Cluster when workers share the work, else None."""
        return self.net if hasattr(self.net, "clients") else None

    @property
    def expert_stats(self) -> dict:
        """{layer: tokens routed to each expert (int64 [n_expert])} since load; {} for dense models."""
        fn = getattr(self.net, "expert_stats", None)
        return fn() if fn else {}

    def logits(self, token_ids) -> np.ndarray:
        """float32 [len(token_ids), n_vocab]: a full causal forward from position 0."""
        ids = [int(i) for i in token_ids]
        check_fits(len(ids) - 1, self.ctx)      # logits of n tokens need n cache positions
        bad = [i for i in ids if not 0 <= i < self.cfg.n_vocab]
        if bad:
            raise GlmcpuError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.n_vocab - 1})")
        cache = self.net.new_cache(max(1, len(ids)))
        self.net.begin(cache)
        return prefill(self.net, cache, ids, all_logits=True)

    def generate(self, prompt, max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                 repeat_penalty=1.0, seed=None, ignore_eos=False, progress=None, grammar=None):
        """Yield text pieces continuing `prompt` (a string, or a list of token ids); grammar: held
        to that grammar (constrain.json_schema(...), .json_object(), .gbnf(...), .lark(...)).
        The KV cache is kept between calls: a prompt that starts like the previous conversation
        (the next turn of a chat) only computes its new tokens. progress(done, total) follows
        the prompt's prefill. Not thread-safe: one generation at a time per Model."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise GlmcpuError("the prompt is empty")
        check_fits(len(ids), self.ctx)
        constraint = None if grammar is None else Constraint(grammar, self.tokenizer, self.cfg.n_vocab)
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed, constraint=constraint)
        stops = set() if ignore_eos else self.tokenizer.stop_ids
        self.last_stats = {}
        cache = self.reuse_cache(ids)
        d = cache.draft if constraint is None else None     # a draft's check knows no grammar
        n_draft = self.draft_tokens or (DEFAULT_DRAFT_TOKENS[type(d).__name__] if d else 0)
        yield from detokenize(self.tokenizer, generate_ids(self.net, cache, ids, sampler, max_tokens, stops,
                                                           self.last_stats, progress, draft=d, n_draft=n_draft))

    @property
    def cache(self):
        """The KV cache of the latest request (None before the first)."""
        return self.prompts.latest()

    @property
    def caches(self):
        """The KV caches kept between requests, least recently used first."""
        return self.prompts.caches

    def reuse_cache(self, ids):
        """The kept cache holding the longest prefix of `ids` (prompt_cache.PromptCache.take)."""
        return self.prompts.take(ids)

    def reset(self):
        """Forget the kept KV caches."""
        self.prompts.caches = []

    def close(self):
        """Write the kept caches to --cache-dir (if given), and free what this model holds beyond
        the process: a cluster's workers, at once (they are freed at exit or collection too, and
        after their lease if this process is killed)."""
        prompts = getattr(self, "prompts", None)
        if prompts is not None:
            prompts.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def chat(self, messages, template_kwargs=None, response_format=None, **kwargs):
        """Render `messages` ([{"role", "content"}]) with the file's chat template, then generate.
        template_kwargs go to the template (e.g. enable_thinking=False for GLM-4.5); response_format
        as OpenAI's ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}})
        holds the answer to it, as does grammar= (constrain.py: Lark text), after any thinking the
        model does first (GLM-4.5, unless enable_thinking=False). The newline GLM models write after
        <|assistant|> is not part of the answer: it is left out."""
        if response_format is not None:
            kwargs["grammar"] = from_request(response_format)
        prompt = self.tokenizer.render(messages, **(template_kwargs or {}))
        if kwargs.get("grammar") is not None:          # after any thinking the model does first
            kwargs["grammar"] = answer_grammar(detect(self.cfg.arch, self.tokenizer.chat_template), prompt,
                                               kwargs["grammar"], special_tags(self.tokenizer))
        yield from answer(self.generate(prompt, **kwargs))

    def __repr__(self):
        c = self.cfg
        return (f"<glmcpu.Model {c.arch} {c.n_layer} layers d={c.d_model} ctx={self.ctx} "
                f"threads={self.threads} kernels={ops.VARIANT}>")


def load(path, threads=None, ctx=None, mlock=False, workers=None, progress=None, repack=None, draft="auto",
         draft_tokens=None, draft_vocab=None, kv_type=None, cache_ram=None, cache_dir=None, cache_disk=None,
         gpu=None, gpu_layers=None, cpu_moe=False, n_cpu_moe=None, **cluster) -> Model:
    """A model, ready to generate.

    path: a GGUF file, or what the CLI takes: a model in `glmcpu list` (its name or file name,
        OWNER/REPO:FILE), a downloaded catalogue name, or "demo" (the built-in demo model).
    threads: compute threads (default: the physical cores, or GLMCPU_THREADS).
    ctx: context length in tokens: the KV cache's size (default: the file's training context, as
        far as half the free memory beside the weights holds its KV cache, at least min(that,
        4096); `model.ctx_note` says which).
    mlock: pin the weights in RAM (the non-expert ones for MoE files) so they are never paged out.
    workers: endpoints ("tcp://host:port") of `glmcpu worker`s to share the work with; then
        key= (this root's key file) and worker_key= (the workers' public key), or insecure=True;
        also timeout= (seconds, default 5), shares=, wire= ("f32", "f16" or "q8_0") and topology=
        ("star": every sync through the root; "mesh": every node runs the layers and sends its
        parts straight to all the others, on any wire; default $GLMCPU_TOPOLOGY, else mesh for up
        to 3 workers) and slots= (sequences run at once, batching.Scheduler's parallel: each worker
        holds a KV cache for each; default 1).
    progress: progress(done, total) is called as layers are built.
    repack: "auto" (default, or GLMCPU_REPACK), "none" or "all": which weights are copied into RAM
        in the kernels' faster layouts. auto copies the non-expert weights when they fit in 80% of
        the free memory (the RAM, or a container's limit), and a MoE file's routed experts too when
        the whole file fits in 60% of it; the rest is read from the file's memory map. none: least
        RAM, slower. all: everything, or a one-line refusal when it cannot fit.
    draft: speculative decoding: "auto" (default: the file's MTP head where it has one, as GLM-4.5
        files do), "mtp", "lookup" (prompt lookup: guesses from n-grams already in the context)
        or "none". Greedy output is exactly that of "none"; sampled output keeps its distribution.
    draft_tokens: tokens guessed per step (default 1 for mtp, 3 for lookup).
    draft_vocab: the MTP head guesses among the first N token ids only (a cheaper guess; default all).
    kv_type: the KV cache's element type: "f16" (default, or $GLMCPU_KV_TYPE), "bf16", "f32"
        (twice the memory and reads), "q8_0" (34 bytes per 32 values, as llama.cpp's); scores and
        sums stay float32. Or a (keys, values) pair such as ("q8_0", "f16"); None: the default.
    cache_ram: GB of KV cache kept for conversations between calls: each prompt reuses the kept
        cache sharing its longest prefix (default: one full context's worth).
    cache_dir: a directory where kept caches of 256 positions or more are written when they leave
        RAM or the model is closed, and read back for a prompt that starts with one (also after a
        restart); cache_disk: its size cap in GB (default: none).
    gpu: None or "auto" (an NVIDIA GPU through CuPy where one can be used, else the CPU), True or
        "cuda" (the GPU, or a one-line error saying why none can be used), False or "cpu", "twin"
        (the GPU kernels' NumPy twin, on the CPU: for checking the GPU path); gpu_layers: the last N
        layers (and the output head) on it, default as many as fit; cpu_moe: every MoE layer's
        routed experts stay on the CPU (the shared expert, router and attention go to the device);
        n_cpu_moe: those of the first N MoE layers only. `model.placement.why` says what runs where."""
    from .hub import resolve
    return Model(resolve(str(path)), threads=threads, ctx=ctx, mlock=mlock, workers=workers,
                 progress=progress, repack=repack, draft=draft, draft_tokens=draft_tokens,
                 draft_vocab=draft_vocab, kv_type=kv_type, cache_ram=cache_ram, cache_dir=cache_dir,
                 cache_disk=cache_disk, gpu=gpu, gpu_layers=gpu_layers, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
                 **cluster)


def connect(f, cls, workers, key, worker_key, insecure, timeout, shares, threads, n_ctx, wire, progress, repack,
            kv_type, topology=None, slots=1):
    from .cluster import Cluster
    from .net.link import load_keypair, load_public
    if insecure:
        keypair = server_key = None
    elif key and worker_key:
        keypair, server_key = load_keypair(key), load_public(worker_key)
    else:
        raise GlmcpuError("a cluster needs --key (this root's key file) and --worker-key (the workers' "
                          "public key), made with `glmcpu keygen`; or --insecure on every machine")
    if isinstance(workers, str):
        workers = [w for w in workers.split(",") if w]
    return Cluster(f, cls, workers, keypair, server_key, timeout=timeout, shares=shares, threads=threads,
                   n_ctx=n_ctx, wire=wire, progress=progress, repack=repack, kv_type=kv_type, topology=topology,
                   slots=slots)


DEFAULT_KV_TYPE = "f16"


def chosen_kv_type(kv_type) -> tuple:
    """(keys, values) of kv_type: a name for both, a pair, or None (either or both) for the default,
    $GLMCPU_KV_TYPE or f16. f16 because on GLM-4.5-Air-shape files at 16k tokens of context it
    runs as fast as f32 or faster in half the memory, and moves the logits by a KL of ~1e-8 (the
    f32 cache's own, to a float32 rounding); q8_0 halves the memory again (README: Long
    conversations)."""
    d = os.environ.get("GLMCPU_KV_TYPE") or DEFAULT_KV_TYPE
    if kv_type is None or isinstance(kv_type, str):
        kv_type = (kv_type, kv_type)
    return (kv_type[0] or d, kv_type[1] or d)


def default_context(cfg, kv_type, free: int, resident: int) -> tuple:
    """(tokens, a line saying why): the file's training context, capped so that its KV cache takes
    at most half the memory left beside the weights every token reads (a MoE file's experts are
    paged), in whole 1024s; never below min(file's, 4096)."""
    floor, per = min(cfg.n_ctx_train, 4096), cfg.kv_bytes(1, kv_type)
    room = max(0, free - resident) // 2 // per // 1024 * 1024
    ctx = max(floor, min(cfg.n_ctx_train, room))
    kind = kv_type[0] if kv_type[0] == kv_type[1] else "K {} / V {}".format(*kv_type)
    gb = cfg.kv_bytes(ctx, kv_type) / 2**30
    if ctx == cfg.n_ctx_train:
        return ctx, f"context {ctx} tokens, the file's ({gb:.1f} GB of {kind} KV cache at most)"
    return ctx, (f"context {ctx} of the file's {cfg.n_ctx_train} tokens: {gb:.1f} GB of {kind} KV cache, what half "
                 f"the free memory beside the weights holds (--ctx N to choose, --kv-type f16 for twice as many)")


def detokenize(tokenizer, ids):
    """Text pieces of a stream of token ids, each as soon as it ends a character; closing this
    closes the stream."""
    detok = Detokenizer(tokenizer)
    try:
        for tok in ids:
            piece = detok.push(tok)
            if piece:
                yield piece
        rest = detok.flush()
        if rest:
            yield rest
    finally:
        ids.close()


def answer(pieces):
    """Text pieces of a chat answer without the newline GLM models write after <|assistant|>."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip("\n")
            if not piece:
                continue
            started = True
        yield piece


def expert_summary(stats: dict) -> list:
    """One line per MoE layer: experts used, and how evenly tokens fell on them (1.0 = perfectly
    even: the entropy of the hit distribution over log(n_expert))."""
    lines = []
    for layer, hits in sorted(stats.items()):
        total = hits.sum()
        if total == 0:
            continue
        p = hits[hits > 0] / total
        evenness = float(-(p * np.log(p)).sum() / np.log(len(hits))) if len(hits) > 1 else 1.0
        top = [e for e in np.argsort(-hits)[:3] if hits[e] > 0]
        lines.append(f"layer {layer:>3}: {int((hits > 0).sum())}/{len(hits)} experts used, evenness "
                     f"{evenness:.2f}, busiest {', '.join(f'#{e} ({hits[e]})' for e in top)}")
    return lines
