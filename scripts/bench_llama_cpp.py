#!/usr/bin/env python3
"""llama.cpp's speed on the same GGUF, for `detoxfuse bench` to compare against.

Prints one JSON line: prompt and batch-1 decode tokens/s, medians over runs. Same synthetic
prompt ids as detoxfuse (passed in), same thread count. Decoding feeds a fixed token each step
(logits_all=False leaves llama-cpp-python's score rows empty; the token's value does not change
the cost of a step).
Usage: bench_llama_cpp.py MODEL THREADS DECODE_TOKENS RUNS PROMPT_IDS_JSON
"""
import json
import statistics
import sys
import time

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
        llm.eval([ids[-1]])
    decode_tps.append(decode / (time.perf_counter() - t0))
print(json.dumps({"prompt_tps": statistics.median(prompt_tps), "decode_tps": statistics.median(decode_tps)}))
