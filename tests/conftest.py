"""Tiny random GLM checkpoints built with transformers, converted by glmcpu's converter."""
import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

# The suite compares the engine's float32 math with transformers': models it loads keep float32 KV
# caches unless a test asks for a type (the f16 default is measured in tests/test_context.py).
os.environ["GLMCPU_KV_TYPE"] = "f32"

SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
            "<|user|>", "<|assistant|>", "<|observation|>"]
TEXT = ("The quick brown fox jumps over the lazy dog. A small model reads the same words again "
        "and again; numbers like 12, 345 and 6789 split too. Über café naïve — ünïcödé text, "
        "and emoji 🙂 appear. ") * 20
F32_TOL = 2e-3      # max |logit difference| on float32 weights
N_VOCAB = 384          # model rows: more than the tokenizer has, as real GLM files do


def make_tokenizer(folder):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from glmcpu.tokenizer import GLM4_SPLIT, GLM4_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": GLM4_TEMPLATE, "eos_token": "<|endoftext|>"}, f)
    return tok


def randomize(model, std):
    """Non-unit norms, non-zero biases, weights of standard deviation `std`: nothing the engine
    could get right by accident."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def assert_prefill_equals_steps(m, ids):
    """A whole-prompt forward equals feeding the tokens one by one, and chunked prefill too."""
    from glmcpu.generate import prefill
    full = m.logits(ids)
    cache = m.net.new_cache(len(ids) + 1)
    steps = np.concatenate([m.net.forward([t], cache) for t in ids])
    np.testing.assert_allclose(full, steps, rtol=1e-4, atol=1e-4)
    chunked = prefill(m.net, m.net.new_cache(len(ids) + 1), ids, all_logits=True, chunk=7)
    np.testing.assert_allclose(full, chunked, rtol=1e-4, atol=1e-4)


def make_hf_model(folder, family="glm4", layers=3, seed=0, theta=25000.0, dtype="float32", shard=None,
                  hidden=64, ffn=96, head_dim=16):
    """A random GlmForCausalLM (family 'glm') or Glm4ForCausalLM with non-unit norms and biases
    (4 query heads, 2 KV heads; hidden/ffn multiples of 256 for K-quant files)."""
    import torch
    import transformers

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cls = {"glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
           "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM)}[family]
    cfg = cls[0](vocab_size=N_VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                 partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", "rope_theta": theta},
                 rms_norm_eps=1e-5 if family == "glm4" else 1.5625e-07, attention_bias=True,
                 max_position_embeddings=256, tie_word_embeddings=False,
                 pad_token_id=tok.token_to_id("<|endoftext|>"),
                 eos_token_id=[tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")])
    model = randomize(cls[1](cfg).eval(), 0.08)
    kw = {"max_shard_size": shard} if shard else {}
    model.to(getattr(torch, dtype)).save_pretrained(folder, **kw)
    return model.float()


def make_hf_moe(folder, layers=4, seed=0, qk_norm=False, scaling=1.0, bias_std=0.5, mtp=False,
                n_expert=8, top_k=2, hidden=64, ffn=96, expert_ffn=32, head_dim=32):
    """A random Glm4MoeForCausalLM: first layer dense, then MoE with one shared expert and a
    correction bias large enough to change the choice. mtp=True adds a GLM-4.5-style MTP block
    as layer `layers` (transformers ignores it; GGUF counts it in block_count)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    os.makedirs(folder, exist_ok=True)
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = transformers.Glm4MoeConfig(
        vocab_size=N_VOCAB, hidden_size=hidden, intermediate_size=ffn, moe_intermediate_size=expert_ffn,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        n_routed_experts=n_expert, num_experts_per_tok=top_k, n_shared_experts=1,
        first_k_dense_replace=1, partial_rotary_factor=0.5, use_qk_norm=qk_norm,
        routed_scaling_factor=scaling, norm_topk_prob=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=False, num_nextn_predict_layers=int(mtp),
        pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = randomize(transformers.Glm4MoeForCausalLM(cfg).eval(), 0.1)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(bias_std * torch.randn(n_expert))
    model.save_pretrained(folder)
    if mtp:   # append layer `layers`: a copy of the last layer, perturbed, plus the nextn extras
        path = os.path.join(folder, "model.safetensors")
        sd = load_file(path)
        last = f"model.layers.{layers - 1}."
        for k in [k for k in sd if k.startswith(last)]:
            sd[k.replace(last, f"model.layers.{layers}.")] = sd[k] + 0.05 * torch.randn_like(sd[k])
        extra = f"model.layers.{layers}."
        sd[extra + "eh_proj.weight"] = 0.1 * torch.randn(hidden, 2 * hidden)
        for n in ("enorm", "hnorm", "shared_head.norm"):
            sd[extra + n + ".weight"] = torch.ones(hidden)
        save_file(sd, path, metadata={"format": "pt"})
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def run_cli(*args, stdin=None, env=None, timeout=300):
    """`python -m glmcpu ARGS` in a child process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "glmcpu", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=timeout)


def kl(p_logits, q_logits):
    """mean over positions of KL(softmax p || softmax q), in float64."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - np.logaddexp.reduce(p, -1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, -1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def rewrite(src, dst, arch=None, retype=None, meta=None, drop=(), typed=None, drop_keys=()):
    """Copy a GGUF, optionally renaming its architecture, re-storing one tensor in another type,
    changing metadata values (typed: key -> (value, GGUFValueType), added or replacing) or
    dropping tensors (drop) or metadata keys (drop_keys)."""
    from gguf import GGMLQuantizationType as GT, GGUFReader, GGUFValueType, GGUFWriter, quants

    r = GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch or old)
    for k, (v, t) in (typed or {}).items():
        w.add_key_value(k, v, t)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in (typed or {}) or k in drop_keys:
            continue
        v = (meta or {}).get(k, f.contents())
        key = k.replace(f"{old}.", f"{arch}.", 1) if arch else k
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, v, GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, v, f.types[0])
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if retype and t.name == retype[0] and retype[1] == GT.IQ4_NL:
            # gguf-py cannot quantise IQ4_NL; its blocks have Q4_0's size, so relabel Q4_0 bytes
            w.add_tensor(t.name, quants.quantize(data, GT.Q4_0), raw_dtype=GT.IQ4_NL)
        elif retype and t.name == retype[0]:
            w.add_tensor(t.name, quants.quantize(data, retype[1]), raw_dtype=retype[1])
        elif t.tensor_type in (GT.F32, GT.F16):
            w.add_tensor(t.name, data)
        else:                                   # quantised: the same bytes
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def relabel(raw: bytes, name: str, code: int) -> bytes:
    """A GGUF's bytes with tensor `name` labelled as ggml type `code` (its data untouched)."""
    raw = bytearray(raw)
    at = raw.index(name.encode()) + len(name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    code_at = at + 4 + 8 * n_dims
    raw[code_at:code_at + 4] = int(code).to_bytes(4, "little")
    return bytes(raw)


PROMPT = list(range(5, 17))      # token ids the cluster tests generate from


def start_worker(path, *extra, bind="tcp://127.0.0.1:*", env=None):
    model = ["--model", path] if path else []
    log = tempfile.TemporaryFile("w+")         # not a pipe: a worker that writes much never blocks on it
    p = subprocess.Popen([sys.executable, "-m", "glmcpu", "worker", "--bind", bind, *model, "-t", "1",
                          *extra], stdout=subprocess.PIPE, stderr=log, text=True,
                         env=dict(os.environ, **(env or {})))
    p.log = log
    line = p.stdout.readline()
    if not line.startswith("glmcpu worker on "):
        p.wait()
        log.seek(0)
        raise AssertionError(log.read())
    return p, line.split()[3]


def worker_log(p) -> str:
    """What a worker started by start_worker wrote to stderr so far."""
    p.log.seek(0)
    return p.log.read()


@pytest.fixture
def workers(tmp_path):
    """start(path, n, *extra, faults=None, lease=None) -> (processes, endpoints) of n `glmcpu
    worker`s on 127.0.0.1 (path None: without the file), each with its own --cache, all killed
    (and woken first) at the end; faults[i] ("kill:attn:9", "stop:load:1") makes worker i fail
    at that request."""
    procs = []

    def start(path, n, *extra, faults=None, lease=None):
        started = []
        for i in range(n):
            env = {"GLMCPU_WORKER_FAULT": faults[i]} if faults and faults[i] else None
            more = ("--lease", str(lease)) if lease else ()
            started.append(start_worker(path, "--cache", str(tmp_path / f"cache{i}"), *extra, *more, env=env))
        procs.extend(p for p, _ in started)
        return [p for p, _ in started], [e for _, e in started]
    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def greedy(m, n=12):
    """n greedy tokens (text pieces) after PROMPT."""
    return list(m.generate(PROMPT, max_tokens=n, temperature=0, ignore_eos=True))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Factory: (family, gguf type, **kw) -> (transformers model, gguf path), cached per session."""
    from glmcpu.convert import convert

    cache = {}

    def get(family="glm4", out_type="f32", fuse_qkv=False, **kw):
        key = (family, out_type, fuse_qkv, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}_{out_type}")
            hf = str(d / "hf")
            model = make_hf_moe(hf, **kw) if family == "glm4_moe" else make_hf_model(hf, family, **kw)
            path = str(d / "model.gguf")
            convert(hf, path, out_type, fuse_qkv=fuse_qkv)
            cache[key] = (model, path, hf)
        return cache[key]

    return get


def test_ids(n=40, seed=1, vocab=340):
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


# byte offsets of the fp16 scale fields in each block (the rest of a block is any bits)
F16_FIELDS = {"Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_blocks(rng, qtype, rows, cols, extreme=True):
    """Valid blocks of `qtype` for a [rows, cols] matrix with random bits and finite fp16
    scales -> (raw bytes [rows, row_bytes], float32 values by gguf.quants). With `extreme`, some
    blocks are all zero and some have scales near the fp16 limits (huge, tiny, subnormal)."""
    from gguf import GGML_QUANT_SIZES, quants
    bs, bb = GGML_QUANT_SIZES[qtype]
    nb = cols // bs
    raw = rng.integers(0, 256, (rows * nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype.name]:
        d = rng.uniform(-0.02, 0.02, rows * nb).astype(np.float16)
        if extreme and rows * nb > 4:
            d[1::7] = np.float16(rng.choice([3000.0, -2048.0, 1e-4, 6e-8]))
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    if extreme:
        raw[2::5] = 0                               # zero blocks
    raw = raw.reshape(rows, nb * bb)
    return raw, quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)


@pytest.fixture(autouse=True)
def cluster_topology(request, monkeypatch):
    """A test module's TOPOLOGY ("star" or "mesh") becomes every cluster's default there, in this
    process and in the `glmcpu` processes it starts: test_*_mesh.py run the cluster's tests again,
    unchanged, over a mesh."""
    topology = getattr(request.module, "TOPOLOGY", None)
    if topology:
        monkeypatch.setenv("GLMCPU_TOPOLOGY", topology)
    return topology or os.environ.get("GLMCPU_TOPOLOGY") or "star"
