# SPDX-License-Identifier: Apache-2.0
"""Benchmark the sparse paged decode kernel against dense baselines.

On CUDA: Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, bf16, cache block 16). For each
context, batch and token budget (sinks + window + randomly selected pages) it times
  sparse  - sparse_paged_decode in page mode,
  dense   - the same kernel with every page selected (dense paged baseline),
  sdpa    - torch SDPA (flash backend) on contiguous K/V of the same shape,
and prints times, speed-ups and the memory bandwidth achieved on the bytes the sparse
kernel reads. Without CUDA it runs a tiny shape under the Triton interpreter only to show
that the code path works; those timings are meaningless.

    python benchmarks/bench_sparse_decode.py [--contexts 32768 131072] [--batches 1 32]
"""

import torch

import common  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
from common import bench, make_decode_case
import triton  # noqa: E402
from kernels.sparse_decode import sparse_paged_decode  # noqa: E402


def random_pages(batch, hkv, context, page, budget, sinks, window):
    """[B, Hkv, S] distinct pages strictly between the sink and window pages: budget = sinks + window + S * page."""
    lo, hi = triton.cdiv(sinks, page), (context - window) // page
    num = max(0, min((budget - sinks - window) // page, hi - lo))
    scores = torch.rand(batch, hkv, hi - lo)
    return (scores.topk(num, dim=-1).indices + lo).to(torch.int32), num


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--num-splits", type=int, default=None, help="default: launcher heuristic")
    args = parser.parse_args()

    hq, hkv, d, page = common.LLAMA_8B
    use_cuda, device, dtype = common.pick_device(hq, hkv, d, page)
    if not use_cuda:  # tiny fp16 shape: bf16 tl.dot is wrong in the interpreter
        hq, hkv, args.contexts, args.batches, args.budgets = 4, 2, [512], [2], [256]
        args.sinks, args.window = 16, 16
        common.cpu_notice()
    elem = torch.tensor([], dtype=dtype).element_size()
    kw = dict(num_splits=args.num_splits)

    header = (f"{'context':>8} {'batch':>5} {'tokens':>6} {'sparse ms':>10} {'dense ms':>9} {'sdpa ms':>8} "
              f"{'x dense':>8} {'x sdpa':>7} {'GB/s':>7}")
    print(header)
    print("-" * len(header))
    for context in args.contexts:
        for batch in args.batches:
            query, kv_cache, block_table, seq_lens = make_decode_case(batch, context, hq, hkv, d, page, dtype, device)
            n_pages = block_table.shape[1]
            all_pages = common.all_pages(batch, hkv, n_pages, device)
            dense_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, all_pages, "page",
                                                         args.sinks, args.window, **kw), use_cuda)
            sdpa, k, v = common.decode_sdpa(query, hkv, context, use_cuda)
            sdpa_ms = bench(sdpa, use_cuda)
            del k, v
            for budget in args.budgets:
                selected, num = random_pages(batch, hkv, context, page, budget, args.sinks, args.window)
                selected = selected.to(device)
                sparse_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, selected, "page",
                                                              args.sinks, args.window, **kw), use_cuda)
                attended = min(args.sinks + args.window + num * page, context)
                nbytes = batch * hkv * attended * 2 * d * elem + 2 * query.numel() * elem
                print(f"{context:>8} {batch:>5} {attended:>6} {sparse_ms:>10.4f} {dense_ms:>9.4f} {sdpa_ms:>8.4f} "
                      f"{dense_ms / sparse_ms:>8.2f} {sdpa_ms / sparse_ms:>7.2f} {nbytes / sparse_ms / 1e6:>7.1f}")
            del query, kv_cache, block_table, all_pages
            if use_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
