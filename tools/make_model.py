#!/usr/bin/env python3
"""Write a random-weight GGUF of the real GLM-4-9B or GLM-4.5-Air shape, N layers.

The weights are random blocks written directly in the target type (no float pass), so a
4-layer Q4_0 file of the full width (~1.2 GB) takes seconds. For speed tests, not for text.

    python tools/make_model.py glm4-9b-4l-q4_0.gguf --layers 4 --type q4_0
    python tools/make_model.py air-3l-q4_0.gguf --arch glm4moe --layers 3   # 1 dense + 2 MoE
    python tools/make_model.py glm4-9b-4l-q4_k_m.gguf --type q4_k_m   # F16, then llama.cpp's quantiser

The K-quant mixes (q4_k_m, q5_k_m, q6_k, ...) are what people download; they are made the way
people make them, by llama.cpp itself (llama-cpp-python), from an F16 file written first.
"""
import os
import argparse

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import ExpertGatingFuncType, GGUFWriter, LlamaFileType, TokenType

SHAPE_9B = dict(d=4096, ff=13696, heads=32, kv=2, head_dim=128, vocab=151552)
SHAPE_AIR = dict(d=4096, ff=10944, heads=96, kv=8, head_dim=128, vocab=151552,
                 experts=128, used=8, ff_exp=1408, dense=1)
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
            "<|user|>", "<|assistant|>", "<|observation|>"]
FIRST_SPECIAL = 151329
STD = 0.02          # weight standard deviation: keeps 4 random layers' activations finite in fp16
FTYPES = {"q4_0": (GT.Q4_0, LlamaFileType.MOSTLY_Q4_0), "q8_0": (GT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
          "f16": (GT.F16, LlamaFileType.MOSTLY_F16), "f32": (GT.F32, LlamaFileType.ALL_F32)}
LLAMA_FTYPES = ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q3_k_s", "q2_k", "q5_0", "q4_1",
                "iq4_nl", "iq4_xs"]


def byte_level_alphabet():
    """GPT-2's printable stand-ins for the 256 byte values (the first 256 tokens)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def random_weight(rng, rows, cols, qtype, std=STD):
    """[rows, cols] random weights stored as `qtype` (bytes for Q types, float16 for F16, the same
    f16-rounded values in float32 for F32)."""
    if qtype in (GT.F16, GT.F32):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16).astype(
            np.float16 if qtype == GT.F16 else np.float32)
    nb = cols // 32
    if qtype == GT.Q4_0:
        blocks = np.empty((rows, nb, 18), np.uint8)
        q = rng.integers(1, 16, (rows, nb, 2, 16), dtype=np.uint8)   # values -7..7: mean 0, as a
        blocks[..., 2:] = q[..., 0, :] | (q[..., 1, :] << 4)          # trained matrix's (0..15 has -0.5)
        d = std / 4.32                                   # std of a uniform nibble - 8 in -7..7
    else:
        blocks = rng.integers(0, 256, (rows, nb, 34), dtype=np.uint8)
        blocks[..., 2:] = rng.integers(-127, 128, (rows, nb, 32), dtype=np.int8).view(np.uint8)
        d = std / 73.0                                   # std of uniform int8 in [-127, 127]
    scales = (d * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    blocks[..., :2] = scales[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def write(path, layers, qtype_name, arch="glm4", seed=0, shape=None, mtp=False):
    """mtp (glm4moe): add GLM-4.5's MTP block as layer `layers` (a MoE layer + the nextn tensors)."""
    mtp = bool(mtp and arch == "glm4moe")
    qtype, ftype = FTYPES[qtype_name]
    shape = shape or (SHAPE_AIR if arch == "glm4moe" else SHAPE_9B)
    s, rng = shape, np.random.default_rng(seed)
    first_special = s.get("first_special", FIRST_SPECIAL)     # small test vocabularies move them
    w = GGUFWriter(path, arch)
    w.add_name(f"random {'GLM-4.5-Air' if arch == 'glm4moe' else 'GLM-4-9B'}-shaped {layers}-layer {qtype_name}")
    w.add_context_length(8192)
    w.add_embedding_length(s["d"])
    w.add_block_count(layers + mtp)
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_layer_norm_rms_eps(1.5625e-07 if arch == "chatglm" else 1e-5)
    w.add_rope_dimension_count(s["head_dim"] // 2)
    w.add_rope_freq_base(1e6 if arch == "glm4moe" else 10000.0)
    w.add_file_type(ftype)
    if arch == "glm4moe":
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["used"])
        w.add_expert_shared_count(1)
        w.add_expert_feed_forward_length(s["ff_exp"])
        w.add_leading_dense_block_count(s["dense"])
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(1.0)
        w.add_expert_weights_norm(True)
        w.add_nextn_predict_layers(int(mtp))
    alphabet = byte_level_alphabet()
    tokens = alphabet + ["to", "Ġt"] + [f"tok{i}" for i in range(258, s["vocab"])]
    types = [TokenType.NORMAL] * s["vocab"]
    for j, t in enumerate(SPECIALS):
        tokens[first_special + j], types[first_special + j] = t, TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("chatglm-bpe" if arch == "chatglm" else "glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["t o", "Ġ t"])
    w.add_eos_token_id(first_special)
    w.add_eot_token_id(first_special + 7)

    d, qkv = s["d"], (s["heads"] + 2 * s["kv"]) * s["head_dim"]
    ones = np.ones(d, np.float32)
    raw = None if qtype in (GT.F16, GT.F32) else qtype

    # GPT-2's initialisation: unit embeddings, and the projections into the residual stream
    # (attention output, FFN and expert down) scaled by 1/sqrt(2 x layers). With every weight at
    # 0.02 the layers' outputs swamp the embeddings, every token's hidden state is the same, and a
    # MoE router sends every token to the same experts (the best case for a batch of tokens);
    # this way consecutive tokens share about as many experts as at random, somewhat more deeper.
    std = s.get("std", STD)
    res = std / np.sqrt(2 * max(layers, 1))

    def weight(rows, cols, sd=std):
        return random_weight(rng, rows, cols, qtype, sd)
    w.add_tensor("token_embd.weight", weight(s["vocab"], d, s.get("embd_std", 1.0)), raw_dtype=raw)
    for i in range(layers + mtp):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        if arch == "chatglm":
            w.add_tensor(p + "attn_qkv.weight", weight(qkv, d), raw_dtype=raw)
            w.add_tensor(p + "attn_qkv.bias", np.zeros(qkv, np.float32))
        else:
            w.add_tensor(p + "attn_q.weight", weight(s["heads"] * s["head_dim"], d),
                         raw_dtype=raw)
            w.add_tensor(p + "attn_q.bias", np.zeros(s["heads"] * s["head_dim"], np.float32))
            for n in ("attn_k", "attn_v"):
                w.add_tensor(p + n + ".weight", weight(s["kv"] * s["head_dim"], d), raw_dtype=raw)
                w.add_tensor(p + n + ".bias", np.zeros(s["kv"] * s["head_dim"], np.float32))
        w.add_tensor(p + "attn_output.weight", weight(d, s["heads"] * s["head_dim"], res), raw_dtype=raw)
        if arch == "glm4":
            w.add_tensor(p + "post_attention_norm.weight", ones)
        if arch == "glm4moe":                       # glm4moe's pre-FFN norm has this name
            w.add_tensor(p + "post_attention_norm.weight", ones)
        else:
            w.add_tensor(p + "ffn_norm.weight", ones)
        if arch == "glm4moe" and i >= s["dense"]:
            E, fe = s["experts"], s["ff_exp"]
            w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((E, d)) * STD).astype(np.float32))
            w.add_tensor(p + "exp_probs_b.bias", (rng.standard_normal(E) * 0.01).astype(np.float32))
            for n, rows, cols in (("gate", fe, d), ("up", fe, d), ("down", d, fe)):
                sd = res if n == "down" else std
                exps = np.stack([weight(rows, cols, sd) for _ in range(E)])
                w.add_tensor(p + f"ffn_{n}_exps.weight", exps, raw_dtype=raw)
                w.add_tensor(p + f"ffn_{n}_shexp.weight", weight(rows, cols, sd), raw_dtype=raw)
        elif arch == "glm4moe":
            for n, rows, cols in (("gate", s["ff"], d), ("up", s["ff"], d), ("down", d, s["ff"])):
                w.add_tensor(p + f"ffn_{n}.weight", weight(rows, cols, res if n == "down" else std), raw_dtype=raw)
        else:
            w.add_tensor(p + "ffn_up.weight", weight(2 * s["ff"], d), raw_dtype=raw)
            w.add_tensor(p + "ffn_down.weight", weight(d, s["ff"], res), raw_dtype=raw)
        if arch == "glm4":
            w.add_tensor(p + "post_ffw_norm.weight", ones)
        if i == layers:                             # the MTP block's own tensors
            w.add_tensor(p + "nextn.eh_proj.weight", weight(d, 2 * d), raw_dtype=raw)
            for n in ("enorm", "hnorm", "shared_head_norm"):
                w.add_tensor(p + f"nextn.{n}.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weight(s["vocab"], d), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--type", default="q4_0", choices=list(FTYPES) + LLAMA_FTYPES)
    p.add_argument("--arch", default="glm4", choices=["glm4", "chatglm", "glm4moe"],
                   help="glm4/chatglm: GLM-4-9B shape; glm4moe: GLM-4.5-Air shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp", action="store_true", help="glm4moe: add the MTP (nextn) block as one more layer")
    p.add_argument("--from", dest="source", metavar="GGUF",
                   help="llama.cpp's mixes: quantise this file (e.g. a Q4_0 one of this tool) instead of "
                        "writing an F16 first (a 9-layer Air in F16 is 38 GB); for speed files, whose values "
                        "do not matter")
    a = p.parse_args()
    if a.type in LLAMA_FTYPES:
        import llama_cpp
        tmp = a.source or a.output + ".f16.tmp"
        if not a.source:
            write(tmp, a.layers, "f16", a.arch, a.seed)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{a.type.upper()}")
        params.nthread = os.cpu_count() or 1
        params.allow_requantize = bool(a.source)
        try:
            if llama_cpp.llama_model_quantize(tmp.encode(), a.output.encode(), params) != 0:
                raise SystemExit(f"llama.cpp could not quantise {tmp} to {a.type}")
        finally:
            if not a.source:
                os.remove(tmp)
    else:
        write(a.output, a.layers, a.type, a.arch, a.seed, mtp=a.mtp)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
