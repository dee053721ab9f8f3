#!/usr/bin/env python3
"""Train a tiny GLM-4-architecture demo model (plus tokenizer) on CPU.

The output directory is a normal Hugging Face checkpoint (config.json,
model.safetensors in float32, tokenizer.json, tokenizer_config.json with the
GLM-4 chat template), small enough to ship as a glmcpu test/demo model.

Corpus: the King James Bible (public domain) from Debian's bible-kjv package.
The plain text file was produced like this (one verse per line, a blank line
between chapters, verse references stripped):

    apt-get install -y bible-kjv
    bible -f gen1:1-rev22:21 \\
      | awk '{ref=$1; sub(/:[0-9]+$/,"",ref); if (NR>1 && ref!=prev) print "";
              prev=ref; $1=""; sub(/^ /,""); print}' > demo_corpus.txt

Usage:
    nice -n 5 python tools/train_demo.py --corpus demo_corpus.txt \\
        --out demo_hf --minutes 28

With --moe, a tiny GLM-4.5-style model instead (Glm4MoeForCausalLM: a dense first layer, then
routed + shared experts) with its multi-token-prediction block trained beside it on the same text
(loss: next token + 0.3 x the token after it, from the MTP block); the checkpoint stores the block
as layer num_hidden_layers, as GLM-4.5's do, so `glmcpu convert` writes its nextn tensors:

    python tools/train_demo.py --corpus demo_corpus.txt --out moe_hf --minutes 10 --moe
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, Glm4Config, Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

# The GLM-4 pre-tokenizer split pattern (as in the real GLM-4 tokenizer.json).
GLM4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
IGNORE = -100  # label value ignored by the cross-entropy loss


def train_tokenizer(text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Reserve room so that the special tokens, added afterwards, take the last ids.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def save_tokenizer(tok, out):
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "model_max_length": 512, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class Batcher:
    """Makes the training mixture: raw text windows and chat-formatted continuations."""

    def __init__(self, tok, text, seq_len):
        self.tok, self.seq_len = tok, seq_len
        self.ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.stream = tok.encode(text).ids  # whole corpus as one token stream
        self.verses = [line for line in text.splitlines() if line.strip()]
        self.prefix = [self.ids["[gMASK]"], self.ids["<sop>"]]

    def raw_sample(self):
        n = self.seq_len - len(self.prefix)
        start = random.randrange(len(self.stream) - n)
        ids = self.prefix + self.stream[start:start + n]
        labels = [IGNORE] * len(self.prefix) + ids[len(self.prefix):]
        return ids, labels

    def chat_sample(self):
        # The user gives the first few words of a passage; the assistant goes on from there.
        i = random.randrange(len(self.verses))
        words = self.verses[i].split()
        k = random.randint(3, min(8, max(3, len(words) - 1)))
        passage = [" ".join(words[k:])] + self.verses[i + 1:i + random.randint(1, 4)]
        prompt = self.tok.encode(
            "[gMASK]<sop><|user|>\n" + " ".join(words[:k]) + "<|assistant|>").ids
        reply = self.tok.encode("\n" + "\n".join(passage).strip()).ids
        # Like GLM-4, a finished turn ends by starting the next user turn.
        reply = (reply + [self.ids["<|user|>"]])[:self.seq_len - len(prompt)]
        pad = self.seq_len - len(prompt) - len(reply)
        ids = prompt + reply + [self.ids["<|endoftext|>"]] * pad
        labels = [IGNORE] * len(prompt) + reply + [IGNORE] * pad
        return ids, labels

    def batch(self, size):
        samples = [self.raw_sample() if j % 2 else self.chat_sample() for j in range(size)]
        ids, labels = zip(*samples)
        return torch.tensor(ids), torch.tensor(labels)


def build_model(tok):
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Glm4Config(
        vocab_size=tok.get_vocab_size(), hidden_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        intermediate_size=704, attention_bias=True, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
    return Glm4ForCausalLM(config)


def build_moe(tok, layers=4):
    """A tiny GLM-4.5: 4 layers (1 dense), 8 routed experts (top 2) + 1 shared, NeoX RoPE on half
    of each head, q/k norms off, and an MTP block (transformers' MtpModel) beside it."""
    from transformers.modeling_layers import MtpModel
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Glm4MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=192, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, intermediate_size=512,
        moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=True,
        partial_rotary_factor=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False, num_nextn_predict_layers=1,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]])
    model = Glm4MoeForCausalLM(config)
    mtp = MtpModel(model, 1)
    with torch.no_grad():       # MtpModel's own init leaves the expert tensors uninitialised (torch.empty)
        for module in mtp.layers.modules():
            model._init_weights(module)
    return model, mtp


def moe_loss(model, mtp, ids, labels, weight=0.3):
    """Next-token loss of the model, plus `weight` x the MTP block's loss on the token after next
    (its input at position p: the token at p and the model's final-normed hidden state at p - 1)."""
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    h = out.hidden_states[-1]
    pos = torch.arange(1, ids.shape[1])[None].expand(ids.shape[0], -1)
    mh = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=ids[:, 1:])
    logits = mtp._project_to_logits(mh)[:, :-1]                  # predicts the tokens at 2..
    mtp_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[:, 2:].reshape(-1), ignore_index=IGNORE)
    return out.loss + weight * mtp_loss, mtp_loss


def save_moe(model, mtp, out):
    """The checkpoint GLM-4.5 ships: the model, and the MTP block as layer num_hidden_layers
    (its decoder layer in the hub's per-expert layout, written through an (L+1)-layer model)."""
    from safetensors.torch import load_file, save_file
    L = model.config.num_hidden_layers
    cfg = Glm4MoeConfig.from_dict({**model.config.to_dict(), "num_hidden_layers": L + 1})
    big = Glm4MoeForCausalLM(cfg)
    state = model.state_dict()
    state.update({f"model.layers.{L}.{k}": v for k, v in mtp.layers[0].mtp_block.state_dict().items()})
    big.load_state_dict(state)
    big.save_pretrained(out)
    sd = load_file(str(out / "model.safetensors"))
    block = mtp.layers[0]
    for ours, name in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                       ("post_norm", "shared_head.norm")):
        sd[f"model.layers.{L}.{name}.weight"] = getattr(block, ours).weight.detach().clone().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["Glm4MoeForCausalLM"]
    model.config.save_pretrained(out)              # num_hidden_layers = L, num_nextn_predict_layers = 1


def lr_at(step, elapsed, args):
    # Linear warmup by steps, then cosine decay by the fraction of the time budget used.
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, elapsed / (args.minutes * 60))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))


def sample(out, prompt="Once upon a time", max_new_tokens=80):
    tok = AutoTokenizer.from_pretrained(out)
    model = Glm4ForCausalLM.from_pretrained(out).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    torch.manual_seed(0)
    lines = [f"prompt ids: {ids[0].tolist()}"]
    for name, kw in [("greedy", {"do_sample": False}),
                     ("sampled", {"do_sample": True, "temperature": 0.8, "top_p": 0.9})]:
        gen = model.generate(ids, max_new_tokens=max_new_tokens, **kw)[0, ids.shape[1]:]
        lines.append(f"--- {name} ---\n{prompt}{tok.decode(gen, skip_special_tokens=True)}"
                     f"\n(ids: {gen.tolist()})")
    text = "\n".join(lines)
    print(text)
    (out / "samples.txt").write_text(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="plain UTF-8 text file")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--minutes", type=float, default=28.0, help="training time budget")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--moe", action="store_true", help="a tiny GLM-4.5-style MoE with an MTP block")
    args = p.parse_args()

    torch.set_num_threads(1)  # the demo must stay light on a shared machine
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    text = args.corpus.read_text(encoding="utf-8")
    tok = train_tokenizer(text, args.vocab)
    save_tokenizer(tok, args.out)
    print("special token ids:", {t: tok.token_to_id(t) for t in SPECIAL_TOKENS})
    batcher = Batcher(tok, text, args.seq_len)
    print(f"corpus: {len(text)} chars, {len(batcher.stream)} tokens")

    model, mtp = build_moe(tok) if args.moe else (build_model(tok), None)
    params = list(model.parameters()) + ([p for n, p in mtp.named_parameters()
                                          if not n.startswith(("embed_tokens", "shared_head"))] if mtp else [])
    print(f"parameters: {sum(t.numel() for t in params):,}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    start, step, running = time.time(), 0, 0.0
    while (elapsed := time.time() - start) < args.minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, elapsed, args)
        ids, labels = batcher.batch(args.batch)
        if mtp is None:
            loss = model(input_ids=ids, labels=labels).loss
        else:
            loss, mtp_loss = moe_loss(model, mtp, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        running += loss.item()
        if step % args.log_every == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {opt.param_groups[0]['lr']:.2e}"
                  f"  loss {running / args.log_every:.3f}"
                  + (f"  (MTP {mtp_loss.item():.3f})" if mtp is not None else ""), flush=True)
            running = 0.0

    if mtp is not None:
        save_moe(model, mtp, args.out)
        print(f"saved {args.out} after {step} steps (with the MTP block as layer {model.config.num_hidden_layers})")
        return
    model.save_pretrained(args.out)  # safetensors, float32
    print(f"saved {args.out} after {step} steps")
    sample(args.out)


if __name__ == "__main__":
    main()
