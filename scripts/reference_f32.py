#!/usr/bin/env python3
"""An independent float64 forward pass of both GGUF models in numpy, for the logit fixtures.

llama.cpp (the other reference) rounds activations to 8 bits before each quantized matmul and
keeps K/V in f16, so it can only check our logits to within ~1.5. This script dequantizes the
same weights with the `gguf` package and computes the forward pass in float64 from the
architecture's definition, so our f32 path (LoadOptions::dequantize) can be held to 1e-3.

Writes tests/fixtures/logits_f32_<model>.json: for the prompts of logits_<model>.json, the
last-position logits at the reference's top-64 ids.
Usage: scripts/reference_f32.py MODELS_DIR   (needs numpy and gguf: .venv-ref has them)
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


class Weights:
    def __init__(self, path):
        self.r = GGUFReader(path)
        self.t = {t.name: t for t in self.r.tensors}

    def __call__(self, name):
        t = self.t[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
            [int(d) for d in reversed(t.shape)])

    def meta(self, key):
        return self.r.fields[key].contents()


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, base, interleaved):
    # x: (heads, T, d)
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]  # (T, d/2)
    c, s = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], -1)


def attention(q, k, v, scale, window):
    # q: (H, T, d), k/v: (KV, T, d)
    H, T, _ = q.shape
    g = H // k.shape[0]
    k = np.repeat(k, g, 0)
    v = np.repeat(v, g, 0)
    s = q @ k.transpose(0, 2, 1) * scale
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = j > i
    if window:
        mask |= (i - j) >= window
    s = np.where(mask, -np.inf, s)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ v).transpose(1, 0, 2).reshape(T, -1)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def llama(W, ids):
    H = int(W.meta("llama.attention.head_count"))
    KV = int(W.meta("llama.attention.head_count_kv"))
    eps = float(W.meta("llama.attention.layer_norm_rms_epsilon"))
    base = float(W.meta("llama.rope.freq_base"))
    emb = W("token_embd.weight")
    x = emb[ids]
    T, D = x.shape
    d = D // H
    pos = np.arange(T, dtype=np.float64)
    for l in range(int(W.meta("llama.block_count"))):
        p = f"blk.{l}."
        h = rms(x, W(p + "attn_norm.weight"), eps)
        q = (h @ W(p + "attn_q.weight").T).reshape(T, H, d).transpose(1, 0, 2)
        k = (h @ W(p + "attn_k.weight").T).reshape(T, KV, d).transpose(1, 0, 2)
        v = (h @ W(p + "attn_v.weight").T).reshape(T, KV, d).transpose(1, 0, 2)
        q, k = rope(q, pos, base, True), rope(k, pos, base, True)
        x = x + attention(q, k, v, 1 / np.sqrt(d), None) @ W(p + "attn_output.weight").T
        h = rms(x, W(p + "ffn_norm.weight"), eps)
        g = h @ W(p + "ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W(p + "ffn_up.weight").T)) @ W(p + "ffn_down.weight").T
    h = rms(x[-1], W("output_norm.weight"), eps)
    head = W("output.weight") if "output.weight" in W.t else emb
    return head @ h


def gemma3(W, ids):
    H = int(W.meta("gemma3.attention.head_count"))
    KV = int(W.meta("gemma3.attention.head_count_kv"))
    d = int(W.meta("gemma3.attention.key_length"))
    eps = float(W.meta("gemma3.attention.layer_norm_rms_epsilon"))
    base = float(W.meta("gemma3.rope.freq_base"))
    window = int(W.meta("gemma3.attention.sliding_window"))
    emb = W("token_embd.weight")
    D = emb.shape[1]
    x = emb[ids] * np.sqrt(D)
    T = x.shape[0]
    pos = np.arange(T, dtype=np.float64)
    for l in range(int(W.meta("gemma3.block_count"))):
        p = f"blk.{l}."
        local = (l + 1) % 6 != 0
        b = 10000.0 if local else base
        h = rms(x, W(p + "attn_norm.weight"), eps)
        q = (h @ W(p + "attn_q.weight").T).reshape(T, H, d).transpose(1, 0, 2)
        k = (h @ W(p + "attn_k.weight").T).reshape(T, KV, d).transpose(1, 0, 2)
        v = (h @ W(p + "attn_v.weight").T).reshape(T, KV, d).transpose(1, 0, 2)
        q = rope(rms(q, W(p + "attn_q_norm.weight"), eps), pos, b, False)
        k = rope(rms(k, W(p + "attn_k_norm.weight"), eps), pos, b, False)
        a = attention(q, k, v, 1 / np.sqrt(d), window if local else None) @ W(p + "attn_output.weight").T
        x = x + rms(a, W(p + "post_attention_norm.weight"), eps)
        h = rms(x, W(p + "ffn_norm.weight"), eps)
        m = (gelu_tanh(h @ W(p + "ffn_gate.weight").T) * (h @ W(p + "ffn_up.weight").T)) @ W(p + "ffn_down.weight").T
        x = x + rms(m, W(p + "post_ffw_norm.weight"), eps)
    h = rms(x[-1], W("output_norm.weight"), eps)
    return emb @ h


def main():
    models_dir = sys.argv[1]
    for name, fwd in (("smollm2", llama), ("gemma3", gemma3)):
        fx = json.load(open(os.path.join(FIXTURES, f"logits_{name}.json")))
        W = Weights(os.path.join(models_dir, fx["model"]))
        cases = []
        for c in fx["cases"]:
            logits = fwd(W, np.array(c["ids"]))
            top = np.argsort(-logits)[:64]
            cases.append({"prompt": c["prompt"], "ids": c["ids"], "top_ids": [int(i) for i in top],
                          "top_logits": [float(logits[i]) for i in top]})
        with open(os.path.join(FIXTURES, f"logits_f32_{name}.json"), "w") as f:
            json.dump({"model": fx["model"], "reference": "numpy float64 forward (scripts/reference_f32.py)",
                       "cases": cases}, f, ensure_ascii=False, indent=1)
        print(f"{name}: {len(cases)} cases")


if __name__ == "__main__":
    main()
