# SPDX-License-Identifier: Apache-2.0
"""Benchmark dense paged decode with per-token score capture (Recycled Attention full step).

On CUDA: Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, bf16, cache block 16). For each
context and batch it times
  scores - decode_with_scores (output + scores [B, Hkv, T] fp32),
  dense  - sparse_paged_decode with every page selected (dense paged decode, no scores),
  sdpa   - torch SDPA (flash backend) on contiguous K/V of the same shape (no scores),
and prints times and the overhead of capturing scores (scores / dense, scores / sdpa).
Without CUDA it runs a tiny shape under the Triton interpreter only to show that the code
path works; those timings are meaningless.

    python benchmarks/bench_score_capture.py [--contexts 32768 131072] [--batches 1 32]
"""

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel import

import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.score_capture import decode_with_scores  # noqa: E402
from kernels.sparse_decode import sparse_paged_decode  # noqa: E402


def make_case(batch, context, hq, hkv, d, page, dtype, device):
    """Random paged cache (shuffled blocks), query and block table; every sequence has `context` tokens."""
    pages = triton.cdiv(context, page)
    kv_cache = torch.randn(batch * pages, hkv, page, 2 * d, dtype=dtype, device=device)
    block_table = torch.randperm(batch * pages, device=device).view(batch, pages).to(torch.int32)
    query = torch.randn(batch, hq, d, dtype=dtype, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return query, kv_cache, block_table, seq_lens


def bench(fn, use_cuda):
    if use_cuda:
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-splits", type=int, default=None, help="default: launcher heuristic")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    hq, hkv, d, page = 32, 8, 128, 16
    if use_cuda:
        device, dtype = "cuda", torch.bfloat16
        print(f"device: {torch.cuda.get_device_name()}  Llama-3.1-8B: Hq={hq} Hkv={hkv} D={d} page={page} bf16")
    else:  # tiny fp16 shape: bf16 tl.dot is wrong in the interpreter
        device, dtype = "cpu", torch.float16
        hq, hkv, args.contexts, args.batches = 4, 2, [512], [2]
        print("NOTE: no CUDA GPU -- running a tiny shape under TRITON_INTERPRET; timings are meaningless.")
    elem = torch.tensor([], dtype=dtype).element_size()
    kw = dict(num_splits=args.num_splits)

    header = (f"{'context':>8} {'batch':>5} {'scores ms':>10} {'dense ms':>9} {'sdpa ms':>8} "
              f"{'/ dense':>8} {'/ sdpa':>7} {'GB/s':>7}")
    print(header)
    print("-" * len(header))
    for context in args.contexts:
        for batch in args.batches:
            query, kv_cache, block_table, seq_lens = make_case(batch, context, hq, hkv, d, page, dtype, device)
            n_pages = block_table.shape[1]
            all_pages = torch.arange(n_pages, dtype=torch.int32, device=device).expand(batch, hkv, n_pages).contiguous()
            dense_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, all_pages, "page",
                                                         **kw), use_cuda)
            out = torch.empty_like(query)
            scores = torch.empty(batch, hkv, n_pages * page, dtype=torch.float32, device=device)
            scores_ms = bench(lambda: decode_with_scores(query, kv_cache, block_table, seq_lens, out=out,
                                                         scores_out=scores, **kw), use_cuda)
            # SDPA on contiguous K/V [B, Hkv, T, D]; each KV head's query group acts as its query length
            # (exact for decode, no causal mask), so the flash backend needs no GQA support.
            k = torch.randn(batch, hkv, context, d, dtype=dtype, device=device)
            v = torch.randn_like(k)
            q = query.view(batch, hkv, hq // hkv, d)
            if use_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            else:
                def sdpa():
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            sdpa_ms = bench(sdpa, use_cuda)
            # Bytes that must move: K/V once, the fp32 logits scratch written + read, the scores written.
            nbytes = batch * context * (hkv * 2 * d * elem + 2 * hq * 4 + hkv * 4)
            print(f"{context:>8} {batch:>5} {scores_ms:>10.4f} {dense_ms:>9.4f} {sdpa_ms:>8.4f} "
                  f"{scores_ms / dense_ms:>8.2f} {scores_ms / sdpa_ms:>7.2f} {nbytes / scores_ms / 1e6:>7.1f}")
            del query, kv_cache, block_table, all_pages, out, scores, k, v
            if use_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
