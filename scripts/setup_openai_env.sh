#!/usr/bin/env bash
# The official OpenAI Python client, for the server's integration test (.venv-openai).
# Idempotent: does nothing when the pinned version is already installed. Where `python3 -m
# venv` is unavailable (Debian without python3-venv), the package goes into
# .venv-openai/site with pip --target and .venv-openai/bin/python is a small wrapper.
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.57.0
if .venv-openai/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '$version')" 2>/dev/null; then
    exit 0
fi
rm -rf .venv-openai
if python3 -m venv .venv-openai 2>/dev/null; then
    .venv-openai/bin/pip install --quiet --disable-pip-version-check "openai==$version"
else
    rm -rf .venv-openai
    python3 -m pip install --quiet --disable-pip-version-check --target .venv-openai/site "openai==$version"
    mkdir -p .venv-openai/bin
    cat > .venv-openai/bin/python <<'WRAP'
#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$here/site${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"
WRAP
    chmod +x .venv-openai/bin/python
fi
.venv-openai/bin/python -c "import openai; print('openai', openai.__version__, 'in .venv-openai')"
