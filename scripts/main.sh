#!/usr/bin/env bash
# The main job, with its own set-up: Radar sparse decoding on SmolLM2-135M next to dense.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
exec .venv/bin/python examples/offline.py "$@"
