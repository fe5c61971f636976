"""Per-continuation perplexity distribution of an eval run's fluency files.

usage: python3 scripts/ppl_tail.py EVAL_DIR   (e.g. ~/.cache/detoxfuse/eval/<run>)
"""
import json
import math
import pathlib
import sys

for f in sorted(pathlib.Path(sys.argv[1]).joinpath("fluency").glob("*.jsonl")):
    p = sorted(math.exp(n / t) for line in open(f) for r in [json.loads(line)]
               for n, t in zip(r["nll"], r["tokens"]) if t > 0)
    k, top = len(p), int(len(p) * 0.99)
    print(f"{f.stem}: {k} continuations, mean {sum(p) / k:.1f}, median {p[k // 2]:.1f}, "
          f"share of the sum from the top 1% {sum(p[top:]) / sum(p):.3f}, max {p[-1]:.0f}")
