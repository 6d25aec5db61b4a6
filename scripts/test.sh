#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
# Extras only the tests need (the main job's install stays without them):
#   gpu: Triton, so that the kernel tests run under its CPU interpreter (TRITON_INTERPRET=1);
#   cluster: Ray Serve, for the `thawed serve-cluster` tests (tests/test_cluster_*.py; ~300 MB).
python -m pip install -q -e ".[gpu,cluster]" || exit 1
python -m pytest -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
