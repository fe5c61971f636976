#!/usr/bin/env python3
"""Write the reference fixtures that the Rust tests compare against.

Reference implementation: llama.cpp, through PyPI `llama-cpp-python` (see
scripts/setup_reference_env.sh), loading the very GGUF files `detoxfuse fetch` installs.

Writes, per model:
  tests/fixtures/tokenizer_<model>.json  strings -> reference token ids (special tokens parsed,
                                          BOS as the GGUF's add_bos_token says)
  tests/fixtures/logits_<model>.json      prompts -> last-position logits (top 64 and a digest of
                                          all), and 16+ greedy tokens

Usage: scripts/make_reference_fixtures.py MODELS_DIR
"""
import hashlib
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space",
    "trailing space ",
    "double  space and   triple",
    "tabs\tand\ttabs\t\t",
    "new\nline\n\nand\n\n\nmore",
    "\n",
    "   ",
    "1234567890",
    "In 2024, 3.14159 was π and 1,000,000 was a million.",
    "Phone: +1 (555) 123-4567",
    "It's, we're, they've, I'd, you'll, she's",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "\u00c0 bient\u00f4t, \u00e7a va ? S\u00ed, se\u00f1or.",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "emoji \U0001F600\U0001F680 and \U0001F468\u200d\U0001F469\u200d\U0001F467 family",
    "\U0001F525\U0001F525\U0001F525",
    "flags \U0001F1FA\U0001F1F8 \U0001F1EF\U0001F1F5",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"hi\"); }",
    "https://example.com/path?q=1&r=two#frag",
    "user@example.org",
    "MiXeD CaSe WORDS and ALLCAPS",
    "a" * 40,
    "!!!???...,,,;;;",
    "The quick brown fox jumps over the lazy dog.",
    "What the hell are you doing, you idiot?",
    "  \n  \t \n",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "",
]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n",
    "I can't believe you would say something so",
    "1, 2, 3, 4,",
]

GREEDY_TOKENS = 24


def digest(values):
    return hashlib.sha256(np.asarray(values, dtype=np.float32).tobytes()).hexdigest()


def main():
    models_dir = sys.argv[1]
    os.makedirs(FIXTURES, exist_ok=True)
    for name, file in MODELS.items():
        path = os.path.join(models_dir, file)
        add_bos = name == "gemma3"
        vocab = Llama(model_path=path, vocab_only=True, verbose=False)
        cases = []
        for s in STRINGS:
            ids = vocab.tokenize(s.encode("utf-8"), add_bos=add_bos, special=True)
            cases.append({"text": s, "ids": ids})
        with open(os.path.join(FIXTURES, f"tokenizer_{name}.json"), "w") as f:
            json.dump({"model": file, "reference": "llama-cpp-python", "add_bos": add_bos,
                       "parse_special": True, "cases": cases}, f, ensure_ascii=False, indent=1)
        del vocab

        llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=512, logits_all=True,
                    verbose=False)
        out = []
        for p in PROMPTS:
            ids = llm.tokenize(p.encode("utf-8"), add_bos=add_bos, special=True)
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top = np.argsort(-logits)[:64]
            # greedy continuation, one token at a time with the KV cache
            # and, per step, the reference's margin between its two best logits: where that
            # margin is within the logit tolerance, a different choice is a near tie, not a bug
            greedy, margins = [], []
            for _ in range(GREEDY_TOKENS):
                row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                a, b = np.sort(row)[-2:][::-1]
                nxt = int(np.argmax(row))
                greedy.append(nxt)
                margins.append(float(a - b))
                llm.eval([nxt])
            out.append({"prompt": p, "ids": ids,
                        "top_ids": [int(i) for i in top],
                        "top_logits": [float(logits[i]) for i in top],
                        "logits_mean": float(logits.mean()), "logits_std": float(logits.std()),
                        "greedy": greedy, "greedy_margins": margins})
        with open(os.path.join(FIXTURES, f"logits_{name}.json"), "w") as f:
            json.dump({"model": file, "reference": "llama-cpp-python", "add_bos": add_bos,
                       "cases": out}, f, ensure_ascii=False, indent=1)
        print(f"{name}: {len(cases)} tokenizer cases, {len(out)} logit cases")


if __name__ == "__main__":
    main()
