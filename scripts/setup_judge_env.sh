#!/usr/bin/env bash
# The Python side of the second judge (.venv-judge): PyPI tox-block 0.1.2 on the TensorFlow it
# was made for, only to export its weights (scripts/export_toxblock_model.py) and to write the
# fixture the Rust port is tested against. The product never needs it: the exported weights
# ship in assets/. ~230 MB download; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv-judge/bin/python -c "import tox_block, h5py" 2>/dev/null; then
    exit 0
fi
rm -rf .venv-judge
python3 -m venv .venv-judge
.venv-judge/bin/pip install --quiet --disable-pip-version-check \
    "tensorflow-cpu==2.15.1" "h5py==3.16.0" "keras-preprocessing==1.1.2" \
    "pandas==3.0.6" "scikit-learn==1.9.1" "joblib==1.6.0"
# tox-block's own requirements name any tensorflow; the pins above are what it runs on here
.venv-judge/bin/pip install --quiet --disable-pip-version-check --no-deps "tox-block==0.1.2"
.venv-judge/bin/python -c "import tox_block, h5py; print('tox-block', tox_block.__version__, 'in .venv-judge')"
