#!/usr/bin/env bash
# Set up both environments and run the whole test suite under TransformerLens 4.x and 3.x.
# Extra arguments go to pytest (e.g. -k decompose).
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_browser.py needs headless Chromium and its driver (Debian packages). As root (CI) install them quietly
# and make the browser tests required (TLR_REQUIRE_BROWSER=1: a missing browser fails instead of skipping).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export TLR_REQUIRE_BROWSER=1
  if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for tests/test_browser.py"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "warning: could not install chromium and chromium-driver" >&2
  fi
fi
bash scripts/setup.sh tl4
bash scripts/setup.sh tl3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
echo "=== ruff (lint, format check) and mypy (tl_residual/), configured in pyproject.toml ==="
.venv/bin/ruff check tl_residual tests benchmarks scripts || status=$?
.venv/bin/ruff format --check tl_residual tests benchmarks scripts || status=$?
.venv/bin/mypy || status=$?
echo "=== TransformerLens 4.x (.venv) ==="
.venv/bin/python -m pytest -q "$@" || status=$?
echo "=== TransformerLens 3.x (.venv-tl3) ==="
# Tests marked slow are end-to-end checks that do not depend on the TransformerLens version (the notebook, the wheel,
# the browser report, the reduced benchmark): they ran above; everything else runs again here.
.venv-tl3/bin/python -m pytest -q -m "not slow" "$@" || status=$?
exit $status
