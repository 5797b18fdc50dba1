#!/usr/bin/env bash
# Serve SmolLM2-135M with Radar on 127.0.0.1:8000 and ask it one question.
#   bash examples/serve.sh            (after bash scripts/main.sh or scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
MODEL=${MODEL:-.cache/smollm2-135m}
.venv/bin/vllm serve "$MODEL" --served-model-name smollm2 --attention-backend radar \
  --host 127.0.0.1 --port 8000 --max-model-len 8192 --enforce-eager &
server=$!
trap 'kill $server' EXIT
until curl -sf http://127.0.0.1:8000/health >/dev/null; do sleep 2; done
curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
  "model": "smollm2", "max_tokens": 64, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo
