"""Hugging Face GLM checkpoints (safetensors, sharded or not) -> GGUF as llama.cpp writes it.

One literal name map per family; weights are cast or quantised with the gguf package's own
reference code, norms and biases stay F32."""
import json
import os
import re
from glob import glob

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import ExpertGatingFuncType, GGUFWriter, TokenType
from safetensors import safe_open

from .errors import ConvertError
from .quantize import FILE_TYPES, QUANTIZATION_VERSION, add_tensor_info, encode, tensor_types

ARCHES = {"GlmForCausalLM": "chatglm", "Glm4ForCausalLM": "glm4", "Glm4MoeForCausalLM": "glm4moe"}
PRE = {"chatglm": "chatglm-bpe", "glm4": "glm4", "glm4moe": "glm4"}
# the types glmcpu runs today are written pure (every matrix in that type, llama.cpp's --pure);
# the K-quant file types get llama.cpp's mix of types (glmcpu.quantize)
PURE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

# Hugging Face name (after model.layers.N.) -> GGUF name (after blk.N.)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_self_attn_layernorm": "post_attention_norm",   # glm4: norm of the attention output
    "post_attention_layernorm": "ffn_norm",              # the pre-FFN norm, despite its name
    "post_mlp_layernorm": "post_ffw_norm",
    "mlp.gate_up_proj": "ffn_up",                        # [gate | up] rows, kept fused
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",                          # the MoE router
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "mlp.experts.*.gate_proj": "ffn_gate_exps",          # one HF tensor per expert, stacked
    "mlp.experts.*.up_proj": "ffn_up_exps",
    "mlp.experts.*.down_proj": "ffn_down_exps",
    # the MTP ("nextn") block that GLM-4.5 checkpoints store as layer num_hidden_layers
    "eh_proj": "nextn.eh_proj",
    "enorm": "nextn.enorm",
    "hnorm": "nextn.hnorm",
    "shared_head.head": "nextn.shared_head_head",
    "shared_head.norm": "nextn.shared_head_norm",
    "embed_tokens": "nextn.embed_tokens",
}
# glm4moe calls its pre-FFN norm post_attention_norm (it has no sandwich norms)
ARCH_NAMES = {"glm4moe": {"post_attention_layernorm": "post_attention_norm"}}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def read_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint folder")
    with open(path) as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHES:
        raise ConvertError(f"{hf_dir}: architecture {arch!r} is not one glmcpu converts "
                           f"({', '.join(ARCHES)})")
    return cfg, ARCHES[arch]


def rope_param(cfg, key, default):
    rp = cfg.get("rope_parameters") or {}
    return cfg.get(key, rp.get(key, default))


def scan_safetensors(hf_dir):
    """{name: (shard path, header entry)} over every shard; nothing is read yet."""
    files = sorted(glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConvertError(f"{hf_dir} has no .safetensors files")
    found = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:   # validates the header
            names = list(f.keys())
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name in names:
            found[name] = (path, dict(header[name], base=8 + n))
    return found


def load_tensor(name, path, info):
    """float32 array of one tensor (BF16 by hand: NumPy has no bfloat16)."""
    if info["dtype"] == "BF16":
        a, b = info["data_offsets"]
        raw = np.memmap(path, np.uint16, "r", info["base"] + a, ((b - a) // 2,))
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name).astype(np.float32)


def gguf_name(name, arch):
    """(GGUF name, expert index or None) for a Hugging Face tensor name, or (None, None)."""
    m = re.match(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$", name)
    if m:
        key, expert = m.group(2), None
        e = re.match(r"mlp\.experts\.(\d+)\.(.+)$", key)
        if e:
            key, expert = f"mlp.experts.*.{e.group(2)}", int(e.group(1))
        short = ARCH_NAMES.get(arch, {}).get(key) or LAYER_NAMES.get(key)
        if short is None:
            return None, None
        suffix = "" if short.endswith(".bias") else f".{m.group(3) or 'weight'}"
        return f"blk.{m.group(1)}.{short}{suffix}", expert
    m = re.match(r"(.+)\.(weight|bias)$", name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}", None
    return None, None


def add_tokenizer(w, hf_dir, arch, n_vocab):
    from tokenizers import Tokenizer

    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise ConvertError(f"{hf_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(path)
    with open(path) as f:
        model = json.load(f)["model"]
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: tokenizer model {model.get('type')} is not byte-level BPE")
    vocab = tok.get_vocab(with_added_tokens=True)
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        if i >= n_vocab:
            raise ConvertError(f"{path}: token {text!r} has id {i}, past the model's {n_vocab} rows")
        tokens[i] = text
        a = added.get(text)
        types[i] = TokenType.NORMAL if a is None else (TokenType.CONTROL if a.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE[arch])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: vocab.get(t) for t in ("<|endoftext|>", "<|user|>", "[gMASK]")}
    if ids["<|endoftext|>"] is not None:
        w.add_eos_token_id(ids["<|endoftext|>"])
        w.add_pad_token_id(ids["<|endoftext|>"])
        w.add_unk_token_id(ids["<|endoftext|>"])
    if ids["<|user|>"] is not None:
        w.add_eot_token_id(ids["<|user|>"])
    if ids["[gMASK]"] is not None:
        w.add_bos_token_id(ids["[gMASK]"])
    w.add_add_bos_token(False)                   # the chat template writes [gMASK]<sop> itself
    template = None
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            template = json.load(f).get("chat_template")
    jinja = os.path.join(hf_dir, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        with open(jinja) as f:
            template = f.read()
    if template:
        w.add_chat_template(template)


def convert(hf_dir, out_path, out_type="f16", fuse_qkv=False, progress=None):
    """Write `out_path`; `progress(done, total, name)` is called per tensor if given."""
    if out_type not in FILE_TYPES:
        raise ConvertError(f"--type {out_type} is not one of {', '.join(FILE_TYPES)}")
    cfg, arch = read_config(hf_dir)
    if fuse_qkv and arch != "chatglm":
        raise ConvertError("--fuse-qkv applies to GlmForCausalLM (GGUF chatglm) only")
    ftype = FILE_TYPES[out_type][0]
    n_layer, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // n_head
    n_vocab = cfg["vocab_size"]

    w = GGUFWriter(out_path, arch)
    w.add_name(os.path.basename(os.path.normpath(hf_dir)))
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(d)
    found = scan_safetensors(hf_dir)
    # GLM-4.5 checkpoints carry their MTP block as layer num_hidden_layers: llama.cpp counts it in
    # block_count and says so in nextn_predict_layers
    n_nextn = len({m.group(1) for n in found if (m := re.match(r"model\.layers\.(\d+)\.", n))
                   and int(m.group(1)) >= n_layer})
    w.add_block_count(n_layer + n_nextn)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(int(head_dim * rope_param(cfg, "partial_rotary_factor", 0.5)))
    w.add_rope_freq_base(float(rope_param(cfg, "rope_theta", 10000.0)))
    w.add_file_type(ftype)
    w.add_quantization_version(QUANTIZATION_VERSION)
    if arch == "glm4moe":
        if int(cfg.get("n_group", 1)) > 1:
            raise ConvertError(f"{hf_dir}: grouped routing (n_group > 1) is not supported")
        w.add_expert_count(cfg["n_routed_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_shared_count(cfg.get("n_shared_experts", 0))
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_leading_dense_block_count(cfg.get("first_k_dense_replace", 0))
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", True)))
        w.add_nextn_predict_layers(n_nextn)
    add_tokenizer(w, hf_dir, arch, n_vocab)

    # plan every tensor first (GGUF writes all tensor infos before any data), then stream the
    # data one tensor at a time so a checkpoint larger than RAM converts
    plan, qkv, experts = [], {}, {}        # plan: (gguf name, shape, [hf names], "cat" | "stack")
    for name, (path, info) in found.items():
        g, expert = gguf_name(name, arch)
        if g is None:
            if "rotary_emb" in name:
                continue
            raise ConvertError(f"{hf_dir}: tensor {name} has no GGUF name; is this a {arch} checkpoint?")
        if expert is not None:
            experts.setdefault(g, {})[expert] = name
        elif fuse_qkv and re.search(r"\.attn_[qkv]\.", g):
            qkv[g] = name
        else:
            plan.append((g, tuple(info["shape"]), [name], "cat"))
    for i in range(n_layer) if fuse_qkv else ():
        for kind in ("weight", "bias"):
            names = [qkv.pop(f"blk.{i}.attn_{x}.{kind}") for x in "qkv"]   # rows: Q, then K, then V
            shapes = [found[n][1]["shape"] for n in names]
            plan.append((f"blk.{i}.attn_qkv.{kind}", (sum(s[0] for s in shapes), *shapes[0][1:]), names, "cat"))
    for g, by_index in experts.items():
        n_exp = cfg.get("n_routed_experts")
        if sorted(by_index) != list(range(n_exp)):
            raise ConvertError(f"{hf_dir}: {g} has experts {sorted(by_index)[:5]}..., not 0..{n_exp - 1}")
        names = [by_index[e] for e in range(n_exp)]
        plan.append((g, (n_exp, *found[names[0]][1]["shape"]), names, "stack"))
    types = tensor_types({g: (shape, GT.F32) for g, shape, _, _ in plan}, out_type, n_layer + n_nextn,
                         cfg.get("n_routed_experts", 0) if arch == "glm4moe" else 0,
                         pure=out_type in PURE_TYPES,
                         n_gqa=n_head // cfg.get("num_key_value_heads", n_head))
    for g, shape, _, _ in plan:
        add_tensor_info(w, g, shape, types[g])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (g, shape, names, how) in enumerate(plan):
        parts = [load_tensor(n, *found[n]) for n in names]
        arr = np.stack(parts) if how == "stack" else np.concatenate(parts, 0)
        w.write_tensor_data(encode(arr, types[g]))
        if progress:
            progress(i + 1, len(plan), g)
    w.close()
    return out_path
