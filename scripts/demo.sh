#!/usr/bin/env bash
# The main job: set up .venv, convert the bundled SmolLM2-135M-Instruct (once), compress it with
# 4-bit group quantisation, show the size table, and generate from the compressed checkpoint.
# Usage: ./scripts/demo.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
SRC=$(thawed demo-model)
CKPT=${THAWED_DEMO_CKPT:-out/rtn4}  # the name the README's commands use
if [ ! -f "$CKPT/model.thawed.safetensors" ]; then
  rm -rf "$CKPT"
  thawed compress "$SRC" "$CKPT" --codec rtn:bits=4,group_size=128
fi
thawed inspect "$CKPT" --totals
thawed generate "$CKPT" "${1:-The capital of France is}" --max-new-tokens 32 --stats
