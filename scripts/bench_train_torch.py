#!/usr/bin/env python3
"""PyTorch baseline for `detoxfuse bench train`: the same calibration architecture (SmolLM2's
first L decoder layers, tied embeddings/LM head) and the same batch, trained with AdamW on CPU.

Weights are random (speed does not depend on their values); embeddings and head are frozen as
in detoxfuse's default. Prints one JSON line: tokens/s (median step), peak RSS.

    .venv-torch/bin/python scripts/bench_train_torch.py --rows 16 --len 256 --layers 3 --steps 5
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-embeddings", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=a.layers, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).float().train()
    model.model.embed_tokens.weight.requires_grad_(a.train_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    ids = torch.tensor(
        [[((r * 7919 + i * 104729) % 49000) + 10 for i in range(a.len)] for r in range(a.rows)]
    )
    times = []
    for step in range(a.steps + 1):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch", "torch": torch.__version__, "threads": a.threads,
        "rows": a.rows, "len": a.len, "layers": a.layers,
        "step_seconds": med, "tokens_per_s": a.rows * a.len / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
