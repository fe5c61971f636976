#!/usr/bin/env python3
"""Proves a detoxfuse calibration model directory is a valid Hugging Face Llama checkpoint:
`transformers.LlamaForCausalLM.from_pretrained(dir)` loads it, and its greedy continuation of a
prompt equals what detoxfuse's own loader (`detoxfuse generate --model DIR --f32`) produces.

    .venv-torch/bin/python scripts/check_hf_export.py ~/.cache/detoxfuse/calibration/smollm2-L3/model

Needs torch and transformers (scripts/setup_torch_env.sh makes .venv-torch). Exit status 0 when
both checks pass.
"""
import json
import subprocess
import sys

import torch
from transformers import LlamaForCausalLM

PROMPT = "The harbour was quiet in the early morning, and"
NEW_TOKENS = 12
BIN = "./target/release/detoxfuse"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    model = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = json.loads(subprocess.check_output([BIN, "tokenize", "--model", d, "--no-special", PROMPT]))["ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            eos_token_id=None, pad_token_id=0,
        )
        logits = model(torch.tensor([ids])).logits[0, -1]
    theirs = out[0, len(ids):].tolist()
    ours_line = subprocess.check_output(
        [BIN, "generate", "--model", d, "--f32", "--prompt", PROMPT, "--temperature", "0",
         "--max-tokens", str(NEW_TOKENS)])
    ours = json.loads(ours_line)["generations"][0]["token_ids"]
    print(f"loaded {d} with transformers: {model.config.num_hidden_layers} layers, "
          f"width {model.config.hidden_size}, {n_params / 1e6:.1f} M parameters")
    print(f"last-position logits: max {logits.max().item():.4f} at id {logits.argmax().item()}")
    print(f"transformers greedy ids: {theirs}")
    print(f"detoxfuse    greedy ids: {ours}")
    n = min(len(theirs), len(ours))
    if theirs[:n] != ours[:n] or n == 0:
        sys.exit("MISMATCH between transformers and detoxfuse")
    print(f"OK: {n} greedy tokens identical")


if __name__ == "__main__":
    main()
