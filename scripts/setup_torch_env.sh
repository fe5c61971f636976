#!/usr/bin/env bash
# Optional: a Python environment with torch + transformers (PyPI) for the PyTorch training
# baseline (`detoxfuse bench train`) and scripts/check_hf_export.py. Not needed to build or
# test detoxfuse. Several GB (the PyPI torch wheel pulls CUDA libraries); ~5 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-torch
.venv-torch/bin/pip install --quiet --disable-pip-version-check torch transformers safetensors
.venv-torch/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
