# SPDX-License-Identifier: Apache-2.0
"""One decode layer on the CPU: vLLM's dense CPU_ATTN kernel against Radar and StreamingLLM
through the torch and the Numba mechanisms, side by side in one run.

SmolLM2-135M attention (Hq 9, Hkv 3, D 64, KV block 32, float32), one thread (as vLLM's CPU
worker runs torch). For each context and batch, with a budget of 25% of the context:
  dense          - vLLM's `cpu_attention_with_kv_cache` (what `CPU_ATTN` runs) on its own cache
                   layout, holding the same K/V,
  radar torch    - `RadarPolicy.select` + `TorchMechanism.decode` (gather, then attend),
  radar numba    - the same selection in one Numba kernel (`cpu_radar_select`) +
                   `NumbaMechanism.decode`,
  streaming      - 4 sinks + a window filling the budget, Numba decode (no selection).
Prints milliseconds per layer call (median of repeats) and each one's speed relative to
dense; checks first that dense and the Numba path with every page agree.

    python benchmarks/bench_cpu_decode.py [--contexts 2048 4096 7680] [--batches 1 8]
"""

import argparse
import statistics
import time

import torch

HQ, HKV, D, BLOCK = 9, 3, 64, 32


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class Case:
    """`batch` sequences of `context` tokens in both cache layouts, and their queries."""

    def __init__(self, batch, context, seed=0):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from vllm_sparse import reference

        gen = torch.Generator().manual_seed(seed)
        pages = -(-context // BLOCK)
        num_blocks = batch * pages
        self.block_table = torch.randperm(num_blocks, generator=gen).view(batch, pages)
        self.seq_lens = torch.full((batch,), context)
        self.query = torch.randn(batch, HQ, D, generator=gen)
        positions = torch.arange(context)
        slots = (self.block_table[:, positions // BLOCK] * BLOCK + positions % BLOCK).flatten()
        key = torch.randn(batch * context, HKV, D, generator=gen)
        value = torch.randn(batch * context, HKV, D, generator=gen)
        # ours: vLLM's CPU cache view [blocks, Hkv, bs, 2D] over token-major memory
        self.kv_cache = torch.zeros(num_blocks, BLOCK, HKV, 2 * D).transpose(1, 2)
        reference.write_kv(self.kv_cache, key, value, slots)
        # CPU_ATTN's: the same K/V written by its own op into its own layout
        self.isa = _get_attn_isa(torch.float32, BLOCK, D)
        dense_cache = torch.zeros(num_blocks, HKV, BLOCK * 2, D)
        self.key_cache, self.value_cache = dense_cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, self.key_cache, self.value_cache, slots, self.isa)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
        self.metadata = ops.cpu_attn_get_scheduler_metadata(
            batch, HQ, HKV, D, self.seq_lens.to(torch.int32), torch.float32, self.query_start_loc,
            True, -1, self.isa, False)

    def dense(self):
        from vllm import _custom_ops as ops

        out = torch.empty_like(self.query)
        ops.cpu_attention_with_kv_cache(
            self.query, self.key_cache, self.value_cache, out, self.query_start_loc,
            self.seq_lens.to(torch.int32), D ** -0.5, True, None, -1,
            self.block_table.to(torch.int32), 0.0, self.metadata, None)
        return out


def run(batch, context, repeats):
    from vllm_sparse.backend import _with_dense_rows
    from vllm_sparse.config import RadarConfig
    from vllm_sparse.mechanism import NumbaMechanism, TorchMechanism
    from vllm_sparse.policies.base import DecodeQueries
    from vllm_sparse.policies.radar import RadarPolicy

    case = Case(batch, context)
    budget, scale = context // 4, D ** -0.5
    args = (case.query, case.kv_cache, case.block_table, case.seq_lens)
    every_page = torch.arange(-(-context // BLOCK)).expand(batch, HKV, -1)
    check = NumbaMechanism().decode(*args, every_page, 0, 0, scale)[0]
    error = (check - case.dense()).abs().max().item()
    assert error < 1e-4, f"dense CPU_ATTN and the Numba decode disagree by {error}"

    queries = DecodeQueries(case.query, case.seq_lens, case.block_table,
                            torch.full((batch,), budget))
    not_dense = torch.zeros(batch, dtype=torch.bool)
    times = {"dense": timed(case.dense, repeats)}
    for kernels, mechanism in (("torch", TorchMechanism()), ("numba", NumbaMechanism())):
        policy = RadarPolicy(RadarConfig(), D, scale, kernels=kernels)
        policy.observe_write(case.kv_cache, (case.block_table.flatten() * BLOCK + BLOCK - 1))

        def radar(policy=policy, mechanism=mechanism):
            selection = policy.select(queries, case.kv_cache)
            pages, sinks, window = _with_dense_rows(selection, not_dense, case.seq_lens, BLOCK, HKV)
            return mechanism.decode(*args, pages, sinks, window, scale)

        times[f"radar {kernels}"] = timed(radar, repeats)
    no_pages = torch.full((batch, HKV, 0), -1)
    times["streaming numba"] = timed(
        lambda: NumbaMechanism().decode(*args, no_pages, 4, budget - 4, scale), repeats)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 7680])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one decode layer, SmolLM2-135M shapes (Hq {HQ}, Hkv {HKV}, D {D}, block {BLOCK}), "
          "float32, 1 thread, budget 25%; ms per call (x: speed relative to dense)")
    for context in args.contexts:
        for batch in args.batches:
            times = run(batch, context, args.repeats)
            cells = "  ".join(f"{name} {ms:6.2f} ms (x{times['dense'] / ms:.2f})"
                              for name, ms in times.items())
            print(f"context {context:5d} batch {batch}:  {cells}", flush=True)


if __name__ == "__main__":
    main()
