#!/usr/bin/env python3
"""What constrained sampling costs a token: llguidance (glmcpu/constrain.py) against xgrammar, on
the same token sequences over one vocabulary.

    python tools/bench_constrain.py --vocab VOCAB.gguf [--model FILE.gguf --threads 2]

--vocab: a GGUF whose byte-level BPE vocabulary the grammars run over (a glmcpu model, or a
llama.cpp vocab-only file such as ggml-vocab-qwen2.gguf, 151,936 tokens, from llama.cpp's
models/ folder, also in llama-cpp-python's source package: GLM-4's 151k vocabulary is built the
same way, and synthetic test vocabularies flatter both libraries). For each of the 20 schemas of
tests/schemas.py, its example instance (json.dumps, the separators constrain.py enforces) is
tokenized; both libraries compile the schema (timed), then for every token compute the mask of
allowed next tokens (timed) and consume the token. glmcpu's per-token cost is all of
constrain.Constraint.apply on a row of float32 logits: the mask, the cap on a JSON number's
digits, -inf where forbidden. --model: also time a decode
step of that file (median of 8), and give the mask as a share of it."""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from glmcpu import constrain            # noqa: E402
from glmcpu.gguf import GGUFFile        # noqa: E402
from glmcpu.tokenizer import Tokenizer  # noqa: E402
from schemas import SCHEMAS             # noqa: E402


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3


def llguidance_run(tok, n_vocab, schema, ids):
    """(compile seconds, llguidance's mask per token, glmcpu's Constraint.apply per token): two
    passes over the tokens, each with its own matcher (llguidance keeps the mask of a state, so a
    second mask in one state would be nearly free)."""
    grammar = constrain.json_schema(schema)
    t = time.perf_counter()
    c = constrain.Constraint(grammar, tok, n_vocab)
    compile_s = time.perf_counter() - t
    masks = []
    for i in ids:
        t = time.perf_counter()
        allowed = c.allowed()
        masks.append(time.perf_counter() - t)
        assert allowed[i], f"llguidance forbids token {i} of a valid instance"
        c.accept(i)
    c = constrain.Constraint(grammar, tok, n_vocab)
    logits = np.zeros(n_vocab, np.float32)
    applies = []
    for i in ids:
        t = time.perf_counter()
        masked = c.apply(logits)                # the mask, the digit cap, -inf where forbidden
        applies.append(time.perf_counter() - t)
        assert masked[i] == 0, f"glmcpu forbids token {i} of a valid instance"
        c.accept(i)
    return compile_s, masks, applies


def xgrammar_run(info, schema, ids):
    import xgrammar as xgr
    t = time.perf_counter()
    g = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(g)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    masks = []
    for i in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - t)
        assert m.accept_token(i), f"xgrammar refuses token {i} of a valid instance"
    return compile_s, masks


def step_seconds(path, threads):
    import glmcpu
    m = glmcpu.load(path, threads=threads, draft="none", ctx=512)
    c = m.net.new_cache(512)
    m.net.forward(list(range(100, 132)), c)
    ts = []
    for k in range(8):
        t = time.perf_counter()
        m.net.forward([200 + k], c)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", required=True)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tok = Tokenizer.from_gguf(GGUFFile(a.vocab), any_pre=True)
    n_vocab = tok.tok.get_vocab_size()
    t = time.perf_counter()
    constrain.ll_tokenizer(tok, n_vocab)
    ll_tok_s = time.perf_counter() - t
    info = None
    try:
        import xgrammar as xgr
        t = time.perf_counter()
        vocab = [b""] * n_vocab
        for text, i in tok.tok.get_vocab().items():      # byte-level BPE strings, as the file holds them
            vocab[i] = text
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=n_vocab,
                                 stop_token_ids=sorted(tok.stop_ids))
        xg_tok_s = time.perf_counter() - t
    except ImportError:
        print("xgrammar is not installed: llguidance alone (pip install xgrammar to compare)", file=sys.stderr)
    rows = {"llguidance": ([], [], []), "xgrammar": ([], [], [])}
    n_tokens = 0
    for schema, example in SCHEMAS:
        ids = tok.encode(json.dumps(example))
        n_tokens += len(ids)
        c, masks, applies = llguidance_run(tok, n_vocab, schema, ids)
        rows["llguidance"][0].append(c)
        rows["llguidance"][1].extend(masks)
        rows["llguidance"][2].extend(applies)
        if info is not None:
            c, masks = xgrammar_run(info, schema, ids)
            rows["xgrammar"][0].append(c)
            rows["xgrammar"][1].extend(masks)
    print(f"{a.vocab}: {n_vocab} tokens; {len(SCHEMAS)} schemas, {n_tokens} tokens of valid instances; "
          f"tokenizer set-up: llguidance {ll_tok_s:.2f} s" + (f", xgrammar {xg_tok_s:.2f} s" if info else ""))
    print("\n| library | compile median | mask median | mask p90 | mask p99 | mask max |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (comp, masks, _) in rows.items():
        if masks:
            print(f"| {name} | {statistics.median(comp) * 1e3:.1f} ms | {pct(masks, 50):.3f} ms | "
                  f"{pct(masks, 90):.3f} ms | {pct(masks, 99):.3f} ms | {max(masks) * 1e3:.2f} ms |")
    applies = rows["llguidance"][2]
    print(f"\nglmcpu's cost a token (Constraint.apply on {n_vocab} logits): median "
          f"{pct(applies, 50):.3f} ms, p99 {pct(applies, 99):.3f} ms, mean {np.mean(applies) * 1e3:.3f} ms")
    if a.model:
        s = step_seconds(a.model, a.threads)
        print(f"decode step of {a.model} ({a.threads} threads): {s * 1e3:.0f} ms; the mask is "
              f"{np.mean(applies) / s * 100:.2f}% of it on average, {pct(applies, 99) / 1e3 / s * 100:.2f}% at p99")


if __name__ == "__main__":
    main()
