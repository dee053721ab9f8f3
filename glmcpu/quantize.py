"""Which ggml type each tensor gets in a llama.cpp file type ("Q4_K_M", ...), and re-quantising a
float GGUF into one.

The mix follows llama.cpp's llama_tensor_get_type for the GLM families (no importance matrix),
checked tensor by tensor against llama.cpp itself in tests/test_quantize.py:
- only tensors of 2+ dimensions whose name ends in "weight" are quantised; norms and the MoE router
  (ffn_gate_inp) keep the type they have in the source;
- output.weight (or token_embd when the output is tied to it) gets Q6_K, or Q8_0 if its rows are
  not whole blocks of the file type's block size;
- attn_v / attn_qkv get more bits: Q6_K in the use_more_bits layers for Q4_K_M / Q5_K_M, Q5_K in
  the first four for Q4_K_S, Q5_K in the first two (then Q4_K) for Q3_K_M, Q5_K for Q3_K_L, Q4_K
  (grouped-query attention, 4+ heads per KV head) or Q3_K for Q2_K. They are counted in layer
  order (blk.N numerically, whatever the file order);
- ffn_down likewise by layer (for MoE models the layer is read from the name, so ffn_down_exps and
  ffn_down_shexp both count); attn_output gets one step more for Q2_K / Q3_K_M / Q3_K_L;
- with exactly 8 experts attn_k and attn_v become Q8_0, and attn_output Q5_K for Q2_K to Q4_K_M and
  the IQ4 types;
- a K-quant whose rows are not whole 256-blocks falls back: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; anything still not whole blocks is F16 (llama.cpp
  refuses there);
- IQ4_NL / IQ4_XS (no importance matrix): attn_v Q5_K with 4+ query heads per KV head, ffn_down Q5_K
  in the first eighth of the layers.
"""
import os
import re

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as GT
from gguf import quants as gguf_quants

from . import quants
from .errors import QuantizeError
from .gguf import GGUFFile

LFT = LlamaFileType
# file type name -> (general.file_type, the type most tensors get)
FILE_TYPES = {
    "f32": (LFT.ALL_F32, GT.F32), "f16": (LFT.MOSTLY_F16, GT.F16), "bf16": (LFT.MOSTLY_BF16, GT.BF16),
    "q8_0": (LFT.MOSTLY_Q8_0, GT.Q8_0), "q4_0": (LFT.MOSTLY_Q4_0, GT.Q4_0),
    "q4_1": (LFT.MOSTLY_Q4_1, GT.Q4_1), "q5_0": (LFT.MOSTLY_Q5_0, GT.Q5_0),
    "q5_1": (LFT.MOSTLY_Q5_1, GT.Q5_1),
    "q2_k": (LFT.MOSTLY_Q2_K, GT.Q2_K), "q3_k_s": (LFT.MOSTLY_Q3_K_S, GT.Q3_K),
    "q3_k_m": (LFT.MOSTLY_Q3_K_M, GT.Q3_K), "q3_k_l": (LFT.MOSTLY_Q3_K_L, GT.Q3_K),
    "q4_k_s": (LFT.MOSTLY_Q4_K_S, GT.Q4_K), "q4_k_m": (LFT.MOSTLY_Q4_K_M, GT.Q4_K),
    "q5_k_s": (LFT.MOSTLY_Q5_K_S, GT.Q5_K), "q5_k_m": (LFT.MOSTLY_Q5_K_M, GT.Q5_K),
    "q6_k": (LFT.MOSTLY_Q6_K, GT.Q6_K),
    "iq4_nl": (LFT.MOSTLY_IQ4_NL, GT.IQ4_NL), "iq4_xs": (LFT.MOSTLY_IQ4_XS, GT.IQ4_XS),
}
IQ4_FILES = (LFT.MOSTLY_IQ4_NL, LFT.MOSTLY_IQ4_XS)
FLOATS = (GT.F32, GT.F16, GT.BF16)
K_FALLBACK = {GT.Q2_K: GT.Q4_0, GT.Q3_K: GT.Q4_0, GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0,
              GT.IQ4_XS: GT.IQ4_NL}
EXPERTS_BUMPED = 8          # llama.cpp gives Mixtral-style 8-expert models more bits in attention
QUANTIZATION_VERSION = 2    # general.quantization_version, as ggml writes it (GGML_QNT_VERSION)
VALUES_PER_PASS = 1 << 24   # source values made float32 at a time (64 MiB), so expert stacks fit


def use_more_bits(i, n):
    """The layers llama.cpp gives more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name, shape):
    """shape in NumPy order; leading 1s do not count as dimensions (as ggml_n_dims)."""
    dims = len(shape) - next((i for i, s in enumerate(shape) if s != 1), len(shape) - 1)
    return (dims >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")
            and "ffn_gate_inp.weight" not in name)


def layer_order(name):
    """Sort key: blk.N tensors by N, then by name (as llama.cpp's loader orders its weights)."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def block_fits(qtype, n_cols):
    return n_cols % GGML_QUANT_SIZES[qtype][0] == 0


def attn_v_type(ftype, new, i, n, n_gqa):
    """attn_v / attn_qkv number i of n."""
    if ftype == LFT.MOSTLY_Q2_K:
        return GT.Q4_K if n_gqa >= 4 else GT.Q3_K
    if ftype == LFT.MOSTLY_Q3_K_M:
        return GT.Q5_K if i < 2 else GT.Q4_K
    if ftype == LFT.MOSTLY_Q3_K_L:
        return GT.Q5_K
    if ftype in IQ4_FILES and n_gqa >= 4:
        return GT.Q5_K
    if ftype in (LFT.MOSTLY_Q4_K_M, LFT.MOSTLY_Q5_K_M) and use_more_bits(i, n):
        return GT.Q6_K
    if ftype == LFT.MOSTLY_Q4_K_S and i < 4:
        return GT.Q5_K
    return new


def ffn_down_type(ftype, new, i, n):
    """ffn_down* of layer i of n."""
    if ftype == LFT.MOSTLY_Q2_K:
        return GT.Q3_K
    if ftype == LFT.MOSTLY_Q3_K_M:
        return GT.Q5_K if i < n // 16 else GT.Q4_K
    if ftype == LFT.MOSTLY_Q3_K_L:
        return GT.Q5_K
    if ftype in (LFT.MOSTLY_Q4_K_M, LFT.MOSTLY_Q5_K_M) and use_more_bits(i, n):
        return GT.Q6_K
    if (ftype == LFT.MOSTLY_Q4_K_S or ftype in IQ4_FILES) and i < n // 8:   # IQ4: without an imatrix
        return GT.Q5_K
    return new


def attn_output_type(ftype, new, n_expert):
    if n_expert == EXPERTS_BUMPED:
        low = (LFT.MOSTLY_Q2_K, LFT.MOSTLY_Q3_K_S, LFT.MOSTLY_Q3_K_M, LFT.MOSTLY_Q4_K_S, LFT.MOSTLY_Q4_K_M) + IQ4_FILES
        return GT.Q5_K if ftype in low else new
    return {LFT.MOSTLY_Q2_K: GT.Q3_K, LFT.MOSTLY_Q3_K_M: GT.Q4_K, LFT.MOSTLY_Q3_K_L: GT.Q5_K}.get(ftype, new)


def tensor_types(tensors, file_type, n_layer, n_expert=0, pure=False, n_gqa=1):
    """{name: ggml type} for every tensor of a file quantised to `file_type`; pure=True skips the
    mix (every quantisable tensor gets the file type's type, or its fallback).
    tensors: {name: (shape in NumPy order, source type)}; n_gqa: query heads per KV head."""
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"--type {file_type} is not one of {', '.join(FILE_TYPES)}")
    ftype, default = FILE_TYPES[file_type]
    names = sorted(tensors, key=layer_order)     # the attn_v / ffn_down counters walk this order
    tied = "output.weight" not in tensors
    is_attn_v = re.compile(r"attn_(v|qkv)\.weight").search
    n_attn_v = sum(1 for n in names if is_attn_v(n))
    i_attn_v = i_ffn_down = 0
    out = {}
    for name in names:
        shape, src = tensors[name]
        if not quantizable(name, shape):
            out[name] = src
            continue
        new, n_cols = default, shape[-1]
        if default in FLOATS or pure:
            pass
        elif name == "output.weight" or (tied and name == "token_embd.weight"):
            new = GT.Q8_0 if not block_fits(default, n_cols) or default == GT.Q8_0 else GT.Q6_K
        elif name == "token_embd.weight":
            pass
        elif is_attn_v(name):
            new = GT.Q8_0 if n_expert == EXPERTS_BUMPED else attn_v_type(ftype, new, i_attn_v, n_attn_v, n_gqa)
            i_attn_v += 1
        elif "attn_k.weight" in name:
            new = GT.Q8_0 if n_expert == EXPERTS_BUMPED else new
        elif "attn_output.weight" in name:
            new = attn_output_type(ftype, new, n_expert)
        elif "ffn_down" in name:
            # MoE: the layer from the name (llama.cpp's rule since Mixtral's experts were scattered)
            i = int(re.match(r"blk\.(\d+)\.", name).group(1)) if n_expert > 1 else i_ffn_down
            new = ffn_down_type(ftype, new, i, n_layer)
            i_ffn_down += 1
        if new not in FLOATS and not block_fits(new, n_cols):
            new = K_FALLBACK.get(new, GT.F16)
            if not block_fits(new, n_cols):
                new = GT.F16
        out[name] = new
    return out


def encode(arr, qtype):
    """float32 array [..., n_cols] -> what GGUFWriter takes for qtype."""
    if qtype == GT.F32:
        return np.ascontiguousarray(arr, np.float32)
    if qtype == GT.F16:
        return np.ascontiguousarray(arr, np.float16)
    return quants.quantize(np.ascontiguousarray(arr, np.float32), qtype)


def requantize(t, qtype):
    """A float GGUF tensor (glmcpu.gguf.Tensor) in qtype, a slab of rows at a time: what
    GGUFWriter.write_tensor_data takes."""
    src = np.asarray(t.data).reshape(-1, t.data.shape[-1])        # [rows, values or bytes per row]
    n_cols = int(t.shape[0])
    step = max(1, VALUES_PER_PASS // n_cols)
    out = None
    for i in range(0, len(src), step):
        part = encode(gguf_quants.dequantize(src[i:i + step], t.tensor_type).reshape(-1, n_cols), qtype)
        if out is None:
            out = np.empty((len(src), part.shape[-1]), part.dtype)    # [rows, encoded row]
        out[i:i + step] = part
    return out.reshape(*reversed([int(s) for s in t.shape[1:]]), -1)


def add_tensor_info(w, name, shape, qtype):
    """Declare one tensor (shape in NumPy order) before any data is written."""
    if qtype in (GT.F32, GT.F16):
        dt = np.dtype(np.float32 if qtype == GT.F32 else np.float16)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    else:
        byte_shape = gguf_quants.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


# keys GGUFWriter writes itself, or that this file's new layout makes wrong
SKIP_KEYS = ("GGUF.", "general.architecture", "general.alignment", "general.file_type",
             "general.quantization_version", "split.")


def copy_metadata(reader, w):
    for field in reader.fields.values():
        if field.name.startswith(SKIP_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        if sub == GGUFValueType.ARRAY:
            raise QuantizeError(f"metadata key {field.name} is a nested array, which glmcpu cannot copy")
        w.add_key_value(field.name, field.contents(), vtype, sub)


def quantize_gguf(src, dst, file_type, pure=False, progress=None):
    """Re-quantise the F32/F16/BF16 GGUF `src` into `dst` with llama.cpp's mix for `file_type`.
    `progress(done, total, name)` is called per tensor if given."""
    f = GGUFFile(src)                       # named errors for missing / non-GGUF / truncated files
    if os.path.abspath(src) == os.path.abspath(dst):
        raise QuantizeError(f"{dst} is the input file; write the quantised model somewhere else")
    done = sorted({t.tensor_type.name for t in f.tensors.values() if t.tensor_type not in FLOATS})
    if done:
        raise QuantizeError(f"{src} is already quantised ({', '.join(done)}); glmcpu quantize reads "
                            "F32/F16/BF16 GGUFs (convert the Hugging Face checkpoint to f16 first)")
    shapes = {n: (tuple(reversed(t.shape)), t.tensor_type) for n, t in f.tensors.items()}
    n_head = f.number("attention.head_count")
    n_kv = f.number("attention.head_count_kv", n_head)
    types = tensor_types(shapes, file_type, f.number("block_count"), f.number("expert_count", 0, minimum=0),
                         pure, n_head // n_kv)
    reader = GGUFReader(src)
    w = GGUFWriter(dst, f.arch)
    copy_metadata(reader, w)
    w.add_file_type(FILE_TYPES[file_type][0])
    w.add_quantization_version(QUANTIZATION_VERSION)
    order = [t.name for t in reader.tensors]          # keep the source's tensor order
    for name in order:
        add_tensor_info(w, name, shapes[name][0], types[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, name in enumerate(order):
        t = f.tensors[name]
        if types[name] == t.tensor_type:
            w.write_tensor_data(np.asarray(t.data))   # unchanged: copy the bytes
        else:
            w.write_tensor_data(requantize(t, types[name]))
        if progress:
            progress(i + 1, len(order), name)
    w.close()
    return types
