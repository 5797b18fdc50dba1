# SPDX-License-Identifier: Apache-2.0
"""Radar sparse decoding next to vLLM's dense attention on SmolLM2-135M, offline.

    python examples/offline.py [--model DIR] [--context 3500] [--batch 4] [--tokens 64]

Prints each method's continuation of a long prompt and its decode tokens/s.
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402

from vllm_sparse.models import long_text, smollm2_dir  # noqa: E402


def prompts(model: str, context: int, batch: int) -> list[TokensPrompt]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(long_text())["input_ids"]
    return [TokensPrompt(prompt_token_ids=ids[i * 9000: i * 9000 + context]) for i in range(batch)]


def run(model: str, backend: str, batch: list, tokens: int) -> tuple[list[str], float]:
    llm = LLM(model=model, attention_backend=backend, max_model_len=8192, enforce_eager=True,
              seed=0, dtype="float32")  # bf16 GEMMs are slow on CPUs without AMX
    first = SamplingParams(temperature=0, max_tokens=1)
    full = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(batch, first, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(batch, first, use_tqdm=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.generate(batch, full, use_tqdm=False)
    decode = time.perf_counter() - start - prefill
    del llm
    return [o.outputs[0].text for o in out], len(batch) * (tokens - 1) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M)")
    parser.add_argument("--context", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model = args.model or str(smollm2_dir())
    batch = prompts(model, args.context, args.batch)
    results = {name: run(model, backend, batch, args.tokens)
               for name, backend in [("dense (CPU_ATTN)", "auto"), ("radar", "radar")]}
    for name, (texts, _) in results.items():
        print(f"\n=== {name}: continuation of prompt 0\n{texts[0]!r}")
    print(f"\n{'method':<18}{'decode tok/s':>14}   context {args.context}, batch {args.batch}, "
          f"{args.tokens} new tokens")
    for name, (_, speed) in results.items():
        print(f"{name:<18}{speed:>14.1f}")


if __name__ == "__main__":
    main()
