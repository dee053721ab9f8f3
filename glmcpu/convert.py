"""Hugging Face GLM checkpoints (safetensors, sharded or not) -> GGUF as llama.cpp writes it.

One literal name map per family; weights are cast or quantised with the gguf package's own
reference code, norms and biases stay F32."""
import json
import os
import re
from glob import glob

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFWriter, LlamaFileType, TokenType, quants
from safetensors import safe_open

from .errors import ConvertError

ARCHES = {"GlmForCausalLM": "chatglm", "Glm4ForCausalLM": "glm4"}
PRE = {"chatglm": "chatglm-bpe", "glm4": "glm4"}
TYPES = {"f32": (GT.F32, LlamaFileType.ALL_F32), "f16": (GT.F16, LlamaFileType.MOSTLY_F16),
         "bf16": (GT.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (GT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
         "q4_0": (GT.Q4_0, LlamaFileType.MOSTLY_Q4_0)}

# Hugging Face name (after model.layers.N.) -> GGUF name (after blk.N.)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_self_attn_layernorm": "post_attention_norm",   # glm4: norm of the attention output
    "post_attention_layernorm": "ffn_norm",              # the pre-FFN norm, despite its name
    "post_mlp_layernorm": "post_ffw_norm",
    "mlp.gate_up_proj": "ffn_up",                        # [gate | up] rows, kept fused
    "mlp.down_proj": "ffn_down",
}
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


def gguf_name(name):
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m:
        short = LAYER_NAMES.get(m.group(2))
        return None if short is None else f"blk.{m.group(1)}.{short}.{m.group(3)}"
    m = re.match(r"(.+)\.(weight|bias)$", name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def pick_type(shape, qtype):
    """1-D tensors (norms, biases) stay F32; rows that are not whole 32-blocks fall back to F16."""
    if len(shape) < 2:
        return GT.F32
    if qtype in (GT.Q8_0, GT.Q4_0) and shape[-1] % 32:
        return GT.F16
    return qtype


def encode_tensor(arr, qtype):
    if qtype == GT.F32:
        return np.ascontiguousarray(arr, np.float32)
    if qtype == GT.F16:
        return np.ascontiguousarray(arr, np.float16)
    return quants.quantize(np.ascontiguousarray(arr, np.float32), qtype)


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
    if out_type not in TYPES:
        raise ConvertError(f"--type {out_type} is not one of {', '.join(TYPES)}")
    cfg, arch = read_config(hf_dir)
    if fuse_qkv and arch != "chatglm":
        raise ConvertError("--fuse-qkv applies to GlmForCausalLM (GGUF chatglm) only")
    qtype, ftype = TYPES[out_type]
    n_layer, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // n_head
    n_vocab = cfg["vocab_size"]

    w = GGUFWriter(out_path, arch)
    w.add_name(os.path.basename(os.path.normpath(hf_dir)))
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(int(head_dim * rope_param(cfg, "partial_rotary_factor", 0.5)))
    w.add_rope_freq_base(float(rope_param(cfg, "rope_theta", 10000.0)))
    w.add_file_type(ftype)
    add_tokenizer(w, hf_dir, arch, n_vocab)

    # plan every tensor first (GGUF writes all tensor infos before any data), then stream the
    # data one tensor at a time so a checkpoint larger than RAM converts
    found = scan_safetensors(hf_dir)
    plan, qkv = [], {}                                 # plan: (gguf name, shape, [hf names])
    for name, (path, info) in found.items():
        g = gguf_name(name)
        if g is None:
            if "rotary_emb" in name:
                continue
            raise ConvertError(f"{hf_dir}: tensor {name} has no GGUF name; is this a {arch} checkpoint?")
        if fuse_qkv and re.search(r"\.attn_[qkv]\.", g):
            qkv[g] = name
            continue
        plan.append((g, tuple(info["shape"]), [name]))
    for i in range(n_layer) if fuse_qkv else ():
        for kind in ("weight", "bias"):
            names = [qkv.pop(f"blk.{i}.attn_{x}.{kind}") for x in "qkv"]   # rows: Q, then K, then V
            shapes = [found[n][1]["shape"] for n in names]
            plan.append((f"blk.{i}.attn_qkv.{kind}", (sum(s[0] for s in shapes), *shapes[0][1:]), names))
    for g, shape, _ in plan:
        qt = pick_type(shape, qtype)
        if qt in (GT.F32, GT.F16):
            dt = np.float32 if qt == GT.F32 else np.float16
            w.add_tensor_info(g, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
        else:
            byte_shape = quants.quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(g, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (g, shape, names) in enumerate(plan):
        arr = np.concatenate([load_tensor(n, *found[n]) for n in names], 0)
        w.write_tensor_data(encode_tensor(arr, pick_type(shape, qtype)))
        if progress:
            progress(i + 1, len(plan), g)
    w.close()
    return out_path
