# SPDX-License-Identifier: Apache-2.0
"""One SparseK prefill layer on the CPU: the rule (top-k and SPARSEK per query) through the
torch reference against the Numba sweep (kernels/cpu_sparsek_rule.py), side by side in one run.

SmolLM2-135M attention (Hq 9, Hkv 3, D 64, float32), one sequence of C tokens prefilled at
once, the backend's 256-query blocks, a budget of 25% of C split as the shipped config does
(window W = budget / 2, k = budget - W). For each context it times, per layer:
  rule torch     - `attention_rule(kernels="torch")` for every query block (what SparseK's
                   prefill ran before the Numba sweep),
  rule numba     - the same masks and weights from `cpu_sparsek_rule`,
  layer torch    - the whole `hf_attention.attend` call as the backend makes it (no logging
                   counters) with the torch rule, attending every block over all its keys,
  layer numba    - the same with the Numba rule, each block attending only the keys it uses
                   (the compact form: about k + W + 256 of them),
and the layer's speed-up. It checks first that both give the same output. Threads: torch's
default here (vLLM's CPU worker uses one per core). Scores are random (normal, times
--spread, plus a position trend): the reference's SPARSEK is cheaper for widely spread scores
(it sorts only each row's top k + 65 when that provably gives tau) than for narrow ones, so
its time depends on the scorer; speed.py's TTFT is the end-to-end number on the real one.

    python benchmarks/bench_cpu_sparsek_prefill.py [--contexts 2048 4096 7680] [--budget 0.25]
"""

import argparse
import functools
import time

import torch

from vllm_sparse.sparsek import hf_attention
from vllm_sparse.sparsek.scorer import attention_rule

HQ, HKV, D = 9, 3, 64
BLOCK = 256      # the backend's PREFILL_QUERY_BLOCK


def timed(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rule_only(case, kernels):
    """The rule of every query block, as `hf_attention.attend` asks for it."""
    u, k, window = case[3:]
    n = u.shape[1]
    for first in range(0, n, BLOCK):
        attention_rule(u[:, :min(n, first + BLOCK)], k, window,
                       torch.arange(first, min(n, first + BLOCK)), kernels)


def layer(case, kernels):
    """The backend's prefill call for one layer (no logging counters)."""
    query, key, value, u, k, window = case
    return hf_attention.attend(query, key, value, u, k, window, D ** -0.5, BLOCK,
                               kernels=kernels, with_stats=False)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 7680])
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of the context")
    parser.add_argument("--spread", type=float, default=2.0, help="scale of the random scores")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; Hq={HQ} Hkv={HKV} D={D} float32; "
          f"budget {args.budget:g} of the context, window half of it; score spread "
          f"{args.spread:g}; ms per layer")
    header = (f"{'context':>7} {'k':>5} {'W':>5} {'rule torch':>10} {'rule numba':>10} "
              f"{'layer torch':>11} {'layer numba':>11} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for n in args.contexts:
        budget = int(args.budget * n)
        window = budget // 2
        k = budget - window
        query = torch.randn(HQ, n, D, generator=gen)
        key, value = torch.randn(2, HKV, n, D, generator=gen)
        u = torch.randn(HKV, n, generator=gen) * args.spread + torch.linspace(0, 1, n)

        case = (query, key, value, u, k, window)
        with torch.inference_mode():
            torch.testing.assert_close(layer(case, "numba"), layer(case, "torch"), atol=1e-5,
                                       rtol=1e-5)
            times = {f"{part} {kernels}": timed(functools.partial(fn, case, kernels))
                     for part, fn in (("rule", rule_only), ("layer", layer))
                     for kernels in ("torch", "numba")}
        print(f"{n:>7} {k:>5} {window:>5} {times['rule torch']:>10.0f} "
              f"{times['rule numba']:>10.0f} {times['layer torch']:>11.0f} "
              f"{times['layer numba']:>11.0f} {times['layer torch'] / times['layer numba']:>7.1f}x")


if __name__ == "__main__":
    main()
