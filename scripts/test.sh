#!/usr/bin/env bash
# Set up both environments and run the whole test suite under TransformerLens 4.x and 3.x.
# Extra arguments go to pytest (e.g. -k decompose).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tl4
bash scripts/setup.sh tl3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
echo "=== TransformerLens 4.x (.venv) ==="
.venv/bin/python -m pytest -q "$@" || status=$?
echo "=== TransformerLens 3.x (.venv-tl3) ==="
.venv-tl3/bin/python -m pytest -q "$@" || status=$?
exit $status
