#!/usr/bin/env python3
"""llama.cpp's speed on the same GGUF, for `detoxfuse bench` to compare against.

Prints one JSON line: prompt and batch-1 decode tokens/s, medians over runs. Same synthetic
prompt ids as detoxfuse (passed in), same thread count, greedy decoding.
Usage: bench_llama_cpp.py MODEL THREADS DECODE_TOKENS RUNS PROMPT_IDS_JSON
"""
import json
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama

model, threads, decode, runs, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
llm = Llama(model_path=model, n_ctx=len(ids) + decode + 8, n_threads=threads, n_threads_batch=threads,
            n_batch=max(512, len(ids)), logits_all=False, verbose=False)
prompt_tps, decode_tps = [], []
for _ in range(runs):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prompt_tps.append(len(ids) / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(decode):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    decode_tps.append(decode / (time.perf_counter() - t0))
print(json.dumps({"prompt_tps": statistics.median(prompt_tps), "decode_tps": statistics.median(decode_tps)}))
