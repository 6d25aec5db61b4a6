#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
# Extras only the tests need (the main job's install stays without them):
#   gpu: Triton, so that the kernel tests run under its CPU interpreter (TRITON_INTERPRET=1);
#   cluster: Ray Serve, for the `thawed serve-cluster` tests (tests/test_cluster_*.py; ~300 MB);
#   report: matplotlib, for benchmarks/plot_rd.py and its test (thawed report itself needs nothing).
python -m pip install -q -e ".[gpu,cluster,report]" || exit 1
# Playwright drives a headless Chromium for the report's browser test (tests/test_report_browser.py).
# Its own browser download needs the internet, so it is installed only where a Chromium already is
# (apt-get install chromium, or THAWED_CHROMIUM=/path/to/chrome); elsewhere that test skips.
if [ -n "${THAWED_CHROMIUM:-}" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null; then
  python -m pip install -q "playwright>=1.40"
fi

python -m pytest -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
